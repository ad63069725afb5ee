//! The broker abstraction: durable, confirmed publishing of job envelopes to a model's queues, and
//! consuming them with a bounded prefetch and explicit acknowledgement. Implementations: RabbitMQ
//! ([`amqp`]) and the in-process [`embedded`] broker with the same delivery semantics.
//!
//! A model has one queue per [`Lane`]: the shared lane, for jobs that belong to no tenant (a
//! gateway without keys), and one lane per tenant, made the first time a tenant's job is
//! published. Workers consume every lane of a model and take from them in turn, so one tenant's
//! backlog waits in its own lane instead of ahead of everybody else's jobs.
//!
//! Nothing a broker holds is dropped by the broker: a job message returned to its queue more than
//! [`DELIVERY_LIMIT`] times, or rejected, is moved to the dead-letter queue (with a [`Death`] that
//! says why), and the dead-letter queue itself keeps every message however often it is read.

pub mod amqp;
pub mod embedded;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_proto::{Envelope, ModelName, UnixMillis};

/// One of a model's queues: the shared one, or a tenant's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    model: ModelName,
    tenant: Option<String>,
}

impl Lane {
    /// The model's shared lane, for jobs of no tenant.
    pub fn shared(model: ModelName) -> Self {
        Self { model, tenant: None }
    }

    /// The lane of `tenant`'s jobs for `model`; the shared lane for none.
    pub fn new(model: ModelName, tenant: Option<String>) -> Self {
        Self { model, tenant }
    }

    /// The lane a job travels in.
    pub fn of(envelope: &Envelope) -> Self {
        Self::new(envelope.model.clone(), envelope.tenant.clone())
    }

    pub fn model(&self) -> &ModelName {
        &self.model
    }

    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The lane's name within the model's: the model name, then `@tenant` for a tenant's lane
    /// (`@` is in neither a model name nor a tenant). RabbitMQ's routing key, and the tail of the
    /// queue's name.
    pub fn key(&self) -> String {
        match &self.tenant {
            None => self.model.to_string(),
            Some(t) => format!("{}@{t}", self.model),
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Returns a job message may take — a requeue, or its consumer going away while holding it — before
/// the broker stops delivering it and moves it to the dead-letter queue instead: a message is
/// delivered at most `DELIVERY_LIMIT + 1` times. Far above what a job needs (the worker gives a job
/// up after a few starts, and retries go out as new messages, see [`Broker::publish_delayed`]); it
/// is there so that a requeue loop ends in the dead-letter queue, where `kiln dlq redrive` finds it,
/// instead of RabbitMQ 4's default of 20 deliveries and then deletion. RabbitMQ fixes it per queue
/// when the queue is declared: changing it means new queues (see [`amqp`]'s header).
pub const DELIVERY_LIMIT: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached or the connection is down; retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message (negative confirm, queue full).
    #[error("broker rejected the message: {0}")]
    Rejected(String),
    /// No queue is bound for the message (a published message is mandatory): its queue was
    /// deleted, or never made.
    #[error("broker returned the message as unroutable: {0}")]
    Unroutable(String),
    /// No confirm arrived in time; the message may or may not be enqueued.
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Why the broker itself moved a message to the dead-letter queue: RabbitMQ's `x-death` header
/// (its latest entry), or the embedded broker's record of the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    pub reason: DeathReason,
    /// The queue it was moved out of.
    pub queue: String,
    /// How many times it was moved out of that queue for that reason.
    pub count: u64,
    /// When, in milliseconds since the Unix epoch (RabbitMQ records whole seconds).
    pub at: Option<UnixMillis>,
}

/// The reasons a broker dead-letters a message, as RabbitMQ names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeathReason {
    /// Returned to its queue more than the queue's delivery limit ([`DELIVERY_LIMIT`]).
    DeliveryLimit,
    /// Rejected by a consumer without requeue ([`Delivery::reject`]), e.g. an undecodable message.
    Rejected,
    /// Its time to live ran out.
    Expired,
    /// Pushed out by a queue length limit.
    MaxLen,
    /// A reason this version does not know, as the broker wrote it.
    Other(String),
}

impl DeathReason {
    /// The reason as RabbitMQ writes it in `x-death`.
    pub fn parse(reason: &str) -> Self {
        match reason {
            "delivery_limit" => Self::DeliveryLimit,
            "rejected" => Self::Rejected,
            "expired" => Self::Expired,
            "maxlen" => Self::MaxLen,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::DeliveryLimit => "delivery_limit",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::MaxLen => "maxlen",
            Self::Other(other) => other,
        }
    }
}

/// A message taken from a queue, to be acknowledged once its effects are stored.
pub struct Delivery {
    pub body: Vec<u8>,
    /// Set when the message was delivered before and not acknowledged.
    pub redelivered: bool,
    /// The W3C trace context the message was published under, if any.
    pub traceparent: Option<String>,
    /// Set when the broker itself dead-lettered the message (RabbitMQ's `x-death`): in the
    /// dead-letter queue, why it is there; on RabbitMQ a retry back from its delay queue carries
    /// its expiry there too.
    pub death: Option<Death>,
    acker: Box<dyn Acknowledge>,
}

impl Delivery {
    pub fn new(body: Vec<u8>, redelivered: bool, acker: Box<dyn Acknowledge>) -> Self {
        Self { body, redelivered, traceparent: None, death: None, acker }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    pub fn with_death(mut self, death: Option<Death>) -> Self {
        self.death = death;
        self
    }

    /// Settles the message as done.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    /// Hands the message back to the queue for another delivery.
    pub async fn requeue(self) -> Result<(), BrokerError> {
        self.acker.nack(true).await
    }

    /// Gives the message up: a job queue moves it to the dead-letter queue (reason
    /// [`DeathReason::Rejected`]); the dead-letter queue itself drops it.
    pub async fn reject(self) -> Result<(), BrokerError> {
        self.acker.nack(false).await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("len", &self.body.len())
            .field("redelivered", &self.redelivered)
            .field("death", &self.death)
            .finish()
    }
}

#[async_trait]
pub trait Acknowledge: Send + Sync {
    async fn ack(&self) -> Result<(), BrokerError>;
    async fn nack(&self, requeue: bool) -> Result<(), BrokerError>;
}

/// A consumer's deliveries. The stream ends when the consumer is cancelled or its channel closes;
/// dropping it releases the consumer, and the broker redelivers everything it left unacknowledged.
pub struct Deliveries {
    inner: BoxStream<'static, Result<Delivery, BrokerError>>,
    alive: Box<dyn Fn() -> bool + Send + Sync>,
    closer: Option<Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>>,
}

impl Deliveries {
    pub fn new(
        inner: BoxStream<'static, Result<Delivery, BrokerError>>,
        alive: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Self { inner, alive: Box::new(alive), closer: None }
    }

