//! The predictions API through the router: absolute URLs, Replicate's statuses, `Cancel-After`
//! parsing and refusals in the problem-details shape Replicate's clients read.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use kiln_common::Backend;
use kiln_common::models::ModelRepository;
use kiln_gateway::{AppState, GatewayConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::call;

fn state_with(config: GatewayConfig) -> AppState {
    let repo = ModelRepository::load(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")).unwrap();
    let config = GatewayConfig { auth: kiln_gateway::AuthMode::Off, ..config };
    AppState::new(config, Backend::embedded(Duration::from_secs(60)), Arc::new(repo), CancellationToken::new())
}

fn create(body: Value, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::post("/v1/predictions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::HOST, "kiln.test:8080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Body::from(body.to_string())).unwrap()
}

fn embedding(version: &str) -> Value {
    json!({ "version": version, "input": { "text": "hello" } })
}

/// A refusal reads as problem details (`title`, `status`, `detail`) and as a Kiln error.
fn assert_problem(status: StatusCode, body: &Value, want: StatusCode, code: &str, detail_has: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(detail_has), "detail {detail:?} lacks {detail_has:?}");
}

#[tokio::test]
async fn a_created_prediction_is_a_job_with_absolute_urls() {
    let s = state_with(GatewayConfig::default());
    for version in ["kiln/all-minilm-l6-v2", "all-minilm-l6-v2", "kiln/all-minilm-l6-v2:1"] {
        let (status, headers, p) = call(&s, create(embedding(version), &[])).await;
        assert_eq!(status, StatusCode::CREATED, "{version}: {p}");
        let id = p["id"].as_str().unwrap();
        assert_eq!(p["model"], "kiln/all-minilm-l6-v2");
        assert_eq!(p["status"], "starting");
        assert_eq!(p["input"]["text"], "hello");
        assert_eq!(p["urls"]["get"], format!("http://kiln.test:8080/v1/predictions/{id}"));
        assert_eq!(p["urls"]["cancel"], format!("http://kiln.test:8080/v1/predictions/{id}/cancel"));
        assert_eq!(p["urls"]["stream"], format!("http://kiln.test:8080/v1/jobs/{id}/events"));
        assert_eq!(headers[header::LOCATION], format!("http://kiln.test:8080/v1/predictions/{id}"));
        // The same job, seen through both APIs.
        let (status, _, job) = call(&s, Request::get(format!("/v1/jobs/{id}")).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(job["status"], "queued");
        let get = Request::get(format!("/v1/predictions/{id}")).header(header::HOST, "kiln.test:8080");
        let (status, _, got) = call(&s, get.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got["status"], "starting");
        assert!(got["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{got}");
    }
    let forwarded = create(embedding("kiln/all-minilm-l6-v2"), &[("x-forwarded-proto", "https")]);
    let (_, _, p) = call(&s, forwarded).await;
    assert!(p["urls"]["get"].as_str().unwrap().starts_with("https://kiln.test:8080/v1/predictions/"), "{p}");
}

#[tokio::test]
async fn the_public_url_setting_names_the_urls() {
    let config = GatewayConfig { public_url: Some("https://api.kiln.example".into()), ..GatewayConfig::default() };
    let s = state_with(config);
    let (status, _, p) = call(&s, create(embedding("kiln/all-minilm-l6-v2"), &[])).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(p["urls"]["get"], format!("https://api.kiln.example/v1/predictions/{}", p["id"].as_str().unwrap()));
}

#[tokio::test]
async fn the_model_path_form_creates_the_same() {
    let s = state_with(GatewayConfig::default());
    let req = Request::post("/v1/models/kiln/all-minilm-l6-v2/predictions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::HOST, "kiln.test")
        .body(Body::from(json!({ "input": { "text": "hi" } }).to_string()))
        .unwrap();
    let (status, _, p) = call(&s, req).await;
    assert_eq!(status, StatusCode::CREATED, "{p}");
    assert_eq!(p["model"], "kiln/all-minilm-l6-v2");
    let req = Request::post("/v1/models/someone/all-minilm-l6-v2/predictions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::HOST, "kiln.test")
        .body(Body::from(json!({ "input": { "text": "hi" } }).to_string()))
        .unwrap();
    let (status, _, body) = call(&s, req).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND, "model_not_found", "kiln/<model>");
}

#[tokio::test]
async fn cancel_after_takes_durations_and_refuses_bad_ones_naming_the_header() {
    let s = state_with(GatewayConfig::default());
    for good in ["30s", "1h30m", "90"] {
        let (status, _, p) = call(&s, create(embedding("kiln/all-minilm-l6-v2"), &[("cancel-after", good)])).await;
        assert_eq!(status, StatusCode::CREATED, "{good}: {p}");
        let id = p["id"].as_str().unwrap();
        let (_, _, job) = call(&s, Request::get(format!("/v1/jobs/{id}")).body(Body::empty()).unwrap()).await;
        let secs = kiln_gateway_test_secs(&job["cancel_at"], &job["created_at"]);
        let want = match good {
            "30s" => 30.0,
            "1h30m" => 5400.0,
            _ => 90.0,
        };
        assert!((secs - want).abs() < 0.01, "{good}: cancel_at {} s after creation", secs);
        // A job not started by its Cancel-After expires without running.
        assert_eq!(job["deadline_at"], job["cancel_at"], "{job}");
    }
    for bad in ["soon", "0s", "-1s", "1h 30m", "10y"] {
        let (status, _, body) = call(&s, create(embedding("kiln/all-minilm-l6-v2"), &[("cancel-after", bad)])).await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "Cancel-After");
    }
}

fn kiln_gateway_test_secs(later: &Value, earlier: &Value) -> f64 {
    let t = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
    };
    (t(later) - t(earlier)).as_seconds_f64()
}

#[tokio::test]
async fn refusals_are_problem_details() {
    let s = state_with(GatewayConfig::default());
    let (status, _, body) = call(&s, create(embedding("kiln/no-such-model"), &[])).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND, "model_not_found", "no-such-model");
    let (status, _, body) = call(&s, create(embedding("kiln/all-minilm-l6-v2:9.9"), &[])).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND, "model_not_found", "it serves version");
    let (status, _, body) = call(&s, create(json!({ "version": "kiln/all-minilm-l6-v2", "input": {} }), &[])).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", "text");
    let (status, _, body) = call(&s, create(json!({ "input": {} }), &[])).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "version");
    let bad_filter =
        json!({ "version": "kiln/all-minilm-l6-v2", "input": { "text": "x" }, "webhook_events_filter": ["done"] });
    let (status, _, body) = call(&s, create(bad_filter, &[])).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "webhook_events_filter");
    let missing = format!("/v1/predictions/{}", kiln_proto::JobId::random());
    let (status, _, body) =
        call(&s, Request::get(missing).header(header::HOST, "h").body(Body::empty()).unwrap()).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND, "job_not_found", "not found");
    // Refused before any handler (the router's 405) all the same.
    let (status, _, body) = call(&s, Request::delete("/v1/predictions").body(Body::empty()).unwrap()).await;
    assert_problem(status, &body, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "not allowed");
}

