//! What a user sees, on both backends: real embeddings, many concurrent jobs, clear errors for bad
//! input, redelivery of a job whose worker died before acknowledging, and record expiry.

use std::time::Duration;

use futures::StreamExt;
use kiln_common::store::{Outcome, Start, Transition};
use kiln_common::testing::{Kind, wait_until};
use kiln_proto::{Envelope, JobId, JobRecord, JobStatus, ModelName, now_millis};
use serde_json::json;

use crate::harness::{Env, MODEL, cosine, embeddings, norm};

kiln_common::both_backends!(
    embeddings_match_the_reference_model,
    two_hundred_concurrent_jobs_all_succeed,
    bad_input_gets_a_clear_error,
    job_of_a_worker_that_died_before_acking_is_redelivered_and_completes_once,
    finished_records_expire_after_retention,
    health_readiness_and_models,
    worker_fails_a_bad_job_without_harming_its_batch_mates,
);

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

async fn embeddings_match_the_reference_model(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let texts = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar on stage.",
        "The stock market fell sharply today.",
    ];
    let r = gw.submit(&json!({ "model": MODEL, "input": { "texts": texts }, "metadata": { "user": "u1" } })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.headers["location"], format!("/v1/jobs/{id}"));
    assert_eq!(r.body["status"], "queued");

    let job = gw.finished(id.parse().unwrap(), JOB_TIMEOUT).await;
    let e = embeddings(&job);
    assert_eq!(job["output"]["dim"], 384);
    assert_eq!(e.len(), 3);
    for v in &e {
        assert_eq!(v.len(), 384);
        assert!((norm(v) - 1.0).abs() < 1e-4, "not unit length: {}", norm(v));
    }
    let similar = cosine(&e[0], &e[1]);
    let unrelated = cosine(&e[0], &e[2]);
    assert!((similar - 0.619).abs() <= 0.01, "guitar sentences cosine {similar}, expected 0.619 ± 0.01");
    assert!(unrelated < 0.1, "unrelated cosine {unrelated}, expected < 0.1");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["metadata"], json!({ "user": "u1" }));
    assert_eq!(job["cached"], false);
    assert!(job["started_at"].is_string() && job["completed_at"].is_string(), "{job}");
    assert!(
        job["metrics"]["queue_ms"].as_i64().unwrap() >= 0 && job["metrics"]["run_ms"].as_i64().unwrap() >= 0,
        "{job}"
    );

    // The single-text form gives the same vector as the same text inside a batch.
    let single = gw.submit_ok(json!({ "text": texts[0] })).await;
    let alone = embeddings(&gw.finished(single, JOB_TIMEOUT).await);
    assert!(cosine(&alone[0], &e[0]) > 0.9999, "padding changed the embedding");
    worker.stop().await;
    gw.stop().await;
}

/// 200 distinct, ordinary sentences.
fn sentences(n: usize) -> Vec<String> {
    let who = [
        "The cat",
        "My neighbour",
        "A tired pilot",
        "The committee",
        "Our old dog",
        "A young chef",
        "The orchestra",
        "Every student",
        "The mayor",
        "A lone sailor",
    ];
    let did = [
        "quietly read",
        "painted",
        "argued about",
        "carefully repaired",
        "forgot",
        "celebrated",
        "photographed",
        "sold",
        "discovered",
        "studied",
    ];
    let what = [
        "the broken clock",
        "a map of the harbour",
        "the winter garden",
        "an unfinished novel",
        "the new bridge",
        "a bowl of soup",
        "the election results",
        "a rare beetle",
        "the night sky",
        "an old violin",
    ];
    (0..n)
        .map(|i| format!("{} {} {} on day {}.", who[i % 10], did[(i / 10) % 10], what[(i / 100 + i) % 10], i))
        .collect()
}

async fn two_hundred_concurrent_jobs_all_succeed(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let texts = sentences(200);
    let ids: Vec<_> = futures::stream::iter(texts.iter().map(|t| gw.submit_ok(json!({ "text": t }))))
        .buffer_unordered(200)
        .collect()
        .await;
    assert_eq!(ids.len(), 200);
    let records: Vec<_> =
        futures::stream::iter(ids.iter().map(|id| gw.finished(*id, JOB_TIMEOUT))).buffer_unordered(32).collect().await;
    for job in &records {
        let e = embeddings(job);
        assert_eq!((e.len(), e[0].len()), (1, 384), "{job}");
        assert!((norm(&e[0]) - 1.0).abs() < 1e-4);
    }
    worker.stop().await;
    gw.stop().await;
}

