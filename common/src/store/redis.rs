//! The job store on Redis. Per job: a hash `{prefix}job:{id}` and an event stream
//! `{prefix}job:{id}:events`, both expiring after the retention TTL. Shared: the sorted set
//! `{prefix}leases` of long jobs' lease deadlines, the sorted set `{prefix}webhooks` of due webhook
//! deliveries (with a hash `{prefix}webhook:{delivery}` each), `{prefix}withdrawn:{id}` markers,
//! `{prefix}idem:{key}` idempotency claims, and the pub/sub channel `{prefix}events`.
//!
//! Every state transition is one Lua script: the check of the current status, the write, the
//! event appended to the job's log and published, and the webhook delivery queued — all atomic.
//! That is what fences terminal writes against redelivered duplicates, and what makes every
//! transition visible to SSE subscribers and webhooks exactly once (a transactional outbox).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use kiln_proto::{EventKind, JobError, JobEvent, JobId, JobRecord, JobStatus, ModelName, UnixMillis, WebhookState};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;

use super::{
    Claim, Coalesced, Lapsed, Outcome, Start, Store, StoreError, Transition, WebhookAttempt, WebhookDelivery,
    canceled_error, deadline_error,
};
use crate::config::Secret;

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    /// Prefix of every key, so deployments and tests can share a server.
    pub key_prefix: String,
    /// How long a job record is kept, counted from acceptance and again from completion.
    pub retention: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on one command's response.
    pub response_timeout: Duration,
}

pub struct RedisStore {
    conn: ConnectionManager,
    client: redis::Client,
    config: RedisConfig,
    scripts: Scripts,
    hub: Arc<Hub>,
}

struct Scripts {
    create: redis::Script,
    coalesce: redis::Script,
    discard: redis::Script,
    start: redis::Script,
    finish: redis::Script,
    retry: redis::Script,
    expire: redis::Script,
    progress: redis::Script,
    cancel: redis::Script,
    lease: redis::Script,
    renew: redis::Script,
    reap: redis::Script,
    release: redis::Script,
    redrive: redis::Script,
    claim: redis::Script,
    idem_commit: redis::Script,
    idem_release: redis::Script,
    due_webhooks: redis::Script,
    webhook_attempted: redis::Script,
}

/// Prologue of every transition. KEYS: job, leases, events, webhooks due. ARGV: now, id, channel,
/// retention, webhook key prefix, then the script's own. `emit` appends an event to the job's log,
/// publishes it, and queues a webhook delivery when the job has a webhook that wants it.
const PRELUDE: &str = r#"
local now, id, channel, retention, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function emit_for(jk, jid, kind, data)
  local ek = jk .. ':events'
  local eid = redis.call('XADD', ek, 'MAXLEN', '~', '1000', '*', 'kind', kind, 'data', data)
  redis.call('PEXPIRE', ek, retention)
  redis.call('PUBLISH', channel, jid .. ' ' .. eid .. ' ' .. kind .. ' ' .. data)
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