#[tokio::test]
async fn canceling_a_queued_prediction_ends_it_canceled_and_again_answers_it() {
    let s = state_with(GatewayConfig::default());
    let (_, _, p) = call(&s, create(embedding("kiln/all-minilm-l6-v2"), &[])).await;
    let cancel = || {
        Request::post(p["urls"]["cancel"].as_str().unwrap().trim_start_matches("http://kiln.test:8080"))
            .header(header::HOST, "kiln.test:8080")
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..2 {
        let (status, _, got) = call(&s, cancel()).await;
        assert_eq!(status, StatusCode::OK, "{got}");
        assert_eq!(got["status"], "canceled");
        assert!(got["completed_at"].is_string(), "{got}");
    }
}

#[tokio::test]
async fn openapi_describes_the_predictions_api() {
    let s = state_with(GatewayConfig::default());
    let (_, _, doc) = call(&s, Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    for (path, method) in [
        ("/v1/predictions", "post"),
        ("/v1/models/{owner}/{name}/predictions", "post"),
        ("/v1/predictions/{id}", "get"),
        ("/v1/predictions/{id}/cancel", "post"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not described");
        assert!(op["responses"]["401"].is_object(), "{method} {path} is not secured");
    }
    assert!(doc["components"]["schemas"]["Prediction"].is_object());
    assert!(doc["components"]["schemas"]["Problem"].is_object());
}
