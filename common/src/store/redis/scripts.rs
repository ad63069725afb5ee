//! The Lua scripts of the Redis store: each state transition, checked and written atomically,
//! with its event appended, published, and its webhook delivery queued.

pub(super) struct Scripts {
    pub create: redis::Script,
    pub coalesce: redis::Script,
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
    pub release: redis::Script,
    pub redrive: redis::Script,
    pub claim: redis::Script,
    pub idem_commit: redis::Script,
    pub idem_release: redis::Script,
    pub due_webhooks: redis::Script,
    pub webhook_attempted: redis::Script,
}

/// Prologue of every transition. KEYS: job, leases, events, webhooks due. ARGV: now, id, channel,
/// retention, key prefix, then the script's own. `emit` appends an event to the job's log,
/// publishes it, and queues a webhook delivery when the job has a webhook that wants it.
const PRELUDE: &str = r#"
local now, id, channel, retention, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function emit_for(jk, jid, kind, data)
  local ek = jk .. ':events'
  local eid = redis.call('XADD', ek, 'MAXLEN', '~', '1000', '*', 'kind', kind, 'data', data)
  redis.call('PEXPIRE', ek, retention)
  local message = jid .. ' ' .. eid .. ' ' .. kind .. ' ' .. data
  if kind == 'completed' then
    -- The finished record rides along, so a waiter answers without reading it back.
    local flat, record = redis.call('HGETALL', jk), {}
    for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
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
    redis.call('HSET', hk, 'job', jid, 'event', hook, 'at', now, 'attempts', 0)
    redis.call('HDEL', hk, 'body')
    redis.call('PEXPIRE', hk, 604800000)
    redis.call('ZADD', KEYS[4], now, did)
  end
end
local function emit(kind, data) emit_for(KEYS[1], id, kind, data) end
local function clear_lease()
  redis.call('HDEL', KEYS[1], 'lease_owner', 'envelope')
  redis.call('ZREM', KEYS[2], id)
end
-- Jobs coalesced onto this one: complete them with its outcome, or (when it ended without one)
-- hand them to the lease reaper, which queues each on its own.
local function settle_followers(status, field, value)
  local fk = KEYS[1] .. ':followers'
  for _, fid in ipairs(redis.call('SMEMBERS', fk)) do
    local k = prefix .. 'job:' .. fid
    local fs = redis.call('HGET', k, 'status')
    if fs == 'queued' or fs == 'running' then
      if status then
        redis.call('HSET', k, 'status', status, 'completed_at', now, field, value)
        redis.call('HDEL', k, 'envelope')
        redis.call('PEXPIRE', k, retention)
        emit_for(k, fid, 'completed', '{"status":"' .. status .. '"}')
      else
        redis.call('HSET', k, 'status', 'running', 'lease_owner', 'orphan')
        redis.call('ZADD', KEYS[2], 0, fid)
      end
    end
  end
  redis.call('DEL', fk)
  local ik = redis.call('HGET', KEYS[1], 'inflight')
  if ik and redis.call('GET', ik) == id then redis.call('DEL', ik) end
end
local s = redis.call('HGET', KEYS[1], 'status')
"#;

/// Most transitions need a live, non-terminal job.
const GUARD: &str = r"
if not s then return {'missing'} end
if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
";

fn transition_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{GUARD}{body}"))
}

