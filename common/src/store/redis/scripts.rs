//! The Lua scripts of the Redis store: each state transition, checked and written atomically,
//! with its event appended, published, and its webhook delivery queued.
//!
//! Every transition script shares one calling convention. KEYS: [1] the job's hash, [2] the
//! `leases` sorted set, [3] the job's event log (a list), [4] the `webhooks` due set, [5] the `active`
//! set (live job → the time by which it must show activity), then the script's own from [6].
//! ARGV: [1] how long a live job may go quiet before the sweeper looks at it (ms), [2] the job id,
//! [3] the pub/sub channel, [4] the retention of live jobs (ms), [5] the key prefix, [6] the
//! retention of finished jobs (ms), then the script's own from [7]. Time is Redis's own `TIME`.

pub(super) struct Scripts {
    pub create: redis::Script,
    pub coalesce: redis::Script,
    pub confirm: redis::Script,
    pub read: redis::Script,
    pub discard: redis::Script,
    pub start: redis::Script,
    pub finish: redis::Script,
    pub retry: redis::Script,
    pub expire: redis::Script,
    pub progress: redis::Script,
    pub cancel: redis::Script,
    pub lease: redis::Script,
    pub renew: redis::Script,
    pub reap: redis::Script,
    pub requeue_later: redis::Script,
    pub sweep: redis::Script,
    pub stray: redis::Script,
    pub redrive: redis::Script,
    pub claim: redis::Script,
    pub idem_release: redis::Script,
    pub due_webhooks: redis::Script,
    pub webhook_attempted: redis::Script,
    pub worker_seen: redis::Script,
    pub reserve_slot: redis::Script,
    pub list: redis::Script,
}

/// Most followers one job carries; an identical job past that runs on its own.
pub const MAX_FOLLOWERS: usize = 256;

/// The current time in milliseconds, from Redis.
const CLOCK: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local nows = string.format('%d', now)
";

/// Prologue of every transition (see the module header). `emit` appends an event to the job's
/// log, publishes it, and queues a webhook delivery when the job has a webhook that wants it.
const PRELUDE: &str = r#"
local idle, id, channel, retention, prefix, kept = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
-- A record's output: inline, or shared by reference (followers, cache hits).
local function output_of(jk)
  local ref = redis.call('HGET', jk, 'output_ref')
  if ref then return redis.call('GET', prefix .. 'output:' .. ref) end
  return redis.call('HGET', jk, 'output')
