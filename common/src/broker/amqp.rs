//! RabbitMQ through lapin. This file owns the topology — one durable direct exchange, one durable
//! quorum queue per model bound by the model name, a dead-letter quorum queue, and one delay queue
//! per retry step that dead-letters back into the job exchange when its TTL runs out — confirmed
//! persistent publishing over a shared channel, consumers on channels of their own, and
//! reconnecting when the connection drops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use kiln_proto::ModelName;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{Acknowledge, Broker, BrokerError, Deliveries, Delivery, RETRY_DELAYS, delay_step};
use crate::config::Secret;

/// Names of the exchanges and queues, under a prefix so that tests and deployments can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn queue(&self, model: &ModelName) -> String {
        format!("{}.jobs.{model}", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// The exchange and queue (same name) of one retry delay step.
    pub fn delay(&self, step: Duration) -> String {
        format!("{}.delay.{}ms", self.prefix, step.as_millis())
    }

    fn quorum() -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args
    }

    async fn declare(&self, ch: &Channel, models: &[ModelName]) -> Result<(), lapin::Error> {
        let durable_x = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(self.exchange().into(), ExchangeKind::Direct, durable_x, FieldTable::default()).await?;
        ch.queue_declare(self.dead_letter_queue().into(), durable_q, Self::quorum()).await?;
        for step in RETRY_DELAYS {
            let name = self.delay(step);
            ch.exchange_declare(name.as_str().into(), ExchangeKind::Fanout, durable_x, FieldTable::default()).await?;
            // Classic queue: per-queue TTL and dead-lettering back to the job exchange, which
            // routes by the message's own routing key, the model name.
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(step.as_millis() as i64));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.exchange().into()));
            ch.queue_declare(name.as_str().into(), durable_q, args).await?;
            ch.queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        for model in models {
            ch.queue_declare(self.queue(model).into(), durable_q, Self::quorum()).await?;
            ch.queue_bind(
                self.queue(model).into(),
                self.exchange().into(),
                model.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub url: Secret,
    pub topology: Topology,
    /// Bound on establishing a connection; past it the caller gets `Unavailable`.
    pub connect_timeout: Duration,
    /// Bound on waiting for a publisher confirm.
    pub confirm_timeout: Duration,
    /// After a failed connection attempt, calls fail fast for this long instead of each dialling again.
    pub retry_interval: Duration,
}

pub struct AmqpBroker {
    config: AmqpConfig,
    link: Mutex<Link>,
    /// The open publisher channel, read without the async lock on every publish; the lock is
    /// only taken to (re)connect.
    fast: std::sync::Mutex<Option<Channel>>,
}

#[derive(Default)]
struct Link {
    connection: Option<Arc<Connection>>,
    publisher: Option<Channel>,
    declared: Vec<ModelName>,
    last_failure: Option<(Instant, String)>,
}

impl AmqpBroker {
    /// Creates the broker without connecting: the first use (or [`Broker::check`]) connects, so a
    /// process can start while RabbitMQ is still down.
    pub fn new(config: AmqpConfig) -> Self {
        Self { config, link: Mutex::new(Link::default()), fast: std::sync::Mutex::new(None) }
    }

    async fn connection(&self, link: &mut Link) -> Result<Arc<Connection>, BrokerError> {
        if let Some(conn) = &link.connection
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        link.connection = None;
        link.publisher = None;
        *self.fast.lock().expect("publisher lock") = None;
        if let Some((at, why)) = &link.last_failure
            && at.elapsed() < self.config.retry_interval
        {
            return Err(BrokerError::Unavailable(why.clone()));
        }
        let attempt = tokio::time::timeout(
            self.config.connect_timeout,
            Connection::connect(self.config.url.expose(), ConnectionProperties::default()),
        )
        .await;
        let why = match attempt {
            Ok(Ok(conn)) => {
                link.last_failure = None;
                tracing::info!(target: "kiln::broker", "connected to RabbitMQ");
                let conn = Arc::new(conn);
                link.connection = Some(conn.clone());
                return Ok(conn);
            }
            Ok(Err(e)) => format!("cannot connect to RabbitMQ: {e}"),
            Err(_) => format!("cannot connect to RabbitMQ within {:?}", self.config.connect_timeout),
        };
        tracing::warn!(target: "kiln::broker", %why, "RabbitMQ unavailable");
        link.last_failure = Some((Instant::now(), why.clone()));
        Err(BrokerError::Unavailable(why))
    }

    async fn publisher(&self) -> Result<Channel, BrokerError> {
        if let Some(ch) = self.fast.lock().expect("publisher lock").as_ref().filter(|ch| ch.status().connected()) {
            return Ok(ch.clone());
        }
        let mut link = self.link.lock().await;
        if let Some(ch) = &link.publisher
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let conn = self.connection(&mut link).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        self.config.topology.declare(&ch, &link.declared).await?;
        link.publisher = Some(ch.clone());
        *self.fast.lock().expect("publisher lock") = Some(ch.clone());
        Ok(ch)
    }

    /// Forgets a channel that failed so the next call opens a fresh one.
    async fn discard_publisher(&self, ch: &Channel) {
        let mut link = self.link.lock().await;
        if link.publisher.as_ref().is_some_and(|p| p.id() == ch.id()) {
            link.publisher = None;
            *self.fast.lock().expect("publisher lock") = None;
        }
    }

    /// One persistent, mandatory, confirmed publish.
    async fn confirmed(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<(), BrokerError> {
        let ch = self.publisher().await?;
        let mut props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        // The W3C trace context of the publishing span, for the consumer to continue the trace.
        if let Some(tp) = crate::telemetry::current_traceparent() {
            let mut headers = FieldTable::default();
            headers.insert("traceparent".into(), AMQPValue::LongString(tp.into()));
            props = props.with_headers(headers);
        }
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = async { ch.basic_publish(exchange.into(), routing_key.into(), opts, body, props).await?.await };
        let outcome = match tokio::time::timeout(self.config.confirm_timeout, confirm).await {
            Err(_) => Err(BrokerError::ConfirmTimeout(self.config.confirm_timeout)),
            Ok(Err(e)) => Err(BrokerError::Amqp(e)),
            Ok(Ok(Confirmation::Ack(None))) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                return Err(BrokerError::Rejected(format!("unroutable: {}", returned.reply_text)));
            }
            Ok(Ok(Confirmation::Nack(_))) => return Err(BrokerError::Rejected("negative confirm".into())),
            Ok(Ok(Confirmation::NotRequested)) => Err(BrokerError::Rejected("channel is not in confirm mode".into())),
        };
        self.discard_publisher(&ch).await;
        outcome
    }

    async fn consume_queue(
        &self,
        queue: String,
        prefetch: u16,
        declare: &[ModelName],
    ) -> Result<Deliveries, BrokerError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let ch = conn.create_channel().await?;
        self.config.topology.declare(&ch, declare).await?;
        ch.basic_qos(prefetch, BasicQosOptions { global: false }).await?;
        let consumer =
            ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
        let guard = Arc::new(ChannelGuard(ch));
        let alive = guard.clone();
        let stream = consumer.map(move |d| {
            let _keep = &guard;
            d.map_err(BrokerError::from).map(|d| {
                let traceparent = traceparent(&d.properties);
                Delivery::new(d.data, d.redelivered, Box::new(AmqpAcker(d.acker))).with_traceparent(traceparent)
            })
        });
        let closing = alive.clone();
        Ok(Deliveries::new(stream.boxed(), move || alive.0.status().connected()).with_closer(move || {
            Box::pin(async move {
                // Close-Ok comes after the broker has handled everything sent before on the channel.
                let _ = closing.0.close(200, "consumer closed".into()).await;
            })
        }))
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare(&self, models: &[ModelName]) -> Result<(), BrokerError> {
        {
            let mut link = self.link.lock().await;
            for m in models {
                if !link.declared.contains(m) {
                    link.declared.push(m.clone());
                }
            }
            // Declared on the next (re)connect if the current channel predates these models.
            link.publisher = None;
            *self.fast.lock().expect("publisher lock") = None;
        }
        self.publisher().await.map(drop)
    }

    async fn publish(&self, model: &ModelName, body: Vec<u8>) -> Result<(), BrokerError> {
        self.confirmed(&self.config.topology.exchange(), model.as_str(), &body).await
    }

    async fn publish_delayed(&self, model: &ModelName, body: Vec<u8>, delay: Duration) -> Result<(), BrokerError> {
        self.confirmed(&self.config.topology.delay(delay_step(delay)), model.as_str(), &body).await
    }

    async fn consume(&self, model: &ModelName, prefetch: u16) -> Result<Deliveries, BrokerError> {
        self.consume_queue(self.config.topology.queue(model), prefetch, std::slice::from_ref(model)).await
    }

    async fn dead_letter(&self, body: Vec<u8>) -> Result<(), BrokerError> {
        self.confirmed("", &self.config.topology.dead_letter_queue(), &body).await
    }

    async fn consume_dead_letters(&self, prefetch: u16) -> Result<Deliveries, BrokerError> {
        self.consume_queue(self.config.topology.dead_letter_queue(), prefetch, &[]).await
    }

    async fn dead_letter_count(&self) -> Result<u32, BrokerError> {
        let ch = self.publisher().await?;
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(self.config.topology.dead_letter_queue().into(), opts, FieldTable::default()).await?;
        Ok(q.message_count())
    }

    async fn check(&self) -> Result<(), BrokerError> {
        self.publisher().await.map(drop)
    }

    fn kind(&self) -> &'static str {
        "rabbitmq"
    }
}

fn traceparent(props: &BasicProperties) -> Option<String> {
    match props.headers().as_ref()?.inner().get("traceparent")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Closes a consumer's channel when its stream is dropped, so the broker redelivers what it held.
struct ChannelGuard(Channel);

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let ch = self.0.clone();
        if ch.status().connected()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                let _ = ch.close(200, "consumer dropped".into()).await;
            });
        }
    }
}

struct AmqpAcker(lapin::Acker);

#[async_trait]
impl Acknowledge for AmqpAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.0.ack(BasicAckOptions::default()).await.map(drop).map_err(Into::into)
    }

    async fn nack(&self, requeue: bool) -> Result<(), BrokerError> {
        self.0.nack(BasicNackOptions { requeue, multiple: false }).await.map(drop).map_err(Into::into)
    }
}
