//! Delivery semantics every broker must have: confirmed publish, prefetch bound, ack, requeue, and
//! redelivery of what a closed consumer held, and a queue per lane.

use std::time::Duration;

use futures::StreamExt;
use kiln_common::broker::{Deliveries, Delivery, Lane};
use kiln_common::testing::{self, Kind, backend};
use kiln_proto::ModelName;

kiln_common::both_backends!(
    prefetch_bounds_unacked_deliveries,
    closed_consumer_hands_back_what_it_held,
    requeue_redelivers,
    delayed_publish_arrives_after_the_delay,
    dead_letters_are_kept_and_counted,
    a_tenants_lane_is_a_queue_of_its_own_and_its_retries_come_back_to_it,
);

const WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn next(d: &mut Deliveries) -> Delivery {
    tokio::time::timeout(WAIT, d.next())
        .await
        .expect("a delivery within 10s")
        .expect("stream open")
        .expect("delivery ok")
}

fn model() -> ModelName {
    ModelName::new("m").unwrap()
}

fn lane() -> Lane {
    Lane::shared(model())
}

async fn prefetch_bounds_unacked_deliveries(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    for i in 0..3u8 {
        b.broker.publish(&lane(), vec![i]).await.unwrap();
    }
    let mut d = b.broker.consume(&lane(), 2).await.unwrap();
    let first = next(&mut d).await;
    let second = next(&mut d).await;
    assert_eq!((first.body.clone(), second.body.clone()), (vec![0], vec![1]));
    // The third stays on the broker while two are unacknowledged.
    assert!(tokio::time::timeout(Duration::from_millis(300), d.next()).await.is_err(), "prefetch of 2 exceeded");
    first.ack().await.unwrap();
    assert_eq!(next(&mut d).await.body, vec![2]);
}

async fn closed_consumer_hands_back_what_it_held(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    b.broker.publish(&lane(), b"job".to_vec()).await.unwrap();
    let mut dying = b.broker.consume(&lane(), 10).await.unwrap();
    let held = next(&mut dying).await;
    assert!(!held.redelivered);
    drop(dying);
    let mut other = b.broker.consume(&lane(), 10).await.unwrap();
    let again = next(&mut other).await;
    assert_eq!(again.body, b"job");
    assert!(again.redelivered, "a handed-back delivery is flagged redelivered");
    again.ack().await.unwrap();
    // The first consumer's ack comes too late: the delivery is no longer its to settle.
    assert!(held.ack().await.is_err() || kind == Kind::External);
}

async fn requeue_redelivers(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    b.broker.publish(&lane(), b"x".to_vec()).await.unwrap();
    let mut d = b.broker.consume(&lane(), 1).await.unwrap();
    next(&mut d).await.requeue().await.unwrap();
    let again = next(&mut d).await;
    assert!(again.redelivered);
    again.ack().await.unwrap();
}

async fn delayed_publish_arrives_after_the_delay(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    let mut d = b.broker.consume(&lane(), 10).await.unwrap();
    let sent = std::time::Instant::now();
    b.broker.publish_delayed(&lane(), b"later".to_vec(), Duration::from_millis(300)).await.unwrap();
    b.broker.publish(&lane(), b"now".to_vec()).await.unwrap();
    let first = next(&mut d).await;
    assert_eq!(first.body, b"now");
    first.ack().await.unwrap();
    let later = next(&mut d).await;
    // 300 ms is rounded up to the first delay step, one second.
    assert_eq!(later.body, b"later");
    assert!(sent.elapsed() >= Duration::from_secs(1), "delivered after {:?}", sent.elapsed());
    later.ack().await.unwrap();
}

async fn dead_letters_are_kept_and_counted(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    assert_eq!(b.broker.dead_letter_count().await.unwrap(), 0);
    b.broker.dead_letter(b"dead-1".to_vec()).await.unwrap();
    b.broker.dead_letter(b"dead-2".to_vec()).await.unwrap();
    assert_eq!(b.broker.dead_letter_count().await.unwrap(), 2);
    let mut d = b.broker.consume_dead_letters(10).await.unwrap();
    let one = next(&mut d).await;
    assert_eq!(one.body, b"dead-1");
    one.ack().await.unwrap();
    drop(next(&mut d).await);
    drop(d);
    testing::wait_until("the unacknowledged dead letter is back", WAIT, || async {
        match b.broker.dead_letter_count().await.unwrap() {
            1 => Ok(()),
            n => Err(n),
        }
    })
    .await;
}

async fn a_tenants_lane_is_a_queue_of_its_own_and_its_retries_come_back_to_it(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    b.broker.declare(&[model()]).await.unwrap();
    let tenant = Lane::new(model(), Some("acme".into()));
    assert_eq!(tenant.key(), "m@acme");
    let mut shared = b.broker.consume(&lane(), 10).await.unwrap();
    b.broker.publish(&tenant, b"acme's".to_vec()).await.unwrap();
    b.broker.publish_delayed(&tenant, b"acme's retry".to_vec(), Duration::from_millis(10)).await.unwrap();
    b.broker.publish(&lane(), b"nobody's".to_vec()).await.unwrap();
    let mut own = b.broker.consume(&tenant, 10).await.unwrap();
    for body in [&b"acme's"[..], b"acme's retry"] {
        let d = next(&mut own).await;
        assert_eq!(d.body, body);
        d.ack().await.unwrap();
    }
    let d = next(&mut shared).await;
    assert_eq!(d.body, b"nobody's");
    d.ack().await.unwrap();
    // Both of acme's messages were delivered on its own lane already: none is left to arrive here.
    let stray = tokio::time::timeout(Duration::from_millis(200), shared.next()).await;
    assert!(
        stray.is_err(),
        "the shared lane got a tenant's message: {:?}",
        stray.map(|d| d.map(|d| d.map(|d| d.body)))
    );
}
