//! The router in-process with `oneshot`, on the embedded backend: response shapes, headers, and
//! readiness turning false when draining starts.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use kiln_common::Backend;
use kiln_common::models::ModelRepository;
use kiln_gateway::{AppState, GatewayConfig, router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod files;
mod openai;
mod predictions;

fn state() -> AppState {
    state_with(GatewayConfig { auth: kiln_gateway::AuthMode::Off, ..GatewayConfig::default() })
}

fn state_with(config: GatewayConfig) -> AppState {
    let repo = ModelRepository::load(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")).unwrap();
    AppState::new(config, Backend::embedded(Duration::from_secs(60)), Arc::new(repo), CancellationToken::new())
}

async fn call(state: &AppState, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn accepted_job_has_location_and_queued_record() {
    let s = state();
    let req = Request::post("/v1/jobs")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"model": "all-minilm-l6-v2", "input": {"text": "hi"}}).to_string()))
        .unwrap();
    let (status, headers, body) = call(&s, req).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = body["id"].as_str().unwrap();
    assert_eq!(headers[header::LOCATION], format!("/v1/jobs/{id}"));
    for field in [
        "id",
        "model",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "attempts",
        "progress",
        "output",
        "error",
        "cached",
        "metrics",
    ] {
        assert!(body.get(field).is_some(), "record lacks {field}: {body}");
    }
    let (status, _, got) = call(&s, Request::get(format!("/v1/jobs/{id}")).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["status"], "queued");
}

#[tokio::test]
async fn readiness_turns_false_when_draining_starts() {
    let s = state();
    let ready = || Request::get("/readyz").body(Body::empty()).unwrap();
    assert_eq!(call(&s, ready()).await.0, StatusCode::OK);
    s.shutdown.cancel();
    let (status, headers, body) = call(&s, ready()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["draining"], true);
    assert!(headers.contains_key(header::RETRY_AFTER));
    // Liveness is unaffected.
    assert_eq!(call(&s, Request::get("/healthz").body(Body::empty()).unwrap()).await.0, StatusCode::OK);
}

