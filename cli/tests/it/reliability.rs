//! Reliability promises on both backends, with in-process roles: a poison job is retried with
//! backoff, given up and dead-lettered while its batch-mates succeed, and can be redriven; a job
//! whose deadline passes in the queue expires without running; a long job is taken over by a
//! lease and completes once.

use std::time::Duration;

use kiln_common::dlq::{self, Selection};
use kiln_common::testing::{Kind, wait_until};
use kiln_worker::WorkerConfig;
use serde_json::json;

use crate::harness::{Env, TempRepo, embeddings, set};

kiln_common::both_backends!(
    a_job_recorded_but_never_published_is_found_by_the_sweeper_and_runs,
    poison_job_is_retried_then_dead_lettered_while_its_batch_mates_succeed,
    deadline_passed_in_the_queue_expires_the_job_without_running_it,
    long_job_is_taken_over_by_a_lease_and_completes_once,
    worker_probes_report_consuming_models,
);

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Regression (issue 12.2): a gateway that died between recording a job and publishing it left a
/// `queued` record with no message, forever. The sweeper finds it and queues it from its envelope.
async fn a_job_recorded_but_never_published_is_found_by_the_sweeper_and_runs(kind: Kind) {
    let mut args = kiln_common::testing::backend_args(Duration::from_secs(3600));
    args.sweep_after = Duration::from_secs(1);
    let backend = kiln_common::testing::backend_with(kind, &args);
    let env = Env::from_parts(backend, (kind == Kind::External).then_some(args));
    let gw = env.gateway().await;
    let worker = env.worker();
    // The worker consumes (so the sweeper's message is taken at once, not swept again).
    let warm = gw.submit_ok(json!({ "text": "warm-up" })).await;
    gw.finished(warm, JOB_TIMEOUT).await;
    let model = kiln_proto::ModelName::new(crate::harness::MODEL).unwrap();
    let id = kiln_proto::JobId::random();
    let mut envelope = kiln_proto::Envelope::new(
        id,
        model.clone(),
        json!({ "texts": ["never published"] }),
        kiln_proto::now_millis(),
        None,
    );
    envelope.metadata = Some(json!({ "stranded": true }));
    let body = serde_json::to_string(&envelope).unwrap();
    let how = kiln_common::store::Creation { envelope: Some(&body), idempotency_key: None };
    env.backend.store.insert(&envelope.record(), &how).await.unwrap();
    let job = gw.finished(id, JOB_TIMEOUT).await;
    assert_eq!(embeddings(&job).len(), 1);
    assert_eq!((job["attempts"].as_u64(), job["metadata"]["stranded"].as_bool()), (Some(1), Some(true)), "{job}");
    worker.stop().await;
    gw.stop().await;
}

/// Regression (issue 12.3): a worker that found no record recreated a bare one, without the job's
/// deadline, webhook or metadata. The message carries them now, and the rebuilt record has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_lost_by_the_store_is_rebuilt_from_its_message_whole() {
    let env = Env::new(Kind::External);
    let args = env.args.clone().unwrap();
    let gw =
        env.gateway_with(crate::delivery::webhook_gateway(Duration::from_millis(100), Duration::from_secs(5))).await;
    let r = gw
        .submit(&json!({
            "model": crate::harness::MODEL,
            "input": { "text": "a job whose record the store loses" },
            "metadata": { "owner": "rebuild-test" },
            "deadline_s": 3600,
            "webhook": "http://127.0.0.1:9/hook",
        }))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id: kiln_proto::JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let deadline = r.body["deadline_at"].clone();
    // The store loses the record (a Redis that lost its last second of writes, say).
    let client = redis::Client::open(args.redis_url.expose()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 =
        redis::cmd("DEL").arg(format!("{}job:{id}", args.key_prefix)).query_async(&mut conn).await.unwrap();
    assert_eq!(deleted, 1);
    let worker = env.worker();
    let job = wait_until("the rebuilt job finishes", JOB_TIMEOUT, || async {
        let r = gw.get(&format!("/v1/jobs/{id}")).await;
        if r.status == 200 && r.body["status"] == "succeeded" { Ok(r.body) } else { Err((r.status, r.body)) }
    })
    .await;
    assert_eq!(job["deadline_at"], deadline, "{job}");
    assert_eq!(job["metadata"]["owner"], "rebuild-test", "{job}");
    assert_eq!(job["webhook"]["url"], "http://127.0.0.1:9/hook", "{job}");
    worker.stop().await;
    gw.stop().await;
}

/// A text longer than the model's 512 positions: with truncation lifted to 1024 tokens, ONNX
/// Runtime fails on it every time — a real poison job.
pub fn poison_text() -> String {
    "overflow ".repeat(700)
}

/// The project's models with truncation lifted past the model's limit.
pub fn poisonable_repo() -> TempRepo {
    TempRepo::new(set("max_length", "1024"))
}

