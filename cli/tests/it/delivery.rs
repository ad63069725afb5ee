//! How results reach clients, on both backends: `Prefer: wait`, long-polling, server-sent events
//! with resume (also across gateway replicas), cancellation, deadlines by header, idempotency keys,
//! and Standard Webhooks delivered to a real HTTP receiver with retries, give-up and restarts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{Hmac, Mac};
use kiln_common::Backend;
use kiln_common::config::Secret;
use kiln_common::testing::{Kind, wait_until};
use kiln_common::webhooks::WebhookConfig;
use kiln_gateway::GatewayConfig;
use kiln_proto::JobId;
use kiln_worker::WorkerConfig;
use serde_json::{Value, json};

use crate::harness::{Env, Gateway, MODEL, SseClient, TempRepo, embeddings, set};

kiln_common::both_backends!(
    prefer_wait_answers_with_the_finished_job,
    get_with_wait_long_polls_until_done,
    sse_streams_events_and_resumes_without_loss,
    cancel_stops_queued_and_running_jobs,
    cancel_after_header_expires_a_queued_job,
    idempotency_key_makes_one_job_of_concurrent_repeats,
    webhook_is_signed_and_retried_until_delivered,
    webhook_to_a_dead_receiver_is_given_up,
    webhook_admission_refuses_internal_targets,
    a_client_hanging_up_mid_submit_never_strands_its_idempotency_key,
);

const T: Duration = Duration::from_secs(120);
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn job_body(text: &str) -> Value {
    json!({ "model": MODEL, "input": { "text": text } })
}

async fn post(gw: &Gateway, body: &Value, headers: &[(&str, &str)]) -> (u16, HeaderMap, Value) {
    let mut req = gw.http.post(gw.url("/v1/jobs")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

async fn prefer_wait_answers_with_the_finished_job(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    // No worker yet: the wait runs out and the job comes back queued, 202.
    let started = Instant::now();
    let (status, headers, body) = post(&gw, &job_body("waiting in vain"), &[("prefer", "wait=1")]).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("queued")), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    assert!(headers.contains_key("location"));
    let worker = env.worker();
    let (status, headers, body) =
        post(&gw, &job_body("waiting with success"), &[("prefer", "respond-async, wait=60")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(embeddings(&body).len(), 1);
    assert_eq!(headers["preference-applied"], "wait=60");
    worker.stop().await;
    gw.stop().await;
}

async fn get_with_wait_long_polls_until_done(kind: Kind) {
    let env = Env::new(kind);
    let gw = Arc::new(env.gateway().await);
    let id = gw.submit_ok(json!({ "text": "long-polled" })).await;
    let poll = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.get(&format!("/v1/jobs/{id}?wait=60")).await })
    };
    let worker = env.worker();
    let r = poll.await.unwrap();
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("succeeded")), "{}", r.body);
    worker.stop().await;
}

async fn sse_streams_events_and_resumes_without_loss(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    // A second replica: its own backend connections, the same queues and keys.
    let other = match &env.args {
        Some(args) => Env::from_parts(Backend::external(args).unwrap(), env.args.clone()).gateway().await,
        None => env.gateway().await,
    };
    let id = gw.submit_ok(json!({ "texts": ["streamed", "events"] })).await;
    let mut sse = SseClient::open(&other, id, None).await;
    let first = sse.next().await.expect("the current state");
    assert_eq!((first.event.as_str(), first.data["status"].as_str()), ("status", Some("queued")), "{first:?}");
    let worker = env.worker();
    let live = sse.rest().await;
    let kinds: Vec<&str> = live.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"completed"), "{live:?}");
    let done = &live.last().unwrap().data;
    assert_eq!((done["status"].as_str(), embeddings(done).len()), (Some("succeeded"), 2));
    assert!(kinds.contains(&"status"), "the running transition was streamed: {live:?}");
    assert!(live.iter().all(|e| e.id.is_some()), "every live event has an id: {live:?}");

    // Resuming after the first live event replays exactly the rest.
    let resume_from = live[0].id.clone().unwrap();
    let replayed = SseClient::open(&gw, id, Some(&resume_from)).await.rest().await;
    let ids = |v: &[crate::harness::SseEvent]| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&replayed), ids(&live[1..]), "resume lost or repeated events");
    // A finished job's stream is its final state, then the end.
    let after = SseClient::open(&other, id, None).await.rest().await;
    assert_eq!(after.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), ["completed"]);
    let r = other.get(&format!("/v1/jobs/{}/events", JobId::random())).await;
    assert_eq!(r.status, 404);
    worker.stop().await;
}

