//! The job store: job records with a retention TTL, and the state transitions workers make on
//! them. Implementations: [`redis`] and the in-process [`embedded`] store with the same semantics.
//!
//! What the store guarantees:
//! - Terminal writes are fenced: the first terminal state wins and later writes (a redelivered
//!   duplicate, a late update) change nothing.
//! - Runs are fenced: [`Store::start`] hands each run a token (its attempt number), and every
//!   write a run makes ([`Store::finish`], [`Store::retry`], [`Store::progress`],
//!   [`Store::lease`]) presents it; a run that was superseded by a later start writes nothing.
//! - Time is the store's own (Redis `TIME` inside the scripts), never a caller's wall clock, for
//!   leases, deadlines and staleness.
//! - Retention is refreshed by every transition, so a record never expires under a live job, and
//!   a live job's envelope is kept with it (dropped once it is terminal), so the work can always
//!   be rebuilt.
//! - Every non-terminal job has a time by which something must have happened to it; past it,
//!   [`Store::sweep`] finds it, and [`Store::stray`] queues it again from its envelope (through the
//!   reaper) or, when it cannot be rebuilt, ends it `failed` with code `job_lost`.
//! - Every record created joins the job listing ([`Store::list`]) atomically with its creation,
//!   and leaves it when the record goes (expired, or withdrawn).

pub mod embedded;
mod listing;
pub mod redis;

pub use listing::{BadCursor, ListCursor, ListPage, ListQuery, MAX_EXAMINED, MAX_LIMIT};

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

/// A run's fencing token: the attempt number [`Store::start`] gave it.
pub type Run = u32;

/// What a state transition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The write took effect.
    Applied,
    /// A later start of the job superseded this run; nothing was written.
    Superseded,
    /// The job is already in a terminal state; nothing was written.
    AlreadyTerminal(JobStatus),
    /// The job is in another state than the transition needs; nothing was written.
    NotApplicable(JobStatus),
    /// No such job (never created, or expired).
    Missing,
}

/// What [`Store::start`] found.
/// The answer to `reserve_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub granted: bool,
    /// Slots taken (with this one, when granted).
    pub in_use: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The job is now running; this is its `attempt`-th start (1 for the first).
    Started { attempt: u32 },
    /// Its deadline passed before it ever started: it is now `expired` and must not run.
    Expired,
    /// Already terminal: a redelivered duplicate. Acknowledge, never run it again.
    AlreadyTerminal(JobStatus),
    /// The gateway withdrew it (its publish was not confirmed); no client holds its id.
    Withdrawn,
    /// No record: it expired, or the store lost it.
    Missing,
    /// Another run holds the job under a live lease (its message was acknowledged): this
    /// delivery is a duplicate. Acknowledge it; if that run dies, its lease lapses and the reaper
    /// queues the job again.
    Held,
}

/// A job to queue again: its lease lapsed (its worker stopped heartbeating), it follows a job
/// that ended without an outcome, or the sweeper found it stray.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lapsed {
    pub id: JobId,
    /// The envelope to queue again.
    pub envelope: String,
}

