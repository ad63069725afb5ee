//! Nothing the broker holds is lost: a job message requeued past the delivery limit, or rejected,
//! lands in the dead-letter queue with a readable reason and can be redriven; reading the
//! dead-letter queue changes nothing in it; retry delays go through quorum queues; queues declared
//! by an older Kiln are used as they are.

use std::sync::Arc;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::broker::amqp::{AmqpBroker, AmqpConfig, Topology};
use kiln_common::broker::{Broker, DELIVERY_LIMIT, DeathReason, Lane};
use kiln_common::dlq::{self, Cause, Selection};
use kiln_common::testing::{self, Kind, backend};
use kiln_proto::{DeadLetter, Envelope, ErrorCode, JobError, JobId, JobRecord, JobStatus, ModelName, now_millis};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

kiln_common::both_backends!(
    requeued_past_the_delivery_limit_is_dead_lettered_not_lost,
    listing_the_dead_letters_is_a_read,
    a_rejected_job_is_dead_lettered_with_its_reason_and_redriven,
);

const WAIT: Duration = Duration::from_secs(10);

fn model() -> ModelName {
    ModelName::new("m").unwrap()
}

fn lane() -> Lane {
    Lane::shared(model())
}

use crate::broker::next;

fn envelope() -> Envelope {
    Envelope::new(JobId::random(), model(), serde_json::json!({ "text": "x" }), now_millis(), None)
}

fn given_up(n: u32) -> DeadLetter {
    let reason = JobError { code: ErrorCode::InferenceFailed, message: format!("letter {n}") };
    DeadLetter { v: 1, envelope: envelope(), reason, attempts: n, dead_at: now_millis() }
}

/// Waits until the dead-letter queue counts `n` messages (RabbitMQ's count is updated after the
/// operations that change it).
async fn wait_for_dead_letters(b: &Backend, n: u32) {
    testing::wait_until("the dead-letter queue holds the messages", WAIT, || async {
        match b.broker.dead_letter_count().await {
            Ok(count) if count == n => Ok(()),
            other => Err(other.map_err(|e| e.to_string())),
        }
    })
    .await;
}

/// RabbitMQ 4 gives a quorum queue message 20 deliveries and then deletes it; the worker requeues
/// on every store error, so a short Redis outage used to be enough to lose jobs.
async fn requeued_past_the_delivery_limit_is_dead_lettered_not_lost(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    let job = envelope();
    b.broker.publish(&lane(), serde_json::to_vec(&job).unwrap()).await.unwrap();
    let mut d = b.broker.consume(&lane(), 1).await.unwrap();
    // Well past RabbitMQ 4's default of 20, the message is still there.
    for n in 0..25 {
        let again = next(&mut d).await;
        assert_eq!(serde_json::from_slice::<Envelope>(&again.body).unwrap().id, job.id, "delivery {n}");
        again.requeue().await.unwrap();
    }
    // Up to the limit it keeps coming back; the return after the last delivery moves it.
    for _ in 25..=DELIVERY_LIMIT {
        next(&mut d).await.requeue().await.unwrap();
    }
    d.close().await;
    wait_for_dead_letters(&b, 1).await;
    let letters = dlq::list(&b, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].envelope, job);
    let Cause::Broker(death) = &letters[0].cause else { panic!("not the broker's letter: {letters:?}") };
    assert_eq!(death.reason, DeathReason::DeliveryLimit, "{death:?}");
    assert!(death.queue.ends_with("jobs.m") && death.count == 1, "{death:?}");
    let line = letters[0].to_json();
    assert_eq!(
        (line["by"].as_str(), line["reason"]["code"].as_str()),
        (Some("broker"), Some("delivery_limit")),
        "{line}"
    );
}

/// `kiln dlq list` used to requeue what it read: repeated listing rotated the queue, and with a
/// delivery limit on the dead-letter queue (RabbitMQ 4's default) it would delete letters.
async fn listing_the_dead_letters_is_a_read(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    let letters: Vec<DeadLetter> = (1..=3).map(given_up).collect();
    for l in &letters {
        b.broker.dead_letter(serde_json::to_vec(l).unwrap()).await.unwrap();
    }
    let ids = |ls: &[dlq::Letter]| ls.iter().map(|l| l.envelope.id).collect::<Vec<_>>();
    let first_two: Vec<JobId> = letters[..2].iter().map(|l| l.envelope.id).collect();
    for n in 0..25 {
        let listed = dlq::list(&b, 2).await.unwrap();
        assert_eq!(ids(&listed), first_two, "list number {n}");
    }
    let all = dlq::list(&b, 10).await.unwrap();
    assert_eq!(ids(&all), letters.iter().map(|l| l.envelope.id).collect::<Vec<_>>());
    let Cause::GivenUp { reason, .. } = &all[2].cause else { panic!("not a worker's letter: {all:?}") };
    assert_eq!((reason.message.as_str(), all[2].attempts), ("letter 3", 3));
    wait_for_dead_letters(&b, 3).await;
}

