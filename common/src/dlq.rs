//! The dead-letter queue as an operator sees it: list what is there, and redrive jobs (all, or one
//! by id) back onto their model's queue, with their records reset from `failed` to `queued`.
//! Works on any [`Backend`]; `kiln dlq` is its command line.
//!
//! The queue holds two kinds of letter: Kiln's own [`DeadLetter`], written by a worker that gave a
//! job up, and the raw job envelope that the broker moved there itself — over the delivery limit,
//! or rejected — which carries a [`Death`] instead of a reason. Both are listed and redriven: a
//! worker's letter goes back with its record reset from `failed`; a broker's letter goes back as
//! it was while its record is `queued` or `running` (the store fences a duplicate run), is reset
//! the same way when its record is `failed`, and is dropped once its job has otherwise ended.
//! Listing is a read: letters are taken without acknowledgement and handed back to the head of
//! the queue in their order, so it moves, reorders and drops nothing (see
//! [`crate::broker::Broker::fetch_dead_letters`]).

use kiln_proto::{DeadLetter, Envelope, JobError, JobId, JobStatus, UnixMillis};

use crate::Backend;
use crate::broker::{BrokerError, DELIVERY_LIMIT, Death, DeathReason, Delivery, Lane};
use crate::store::{Creation, StoreError, Transition};

/// Most messages one call looks at; they are all held unacknowledged while it runs.
pub const MAX_BATCH: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A dead letter that names its job.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    /// The job as it was last queued.
    pub envelope: Envelope,
    /// The starts Kiln counted, for a letter a worker wrote; for one the broker moved, the failed
    /// attempts its envelope records.
    pub attempts: u32,
    pub cause: Cause,
}

/// Why a job is in the dead-letter queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// A worker gave the job up, and wrote why.
    GivenUp { reason: JobError, dead_at: UnixMillis },
    /// The broker moved the message there itself.
    Broker(Death),
}

/// A message of the dead-letter queue that is neither kind of letter (e.g. a rejected message
/// that never was an envelope). Redrive leaves it in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub bytes: usize,
    pub death: Option<Death>,
}

/// What [`read`] found, oldest first.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Listing {
    pub letters: Vec<Letter>,
    pub unreadable: Vec<Unreadable>,
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
    /// or its record expired and was recreated), or, for a letter the broker moved, it has ended.
    pub dropped: Vec<JobId>,
    /// Messages looked at and left in the queue: not selected, or unreadable. A queue holding more
    /// than [`MAX_BATCH`] takes several calls.
    pub left: u32,
}

impl Letter {
    /// The letter as `kiln dlq list` prints it: `by` says who dead-lettered it (`kiln`, or
    /// `broker` with the queue it left and how often), and `reason` has a `code` either way.
    pub fn to_json(&self) -> serde_json::Value {
        let e = &self.envelope;
        match &self.cause {
            Cause::GivenUp { reason, dead_at } => serde_json::json!({
                "id": e.id, "model": e.model, "by": "kiln", "reason": reason,
                "attempts": self.attempts, "dead_at": dead_at, "history": e.history,
            }),
            Cause::Broker(death) => serde_json::json!({
                "id": e.id, "model": e.model, "by": "broker",
                "reason": { "code": death.reason.as_str(), "message": describe(death) },
                "queue": death.queue, "deaths": death.count,
                "attempts": self.attempts, "dead_at": death.at, "history": e.history,
            }),
        }
    }
}

impl Unreadable {
    /// As `kiln dlq list` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let reason =
            self.death.as_ref().map(|d| serde_json::json!({ "code": d.reason.as_str(), "message": describe(d) }));
        serde_json::json!({ "unreadable": true, "bytes": self.bytes, "reason": reason })
    }
}

/// The letter a message of the dead-letter queue is, if any.
fn decode(delivery: &Delivery) -> Result<Letter, Unreadable> {
    if let Ok(l) = serde_json::from_slice::<DeadLetter>(&delivery.body) {
        let cause = Cause::GivenUp { reason: l.reason, dead_at: l.dead_at };
        return Ok(Letter { envelope: l.envelope, attempts: l.attempts, cause });
    }
    match (&delivery.death, serde_json::from_slice::<Envelope>(&delivery.body)) {
        (Some(death), Ok(envelope)) => {
            let attempts = u32::try_from(envelope.history.len()).unwrap_or(u32::MAX);
            Ok(Letter { envelope, attempts, cause: Cause::Broker(death.clone()) })
        }
        (death, Ok(_) | Err(_)) => Err(Unreadable { bytes: delivery.body.len(), death: death.clone() }),
    }
}