fn prelude_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{body}"))
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            // ARGV[6]: event kind, [7]: event data, [8..]: field/value pairs.
            create: prelude_script(
                r#"
    if s then return {'exists'} end
    redis.call('HSET', KEYS[1], unpack(ARGV, 8))
    redis.call('PEXPIRE', KEYS[1], retention)
    emit(ARGV[6], ARGV[7])
    return {'ok'}"#,
            ),
            // KEYS[5]: in-flight key. ARGV[6]: envelope, [7..]: field/value pairs.
            coalesce: prelude_script(
                r#"
    if s then return {'exists'} end
    local leader = redis.call('GET', KEYS[5])
    if leader then
      local lk = prefix .. 'job:' .. leader
      local ls = redis.call('HGET', lk, 'status')
      if ls == 'queued' or ls == 'running' then
        redis.call('HSET', KEYS[1], unpack(ARGV, 7))
        redis.call('HSET', KEYS[1], 'follows', leader, 'envelope', ARGV[6])
        redis.call('PEXPIRE', KEYS[1], retention)
        redis.call('SADD', lk .. ':followers', id)
        redis.call('PEXPIRE', lk .. ':followers', retention)
        emit('status', '{"status":"queued"}')
        return {'follower', leader}
      end
    end
    redis.call('SET', KEYS[5], id, 'PX', retention)
    redis.call('HSET', KEYS[1], unpack(ARGV, 7))
    redis.call('HSET', KEYS[1], 'inflight', KEYS[5])
    redis.call('PEXPIRE', KEYS[1], retention)
    emit('status', '{"status":"queued"}')
    return {'leader'}"#,
            ),
            // KEYS[5]: withdrawn marker. ARGV[6]: deadline error.
            start: prelude_script(
                r#"
    if not s then
      if redis.call('EXISTS', KEYS[5]) == 1 then return {'withdrawn'} end
      return {'missing'}
    end
    if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
    local d = redis.call('HGET', KEYS[1], 'deadline')
    if s == 'queued' and d and tonumber(d) < tonumber(now) then
      redis.call('HSET', KEYS[1], 'status', 'expired', 'completed_at', now, 'error', ARGV[6])
      redis.call('PEXPIRE', KEYS[1], retention)
      emit('completed', '{"status":"expired"}')
      settle_followers(nil)
      return {'expired'}
    end
    redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', now)
    clear_lease()
    local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
    emit('status', '{"status":"running","attempt":' .. n .. '}')
    return {'ok', tostring(n)}"#,
            ),
            // ARGV[6]: status, [7]: field, [8]: value.
            finish: transition_script(
                r#"
    redis.call('HSET', KEYS[1], 'status', ARGV[6], 'completed_at', now, ARGV[7], ARGV[8])
    clear_lease()
    redis.call('PEXPIRE', KEYS[1], retention)
    emit('completed', '{"status":"' .. ARGV[6] .. '"}')
    settle_followers(ARGV[6], ARGV[7], ARGV[8])
    return {'ok'}"#,
            ),
            retry: transition_script(
                r#"
    redis.call('HSET', KEYS[1], 'status', 'queued')
    clear_lease()
    emit('status', '{"status":"queued"}')
    return {'ok'}"#,
            ),
            // ARGV[6]: deadline error.
            expire: transition_script(
                r#"
    local d = redis.call('HGET', KEYS[1], 'deadline')
    if s ~= 'queued' or not d or tonumber(d) >= tonumber(now) then return {'na', s} end
    redis.call('HSET', KEYS[1], 'status', 'expired', 'completed_at', now, 'error', ARGV[6])
    redis.call('PEXPIRE', KEYS[1], retention)
    emit('completed', '{"status":"expired"}')
    settle_followers(nil)
    return {'ok'}"#,
            ),
            // ARGV[6]: progress.
            progress: transition_script(
                r"
    redis.call('HSET', KEYS[1], 'progress', ARGV[6])
    emit('progress', ARGV[6])
    return {'ok'}",
            ),
            // ARGV[6]: canceled error.
            cancel: transition_script(
                r#"
    redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_at', now, 'error', ARGV[6])
    clear_lease()
    redis.call('PEXPIRE', KEYS[1], retention)
    emit('completed', '{"status":"canceled"}')
    settle_followers(nil)
    return {'ok'}"#,
            ),
            // KEYS[5]: withdrawn marker.
            discard: prelude_script(
                r"
    if s then settle_followers(nil) end
    redis.call('DEL', KEYS[1], KEYS[3])
    redis.call('SET', KEYS[5], 1, 'PX', retention)
    return {'ok'}",
            ),
            // ARGV[6]: owner, [7]: until, [8]: envelope.
            lease: transition_script(
                r"
    if s ~= 'running' then return {'na', s} end
    redis.call('HSET', KEYS[1], 'lease_owner', ARGV[6], 'envelope', ARGV[8])
    redis.call('ZADD', KEYS[2], ARGV[7], id)
    return {'ok'}",
            ),
            // ARGV[6]: owner, [7]: until.
            renew: transition_script(
                r"
    if s ~= 'running' or redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[6] then return {'na', s} end
    redis.call('ZADD', KEYS[2], 'XX', ARGV[7], id)
    return {'ok'}",
            ),
            // KEYS: leases. ARGV: now, limit, job key prefix, owner, claim until.
            reap: redis::Script::new(
                r"
    local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
    local out = {}
    for _, id in ipairs(ids) do
      local k = ARGV[3] .. id
      local env = redis.call('HGET', k, 'envelope')
      if redis.call('HGET', k, 'status') == 'running' and env then
        redis.call('ZADD', KEYS[1], ARGV[5], id)
        redis.call('HSET', k, 'lease_owner', ARGV[4])
        table.insert(out, id)
        table.insert(out, env)
      else
        redis.call('ZREM', KEYS[1], id)
      end
    end
    return out",
            ),
            // ARGV[6]: owner.
            release: transition_script(
                r#"
    if s ~= 'running' or redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[6] then return {'na', s} end
    redis.call('HSET', KEYS[1], 'status', 'queued')
    clear_lease()
    emit('status', '{"status":"queued"}')
    return {'ok'}"#,
            ),
            redrive: prelude_script(
                r#"
    if not s then return {'missing'} end
    if s ~= 'failed' then return {'na', s} end
    redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0)
    redis.call('HDEL', KEYS[1], 'error', 'completed_at', 'started_at', 'progress')
    redis.call('PEXPIRE', KEYS[1], retention)
    emit('status', '{"status":"queued"}')
    return {'ok'}"#,
            ),
            // KEYS: claim. ARGV: job, fingerprint, ttl.
            claim: redis::Script::new(
                r"
    local held = redis.call('HMGET', KEYS[1], 'job', 'fp', 'committed')
    if held[1] then return held end
    redis.call('HSET', KEYS[1], 'job', ARGV[1], 'fp', ARGV[2], 'committed', '0')
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {}",
            ),
            // KEYS: claim. ARGV: job. Only the claim's holder may commit or release it.
            idem_commit: redis::Script::new(
                "if redis.call('HGET', KEYS[1], 'job') == ARGV[1] then redis.call('HSET', KEYS[1], 'committed', '1') end return 1",
            ),
            idem_release: redis::Script::new(
                "if redis.call('HGET', KEYS[1], 'job') == ARGV[1] then redis.call('DEL', KEYS[1]) end return 1",
            ),
            // KEYS: due. ARGV: now, limit, claim until, delivery key prefix.
            due_webhooks: redis::Script::new(
                r"
    local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
    local out = {}
    for _, did in ipairs(ids) do
      local h = redis.call('HMGET', ARGV[4] .. did, 'job', 'event', 'at', 'attempts', 'body')
      if h[1] then
        redis.call('ZADD', KEYS[1], ARGV[3], did)
        table.insert(out, did)
        table.insert(out, h[1])
        table.insert(out, h[2])
        table.insert(out, h[3])
        table.insert(out, h[4])
        table.insert(out, h[5] or '')
      else
        redis.call('ZREM', KEYS[1], did)
      end
    end
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
      redis.call('DEL', KEYS[2])
    end
    return 1",
            ),
        }
    }
}
