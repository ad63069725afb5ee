//! The job store on Redis: one hash per job under `{prefix}job:{id}`, expiring after the retention
//! TTL; a sorted set `{prefix}leases` of long jobs' lease deadlines; `{prefix}withdrawn:{id}`
//! markers. Every state transition is a Lua script, so the check of the current status and the
//! write are atomic — that is what fences terminal writes against redelivered duplicates.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{JobError, JobId, JobRecord, JobStatus, ModelName, UnixMillis};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Lapsed, Outcome, Start, Store, StoreError, Transition, deadline_error};
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
    config: RedisConfig,
    scripts: Scripts,
}

struct Scripts {
    create: redis::Script,
    start: redis::Script,
    finish: redis::Script,
    retry: redis::Script,
    expire: redis::Script,
    progress: redis::Script,
    lease: redis::Script,
    renew: redis::Script,
    reap: redis::Script,
    release: redis::Script,
    redrive: redis::Script,
}

/// Every transition but `start` begins here: a missing hash or a terminal status stops it.
const GUARD: &str = r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing'} end
if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
";

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{GUARD}{body}"))
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
        let conn = ConnectionManager::new_lazy_with_config(client, mgr_config).map_err(unavailable)?;
        let scripts = Scripts {
            create: redis::Script::new(
                r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1",
            ),
            // KEYS: job, withdrawn marker, leases. ARGV: now, deadline error, retention, id.
            start: redis::Script::new(
                r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'withdrawn'} end
  return {'missing'}
end
if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
local d = redis.call('HGET', KEYS[1], 'deadline')
if s == 'queued' and d and tonumber(d) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'completed_at', ARGV[1], 'error', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'expired'}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_owner', 'envelope')
redis.call('ZREM', KEYS[3], ARGV[4])
return {'ok', tostring(redis.call('HINCRBY', KEYS[1], 'attempts', 1))}",
            ),
            // KEYS: job, leases. ARGV: status, at, field, value, retention, id.
            finish: script(
                r"
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'completed_at', ARGV[2], ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[1], 'lease_owner', 'envelope')
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'ok'}",
            ),
            // KEYS: job, leases. ARGV: id.
            retry: script(
                r"
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'lease_owner', 'envelope')
redis.call('ZREM', KEYS[2], ARGV[1])
return {'ok'}",
            ),
            // KEYS: job. ARGV: now, deadline error, retention.
            expire: script(
                r"
local d = redis.call('HGET', KEYS[1], 'deadline')
if s ~= 'queued' or not d or tonumber(d) >= tonumber(ARGV[1]) then return {'na', s} end
redis.call('HSET', KEYS[1], 'status', 'expired', 'completed_at', ARGV[1], 'error', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok'}",
            ),
            // KEYS: job. ARGV: progress.
            progress: script(
                r"
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
return {'ok'}",
            ),
            // KEYS: job, leases. ARGV: id, owner, until, envelope.
            lease: script(
                r"
if s ~= 'running' then return {'na', s} end
redis.call('HSET', KEYS[1], 'lease_owner', ARGV[2], 'envelope', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {'ok'}",
            ),
            // KEYS: job, leases. ARGV: id, owner, until.
            renew: script(
                r"
if s ~= 'running' or redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[2] then return {'na', s} end
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
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
            // KEYS: job, leases. ARGV: id, owner.
            release: script(
                r"
if s ~= 'running' or redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[2] then return {'na', s} end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'lease_owner', 'envelope')
redis.call('ZREM', KEYS[2], ARGV[1])
return {'ok'}",
            ),
            // KEYS: job. ARGV: retention.
            redrive: redis::Script::new(
                r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing'} end
if s ~= 'failed' then return {'na', s} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0)
redis.call('HDEL', KEYS[1], 'error', 'completed_at', 'started_at', 'progress')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {'ok'}",
            ),
        };
        Ok(Self { conn, config, scripts })
    }

    fn key(&self, id: JobId) -> String {
        format!("{}job:{id}", self.config.key_prefix)
    }

    fn withdrawn_key(&self, id: JobId) -> String {
        format!("{}withdrawn:{id}", self.config.key_prefix)
    }

    fn leases_key(&self) -> String {
        format!("{}leases", self.config.key_prefix)
    }

    fn retention_ms(&self) -> u64 {
        self.config.retention.as_millis() as u64
    }

    async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        inv.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)
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

