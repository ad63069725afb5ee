//! The dead-letter queue as an operator sees it: list what is there, and redrive jobs (all, or one
//! by id) back onto their model's queue, with their records reset from `failed` to `queued`.
//! Works on any [`Backend`]; `kiln dlq` is its command line.

use std::time::Duration;

use futures::StreamExt;
use kiln_proto::{DeadLetter, JobId, JobRecord, now_millis};

use crate::Backend;
use crate::broker::{BrokerError, Deliveries, Delivery};
use crate::store::{StoreError, Transition};

/// Most messages one call looks at; they are all held unacknowledged while it runs.
pub const MAX_BATCH: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the dead-letter queue said it held {expected} messages but delivered {got} (waited {waited:?} for the next)"
    )]
    Short { expected: u32, got: u32, waited: Duration },
}

/// Which dead letters to redrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    All,
    Job(JobId),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RedriveReport {
    /// Jobs queued again.
    pub redriven: Vec<JobId>,
    /// Dead letters removed without a redrive: their job is no longer `failed` (redriven already,
    /// or its record expired and was recreated).
    pub dropped: Vec<JobId>,
    /// Messages looked at and left in the queue: not selected, or unreadable. A queue holding more
    /// than [`MAX_BATCH`] takes several calls.
    pub left: u32,
}

/// Takes what the queue holds: at least `hint` messages (the broker's count, which can lag
/// behind requeues) waiting up to 5 s each, then more until none comes for half a second, at
/// most `max`.
async fn take(deliveries: &mut Deliveries, hint: u32, max: u32) -> Result<Vec<Delivery>, DlqError> {
    let mut out = Vec::new();
    while (out.len() as u32) < max {
        let wait = if (out.len() as u32) < hint { Duration::from_secs(5) } else { Duration::from_millis(500) };
        match tokio::time::timeout(wait, deliveries.next()).await {
            Ok(Some(d)) => out.push(d?),
            _ if (out.len() as u32) < hint => {
                return Err(DlqError::Short { expected: hint, got: out.len() as u32, waited: wait });
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Up to `limit` dead letters, oldest first. Nothing is removed.
pub async fn list(backend: &Backend, limit: u32) -> Result<Vec<DeadLetter>, DlqError> {
    let max = limit.min(MAX_BATCH);
    let hint = backend.broker.dead_letter_count().await?.min(max);
    let mut deliveries = backend.broker.consume_dead_letters(max.max(1) as u16).await?;
    let held = take(&mut deliveries, hint, max).await?;
    let letters = held.iter().filter_map(|d| serde_json::from_slice(&d.body).ok()).collect();
    // Hand every message back, untouched, before returning, so a redrive right after sees them.
    for d in held {
        d.requeue().await?;
    }
    deliveries.close().await;
    Ok(letters)
}

/// Queues the selected dead jobs again.
pub async fn redrive(backend: &Backend, selection: Selection) -> Result<RedriveReport, DlqError> {
    let hint = backend.broker.dead_letter_count().await?.min(MAX_BATCH);
    let mut report = RedriveReport::default();
    let mut deliveries = backend.broker.consume_dead_letters(MAX_BATCH as u16).await?;
    for delivery in take(&mut deliveries, hint, MAX_BATCH).await? {
        let letter = match serde_json::from_slice::<DeadLetter>(&delivery.body) {
            Ok(l) if selection == Selection::All || selection == Selection::Job(l.envelope.id) => l,
            _ => {
                delivery.requeue().await?;
                report.left += 1;
                continue;
            }
        };
        let id = letter.envelope.id;
        let mut envelope = letter.envelope;
        match backend.store.redrive(id).await? {
            // Queued with its dead letter still here: an earlier redrive failed to publish.
            Transition::Applied | Transition::NotApplicable(kiln_proto::JobStatus::Queued) => {}
            Transition::Missing => {
                // The record expired while the job sat in the queue: start a fresh one.
                let record = JobRecord::queued(id, envelope.model.clone(), now_millis(), None);
                match backend.store.create(&record).await {
                    Ok(()) | Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Transition::AlreadyTerminal(_) | Transition::NotApplicable(_) | Transition::Superseded => {
                delivery.ack().await?;
                report.dropped.push(id);
                continue;
            }
        }
        envelope.history.clear();
        envelope.deadline = None;
        let body = serde_json::to_vec(&envelope).expect("envelopes serialise");
        backend.broker.declare(std::slice::from_ref(&envelope.model)).await?;
        backend.broker.publish(&envelope.model, body).await?;
        delivery.ack().await?;
        report.redriven.push(id);
    }
    deliveries.close().await;
    Ok(report)
}