end
local function emit_for(jk, jid, kind, data)
  -- The job's log: a list of "id kind data", ids counting 1, 2, 3… per job, at most 1000 kept
  -- (a list of a few entries costs ~100 bytes; a stream's first node costs ~4.5 KB).
  local ek = jk .. ':log'
  local eid = tostring(redis.call('HINCRBY', jk, 'ev', 1))
  redis.call('RPUSH', ek, eid .. ' ' .. kind .. ' ' .. data)
  if redis.call('LLEN', ek) > 1000 then redis.call('LTRIM', ek, -1000, -1) end
  local ttl = redis.call('PTTL', jk)
  redis.call('PEXPIRE', ek, ttl > 0 and ttl or retention)
  local message = jid .. ' ' .. eid .. ' ' .. kind .. ' ' .. data
  if kind == 'completed' then
    -- The finished record rides along, so a waiter answers without reading it back.
    local flat, record = redis.call('HGETALL', jk), {}
    for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
    if record['output_ref'] then record['output'] = output_of(jk) end
    message = message .. '\n' .. cjson.encode(record)
  end
  redis.call('PUBLISH', channel, message)
  if not redis.call('HGET', jk, 'webhook_url') then return end
  local wanted = ',' .. (redis.call('HGET', jk, 'webhook_events') or '') .. ','
  local hook, did
  if kind == 'completed' then
    hook, did = 'job.completed', jid .. ':completed:' .. eid
  elseif kind == 'progress' and string.find(wanted, ',progress,', 1, true) then
    hook, did = 'job.progress', jid .. ':progress'
  elseif kind == 'status' and string.find(data, '"running"', 1, true) and string.find(wanted, ',start,', 1, true) then
    hook, did = 'job.started', jid .. ':started:' .. eid
  end
  if hook then
    local hk = prefix .. 'webhook:' .. did
    local seq = redis.call('HINCRBY', jk, 'wh_seq', 1)
    redis.call('HSET', hk, 'job', jid, 'event', hook, 'at', nows, 'attempts', 0, 'seq', seq)
    redis.call('HDEL', hk, 'body')
    redis.call('PEXPIRE', hk, retention)
    -- The job's pending deliveries in order: only the first is handed out.
    redis.call('ZADD', jk .. ':hooks', seq, did)
    redis.call('PEXPIRE', jk .. ':hooks', retention)
    redis.call('ZADD', KEYS[4], now, did)
  end
end
local function emit(kind, data) emit_for(KEYS[1], id, kind, data) end
-- A live job's retention starts again, and it has `after` ms to show activity again.
local function touch(after)
  redis.call('PEXPIRE', KEYS[1], retention)
  redis.call('PEXPIRE', KEYS[3], retention)
  redis.call('ZADD', KEYS[5], now + after, id)
end
-- A deadline is a start-by time: a job that started once has met it, and a rerun of it (a retry,
-- a lapsed lease, a stray) is not expired by it.
local function never_started()
  return tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') == 0
end
local function clear_lease_of(jk, jid)
  redis.call('HDEL', jk, 'lease_owner')
  redis.call('ZREM', KEYS[2], jid)
end
local function clear_lease() clear_lease_of(KEYS[1], id) end
-- The job is to be published: its tenant's lane of its model is one the workers consume.
local function lane()
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant then redis.call('SADD', prefix .. 'lanes:' .. redis.call('HGET', KEYS[1], 'model'), tenant) end
end
-- A job became terminal: no lease, no envelope, nothing to watch; kept for the finished retention.
local function ended_for(jk, jid)
  clear_lease_of(jk, jid)
  -- Its tenant's slot of jobs in flight is free again.
  local tenant = redis.call('HGET', jk, 'tenant')
  if tenant then redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':live', jid) end
  redis.call('HDEL', jk, 'envelope')
  redis.call('ZREM', KEYS[5], jid)
  redis.call('PEXPIRE', jk, kept)
  redis.call('PEXPIRE', jk .. ':log', kept)
end
local function ended() ended_for(KEYS[1], id) end
-- The job listings: sorted sets, all of one score, of "<created_at, 13 digits>:<id>", so their
-- lexicographic order is (created_at, id): `jobs` of every job, `tenant:<t>:jobs` of a tenant's.
local function listings()
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant then return { prefix .. 'jobs', prefix .. 'tenant:' .. tenant .. ':jobs' } end
  return { prefix .. 'jobs' }
