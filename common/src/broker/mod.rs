//! The broker abstraction: durable, confirmed publishing of job envelopes to a per-model queue, and
//! consuming them with a bounded prefetch and explicit acknowledgement. Implementations: RabbitMQ
//! ([`amqp`]) and the in-process [`embedded`] broker with the same delivery semantics.

pub mod amqp;
pub mod embedded;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_proto::ModelName;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached or the connection is down; retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message (negative confirm, unroutable, queue full).
    #[error("broker rejected the message: {0}")]
    Rejected(String),
    /// No confirm arrived in time; the message may or may not be enqueued.
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
}

/// A message taken from a queue, to be acknowledged once its effects are stored.
pub struct Delivery {
    pub body: Vec<u8>,
    /// Set when the message was delivered before and not acknowledged.
    pub redelivered: bool,
    /// The W3C trace context the message was published under, if any.
    pub traceparent: Option<String>,
    acker: Box<dyn Acknowledge>,
}

impl Delivery {
    pub fn new(body: Vec<u8>, redelivered: bool, acker: Box<dyn Acknowledge>) -> Self {
        Self { body, redelivered, traceparent: None, acker }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
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

    /// Drops the message (dead-lettered where the queue has a dead-letter target).
    pub async fn reject(self) -> Result<(), BrokerError> {
        self.acker.nack(false).await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("len", &self.body.len()).field("redelivered", &self.redelivered).finish()
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

    /// Publishes one persistent message to the model's queue and returns only once the broker has
    /// confirmed it durably enqueued.
    async fn publish(&self, model: &ModelName, body: Vec<u8>) -> Result<(), BrokerError>;

    /// Publishes like [`Broker::publish`], delivered only after `delay` (rounded up by
    /// [`delay_step`]); for retries with backoff.
    async fn publish_delayed(
        &self,
        model: &ModelName,
        body: Vec<u8>,
        delay: std::time::Duration,
    ) -> Result<(), BrokerError>;

    /// Starts consuming the model's queue with at most `prefetch` unacknowledged deliveries.
    async fn consume(&self, model: &ModelName, prefetch: u16) -> Result<Deliveries, BrokerError>;

    /// Publishes one message, durably and confirmed, to the dead-letter queue.
    async fn dead_letter(&self, body: Vec<u8>) -> Result<(), BrokerError>;

    /// Consumes the dead-letter queue, for listing (settle nothing and drop) and redriving.
    async fn consume_dead_letters(&self, prefetch: u16) -> Result<Deliveries, BrokerError>;

    /// Messages waiting in the dead-letter queue.
    async fn dead_letter_count(&self) -> Result<u32, BrokerError>;

    /// Cheap liveness check of the connection, for readiness probes.
    async fn check(&self) -> Result<(), BrokerError>;

    /// Human-readable kind for logs ("rabbitmq", "embedded").
    fn kind(&self) -> &'static str;
}
