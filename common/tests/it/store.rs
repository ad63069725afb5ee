//! Job store semantics on both backends: create once, the running transition, fenced terminal
//! writes, run tokens, withdrawal and expiry, leases and the reaper, the sweeper, coalescing onto
//! confirmed leaders only, tenants' lanes, idempotency claims, the ordered webhook outbox, the job
//! listing, and what a job costs.

use std::time::Duration;

use kiln_common::store::{
    Claim, Coalesced, Creation, ListQuery, MAX_EXAMINED, Outcome, Start, Store, Stray, Transition, WebhookAttempt,
};
use kiln_common::testing::{Kind, backend, backend_args, backend_with, wait_until};
use kiln_proto::{ErrorCode, JobError, JobId, JobRecord, JobStatus, ModelName, WebhookState, now_millis};

kiln_common::both_backends!(
    lifecycle_and_fenced_terminal_write,
    unknown_jobs_are_missing,
    records_expire_after_retention,
    retention_is_refreshed_by_every_transition,
    discard_withdraws_a_record,
    deadlines_expire_queued_jobs_only,
    retry_and_progress_respect_terminal_states,
    a_superseded_run_writes_nothing,
    a_leased_run_is_not_taken_over_by_a_duplicate_delivery,
    leases_lapse_once_and_are_reaped_by_one_claimant,
    stray_jobs_are_requeued_from_their_envelope_or_ended_lost,
    coalescing_follows_only_confirmed_leaders_with_room,
    pending_idempotency_claims_are_short_lived_and_follow_their_job,
    a_jobs_webhook_events_are_handed_out_in_order,
    redrive_only_moves_failed_jobs,
    a_live_completed_event_carries_the_finished_record,
    a_burst_of_concurrent_calls_on_a_busy_machine_all_complete,
    a_tenants_lane_is_noted_with_its_first_job_to_publish,
    the_listing_pages_newest_first_and_later_jobs_stay_out,
    the_listing_filters_by_tenant_status_model_and_time,
    a_listing_page_examines_a_bounded_number_of_entries,
    withdrawn_and_expired_records_leave_the_listing,
);

fn record() -> JobRecord {
    JobRecord::queued(JobId::random(), ModelName::new("m").unwrap(), 1_000, Some(serde_json::json!({"k": "v"})))
}

const ENVELOPE: Creation<'static> = Creation { envelope: Some("env"), idempotency_key: None };

fn succeeded(text: &str) -> Outcome {
    Outcome::Succeeded(text.into())
}

/// Waits until the clock (this machine's, which is also the store's) has passed `t`: for the
/// tests whose subject is time passing (a deadline, a lease, a pending claim running out).
async fn until(t: kiln_proto::UnixMillis, what: &str) {
    wait_until(what, Duration::from_secs(30), || async {
        let now = now_millis();
        if now > t { Ok(()) } else { Err(t - now) }
    })
    .await;
}

async fn lifecycle_and_fenced_terminal_write(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    assert!(b.store.create(&r).await.is_err(), "a second create of the same id must fail");
    assert_eq!(b.store.get(r.id).await.unwrap().unwrap(), r);

    let before = now_millis();
    assert_eq!(b.store.start(r.id, "w").await.unwrap(), Start::Started { attempt: 1 });
    let running = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((running.status, running.attempts), (JobStatus::Running, 1));
    // The store's clock: on this machine, between the caller's readings.
    let started_at = running.started_at.unwrap();
    assert!((before - 50..=now_millis() + 50).contains(&started_at), "{started_at} vs {before}");

    let first = succeeded(r#"{"dim":1,"embeddings":[[1.0]]}"#);
    assert_eq!(b.store.finish(r.id, 1, &first).await.unwrap(), Transition::Applied);
    // A redelivered duplicate finishing later changes nothing.
    let late = Outcome::Failed(JobError { code: ErrorCode::InferenceFailed, message: "late".into() });
    assert_eq!(b.store.finish(r.id, 1, &late).await.unwrap(), Transition::AlreadyTerminal(JobStatus::Succeeded));
    assert_eq!(b.store.start(r.id, "w").await.unwrap(), Start::AlreadyTerminal(JobStatus::Succeeded));

    let done = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.output, Some(serde_json::json!({"dim": 1, "embeddings": [[1.0]]})));
    assert_eq!((done.error, done.attempts), (None, 1));
    assert!(done.completed_at.unwrap() >= started_at);
    assert_eq!(done.metadata, r.metadata);
}