async fn cancel_stops_queued_and_running_jobs(kind: Kind) {
    let models = TempRepo::new(set("max_batch", "2"));
    let env = Env::new(kind).with_models(&models);
    let gw = env.gateway().await;
    let queued = gw.submit_ok(json!({ "text": "never to run" })).await;
    let r = gw.http.post(gw.url(&format!("/v1/jobs/{queued}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let again = gw.http.post(gw.url(&format!("/v1/jobs/{queued}/cancel"))).send().await.unwrap();
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"]["code"], "job_finished");
    assert!(body["error"]["message"].as_str().unwrap().contains("canceled"), "{body}");

    let worker = env.worker_with(WorkerConfig { intra_threads: Some(1), ..WorkerConfig::default() });
    let texts: Vec<String> =
        (0..200).map(|i| format!("Sentence {i} of a job canceled while it runs, padded out a bit.")).collect();
    let running = gw.submit_ok(json!({ "texts": texts })).await;
    wait_until("the long job runs", T, || async {
        let j = gw.job(running).await;
        if j["status"] == "running" { Ok(()) } else { Err(j["status"].clone()) }
    })
    .await;
    let r = gw.http.post(gw.url(&format!("/v1/jobs/{running}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A job submitted after both shows the worker went on; the canceled ones stay canceled.
    let after = gw.submit_ok(json!({ "text": "after the cancels" })).await;
    gw.finished(after, T).await;
    let q = gw.job(queued).await;
    assert_eq!(
        (q["status"].as_str(), q["attempts"].as_u64(), q["error"]["code"].as_str()),
        (Some("canceled"), Some(0), Some("canceled"))
    );
    let r = gw.job(running).await;
    assert_eq!((r["status"].as_str(), r["output"].is_null()), (Some("canceled"), true), "{r}");
    let missing = gw.http.post(gw.url(&format!("/v1/jobs/{}/cancel", JobId::random()))).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    worker.stop().await;
    gw.stop().await;
}

async fn cancel_after_header_expires_a_queued_job(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let (status, _, body) = post(&gw, &job_body("soon stale"), &[("cancel-after", "0.05")]).await;
    assert_eq!(status, 202, "{body}");
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    let job = gw.finished(id, Duration::from_secs(10)).await;
    assert_eq!((job["status"].as_str(), job["error"]["code"].as_str()), (Some("expired"), Some("deadline_exceeded")));
    let (status, _, body) = post(&gw, &job_body("x"), &[("cancel-after", "soon")]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_request")), "{body}");
    gw.stop().await;
}

async fn idempotency_key_makes_one_job_of_concurrent_repeats(kind: Kind) {
    let env = Env::new(kind);
    let gw = Arc::new(env.gateway().await);
    let body = job_body("submitted twenty times at once");
    let answers = futures::future::join_all((0..20).map(|_| {
        let (gw, body) = (gw.clone(), body.clone());
        async move { post(&gw, &body, &[("idempotency-key", "order-42")]).await }
    }))
    .await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, _, body)| {
            assert_eq!(*status, 202, "{body}");
            body["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "20 concurrent repeats made {} jobs", ids.len());
    let (status, _, reused) = post(&gw, &job_body("a different body"), &[("idempotency-key", "order-42")]).await;
    assert_eq!((status, reused["error"]["code"].as_str()), (409, Some("idempotency_key_reused")), "{reused}");
    let (_, _, other) = post(&gw, &body, &[("idempotency-key", "order-43")]).await;
    assert!(!ids.contains(other["id"].as_str().unwrap()));
    // Once the job is done, a repeat answers with the finished job.
    let worker = env.worker();
    let id: JobId = ids.iter().next().unwrap().parse().unwrap();
    gw.finished(id, T).await;
    let (status, _, repeat) = post(&gw, &body, &[("idempotency-key", "order-42")]).await;
    assert_eq!(
        (status, repeat["id"].as_str(), repeat["status"].as_str()),
        (200, Some(id.to_string().as_str()), Some("succeeded"))
    );
    worker.stop().await;
}

/// A webhook receiver: answers the first `failures` requests with `fail_status`, then 200.
#[derive(Clone)]
pub(crate) struct Receiver {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<(HeaderMap, String)>>>,
}

impl Receiver {
    pub(crate) async fn start(failures: usize, fail_status: u16) -> Self {
        let seen: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let log = log.clone();
                async move {
                    let n = {
                        let mut l = log.lock().unwrap();
                        l.push((headers, body));
                        l.len()
                    };
                    if n <= failures { StatusCode::from_u16(fail_status).unwrap() } else { StatusCode::OK }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, seen }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<(HeaderMap, String)> {
        self.seen.lock().unwrap().clone()
    }
}

/// Standard Webhooks verification, written from the specification, independent of the signer.
/// Standard Webhooks verification, written from the specification, independent of the signer; a
/// delivery without its headers does not verify.
pub(crate) fn verify(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let (Some(id), Some(ts), Some(sig)) =
        (headers.get("webhook-id"), headers.get("webhook-timestamp"), headers.get("webhook-signature"))
    else {
        return false;
    };
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    sig.to_str().unwrap_or_default().split(' ').any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

pub(crate) fn webhook_gateway(retry_base: Duration, give_up_after: Duration) -> GatewayConfig {
    GatewayConfig {
        webhooks: WebhookConfig {
            webhook_secret: Some(Secret::new(SECRET)),
            webhook_allowed_hosts: vec!["127.0.0.1".into()],
            webhook_retry_base: retry_base,
            webhook_retry_max: retry_base * 4,
            webhook_give_up_after: give_up_after,
            webhook_timeout: Duration::from_secs(5),
            ..WebhookConfig::default()
        },
        ..crate::harness::open_gateway()
    }
}

async fn webhook_is_signed_and_retried_until_delivered(kind: Kind) {
    let receiver = Receiver::start(3, 500).await;
    let env = Env::new(kind);
    let gw = env.gateway_with(webhook_gateway(Duration::from_millis(50), Duration::from_secs(3600))).await;
    let worker = env.worker();
    let (status, _, body) =
        post(&gw, &json!({ "model": MODEL, "input": { "text": "hooked" }, "webhook": receiver.url() }), &[]).await;
    assert_eq!(status, 202, "{body}");
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    let job = wait_until("the webhook is delivered", T, || async {
        let j = gw.job(id).await;
        if j["webhook"]["delivered_at"].is_string() { Ok(j) } else { Err(j["webhook"].clone()) }
    })
    .await;
    assert_eq!(job["webhook"]["attempts"], 4, "{}", job["webhook"]);
    assert_eq!(job["webhook"]["last_status"], 200);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 4);
    let first = &requests[0];
    for (headers, body) in &requests {
        assert!(verify(SECRET, headers, body), "signature does not verify: {headers:?}");
        assert_eq!(headers["webhook-id"], first.0["webhook-id"], "webhook-id changed across retries");
        assert_eq!(headers["webhook-timestamp"], first.0["webhook-timestamp"]);
        assert_eq!(body, &first.1, "the body changed across retries");
    }
    let payload: Value = serde_json::from_str(&first.1).unwrap();
    assert_eq!(
        (payload["type"].as_str(), payload["data"]["id"].as_str()),
        (Some("job.completed"), Some(id.to_string().as_str()))
    );
    assert_eq!(embeddings(&payload["data"]).len(), 1);
    // A tampered body does not verify.
    assert!(!verify(SECRET, &first.0, &first.1.replace("succeeded", "failed")));
    worker.stop().await;
    gw.stop().await;
}

async fn webhook_to_a_dead_receiver_is_given_up(kind: Kind) {
    let receiver = Receiver::start(usize::MAX, 503).await;
    let env = Env::new(kind);
    let gw = env.gateway_with(webhook_gateway(Duration::from_millis(100), Duration::from_millis(1500))).await;
    let worker = env.worker();
    let body = json!({ "model": MODEL, "input": { "text": "nobody listens" }, "webhook": receiver.url(), "webhook_events": ["start"] });
    let (status, _, body) = post(&gw, &body, &[]).await;
    assert_eq!(status, 202, "{body}");
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    // A job's deliveries go out in order: `job.completed` is tried once `job.started` is given up.
    let job = wait_until("both webhooks are tried and given up", T, || async {
        let j = gw.job(id).await;
        let hook = &j["webhook"];
        let completed_tried = receiver.requests().iter().any(|(_, b)| b.contains("\"job.completed\""));
        if hook["gave_up_at"].is_string() && j["status"] == "succeeded" && completed_tried {
            Ok(j)
        } else {
            Err(hook.clone())
        }
    })
    .await;
    let hook = &job["webhook"];
    assert!(hook["delivered_at"].is_null(), "{hook}");
    assert_eq!(hook["last_status"], 503);
    assert_eq!(hook["events"], json!(["completed", "start"]));
    let types: std::collections::BTreeSet<String> = receiver
        .requests()
        .iter()
        .map(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["type"].as_str().unwrap().to_owned())
        .collect();
    assert!(types.contains("job.started") && types.contains("job.completed"), "{types:?}");
    assert!(hook["attempts"].as_u64().unwrap() >= 4, "retried before giving up: {hook}");
    worker.stop().await;
    gw.stop().await;
}

async fn webhook_admission_refuses_internal_targets(kind: Kind) {
    let env = Env::new(kind);
    let mut strict = webhook_gateway(Duration::from_secs(1), Duration::from_secs(60));
    strict.webhooks.webhook_allowed_hosts.clear();
    let gw = env.gateway_with(strict).await;
    for (url, field) in [
        ("http://127.0.0.1:9/hook", "webhook"),
        ("http://169.254.169.254/latest", "webhook"),
        ("http://10.0.0.8/hook", "webhook"),
        ("ftp://example.com/hook", "webhook"),
    ] {
        let (status, _, body) =
            post(&gw, &json!({ "model": MODEL, "input": { "text": "x" }, "webhook": url }), &[]).await;
        assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_request")), "{url}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().starts_with(field), "{body}");
    }
    let bad_events = json!({ "model": MODEL, "input": { "text": "x" }, "webhook": "https://hooks.example.com/k", "webhook_events": ["finish"] });
    let (status, _, body) = post(&gw, &bad_events, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("webhook_events[0]"), "{body}");
    gw.stop().await;
    // Without a signing secret, webhooks are refused outright.
    let gw = env.gateway().await;
    let (status, _, body) =
        post(&gw, &json!({ "model": MODEL, "input": { "text": "x" }, "webhook": "https://hooks.example.com/k" }), &[])
            .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("KILN_WEBHOOK_SECRET"), "{body}");
    gw.stop().await;
}

/// A `completed` webhook still owed when its gateway stops is delivered by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_webhook_is_delivered_after_a_gateway_restart() {
    let receiver = Receiver::start(2, 500).await;
    let env = Env::new(Kind::External);
    let args = env.args.clone().unwrap();
    let first = env.gateway_with(webhook_gateway(Duration::from_secs(2), Duration::from_secs(3600))).await;
    let worker = env.worker();
    let (status, _, body) = post(
        &first,
        &json!({ "model": MODEL, "input": { "text": "outlives its gateway" }, "webhook": receiver.url() }),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    wait_until("the first attempt failed", T, || async {
        let n = receiver.requests().len();
        if n >= 1 { Ok(()) } else { Err(n) }
    })
    .await;
    first.stop().await;
    let second_env = Env::from_parts(Backend::external(&args).unwrap(), Some(args.clone()));
    let second = second_env.gateway_with(webhook_gateway(Duration::from_millis(100), Duration::from_secs(3600))).await;
    let job = wait_until("the webhook is delivered by the new gateway", T, || async {
        let j = second.job(id).await;
        if j["webhook"]["delivered_at"].is_string() { Ok(j) } else { Err(j["webhook"].clone()) }
    })
    .await;
    assert_eq!(job["webhook"]["attempts"], 3, "{}", job["webhook"]);
    assert!(receiver.requests().iter().all(|(h, b)| verify(SECRET, h, b)));
    worker.stop().await;
    second.stop().await;
}

async fn a_client_hanging_up_mid_submit_never_strands_its_idempotency_key(kind: Kind) {
    // A broker that accepts TCP connections and never answers: every publish hangs for the whole
    // connect timeout, then fails.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let env = Env::new(kind);
    let hanging = kiln_common::broker::amqp::AmqpBroker::new(kiln_common::broker::amqp::AmqpConfig {
        url: Secret::new(format!("amqp://127.0.0.1:{port}/%2f")),
        topology: kiln_common::broker::amqp::Topology::new("silent"),
        connect_timeout: Duration::from_millis(1500),
        confirm_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(100),
        tls: Default::default(),
    });
    let backend = Backend { broker: Arc::new(hanging), ..env.backend.clone() };
    let gw = crate::harness::Env::from_parts(backend, env.args.clone()).gateway().await;
    let body = job_body("hung up on");
    let key = format!("hangup-{}", kiln_common::testing::unique_prefix());
    // The client gives up while the gateway is still publishing.
    let impatient = kiln_common::tls::http_client().timeout(Duration::from_millis(300)).build().unwrap();
    let gone = impatient.post(gw.url("/v1/jobs")).header("idempotency-key", &key).json(&body).send().await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "the first client timed out");
    // Its accept still runs to the end — the publish fails and the key is released — so the
    // retry gets the broker's answer, not a key held forever by a request nobody waits for.
    let started = Instant::now();
    let (status, headers, answer) = post(&gw, &body, &[("idempotency-key", &key)]).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("broker_unavailable")), "{answer}");
    assert!(headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    gw.stop().await;
}
