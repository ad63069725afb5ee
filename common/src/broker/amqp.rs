//! RabbitMQ through lapin. This file owns the topology — which exchanges and queues exist, with
//! which arguments — confirmed persistent publishing over a shared channel, consumers on channels
//! of their own, reading the dead-letter queue, and reconnecting when the connection drops.
//!
//! The topology, under a prefix `P`; every queue is a durable quorum queue, and every dead-letter
//! route is at-least-once (`x-dead-letter-strategy: at-least-once`, which RabbitMQ only honours
//! with `x-overflow: reject-publish`; without it, dead-lettering is at-most-once and a message is
//! lost if the target does not take it), so the broker drops nothing on its own:
//! - `P.jobs`, a direct exchange; each [`Lane`] of a model a queue bound to it by the lane's key:
//!   `P.jobs.<model>` (the shared lane) by the model name, `P.jobs.<model>@<tenant>` by
//!   `<model>@<tenant>`, made by the first publish or consume of this process that uses it. Each
//!   has
//!   `x-delivery-limit` [`DELIVERY_LIMIT`] (explicit: RabbitMQ 4 defaults to 20 and then deletes
//!   the message) and over-limit or rejected messages dead-lettered to `P.dlq` through the default
//!   exchange. They arrive there as the raw envelope with RabbitMQ's `x-death` header.
//! - `P.dlq`, the dead-letter queue: Kiln's own [`kiln_proto::DeadLetter`]s and RabbitMQ's raw
//!   ones. `x-delivery-limit` 2^31 - 1, never reached: reading it ([`Broker::fetch_dead_letters`],
//!   get without ack, then close the channel) counts as a delivery. Not "no limit": RabbitMQ 3.x
//!   takes `-1` (4.x's spelling of unlimited) and deletes the message at its first return, and no
//!   argument at all means 20 on 4.x. A finite limit also keeps requeued messages at the head of
//!   the queue (without one, RabbitMQ requeues to the back: seen on 3.10, documented since), and
//!   it means the same on every version, so upgrading RabbitMQ never changes the declaration.
//! - `P.retry.<ms>ms`, one fanout exchange and quorum queue per retry step, `x-message-ttl` the
//!   step (quorum queues expire messages since RabbitMQ 3.10), dead-lettering back into `P.jobs`
//!   with the message's own routing key: a retry comes back to the lane it left.
//!
//! Queues that exist keep the arguments they were declared with; RabbitMQ refuses a redeclare
//! with others (`PRECONDITION_FAILED`). Deployments from before this topology have `P.jobs.<model>`
//! and `P.dlq` without these arguments, and classic delay queues `P.delay.<ms>ms`:
//! - The delay steps have new names (a queue cannot change type). Old processes keep using the
//!   old ones during a rolling upgrade; those queues empty themselves into `P.jobs` within an hour
//!   (the longest step) and can then be deleted.
//! - `P.jobs.<model>` and `P.dlq` keep their names (dashboards, alerts and autoscalers watch them).
//!   When RabbitMQ refuses the new arguments, the existing queue is used as it is and a warning
//!   names it ([`AmqpBroker::legacy_queues`]). Such a queue has the old behaviour — on RabbitMQ 4,
//!   20 deliveries and then deletion — until a policy gives it the same settings (`delivery-limit`,
//!   `dead-letter-exchange`, `dead-letter-routing-key`, `dead-letter-strategy`, `overflow`; see
//!   the README), or until it is deleted while empty and declared again by the next process.
//! - Policies combine with arguments: RabbitMQ uses the lower of a policy's `delivery-limit` and
//!   the argument, so a policy can lower Kiln's limits but not raise them.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use kiln_proto::ModelName;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tokio::sync::Mutex;

use super::{
    Acknowledge, Broker, BrokerError, DELIVERY_LIMIT, Death, DeathReason, Deliveries, Delivery, HeldLetters, Lane,
    RETRY_DELAYS, delay_step,
};
use crate::config::Secret;
use crate::tls::ClientTls;

