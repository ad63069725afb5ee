//! Job store semantics: create once, the running transition, fenced terminal writes, withdrawal
//! and expiry.

use std::time::Duration;

use kiln_common::store::{Outcome, Transition};
use kiln_common::testing::{Kind, backend, wait_until};
use kiln_proto::{ErrorCode, JobError, JobId, JobRecord, JobStatus, ModelName};

crate::both_backends!(
    lifecycle_and_fenced_terminal_write,
    unknown_jobs_are_missing,
    records_expire_after_retention,
    discard_withdraws_a_record
);

fn record() -> JobRecord {
    JobRecord::queued(
        JobId::random(),
        ModelName::new("m").unwrap(),
        1_000,
        Some(serde_json::json!({"k": "v"})),
    )
}

async fn lifecycle_and_fenced_terminal_write(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    assert!(
        b.store.create(&r).await.is_err(),
        "a second create of the same id must fail"
    );
    assert_eq!(b.store.get(r.id).await.unwrap().unwrap(), r);

    assert_eq!(
        b.store.start(r.id, 1_010).await.unwrap(),
        Transition::Applied
    );
    let running = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(
        (running.status, running.attempts, running.started_at),
        (JobStatus::Running, 1, Some(1_010))
    );

    let first = Outcome::Succeeded(r#"{"dim":1,"embeddings":[[1.0]]}"#.into());
    assert_eq!(
        b.store.finish(r.id, &first, 1_020).await.unwrap(),
        Transition::Applied
    );
    // A redelivered duplicate finishing later changes nothing.
    let late = Outcome::Failed(JobError {
        code: ErrorCode::InferenceFailed,
        message: "late".into(),
    });
    assert_eq!(
        b.store.finish(r.id, &late, 1_030).await.unwrap(),
        Transition::AlreadyTerminal(JobStatus::Succeeded)
    );
    assert_eq!(
        b.store.start(r.id, 1_040).await.unwrap(),
        Transition::AlreadyTerminal(JobStatus::Succeeded)
    );

    let done = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(
        done.output,
        Some(serde_json::json!({"dim": 1, "embeddings": [[1.0]]}))
    );
    assert_eq!(
        (done.completed_at, done.error, done.attempts),
        (Some(1_020), None, 1)
    );
    assert_eq!(
        (done.metrics.queue_ms, done.metrics.run_ms),
        (Some(10), Some(10))
    );
    assert_eq!(done.metadata, r.metadata);
}

async fn unknown_jobs_are_missing(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let id = JobId::random();
    assert_eq!(b.store.get(id).await.unwrap(), None);
    assert_eq!(b.store.start(id, 1).await.unwrap(), Transition::Missing);
    assert_eq!(
        b.store
            .finish(id, &Outcome::Succeeded("{}".into()), 1)
            .await
            .unwrap(),
        Transition::Missing
    );
}

async fn records_expire_after_retention(kind: Kind) {
    let b = backend(kind, Duration::from_millis(300));
    let r = record();
    b.store.create(&r).await.unwrap();
    wait_until("the record expires", Duration::from_secs(10), || async {
        match b.store.get(r.id).await.unwrap() {
            None => Ok(()),
            Some(r) => Err(r.status),
        }
    })
    .await;
}

async fn discard_withdraws_a_record(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    b.store.discard(r.id).await.unwrap();
    assert_eq!(b.store.get(r.id).await.unwrap(), None);
}
