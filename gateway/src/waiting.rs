//! Waiting for a job to finish without polling, within the gateway's bound on long-polls
//! (`KILN_MAX_WAITERS`): completion is pushed through the store's event subscription; the log is
//! re-read only now and then, to cover a subscription that reconnected.

use std::time::Duration;

use kiln_proto::{EventKind, JobEvent, JobId, JobRecord};
use tokio::sync::{OwnedSemaphorePermit, broadcast};

use crate::error::ApiError;
use crate::state::AppState;

/// How often a waiter re-reads the job in case a pushed event was missed.
const RESYNC: Duration = Duration::from_secs(5);

/// One of the gateway's long-poll slots, held for as long as its request waits.
pub struct Waiter(OwnedSemaphorePermit);

/// Takes a long-poll slot, or refuses with `503` and `Retry-After` when every one is taken.
pub fn waiter(state: &AppState) -> Result<Waiter, ApiError> {
    state
        .waiters
        .clone()
        .try_acquire_owned()
        .map(Waiter)
        .map_err(|_| ApiError::TooManyOpen("long-polls", state.config.retry_after))
}

/// The finished record, if the job finishes within `wait`. When every long-poll slot is taken it
/// does not wait at all, and the caller answers with the job as it is (for a submit, the `202`
/// it would give without `Prefer: wait`); a caller that would rather refuse takes a [`waiter`]
/// first and waits with [`Waiter::completion`].
pub async fn completion(
    state: &AppState,
    id: JobId,
    rx: &mut broadcast::Receiver<JobEvent>,
    wait: Duration,
) -> Option<JobRecord> {
    match waiter(state) {
        Ok(waiter) => waiter.completion(state, id, rx, wait).await,
        Err(_) => {
            tracing::debug!(target: "kiln::gateway", job_id = %id, "every long-poll slot is taken; answering without waiting");
            None
        }
    }
}

impl Waiter {
    /// The finished record, if the job finishes within `wait`; the slot is given back on return.
    pub async fn completion(
        self,
        state: &AppState,
        id: JobId,
        rx: &mut broadcast::Receiver<JobEvent>,
        wait: Duration,
    ) -> Option<JobRecord> {
        let _slot = self.0;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let resync = tokio::time::sleep(RESYNC);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                _ = state.shutdown.cancelled() => return None,
                event = rx.recv() => match event {
                    Ok(JobEvent { kind: EventKind::Completed, record: Some(record), .. }) if record.status.is_terminal() => {
                        return Some(*record);
                    }
                    Ok(e) if e.kind == EventKind::Completed => {}
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = resync => {}
            }
            match crate::routes::current(state, id).await {
                Ok(Some(r)) if r.status.is_terminal() => return Some(r),
                Ok(None) | Err(_) => return None,
                Ok(Some(_)) => {}
            }
        }
    }
}