    /// Sets what [`Deliveries::close`] awaits.
    pub fn with_closer(
        mut self,
        closer: impl FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        self.closer = Some(Box::new(closer));
        self
    }

    /// Closes the consumer and waits until the broker has settled everything sent on it before
    /// (acks, requeues), so what follows sees their effect.
    pub async fn close(mut self) {
        if let Some(closer) = self.closer.take() {
            closer().await;
        }
    }

    /// Whether the consumer's channel is still open. A consumer whose channel closed without its
    /// stream noticing would otherwise wait forever.
    pub fn is_alive(&self) -> bool {
        (self.alive)()
    }
}

impl futures::Stream for Deliveries {
    type Item = Result<Delivery, BrokerError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// Dead letters taken from the head of the dead-letter queue and held, unsettled, by this reader
/// alone (see [`Broker::fetch_dead_letters`]).
pub struct HeldLetters {
    /// Oldest first. Acknowledge the ones dealt with; leave the others.
    pub messages: Vec<Delivery>,
    release: Option<Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>>,
}

impl HeldLetters {
    pub fn new(
        messages: Vec<Delivery>,
        release: impl FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        Self { messages, release: Some(Box::new(release)) }
    }

    /// Hands every message not acknowledged back to the head of the queue, in their order, and
    /// waits until the broker has done so (and settled what was acknowledged before). Dropping
    /// the batch hands them back too, without waiting.
    pub async fn release(mut self) {
        drop(std::mem::take(&mut self.messages));
        if let Some(release) = self.release.take() {
            release().await;
        }
    }
}

impl std::fmt::Debug for HeldLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLetters").field("messages", &self.messages).finish()
    }
}

/// The delays a retry can wait, rounded up to one of these (RabbitMQ holds one delay queue each).
pub const RETRY_DELAYS: [std::time::Duration; 6] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(5),
    std::time::Duration::from_secs(30),
    std::time::Duration::from_secs(120),
    std::time::Duration::from_secs(600),
    std::time::Duration::from_secs(3600),
];

/// The delay actually used for a requested one: the smallest step at least as long, capped at
/// the longest.
pub fn delay_step(wanted: std::time::Duration) -> std::time::Duration {
    RETRY_DELAYS.into_iter().find(|d| *d >= wanted).unwrap_or(RETRY_DELAYS[RETRY_DELAYS.len() - 1])
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Declares whatever the given models' queues need. Idempotent.
    async fn declare(&self, models: &[ModelName]) -> Result<(), BrokerError>;

    /// Publishes one persistent message to the lane's queue, making the queue first if it is a
    /// tenant's lane this broker has not published to yet, and returns only once the broker has
    /// confirmed it durably enqueued.
    async fn publish(&self, lane: &Lane, body: Vec<u8>) -> Result<(), BrokerError>;

    /// Publishes like [`Broker::publish`], delivered only after `delay` (rounded up by
    /// [`delay_step`]); for retries with backoff.
    async fn publish_delayed(&self, lane: &Lane, body: Vec<u8>, delay: std::time::Duration) -> Result<(), BrokerError>;

    /// Starts consuming the lane's queue (making it if need be) with at most `prefetch`
    /// unacknowledged deliveries.
    async fn consume(&self, lane: &Lane, prefetch: u16) -> Result<Deliveries, BrokerError>;

    /// Publishes one message, durably and confirmed, to the dead-letter queue.
    async fn dead_letter(&self, body: Vec<u8>) -> Result<(), BrokerError>;

    /// Consumes the dead-letter queue. Settling nothing and dropping the consumer hands its
    /// messages back, but not necessarily in their order: to read the queue, use
    /// [`Broker::fetch_dead_letters`].
    async fn consume_dead_letters(&self, prefetch: u16) -> Result<Deliveries, BrokerError>;

    /// Takes up to `limit` messages from the head of the dead-letter queue, oldest first, and
    /// holds them unsettled for this caller alone (two readers at once see different letters).
    /// [`HeldLetters::release`] hands back, to the head and in their order, whatever was not
    /// acknowledged: a read that acknowledges nothing leaves the queue as it was. RabbitMQ counts
    /// the hand-back as a delivery; the dead-letter queue's limit (2^31 - 1) makes that harmless.
    async fn fetch_dead_letters(&self, limit: u32) -> Result<HeldLetters, BrokerError>;

    /// Messages waiting in the dead-letter queue.
    async fn dead_letter_count(&self) -> Result<u32, BrokerError>;

    /// Cheap liveness check of the connection, for readiness probes.
    async fn check(&self) -> Result<(), BrokerError>;

    /// Human-readable kind for logs ("rabbitmq", "embedded").
    fn kind(&self) -> &'static str;
}