#[tokio::test]
async fn wrong_method_is_a_json_405() {
    let (status, _, body) = call(&state(), Request::delete("/v1/jobs").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn openapi_describes_every_route_header_and_error_code() {
    let (status, _, doc) = call(&state(), Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/v1/jobs/{id}/events", "get"),
        ("/v1/jobs/{id}/outputs/{name}", "get"),
        ("/jobs", "post"),
        ("/jobs", "get"),
        ("/jobs/{id}", "get"),
        ("/jobs/{id}/cancel", "post"),
        ("/jobs/{id}/events", "get"),
        ("/jobs/{id}/outputs/{name}", "get"),
        ("/v1/models", "get"),
        ("/v1/embeddings", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
        ("/metrics", "get"),
        ("/v1/predictions", "post"),
        ("/v1/predictions", "get"),
        ("/v1/models/{owner}/{name}/predictions", "post"),
        ("/v1/predictions/{id}", "get"),
        ("/v1/predictions/{id}/cancel", "post"),
        ("/v1/files", "post"),
        ("/v1/files/{id}", "get"),
        ("/v1/files/{id}", "delete"),
        ("/v1/files/{id}/content", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is not described");
    }
    let text = doc.to_string();
    for header in [
        "Idempotency-Key",
        "Prefer",
        "Cancel-After",
        "Last-Event-ID",
        "Location",
        "Retry-After",
        "webhook-signature",
        "If-None-Match",
    ] {
        assert!(text.contains(header), "header {header} is not described");
    }
    // Every documented operation is a route of the router: called, it is never answered as an
    // unknown route or method (whatever else it answers without a body or a real job).
    let s = state();
    let mut described = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let uri = path
            .replace("{id}", "e3e70682-c209-1cac-a29f-6fbed82c07cd")
            .replace("{name}", "x")
            .replace("{owner}", "kiln");
        for method in item.as_object().unwrap().keys() {
            described += 1;
            let req = Request::builder().method(method.to_uppercase().as_str()).uri(&uri);
            let (status, _, body) = call(&s, req.body(Body::empty()).unwrap()).await;
            assert!(
                !matches!(body["error"]["code"].as_str(), Some("not_found" | "method_not_allowed")),
                "{method} {path} is described but not routed: {status} {body}"
            );
            let op = &doc["paths"][path][method];
            assert!(op["operationId"].is_string(), "{method} {path} has no operationId");
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.keys().any(|k| k.starts_with('2')), "{method} {path} has no success answer");
            assert!(responses.values().all(|r| r["description"].is_string()), "{method} {path}: {op}");
            if path.starts_with("/v1/") || path.starts_with("/jobs") {
                for refused in ["401", "403", "429"] {
                    assert!(responses.contains_key(refused), "{method} {path} does not describe {refused}");
                }
            }
        }
    }
    assert_eq!(described, 27, "the document's operations changed: update the list above");
    // A created job links to the operations that take its id.
    for status in ["200", "202"] {
        let links = &doc["paths"]["/v1/jobs"]["post"]["responses"][status]["links"];
        assert_eq!(links["GetJob"]["operationId"], "get_job", "{links}");
        assert_eq!(links["CancelJob"]["parameters"]["id"], "$response.body#/id", "{links}");
    }
    // And every route of the router is described (read from the route table's source).
    let routed = routed();
    assert!(routed.len() >= 20, "read only {routed:?} from routes/mod.rs");
    for (path, method) in &routed {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is routed but not described");
    }
    // The codes of both error shapes are the one table's.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Error"]["properties"]["error"]["$ref"], "#/components/schemas/ErrorDetail");
    assert_eq!(schemas["ErrorDetail"]["properties"]["code"]["$ref"], "#/components/schemas/ErrorCode");
    assert_eq!(schemas["OpenAIErrorDetail"]["properties"]["code"]["$ref"], "#/components/schemas/ErrorCode");
    let codes = &schemas["ErrorCode"]["enum"];
    assert_eq!(codes.as_array().unwrap().len(), kiln_proto::ErrorCode::ALL.len());
    for code in kiln_proto::ErrorCode::ALL {
        assert!(
            codes.as_array().unwrap().iter().any(|c| c == code.as_str()),
            "error code {} is not described",
            code.as_str()
        );
    }
}

/// The `(path, method)` pairs the router registers, read from its table in routes/mod.rs
/// (`.route(path, get(..).post(..))`; `{jobs}` stands for `/v1/jobs` and its `/jobs` alias).
fn routed() -> Vec<(String, String)> {
    let source = include_str!("../../src/routes/mod.rs");
    let mut routes = Vec::new();
    for call in source.split(".route(").skip(1) {
        let line = call.lines().next().unwrap_or_default();
        let Some((path, methods)) = line.split_once(", ") else { continue };
        let path = match path {
            "jobs" => "{jobs}".to_owned(),
            p => p
                .trim_start_matches("&format!(")
                .trim_end_matches(')')
                .trim_matches('"')
                .replace("{{", "{")
                .replace("}}", "}"),
        };
        let paths = match path.strip_prefix("{jobs}") {
            Some(rest) => vec![format!("/v1/jobs{rest}"), format!("/jobs{rest}")],
            None => vec![path],
        };
        for method in ["get", "post", "put", "delete", "patch"] {
            if methods.starts_with(&format!("{method}(")) || methods.contains(&format!(".{method}(")) {
                routes.extend(paths.iter().map(|p| (p.clone(), method.to_owned())));
            }
        }
    }
    routes
}

/// Asserts an error answer is JSON `{"error": {"code": code, "message": …}}`.
fn assert_json_error(what: &str, headers: &axum::http::HeaderMap, body: &Value, code: &str) {
    assert_eq!(headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap()), Some("application/json"), "{what}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
}

// Found by scripts/fuzz-api.sh: axum's own query rejection answered `400 text/plain`.
#[tokio::test]
async fn query_parameter_of_the_wrong_type_is_a_json_422() {
    let s = state();
    let id = "e3e70682-c209-1cac-a29f-6fbed82c07cd";
    for query in ["wait=abc", "wait=null&wait=null", "wait=-1", "wait=99999999999999999999999", "wait=%FF"] {
        let uri = format!("/v1/jobs/{id}?{query}");
        let (status, headers, body) = call(&s, Request::get(&uri).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {body}");
        assert_json_error(&uri, &headers, &body, "invalid_request");
    }
    // A well-formed wait on a job that does not exist is still a 404.
    let uri = format!("/v1/jobs/{id}?wait=0");
    let (status, headers, body) = call(&s, Request::get(&uri).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_json_error(&uri, &headers, &body, "job_not_found");
}

// Found by scripts/fuzz-api.sh: a path parameter that is not UTF-8 once percent-decoded got axum's
// `400 text/plain` "Invalid URL".
#[tokio::test]
async fn undecodable_path_parameter_is_a_json_404() {
    let s = state();
    let id = "e3e70682-c209-1cac-a29f-6fbed82c07cd";
    for (method, uri) in [
        ("GET", "/v1/jobs/%FF".to_owned()),
        ("POST", "/v1/jobs/%FF/cancel".to_owned()),
        ("GET", "/v1/jobs/%C3%28/events".to_owned()),
        ("GET", "/v1/jobs/%FF/outputs/image-0.png".to_owned()),
        ("GET", format!("/v1/jobs/{id}/outputs/%FF")),
    ] {
        let req = Request::builder().method(method).uri(&uri).body(Body::empty()).unwrap();
        let (status, headers, body) = call(&s, req).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}: {body}");
        assert_json_error(&format!("{method} {uri}"), &headers, &body, "not_found");
    }
}
