//! The backends over TLS: a store on a TLS-only Redis (`rediss://`) and a broker on RabbitMQ's TLS
//! 1.3 listener (`amqps://`), each verified against a CA made in the test (`KILN_TLS_CA`); a
//! server whose certificate another CA signed is refused, with an error that says why.

use std::time::Duration;

use kiln_common::Backend;
use kiln_common::config::{BackendArgs, Secret};
use kiln_common::testing::certs::TestCa;
use kiln_common::testing::servers::{RabbitMq, Redis};
use kiln_common::testing::{self, wait_until};
use kiln_proto::{JobId, JobRecord, ModelName};

use crate::broker::next;

fn args_with(ca: &TestCa, amqp: Option<String>, redis: Option<String>) -> BackendArgs {
    let mut args = testing::backend_args(Duration::from_secs(60));
    if let Some(amqp) = amqp {
        args.amqp_url = Secret::new(amqp);
    }
    if let Some(redis) = redis {
        args.redis_url = Secret::new(redis);
    }
    args.tls_ca = Some(ca.ca_file());
    args
}

/// A certificate error names the certificate problem (rustls: `invalid peer certificate:
/// UnknownIssuer`), not just "connection failed".
fn says_certificate(error: &str) -> bool {
    error.to_lowercase().contains("certificate")
}

#[tokio::test]
async fn a_store_on_rediss_verifies_the_server_against_the_ca() {
    let ca = TestCa::new("kiln test CA (redis)");
    let redis = Redis::start_tls(&ca).await;
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());

    let b = Backend::external(&args_with(&ca, None, Some(redis.url()))).expect("backend");
    let record = JobRecord::queued(JobId::random(), ModelName::new("m").unwrap(), 1_000, None);
    b.store.create(&record).await.expect("create over TLS");
    let read = b.store.get(record.id).await.expect("get over TLS").expect("the record");
    assert_eq!(read.id, record.id);

    let other = TestCa::new("some other CA");
    let b = Backend::external(&args_with(&other, None, Some(redis.url()))).expect("backend");
    let refused = b.store.get(record.id).await.expect_err("a server the CA did not sign is refused");
    assert!(says_certificate(&refused.to_string()), "the error does not say why: {refused}");
}

#[tokio::test]
async fn a_broker_on_amqps_verifies_the_server_against_the_ca() {
    let ca = TestCa::new("kiln test CA (rabbitmq)");
    let rabbit = RabbitMq::start_tls(&ca).await;
    let model = ModelName::new("m").unwrap();
    let lane = kiln_common::broker::Lane::shared(model.clone());

    let b = Backend::external(&args_with(&ca, Some(rabbit.tls_url()), None)).expect("backend");
    // The node answers `rabbitmqctl wait` a moment before its TLS listener takes connections.
    wait_until("the broker connects over TLS", Duration::from_secs(30), || {
        b.broker.declare(std::slice::from_ref(&model))
    })
    .await;
    b.broker.publish(&lane, b"over tls".to_vec()).await.expect("confirmed publish over TLS");
    let mut deliveries = b.broker.consume(&lane, 1).await.expect("consume over TLS");
    let got = next(&mut deliveries).await;
    assert_eq!(got.body, b"over tls");
    got.ack().await.unwrap();

    let other = TestCa::new("some other CA");
    let b = Backend::external(&args_with(&other, Some(rabbit.tls_url()), None)).expect("backend");
    let refused = b.broker.publish(&lane, b"x".to_vec()).await.expect_err("a server the CA did not sign is refused");
    assert!(says_certificate(&refused.to_string()), "the error does not say why: {refused}");
}
