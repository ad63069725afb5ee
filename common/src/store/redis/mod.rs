//! The job store on Redis. Per job: a hash `{prefix}job:{id}` and an event log (a list)
//! `{prefix}job:{id}:log` (a stream `:events` in earlier versions, left to expire), both expiring
//! after the live retention (refreshed by every transition) and, once the job is terminal, after
//! the finished retention; while it has them, `:followers` (a set, at most [`scripts::MAX_FOLLOWERS`]) and `:hooks` (its pending webhook
//! deliveries in order). Shared: the sorted set `{prefix}leases` of jobs to hand out again at a
//! time (lapsing leases, orphans, strays), `{prefix}active` (every live job and the time by which it
//! must show activity, for the sweeper), `{prefix}webhooks` of due webhook deliveries (with a hash
//! `{prefix}webhook:{delivery}` each, kept at most the live retention), `{prefix}output:{sha1}`
//! outputs shared by several records (followers, cache hits), `{prefix}withdrawn:{id}` markers,
//! `{prefix}idem:{key}` idempotency claims, `{prefix}workers:{model}`, and the pub/sub channel
//! `{prefix}events`. The job listing: sorted sets `{prefix}jobs` (every job) and
//! `{prefix}tenant:{tenant}:jobs` (a tenant's) of `<created_at>:<id>`, the count `{prefix}jobs:seq`
//! that numbers records as they join, and `{prefix}jobs:trim`, where trimming of gone entries
//! stopped in each. Every key is built from the prefix, so a prefix with a hash tag (`{kiln}:`)
//! keeps them in one slot of a Redis cluster, as the scripts need.
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
    Claim, Coalesced, Creation, Lapsed, ListCursor, ListPage, ListQuery, MAX_EXAMINED, Outcome, Run, Slot, Start,
    Store, StoreError, Stray, Transition, WebhookAttempt, WebhookDelivery, canceled_error, deadline_error, lost_error,
};
use crate::config::Secret;
use crate::tls::ClientTls;

mod events;
mod scripts;
pub use scripts::MAX_FOLLOWERS;

use events::{Hub, event, spawn_listener};
use scripts::Scripts;

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    /// Prefix of every key, so deployments and tests can share a server.
    pub key_prefix: String,
    /// How long a live job's record is kept, counted again from each of its transitions.
    pub retention: Duration,
    /// How long a finished job's record is kept, counted from completion.
    pub finished_retention: Duration,
    /// How long a live job may go without a transition (or a lease renewal) before the sweeper
    /// looks at it.
    pub sweep_after: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on one command's response.
    pub response_timeout: Duration,
    /// How a `rediss://` server is verified.
    pub tls: ClientTls,
}

pub struct RedisStore {
    conn: ConnectionManager,
    client: redis::Client,
    config: RedisConfig,
    scripts: Scripts,
    hub: Arc<Hub>,
}

impl RedisStore {
    /// The store's connection, for what else lives in the job store's Redis (keys, limits).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Creates the store without connecting: the first command connects, so a process can start
    /// while Redis is still down, and reconnects after Redis restarts.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let mgr_config =
            connection_config(config.connect_timeout, config.response_timeout).set_max_delay(Duration::from_secs(2));
        let (client, conn) =
            lazy_connection(&config.tls, config.url.expose(), "Redis", mgr_config).map_err(StoreError::Unavailable)?;
        let scripts = Scripts::new();
        Ok(Self { conn, client, config, scripts, hub: Arc::new(Hub::default()) })
    }

    fn key(&self, id: JobId) -> String {
        format!("{}job:{id}", self.config.key_prefix)
    }

    fn events_key(&self, id: JobId) -> String {
        format!("{}job:{id}:log", self.config.key_prefix)
    }

    fn withdrawn_key(&self, id: JobId) -> String {
        format!("{}withdrawn:{id}", self.config.key_prefix)
    }

    fn leases_key(&self) -> String {
        format!("{}leases", self.config.key_prefix)
    }

    fn active_key(&self) -> String {
        format!("{}active", self.config.key_prefix)
    }

    fn webhooks_key(&self) -> String {
        format!("{}webhooks", self.config.key_prefix)
    }

    fn webhook_prefix(&self) -> String {
        format!("{}webhook:", self.config.key_prefix)
    }

    fn job_prefix(&self) -> String {
        format!("{}job:", self.config.key_prefix)
    }

    fn channel(&self) -> String {
        format!("{}events", self.config.key_prefix)
    }

    fn retention_ms(&self) -> u64 {
        self.config.retention.as_millis() as u64
    }

    /// A transition's invocation with the standard keys and prologue arguments (see
    /// [`scripts`]).
    /// A tenant's jobs in flight (the Lua prelude's `ended_for` names it the same way).
    fn live_key(&self, tenant: &str) -> String {
        format!("{}tenant:{tenant}:live", self.config.key_prefix)
    }

    fn transition<'a>(&self, script: &'a redis::Script, id: JobId) -> redis::ScriptInvocation<'a> {
        let mut inv = script.key(self.key(id));
        inv.key(self.leases_key())
            .key(self.events_key(id))
            .key(self.webhooks_key())
            .key(self.active_key())
            .arg(self.config.sweep_after.as_millis() as u64)
            .arg(id.to_string())
            .arg(self.channel())
            .arg(self.retention_ms())
            .arg(&self.config.key_prefix)
            .arg(self.config.finished_retention.as_millis() as u64);
        inv
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

