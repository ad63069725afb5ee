//! Job store semantics: create once, the running transition, fenced terminal writes, withdrawal
//! and expiry.

use std::time::Duration;

use kiln_common::store::{Outcome, Start, Transition};
use kiln_common::testing::{Kind, backend, wait_until};
use kiln_proto::{ErrorCode, JobError, JobId, JobRecord, JobStatus, ModelName};

kiln_common::both_backends!(
    lifecycle_and_fenced_terminal_write,
    unknown_jobs_are_missing,
    records_expire_after_retention,
    discard_withdraws_a_record,
    deadlines_expire_queued_jobs_only,
    retry_and_progress_respect_terminal_states,
    leases_lapse_once_and_are_reaped_by_one_claimant,
    redrive_only_moves_failed_jobs,
    a_live_completed_event_carries_the_finished_record,
    a_burst_of_concurrent_calls_on_a_busy_machine_all_complete,
);

fn record() -> JobRecord {
    JobRecord::queued(JobId::random(), ModelName::new("m").unwrap(), 1_000, Some(serde_json::json!({"k": "v"})))
}

async fn lifecycle_and_fenced_terminal_write(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    assert!(b.store.create(&r).await.is_err(), "a second create of the same id must fail");
    assert_eq!(b.store.get(r.id).await.unwrap().unwrap(), r);

    assert_eq!(b.store.start(r.id, 1_010).await.unwrap(), Start::Started { attempt: 1 });
    let running = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((running.status, running.attempts, running.started_at), (JobStatus::Running, 1, Some(1_010)));

    let first = Outcome::Succeeded(r#"{"dim":1,"embeddings":[[1.0]]}"#.into());
    assert_eq!(b.store.finish(r.id, &first, 1_020).await.unwrap(), Transition::Applied);
    // A redelivered duplicate finishing later changes nothing.
    let late = Outcome::Failed(JobError { code: ErrorCode::InferenceFailed, message: "late".into() });
    assert_eq!(b.store.finish(r.id, &late, 1_030).await.unwrap(), Transition::AlreadyTerminal(JobStatus::Succeeded));
    assert_eq!(b.store.start(r.id, 1_040).await.unwrap(), Start::AlreadyTerminal(JobStatus::Succeeded));

    let done = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.output, Some(serde_json::json!({"dim": 1, "embeddings": [[1.0]]})));
    assert_eq!((done.completed_at, done.error, done.attempts), (Some(1_020), None, 1));
    assert_eq!((done.metrics.queue_ms, done.metrics.run_ms), (Some(10), Some(10)));
    assert_eq!(done.metadata, r.metadata);
}

async fn unknown_jobs_are_missing(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let id = JobId::random();
    assert_eq!(b.store.get(id).await.unwrap(), None);
    assert_eq!(b.store.start(id, 1).await.unwrap(), Start::Missing);
    assert_eq!(b.store.finish(id, &Outcome::Succeeded("{}".into()), 1).await.unwrap(), Transition::Missing);
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
    // A late delivery of the withdrawn job is recognised as such, not mistaken for a lost record.
    assert_eq!(b.store.start(r.id, 2_000).await.unwrap(), Start::Withdrawn);
}

async fn deadlines_expire_queued_jobs_only(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let mut late = record();
    late.deadline_at = Some(1_500);
    b.store.create(&late).await.unwrap();
    assert_eq!(b.store.expire_if_due(late.id, 1_400).await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    assert_eq!(b.store.start(late.id, 1_600).await.unwrap(), Start::Expired);
    let got = b.store.get(late.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.attempts, got.error.unwrap().code),
        (JobStatus::Expired, 0, ErrorCode::DeadlineExceeded)
    );

    let mut queued = record();
    queued.deadline_at = Some(1_500);
    b.store.create(&queued).await.unwrap();
    assert_eq!(b.store.expire_if_due(queued.id, 1_600).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.get(queued.id).await.unwrap().unwrap().status, JobStatus::Expired);

    // A job that started before its deadline is not expired by it.
    let mut started = record();
    started.deadline_at = Some(1_500);
    b.store.create(&started).await.unwrap();
    assert_eq!(b.store.start(started.id, 1_400).await.unwrap(), Start::Started { attempt: 1 });
    assert_eq!(b.store.expire_if_due(started.id, 1_600).await.unwrap(), Transition::NotApplicable(JobStatus::Running));
    assert_eq!(b.store.start(started.id, 1_700).await.unwrap(), Start::Started { attempt: 2 });
}

