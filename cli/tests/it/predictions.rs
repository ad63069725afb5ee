//! The predictions API against the official clients, on both backends: Replicate's Python client
//! (`replicate`, pinned) runs the terrain model and downloads its PNGs, creates and waits, cancels
//! a running prediction and reads a refusal; `standardwebhooks` verifies a prediction's webhook
//! and rejects it tampered; `Cancel-After` cancels a queued prediction and a running one (with the
//! gateway that accepted it gone); another tenant's prediction is not found.
//!
//! The clients live in the venv `scripts/client-venv.sh` makes (`scripts/test.sh` runs it); these
//! tests fail when it is missing.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use kiln_common::tenancy::{self, Limits, NewKey, Scope};
use kiln_common::testing::{Kind, wait_until};
use kiln_gateway::{AuthMode, GatewayConfig};
use kiln_proto::now_millis;
use kiln_worker::WorkerConfig;
use serde_json::{Value, json};

use crate::delivery::{Receiver, SECRET, webhook_gateway};
use crate::harness::{Env, Gateway, MODEL, TERRAIN};

kiln_common::both_backends!(
    the_replicate_client_runs_waits_cancels_and_reads_errors,
    cancel_after_cancels_queued_and_running_predictions,
    prediction_webhooks_are_the_prediction_signed_per_standard_webhooks,
);

const T: Duration = Duration::from_secs(180);

/// The venv's python: `KILN_CLIENT_PYTHON`, or the one `scripts/client-venv.sh` makes.
fn python() -> PathBuf {
    let path = std::env::var_os("KILN_CLIENT_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/deploy-tools/replicate-venv/bin/python")
    });
    assert!(path.exists(), "no {} — run scripts/client-venv.sh (scripts/test.sh does)", path.display());
    path
}

/// Runs a command of scripts/clients/replicate_client.py and returns the JSON line it printed.
async fn client(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/clients/replicate_client.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script).args(args).env("REPLICATE_POLL_INTERVAL", "0.1").kill_on_drop(true);
    let out = tokio::time::timeout(T, cmd.output()).await.expect("the client finishes").expect("python runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "replicate_client {} failed ({}):\n{stderr}\n{stdout}", args[0], out.status);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?} is not JSON ({e}); stderr: {stderr}"))
}

async fn token(env: &Env, tenant: &str) -> String {
    let scopes: BTreeSet<Scope> = [Scope::JobsSubmit, Scope::JobsRead].into_iter().collect();
    let new = NewKey { tenant: tenant.into(), scopes, expires_at: None, limits: Limits::default() };
    tenancy::issue(env.backend.keys.as_ref(), new, now_millis()).await.expect("issue a key").token
}