async fn poison_job_is_retried_then_dead_lettered_while_its_batch_mates_succeed(kind: Kind) {
    let models = poisonable_repo();
    let env = Env::new(kind).with_models(&models);
    let gw = env.gateway().await;
    let config = WorkerConfig {
        max_attempts: 3,
        retry_base: Duration::from_millis(100),
        intra_threads: Some(2),
        ..WorkerConfig::default()
    };
    let worker = env.worker_with(config.clone());
    let poison = gw.submit_ok(json!({ "text": poison_text() })).await;
    let mut good = Vec::new();
    for i in 0..20 {
        good.push(gw.submit_ok(json!({ "text": format!("good sentence number {i}") })).await);
    }
    for id in &good {
        assert_eq!(embeddings(&gw.finished(*id, JOB_TIMEOUT).await).len(), 1);
    }
    let dead = gw.finished(poison, JOB_TIMEOUT).await;
    assert_eq!(dead["status"], "failed", "{dead}");
    assert_eq!(dead["error"]["code"], "inference_failed");
    assert!(dead["error"]["message"].as_str().unwrap().contains("gave up after 3 attempts"), "{dead}");
    assert_eq!(dead["attempts"], 3);

    let letters = wait_until("the poison job is in the dead-letter queue", Duration::from_secs(10), || async {
        let l = dlq::list(&env.backend, 10).await.unwrap();
        if l.len() == 1 { Ok(l) } else { Err(l.len()) }
    })
    .await;
    assert_eq!(letters[0].envelope.id, poison);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].envelope.history.len(), 2, "two failed attempts before the last: {:?}", letters[0]);

    // Redriven, it runs again from a clean slate — and, still poison, ends in the queue again.
    let report = dlq::redrive(&env.backend, Selection::Job(poison)).await.unwrap();
    assert_eq!(report.redriven, vec![poison], "{report:?}");
    wait_until("the redriven job fails again", JOB_TIMEOUT, || async {
        let job = gw.job(poison).await;
        let again = dlq::list(&env.backend, 10).await.unwrap();
        if job["status"] == "failed" && again.len() == 1 { Ok(()) } else { Err((job["status"].clone(), again.len())) }
    })
    .await;
    assert_eq!(gw.job(poison).await["attempts"], 3);
    worker.stop().await;
    gw.stop().await;
}

async fn deadline_passed_in_the_queue_expires_the_job_without_running_it(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let r = gw
        .submit(&json!({ "model": crate::harness::MODEL, "input": { "text": "too late" }, "deadline_s": 0.05 }))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.body["deadline_at"].is_string(), "{}", r.body);
    let id = r.body["id"].as_str().unwrap().parse().unwrap();
    // No worker is running: the gateway itself reports the expiry once the deadline has passed.
    let expired = gw.finished(id, Duration::from_secs(10)).await;
    assert_eq!(expired["status"], "expired", "{expired}");
    assert_eq!(expired["error"]["code"], "deadline_exceeded");

    let worker = env.worker();
    let next = gw.submit_ok(json!({ "text": "on time" })).await;
    gw.finished(next, JOB_TIMEOUT).await;
    let still = gw.job(id).await;
    assert_eq!((still["status"].as_str(), still["attempts"].as_u64()), (Some("expired"), Some(0)), "{still}");

    for bad in [json!(0), json!(-1), json!("10"), json!(1e9)] {
        let r =
            gw.submit(&json!({ "model": crate::harness::MODEL, "input": { "text": "x" }, "deadline_s": bad })).await;
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (422, Some("invalid_request")), "{bad}: {}", r.body);
    }
    worker.stop().await;
    gw.stop().await;
}

async fn long_job_is_taken_over_by_a_lease_and_completes_once(kind: Kind) {
    let models = TempRepo::new(set("max_batch", "4"));
    let env = Env::new(kind).with_models(&models);
    let gw = env.gateway().await;
    let config = WorkerConfig {
        lease_after: Duration::from_millis(100),
        lease_ttl: Duration::from_millis(900),
        // One session of one thread, so the job's texts run one batch after another.
        intra_threads: Some(1),
        sessions: Some(1),
        ..WorkerConfig::default()
    };
    let worker = env.worker_with(config);
    let texts: Vec<String> = (0..256)
        .map(|i| format!("A somewhat longer sentence, number {i}, to keep the model busy for a while, and then some more words so that every text costs the model a little longer."))
        .collect();
    let id = gw.submit_ok(json!({ "texts": texts })).await;
    let job = gw.finished(id, JOB_TIMEOUT).await;
    assert_eq!(embeddings(&job).len(), 256);
    assert!(job["metrics"]["run_ms"].as_i64().unwrap() > 300, "premise: the run outlasts several heartbeats: {job}");
    assert_eq!(job["attempts"], 1, "leased, heartbeated, never reaped: {job}");
    worker.stop().await;
    gw.stop().await;
}

async fn worker_probes_report_consuming_models(kind: Kind) {
    let env = Env::new(kind);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let worker = env.worker_with(WorkerConfig { health_listen: Some(addr), ..WorkerConfig::default() });
    let http = kiln_common::tls::http_client().build().unwrap();
    let ready = wait_until("the worker reports ready", JOB_TIMEOUT, || async {
        let r = http.get(format!("http://{addr}/readyz")).send().await.map_err(|e| e.to_string())?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
        if status == 200 { Ok(body) } else { Err(format!("{status} {body}")) }
    })
    .await;
    assert_eq!(ready["models"][crate::harness::MODEL]["state"], "consuming", "{ready}");
    let live = http.get(format!("http://{addr}/healthz")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    worker.stop().await;
}
