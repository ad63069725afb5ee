//! The job store: job records with a retention TTL, and the state transitions workers make on
//! them. Terminal writes are fenced: the first terminal state wins and later writes (a redelivered
//! duplicate, a late update) change nothing. Implementations: [`redis`] and the in-process
//! [`embedded`] store with the same semantics.

pub mod embedded;
pub mod redis;

use async_trait::async_trait;
use kiln_proto::{JobError, JobId, JobRecord, JobStatus, UnixMillis};

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

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Corrupt { .. } | Self::Conflict(_) => false,
        }
    }
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
    /// No such job (never created, or expired).
    Missing,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes a new queued record; fails with `Conflict` if the id exists.
    async fn create(&self, record: &JobRecord) -> Result<(), StoreError>;

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// `queued → running`: sets `started_at` and increments `attempts`. Refused for terminal jobs.
    async fn start(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError>;

    /// The fenced terminal write: applied only if the job is not terminal yet.
    async fn finish(
        &self,
        id: JobId,
        outcome: &Outcome,
        at: UnixMillis,
    ) -> Result<Transition, StoreError>;

    /// Drops a record that was created but could not be enqueued, so no id is left pointing at a
    /// job that will never run.
    async fn discard(&self, id: JobId) -> Result<(), StoreError>;

    /// Cheap liveness check, for readiness probes.
    async fn check(&self) -> Result<(), StoreError>;

    fn kind(&self) -> &'static str;
}