fn base(gw: &Gateway) -> String {
    format!("http://{}", gw.addr)
}

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = gw.http.request(method.parse().unwrap(), gw.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn terrain_worker(env: &Env) -> crate::harness::Worker {
    env.worker_with(WorkerConfig {
        models: vec![MODEL.into(), TERRAIN.into()],
        intra_threads: Some(2),
        ..WorkerConfig::default()
    })
}

async fn the_replicate_client_runs_waits_cancels_and_reads_errors(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway_with(GatewayConfig { auth: AuthMode::Keys, ..GatewayConfig::default() }).await;
    let worker = terrain_worker(&env);
    let (a, b) = (token(&env, "tenant-a").await, token(&env, "tenant-b").await);
    let url = base(&gw);

    let ran = client(&["run", &url, &a, &format!("kiln/{TERRAIN}")]).await;
    let files = ran["files"].as_array().expect("files");
    assert_eq!(files.len(), 2, "{ran}");
    for f in files {
        let u = f["url"].as_str().unwrap();
        assert!(u.starts_with(&format!("{url}/v1/jobs/")) && u.ends_with(".png"), "{u}");
        assert!(f["bytes"].as_u64().unwrap() > 100, "{f}");
    }

    let waited = client(&["create-wait", &url, &a, &format!("kiln/{MODEL}")]).await;
    let preds = waited["predictions"].as_array().expect("predictions");
    assert_eq!(preds.len(), 2, "{waited}");
    assert_eq!((preds[0]["n"].as_u64(), preds[1]["n"].as_u64()), (Some(1), Some(2)), "{waited}");
    assert!(preds.iter().all(|p| p["model"] == format!("kiln/{MODEL}") && p["dim"] == 384), "{waited}");
    assert!(preds.iter().all(|p| p["logs"].as_str().is_some_and(|l| l.ends_with("succeeded"))), "{waited}");

    let refused = client(&["error", &url, &a]).await;
    assert_eq!(refused["status"], 404, "{refused}");
    assert!(refused["detail"].as_str().is_some_and(|d| d.contains("no-such-model")), "{refused}");
    assert_eq!(refused["title"], "Not Found");

    let canceled = client(&["cancel", &url, &a, &format!("kiln/{TERRAIN}")]).await;
    let id = canceled["id"].as_str().expect("id");
    assert_eq!(canceled["status"], "canceled");
    // It stopped: never finished its 64 images, and has no output.
    let (status, job) = call(&gw, "GET", &format!("/v1/jobs/{id}"), Some(&a), &[], None).await;
    assert_eq!((status, job["status"].as_str()), (200, Some("canceled")), "{job}");
    assert!(job["output"].is_null(), "{job}");
    assert!(job["started_at"].is_string(), "it was running when canceled: {job}");
    assert!(job["progress"]["step"].as_u64().unwrap_or(0) < 64, "{job}");

    // Another tenant's prediction does not exist for it.
    for (method, path) in [("GET", format!("/v1/predictions/{id}")), ("POST", format!("/v1/predictions/{id}/cancel"))] {
        let (status, body) = call(&gw, method, &path, Some(&b), &[], None).await;
        assert_eq!(status, 404, "{method} {path} for another tenant: {body}");
        assert_eq!((body["error"]["code"].as_str(), body["status"].as_u64()), (Some("job_not_found"), Some(404)));
    }
    let (status, own) = call(&gw, "GET", &format!("/v1/predictions/{id}"), Some(&a), &[], None).await;
    assert_eq!((status, own["status"].as_str()), (200, Some("canceled")), "{own}");
    // The list, through the client, two to a page: tenant a's four predictions, newest first;
    // none of them for tenant b.
    let listed = client(&["list", &url, &a, "2"]).await;
    let ids: Vec<&str> = listed["predictions"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert!(listed["pages"].as_u64() >= Some(2) && ids.len() == 4, "{listed}");
    assert_eq!(ids[0], id, "the cancel came last: {listed}");
    assert_eq!(listed["predictions"][0]["status"], "canceled", "{listed}");
    let other = client(&["list", &url, &b, "2"]).await;
    assert_eq!(other["predictions"].as_array().map(Vec::len), Some(0), "{other}");
    // Without a key: a refusal the client reads.
    let (status, body) = call(&gw, "POST", "/v1/predictions", None, &[], Some(&json!({}))).await;
    assert_eq!((status, body["status"].as_u64()), (401, Some(401)), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("API key")), "{body}");
    worker.stop().await;
    gw.stop().await;
}

async fn prediction(gw: &Gateway, model: &str, input: Value, headers: &[(&str, &str)]) -> String {
    let (status, p) =
        call(gw, "POST", "/v1/predictions", None, headers, Some(&json!({ "version": model, "input": input }))).await;
    assert_eq!(status, 201, "{p}");
    p["id"].as_str().expect("id").to_owned()
}

fn millis(v: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(v.as_str().expect("a time"), &time::format_description::well_known::Rfc3339);
    (t.expect("RFC 3339").unix_timestamp_nanos() / 1_000_000) as i64
}

async fn cancel_after_cancels_queued_and_running_predictions(kind: Kind) {
    let env = Env::new(kind);
    let first = env.gateway().await;
    // No worker yet: a queued prediction past its Cancel-After is canceled, never run.
    let queued = prediction(&first, MODEL, json!({ "text": "never runs" }), &[("cancel-after", "1s")]).await;
    let seen = wait_until("the queued prediction is canceled", Duration::from_secs(20), || async {
        let (_, p) = call(&first, "GET", &format!("/v1/predictions/{queued}"), None, &[], None).await;
        if p["status"] == "canceled" { Ok(p) } else { Err(p["status"].clone()) }
    })
    .await;
    assert!(seen["started_at"].is_null(), "{seen}");

    let worker = terrain_worker(&env);
    // The worker is up once a small image job has run.
    let warm =
        first.submit(&json!({ "model": TERRAIN, "input": { "difficulty": 10, "width": 32, "height": 32 } })).await;
    first.finished(warm.body["id"].as_str().unwrap().parse().unwrap(), T).await;
    let running =
        prediction(&first, TERRAIN, json!({ "difficulty": 40, "count": 64 }), &[("cancel-after", "3s")]).await;
    wait_until("the prediction runs", T, || async {
        let (_, job) = call(&first, "GET", &format!("/v1/jobs/{running}"), None, &[], None).await;
        if job["status"] == "running" { Ok(()) } else { Err(job["status"].clone()) }
    })
    .await;
    // The gateway that accepted it goes; the worker enforces the time all the same. Watched
    // through the jobs API of another gateway, whose reads do not cancel anything.
    first.stop().await;
    let second = env.gateway().await;
    let job = wait_until("the running prediction ends", T, || async {
        let (_, job) = call(&second, "GET", &format!("/v1/jobs/{running}"), None, &[], None).await;
        match job["status"].as_str() {
            Some("running" | "queued") | None => Err(job["status"].clone()),
            Some(_) => Ok(job),
        }
    })
    .await;
    assert_eq!(job["status"], "canceled", "{job}");
    assert!(job["output"].is_null(), "{job}");
    let late = millis(&job["completed_at"]) - millis(&job["cancel_at"]);
    assert!((0..2000).contains(&late), "canceled {late} ms after its Cancel-After: {job}");
    let (_, p) = call(&second, "GET", &format!("/v1/predictions/{running}"), None, &[], None).await;
    assert_eq!(p["status"], "canceled", "{p}");
    worker.stop().await;
    second.stop().await;
}

async fn prediction_webhooks_are_the_prediction_signed_per_standard_webhooks(kind: Kind) {
    let receiver = Receiver::start(0, 500).await;
    let env = Env::new(kind);
    let gw = env.gateway_with(webhook_gateway(Duration::from_millis(50), Duration::from_secs(3600))).await;
    let worker = env.worker();
    let body = json!({ "version": format!("kiln/{MODEL}"), "input": { "text": "hooked" }, "webhook": receiver.url() });
    let (status, created) = call(&gw, "POST", "/v1/predictions", None, &[], Some(&body)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (headers, delivered) = wait_until("the completed prediction is delivered", T, || async {
        let got = receiver.requests();
        let done = got.iter().find(|(_, b)| serde_json::from_str::<Value>(b).is_ok_and(|v| v["status"] == "succeeded"));
        done.cloned().ok_or(got.len())
    })
    .await;
    // Every delivery (start, output, completed) is the prediction itself.
    for (_, b) in receiver.requests() {
        let p: Value = serde_json::from_str(&b).expect("JSON");
        assert_eq!(p["id"], id.as_str(), "{p}");
        assert_eq!(p["urls"]["get"], format!("{}/v1/predictions/{id}", base(&gw)), "{p}");
    }
    let headers: serde_json::Map<String, Value> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|h| ((*h).to_owned(), json!(headers[*h].to_str().unwrap())))
        .collect();
    let file = std::env::temp_dir().join(format!("kiln-webhook-{id}.json"));
    std::fs::write(&file, json!({ "headers": headers, "body": delivered }).to_string()).unwrap();
    let verified = client(&["verify", SECRET, file.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&file);
    assert_eq!(verified, json!({ "id": id, "status": "succeeded", "tampered": "rejected" }));
    worker.stop().await;
    gw.stop().await;
}
