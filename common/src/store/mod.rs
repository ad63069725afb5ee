//! The job store: job records with a retention TTL, and the state transitions workers make on
//! them. Terminal writes are fenced: the first terminal state wins and later writes (a redelivered
//! duplicate, a late update) change nothing. Implementations: [`redis`] and the in-process
//! [`embedded`] store with the same semantics.

pub mod embedded;
pub mod redis;

use async_trait::async_trait;
use std::time::Duration;

use kiln_proto::{JobError, JobEvent, JobId, JobRecord, JobStatus, ModelName, UnixMillis};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or timed out; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be read back (written by an incompatible version, or corrupted).
    #[error("stored record for job {id} is unreadable: {reason}")]
    Corrupt { id: JobId, reason: String },
    /// A record with this id already exists.
    #[error("job {0} already exists")]
    Conflict(JobId),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The output, as JSON text (kept as text so floats keep their shortest form).
    Succeeded(String),
    Failed(JobError),
}

impl Outcome {
    pub fn status(&self) -> JobStatus {
        match self {
            Self::Succeeded(_) => JobStatus::Succeeded,
            Self::Failed(_) => JobStatus::Failed,
        }
    }
}

/// What a state transition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The write took effect.
    Applied,
    /// The job is already in a terminal state; nothing was written.
    AlreadyTerminal(JobStatus),
    /// The job is in another state than the transition needs; nothing was written.
    NotApplicable(JobStatus),
    /// No such job (never created, or expired).
    Missing,
}

/// What [`Store::start`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The job is now running; this is its `attempt`-th start (1 for the first).
    Started { attempt: u32 },
    /// Its deadline passed while it was queued: it is now `expired` and must not run.
    Expired,
    /// Already terminal: a redelivered duplicate. Acknowledge, never run it again.
    AlreadyTerminal(JobStatus),
    /// The gateway withdrew it (its publish was not confirmed); no client holds its id.
    Withdrawn,
    /// No record: it expired, or the store lost it.
    Missing,
}