async fn bad_input_gets_a_clear_error(kind: Kind) {
    let env = Env::new(kind);
    let config = kiln_gateway::GatewayConfig { max_body_bytes: 4096, ..crate::harness::open_gateway() };
    let gw = env.gateway_with(config).await;
    let json_ct = Some("application/json");
    let long = "a".repeat(5000);
    // (content type, body, expected status, expected code, a word the message must contain)
    type Case<'a> = (Option<&'a str>, Vec<u8>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            json_ct,
            br#"{"model":"no-such-model","input":{"text":"x"}}"#.to_vec(),
            404,
            "model_not_found",
            "no-such-model",
        ),
        (json_ct, b"{\"model\": ".to_vec(), 400, "malformed_json", "EOF"),
        (json_ct, br#"{"model":"all-minilm-l6-v2","input":{}}"#.to_vec(), 422, "invalid_input", "input.text"),
        (
            json_ct,
            br#"{"model":"all-minilm-l6-v2","input":{"text":42}}"#.to_vec(),
            422,
            "invalid_input",
            "input.text: must be a string",
        ),
        (
            json_ct,
            br#"{"model":"all-minilm-l6-v2","input":{"texts":["ok",false]}}"#.to_vec(),
            422,
            "invalid_input",
            "input.texts[1]",
        ),
        (json_ct, br#"{"model":"all-minilm-l6-v2"}"#.to_vec(), 422, "invalid_request", "input"),
        (json_ct, br#"{"input":{"text":"x"}}"#.to_vec(), 422, "invalid_request", "model"),
        (json_ct, br#"{"model":7,"input":{"text":"x"}}"#.to_vec(), 422, "invalid_request", "model: must be a string"),
        (
            json_ct,
            br#"{"model":"all-minilm-l6-v2","input":{"text":"x"},"colour":1}"#.to_vec(),
            422,
            "invalid_request",
            "colour",
        ),
        (json_ct, br#"[1,2]"#.to_vec(), 422, "invalid_request", "object"),
        (
            json_ct,
            format!(r#"{{"model":"all-minilm-l6-v2","input":{{"text":"{long}"}}}}"#).into_bytes(),
            413,
            "payload_too_large",
            "4096",
        ),
        (
            Some("text/plain"),
            br#"{"model":"all-minilm-l6-v2","input":{"text":"x"}}"#.to_vec(),
            415,
            "unsupported_media_type",
            "text/plain",
        ),
    ];
    for (ct, body, status, code, needle) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let r = gw.post_raw("/v1/jobs", ct, body).await;
        assert_eq!(r.status, status, "{shown} → {}", r.body);
        assert_eq!(r.body["error"]["code"], code, "{shown} → {}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{shown}: message {message:?} should mention {needle:?}");
    }
    for path in [format!("/v1/jobs/{}", kiln_proto::JobId::random()), "/v1/jobs/not-a-job".into()] {
        let r = gw.get(&path).await;
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("job_not_found")), "{path}");
    }
    let r = gw.get("/v2/nothing").await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("not_found")));
    gw.stop().await;
}

