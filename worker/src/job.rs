//! A job a worker holds, and the one place its message is settled.
//!
//! The at-least-once argument, in one file. A job the gateway answered `202` for is always held by
//! exactly one of: its message in RabbitMQ (ready, or delivered and unacknowledged), a lease in the
//! store, or — for the moment between a reap and its publish — the store's requeue entry, which
//! the sweeper finds if its reaper dies. A [`Job`] in a worker holds it through a [`Holder`]:
//!
//! - `Message`: the delivery is unacknowledged. If this worker dies, its channel closes and
//!   RabbitMQ delivers the message again; the store's run token (the attempt number) fences the
//!   older run, so its late writes change nothing.
//! - `Lease`: the job outlasted `lease_after`, so [`Job::take_lease`] stored its envelope under a
//!   lease held by this worker, and only then acknowledged the message. If this worker dies, the
//!   lease lapses and the reaper queues the envelope again.
//! - `Released`: the job's outcome is in the store (or it was handed back, or rejected): nothing
//!   of it remains here.
//!
//! A message is acknowledged only after the store holds what replaces it — the job's terminal
//! state ([`Job::done`]), a retry whose message is already confirmed in a delay queue, or a lease
//! ([`Job::take_lease`]). Everything else hands it back ([`Job::hand_back`]): the message is
//! requeued, a lease is left to lapse. These methods are the only code that settles a message.

use std::time::Duration;

use kiln_common::broker::Delivery;
use kiln_common::store::{Run, Store, Transition};
use kiln_proto::{Envelope, JobId};

use crate::events;
use crate::inference::ImageWork;
use crate::media::MediaWork;

/// Who holds the job while this worker has it.
pub enum Holder {
    /// Its message, delivered and not yet acknowledged.
    Message(Delivery),
    /// A lease in the store, held by `owner`; its message was acknowledged.
    Lease { owner: String },
    /// Nothing: the job was settled.
    Released,
}

/// How letting go of a job went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Its outcome is stored and its holder released.
    Done,
    /// The store or broker failed: the job was handed back (its message requeued, or its lease
    /// left to lapse) and will run again. The consume loop backs off.
    HandedBack,
}

impl Settled {
    /// The two together: handed back if either was.
    pub fn or(self, other: Settled) -> Settled {
        if other == Settled::HandedBack { other } else { self }
    }
}

/// What [`Job::take_lease`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTaken {
    /// The store holds the job under this worker's lease; the message is acknowledged.
    Taken,
    /// The job already had no message (leased before, or settled).
    NotHeldByMessage,
    /// The store refused (the job is no longer this run's) or failed: the message keeps holding
    /// the job, and a redelivery after RabbitMQ's consumer timeout is fenced by the run token.
    Refused,
}

/// One run of a job on this worker.
pub struct Job {
    pub id: JobId,
    pub envelope: Envelope,
    /// The message as received, kept for leases.
    pub body: Vec<u8>,
    /// This run's fencing token (the attempt number the store's start gave it).
    pub run: Run,
    holder: Holder,
    /// An embedding job's texts.
    pub texts: Vec<String>,
    /// An image job's work.
    pub images: Option<ImageWork>,
    /// The canonical input of a job with a binary input (OCR, moderation, speech).
    pub media: Option<MediaWork>,
    /// This run of the job, a child of the span that published it (the HTTP request).
    pub span: tracing::Span,
    /// When this run started.
    pub started: std::time::Instant,
}

impl Job {
    pub fn new(envelope: Envelope, delivery: Delivery, run: Run, span: tracing::Span) -> Self {
        Self {
            id: envelope.id,
            body: delivery.body.clone(),
            envelope,
            run,
            holder: Holder::Message(delivery),
            texts: Vec::new(),
            images: None,
            media: None,
            span,
            started: std::time::Instant::now(),
        }
    }

    /// The job's outcome is in the store (or it needs none: canceled meanwhile, run by another
    /// worker): let go of it. A lease needs nothing more — the store's terminal write ended it.
    pub async fn done(mut self) -> Settled {
        if let Holder::Message(d) = std::mem::replace(&mut self.holder, Holder::Released) {
            // A lost ack means a redelivery, which the store recognises as finished.
            let _ = d.ack().await;
        }
        Settled::Done
    }

    /// The job could not be settled: give it back to run again.
    pub async fn hand_back(mut self, error: &(dyn std::fmt::Display + Sync)) -> Settled {
        events::handed_back(self.id, error);
        if let Holder::Message(d) = std::mem::replace(&mut self.holder, Holder::Released) {
            let _ = d.requeue().await;
        }
        Settled::HandedBack
    }

    /// Moves the job from its message onto a lease held by `owner`, acknowledging the message
    /// only once the store holds the lease.
    pub async fn take_lease(&mut self, store: &dyn Store, owner: &str, ttl: Duration) -> LeaseTaken {
        if !matches!(self.holder, Holder::Message(_)) {
            return LeaseTaken::NotHeldByMessage;
        }
        let envelope = String::from_utf8_lossy(&self.body).into_owned();
        match store.lease(self.id, self.run, owner, ttl, &envelope).await {
            Ok(Transition::Applied) => {
                if let Holder::Message(d) =
                    std::mem::replace(&mut self.holder, Holder::Lease { owner: owner.to_owned() })
                {
                    let _ = d.ack().await;
                }
                events::leased(self.id);
                LeaseTaken::Taken
            }
            Ok(other) => {
                events::lease_refused(self.id, &format!("{other:?}"));
                LeaseTaken::Refused
            }
            Err(e) => {
                events::lease_refused(self.id, &e);
                LeaseTaken::Refused
            }
        }
    }

    /// Extends this worker's lease; a lease found lost (reaped, canceled, superseded) is let go —
    /// whoever holds the job now settles it.
    pub async fn renew_lease(&mut self, store: &dyn Store, ttl: Duration) {
        let Holder::Lease { owner } = &self.holder else { return };
        match store.renew(self.id, owner, ttl).await {
            Ok(Transition::Applied) => {}
            Ok(other) => {
                self.holder = Holder::Released;
                events::lease_lost(self.id, &format!("{other:?}"));
            }
            Err(e) => events::lease_refused(self.id, &e),
        }
    }
}

/// Drops a message that can never run (its envelope does not decode).
pub async fn reject(delivery: Delivery) {
    let _ = delivery.reject().await;
}

/// Acknowledges a delivery the store says not to run (finished, expired, withdrawn, held by
/// another run's lease): the store has what the message stood for.
pub async fn skip(delivery: Delivery) {
    let _ = delivery.ack().await;
}

/// Hands back a delivery that could not be started because the store failed.
pub async fn not_started(delivery: Delivery) {
    let _ = delivery.requeue().await;
}