/// A running job whose lease lapsed: its worker stopped heartbeating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lapsed {
    pub id: JobId,
    /// The envelope to queue again.
    pub envelope: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes a new record (queued, or finished for a cache hit); fails with `Conflict` if the id
    /// exists.
    async fn create(&self, record: &JobRecord) -> Result<(), StoreError>;

    /// Writes a new queued record for a job whose identical twin may already be queued or running
    /// under `inflight` (its cache key). If so, the new job follows it: it completes with the
    /// twin's outcome, and must not be published. Otherwise it becomes the twin others follow.
    /// `envelope` is kept on a follower, to queue it on its own if its leader ends without an
    /// outcome (canceled, expired, withdrawn).
    async fn create_coalesced(
        &self,
        record: &JobRecord,
        inflight: &str,
        envelope: &str,
    ) -> Result<Coalesced, StoreError>;

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// `queued | running → running`: sets `started_at`, increments `attempts`, drops any lease,
    /// and returns the attempt number. A queued job past its deadline becomes `expired` instead.
    async fn start(&self, id: JobId, at: UnixMillis) -> Result<Start, StoreError>;

    /// The fenced terminal write: applied only if the job is not terminal yet. Releases any lease.
    async fn finish(&self, id: JobId, outcome: &Outcome, at: UnixMillis) -> Result<Transition, StoreError>;

    /// `running → queued`, for a retry after a transient failure. Releases any lease.
    async fn retry(&self, id: JobId) -> Result<Transition, StoreError>;

    /// `queued → expired` when the deadline has passed at `at`.
    async fn expire_if_due(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError>;

    /// Records progress of a running job; never touches a terminal one.
    async fn progress(&self, id: JobId, progress: &serde_json::Value) -> Result<Transition, StoreError>;

    /// Withdraws a record that was created but could not be enqueued, so no id is left pointing
    /// at a job that will never run, and a late delivery of it is recognised and dropped.
    async fn discard(&self, id: JobId) -> Result<(), StoreError>;

    /// Takes over from the broker for a long job: the envelope is kept with a lease held by
    /// `owner` until `until`, after which [`Store::reap`] hands it out again.
    async fn lease(&self, id: JobId, owner: &str, until: UnixMillis, envelope: &str) -> Result<Transition, StoreError>;

    /// Extends `owner`'s lease; `NotApplicable` when the lease is no longer its own.
    async fn renew(&self, id: JobId, owner: &str, until: UnixMillis) -> Result<Transition, StoreError>;

    /// Claims up to `limit` leases that lapsed before `now`: each is handed to exactly one caller,
    /// which holds it as `owner` until `claim_until` while it queues the job again and then calls
    /// [`Store::retry`]. A caller that dies meanwhile lets its claim lapse in turn.
    async fn reap(
        &self,
        now: UnixMillis,
        owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Lapsed>, StoreError>;

    /// Ends a reaper's claim once it has queued the job again: `running → queued`, only while the
    /// claim is still `owner`'s (a worker that already started the job again took it over).
    async fn release(&self, id: JobId, owner: &str) -> Result<Transition, StoreError>;

    /// `failed → queued` with the attempt count reset: an operator's redrive from the dead-letter
    /// queue, the one way out of a terminal state.
    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError>;

    /// `queued | running → canceled`: the fenced terminal write of a cancel. A worker still
    /// running the job finds it terminal and drops its result.
    async fn cancel(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError>;

    /// The job's event log after `after` (an event id), oldest first; from the start when `None`.
    /// Every applied transition appends to it.
    async fn events(&self, id: JobId, after: Option<&str>) -> Result<Vec<JobEvent>, StoreError>;

    /// Live events of one job, from now on, wherever the transition was made. Subscribe before
    /// reading [`Store::events`] and skip what the log already gave, and nothing is missed.
    async fn subscribe(&self, id: JobId) -> tokio::sync::broadcast::Receiver<JobEvent>;

    /// Claims `key` for a new job with this request `fingerprint`, or reports who holds it.
    async fn claim_idempotency(
        &self,
        key: &str,
        fingerprint: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<Claim, StoreError>;

    /// Marks the claim's job as durably accepted.
    async fn commit_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError>;

    /// Drops a claim whose job could not be accepted, so a retry can claim it again.
    async fn release_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError>;

    /// Claims up to `limit` webhook deliveries due at `now`, holding them for `owner` until
    /// `claim_until` (a dispatcher that dies lets them lapse to another).
    async fn due_webhooks(
        &self,
        now: UnixMillis,
        owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<WebhookDelivery>, StoreError>;

    /// Records one delivery attempt. `retry_at: None` ends the delivery: delivered when `ok`, else
    /// given up. The body is kept, so retries send the same bytes.
    async fn webhook_attempted(&self, delivery: &WebhookDelivery, result: &WebhookAttempt) -> Result<(), StoreError>;

    /// Notes that `worker` is consuming `model`'s queue (called every few seconds by workers).
    async fn worker_seen(&self, model: &ModelName, worker: &str, at: UnixMillis) -> Result<(), StoreError>;

    /// Workers that consumed `model`'s queue since `since`, for `GET /v1/models`.
    async fn workers(&self, model: &ModelName, since: UnixMillis) -> Result<Vec<String>, StoreError>;

    /// Cheap liveness check, for readiness probes.
    async fn check(&self) -> Result<(), StoreError>;

    fn kind(&self) -> &'static str;
}

/// What [`Store::create_coalesced`] made of a new job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coalesced {
    /// No twin in flight: publish this job.
    Leader,
    /// Attached to this in-flight twin: do not publish.
    Follower(JobId),
}

/// Who holds an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is now this request's.
    Claimed,
    /// Another request holds it: its job, its fingerprint, and whether that job was accepted.
    Held { job: JobId, fingerprint: String, committed: bool },
}

/// A webhook delivery: one event of one job, retried until delivered or given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// Stable across retries: the `webhook-id` header.
    pub id: String,
    pub job: JobId,
    /// `job.started`, `job.progress` or `job.completed`.
    pub event: String,
    /// When the event happened (the `webhook-timestamp` of every attempt).
    pub at: UnixMillis,
    pub attempts: u32,
    /// The body sent by the first attempt, reused by retries.
    pub body: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    pub body: String,
    pub status: Option<u16>,
    pub ok: bool,
    pub at: UnixMillis,
    /// When to try again; `None` ends the delivery.
    pub retry_at: Option<UnixMillis>,
}

/// The error recorded on a canceled job.
pub fn canceled_error() -> JobError {
    JobError { code: kiln_proto::ErrorCode::Canceled, message: "the job was canceled".into() }
}

/// The error recorded on a job whose deadline passed before it started.
pub fn deadline_error() -> JobError {
    JobError {
        code: kiln_proto::ErrorCode::DeadlineExceeded,
        message: "the job's deadline passed before it started".into(),
    }
}
