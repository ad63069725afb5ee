//! Waiting for a job to finish without polling: completion is pushed through the store's event
//! subscription; the log is re-read only now and then, to cover a subscription that reconnected.

use std::time::Duration;

use kiln_proto::{EventKind, JobEvent, JobId, JobRecord};
use tokio::sync::broadcast;

use crate::state::AppState;

/// How often a waiter re-reads the job in case a pushed event was missed.
const RESYNC: Duration = Duration::from_secs(5);

/// The finished record, if the job finishes within `wait`.
pub async fn completion(
    state: &AppState,
    id: JobId,
    rx: &mut broadcast::Receiver<JobEvent>,
    wait: Duration,
) -> Option<JobRecord> {
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