/// A Redis connection that connects on its first command and reconnects after a restart, with
/// [`connection_config`]; through `tls` for a `rediss://` URL. `what` names it in a bad URL's error.
pub(crate) fn lazy_connection(
    tls: &crate::tls::ClientTls,
    url: &str,
    what: &str,
    config: ConnectionManagerConfig,
) -> Result<(redis::Client, ConnectionManager), String> {
    let client = tls.redis_client(url).map_err(|e| format!("bad {what} URL: {e}"))?;
    let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| e.to_string())?;
    Ok((client, conn))
}

/// The record fields [`decode`] reads (the listing reads only these, never the envelope).
const RECORD_FIELDS: [&str; 20] = [
    "model",
    "status",
    "created_at",
    "started_at",
    "completed_at",
    "attempts",
    "progress",
    "output",
    "error",
    "cached",
    "metadata",
    "deadline",
    "traceparent",
    "tenant",
    "webhook_url",
    "webhook_events",
    "wh_attempts",
    "wh_last_status",
    "wh_delivered_at",
    "wh_gave_up_at",
];

/// Digits of `created_at` in a listing entry (enough until the year 2286), as the scripts pad it.
const LISTED_DIGITS: usize = 13;

/// A listing entry, `<created_at>:<id>`, as the scripts write it.
fn listed_as(created_at: UnixMillis, id: JobId) -> String {
    format!("{created_at:0LISTED_DIGITS$}:{id}")
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
        Some("superseded") => Transition::Superseded,
        Some("terminal") => Transition::AlreadyTerminal(status_of(&reply)),
        Some("na") => Transition::NotApplicable(status_of(&reply)),
        _ => Transition::Missing,
    }
}