async fn a_rejected_job_is_dead_lettered_with_its_reason_and_redriven(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    let job = envelope();
    b.store.create(&JobRecord::queued(job.id, model(), now_millis(), None)).await.unwrap();
    b.broker.publish(&lane(), serde_json::to_vec(&job).unwrap()).await.unwrap();
    b.broker.publish(&lane(), b"not an envelope".to_vec()).await.unwrap();
    let mut d = b.broker.consume(&lane(), 2).await.unwrap();
    next(&mut d).await.reject().await.unwrap();
    next(&mut d).await.reject().await.unwrap();
    wait_for_dead_letters(&b, 2).await;

    let listing = dlq::read(&b, 10).await.unwrap();
    assert_eq!(listing.letters.len(), 1, "{listing:?}");
    let Cause::Broker(death) = &listing.letters[0].cause else { panic!("not the broker's letter: {listing:?}") };
    assert_eq!(death.reason, DeathReason::Rejected);
    assert_eq!(listing.unreadable.len(), 1, "{listing:?}");
    assert_eq!(listing.unreadable[0].death.as_ref().map(|d| &d.reason), Some(&DeathReason::Rejected));

    let report = dlq::redrive(&b, Selection::All).await.unwrap();
    assert_eq!((report.redriven, report.left), (vec![job.id], 1));
    let back = next(&mut d).await;
    assert_eq!(serde_json::from_slice::<Envelope>(&back.body).unwrap(), job, "queued again as it was");
    back.ack().await.unwrap();
    assert_eq!(b.store.get(job.id).await.unwrap().map(|r| r.status), Some(JobStatus::Queued));
    // What is not a job stays in the dead-letter queue (RabbitMQ's count follows a moment later).
    wait_for_dead_letters(&b, 1).await;
    let left = dlq::read(&b, 10).await.unwrap();
    assert_eq!((left.letters.len(), left.unreadable.len()), (0, 1), "{left:?}");
}

async fn amqp() -> Connection {
    let (url, _) = testing::service_urls();
    Connection::connect(&url, ConnectionProperties::default()).await.expect("connect to the test RabbitMQ")
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Declares `queue` as it is; RabbitMQ accepts only the arguments the queue has.
async fn redeclare(conn: &Connection, queue: &str, arguments: FieldTable) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let outcome = ch.queue_declare(queue.into(), durable, arguments).await.map(drop);
    if outcome.is_ok() {
        ch.close(200, "checked".into()).await.unwrap();
    }
    outcome
}

fn amqp_broker(prefix: &str) -> AmqpBroker {
    let args = testing::backend_args(Duration::from_secs(60));
    AmqpBroker::new(AmqpConfig {
        url: args.amqp_url,
        topology: Topology::new(prefix),
        connect_timeout: Duration::from_secs(1),
        confirm_timeout: Duration::from_secs(5),
        retry_interval: Duration::from_millis(500),
        tls: Default::default(),
    })
}

/// A retry waits in a quorum queue (classic queues dead-letter at most once, so a retry could be
/// lost on its way back) and comes back to the job queue after its delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_delays_are_quorum_queues_that_hand_jobs_back_after_the_delay() {
    let args = testing::backend_args(Duration::from_secs(60));
    let b = Backend::external(&args).unwrap();
    let topology = Topology::new(&args.queue_prefix);
    b.broker.declare(&[model()]).await.unwrap();
    let conn = amqp().await;
    let step = kiln_common::broker::RETRY_DELAYS[0];
    let delay_queue = topology.delay(step);
    let classic = args_for_classic_delay(&topology, step);
    redeclare(&conn, &delay_queue, classic).await.expect_err("not a classic delay queue");
    let quorum = table(&[
        ("x-queue-type", text("quorum")),
        ("x-message-ttl", AMQPValue::LongLongInt(step.as_millis() as i64)),
        ("x-dead-letter-exchange", text(&topology.exchange())),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]);
    redeclare(&conn, &delay_queue, quorum).await.expect("the delay queue is quorum, dead-lettering at least once");

    let mut d = b.broker.consume(&lane(), 10).await.unwrap();
    let sent = std::time::Instant::now();
    b.broker.publish_delayed(&lane(), b"later".to_vec(), Duration::from_millis(300)).await.unwrap();
    let back = next(&mut d).await;
    assert_eq!(back.body, b"later");
    assert!(sent.elapsed() >= step, "delivered after {:?}", sent.elapsed());
    back.ack().await.unwrap();
}