/// What [`Store::stray`] did with a job [`Store::sweep`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stray {
    /// Something is looking after it after all (a live lease, a live leader, a newer
    /// transition): it was left alone.
    Fine,
    /// Handed to the reaper, which queues it again from its envelope.
    Requeued,
    /// It could not be rebuilt (no envelope, or swept too often): ended `failed`, `job_lost`.
    Lost,
    /// Already terminal or gone.
    Gone,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes a new record (queued, or finished for a cache hit); fails with `Conflict` if the id
    /// exists.
    async fn create(&self, record: &JobRecord) -> Result<(), StoreError> {
        self.insert(record, &Creation::default()).await
    }

    /// [`Store::create`], with what else a new job carries.
    async fn insert(&self, record: &JobRecord, how: &Creation<'_>) -> Result<(), StoreError>;

    /// Writes a new queued record for a job whose identical twin may already be in flight under
    /// `inflight` (its cache key). If a twin is queued with a confirmed message, or running, and
    /// has room for more followers, the new job follows it: it completes with the twin's outcome,
    /// and must not be published. Otherwise it becomes the twin others follow — once
    /// [`Store::confirm`] says its own message is enqueued. With `hold_off`, a twin whose message
    /// is not confirmed yet makes it write nothing and answer `Pending`, so the caller can wait a
    /// moment for the confirm instead of running the same input twice.
    async fn create_coalesced(
        &self,
        record: &JobRecord,
        inflight: &str,
        how: &Creation<'_>,
        hold_off: bool,
    ) -> Result<Coalesced, StoreError>;

    /// The broker confirmed the job's message: followers may attach to it now, and its
    /// idempotency claim (if `key`) is committed for the key's full lifetime.
    async fn confirm(&self, id: JobId, key: Option<&str>) -> Result<(), StoreError>;

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// A page of the job listing, newest first (see [`ListCursor`] for what a cursor promises):
    /// the records that match, at most [`ListQuery::page_size`] of them, from at most
    /// [`MAX_EXAMINED`] entries looked at, and where the next page starts.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// `queued | running → running` for a run on `worker`: sets `started_at`, increments
    /// `attempts` and returns it as the run's token. A job that never started and is past its
    /// deadline becomes `expired` instead (a deadline is a start-by time, met by the first start); a job another run holds under a live lease is left alone (`Held`).
    async fn start(&self, id: JobId, worker: &str) -> Result<Start, StoreError>;

    /// The fenced terminal write: applied only if the job is not terminal yet and `run` is its
    /// latest run. Releases any lease.
    async fn finish(&self, id: JobId, run: Run, outcome: &Outcome) -> Result<Transition, StoreError>;

    /// `running → queued`, for a retry after a transient failure that will be delivered again
    /// after `delay`. Releases any lease.
    async fn retry(&self, id: JobId, run: Run, delay: Duration) -> Result<Transition, StoreError>;

    /// `queued → expired` when the deadline has passed and the job never started.
    async fn expire_if_due(&self, id: JobId) -> Result<Transition, StoreError>;

    /// Records progress of run `run`; never touches a terminal job or a superseded run.
    async fn progress(&self, id: JobId, run: Run, progress: &serde_json::Value) -> Result<Transition, StoreError>;

    /// Withdraws a record that was created but could not be enqueued, so no id is left pointing
    /// at a job that will never run, and a late delivery of it is recognised and dropped.
    async fn discard(&self, id: JobId) -> Result<(), StoreError>;

    /// Takes over from the broker for a long job: run `run`'s job is held by `owner` for `ttl`,
    /// after which [`Store::reap`] hands it out again; `envelope` replaces the stored one.
    async fn lease(
        &self,
        id: JobId,
        run: Run,
        owner: &str,
        ttl: Duration,
        envelope: &str,
    ) -> Result<Transition, StoreError>;

    /// Extends `owner`'s lease by `ttl` from now; `NotApplicable` when it is no longer its own.
    async fn renew(&self, id: JobId, owner: &str, ttl: Duration) -> Result<Transition, StoreError>;

    /// Hands out up to `limit` jobs due to be queued again — lapsed leases, orphaned followers,
    /// strays — each to exactly one caller: it is `queued` when returned, and the caller publishes
    /// its envelope. If that publish fails, [`Store::requeue_later`] puts it back; if the caller
    /// dies, the sweeper finds it.
    async fn reap(&self, limit: usize) -> Result<Vec<Lapsed>, StoreError>;

    /// Puts a reaped job whose publish failed back to be reaped again after `delay`.
    async fn requeue_later(&self, id: JobId, delay: Duration) -> Result<Transition, StoreError>;

    /// Live jobs whose time to show activity passed (see the module header), at most `limit`.
    async fn sweep(&self, limit: usize) -> Result<Vec<JobId>, StoreError>;

    /// Checks a job [`Store::sweep`] found, atomically, and queues it again or ends it (after
    /// `max_sweeps`, or when it has no envelope). Only a live lease (or a live leader, for a
    /// follower) shows that something still holds a quiet job: a run that outlasts `lease_after`
    /// takes a lease, so a quiet run without one is lost even if its worker is alive. Safe with
    /// many sweepers at once.
    async fn stray(&self, id: JobId, max_sweeps: u32) -> Result<Stray, StoreError>;

    /// `failed → queued` with the attempt count reset: an operator's redrive from the dead-letter
    /// queue, the one way out of a terminal state.
    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError>;

    /// `queued | running → canceled`: the fenced terminal write of a cancel. A worker still
    /// running the job finds it terminal and drops its result.
    async fn cancel(&self, id: JobId) -> Result<Transition, StoreError>;

    /// The job's event log after `after` (an event id), oldest first; from the start when `None`.
    /// Every applied transition appends to it.
    async fn events(&self, id: JobId, after: Option<&str>) -> Result<Vec<JobEvent>, StoreError>;

    /// Live events of one job, from now on, wherever the transition was made. Subscribe before
    /// reading [`Store::events`] and skip what the log already gave, and nothing is missed.
    async fn subscribe(&self, id: JobId) -> tokio::sync::broadcast::Receiver<JobEvent>;

    /// Claims `key` for a new job with this request `fingerprint`, or reports who holds it. A
    /// claim is pending for `pending` (a gateway that dies while accepting lets it lapse), and
    /// lives for `ttl` once its job exists ([`Store::create`]) or is confirmed. A claim held by a
    /// job whose record exists and is confirmed reads as committed.
    async fn claim_idempotency(
        &self,
        key: &str,
        fingerprint: &str,
        job: JobId,
        pending: Duration,
        ttl: Duration,
    ) -> Result<Claim, StoreError>;

    /// Drops a claim whose job could not be accepted, so a retry can claim it again.
    async fn release_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError>;

    /// Claims up to `limit` webhook deliveries due at `now`, holding them for `owner` until
    /// `claim_until` (a dispatcher that dies lets them lapse to another). Per job, only its
    /// earliest pending delivery is handed out, so a job's events arrive in order.
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

    /// Takes one of `tenant`'s `max` slots of jobs in flight for job `id`; the slot is freed when
    /// the job ends (any terminal state) or by `release_slot`. Answers whether it was granted and
    /// how many slots are taken.
    async fn reserve_slot(&self, tenant: &str, id: JobId, max: u32) -> Result<Slot, StoreError>;

    /// Frees a slot whose job was never accepted.
    async fn release_slot(&self, tenant: &str, id: JobId) -> Result<(), StoreError>;

    /// Notes that `worker` is consuming `model`'s queue (called every few seconds by workers), at
    /// the store's time.
    async fn worker_seen(&self, model: &ModelName, worker: &str) -> Result<(), StoreError>;

    /// The tenants with a lane of their own for `model` (see [`crate::broker::Lane`]): each one
    /// that had a job created to be published, noted with the job's record, atomically. Never
    /// forgotten while the store keeps its data; workers consume every lane it names. `None` when
    /// there are exactly `known` of them: the set only grows, so the caller who has `known`
    /// already has them all, and asking often costs a count.
    async fn lanes(&self, model: &ModelName, known: usize) -> Result<Option<Vec<String>>, StoreError>;

    /// Workers that consumed `model`'s queue since `since`, for `GET /v1/models`.
    async fn workers(&self, model: &ModelName, since: UnixMillis) -> Result<Vec<String>, StoreError>;

    /// Cheap liveness check, for readiness probes.
    async fn check(&self) -> Result<(), StoreError>;

    fn kind(&self) -> &'static str;
}

/// What a new job carries besides its record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Creation<'a> {
    /// The message a worker runs, kept while the job is live so its work can be rebuilt.
    pub envelope: Option<&'a str>,
    /// The idempotency key claimed for it: from now on the claim lives its full lifetime.
    pub idempotency_key: Option<&'a str>,
}

/// What [`Store::create_coalesced`] made of a new job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coalesced {
    /// No twin in flight: publish this job.
    Leader,
    /// Attached to this in-flight twin: do not publish.
    Follower(JobId),
    /// Nothing written: this twin's message is not confirmed yet (asked to hold off).
    Pending(JobId),
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
    /// The event's place among the job's webhook events: 1, 2, 3…
    pub seq: u64,
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

/// The error recorded on a job the sweeper could not rebuild.
pub fn lost_error() -> JobError {
    JobError {
        code: kiln_proto::ErrorCode::JobLost,
        message: "the job's work was lost (no message, no lease, no envelope to rebuild it from)".into(),
    }
}
