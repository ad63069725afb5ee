//! RabbitMQ through lapin. This file owns the topology (one durable direct exchange, one durable
//! quorum queue per model, bound by the model name), confirmed persistent publishing over a shared
//! channel, consumers on channels of their own, and reconnecting when the connection drops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use kiln_proto::ModelName;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use super::{Acknowledge, Broker, BrokerError, Deliveries, Delivery};
use crate::config::Secret;

/// Names of the exchange and queues, under a prefix so that tests and deployments can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn queue(&self, model: &ModelName) -> String {
        format!("{}.jobs.{model}", self.prefix)
    }

    async fn declare(&self, ch: &Channel, models: &[ModelName]) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            self.exchange().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        for model in models {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            let opts = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(self.queue(model).into(), opts, args)
                .await?;
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
        Self {
            config,
            link: Mutex::new(Link::default()),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.config.topology
    }

    async fn connection(&self, link: &mut Link) -> Result<Arc<Connection>, BrokerError> {
        if let Some(conn) = &link.connection
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        link.connection = None;
        link.publisher = None;
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
        let result = match attempt {
            Ok(Ok(conn)) => Ok(Arc::new(conn)),
            Ok(Err(e)) => Err(format!("cannot connect to RabbitMQ: {e}")),
            Err(_) => Err(format!(
                "cannot connect to RabbitMQ within {:?}",
                self.config.connect_timeout
            )),
        };
        match result {
            Ok(conn) => {
                link.last_failure = None;
                tracing::info!(target: "kiln::broker", "connected to RabbitMQ");
                link.connection = Some(conn.clone());
                Ok(conn)
            }
            Err(why) => {
                tracing::warn!(target: "kiln::broker", %why, "RabbitMQ unavailable");
                link.last_failure = Some((Instant::now(), why.clone()));
                Err(BrokerError::Unavailable(why))
            }
        }
    }

    async fn publisher(&self) -> Result<Channel, BrokerError> {
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
        Ok(ch)
    }

    /// Forgets a channel that failed so the next call opens a fresh one.
    async fn discard_publisher(&self, ch: &Channel) {
        let mut link = self.link.lock().await;
        if link.publisher.as_ref().is_some_and(|p| p.id() == ch.id()) {
            link.publisher = None;
        }
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
        }
        self.publisher().await.map(drop)
    }

    async fn publish(&self, model: &ModelName, body: Vec<u8>) -> Result<(), BrokerError> {
        let ch = self.publisher().await?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let opts = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let exchange = self.config.topology.exchange();
        let confirm = async {
            ch.basic_publish(exchange.into(), model.as_str().into(), opts, &body, props)
                .await?
                .await
        };
        let outcome = match tokio::time::timeout(self.config.confirm_timeout, confirm).await {
            Err(_) => Err(BrokerError::ConfirmTimeout(self.config.confirm_timeout)),
            Ok(Err(e)) => Err(BrokerError::Amqp(e)),
            Ok(Ok(Confirmation::Ack(None))) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                return Err(BrokerError::Rejected(format!(
                    "unroutable: {}",
                    returned.reply_text
                )));
            }
            Ok(Ok(Confirmation::Nack(_))) => {
                return Err(BrokerError::Rejected("negative confirm".into()));
            }
            Ok(Ok(Confirmation::NotRequested)) => Err(BrokerError::Rejected(
                "channel is not in confirm mode".into(),
            )),
        };
        self.discard_publisher(&ch).await;
        outcome
    }

    async fn consume(&self, model: &ModelName, prefetch: u16) -> Result<Deliveries, BrokerError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let ch = conn.create_channel().await?;
        self.config
            .topology
            .declare(&ch, std::slice::from_ref(model))
            .await?;
        ch.basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = ch
            .basic_consume(
                self.config.topology.queue(model).into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let guard = Arc::new(ChannelGuard(ch));
        Ok(consumer
            .map(move |d| {
                let _keep = &guard;
                d.map_err(BrokerError::from).map(|d| {
                    let redelivered = d.redelivered;
                    Delivery::new(d.data, redelivered, Box::new(AmqpAcker(d.acker)))
                })
            })
            .boxed())
    }

    async fn check(&self) -> Result<(), BrokerError> {
        self.publisher().await.map(drop)
    }

    fn kind(&self) -> &'static str {
        "rabbitmq"
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
        self.0
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(Into::into)
    }

    async fn nack(&self, requeue: bool) -> Result<(), BrokerError> {
        self.0
            .nack(BasicNackOptions {
                requeue,
                multiple: false,
            })
            .await
            .map(drop)
            .map_err(Into::into)
    }
}