fn error_json(e: &JobError) -> String {
    serde_json::to_string(e).expect("job errors serialise")
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
        if let Some(c) = r.cancel_at {
            inv.arg("cancel_at").arg(c);
        }
        if let Some(tp) = &r.traceparent {
            inv.arg("traceparent").arg(tp);
        }
        if let Some(t) = &r.tenant {
            inv.arg("tenant").arg(t);
        }
        if let Some(w) = &r.webhook {
            inv.arg("webhook_url").arg(&w.url).arg("webhook_events").arg(w.events.join(","));
            if let Some(p) = &w.prediction {
                inv.arg("webhook_prediction").arg(serde_json::to_string(p).expect("prediction views serialise"));
            }
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
    async fn insert(&self, r: &JobRecord, how: &Creation<'_>) -> Result<(), StoreError> {
        let mut inv = self.transition(&self.scripts.create, r.id);
        let (kind, data) = creation_event(r);
        inv.arg(kind).arg(data).arg(how.envelope.unwrap_or("")).arg(how.idempotency_key.unwrap_or(""));
        record_fields(&mut inv, r);
        match self.apply(&inv).await? {
            Transition::Applied => Ok(()),
            _ => Err(StoreError::Conflict(r.id)),
        }
    }

    async fn create_coalesced(
        &self,
        r: &JobRecord,
        inflight: &str,
        how: &Creation<'_>,
        hold_off: bool,
    ) -> Result<Coalesced, StoreError> {
        let mut inv = self.transition(&self.scripts.coalesce, r.id);
        inv.key(format!("{}inflight:{inflight}", self.config.key_prefix))
            .arg(how.envelope.unwrap_or(""))
            .arg(if hold_off { "1" } else { "0" });
        record_fields(&mut inv, r);
        let reply: Vec<String> = self.invoke(&inv).await?;
        match reply.first().map(String::as_str) {
            Some("leader") => Ok(Coalesced::Leader),
            Some(role @ ("follower" | "pending")) => reply
                .get(1)
                .and_then(|l| l.parse().ok())
                .map(if role == "follower" { Coalesced::Follower } else { Coalesced::Pending })
                .ok_or_else(|| StoreError::Unavailable("bad coalesce reply".into())),
            _ => Err(StoreError::Conflict(r.id)),
        }
    }

    async fn confirm(&self, id: JobId, key: Option<&str>) -> Result<(), StoreError> {
        let mut inv = self.transition(&self.scripts.confirm, id);
        inv.arg(key.unwrap_or(""));
        self.invoke::<Vec<String>>(&inv).await.map(drop)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut inv = self.scripts.read.key(self.key(id));
        inv.arg(format!("{}output:", self.config.key_prefix));
        let flat: Vec<String> = self.invoke(&inv).await?;
        if flat.is_empty() {
            return Ok(None);
        }
        let fields: HashMap<String, String> = flat.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect();
        decode(id, &fields).map(Some).map_err(|reason| StoreError::Corrupt { id, reason })
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage, StoreError> {
        let latest = 10_i64.pow(LISTED_DIGITS as u32) - 1;
        if q.created_after.is_some_and(|t| t >= latest) {
            return Ok(ListPage { records: Vec::new(), next: None });
        }
        let prefix = &self.config.key_prefix;
        let listing = match &q.tenant {
            Some(t) => format!("{prefix}tenant:{t}:jobs"),
            None => format!("{prefix}jobs"),
        };
        let upper = q.cursor.map_or("+".to_owned(), |c| format!("({}", listed_as(c.created_at, c.id)));
        let lower = match q.created_after {
            Some(t) if t >= 0 => format!("[{:0LISTED_DIGITS$}", t + 1),
            _ => "-".to_owned(),
        };
        let mut inv = self.scripts.list.key(listing);
        inv.key(format!("{prefix}jobs:seq"))
            .arg(upper)
            .arg(lower)
            .arg(q.page_size())
            .arg(MAX_EXAMINED)
            .arg(q.cursor.map(|c| c.horizon.to_string()).unwrap_or_default())
            .arg(q.status.map_or("", |s| s.as_str()))
            .arg(q.model.as_ref().map_or("", |m| m.as_str()))
            .arg(self.job_prefix())
            .arg(format!("{prefix}output:"));
        for field in RECORD_FIELDS {
            inv.arg(field);
        }
        let reply: Vec<Vec<String>> = self.invoke(&inv).await?;
        let bad = |what: &str| StoreError::Unavailable(format!("bad listing reply: {what}"));
        let mut reply = reply.into_iter();
        let head = reply.next().ok_or_else(|| bad("empty"))?;
        let horizon: u64 = head.first().and_then(|h| h.parse().ok()).ok_or_else(|| bad("horizon"))?;
        let next = match head.get(1).map(String::as_str) {
            None | Some("") => None,
            Some(entry) => {
                let (at, id) = entry.split_once(':').ok_or_else(|| bad("entry"))?;
                let (created_at, id) = (at.parse().map_err(|_| bad("entry"))?, id.parse().map_err(|_| bad("entry"))?);
                Some(ListCursor { created_at, id, horizon })
            }
        };
        let mut records = Vec::new();
        for flat in reply {
            let (id, fields) = flat.split_first().ok_or_else(|| bad("record"))?;
            let id: JobId = id.parse().map_err(|_| bad("record id"))?;
            let fields: HashMap<String, String> =
                fields.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect();
            // One unreadable record (its own GET answers 500) does not take the listing down.
            match decode(id, &fields) {
                Ok(record) => records.push(record),
                Err(reason) => tracing::warn!(job_id = %id, %reason, "unreadable record left out of a listing"),
            }
        }
        Ok(ListPage { records, next })
    }

    async fn start(&self, id: JobId, worker: &str) -> Result<Start, StoreError> {
        let mut inv = self.transition(&self.scripts.start, id);
        inv.key(self.withdrawn_key(id)).arg(error_json(&deadline_error())).arg(worker);
        let reply: Vec<String> = self.invoke(&inv).await?;
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => Start::Started { attempt: reply.get(1).and_then(|n| n.parse().ok()).unwrap_or(1) },
            Some("expired") => Start::Expired,
            Some("terminal") => Start::AlreadyTerminal(status_of(&reply)),
            Some("withdrawn") => Start::Withdrawn,
            Some("held") => Start::Held,
            _ => Start::Missing,
        })
    }

    async fn finish(&self, id: JobId, run: Run, outcome: &Outcome) -> Result<Transition, StoreError> {
        let (field, value) = match outcome {
            Outcome::Succeeded(out) => ("output", out.clone()),
            Outcome::Failed(err) => ("error", error_json(err)),
        };
        let mut inv = self.transition(&self.scripts.finish, id);
        inv.arg(run).arg(outcome.status().as_str()).arg(field).arg(value);
        self.apply(&inv).await
    }

    async fn retry(&self, id: JobId, run: Run, delay: Duration) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.retry, id);
        inv.arg(run).arg(delay.as_millis() as u64);
        self.apply(&inv).await
    }

    async fn expire_if_due(&self, id: JobId) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.expire, id);
        inv.arg(error_json(&deadline_error()));
        self.apply(&inv).await
    }

    async fn progress(&self, id: JobId, run: Run, progress: &serde_json::Value) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.progress, id);
        inv.arg(run).arg(progress.to_string());
        self.apply(&inv).await
    }

    async fn cancel(&self, id: JobId) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.cancel, id);
        inv.arg(error_json(&canceled_error()));
        self.apply(&inv).await
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        let mut inv = self.transition(&self.scripts.discard, id);
        inv.key(self.withdrawn_key(id));
        self.apply(&inv).await.map(drop)
    }

    async fn lease(
        &self,
        id: JobId,
        run: Run,
        owner: &str,
        ttl: Duration,
        envelope: &str,
    ) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.lease, id);
        inv.arg(run).arg(owner).arg(ttl.as_millis() as u64).arg(envelope);
        self.apply(&inv).await
    }

    async fn renew(&self, id: JobId, owner: &str, ttl: Duration) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.renew, id);
        inv.arg(owner).arg(ttl.as_millis() as u64);
        self.apply(&inv).await
    }

    async fn reap(&self, limit: usize) -> Result<Vec<Lapsed>, StoreError> {
        let mut inv = self.scripts.reap.key(self.leases_key());
        inv.key(self.active_key())
            .arg(limit)
            .arg(self.job_prefix())
            .arg(self.config.sweep_after.as_millis() as u64)
            .arg(self.retention_ms());
        let flat: Vec<String> = self.invoke(&inv).await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| Some(Lapsed { id: pair[0].parse().ok()?, envelope: pair[1].clone() }))
            .collect())
    }

    async fn requeue_later(&self, id: JobId, delay: Duration) -> Result<Transition, StoreError> {
        let mut inv = self.transition(&self.scripts.requeue_later, id);
        inv.arg(delay.as_millis() as u64);
        self.apply(&inv).await
    }

    async fn sweep(&self, limit: usize) -> Result<Vec<JobId>, StoreError> {
        let mut inv = self.scripts.sweep.key(self.active_key());
        inv.arg(limit);
        let ids: Vec<String> = self.invoke(&inv).await?;
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    async fn stray(&self, id: JobId, max_sweeps: u32) -> Result<Stray, StoreError> {
        let mut inv = self.transition(&self.scripts.stray, id);
        inv.arg(max_sweeps).arg(error_json(&lost_error()));
        let reply: Vec<String> = self.invoke(&inv).await?;
        Ok(match reply.first().map(String::as_str) {
            Some("requeued") => Stray::Requeued,
            Some("lost") => Stray::Lost,
            Some("fine") => Stray::Fine,
            _ => Stray::Gone,
        })
    }

    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError> {
        self.apply(&self.transition(&self.scripts.redrive, id)).await
    }

    async fn events(&self, id: JobId, after: Option<&str>) -> Result<Vec<JobEvent>, StoreError> {
        // Ids count 1, 2, 3… per job; anything else (an id of another store) replays everything.
        let after: u64 = after.and_then(|a| a.parse().ok()).unwrap_or(0);
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(self.events_key(id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(entries
            .iter()
            .filter_map(|entry| {
                let mut parts = entry.splitn(3, ' ');
                let (eid, kind, data) = (parts.next()?, parts.next()?, parts.next().unwrap_or("null"));
                (eid.parse::<u64>().ok()? > after).then(|| event(eid.to_owned(), kind, data))?
            })
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
        pending: Duration,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let mut inv = self.scripts.claim.key(format!("{}idem:{key}", self.config.key_prefix));
        inv.arg(job.to_string())
            .arg(fingerprint)
            .arg(pending.as_millis() as u64)
            .arg(ttl.as_millis() as u64)
            .arg(&self.config.key_prefix);
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

    async fn release_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError> {
        let mut inv = self.scripts.idem_release.key(format!("{}idem:{key}", self.config.key_prefix));
        inv.arg(job.to_string());
        self.invoke::<i64>(&inv).await.map(drop)
    }

    async fn due_webhooks(
        &self,
        now: UnixMillis,
        _owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        let mut inv = self.scripts.due_webhooks.key(self.webhooks_key());
        inv.arg(now).arg(limit).arg(claim_until).arg(self.webhook_prefix()).arg(self.job_prefix());
        let flat: Vec<String> = self.invoke(&inv).await?;
        Ok(flat
            .chunks_exact(7)
            .filter_map(|c| {
                Some(WebhookDelivery {
                    id: c[0].clone(),
                    job: c[1].parse().ok()?,
                    event: c[2].clone(),
                    at: c[3].parse().ok()?,
                    attempts: c[4].parse().unwrap_or(0),
                    body: Some(c[5].clone()).filter(|b| !b.is_empty()),
                    seq: c[6].parse().unwrap_or(0),
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

    async fn reserve_slot(&self, tenant: &str, id: JobId, max: u32) -> Result<Slot, StoreError> {
        let mut inv = self.scripts.reserve_slot.key(self.live_key(tenant));
        inv.arg(id.to_string()).arg(max).arg(self.retention_ms());
        let (granted, in_use): (u8, u32) = self.invoke(&inv).await?;
        Ok(Slot { granted: granted == 1, in_use })
    }

    async fn release_slot(&self, tenant: &str, id: JobId) -> Result<(), StoreError> {
        redis::cmd("ZREM")
            .arg(self.live_key(tenant))
            .arg(id.to_string())
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn worker_seen(&self, model: &ModelName, worker: &str) -> Result<(), StoreError> {
        let mut inv = self.scripts.worker_seen.key(format!("{}workers:{model}", self.config.key_prefix));
        inv.arg(worker).arg(self.retention_ms());
        self.invoke::<i64>(&inv).await.map(drop)
    }

    async fn lanes(&self, model: &ModelName, known: usize) -> Result<Option<Vec<String>>, StoreError> {
        let key = format!("{}lanes:{model}", self.config.key_prefix);
        let mut conn = self.conn.clone();
        let count: usize = redis::cmd("SCARD").arg(&key).query_async(&mut conn).await.map_err(unavailable)?;
        if count == known {
            return Ok(None);
        }
        redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await.map(Some).map_err(unavailable)
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
            prediction: f
                .get("webhook_prediction")
                .map(|p| serde_json::from_str(p).map_err(|e| format!("webhook_prediction: {e}")))
                .transpose()?,
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
        cancel_at: millis("cancel_at")?,
        webhook,
        traceparent: f.get("traceparent").cloned(),
        tenant: f.get("tenant").cloned(),
    };
    record.derive_metrics();
    Ok(record)
}