/// Up to `limit` messages of the dead-letter queue (at most [`MAX_BATCH`]), oldest first, decoded.
/// Nothing is removed, and the queue keeps its order.
pub async fn read(backend: &Backend, limit: u32) -> Result<Listing, DlqError> {
    let held = backend.broker.fetch_dead_letters(limit.min(MAX_BATCH)).await?;
    let mut listing = Listing::default();
    for delivery in &held.messages {
        match decode(delivery) {
            Ok(l) => listing.letters.push(l),
            Err(u) => listing.unreadable.push(u),
        }
    }
    // Handed back before returning, so a redrive right after sees them.
    held.release().await;
    Ok(listing)
}

/// The letters among the first `limit` messages of the dead-letter queue, oldest first. Nothing
/// is removed, and the queue keeps its order.
pub async fn list(backend: &Backend, limit: u32) -> Result<Vec<Letter>, DlqError> {
    Ok(read(backend, limit).await?.letters)
}

/// One line on what happened to a message the broker dead-lettered, for operators.
pub fn describe(death: &Death) -> String {
    let times = if death.count > 1 { format!(" ({} times)", death.count) } else { String::new() };
    let queue = &death.queue;
    match &death.reason {
        DeathReason::DeliveryLimit => format!(
            "delivered more than {queue}'s delivery limit ({DELIVERY_LIMIT}, or lower if a policy sets one) without \
             being settled{times}"
        ),
        DeathReason::Rejected => format!("rejected by a consumer of {queue}{times}"),
        DeathReason::Expired => format!("its time to live ran out in {queue}{times}"),
        DeathReason::MaxLen => format!("pushed out of {queue} by its length limit{times}"),
        DeathReason::Other(reason) => format!("dead-lettered from {queue}: {reason}{times}"),
    }
}

/// Queues the selected dead jobs again.
pub async fn redrive(backend: &Backend, selection: Selection) -> Result<RedriveReport, DlqError> {
    let mut report = RedriveReport::default();
    let mut held = backend.broker.fetch_dead_letters(MAX_BATCH).await?;
    for delivery in std::mem::take(&mut held.messages) {
        let letter = match decode(&delivery) {
            Ok(l) if selection == Selection::All || selection == Selection::Job(l.envelope.id) => l,
            Ok(_) | Err(_) => {
                // Not acknowledged: released back to the head of the queue with the others.
                report.left += 1;
                continue;
            }
        };
        let id = letter.envelope.id;
        let given_up = matches!(letter.cause, Cause::GivenUp { .. });
        let mut envelope = letter.envelope;
        let reset = match backend.store.redrive(id).await? {
            Transition::Applied => true,
            // A worker's letter with its job queued: an earlier redrive failed to publish. A
            // letter the broker moved: the job never ended, and its message is the one here.
            Transition::NotApplicable(JobStatus::Queued) => given_up,
            // The broker gave the message up while a run was on record; the store fences runs,
            // so queueing it again at worst duplicates a message, never the outcome.
            Transition::NotApplicable(JobStatus::Running) if !given_up => false,
            Transition::Missing => {
                // The record expired while the job sat in the queue: start a fresh one.
                envelope.history.clear();
                envelope.deadline = None;
                let text = serde_json::to_string(&envelope).expect("envelopes serialise");
                let how = Creation { envelope: Some(&text), idempotency_key: None };
                match backend.store.insert(&envelope.record(), &how).await {
                    Ok(()) | Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                true
            }
            Transition::AlreadyTerminal(_) | Transition::NotApplicable(_) | Transition::Superseded => {
                delivery.ack().await?;
                report.dropped.push(id);
                continue;
            }
        };
        if reset {
            envelope.history.clear();
            envelope.deadline = None;
        }
        let body = serde_json::to_vec(&envelope).expect("envelopes serialise");
        backend.broker.declare(std::slice::from_ref(&envelope.model)).await?;
        backend.broker.publish(&Lane::of(&envelope), body).await?;
        delivery.ack().await?;
        report.redriven.push(id);
    }
    held.release().await;
    Ok(report)
}