/// The dead-letter queue's delivery limit: as good as none (see the module header).
pub const DEAD_LETTER_DELIVERY_LIMIT: i32 = i32::MAX;

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

    /// The queue of a model's shared lane.
    pub fn queue(&self, model: &ModelName) -> String {
        self.lane_queue(&Lane::shared(model.clone()))
    }

    pub fn lane_queue(&self, lane: &Lane) -> String {
        format!("{}.jobs.{}", self.prefix, lane.key())
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// The exchange and queue (same name) of one retry delay step.
    pub fn delay(&self, step: Duration) -> String {
        format!("{}.retry.{}ms", self.prefix, step.as_millis())
    }

    /// The arguments of every model's job queue.
    pub fn job_queue_arguments(&self) -> FieldTable {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(DELIVERY_LIMIT as i32));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.dead_letter_queue().into()));
        at_least_once(&mut args);
        args
    }

    /// The arguments of the dead-letter queue.
    pub fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(DEAD_LETTER_DELIVERY_LIMIT));
        args
    }

    /// The arguments of one retry step's delay queue.
    pub fn delay_queue_arguments(&self, step: Duration) -> FieldTable {
        let mut args = quorum();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(step.as_millis() as i64));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.exchange().into()));
        at_least_once(&mut args);
        args
    }

    /// Declares everything on a channel of its own (a refused declare closes its channel).
    /// Returns the queues that exist with other arguments and are used as they are; those in
    /// `known` are only checked for, not declared again.
    async fn declare(
        &self,
        conn: &Connection,
        models: &[ModelName],
        known: &BTreeSet<String>,
    ) -> Result<Vec<String>, lapin::Error> {
        let durable_x = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let mut ch = conn.create_channel().await?;
        let mut legacy = Vec::new();
        ch.exchange_declare(self.exchange().into(), ExchangeKind::Direct, durable_x, FieldTable::default()).await?;
        let dlq = self.dead_letter_queue();
        if !declare_queue(conn, &mut ch, &dlq, self.dead_letter_queue_arguments(), known).await? {
            legacy.push(dlq);
        }
        for step in RETRY_DELAYS {
            let name = self.delay(step);
            ch.exchange_declare(name.as_str().into(), ExchangeKind::Fanout, durable_x, FieldTable::default()).await?;
            if !declare_queue(conn, &mut ch, &name, self.delay_queue_arguments(step), known).await? {
                legacy.push(name.clone());
            }
            ch.queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let lanes: Vec<Lane> = models.iter().cloned().map(Lane::shared).collect();
        legacy.extend(self.declare_lanes(conn, &mut ch, &lanes, known).await?);
        let _ = ch.close(200, "declared".into()).await;
        Ok(legacy)
    }

    /// Declares the lanes' queues and binds them (the exchange exists). Returns those that exist
    /// with other arguments.
    async fn declare_lanes(
        &self,
        conn: &Connection,
        ch: &mut Channel,
        lanes: &[Lane],
        known: &BTreeSet<String>,
    ) -> Result<Vec<String>, lapin::Error> {
        let mut legacy = Vec::new();
        for lane in lanes {
            let name = self.lane_queue(lane);
            if !declare_queue(conn, ch, &name, self.job_queue_arguments(), known).await? {
                legacy.push(name.clone());
            }
            ch.queue_bind(
                name.as_str().into(),
                self.exchange().into(),
                lane.key().as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(legacy)
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

/// At-least-once dead-lettering, and the overflow behaviour RabbitMQ requires for it (with no
/// length limit set, `reject-publish` changes nothing else).
fn at_least_once(args: &mut FieldTable) {
    args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
}

/// Declares a durable queue with `args`. When RabbitMQ refuses because the queue exists with other
/// arguments, checks on a fresh channel that it exists and returns `false`: it is used as it is.
/// A queue in `known` was found so before, and is only checked for.
async fn declare_queue(
    conn: &Connection,
    ch: &mut Channel,
    name: &str,
    args: FieldTable,
    known: &BTreeSet<String>,
) -> Result<bool, lapin::Error> {
    if known.contains(name) {
        return check_queue(ch, name).await.map(|()| false);
    }
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    match ch.queue_declare(name.into(), durable, args).await {
        Ok(_) => Ok(true),
        Err(e) if is_precondition_failed(&e) => {
            *ch = conn.create_channel().await?;
            check_queue(ch, name).await?;
            tracing::debug!(target: "kiln::broker", queue = name, error = %e, "queue exists with other arguments");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Checks that a queue exists, whatever its arguments.
async fn check_queue(ch: &Channel, name: &str) -> Result<(), lapin::Error> {
    let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    ch.queue_declare(name.into(), passive, FieldTable::default()).await.map(drop)
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
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
    /// How an `amqps://` server is verified.
    pub tls: ClientTls,
}

pub struct AmqpBroker {
    config: AmqpConfig,
    link: Mutex<Link>,
    /// The open publisher channel, read without the async lock on every publish; the lock is
    /// only taken to (re)connect.
    fast: std::sync::Mutex<Option<Channel>>,
    /// Queues found with other arguments than this topology's, used as they are.
    legacy: std::sync::Mutex<BTreeSet<String>>,
    /// Tenants' lanes this process declared; a publish to one of them declares nothing.
    lanes: std::sync::Mutex<HashSet<Lane>>,
    /// Held while a lane is declared: a burst of first publishes to a new lane declares it once,
    /// and none of them publishes before the declaration is done.
    declaring: Mutex<()>,
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
            fast: std::sync::Mutex::new(None),
            legacy: std::sync::Mutex::new(BTreeSet::new()),
            lanes: std::sync::Mutex::new(HashSet::new()),
            declaring: Mutex::new(()),
        }
    }

    /// The queues this broker found declared with other arguments than its topology's (from
    /// before it, see the module header) and uses as they are: they lack its dead-lettering and
    /// delivery limits until a policy or a redeclare gives them those.
    pub fn legacy_queues(&self) -> Vec<String> {
        self.legacy.lock().expect("legacy lock").iter().cloned().collect()
    }

    /// Declares the topology for `models`, warning once per process about each queue that has
    /// other arguments.
    async fn declare_topology(&self, conn: &Connection, models: &[ModelName]) -> Result<(), BrokerError> {
        let known = self.legacy.lock().expect("legacy lock").clone();
        let found = self.config.topology.declare(conn, models, &known).await?;
        self.found_legacy(found);
        Ok(())
    }

    /// Makes a tenant's lane the first time this process uses it (the shared lanes are part of
    /// the topology).
    async fn ensure_lane(&self, lane: &Lane) -> Result<(), BrokerError> {
        let known = || lane.tenant().is_none() || self.lanes.lock().expect("lanes lock").contains(lane);
        if known() {
            return Ok(());
        }
        let _declaring = self.declaring.lock().await;
        if known() {
            return Ok(());
        }
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let legacy = self.legacy.lock().expect("legacy lock").clone();
        let mut ch = conn.create_channel().await?;
        // The exchange the lane is bound to (the rest of the topology is not the lane's).
        let durable_x = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let exchange = self.config.topology.exchange();
        ch.exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, durable_x, FieldTable::default()).await?;
        let found = self.config.topology.declare_lanes(&conn, &mut ch, std::slice::from_ref(lane), &legacy).await?;
        let _ = ch.close(200, "declared".into()).await;
        self.found_legacy(found);
        self.lanes.lock().expect("lanes lock").insert(lane.clone());
        Ok(())
    }

    /// Publishes to a lane's queue through `exchange`. A tenant's lane whose queue is gone
    /// (deleted since this process made it: the publish comes back unroutable) is made again,
    /// once.
    async fn publish_to(&self, exchange: &str, lane: &Lane, body: &[u8]) -> Result<(), BrokerError> {
        self.ensure_lane(lane).await?;
        let key = lane.key();
        match self.confirmed(exchange, &key, body).await {
            Err(BrokerError::Unroutable(_)) if lane.tenant().is_some() => {
                self.lanes.lock().expect("lanes lock").remove(lane);
                self.ensure_lane(lane).await?;
                self.confirmed(exchange, &key, body).await
            }
            other => other,
        }
    }

    /// Warns once per process about each queue that has other arguments.
    fn found_legacy(&self, found: Vec<String>) {
        let mut legacy = self.legacy.lock().expect("legacy lock");
        for queue in found {
            if legacy.insert(queue.clone()) {
                tracing::warn!(
                    target: "kiln::broker",
                    %queue,
                    "queue exists with the arguments of an older Kiln and is used as it is: without a policy \
                     it has no dead-letter target or an unsuitable delivery limit (RabbitMQ 4 deletes a message \
                     after 20 deliveries); see the README on migrating queues"
                );
            }
        }
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
        let runtime = lapin::runtime::default_runtime()?;
        let attempt = tokio::time::timeout(
            self.config.connect_timeout,
            Connection::connect_with_config(
                self.config.url.expose(),
                ConnectionProperties::default(),
                self.config.tls.amqp(),
                runtime,
            ),
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
        self.declare_topology(&conn, &link.declared).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
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
                return Err(BrokerError::Unroutable(returned.reply_text.to_string()));
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
        declare: Option<&[ModelName]>,
    ) -> Result<Deliveries, BrokerError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        if let Some(models) = declare {
            self.declare_topology(&conn, models).await?;
        }
        let ch = conn.create_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions { global: false }).await?;
        let consumer =
            ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
        let guard = Arc::new(ChannelGuard(ch));
        let alive = guard.clone();
        let stream = consumer.map(move |d| {
            let _keep = &guard;
            d.map_err(BrokerError::from).map(delivery)
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

    async fn publish(&self, lane: &Lane, body: Vec<u8>) -> Result<(), BrokerError> {
        self.publish_to(&self.config.topology.exchange(), lane, &body).await
    }

    async fn publish_delayed(&self, lane: &Lane, body: Vec<u8>, delay: Duration) -> Result<(), BrokerError> {
        // Unroutable here means only that the delay queue is missing; the lane is checked for on
        // the way back, when the message leaves the delay queue.
        self.ensure_lane(lane).await?;
        self.confirmed(&self.config.topology.delay(delay_step(delay)), &lane.key(), &body).await
    }

    async fn consume(&self, lane: &Lane, prefetch: u16) -> Result<Deliveries, BrokerError> {
        let queue = self.config.topology.lane_queue(lane);
        match lane.tenant() {
            None => self.consume_queue(queue, prefetch, Some(std::slice::from_ref(lane.model()))).await,
            // Made (with the topology) by this process once: a worker starting on a model of
            // many tenants declares each lane, not the whole topology again per lane.
            Some(_) => {
                self.ensure_lane(lane).await?;
                self.consume_queue(queue, prefetch, None).await
            }
        }
    }

    async fn dead_letter(&self, body: Vec<u8>) -> Result<(), BrokerError> {
        self.confirmed("", &self.config.topology.dead_letter_queue(), &body).await
    }

    async fn consume_dead_letters(&self, prefetch: u16) -> Result<Deliveries, BrokerError> {
        self.consume_queue(self.config.topology.dead_letter_queue(), prefetch, Some(&[])).await
    }

    async fn fetch_dead_letters(&self, limit: u32) -> Result<HeldLetters, BrokerError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        self.declare_topology(&conn, &[]).await?;
        // A channel of its own, closed when it is let go (even on an error here), which hands back
        // what it still holds; nothing else ever runs on it.
        let guard = ChannelGuard(conn.create_channel().await?);
        let queue = self.config.topology.dead_letter_queue();
        let mut messages = Vec::new();
        while (messages.len() as u64) < u64::from(limit) {
            let get = guard.0.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await?;
            let Some(got) = get else { break };
            messages.push(delivery(got.delivery));
            if got.message_count == 0 {
                break;
            }
        }
        let held = !messages.is_empty();
        Ok(HeldLetters::new(messages, move || {
            Box::pin(async move {
                // Every unacknowledged delivery back, in delivery order, by one explicit nack sent
                // before the close, rather than left to the queue noticing that the channel went
                // (and RabbitMQ 4.3+ does not count a nack as a failed delivery). Close-Ok comes
                // after the channel has handled what was sent before it.
                if held {
                    let _ = guard.0.basic_nack(0, BasicNackOptions { multiple: true, requeue: true }).await;
                }
                let _ = guard.0.close(200, "dead letters read".into()).await;
            })
        }))
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

fn delivery(d: lapin::message::Delivery) -> Delivery {
    let (traceparent, death) = (traceparent(&d.properties), death(&d.properties));
    Delivery::new(d.data, d.redelivered, Box::new(AmqpAcker(d.acker))).with_traceparent(traceparent).with_death(death)
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn traceparent(props: &BasicProperties) -> Option<String> {
    text(props.headers().as_ref()?.inner().get("traceparent")?)
}

/// The latest entry of RabbitMQ's `x-death` header (it keeps the most recent first).
fn death(props: &BasicProperties) -> Option<Death> {
    let AMQPValue::FieldArray(deaths) = props.headers().as_ref()?.inner().get("x-death")? else { return None };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else { return None };
    let entry = latest.inner();
    let count = match entry.get("count") {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        _ => 1,
    };
    let at = match entry.get("time") {
        Some(AMQPValue::Timestamp(secs)) => i64::try_from(*secs).ok().map(|s| s.saturating_mul(1000)),
        _ => None,
    };
    Some(Death {
        reason: DeathReason::parse(&entry.get("reason").and_then(text)?),
        queue: entry.get("queue").and_then(text).unwrap_or_default(),
        count,
        at,
    })
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