#[async_trait]
impl Store for RedisStore {
    async fn create(&self, r: &JobRecord) -> Result<(), StoreError> {
        let mut inv = self.scripts.create.key(self.key(r.id));
        inv.arg(self.retention_ms())
            .arg("model")
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
        let created: i64 = self.invoke(&inv).await?;
        if created == 1 { Ok(()) } else { Err(StoreError::Conflict(r.id)) }
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
        let mut inv = self.scripts.start.key(self.key(id));
        inv.key(self.withdrawn_key(id))
            .key(self.leases_key())
            .arg(at)
            .arg(error_json(&deadline_error()))
            .arg(self.retention_ms())
            .arg(id.to_string());
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
        let mut inv = self.scripts.finish.key(self.key(id));
        inv.key(self.leases_key())
            .arg(outcome.status().as_str())
            .arg(at)
            .arg(field)
            .arg(value)
            .arg(self.retention_ms())
            .arg(id.to_string());
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn retry(&self, id: JobId) -> Result<Transition, StoreError> {
        let mut inv = self.scripts.retry.key(self.key(id));
        inv.key(self.leases_key()).arg(id.to_string());
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn expire_if_due(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        let mut inv = self.scripts.expire.key(self.key(id));
        inv.arg(at).arg(error_json(&deadline_error())).arg(self.retention_ms());
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn progress(&self, id: JobId, progress: &serde_json::Value) -> Result<Transition, StoreError> {
        let mut inv = self.scripts.progress.key(self.key(id));
        inv.arg(progress.to_string());
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .del(self.key(id))
            .cmd("SET")
            .arg(self.withdrawn_key(id))
            .arg(1)
            .arg("PX")
            .arg(self.retention_ms())
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn lease(&self, id: JobId, owner: &str, until: UnixMillis, envelope: &str) -> Result<Transition, StoreError> {
        let mut inv = self.scripts.lease.key(self.key(id));
        inv.key(self.leases_key()).arg(id.to_string()).arg(owner).arg(until).arg(envelope);
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn renew(&self, id: JobId, owner: &str, until: UnixMillis) -> Result<Transition, StoreError> {
        let mut inv = self.scripts.renew.key(self.key(id));
        inv.key(self.leases_key()).arg(id.to_string()).arg(owner).arg(until);
        Ok(transition(self.invoke(&inv).await?))
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
        let mut inv = self.scripts.release.key(self.key(id));
        inv.key(self.leases_key()).arg(id.to_string()).arg(owner);
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError> {
        let mut inv = self.scripts.redrive.key(self.key(id));
        inv.arg(self.retention_ms());
        Ok(transition(self.invoke(&inv).await?))
    }

    async fn check(&self) -> Result<(), StoreError> {
        redis::cmd("PING").query_async::<()>(&mut self.conn.clone()).await.map_err(unavailable)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

fn decode(id: JobId, f: &HashMap<String, String>) -> Result<JobRecord, String> {
    let get = |k: &str| f.get(k).ok_or_else(|| format!("field {k} missing"));
    let millis = |k: &str| f.get(k).map(|v| v.parse::<i64>().map_err(|e| format!("{k}: {e}"))).transpose();
    let json = |k: &str| {
        f.get(k).map(|v| serde_json::from_str::<serde_json::Value>(v).map_err(|e| format!("{k}: {e}"))).transpose()
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
        cached: false,
        metrics: Default::default(),
        metadata: json("metadata")?,
        deadline_at: millis("deadline")?,
    };
    record.derive_metrics();
    Ok(record)
}