end
local function listed_as()
  local created = redis.call('HGET', KEYS[1], 'created_at')
  if not created then return nil end
  return string.rep('0', 13 - #created) .. created .. ':' .. id
end
-- A new record joins its listings, numbered in `listed` (a listing shows none numbered past its
-- horizon). Each listing drops up to two entries whose record is gone, walking round it from where
-- it stopped last (kept in the `jobs:trim` hash): it holds about twice the records kept at most,
-- and a listing nobody adds to expires after both retentions.
local function enlist()
  local member = listed_as()
  redis.call('HSET', KEYS[1], 'listed', redis.call('INCR', prefix .. 'jobs:seq'))
  local trim, keep = prefix .. 'jobs:trim', tonumber(retention) + tonumber(kept)
  for _, ix in ipairs(listings()) do
    redis.call('ZADD', ix, 0, member)
    redis.call('PEXPIRE', ix, keep)
    local walk = redis.call('ZRANGEBYLEX', ix, redis.call('HGET', trim, ix) or '-', '+', 'LIMIT', 0, 2)
    for _, m in ipairs(walk) do
      if redis.call('EXISTS', prefix .. 'job:' .. string.sub(m, string.find(m, ':', 1, true) + 1)) == 0 then
        redis.call('ZREM', ix, m)
      end
    end
    if #walk < 2 then redis.call('HDEL', trim, ix) else redis.call('HSET', trim, ix, '(' .. walk[#walk]) end
  end
  redis.call('PEXPIRE', trim, keep)
end
-- A withdrawn record leaves its listings.
local function delist()
  local member = listed_as()
  if not member then return end
  for _, ix in ipairs(listings()) do redis.call('ZREM', ix, member) end
end
-- Hands a live job to the reaper, which queues its envelope again.
local function requeue_for(jk, jid, at)
  redis.call('HSET', jk, 'status', 'queued', 'lease_owner', 'requeue')
  redis.call('ZADD', KEYS[2], at, jid)
  redis.call('ZADD', KEYS[5], now + idle, jid)
end
-- Jobs coalesced onto this one: complete them with its outcome (by reference to one shared copy),
-- or (when it ended without one) hand them to the reaper, which queues each on its own.
local function settle_followers(status, field, value)
  local fk = KEYS[1] .. ':followers'
  local followers = redis.call('SMEMBERS', fk)
  local ref
  if #followers > 0 and field == 'output' then
    ref = redis.sha1hex(value)
    local ok = prefix .. 'output:' .. ref
    redis.call('SET', ok, value, 'PX', kept)
    redis.call('HDEL', KEYS[1], 'output')
    redis.call('HSET', KEYS[1], 'output_ref', ref)
  end
  for _, fid in ipairs(followers) do
    local k = prefix .. 'job:' .. fid
    local fs = redis.call('HGET', k, 'status')
    if fs == 'queued' or fs == 'running' then
      if status then
        if ref then
          redis.call('HSET', k, 'status', status, 'completed_at', nows, 'output_ref', ref)
        else
          redis.call('HSET', k, 'status', status, 'completed_at', nows, field, value)
        end
        ended_for(k, fid)
        emit_for(k, fid, 'completed', '{"status":"' .. status .. '"}')
      else
        redis.call('PEXPIRE', k, retention)
        requeue_for(k, fid, 0)
      end
    end
  end
  redis.call('DEL', fk)
  local ik = redis.call('HGET', KEYS[1], 'inflight')
  if ik and redis.call('GET', ik) == id then redis.call('DEL', ik) end
end
-- Ends a live job without an outcome (expired, canceled, or failed as lost) with `err`; its
-- followers go to the reaper to run on their own.
local function end_without_outcome(status, err)
  redis.call('HSET', KEYS[1], 'status', status, 'completed_at', nows, 'error', err)
  ended()
  emit('completed', '{"status":"' .. status .. '"}')
  settle_followers(nil)
end
local s = redis.call('HGET', KEYS[1], 'status')
"#;

/// Most transitions need a live, non-terminal job.
const GUARD: &str = r"
if not s then return {'missing'} end
if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
";

/// Writes by a run (ARGV[7]: its token) need it to be the job's latest run.
const RUN_GUARD: &str = r"
if s ~= 'running' then return {'na', s} end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[7] then return {'superseded'} end
";

fn transition_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{CLOCK}{PRELUDE}{GUARD}{body}"))
}

fn run_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{CLOCK}{PRELUDE}{GUARD}{RUN_GUARD}{body}"))
}

