//! The in-process broker of `kiln dev`: a FIFO queue per [`Lane`] with the delivery semantics workers rely
//! on from RabbitMQ — bounded prefetch per consumer, explicit ack, nack with or without requeue, and
//! redelivery (flagged `redelivered`) of everything a consumer held when it went away — and the
//! dead-lettering RabbitMQ's queues are declared with: a job message rejected, or returned more
//! than [`DELIVERY_LIMIT`] times, moves to the dead-letter queue with a [`Death`]; the dead-letter
//! queue keeps whatever it is handed back, at its head and in order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use kiln_proto::ModelName;
use tokio::sync::Notify;

use super::{
    Acknowledge, Broker, BrokerError, DELIVERY_LIMIT, Death, DeathReason, Deliveries, Delivery, HeldLetters, Lane,
};

/// In-memory broker. Messages live as long as the process: it is the embedded default's broker,
/// not a durable one.
pub struct EmbeddedBroker {
    queues: Mutex<HashMap<Lane, Arc<Queue>>>,
    dead_letters: Arc<Queue>,
    max_queue_len: usize,
}

struct Queue {
    /// For the [`Death`] of what leaves it.
    name: String,
    /// Where a message goes when it is rejected or returned more than the limit; none for the
    /// dead-letter queue itself, which drops what is rejected and keeps what is returned.
    dead_letters: Option<(Arc<Queue>, u32)>,
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Message>,
    unacked: HashMap<u64, (u64, Message)>,
    in_flight: HashMap<u64, usize>,
    next_tag: u64,
    next_consumer: u64,
}

struct Message {
    body: Vec<u8>,
    redelivered: bool,
    /// The publishing span's trace context, as RabbitMQ carries it in a header.
    traceparent: Option<String>,
    /// Times it was handed back to this queue (RabbitMQ's delivery count).
    returns: u32,
    /// Why it was dead-lettered into this queue, if the broker moved it.
    death: Option<Death>,
}

impl Message {
    fn new(body: Vec<u8>, traceparent: Option<String>) -> Self {
        Self { body, redelivered: false, traceparent, returns: 0, death: None }
    }
}

impl EmbeddedBroker {
    /// `max_queue_len` bounds each queue; a publish beyond it is rejected.
    pub fn new(max_queue_len: usize) -> Self {
        Self { queues: Mutex::new(HashMap::new()), dead_letters: Queue::new("dlq".into(), None), max_queue_len }
    }

    fn queue(&self, lane: &Lane) -> Arc<Queue> {
        let dlq = &self.dead_letters;
        let mut queues = self.queues.lock().expect("broker lock");
        queues
            .entry(lane.clone())
            .or_insert_with(|| Queue::new(format!("jobs.{lane}"), Some((dlq.clone(), DELIVERY_LIMIT))))
            .clone()
    }
}

