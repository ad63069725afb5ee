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
    #[error("the dead-letter queue said it held {expected} messages but delivered {got} within {waited:?}")]
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
    /// Messages left in the queue: not selected, unreadable, or beyond [`MAX_BATCH`].
    pub left: u32,
}

async fn take(deliveries: &mut Deliveries, expected: u32) -> Result<Vec<Delivery>, DlqError> {
    let waited = Duration::from_secs(5);
    let mut out = Vec::with_capacity(expected as usize);
    while out.len() < expected as usize {
        match tokio::time::timeout(waited, deliveries.next()).await {
            Ok(Some(d)) => out.push(d?),
            _ => return Err(DlqError::Short { expected, got: out.len() as u32, waited }),
        }
    }
    Ok(out)
}

/// Up to `limit` dead letters, oldest first. Nothing is removed.
pub async fn list(backend: &Backend, limit: u32) -> Result<Vec<DeadLetter>, DlqError> {
    let n = backend.broker.dead_letter_count().await?.min(limit).min(MAX_BATCH);
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut deliveries = backend.broker.consume_dead_letters(n as u16).await?;
    let held = take(&mut deliveries, n).await?;
    let letters = held.iter().filter_map(|d| serde_json::from_slice(&d.body).ok()).collect();
    // Dropping the consumer hands every message back, untouched.
    drop(held);
    drop(deliveries);
    Ok(letters)
}

/// Queues the selected dead jobs again.
pub async fn redrive(backend: &Backend, selection: Selection) -> Result<RedriveReport, DlqError> {
    let total = backend.broker.dead_letter_count().await?;
    let n = total.min(MAX_BATCH);
    let mut report = RedriveReport { left: total - n, ..Default::default() };
    if n == 0 {
        return Ok(report);
    }
    let mut deliveries = backend.broker.consume_dead_letters(n as u16).await?;
    for delivery in take(&mut deliveries, n).await? {
        let letter: DeadLetter = match serde_json::from_slice(&delivery.body) {
            Ok(l) => l,
            Err(_) => {
                report.left += 1;
                continue;
            }
        };
        let id = letter.envelope.id;
        if selection != Selection::All && selection != Selection::Job(id) {
            report.left += 1;
            continue;
        }
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
            Transition::AlreadyTerminal(_) | Transition::NotApplicable(_) => {
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
    Ok(report)
}
