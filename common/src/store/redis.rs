//! The job store on Redis: one hash per job under `{prefix}job:{id}`, expiring after the retention
//! TTL. Every state transition is a Lua script, so the check of the current status and the write
//! are atomic — that is what fences terminal writes against redelivered duplicates.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{JobError, JobId, JobRecord, JobStatus, ModelName, UnixMillis};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Outcome, Store, StoreError, Transition};
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
}

/// Both transitions read the status first; a missing hash or a terminal status stops them.
const GUARD: &str = r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing'} end
if s ~= 'queued' and s ~= 'running' then return {'terminal', s} end
";

impl RedisStore {
    /// Creates the store without connecting: the first command connects, so a process can start
    /// while Redis is still down.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|e| StoreError::Unavailable(format!("bad Redis URL: {e}")))?;
        let mgr_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn =
            ConnectionManager::new_lazy_with_config(client, mgr_config).map_err(unavailable)?;
        let scripts = Scripts {
            create: redis::Script::new(
                r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1",
            ),
            start: redis::Script::new(&format!(
                "{GUARD}
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {{'ok'}}"
            )),
            finish: redis::Script::new(&format!(
                "{GUARD}
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'completed_at', ARGV[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {{'ok'}}"
            )),
        };
        Ok(Self {
            conn,
            config,
            scripts,
        })
    }

    fn key(&self, id: JobId) -> String {
        format!("{}job:{id}", self.config.key_prefix)
    }

    fn retention_ms(&self) -> u64 {
        self.config.retention.as_millis() as u64
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn transition(reply: Vec<String>) -> Transition {
    match reply.first().map(String::as_str) {
        Some("ok") => Transition::Applied,
        Some("terminal") => Transition::AlreadyTerminal(
            reply
                .get(1)
                .and_then(|s| JobStatus::parse(s))
                .unwrap_or(JobStatus::Failed),
        ),
        _ => Transition::Missing,
    }
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
        let created: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(r.id))
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key(id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode(id, &fields)
            .map(Some)
            .map_err(|reason| StoreError::Corrupt { id, reason })
    }

    async fn start(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        let reply: Vec<String> = self
            .scripts
            .start
            .key(self.key(id))
            .arg(at)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(transition(reply))
    }

    async fn finish(
        &self,
        id: JobId,
        outcome: &Outcome,
        at: UnixMillis,
    ) -> Result<Transition, StoreError> {
        let (field, value) = match outcome {
            Outcome::Succeeded(out) => ("output", out.clone()),
            Outcome::Failed(err) => (
                "error",
                serde_json::to_string(err).expect("error serialises"),
            ),
        };
        let reply: Vec<String> = self
            .scripts
            .finish
            .key(self.key(id))
            .arg(outcome.status().as_str())
            .arg(at)
            .arg(field)
            .arg(value)
            .arg(self.retention_ms())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(transition(reply))
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        redis::cmd("DEL")
            .arg(self.key(id))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn check(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

fn decode(id: JobId, f: &HashMap<String, String>) -> Result<JobRecord, String> {
    let get = |k: &str| f.get(k).ok_or_else(|| format!("field {k} missing"));
    let millis = |k: &str| {
        f.get(k)
            .map(|v| v.parse::<i64>().map_err(|e| format!("{k}: {e}")))
            .transpose()
    };
    let json = |k: &str| {
        f.get(k)
            .map(|v| serde_json::from_str::<serde_json::Value>(v).map_err(|e| format!("{k}: {e}")))
            .transpose()
    };
    let mut record = JobRecord {
        id,
        model: ModelName::new(get("model")?.clone()).map_err(|e| e.to_string())?,
        status: JobStatus::parse(get("status")?).ok_or("bad status")?,
        created_at: millis("created_at")?.ok_or("field created_at missing")?,
        started_at: millis("started_at")?,
        completed_at: millis("completed_at")?,
        attempts: f
            .get("attempts")
            .map(|a| a.parse().map_err(|e| format!("attempts: {e}")))
            .transpose()?
            .unwrap_or(0),
        progress: json("progress")?,
        output: json("output")?,
        error: f
            .get("error")
            .map(|e| serde_json::from_str::<JobError>(e).map_err(|e| format!("error: {e}")))
            .transpose()?,
        cached: false,
        metrics: Default::default(),
        metadata: json("metadata")?,
    };
    record.derive_metrics();
    Ok(record)
}