fn args_for_classic_delay(topology: &Topology, step: Duration) -> FieldTable {
    table(&[
        ("x-message-ttl", AMQPValue::LongLongInt(step.as_millis() as i64)),
        ("x-dead-letter-exchange", text(&topology.exchange())),
    ])
}

/// A tenant's lane is made by its first publish with the job queues' arguments, and made again
/// by a publish after its queue was deleted (the publish comes back unroutable once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_lane_is_declared_like_a_job_queue_and_made_again_when_deleted() {
    let prefix = testing::unique_prefix();
    let broker = amqp_broker(&prefix);
    broker.declare(&[model()]).await.unwrap();
    let topology = Topology::new(&prefix);
    let lane = Lane::new(model(), Some("acme".into()));
    broker.publish(&lane, b"first".to_vec()).await.expect("the lane is made by its first publish");
    let conn = amqp().await;
    let queue = topology.lane_queue(&lane);
    assert_eq!(queue, format!("{prefix}.jobs.m@acme"));
    redeclare(&conn, &queue, topology.job_queue_arguments()).await.expect("a job queue's arguments");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
    broker.publish(&lane, b"second".to_vec()).await.expect("the deleted lane is made again");
    let mut d = broker.consume(&lane, 10).await.unwrap();
    let got = crate::broker::next(&mut d).await;
    assert_eq!(got.body, b"second");
    got.ack().await.unwrap();
}

/// The job queues and the dead-letter queue carry the limits and the at-least-once route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_and_dead_letter_queues_are_declared_with_their_limits() {
    let prefix = testing::unique_prefix();
    let broker = amqp_broker(&prefix);
    broker.declare(&[model()]).await.unwrap();
    let topology = Topology::new(&prefix);
    let conn = amqp().await;
    let job_queue = table(&[
        ("x-queue-type", text("quorum")),
        ("x-delivery-limit", AMQPValue::LongInt(1000)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&topology.dead_letter_queue())),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]);
    redeclare(&conn, &topology.queue(&model()), job_queue).await.expect("the job queue's arguments");
    let dlq = table(&[("x-queue-type", text("quorum")), ("x-delivery-limit", AMQPValue::LongInt(i32::MAX))]);
    redeclare(&conn, &topology.dead_letter_queue(), dlq).await.expect("the dead-letter queue's arguments");
    assert!(broker.legacy_queues().is_empty(), "{:?}", broker.legacy_queues());
}

/// A deployment from before these arguments has its job queue and dead-letter queue declared
/// without them; RabbitMQ refuses to redeclare them, and Kiln carries on with them as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declared_by_an_older_kiln_are_used_as_they_are() {
    let prefix = testing::unique_prefix();
    let topology = Topology::new(&prefix);
    let conn = amqp().await;
    let old = || table(&[("x-queue-type", text("quorum"))]);
    redeclare(&conn, &topology.queue(&model()), old()).await.unwrap();
    redeclare(&conn, &topology.dead_letter_queue(), old()).await.unwrap();

    let broker = Arc::new(amqp_broker(&prefix));
    broker.declare(&[model()]).await.expect("declares despite the older queues");
    let mut legacy = broker.legacy_queues();
    legacy.sort();
    assert_eq!(legacy, vec![topology.dead_letter_queue(), topology.queue(&model())]);

    let job = envelope();
    broker.publish(&lane(), serde_json::to_vec(&job).unwrap()).await.unwrap();
    let mut d = broker.consume(&lane(), 1).await.unwrap();
    next(&mut d).await.ack().await.unwrap();
    broker.dead_letter(serde_json::to_vec(&given_up(1)).unwrap()).await.unwrap();
    let mut b = Backend::external(&testing::backend_args(Duration::from_secs(60))).unwrap();
    b.broker = broker.clone();
    assert_eq!(dlq::list(&b, 10).await.unwrap().len(), 1);
    // The old queues are still the old ones: nothing was deleted or recreated.
    redeclare(&conn, &topology.queue(&model()), old()).await.expect("still declared as before");

    let ch = conn.create_channel().await.unwrap();
    for queue in [topology.queue(&model()), topology.dead_letter_queue()] {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    }
}