async fn retry_and_progress_respect_terminal_states(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    b.store.start(r.id, 1_010).await.unwrap();
    assert_eq!(b.store.progress(r.id, &serde_json::json!({"step": 1})).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.retry(r.id).await.unwrap(), Transition::Applied);
    let queued = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((queued.status, queued.attempts), (JobStatus::Queued, 1));
    assert_eq!(b.store.start(r.id, 1_020).await.unwrap(), Start::Started { attempt: 2 });
    let failed = Outcome::Failed(JobError { code: ErrorCode::InferenceFailed, message: "boom".into() });
    assert_eq!(b.store.finish(r.id, &failed, 1_030).await.unwrap(), Transition::Applied);
    // Late writes never touch a terminal record.
    let late = serde_json::json!({"step": 2});
    assert_eq!(b.store.progress(r.id, &late).await.unwrap(), Transition::AlreadyTerminal(JobStatus::Failed));
    assert_eq!(b.store.retry(r.id).await.unwrap(), Transition::AlreadyTerminal(JobStatus::Failed));
    let done = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.progress), (JobStatus::Failed, Some(serde_json::json!({"step": 1}))));
}

async fn leases_lapse_once_and_are_reaped_by_one_claimant(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    // Only a running job can be leased.
    assert_eq!(b.store.lease(r.id, "w1", 2_000, "env").await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    b.store.start(r.id, 1_000).await.unwrap();
    assert_eq!(b.store.lease(r.id, "w1", 2_000, "env").await.unwrap(), Transition::Applied);
    assert_eq!(b.store.renew(r.id, "w2", 3_000).await.unwrap(), Transition::NotApplicable(JobStatus::Running));
    assert_eq!(b.store.renew(r.id, "w1", 3_000).await.unwrap(), Transition::Applied);
    assert!(b.store.reap(2_500, "reaper-a", 10_000, 10).await.unwrap().is_empty(), "renewed lease reaped early");

    let lapsed = b.store.reap(3_500, "reaper-a", 10_000, 10).await.unwrap();
    assert_eq!(lapsed.len(), 1);
    assert_eq!((lapsed[0].id, lapsed[0].envelope.as_str()), (r.id, "env"));
    // Claimed: a second reaper finds nothing until the claim itself lapses.
    assert!(b.store.reap(3_600, "reaper-b", 20_000, 10).await.unwrap().is_empty());
    // The old owner has lost it.
    assert_eq!(b.store.renew(r.id, "w1", 4_000).await.unwrap(), Transition::NotApplicable(JobStatus::Running));
    assert_eq!(b.store.release(r.id, "reaper-b").await.unwrap(), Transition::NotApplicable(JobStatus::Running));
    assert_eq!(b.store.release(r.id, "reaper-a").await.unwrap(), Transition::Applied);
    assert_eq!(b.store.get(r.id).await.unwrap().unwrap().status, JobStatus::Queued);
    assert!(b.store.reap(30_000, "reaper-b", 40_000, 10).await.unwrap().is_empty(), "released lease still listed");

    // Finishing releases a lease too.
    b.store.start(r.id, 5_000).await.unwrap();
    b.store.lease(r.id, "w3", 6_000, "env").await.unwrap();
    b.store.finish(r.id, &Outcome::Succeeded("{}".into()), 5_500).await.unwrap();
    assert!(b.store.reap(50_000, "reaper-c", 60_000, 10).await.unwrap().is_empty(), "finished job reaped");
}

async fn redrive_only_moves_failed_jobs(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    assert_eq!(b.store.redrive(r.id).await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    b.store.start(r.id, 1_000).await.unwrap();
    let failed = Outcome::Failed(JobError { code: ErrorCode::InferenceFailed, message: "boom".into() });
    b.store.finish(r.id, &failed, 1_100).await.unwrap();
    assert_eq!(b.store.redrive(r.id).await.unwrap(), Transition::Applied);
    let again = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((again.status, again.attempts, again.error, again.completed_at), (JobStatus::Queued, 0, None, None));
    assert_eq!(b.store.redrive(JobId::random()).await.unwrap(), Transition::Missing);
}

/// A waiter answers from the pushed `completed` event without reading the record back: the event
/// carries the record as the transition left it (the log's copy does not).
async fn a_live_completed_event_carries_the_finished_record(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    let mut events = b.store.subscribe(r.id).await;
    b.store.create(&r).await.unwrap();
    b.store.start(r.id, 1_010).await.unwrap();
    let output = Outcome::Succeeded(r#"{"dim":2,"embeddings":[[0.6,-0.8]],"note":"a/b \"q\"\nx"}"#.into());
    b.store.finish(r.id, &output, 1_025).await.unwrap();
    let completed = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("an event in time").unwrap();
        if e.kind == kiln_proto::EventKind::Completed {
            break e;
        }
        assert!(e.record.is_none(), "only completed events carry the record: {e:?}");
    };
    let pushed = completed.record.expect("the completed event carries the record");
    assert_eq!(*pushed, b.store.get(r.id).await.unwrap().unwrap());
    assert_eq!(pushed.output.as_ref().unwrap()["note"], "a/b \"q\"\nx");
    assert_eq!((pushed.status, pushed.metrics.run_ms), (JobStatus::Succeeded, Some(15)));
    let logged = b.store.events(r.id, None).await.unwrap();
    assert!(logged.iter().all(|e| e.record.is_none()), "the log keeps no records");
}

/// A worker admits its whole prefetch window at once: hundreds of concurrent store calls on one
/// connection while inference keeps every core busy, well past redis-rs's default request channel
/// of 50. All of them complete, promptly. (The stall this guards against — see
/// `connection_config` — was seen through the benchmark's backlog scenario; this burst alone did
/// not reproduce it on the old settings.)
async fn a_burst_of_concurrent_calls_on_a_busy_machine_all_complete(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let output =
        Outcome::Succeeded(format!(r#"{{"dim":384,"embeddings":[[{}]]}}"#, vec!["0.012345678"; 384].join(",")));
    let mut failed = Vec::new();
    let started = std::time::Instant::now();
    for _round in 0..5 {
        let records: Vec<JobRecord> = (0..128).map(|_| record()).collect();
        let creates = futures::future::join_all(records.iter().map(|r| b.store.create(r))).await;
        let starts = futures::future::join_all(records.iter().map(|r| b.store.start(r.id, 2_000))).await;
        let finishes = futures::future::join_all(records.iter().map(|r| b.store.finish(r.id, &output, 2_010))).await;
        failed.extend(creates.into_iter().filter_map(Result::err).map(|e| e.to_string()));
        failed.extend(starts.into_iter().filter_map(Result::err).map(|e| e.to_string()));
        failed.extend(finishes.into_iter().filter_map(Result::err).map(|e| e.to_string()));
    }
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spinners.into_iter().for_each(|s| drop(s.join()));
    assert!(failed.is_empty(), "{} of 1920 calls failed after {took:?}, e.g. {:?}", failed.len(), failed.first());
    assert!(took < Duration::from_secs(4), "1920 calls took {took:?}");
}
