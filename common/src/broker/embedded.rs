//! The in-process broker of `kiln dev`: per-model FIFO queues with the delivery semantics workers rely
//! on from RabbitMQ — bounded prefetch per consumer, explicit ack, nack with or without requeue, and
//! redelivery (flagged `redelivered`) of everything a consumer held when it went away.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use kiln_proto::ModelName;
use tokio::sync::Notify;

use super::{Acknowledge, Broker, BrokerError, Deliveries, Delivery};

/// In-memory broker. Messages live as long as the process: it is the embedded default's broker,
/// not a durable one.
pub struct EmbeddedBroker {
    queues: Mutex<HashMap<ModelName, Arc<Queue>>>,
    dead_letters: Arc<Queue>,
    max_queue_len: usize,
}

struct Queue {
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
}

impl EmbeddedBroker {
    /// `max_queue_len` bounds each queue; a publish beyond it is rejected.
    pub fn new(max_queue_len: usize) -> Self {
        Self { queues: Mutex::new(HashMap::new()), dead_letters: Queue::new(), max_queue_len }
    }

    fn queue(&self, model: &ModelName) -> Arc<Queue> {
        self.queues.lock().expect("broker lock").entry(model.clone()).or_insert_with(Queue::new).clone()
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
            self.queue(m);
        }
        Ok(())
    }

    async fn publish(&self, model: &ModelName, body: Vec<u8>) -> Result<(), BrokerError> {
        self.queue(model).push(body, crate::telemetry::current_traceparent(), self.max_queue_len, model.as_str())
    }

    async fn publish_delayed(&self, model: &ModelName, body: Vec<u8>, delay: Duration) -> Result<(), BrokerError> {
        let queue = self.queue(model);
        let (max, name, delay) = (self.max_queue_len, model.to_string(), super::delay_step(delay));
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

    async fn consume(&self, model: &ModelName, prefetch: u16) -> Result<Deliveries, BrokerError> {
        Ok(consume_queue(self.queue(model), prefetch))
    }

    async fn dead_letter(&self, body: Vec<u8>) -> Result<(), BrokerError> {
        self.dead_letters.push(body, None, self.max_queue_len, "dead letters")
    }

    async fn consume_dead_letters(&self, prefetch: u16) -> Result<Deliveries, BrokerError> {
        Ok(consume_queue(self.dead_letters.clone(), prefetch))
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
    fn new() -> Arc<Self> {
        Arc::new(Queue { state: Mutex::new(QueueState::default()), notify: Notify::new() })
    }

    fn push(&self, body: Vec<u8>, traceparent: Option<String>, max: usize, name: &str) -> Result<(), BrokerError> {
        {
            let mut s = self.state.lock().expect("queue lock");
            if s.ready.len() + s.unacked.len() >= max {
                return Err(BrokerError::Rejected(format!("queue {name} is full ({max} messages)")));
            }
            s.ready.push_back(Message { body, redelivered: false, traceparent });
        }
        self.notify.notify_waiters();
        Ok(())
    }
}

fn consume_queue(queue: Arc<Queue>, prefetch: u16) -> Deliveries {
    let id = {
        let mut s = queue.state.lock().expect("queue lock");
        s.next_consumer += 1;
        let id = s.next_consumer;
        s.in_flight.insert(id, 0);
        id
    };
    let consumer = ConsumerGuard { queue, id, prefetch: usize::from(prefetch.max(1)) };
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
        s.unacked.insert(tag, (self.id, msg));
        let acker = EmbeddedAcker { queue: Arc::downgrade(&self.queue), tag };
        Some(Delivery::new(body, redelivered, Box::new(acker)).with_traceparent(traceparent))
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let mut s = self.queue.state.lock().expect("queue lock");
        s.in_flight.remove(&self.id);
        let mut held: Vec<(u64, Message)> = Vec::new();
        s.unacked.retain(|tag, (owner, msg)| {
            if *owner == self.id {
                held.push((
                    *tag,
                    std::mem::replace(msg, Message { body: Vec::new(), redelivered: true, traceparent: None }),
                ));
                false
            } else {
                true
            }
        });
        // Oldest first back at the head of the queue, as RabbitMQ does for requeued messages.
        held.sort_by_key(|(tag, _)| std::cmp::Reverse(*tag));
        for (_, mut msg) in held {
            msg.redelivered = true;
            s.ready.push_front(msg);
        }
        drop(s);
        self.queue.notify.notify_waiters();
    }
}

struct EmbeddedAcker {
    queue: Weak<Queue>,
    tag: u64,
}

impl EmbeddedAcker {
    fn settle(&self, requeue: bool) -> Result<(), BrokerError> {
        let queue = self.queue.upgrade().ok_or_else(|| BrokerError::Unavailable("broker is gone".into()))?;
        let mut s = queue.state.lock().expect("queue lock");
        // Unknown tag: its consumer went away and the message was already requeued, as an ack on
        // a closed channel would fail in RabbitMQ.
        let (owner, mut msg) = s
            .unacked
            .remove(&self.tag)
            .ok_or_else(|| BrokerError::Unavailable("delivery no longer held: its consumer was closed".into()))?;
        if let Some(n) = s.in_flight.get_mut(&owner) {
            *n -= 1;
        }
        if requeue {
            msg.redelivered = true;
            s.ready.push_front(msg);
        }
        drop(s);
        queue.notify.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Acknowledge for EmbeddedAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.settle(false)
    }

    async fn nack(&self, requeue: bool) -> Result<(), BrokerError> {
        self.settle(requeue)
    }
}