async fn unknown_jobs_are_missing(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let id = JobId::random();
    assert_eq!(b.store.get(id).await.unwrap(), None);
    assert_eq!(b.store.start(id, "w").await.unwrap(), Start::Missing);
    assert_eq!(b.store.finish(id, 1, &succeeded("{}")).await.unwrap(), Transition::Missing);
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

/// Regression (issue 12.3): retention was set at create and never refreshed, so a record could
/// expire under a live job.
async fn retention_is_refreshed_by_every_transition(kind: Kind) {
    let b = backend(kind, Duration::from_millis(800));
    let r = record();
    b.store.create(&r).await.unwrap();
    b.store.start(r.id, "w").await.unwrap();
    // Progress every 200 ms for three times the retention (a schedule, not a synchronisation).
    let begun = now_millis();
    let mut step = 0;
    while now_millis() < begun + 2400 {
        step += 1;
        let p = serde_json::json!({ "step": step });
        assert_eq!(b.store.progress(r.id, 1, &p).await.unwrap(), Transition::Applied, "expired at step {step}");
        until(begun + 200 * step as i64, "the next progress is due").await;
    }
    assert_eq!(b.store.finish(r.id, 1, &succeeded("{}")).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.events(r.id, None).await.unwrap().len(), step + 3, "the event log lives as long");
}

async fn discard_withdraws_a_record(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    b.store.discard(r.id).await.unwrap();
    assert_eq!(b.store.get(r.id).await.unwrap(), None);
    // A late delivery of the withdrawn job is recognised as such, not mistaken for a lost record.
    assert_eq!(b.store.start(r.id, "w").await.unwrap(), Start::Withdrawn);
}

async fn deadlines_expire_queued_jobs_only(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let past = now_millis() - 1_000;
    let future = now_millis() + 60_000;
    let mut late = record();
    late.deadline_at = Some(past);
    b.store.create(&late).await.unwrap();
    assert_eq!(b.store.start(late.id, "w").await.unwrap(), Start::Expired);
    let got = b.store.get(late.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.attempts, got.error.unwrap().code),
        (JobStatus::Expired, 0, ErrorCode::DeadlineExceeded)
    );

    let mut queued = record();
    queued.deadline_at = Some(future);
    b.store.create(&queued).await.unwrap();
    assert_eq!(b.store.expire_if_due(queued.id).await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    let mut due = record();
    due.deadline_at = Some(past);
    b.store.create(&due).await.unwrap();
    assert_eq!(b.store.expire_if_due(due.id).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.get(due.id).await.unwrap().unwrap().status, JobStatus::Expired);

    // A job that started before its deadline is not expired by it.
    let mut started = record();
    let deadline = now_millis() + 300;
    started.deadline_at = Some(deadline);
    b.store.create(&started).await.unwrap();
    assert_eq!(b.store.start(started.id, "w").await.unwrap(), Start::Started { attempt: 1 });
    until(deadline, "the started job's deadline passes").await;
    assert_eq!(b.store.expire_if_due(started.id).await.unwrap(), Transition::NotApplicable(JobStatus::Running));
    assert_eq!(b.store.start(started.id, "w").await.unwrap(), Start::Started { attempt: 2 });
    // Nor is its rerun once it is queued again (a retry here; a lapsed lease or a stray found by
    // the sweeper after a store lost the finish alike): it met its deadline when it first started.
    assert_eq!(b.store.retry(started.id, 2, Duration::ZERO).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.expire_if_due(started.id).await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    assert_eq!(b.store.start(started.id, "w").await.unwrap(), Start::Started { attempt: 3 });
}

async fn retry_and_progress_respect_terminal_states(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    b.store.start(r.id, "w").await.unwrap();
    assert_eq!(b.store.progress(r.id, 1, &serde_json::json!({"step": 1})).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.retry(r.id, 1, Duration::from_secs(1)).await.unwrap(), Transition::Applied);
    let queued = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((queued.status, queued.attempts), (JobStatus::Queued, 1));
    assert_eq!(b.store.start(r.id, "w").await.unwrap(), Start::Started { attempt: 2 });
    let failed = Outcome::Failed(JobError { code: ErrorCode::InferenceFailed, message: "boom".into() });
    assert_eq!(b.store.finish(r.id, 2, &failed).await.unwrap(), Transition::Applied);
    // Late writes never touch a terminal record.
    let late = serde_json::json!({"step": 2});
    assert_eq!(b.store.progress(r.id, 2, &late).await.unwrap(), Transition::AlreadyTerminal(JobStatus::Failed));
    assert_eq!(b.store.retry(r.id, 2, Duration::ZERO).await.unwrap(), Transition::AlreadyTerminal(JobStatus::Failed));
    let done = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.progress), (JobStatus::Failed, Some(serde_json::json!({"step": 1}))));
}