impl Default for EmbeddedBroker {
    fn default() -> Self {
        Self::new(100_000)
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn declare(&self, models: &[ModelName]) -> Result<(), BrokerError> {
        for m in models {
            self.queue(&Lane::shared(m.clone()));
        }
        Ok(())
    }

    async fn publish(&self, lane: &Lane, body: Vec<u8>) -> Result<(), BrokerError> {
        let queue = self.queue(lane);
        queue.push(body, crate::telemetry::current_traceparent(), self.max_queue_len, &queue.name)
    }

    async fn publish_delayed(&self, lane: &Lane, body: Vec<u8>, delay: Duration) -> Result<(), BrokerError> {
        let queue = self.queue(lane);
        let (max, name, delay) = (self.max_queue_len, queue.name.clone(), super::delay_step(delay));
        let traceparent = crate::telemetry::current_traceparent();
        // Held by a timer task; like everything in the embedded broker, it lives as long as the process.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(e) = queue.push(body, traceparent, max, &name) {
                tracing::error!(error = %e, "delayed message dropped");
            }
        });
        Ok(())
    }

    async fn consume(&self, lane: &Lane, prefetch: u16) -> Result<Deliveries, BrokerError> {
        Ok(consume_queue(self.queue(lane), prefetch))
    }

    async fn dead_letter(&self, body: Vec<u8>) -> Result<(), BrokerError> {
        self.dead_letters.push(body, None, self.max_queue_len, "dead letters")
    }

    async fn consume_dead_letters(&self, prefetch: u16) -> Result<Deliveries, BrokerError> {
        Ok(consume_queue(self.dead_letters.clone(), prefetch))
    }

    async fn fetch_dead_letters(&self, limit: u32) -> Result<HeldLetters, BrokerError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let holder = ConsumerGuard::register(self.dead_letters.clone(), limit);
        let mut messages = Vec::new();
        while let Some(d) = holder.try_take() {
            messages.push(d);
        }
        // Dropping the registration hands back what it still holds, oldest first at the head.
        Ok(HeldLetters::new(messages, move || Box::pin(async move { drop(holder) })))
    }

    async fn dead_letter_count(&self) -> Result<u32, BrokerError> {
        let s = self.dead_letters.state.lock().expect("queue lock");
        Ok((s.ready.len() + s.unacked.len()) as u32)
    }

    async fn check(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

impl Queue {
    fn new(name: String, dead_letters: Option<(Arc<Queue>, u32)>) -> Arc<Self> {
        Arc::new(Queue { name, dead_letters, state: Mutex::new(QueueState::default()), notify: Notify::new() })
    }

    fn push(&self, body: Vec<u8>, traceparent: Option<String>, max: usize, name: &str) -> Result<(), BrokerError> {
        {
            let mut s = self.state.lock().expect("queue lock");
            if s.ready.len() + s.unacked.len() >= max {
                return Err(BrokerError::Rejected(format!("queue {name} is full ({max} messages)")));
            }
            s.ready.push_back(Message::new(body, traceparent));
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Hands messages back to the head of this queue, oldest first, flagged redelivered; those
    /// returned more often than the limit go to the dead-letter queue instead. Call without
    /// holding this queue's lock.
    fn give_back(&self, held: Vec<Message>) {
        let mut dead = Vec::new();
        {
            let mut s = self.state.lock().expect("queue lock");
            for mut msg in held.into_iter().rev() {
                msg.returns = msg.returns.saturating_add(1);
                match &self.dead_letters {
                    Some((_, limit)) if msg.returns > *limit => dead.push(msg),
                    Some(_) | None => {
                        msg.redelivered = true;
                        s.ready.push_front(msg);
                    }
                }
            }
        }
        dead.reverse();
        for msg in dead {
            self.dead_letter(msg, DeathReason::DeliveryLimit);
        }
        self.notify.notify_waiters();
    }

    /// Moves a message to this queue's dead-letter queue (drops it from the dead-letter queue
    /// itself, as RabbitMQ does with no dead-letter target). Like RabbitMQ's at-least-once
    /// dead-lettering, the move ignores the length bound: nothing is lost to it.
    fn dead_letter(&self, msg: Message, reason: DeathReason) {
        let Some((dlq, _)) = &self.dead_letters else { return };
        let count = match &msg.death {
            Some(d) if d.reason == reason && d.queue == self.name => d.count + 1,
            Some(_) | None => 1,
        };
        let death = Death { reason, queue: self.name.clone(), count, at: Some(kiln_proto::now_millis()) };
        let moved = Message {
            body: msg.body,
            redelivered: false,
            traceparent: msg.traceparent,
            returns: 0,
            death: Some(death),
        };
        dlq.state.lock().expect("queue lock").ready.push_back(moved);
        dlq.notify.notify_waiters();
    }
}

fn consume_queue(queue: Arc<Queue>, prefetch: u16) -> Deliveries {
    let consumer = ConsumerGuard::register(queue, usize::from(prefetch.max(1)));
    let stream = futures::stream::unfold(consumer, |consumer| async move {
        let delivery = consumer.next().await;
        Some((Ok(delivery), consumer))
    });
    Deliveries::new(stream.boxed(), || true)
}

/// One consumer's registration; dropping it (the stream was dropped) requeues what it held.
struct ConsumerGuard {
    queue: Arc<Queue>,
    id: u64,
    prefetch: usize,
}

impl ConsumerGuard {
    fn register(queue: Arc<Queue>, prefetch: usize) -> Self {
        let id = {
            let mut s = queue.state.lock().expect("queue lock");
            s.next_consumer += 1;
            let id = s.next_consumer;
            s.in_flight.insert(id, 0);
            id
        };
        ConsumerGuard { queue, id, prefetch }
    }

    async fn next(&self) -> Delivery {
        loop {
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(d) = self.try_take() {
                return d;
            }
            notified.await;
        }
    }

    fn try_take(&self) -> Option<Delivery> {
        let mut s = self.queue.state.lock().expect("queue lock");
        if s.in_flight.get(&self.id).copied().unwrap_or(0) >= self.prefetch {
            return None;
        }
        let msg = s.ready.pop_front()?;
        s.next_tag += 1;
        let tag = s.next_tag;
        *s.in_flight.entry(self.id).or_default() += 1;
        let (body, redelivered, traceparent) = (msg.body.clone(), msg.redelivered, msg.traceparent.clone());
        let death = msg.death.clone();
        s.unacked.insert(tag, (self.id, msg));
        let acker = EmbeddedAcker { queue: Arc::downgrade(&self.queue), tag };
        Some(Delivery::new(body, redelivered, Box::new(acker)).with_traceparent(traceparent).with_death(death))
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let mut held: Vec<(u64, Message)> = {
            let mut s = self.queue.state.lock().expect("queue lock");
            s.in_flight.remove(&self.id);
            let tags: Vec<u64> =
                s.unacked.iter().filter(|(_, (owner, _))| *owner == self.id).map(|(t, _)| *t).collect();
            tags.into_iter().filter_map(|t| s.unacked.remove(&t).map(|(_, msg)| (t, msg))).collect()
        };
        // Oldest first back at the head of the queue, as RabbitMQ does with a closed consumer's.
        held.sort_by_key(|(tag, _)| *tag);
        self.queue.give_back(held.into_iter().map(|(_, msg)| msg).collect());
    }
}

struct EmbeddedAcker {
    queue: Weak<Queue>,
    tag: u64,
}

enum Settlement {
    Ack,
    Requeue,
    Reject,
}

impl EmbeddedAcker {
    fn settle(&self, settlement: Settlement) -> Result<(), BrokerError> {
        let queue = self.queue.upgrade().ok_or_else(|| BrokerError::Unavailable("broker is gone".into()))?;
        let mut s = queue.state.lock().expect("queue lock");
        // Unknown tag: its consumer went away and the message was already requeued, as an ack on
        // a closed channel would fail in RabbitMQ.
        let (owner, msg) = s
            .unacked
            .remove(&self.tag)
            .ok_or_else(|| BrokerError::Unavailable("delivery no longer held: its consumer was closed".into()))?;
        if let Some(n) = s.in_flight.get_mut(&owner) {
            *n -= 1;
        }
        drop(s);
        match settlement {
            Settlement::Ack => queue.notify.notify_waiters(),
            Settlement::Requeue => queue.give_back(vec![msg]),
            Settlement::Reject => {
                queue.dead_letter(msg, DeathReason::Rejected);
                queue.notify.notify_waiters();
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Acknowledge for EmbeddedAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.settle(Settlement::Ack)
    }

    async fn nack(&self, requeue: bool) -> Result<(), BrokerError> {
        self.settle(if requeue { Settlement::Requeue } else { Settlement::Reject })
    }
}