impl RedisStore {
    /// Creates the store without connecting: the first command connects, so a process can start
    /// while Redis is still down, and reconnects after Redis restarts.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|e| StoreError::Unavailable(format!("bad Redis URL: {e}")))?;
        let mgr_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), mgr_config).map_err(unavailable)?;
        let scripts = Scripts {
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
        };
        Ok(Self { conn, client, config, scripts, hub: Arc::new(Hub::default()) })
    }

    fn key(&self, id: JobId) -> String {
        format!("{}job:{id}", self.config.key_prefix)
    }

    fn events_key(&self, id: JobId) -> String {
        format!("{}job:{id}:events", self.config.key_prefix)
    }

    fn withdrawn_key(&self, id: JobId) -> String {
        format!("{}withdrawn:{id}", self.config.key_prefix)
    }

    fn leases_key(&self) -> String {
        format!("{}leases", self.config.key_prefix)
    }

    fn webhooks_key(&self) -> String {
        format!("{}webhooks", self.config.key_prefix)
    }

    fn webhook_prefix(&self) -> String {
        format!("{}webhook:", self.config.key_prefix)
    }

    fn channel(&self) -> String {
        format!("{}events", self.config.key_prefix)
    }

    fn retention_ms(&self) -> u64 {
        self.config.retention.as_millis() as u64
    }

    /// A transition's invocation with the standard keys and prologue arguments.
    fn transition<'a>(&self, script: &'a redis::Script, id: JobId, now: UnixMillis) -> redis::ScriptInvocation<'a> {
        let mut inv = script.key(self.key(id));
        inv.key(self.leases_key())
            .key(self.events_key(id))
            .key(self.webhooks_key())
            .arg(now)
            .arg(id.to_string())
            .arg(self.channel())
            .arg(self.retention_ms())
            .arg(&self.config.key_prefix);
        inv
    }

    async fn idempotency_holder(&self, script: &redis::Script, key: &str, job: JobId) -> Result<(), StoreError> {
        let mut inv = script.key(format!("{}idem:{key}", self.config.key_prefix));
        inv.arg(job.to_string());
        self.invoke::<i64>(&inv).await.map(drop)
    }

    async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        inv.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)
    }

    async fn apply(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Transition, StoreError> {
        Ok(transition(self.invoke(inv).await?))
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn status_of(reply: &[String]) -> JobStatus {
    reply.get(1).and_then(|s| JobStatus::parse(s)).unwrap_or(JobStatus::Failed)
}

fn transition(reply: Vec<String>) -> Transition {
    match reply.first().map(String::as_str) {
        Some("ok") => Transition::Applied,
        Some("terminal") => Transition::AlreadyTerminal(status_of(&reply)),
        Some("na") => Transition::NotApplicable(status_of(&reply)),
        _ => Transition::Missing,
    }
}

fn error_json(e: &JobError) -> String {
    serde_json::to_string(e).expect("job errors serialise")
}

fn now() -> UnixMillis {
    kiln_proto::now_millis()
}

impl RedisStore {
    async fn create_record(&self, r: &JobRecord) -> Result<(), StoreError> {
        let mut inv = self.transition(&self.scripts.create, r.id, r.created_at);
        let (kind, data) = creation_event(r);
        inv.arg(kind).arg(data);
        record_fields(&mut inv, r);
        match self.apply(&inv).await? {
            Transition::Applied => Ok(()),
            _ => Err(StoreError::Conflict(r.id)),
        }
    }

    async fn coalesce_record(&self, r: &JobRecord, inflight: &str, envelope: &str) -> Result<Coalesced, StoreError> {
        let mut inv = self.transition(&self.scripts.coalesce, r.id, r.created_at);
        inv.key(format!("{}inflight:{inflight}", self.config.key_prefix)).arg(envelope);
        record_fields(&mut inv, r);
        let reply: Vec<String> = self.invoke(&inv).await?;
        match reply.first().map(String::as_str) {
            Some("leader") => Ok(Coalesced::Leader),
            Some("follower") => reply
                .get(1)
                .and_then(|l| l.parse().ok())
                .map(Coalesced::Follower)
                .ok_or_else(|| StoreError::Unavailable("bad coalesce reply".into())),
            _ => Err(StoreError::Conflict(r.id)),
        }
    }
}

/// The event that announces a new record: `queued`, or `completed` for one born finished (a cache hit).
fn creation_event(r: &JobRecord) -> (&'static str, String) {
    if r.status.is_terminal() {
        ("completed", format!("{{\"status\":\"{}\"}}", r.status.as_str()))
    } else {
        ("status", r#"{"status":"queued"}"#.to_owned())
    }
}

/// A new record's hash fields, appended to a script invocation.
fn record_fields(inv: &mut redis::ScriptInvocation<'_>, r: &JobRecord) {
    {
        inv.arg("model")
            .arg(r.model.as_str())
            .arg("status")
            .arg(r.status.as_str())
            .arg("created_at")
            .arg(r.created_at)
            .arg("attempts")
            .arg(r.attempts);
        if let Some(m) = &r.metadata {
            inv.arg("metadata").arg(m.to_string());
        }
        if let Some(d) = r.deadline_at {
            inv.arg("deadline").arg(d);
        }
        if let Some(w) = &r.webhook {
            inv.arg("webhook_url").arg(&w.url).arg("webhook_events").arg(w.events.join(","));
        }
        if let Some(out) = &r.output {
            inv.arg("output").arg(out.to_string());
        }
        for (field, at) in [("started_at", r.started_at), ("completed_at", r.completed_at)] {
            if let Some(at) = at {
                inv.arg(field).arg(at);
            }
        }
        if r.cached {
            inv.arg("cached").arg(1);
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create(&self, r: &JobRecord) -> Result<(), StoreError> {
        self.create_record(r).await
    }

    async fn create_coalesced(&self, r: &JobRecord, inflight: &str, envelope: &str) -> Result<Coalesced, StoreError> {
        self.coalesce_record(r, inflight, envelope).await
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.key(id)).query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode(id, &fields).map(Some).map_err(|reason| StoreError::Corrupt { id, reason })
    }

    async fn start(&self, id: JobId, at: UnixMillis) -> Result<Start, StoreError> {
        let mut inv = self.transition(&self.scripts.start, id, at);
        inv.key(self.withdrawn_key(id)).arg(error_json(&deadline_error()));
        let reply: Vec<String> = self.invoke(&inv).await?;
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => Start::Started { attempt: reply.get(1).and_then(|n| n.parse().ok()).unwrap_or(1) },
            Some("expired") => Start::Expired,
            Some("terminal") => Start::AlreadyTerminal(status_of(&reply)),
            Some("withdrawn") => Start::Withdrawn,
            _ => Start::Missing,
        })
    }

    async fn finish(&self, id: JobId, outcome: &Outcome, at: UnixMillis) -> Result<Transition, StoreError> {
        let (field, value) = match outcome {
            Outcome::Succeeded(out) => ("output", out.clone()),
            Outcome::Failed(err) => ("error", error_json(err)),
        };
        let mut inv = self.transition(&self.scripts.finish, id, at);
        inv.arg(outcome.status().as_str()).arg(field).arg(value);
        self.apply(&inv).await
    }

    async fn retry(&self, id: JobId) -> Result<Transition, StoreError> {
        self.apply(&self.transition(&self.scripts.retry, id, now())).await
    }

    async fn expire_if_due(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.expire, id, at);
        inv.arg(error_json(&deadline_error()));
        self.apply(&inv).await
    }

    async fn progress(&self, id: JobId, progress: &serde_json::Value) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.progress, id, now());
        inv.arg(progress.to_string());
        self.apply(&inv).await
    }

    async fn cancel(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.cancel, id, at);
        inv.arg(error_json(&canceled_error()));
        self.apply(&inv).await
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        let mut inv = self.transition(&self.scripts.discard, id, now());
        inv.key(self.withdrawn_key(id));
        self.apply(&inv).await.map(drop)
    }

    async fn lease(&self, id: JobId, owner: &str, until: UnixMillis, envelope: &str) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.lease, id, now());
        inv.arg(owner).arg(until).arg(envelope);
        self.apply(&inv).await
    }

    async fn renew(&self, id: JobId, owner: &str, until: UnixMillis) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.renew, id, now());
        inv.arg(owner).arg(until);
        self.apply(&inv).await
    }

    async fn reap(
        &self,
        now: UnixMillis,
        owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Lapsed>, StoreError> {
        let mut inv = self.scripts.reap.key(self.leases_key());
        inv.arg(now).arg(limit).arg(format!("{}job:", self.config.key_prefix)).arg(owner).arg(claim_until);
        let flat: Vec<String> = self.invoke(&inv).await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| Some(Lapsed { id: pair[0].parse().ok()?, envelope: pair[1].clone() }))
            .collect())
    }

    async fn release(&self, id: JobId, owner: &str) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.release, id, now());
        inv.arg(owner);
        self.apply(&inv).await
    }

    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError> {
        self.apply(&self.transition(&self.scripts.redrive, id, now())).await
    }

    async fn events(&self, id: JobId, after: Option<&str>) -> Result<Vec<JobEvent>, StoreError> {
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(self.events_key(id))
            .arg(start)
            .arg("+")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(entries
            .into_iter()
            .filter_map(|(eid, f)| event(eid, f.get("kind")?, f.get("data").map(String::as_str).unwrap_or("null")))
            .collect())
    }

    async fn subscribe(&self, id: JobId) -> broadcast::Receiver<JobEvent> {
        let rx =
            self.hub.subscribe(id, || spawn_listener(self.client.clone(), self.channel(), Arc::downgrade(&self.hub)));
        // The first subscriber waits (briefly) for the channel subscription, so no event published
        // after this returns is missed; callers re-read the log now and then to cover reconnects.
        let mut ready = self.hub.ready.subscribe();
        let _ = tokio::time::timeout(self.config.connect_timeout, ready.wait_for(|r| *r)).await;
        rx
    }

    async fn claim_idempotency(
        &self,
        key: &str,
        fingerprint: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let mut inv = self.scripts.claim.key(format!("{}idem:{key}", self.config.key_prefix));
        inv.arg(job.to_string()).arg(fingerprint).arg(ttl.as_millis() as u64);
        let held: Vec<Option<String>> = self.invoke(&inv).await?;
        match held.as_slice() {
            [] => Ok(Claim::Claimed),
            [Some(job), fp, committed] => Ok(Claim::Held {
                job: job.parse().map_err(|_| StoreError::Unavailable(format!("bad idempotency record for {key}")))?,
                fingerprint: fp.clone().unwrap_or_default(),
                committed: committed.as_deref() == Some("1"),
            }),
            _ => Err(StoreError::Unavailable(format!("bad idempotency record for {key}"))),
        }
    }

    async fn commit_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError> {
        self.idempotency_holder(&self.scripts.idem_commit, key, job).await
    }

    async fn release_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError> {
        self.idempotency_holder(&self.scripts.idem_release, key, job).await
    }

    async fn due_webhooks(
        &self,
        now: UnixMillis,
        _owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        let mut inv = self.scripts.due_webhooks.key(self.webhooks_key());
        inv.arg(now).arg(limit).arg(claim_until).arg(self.webhook_prefix());
        let flat: Vec<String> = self.invoke(&inv).await?;
        Ok(flat
            .chunks_exact(6)
            .filter_map(|c| {
                Some(WebhookDelivery {
                    id: c[0].clone(),
                    job: c[1].parse().ok()?,
                    event: c[2].clone(),
                    at: c[3].parse().ok()?,
                    attempts: c[4].parse().unwrap_or(0),
                    body: Some(c[5].clone()).filter(|b| !b.is_empty()),
                })
            })
            .collect())
    }

    async fn webhook_attempted(&self, d: &WebhookDelivery, a: &WebhookAttempt) -> Result<(), StoreError> {
        let mut inv = self.scripts.webhook_attempted.key(self.webhooks_key());
        inv.key(format!("{}{}", self.webhook_prefix(), d.id))
            .key(self.key(d.job))
            .arg(&d.id)
            .arg(a.status.map(|s| s.to_string()).unwrap_or_default())
            .arg(if a.ok { "1" } else { "0" })
            .arg(a.at)
            .arg(a.retry_at.map(|r| r.to_string()).unwrap_or_default())
            .arg(&a.body);
        self.invoke::<i64>(&inv).await.map(drop)
    }

    async fn worker_seen(&self, model: &ModelName, worker: &str, at: UnixMillis) -> Result<(), StoreError> {
        let key = format!("{}workers:{model}", self.config.key_prefix);
        redis::pipe()
            .zadd(&key, worker, at)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.retention_ms())
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn workers(&self, model: &ModelName, since: UnixMillis) -> Result<Vec<String>, StoreError> {
        let key = format!("{}workers:{model}", self.config.key_prefix);
        let (seen,): (Vec<String>,) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({since}"))
            .ignore()
            .cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(seen)
    }

    async fn check(&self) -> Result<(), StoreError> {
        redis::cmd("PING").query_async::<()>(&mut self.conn.clone()).await.map_err(unavailable)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

fn event(id: String, kind: &str, data: &str) -> Option<JobEvent> {
    Some(JobEvent {
        id,
        kind: EventKind::parse(kind)?,
        data: serde_json::from_str(data).unwrap_or(serde_json::Value::Null),
    })
}

/// Fans the one pub/sub subscription of this process out to the subscribers of each job.
struct Hub {
    jobs: Mutex<HashMap<JobId, broadcast::Sender<JobEvent>>>,
    listening: Mutex<bool>,
    /// Whether the channel subscription is active.
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Self { jobs: Mutex::default(), listening: Mutex::new(false), ready: tokio::sync::watch::channel(false).0 }
    }
}

impl Hub {
    fn subscribe(&self, id: JobId, start: impl FnOnce()) -> broadcast::Receiver<JobEvent> {
        {
            let mut listening = self.listening.lock().expect("hub lock");
            if !*listening {
                *listening = true;
                start();
            }
        }
        let mut jobs = self.jobs.lock().expect("hub lock");
        jobs.retain(|_, tx| tx.receiver_count() > 0);
        jobs.entry(id).or_insert_with(|| broadcast::channel(64).0).subscribe()
    }

    fn dispatch(&self, message: &str) {
        let mut parts = message.splitn(4, ' ');
        let (Some(id), Some(eid), Some(kind), Some(data)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let Ok(id) = id.parse::<JobId>() else { return };
        let jobs = self.jobs.lock().expect("hub lock");
        if let Some(tx) = jobs.get(&id)
            && let Some(e) = event(eid.to_owned(), kind, data)
        {
            let _ = tx.send(e);
        }
    }
}

/// Listens on the events channel for as long as the store lives, reconnecting with backoff.
fn spawn_listener(client: redis::Client, channel: String, hub: std::sync::Weak<Hub>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if hub.strong_count() == 0 {
                return;
            }
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub.subscribe(&channel).await.is_ok() {
                        backoff = Duration::from_millis(100);
                        if let Some(hub) = hub.upgrade() {
                            hub.ready.send_replace(true);
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let Some(hub) = hub.upgrade() else { return };
                            if let Ok(payload) = msg.get_payload::<String>() {
                                hub.dispatch(&payload);
                            }
                        }
                    }
                    if let Some(hub) = hub.upgrade() {
                        hub.ready.send_replace(false);
                    }
                    tracing::warn!(target: "kiln::store", "event subscription lost, reconnecting");
                }
                Err(e) => tracing::warn!(target: "kiln::store", error = %e, "cannot subscribe to job events yet"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

fn decode(id: JobId, f: &HashMap<String, String>) -> Result<JobRecord, String> {
    let get = |k: &str| f.get(k).ok_or_else(|| format!("field {k} missing"));
    let millis = |k: &str| f.get(k).map(|v| v.parse::<i64>().map_err(|e| format!("{k}: {e}"))).transpose();
    let json = |k: &str| {
        f.get(k).map(|v| serde_json::from_str::<serde_json::Value>(v).map_err(|e| format!("{k}: {e}"))).transpose()
    };
    let webhook = match f.get("webhook_url") {
        None => None,
        Some(url) => Some(WebhookState {
            url: url.clone(),
            events: f
                .get("webhook_events")
                .map(|e| e.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default(),
            attempts: f.get("wh_attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            last_status: f.get("wh_last_status").and_then(|s| s.parse().ok()),
            delivered_at: millis("wh_delivered_at")?,
            gave_up_at: millis("wh_gave_up_at")?,
        }),
    };
    let mut record = JobRecord {
        id,
        model: ModelName::new(get("model")?.clone()).map_err(|e| e.to_string())?,
        status: JobStatus::parse(get("status")?).ok_or("bad status")?,
        created_at: millis("created_at")?.ok_or("field created_at missing")?,
        started_at: millis("started_at")?,
        completed_at: millis("completed_at")?,
        attempts: f.get("attempts").map(|a| a.parse().map_err(|e| format!("attempts: {e}"))).transpose()?.unwrap_or(0),
        progress: json("progress")?,
        output: json("output")?,
        error: f
            .get("error")
            .map(|e| serde_json::from_str::<JobError>(e).map_err(|e| format!("error: {e}")))
            .transpose()?,
        cached: f.get("cached").is_some_and(|c| c == "1"),
        metrics: Default::default(),
        metadata: json("metadata")?,
        deadline_at: millis("deadline")?,
        webhook,
    };
    record.derive_metrics();
    Ok(record)
}