/// Regression (issue 12.4): `finish`, `retry` and `progress` checked only the status, so a run
/// superseded by a redelivery could still write its result over the live run's.
async fn a_superseded_run_writes_nothing(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    assert_eq!(b.store.start(r.id, "w1").await.unwrap(), Start::Started { attempt: 1 });
    // Redelivered (w1's channel closed, say) and started again by w2: run 2 owns the job now.
    assert_eq!(b.store.start(r.id, "w2").await.unwrap(), Start::Started { attempt: 2 });
    let p = serde_json::json!({"step": 9});
    assert_eq!(b.store.progress(r.id, 1, &p).await.unwrap(), Transition::Superseded);
    assert_eq!(b.store.retry(r.id, 1, Duration::ZERO).await.unwrap(), Transition::Superseded);
    assert_eq!(b.store.lease(r.id, 1, "w1", Duration::from_secs(5), "env").await.unwrap(), Transition::Superseded);
    assert_eq!(b.store.finish(r.id, 1, &succeeded(r#"{"by":1}"#)).await.unwrap(), Transition::Superseded);
    let still = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!((still.status, still.progress, still.output), (JobStatus::Running, None, None));
    assert_eq!(b.store.finish(r.id, 2, &succeeded(r#"{"by":2}"#)).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.get(r.id).await.unwrap().unwrap().output, Some(serde_json::json!({"by": 2})));
}

/// Regression (issue 12.4): `start` accepted `running → running` and cleared another worker's
/// lease, so a duplicate delivery of a leased job ran it twice at once.
async fn a_leased_run_is_not_taken_over_by_a_duplicate_delivery(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    b.store.start(r.id, "w1").await.unwrap();
    assert_eq!(b.store.lease(r.id, 1, "w1", Duration::from_secs(30), "env").await.unwrap(), Transition::Applied);
    assert_eq!(b.store.start(r.id, "w2").await.unwrap(), Start::Held);
    assert_eq!(b.store.renew(r.id, "w1", Duration::from_secs(30)).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.finish(r.id, 1, &succeeded("{}")).await.unwrap(), Transition::Applied);
}

async fn leases_lapse_once_and_are_reaped_by_one_claimant(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    // Only a running job can be leased.
    let ttl = Duration::from_millis(400);
    assert_eq!(b.store.lease(r.id, 1, "w1", ttl, "env").await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    b.store.start(r.id, "w1").await.unwrap();
    assert_eq!(b.store.lease(r.id, 1, "w1", ttl, "env").await.unwrap(), Transition::Applied);
    assert_eq!(b.store.renew(r.id, "w2", ttl).await.unwrap(), Transition::NotApplicable(JobStatus::Running));
    assert_eq!(b.store.renew(r.id, "w1", ttl).await.unwrap(), Transition::Applied);
    assert!(b.store.reap(10).await.unwrap().is_empty(), "a live lease reaped");

    let lapsed = wait_until("the lease lapses", Duration::from_secs(10), || async {
        let l = b.store.reap(10).await.unwrap();
        if l.is_empty() { Err("nothing reaped") } else { Ok(l) }
    })
    .await;
    assert_eq!((lapsed.len(), lapsed[0].id, lapsed[0].envelope.as_str()), (1, r.id, "env"));
    // Handed to one caller only, and queued: the old owner has lost it.
    assert!(b.store.reap(10).await.unwrap().is_empty());
    assert_eq!(b.store.get(r.id).await.unwrap().unwrap().status, JobStatus::Queued);
    assert_eq!(b.store.renew(r.id, "w1", ttl).await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    // A publish that failed puts it back, to be handed out again.
    assert_eq!(b.store.requeue_later(r.id, Duration::ZERO).await.unwrap(), Transition::Applied);
    assert_eq!(b.store.reap(10).await.unwrap().len(), 1);

    // Finishing releases a lease too.
    b.store.start(r.id, "w3").await.unwrap();
    let lease_end = now_millis() + 100;
    b.store.lease(r.id, 2, "w3", Duration::from_millis(100), "env").await.unwrap();
    b.store.finish(r.id, 2, &succeeded("{}")).await.unwrap();
    until(lease_end + 100, "the finished job's lease would have lapsed").await;
    assert!(b.store.reap(10).await.unwrap().is_empty(), "finished job reaped");
}

/// Regression (issue 12.2): nothing found live jobs with no message, no lease and no live
/// worker. The sweeper finds them once they have been quiet `sweep_after`.
async fn stray_jobs_are_requeued_from_their_envelope_or_ended_lost(kind: Kind) {
    let mut args = backend_args(Duration::from_secs(60));
    args.sweep_after = Duration::from_millis(300);
    let b = backend_with(kind, &args);
    // Recorded, never published (its gateway died): queued again from its envelope.
    let orphan = record();
    b.store.insert(&orphan, &ENVELOPE).await.unwrap();
    // Running with no lease (its worker died, or its finish write was lost — the worker may be
    // alive): queued again. A run that outlasts `lease_after` would hold a lease.
    let abandoned = record();
    b.store.insert(&abandoned, &ENVELOPE).await.unwrap();
    b.store.start(abandoned.id, "some-worker").await.unwrap();
    // Held by a live lease: left alone.
    let leased = record();
    b.store.insert(&leased, &ENVELOPE).await.unwrap();
    b.store.start(leased.id, "w").await.unwrap();
    b.store.lease(leased.id, 1, "w", Duration::from_secs(30), "env").await.unwrap();
    // No envelope to rebuild it from: ended.
    let unrebuildable = record();
    b.store.create(&unrebuildable).await.unwrap();

    let found = std::sync::Mutex::new(std::collections::HashMap::new());
    wait_until("the sweeper has judged every quiet job", Duration::from_secs(10), || async {
        for id in b.store.sweep(100).await.unwrap() {
            let judged = b.store.stray(id, 5).await.unwrap();
            found.lock().unwrap().insert(id, judged);
        }
        let found = found.lock().unwrap().clone();
        let judged = [orphan.id, abandoned.id, unrebuildable.id].iter().all(|id| found.contains_key(id));
        if judged { Ok(()) } else { Err(found) }
    })
    .await;
    let found = found.into_inner().unwrap();
    assert_eq!(found[&orphan.id], Stray::Requeued);
    assert_eq!(found[&abandoned.id], Stray::Requeued);
    assert_eq!(found[&unrebuildable.id], Stray::Lost);
    assert!(found.get(&leased.id).is_none_or(|s| *s == Stray::Fine), "{found:?}");
    let lost = b.store.get(unrebuildable.id).await.unwrap().unwrap();
    assert_eq!((lost.status, lost.error.unwrap().code), (JobStatus::Failed, ErrorCode::JobLost));
    // The requeued ones go out through the reaper, once each, from their envelopes.
    let mut reaped: Vec<JobId> = b.store.reap(10).await.unwrap().into_iter().map(|l| l.id).collect();
    reaped.sort();
    let mut want = vec![orphan.id, abandoned.id];
    want.sort();
    assert_eq!(reaped, want);
    assert_eq!(b.store.get(abandoned.id).await.unwrap().unwrap().status, JobStatus::Queued);
    // A job swept too often without ever running ends lost too.
    wait_until("the orphan, swept again and again, ends lost", Duration::from_secs(30), || async {
        let _ = b.store.stray(orphan.id, 2).await.unwrap();
        let _ = b.store.reap(10).await.unwrap();
        let got = b.store.get(orphan.id).await.unwrap().unwrap();
        if got.error.as_ref().map(|e| e.code) == Some(ErrorCode::JobLost) { Ok(()) } else { Err(got.status) }
    })
    .await;
}

/// Regression (issue 12.1): a follower attached to any queued leader, even one whose message the
/// broker had not confirmed (and might never have), so it could wait out the whole retention.
async fn coalescing_follows_only_confirmed_leaders_with_room(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let key = format!("k-{}", JobId::random());
    let leader = record();
    assert_eq!(b.store.create_coalesced(&leader, &key, &ENVELOPE, false).await.unwrap(), Coalesced::Leader);
    // Its publish is not confirmed yet: a twin asked to hold off writes nothing, and one that
    // would not wait leads on its own.
    let twin = record();
    assert_eq!(b.store.create_coalesced(&twin, &key, &ENVELOPE, true).await.unwrap(), Coalesced::Pending(leader.id));
    assert_eq!(b.store.get(twin.id).await.unwrap(), None);
    assert_eq!(b.store.create_coalesced(&twin, &key, &ENVELOPE, false).await.unwrap(), Coalesced::Leader);
    b.store.confirm(twin.id, None).await.unwrap();
    let follower = record();
    assert_eq!(b.store.create_coalesced(&follower, &key, &ENVELOPE, true).await.unwrap(), Coalesced::Follower(twin.id));
    b.store.start(twin.id, "w").await.unwrap();
    let output = r#"{"dim":1,"embeddings":[[0.5]]}"#;
    b.store.finish(twin.id, 1, &succeeded(output)).await.unwrap();
    let got = b.store.get(follower.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.output.clone()),
        (JobStatus::Succeeded, Some(serde_json::json!({"dim":1,"embeddings":[[0.5]]})))
    );
    assert_eq!(b.store.get(twin.id).await.unwrap().unwrap().output, got.output, "the shared copy reads the same");

    // Followers are capped: past the cap, an identical job leads on its own.
    let key = format!("k-{}", JobId::random());
    let busy = record();
    b.store.create_coalesced(&busy, &key, &ENVELOPE, false).await.unwrap();
    b.store.confirm(busy.id, None).await.unwrap();
    for _ in 0..kiln_common::store::redis::MAX_FOLLOWERS {
        assert!(matches!(
            b.store.create_coalesced(&record(), &key, &ENVELOPE, true).await.unwrap(),
            Coalesced::Follower(_)
        ));
    }
    assert_eq!(b.store.create_coalesced(&record(), &key, &ENVELOPE, true).await.unwrap(), Coalesced::Leader);
}

/// Regression (issue 12.6): a claim left pending by a gateway that died blocked its key for the
/// key's whole lifetime, and a claim whose commit failed after a confirmed publish stayed pending.
async fn pending_idempotency_claims_are_short_lived_and_follow_their_job(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let (pending, ttl) = (Duration::from_millis(300), Duration::from_secs(3600));
    let fp = "fp";
    // A gateway claimed the key and died before recording the job.
    let dead = JobId::random();
    let key = format!("idem-{dead}");
    assert_eq!(b.store.claim_idempotency(&key, fp, dead, pending, ttl).await.unwrap(), Claim::Claimed);
    let retry = JobId::random();
    assert!(matches!(
        b.store.claim_idempotency(&key, fp, retry, pending, ttl).await.unwrap(),
        Claim::Held { committed: false, .. }
    ));
    wait_until("the dead gateway's pending claim lapses", Duration::from_secs(10), || async {
        match b.store.claim_idempotency(&key, fp, retry, pending, ttl).await.unwrap() {
            Claim::Claimed => Ok(()),
            held => Err(held),
        }
    })
    .await;

    // Recorded and published, but the commit was lost: the job's confirmation (here, its first
    // start) makes the claim committed, for the key's whole lifetime.
    let r = record();
    let key = format!("idem-{}", r.id);
    let claimed_at = now_millis();
    b.store.claim_idempotency(&key, fp, r.id, pending, ttl).await.unwrap();
    b.store.insert(&r, &Creation { envelope: Some("env"), idempotency_key: Some(&key) }).await.unwrap();
    b.store.start(r.id, "w").await.unwrap();
    until(claimed_at + 2 * pending.as_millis() as i64, "a pending claim would have lapsed").await;
    assert_eq!(
        b.store.claim_idempotency(&key, fp, JobId::random(), pending, ttl).await.unwrap(),
        Claim::Held { job: r.id, fingerprint: fp.into(), committed: true }
    );
    // And confirm commits it outright.
    let c = record();
    let key = format!("idem-{}", c.id);
    b.store.claim_idempotency(&key, fp, c.id, pending, ttl).await.unwrap();
    b.store.insert(&c, &Creation { envelope: Some("env"), idempotency_key: Some(&key) }).await.unwrap();
    b.store.confirm(c.id, Some(&key)).await.unwrap();
    assert!(matches!(
        b.store.claim_idempotency(&key, fp, JobId::random(), pending, ttl).await.unwrap(),
        Claim::Held { committed: true, .. }
    ));
    // A withdrawn job's claim is taken over at once.
    let w = record();
    let key = format!("idem-{}", w.id);
    b.store.claim_idempotency(&key, fp, w.id, pending, ttl).await.unwrap();
    b.store.insert(&w, &Creation { envelope: Some("env"), idempotency_key: Some(&key) }).await.unwrap();
    b.store.discard(w.id).await.unwrap();
    assert_eq!(b.store.claim_idempotency(&key, fp, JobId::random(), pending, ttl).await.unwrap(), Claim::Claimed);
}

/// Regression (issue 12.9): a job's `job.started` and `job.completed` deliveries were handed out
/// together, so they could arrive out of order.
async fn a_jobs_webhook_events_are_handed_out_in_order(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let mut r = record();
    r.webhook = Some(WebhookState {
        url: "https://hooks.example.com/x".into(),
        events: vec!["completed".into(), "start".into()],
        ..Default::default()
    });
    b.store.create(&r).await.unwrap();
    b.store.start(r.id, "w").await.unwrap();
    b.store.finish(r.id, 1, &succeeded("{}")).await.unwrap();
    let due = |b: &kiln_common::Backend| {
        let store = b.store.clone();
        async move { store.due_webhooks(now_millis() + 5_000, "d", now_millis() + 60_000, 10).await.unwrap() }
    };
    let first = due(&b).await;
    let mine: Vec<_> = first.iter().filter(|d| d.job == r.id).collect();
    assert_eq!(mine.len(), 1, "only the earliest of a job's events is out: {first:?}");
    assert_eq!((mine[0].event.as_str(), mine[0].seq), ("job.started", 1));
    let ok = WebhookAttempt { body: "{}".into(), status: Some(200), ok: true, at: now_millis(), retry_at: None };
    b.store.webhook_attempted(mine[0], &ok).await.unwrap();
    let next = wait_until("the completed event's turn", Duration::from_secs(10), || async {
        let d = due(&b).await;
        d.into_iter().find(|d| d.job == r.id).ok_or("none yet")
    })
    .await;
    assert_eq!((next.event.as_str(), next.seq), ("job.completed", 2));
}

async fn redrive_only_moves_failed_jobs(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let r = record();
    b.store.create(&r).await.unwrap();
    assert_eq!(b.store.redrive(r.id).await.unwrap(), Transition::NotApplicable(JobStatus::Queued));
    b.store.start(r.id, "w").await.unwrap();
    let failed = Outcome::Failed(JobError { code: ErrorCode::InferenceFailed, message: "boom".into() });
    b.store.finish(r.id, 1, &failed).await.unwrap();
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
    b.store.start(r.id, "w").await.unwrap();
    let output = succeeded(r#"{"dim":2,"embeddings":[[0.6,-0.8]],"note":"a/b \"q\"\nx"}"#);
    b.store.finish(r.id, 1, &output).await.unwrap();
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
    assert_eq!(pushed.status, JobStatus::Succeeded);
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
        let starts = futures::future::join_all(records.iter().map(|r| b.store.start(r.id, "w"))).await;
        let finishes = futures::future::join_all(records.iter().map(|r| b.store.finish(r.id, 1, &output))).await;
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

/// Bytes the state Redis holds per key under `prefix`, summed (`MEMORY USAGE`, samples all).
async fn bytes_under(args: &kiln_common::config::BackendArgs) -> (usize, u64) {
    let client = redis::Client::open(args.redis_url.expose()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}*", args.key_prefix)).query_async(&mut conn).await.unwrap();
    let mut total = 0u64;
    for k in &keys {
        let n: Option<u64> =
            redis::cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0).query_async(&mut conn).await.unwrap();
        total += n.unwrap_or(0);
    }
    (keys.len(), total)
}

/// Regression (issue 12.8): what one finished embedding job costs the state Redis, and what a
/// cache hit costs. A job's log was a stream (~4.5 KB for three entries) and every cache hit wrote
/// a full copy of the output; the measured cost was 15.6 KB per job kept for the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_costs_the_store_a_bounded_number_of_bytes() {
    const JOBS: usize = 200;
    let args = backend_args(Duration::from_secs(600));
    let b = backend_with(Kind::External, &args);
    // One 384-dimension embedding, as the worker writes it: ~4.3 KB of JSON.
    let vector: Vec<String> = (0..384).map(|i| format!("{:.9}", ((i * 7919) % 1000) as f64 / 5000.0 - 0.1)).collect();
    let output = format!(r#"{{"dim":384,"embeddings":[[{}]]}}"#, vector.join(","));
    let envelope = format!(r#"{{"v":1,"input":{{"texts":["{}"]}}}}"#, "a realistic sentence of some length ".repeat(4));
    for _ in 0..JOBS {
        let r = record();
        b.store.insert(&r, &Creation { envelope: Some(&envelope), idempotency_key: None }).await.unwrap();
        b.store.start(r.id, "worker-1234-abcdef").await.unwrap();
        assert_eq!(b.store.finish(r.id, 1, &succeeded(&output)).await.unwrap(), Transition::Applied);
    }
    let (keys, bytes) = bytes_under(&args).await;
    let per_job = bytes / JOBS as u64;
    println!(
        "store cost: {keys} keys, {bytes} bytes, {per_job} bytes per finished job (output {} bytes)",
        output.len()
    );
    // The output itself, plus at most 1.5 KB for the record's fields and its event log, and a
    // quarter of one for its entry in the job listing (~130 bytes measured).
    assert!(per_job < output.len() as u64 + 1536 + 256, "{per_job} bytes per job");

    // A thousand cache hits on one output share one copy of it.
    let before = bytes;
    for _ in 0..1000 {
        let mut hit = record();
        hit.status = JobStatus::Succeeded;
        hit.started_at = Some(now_millis());
        hit.completed_at = hit.started_at;
        hit.output = Some(serde_json::from_str(&output).unwrap());
        hit.cached = true;
        b.store.create(&hit).await.unwrap();
    }
    let (_, after) = bytes_under(&args).await;
    let per_hit = (after - before) / 1000;
    println!("store cost: {per_hit} bytes per cache hit");
    assert!(per_hit < 1536, "{per_hit} bytes per cache hit");
}

async fn a_tenants_lane_is_noted_with_its_first_job_to_publish(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let m = ModelName::new("m").unwrap();
    let of = |tenant: &str| JobRecord { tenant: Some(tenant.into()), ..record() };
    assert_eq!(b.store.lanes(&m, 0).await.unwrap(), None);
    b.store.insert(&record(), &ENVELOPE).await.unwrap();
    b.store.insert(&of("queued"), &ENVELOPE).await.unwrap();
    let key = format!("k-{}", JobId::random());
    assert_eq!(b.store.create_coalesced(&of("leads"), &key, &ENVELOPE, false).await.unwrap(), Coalesced::Leader);
    // A cache hit is born finished and is never published: it makes no lane.
    let hit = JobRecord { status: JobStatus::Succeeded, output: Some(serde_json::json!(1)), ..of("hit") };
    b.store.insert(&hit, &Creation::default()).await.unwrap();
    let mut lanes = b.store.lanes(&m, 0).await.unwrap().expect("two lanes, not none");
    lanes.sort();
    assert_eq!(lanes, vec!["leads".to_owned(), "queued".to_owned()]);
    assert_eq!(b.store.lanes(&m, 2).await.unwrap(), None, "a caller who knows both gets nothing new");
    assert_eq!(b.store.lanes(&ModelName::new("other").unwrap(), 0).await.unwrap(), None);
}

fn all(limit: usize) -> ListQuery {
    ListQuery { tenant: None, status: None, model: None, created_after: None, cursor: None, limit }
}

/// Every page of `q`, in order: the ids of each, and how many pages there were.
async fn pages(store: &dyn Store, mut q: ListQuery) -> Vec<Vec<JobId>> {
    let mut out = Vec::new();
    loop {
        let page = store.list(&q).await.unwrap();
        out.push(page.records.iter().map(|r| r.id).collect());
        match page.next {
            Some(next) => q.cursor = Some(next),
            None => return out,
        }
        assert!(out.len() < 10_000, "the listing never ends");
    }
}

fn made_at(created_at: i64) -> JobRecord {
    JobRecord { created_at, ..record() }
}

async fn the_listing_pages_newest_first_and_later_jobs_stay_out(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let base = now_millis();
    // 25 jobs, two of them in the same millisecond (ordered by id between them).
    let mut made: Vec<JobRecord> = (0..25).map(|i| made_at(base + i.min(23))).collect();
    for r in &made {
        b.store.insert(r, &ENVELOPE).await.unwrap();
    }
    made.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
    let newest_first: Vec<JobId> = made.iter().map(|r| r.id).collect();

    let first = b.store.list(&all(10)).await.unwrap();
    assert_eq!(first.records.iter().map(|r| r.id).collect::<Vec<_>>(), newest_first[..10]);
    assert_eq!(first.records[0], b.store.get(made[0].id).await.unwrap().unwrap(), "a listed record is the record");
    // Jobs made after the listing began, older and newer than where it stands, stay out of it.
    let (late_old, late_new) = (made_at(base - 1_000), made_at(base + 1_000));
    b.store.insert(&late_old, &ENVELOPE).await.unwrap();
    b.store.create_coalesced(&late_new, "late", &ENVELOPE, false).await.unwrap();
    let mut q = all(10);
    q.cursor = first.next;
    let rest = pages(b.store.as_ref(), q).await;
    assert_eq!(rest.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 5], "two more pages");
    let listed: Vec<JobId> = first.records.iter().map(|r| r.id).chain(rest.into_iter().flatten()).collect();
    assert_eq!(listed, newest_first, "every job once, newest first, nothing made later");
    // A listing begun now has them.
    let again: Vec<JobId> = pages(b.store.as_ref(), all(100)).await.concat();
    assert_eq!(again.len(), 27);
    assert_eq!((again[0], again[26]), (late_new.id, late_old.id));
}

async fn the_listing_filters_by_tenant_status_model_and_time(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let base = now_millis();
    let other = ModelName::new("other").unwrap();
    let mut made = Vec::new();
    for i in 0..12_i64 {
        let mut r = made_at(base + i);
        r.tenant = match i % 3 {
            0 => Some("a".into()),
            1 => Some("b".into()),
            _ => None,
        };
        if i % 4 == 0 {
            r.model = other.clone();
        }
        b.store.insert(&r, &ENVELOPE).await.unwrap();
        if i % 2 == 0 {
            b.store.start(r.id, "w").await.unwrap();
            b.store.finish(r.id, 1, &succeeded("1")).await.unwrap();
        }
        made.push(b.store.get(r.id).await.unwrap().unwrap());
    }
    made.reverse();
    let expect = |f: &dyn Fn(&JobRecord) -> bool| made.iter().filter(|r| f(r)).map(|r| r.id).collect::<Vec<_>>();
    let run = |q: ListQuery| {
        let store = b.store.clone();
        async move { pages(store.as_ref(), q).await.concat() }
    };
    let a = run(ListQuery { tenant: Some("a".into()), ..all(3) }).await;
    assert_eq!(a, expect(&|r| r.tenant.as_deref() == Some("a")), "tenant a's, in pages of 3");
    assert_eq!(run(ListQuery { tenant: Some("nobody".into()), ..all(3) }).await, vec![]);
    let done = run(ListQuery { status: Some(JobStatus::Succeeded), ..all(4) }).await;
    assert_eq!(done, expect(&|r| r.status == JobStatus::Succeeded));
    let queued_b = run(ListQuery { tenant: Some("b".into()), status: Some(JobStatus::Queued), ..all(2) }).await;
    assert_eq!(queued_b, expect(&|r| r.tenant.as_deref() == Some("b") && r.status == JobStatus::Queued));
    let of_other = run(ListQuery { model: Some(other.clone()), ..all(2) }).await;
    assert_eq!(of_other, expect(&|r| r.model == other));
    let recent = run(ListQuery { created_after: Some(base + 8), ..all(2) }).await;
    assert_eq!(recent, expect(&|r| r.created_at > base + 8), "strictly after");
    assert_eq!(recent.len(), 3);
    assert_eq!(run(ListQuery { created_after: Some(i64::MAX), ..all(2) }).await, vec![]);
    assert_eq!(run(ListQuery { created_after: Some(-5), ..all(20) }).await.len(), 12);
    let listed = b.store.list(&all(100)).await.unwrap().records;
    assert_eq!(listed, made, "records as get reads them, derived metrics and all");
}

async fn a_listing_page_examines_a_bounded_number_of_entries(kind: Kind) {
    let b = backend(kind, Duration::from_secs(60));
    let base = now_millis();
    let rare = ModelName::new("rare").unwrap();
    let needle = JobRecord { model: rare.clone(), ..made_at(base) };
    b.store.insert(&needle, &ENVELOPE).await.unwrap();
    let hay: Vec<JobRecord> = (1..=MAX_EXAMINED as i64 + 10).map(|i| made_at(base + i)).collect();
    futures::future::join_all(hay.iter().map(|r| b.store.insert(r, &ENVELOPE)))
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    let q = ListQuery { model: Some(rare), ..all(10) };
    let first = b.store.list(&q).await.unwrap();
    assert!(first.records.is_empty(), "the first page stops after {MAX_EXAMINED} entries");
    let found = pages(b.store.as_ref(), ListQuery { cursor: first.next, ..q }).await;
    assert_eq!(found.concat(), vec![needle.id], "and the next one finds it");
}

async fn withdrawn_and_expired_records_leave_the_listing(kind: Kind) {
    let b = backend(kind, Duration::from_millis(600));
    let base = now_millis();
    let (kept, withdrawn, short) = (made_at(base), made_at(base + 1), made_at(base + 2));
    for r in [&kept, &withdrawn] {
        b.store.insert(r, &ENVELOPE).await.unwrap();
    }
    b.store.discard(withdrawn.id).await.unwrap();
    assert_eq!(pages(b.store.as_ref(), all(10)).await.concat(), vec![kept.id]);
    b.store.insert(&short, &ENVELOPE).await.unwrap();
    // Past the retention every record has expired: the listing is empty (and says so at once).
    wait_until("every record expires", Duration::from_secs(10), || async {
        let page = b.store.list(&all(10)).await.unwrap();
        if page.records.is_empty() && page.next.is_none() { Ok(()) } else { Err(page.records.len()) }
    })
    .await;
}

/// The Redis listings drop the entries of records that expired, as new records join them (each
/// join walks two entries on), not only when a listing reads past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_listing_forgets_expired_records_as_new_ones_join() {
    const JOBS: usize = 20;
    let mut args = backend_args(Duration::from_millis(400));
    args.result_retention = Some(Duration::from_secs(60));
    let b = backend_with(Kind::External, &args);
    let client = redis::Client::open(args.redis_url.expose()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let (all, tenant) = (format!("{}jobs", args.key_prefix), format!("{}tenant:t:jobs", args.key_prefix));
    let entries = |key: String| {
        let mut conn = conn.clone();
        async move { redis::cmd("ZCARD").arg(key).query_async::<usize>(&mut conn).await.unwrap() }
    };
    let old: Vec<JobRecord> = (0..JOBS).map(|_| JobRecord { tenant: Some("t".into()), ..record() }).collect();
    for r in &old {
        b.store.insert(r, &ENVELOPE).await.unwrap();
    }
    assert_eq!((entries(all.clone()).await, entries(tenant.clone()).await), (JOBS, JOBS));
    // Queued and never touched, they expire after the live retention.
    wait_until("the first records expire", Duration::from_secs(10), || async {
        let left: usize = redis::cmd("EXISTS")
            .arg(old.iter().map(|r| format!("{}job:{}", args.key_prefix, r.id)).collect::<Vec<_>>())
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        if left == 0 { Ok(()) } else { Err(left) }
    })
    .await;
    // As many new finished ones (kept a minute) as there were: the old entries are gone with them.
    for _ in 0..JOBS {
        let r = JobRecord { tenant: Some("t".into()), ..record() };
        b.store.insert(&r, &ENVELOPE).await.unwrap();
        b.store.start(r.id, "w").await.unwrap();
        b.store.finish(r.id, 1, &succeeded("1")).await.unwrap();
    }
    let (left_all, left_tenant) = (entries(all).await, entries(tenant).await);
    assert_eq!((left_all, left_tenant), (JOBS, JOBS), "only the new records are listed");
}