fn prelude_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{CLOCK}{PRELUDE}{body}"))
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            // ARGV[7]: event kind, [8]: event data, [9]: envelope or '', [10]: idempotency key or
            // '' (its claim lives its full lifetime now that its job exists), [11..]: field/value
            // pairs.
            create: prelude_script(
                r#"
    if s then return {'exists'} end
    redis.call('HSET', KEYS[1], unpack(ARGV, 11))
    enlist()
    if ARGV[7] == 'completed' then
      local out = redis.call('HGET', KEYS[1], 'output')
      if out then
        -- A cache hit: one shared copy of the output, however many hits refer to it.
        local ref = redis.sha1hex(out)
        local ok = prefix .. 'output:' .. ref
        if redis.call('SET', ok, out, 'PX', kept, 'NX') == false then redis.call('PEXPIRE', ok, kept, 'GT') end
        redis.call('HDEL', KEYS[1], 'output')
        redis.call('HSET', KEYS[1], 'output_ref', ref)
      end
      redis.call('PEXPIRE', KEYS[1], kept)
    else
      if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'envelope', ARGV[9]) end
      lane()
      touch(idle)
    end
    if ARGV[10] ~= '' then
      local ck = prefix .. 'idem:' .. ARGV[10]
      if redis.call('HGET', ck, 'job') == id then redis.call('PEXPIRE', ck, redis.call('HGET', ck, 'ttl') or retention) end
    end
    emit(ARGV[7], ARGV[8])
    return {'ok'}"#,
            ),
            // KEYS[6]: in-flight key. ARGV[7]: envelope, [8]: '1' to hold off (write nothing) while
            // a twin's message is not confirmed yet, [9..]: field/value pairs.
            coalesce: prelude_script(&format!(
                r#"
    if s then return {{'exists'}} end
    local leader = redis.call('GET', KEYS[6])
    if leader then
      local lk = prefix .. 'job:' .. leader
      local ls = redis.call('HGET', lk, 'status')
      local confirmed = ls == 'running' or (ls == 'queued' and redis.call('HGET', lk, 'confirmed') == '1')
      if ls == 'queued' and not confirmed and ARGV[8] == '1' then return {{'pending', leader}} end
      if confirmed and redis.call('SCARD', lk .. ':followers') < {MAX_FOLLOWERS} then
        redis.call('HSET', KEYS[1], unpack(ARGV, 9))
        redis.call('HSET', KEYS[1], 'follows', leader, 'envelope', ARGV[7], 'confirmed', '1')
        enlist()
        touch(idle)
        redis.call('SADD', lk .. ':followers', id)
        redis.call('PEXPIRE', lk .. ':followers', retention)
        emit('status', '{{"status":"queued"}}')
        return {{'follower', leader}}
      end
    end
    -- No twin to follow (none, one not confirmed yet, or one with followers enough): lead.
    redis.call('SET', KEYS[6], id, 'PX', retention)
    redis.call('HSET', KEYS[1], unpack(ARGV, 9))
    redis.call('HSET', KEYS[1], 'inflight', KEYS[6], 'envelope', ARGV[7])
    enlist()
    lane()
    touch(idle)
    emit('status', '{{"status":"queued"}}')
    return {{'leader'}}"#
            )),
            // ARGV[7]: idempotency key or ''.
            confirm: prelude_script(
                r"
    if s == 'queued' or s == 'running' then redis.call('HSET', KEYS[1], 'confirmed', '1') end
    if ARGV[7] ~= '' then
      local ck = prefix .. 'idem:' .. ARGV[7]
      if redis.call('HGET', ck, 'job') == id then
        redis.call('HSET', ck, 'committed', '1')
        redis.call('PEXPIRE', ck, redis.call('HGET', ck, 'ttl') or retention)
      end
    end
    return {'ok'}",
            ),
            // KEYS: job, ARGV: output key prefix. The record's fields, its shared output last.
            read: redis::Script::new(
                r"
    local flat = redis.call('HGETALL', KEYS[1])
    local ref = redis.call('HGET', KEYS[1], 'output_ref')
    if ref then
      table.insert(flat, 'output')
      table.insert(flat, redis.call('GET', ARGV[1] .. ref) or 'null')
    end
    return flat",
            ),
            // KEYS[6]: withdrawn marker, [7]: the model's workers. ARGV[7]: deadline error,
            // [8]: worker.
            start: prelude_script(
                r#"
    if not s then
      if redis.call('EXISTS', KEYS[6]) == 1 then return {'withdrawn'} end
      return {'missing'}
    end
    if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
    local d = redis.call('HGET', KEYS[1], 'deadline')
    if s == 'queued' and d and tonumber(d) < now and never_started() then
      end_without_outcome('expired', ARGV[7])
      return {'expired'}
    end
    local owner = redis.call('HGET', KEYS[1], 'lease_owner')
    local until_ = redis.call('ZSCORE', KEYS[2], id)
    if s == 'running' and owner and owner ~= 'requeue' and until_ and tonumber(until_) > now then
      return {'held'}
    end
    redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', nows, 'worker', ARGV[8], 'confirmed', '1')
    clear_lease()
    touch(idle)
    local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
    emit('status', '{"status":"running","attempt":' .. n .. '}')
    return {'ok', tostring(n)}"#,
            ),
            // ARGV[7]: run, [8]: status, [9]: field, [10]: value.
            finish: run_script(
                r#"
    redis.call('HSET', KEYS[1], 'status', ARGV[8], 'completed_at', nows, ARGV[9], ARGV[10])
    ended()
    settle_followers(ARGV[8], ARGV[9], ARGV[10])
    emit('completed', '{"status":"' .. ARGV[8] .. '"}')
    return {'ok'}"#,
            ),
            // ARGV[7]: run, [8]: the delay before the retry is delivered (ms).
            retry: run_script(
                r#"
    redis.call('HSET', KEYS[1], 'status', 'queued')
    clear_lease()
    touch(idle + tonumber(ARGV[8]))
    emit('status', '{"status":"queued"}')
    return {'ok'}"#,
            ),
            // ARGV[7]: deadline error.
            expire: transition_script(
                r#"
    local d = redis.call('HGET', KEYS[1], 'deadline')
    if s ~= 'queued' or not d or tonumber(d) >= now or not never_started() then return {'na', s} end
    end_without_outcome('expired', ARGV[7])
    return {'ok'}"#,
            ),
            // ARGV[7]: run, [8]: progress.
            progress: run_script(
                r"
    redis.call('HSET', KEYS[1], 'progress', ARGV[8])
    touch(idle)
    emit('progress', ARGV[8])
    return {'ok'}",
            ),
            // ARGV[7]: canceled error.
            cancel: transition_script(
                r#"
    end_without_outcome('canceled', ARGV[7])
    return {'ok'}"#,
            ),
            // KEYS[6]: withdrawn marker.
            discard: prelude_script(
                r"
    if s then
      settle_followers(nil)
      delist()
    end
    redis.call('DEL', KEYS[1], KEYS[3])
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('SET', KEYS[6], 1, 'PX', retention)
    return {'ok'}",
            ),
            // ARGV[7]: run, [8]: owner, [9]: ttl (ms), [10]: envelope.
            lease: run_script(
                r"
    redis.call('HSET', KEYS[1], 'lease_owner', ARGV[8], 'envelope', ARGV[10])
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[9]), id)
    touch(idle + tonumber(ARGV[9]))
    return {'ok'}",
            ),
            // ARGV[7]: owner, [8]: ttl (ms).
            renew: transition_script(
                r"
    if s ~= 'running' or redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[7] then return {'na', s} end
    redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[8]), id)
    touch(idle + tonumber(ARGV[8]))
    return {'ok'}",
            ),
            // KEYS: leases, active. ARGV: limit, job key prefix, idle (ms), retention (ms).
            reap: redis::Script::new(&format!(
                r#"{CLOCK}
    local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
    local out = {{}}
    for _, id in ipairs(ids) do
      redis.call('ZREM', KEYS[1], id)
      local k = ARGV[2] .. id
      local s = redis.call('HGET', k, 'status')
      local env = redis.call('HGET', k, 'envelope')
      if (s == 'running' or s == 'queued') and env and redis.call('HGET', k, 'lease_owner') then
        redis.call('HSET', k, 'status', 'queued')
        redis.call('HDEL', k, 'lease_owner', 'follows')
        redis.call('PEXPIRE', k, ARGV[4])
        -- Strays requeued again and again (their queue is not consumed) are looked at less often.
        local sweeps = tonumber(redis.call('HGET', k, 'sweeps') or '0')
        redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]) * 2 ^ math.min(sweeps, 6), id)
        local eid = tostring(redis.call('HINCRBY', k, 'ev', 1))
        redis.call('RPUSH', k .. ':log', eid .. ' status {{"status":"queued"}}')
        table.insert(out, id)
        table.insert(out, env)
      end
    end
    return out"#
            )),
            // ARGV[7]: delay (ms).
            requeue_later: transition_script(
                r"
    requeue_for(KEYS[1], id, now + tonumber(ARGV[7]))
    return {'ok'}",
            ),
            // KEYS: active. ARGV: limit.
            sweep: redis::Script::new(&format!(
                r"{CLOCK}
    return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])"
            )),
            // ARGV[7]: most sweeps, [8]: lost error. A running job is looked after only by a live
            // lease: a run that outlasts `lease_after` takes one, so a quiet run without one is
            // lost (its worker may well be alive: its finish write was lost, say).
            stray: prelude_script(
                r#"
    if s ~= 'queued' and s ~= 'running' then
      redis.call('ZREM', KEYS[5], id)
      return {'gone'}
    end
    local due = redis.call('ZSCORE', KEYS[5], id)
    if due and tonumber(due) > now then return {'fine'} end
    local until_ = redis.call('ZSCORE', KEYS[2], id)
    if until_ and tonumber(until_) > now then
      touch(tonumber(until_) - now + idle)
      return {'fine'}
    end
    local leader = redis.call('HGET', KEYS[1], 'follows')
    if leader then
      local ls = redis.call('HGET', prefix .. 'job:' .. leader, 'status')
      if ls == 'queued' or ls == 'running' then
        touch(idle)
        return {'fine'}
      end
    end
    local n = redis.call('HINCRBY', KEYS[1], 'sweeps', 1)
    if n > tonumber(ARGV[7]) or not redis.call('HGET', KEYS[1], 'envelope') then
      end_without_outcome('failed', ARGV[8])
      return {'lost'}
    end
    redis.call('PEXPIRE', KEYS[1], retention)
    requeue_for(KEYS[1], id, 0)
    emit('status', '{"status":"queued"}')
    return {'requeued'}"#,
            ),
            redrive: prelude_script(
                r#"
    if not s then return {'missing'} end
    if s ~= 'failed' then return {'na', s} end
    redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0)
    redis.call('HDEL', KEYS[1], 'error', 'completed_at', 'started_at', 'progress', 'sweeps')
    touch(idle)
    emit('status', '{"status":"queued"}')
    return {'ok'}"#,
            ),
            // KEYS: claim. ARGV: job, fingerprint, pending ttl, ttl, key prefix. A pending claim
            // whose job exists with its message enqueued (or finished) reads as committed; one
            // whose job was withdrawn is stale and taken over.
            claim: redis::Script::new(
                r"
    local held = redis.call('HMGET', KEYS[1], 'job', 'fp', 'committed')
    if held[1] and held[3] ~= '1' then
      local jk = ARGV[5] .. 'job:' .. held[1]
      local s = redis.call('HGET', jk, 'status')
      if s and (redis.call('HGET', jk, 'confirmed') == '1' or (s ~= 'queued' and s ~= 'running')) then
        redis.call('HSET', KEYS[1], 'committed', '1')
        redis.call('PEXPIRE', KEYS[1], redis.call('HGET', KEYS[1], 'ttl') or ARGV[4])
        held[3] = '1'
      elseif not s and redis.call('EXISTS', ARGV[5] .. 'withdrawn:' .. held[1]) == 1 then
        held[1] = false
      end
    end
    if held[1] then return held end
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'job', ARGV[1], 'fp', ARGV[2], 'committed', '0', 'ttl', ARGV[4])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {}",
            ),
            // KEYS: claim. ARGV: job. Only the claim's holder may release it.
            idem_release: redis::Script::new(
                "if redis.call('HGET', KEYS[1], 'job') == ARGV[1] then redis.call('DEL', KEYS[1]) end return 1",
            ),
            // KEYS: due. ARGV: now, limit, claim until, delivery key prefix, job key prefix.
            // A delivery behind an earlier pending one of its job waits (a second) for its turn.
            due_webhooks: redis::Script::new(
                r"
    local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
    local out = {}
    for _, did in ipairs(ids) do
      local h = redis.call('HMGET', ARGV[4] .. did, 'job', 'event', 'at', 'attempts', 'body', 'seq')
      if h[1] then
        local first = redis.call('ZRANGE', ARGV[5] .. h[1] .. ':hooks', 0, 0)[1]
        if first == nil or first == did then
          redis.call('ZADD', KEYS[1], ARGV[3], did)
          table.insert(out, did)
          table.insert(out, h[1])
          table.insert(out, h[2])
          table.insert(out, h[3])
          table.insert(out, h[4])
          table.insert(out, h[5] or '')
          table.insert(out, h[6] or '0')
        else
          redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + 1000, did)
        end
      else
        redis.call('ZREM', KEYS[1], did)
      end
    end
    return out",
            ),
            // KEYS: the model's workers. ARGV: worker, retention.
            worker_seen: redis::Script::new(&format!(
                r"{CLOCK}
    redis.call('ZADD', KEYS[1], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1"
            )),
            // KEYS: the tenant's jobs in flight. ARGV: job, most at once, how long an entry can
            // stand (a job whose end was never seen is forgotten after its retention). Replies
            // {granted, in flight}.
            reserve_slot: redis::Script::new(&format!(
                r"{CLOCK}
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
    local n = redis.call('ZCARD', KEYS[1])
    if n >= tonumber(ARGV[2]) then return {{0, n}} end
    redis.call('ZADD', KEYS[1], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {{1, n + 1}}"
            )),
            // KEYS: the listing, the listing's count. ARGV: [1] the upper bound (exclusive) or '+',
            // [2] the lower bound or '-', [3] most records, [4] most entries examined, [5] the
            // horizon or '' (the first page's: the count now), [6] status or '', [7] model or '',
            // [8] job key prefix, [9] output key prefix, [10..] the record fields to read. Replies
            // { {horizon, where the next page starts or ''}, {id, field, value, ...}, ...}; drops
            // entries whose record is gone.
            list: redis::Script::new(
                r"
    local count = redis.call('GET', KEYS[2]) or '0'
    local horizon = tonumber(ARGV[5] ~= '' and ARGV[5] or count)
    local limit, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
    local entries = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, cap + 1)
    local out, found, examined = { {} }, 0, 0
    for i = 1, math.min(#entries, cap) do
      examined = i
      local m = entries[i]
      local jid = string.sub(m, string.find(m, ':', 1, true) + 1)
      local jk = ARGV[8] .. jid
      local h = redis.call('HMGET', jk, 'status', 'model', 'listed')
      if not h[1] then
        redis.call('ZREM', KEYS[1], m)
      elseif tonumber(h[3] or '0') <= horizon and (ARGV[6] == '' or h[1] == ARGV[6])
          and (ARGV[7] == '' or h[2] == ARGV[7]) then
        local values = redis.call('HMGET', jk, unpack(ARGV, 10))
        local record = { jid }
        for j = 10, #ARGV do
          if values[j - 9] then
            table.insert(record, ARGV[j])
            table.insert(record, values[j - 9])
          end
        end
        local ref = redis.call('HGET', jk, 'output_ref')
        if ref then
          table.insert(record, 'output')
          table.insert(record, redis.call('GET', ARGV[9] .. ref) or 'null')
        end
        table.insert(out, record)
        found = found + 1
        if found == limit then break end
      end
    end
    out[1] = { ARGV[5] ~= '' and ARGV[5] or count, examined < #entries and entries[examined] or '' }
    return out",
            ),
            // KEYS: due, delivery, job. ARGV: delivery id, status, ok, at, retry at, body.
            webhook_attempted: redis::Script::new(
                r"
    redis.call('HINCRBY', KEYS[2], 'attempts', 1)
    redis.call('HSET', KEYS[2], 'body', ARGV[6])
    if redis.call('EXISTS', KEYS[3]) == 1 then
      redis.call('HINCRBY', KEYS[3], 'wh_attempts', 1)
      if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], 'wh_last_status', ARGV[2]) else redis.call('HDEL', KEYS[3], 'wh_last_status') end
      if ARGV[3] == '1' then redis.call('HSET', KEYS[3], 'wh_delivered_at', ARGV[4]) end
      if ARGV[3] ~= '1' and ARGV[5] == '' then redis.call('HSET', KEYS[3], 'wh_gave_up_at', ARGV[4]) end
    end
    if ARGV[3] ~= '1' and ARGV[5] ~= '' then
      redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
    else
      redis.call('ZREM', KEYS[1], ARGV[1])
      redis.call('ZREM', KEYS[3] .. ':hooks', ARGV[1])
      redis.call('DEL', KEYS[2])
    end
    return 1",
            ),
        }
    }
}
