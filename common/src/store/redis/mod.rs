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
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{JobError, JobEvent, JobId, JobRecord, JobStatus, ModelName, UnixMillis, WebhookState};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;

use super::{
    Claim, Coalesced, Lapsed, Outcome, Start, Store, StoreError, Transition, WebhookAttempt, WebhookDelivery,
    canceled_error, deadline_error,
};
use crate::config::Secret;

mod events;
mod scripts;

use events::{Hub, event, spawn_listener};
use scripts::Scripts;

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

impl RedisStore {
    /// Creates the store without connecting: the first command connects, so a process can start
    /// while Redis is still down, and reconnects after Redis restarts.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|e| StoreError::Unavailable(format!("bad Redis URL: {e}")))?;
        let mgr_config =
            connection_config(config.connect_timeout, config.response_timeout).set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), mgr_config).map_err(unavailable)?;
        let scripts = Scripts::new();
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

/// Requests in flight on one multiplexed connection at most; more wait for a permit.
const CONNECTION_CONCURRENCY: usize = 512;

/// The settings of every Redis connection of a process (job store, cache, outputs).
///
/// redis-rs queues requests for its connection task in a bounded channel (50 by default); with
/// more callers than that at once (a worker admitting a full prefetch window of jobs), the
/// connection stalled until every request in it timed out. Its own concurrency limit, below a
/// larger channel, keeps the channel from ever filling: callers past the limit wait for a permit.
pub(crate) fn connection_config(connect: Duration, response: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect))
        .set_response_timeout(Some(response))
        .set_number_of_retries(1)
        .set_concurrency_limit(CONNECTION_CONCURRENCY)
        .set_pipeline_buffer_size(2 * CONNECTION_CONCURRENCY)
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
        if let Some(tp) = &r.traceparent {
            inv.arg("traceparent").arg(tp);
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

pub(super) fn decode(id: JobId, f: &HashMap<String, String>) -> Result<JobRecord, String> {
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
        traceparent: f.get("traceparent").cloned(),
    };
    record.derive_metrics();
    Ok(record)
}