async fn job_of_a_worker_that_died_before_acking_is_redelivered_and_completes_once(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let id = gw.submit_ok(json!({ "text": "A job whose first worker dies." })).await;

    // A worker takes the job, marks it running, and dies (its channel closes) without acking.
    let model = ModelName::new(MODEL).unwrap();
    let mut dying = env.backend.broker.consume(&kiln_common::broker::Lane::shared(model.clone()), 1).await.unwrap();
    let delivery = tokio::time::timeout(JOB_TIMEOUT, dying.next()).await.expect("delivery").unwrap().unwrap();
    assert!(!delivery.redelivered);
    assert_eq!(env.backend.store.start(id, "dying-worker").await.unwrap(), Start::Started { attempt: 1 });
    assert_eq!(gw.job(id).await["status"], "running");
    drop(delivery);
    drop(dying);

    let worker = env.worker();
    let job = gw.finished(id, JOB_TIMEOUT).await;
    assert_eq!(embeddings(&job)[0].len(), 384);
    assert_eq!(job["attempts"], 2, "the redelivered run is the second attempt: {job}");

    // A duplicate finishing late cannot overwrite the stored result.
    let late = Outcome::Succeeded(r#"{"dim":1,"embeddings":[[0.0]]}"#.into());
    assert_eq!(
        env.backend.store.finish(id, 1, &late).await.unwrap(),
        Transition::AlreadyTerminal(JobStatus::Succeeded)
    );
    assert_eq!(gw.job(id).await["output"], job["output"]);
    worker.stop().await;
    gw.stop().await;
}

async fn finished_records_expire_after_retention(kind: Kind) {
    let env = Env::with_retention(kind, Duration::from_secs(2));
    let gw = env.gateway().await;
    let worker = env.worker();
    let id = gw.submit_ok(json!({ "text": "short-lived" })).await;
    gw.finished(id, JOB_TIMEOUT).await;
    wait_until("the finished record expires", Duration::from_secs(15), || async {
        let r = gw.get(&format!("/v1/jobs/{id}")).await;
        if r.status == 404 { Ok(()) } else { Err(r.body) }
    })
    .await;
    worker.stop().await;
    gw.stop().await;
}

async fn health_readiness_and_models(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    assert_eq!(gw.get("/healthz").await.status, 200);
    let ready = gw.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body["checks"], json!({ "broker": "ok", "store": "ok" }));
    let models = gw.get("/v1/models").await;
    let m = &models.body["data"][0];
    assert_eq!(
        (m["name"].as_str(), m["task"].as_str(), m["max_batch"].as_u64()),
        (Some(MODEL), Some("embedding"), Some(64))
    );
    assert!(m["input_schema"]["oneOf"].is_array());
    assert_eq!(m["workers"], json!([]), "no worker runs yet: {m}");
    let worker = env.worker();
    let listed = wait_until("the worker is listed under its model", Duration::from_secs(60), || async {
        let m = gw.get("/v1/models").await.body["data"][0].clone();
        if m["workers"].as_array().is_some_and(|w| w.len() == 1) { Ok(m) } else { Err(m["workers"].clone()) }
    })
    .await;
    assert!(listed["workers"][0].is_string(), "{listed}");
    worker.stop().await;
    gw.stop().await;
}

/// The worker trusts nothing off the wire: a job whose input slipped past validation fails alone
/// with `invalid_input`, an undecodable message is dropped, and the rest of the batch succeeds.
async fn worker_fails_a_bad_job_without_harming_its_batch_mates(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let model = ModelName::new(MODEL).unwrap();
    env.backend.broker.declare(std::slice::from_ref(&model)).await.unwrap();
    let mut ids = Vec::new();
    for input in [json!({ "texts": ["fine one"] }), json!({ "texts": 5 }), json!({ "texts": ["fine two"] })] {
        let id = JobId::random();
        env.backend.store.create(&JobRecord::queued(id, model.clone(), now_millis(), None)).await.unwrap();
        let envelope = Envelope::new(id, model.clone(), input, now_millis(), None);
        env.backend
            .broker
            .publish(&kiln_common::broker::Lane::shared(model.clone()), serde_json::to_vec(&envelope).unwrap())
            .await
            .unwrap();
        ids.push(id);
    }
    env.backend
        .broker
        .publish(&kiln_common::broker::Lane::shared(model.clone()), b"not an envelope".to_vec())
        .await
        .unwrap();
    let worker = env.worker();
    let jobs: Vec<_> = futures::future::join_all(ids.iter().map(|id| gw.finished(*id, JOB_TIMEOUT))).await;
    assert_eq!(embeddings(&jobs[0]).len(), 1);
    assert_eq!(jobs[1]["status"], "failed", "{}", jobs[1]);
    assert_eq!(jobs[1]["error"]["code"], "invalid_input");
    assert!(jobs[1]["error"]["message"].as_str().unwrap().contains("input.texts"), "{}", jobs[1]);
    assert_eq!(embeddings(&jobs[2]).len(), 1);
    worker.stop().await;
    gw.stop().await;
}
