//! The OpenAI-compatible routes in-process: every refusal in OpenAI's error shape with the right
//! status (the auth guard's too), the wait bound answered 504 with `Retry-After`, cached results
//! answered with their token counts in float and base64, and `/v1/models` in OpenAI's list shape.
//! The whole path with a worker and the real `openai` client is in cli/tests/it/openai.rs.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use kiln_common::tenancy::{self, Limits, NewKey, Scope};
use kiln_gateway::{AppState, AuthMode, GatewayConfig};
use serde_json::{Value, json};

use crate::{call, state_with};

const MODEL: &str = "all-minilm-l6-v2";

fn post(body: &Value) -> Request<Body> {
    Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// Asserts `body` is OpenAI's error shape with Kiln's `code`, OpenAI's `type` and `param`.
fn assert_openai_error(what: &str, body: &Value, code: &str, kind: &str, param: Option<&str>) {
    let error = &body["error"];
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{what}: {body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert_eq!(error["code"], code, "{what}: {body}");
    assert_eq!(error["type"], kind, "{what}: {body}");
    assert_eq!(error["param"], param.map_or(Value::Null, |p| json!(p)), "{what}: {body}");
}

#[tokio::test]
async fn bad_requests_are_refused_in_openai_shape() {
    let s = state_with(GatewayConfig { auth: AuthMode::Off, ..GatewayConfig::default() });
    let cases: [(&str, Value, StatusCode, &str, Option<&str>); 11] = [
        (
            "token ids",
            json!({ "model": MODEL, "input": [1, 2, 3] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("input"),
        ),
        (
            "token id lists",
            json!({ "model": MODEL, "input": [[1, 2], [3]] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("input"),
        ),
        ("no input", json!({ "model": MODEL }), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", Some("input")),
        (
            "empty list",
            json!({ "model": MODEL, "input": [] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("input"),
        ),
        (
            "a null text",
            json!({ "model": MODEL, "input": ["a", null] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("input[1]"),
        ),
        (
            "dimensions",
            json!({ "model": MODEL, "input": "a", "dimensions": 64 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("dimensions"),
        ),
        (
            "encoding",
            json!({ "model": MODEL, "input": "a", "encoding_format": "int8" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("encoding_format"),
        ),
        (
            "unknown field",
            json!({ "model": MODEL, "input": "a", "stream": true }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("stream"),
        ),
        (
            "unknown model",
            json!({ "model": "text-embedding-3-small", "input": "a" }),
            StatusCode::NOT_FOUND,
            "model_not_found",
            Some("model"),
        ),
        (
            "image model",
            json!({ "model": "terrain-diffusion", "input": "a" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("model"),
        ),
        (
            "too many texts",
            json!({ "model": MODEL, "input": vec!["a"; 257] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("input"),
        ),
    ];
    for (what, body, status, code, param) in cases {
        let (got, headers, answer) = call(&s, post(&body)).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{what}");
        assert_openai_error(what, &answer, code, "invalid_request_error", param);
    }
    let (_, _, answer) = call(&s, post(&json!({ "model": MODEL, "input": [1, 2] }))).await;
    assert!(answer["error"]["message"].as_str().unwrap().contains("token ids are not accepted"), "{answer}");

    let malformed = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let (status, _, answer) = call(&s, malformed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_openai_error("malformed", &answer, "malformed_json", "invalid_request_error", None);
    let text =
        Request::post("/v1/embeddings").header(header::CONTENT_TYPE, "text/plain").body(Body::from("{}")).unwrap();
    let (status, _, answer) = call(&s, text).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_openai_error("text/plain", &answer, "unsupported_media_type", "invalid_request_error", None);
}

#[tokio::test]
async fn keyed_gateways_refuse_in_openai_shape_and_need_jobs_submit() {
    let s = state_with(GatewayConfig { auth: AuthMode::Keys, ..GatewayConfig::default() });
    let body = json!({ "model": MODEL, "input": "hello" });
    let (status, headers, answer) = call(&s, post(&body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    assert_openai_error("no key", &answer, "unauthorized", "authentication_error", None);

    let mut bad = post(&body);
    bad.headers_mut().insert(header::AUTHORIZATION, "Bearer kiln_000000000000_nope".parse().unwrap());
    let (status, _, answer) = call(&s, bad).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_openai_error("bad key", &answer, "unauthorized", "authentication_error", None);

    let models = Request::get("/v1/models").body(Body::empty()).unwrap();
    let (status, _, answer) = call(&s, models).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_openai_error("models without a key", &answer, "unauthorized", "authentication_error", None);

    // A read-only key may list models but not embed.
    let new = NewKey {
        tenant: "reader".into(),
        scopes: BTreeSet::from([Scope::JobsRead]),
        expires_at: None,
        limits: Limits::default(),
    };
    let token = tenancy::issue(s.backend.keys.as_ref(), new, kiln_proto::now_millis()).await.unwrap().token;
    let mut read_only = post(&body);
    read_only.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    let (status, _, answer) = call(&s, read_only).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_openai_error("read-only key", &answer, "forbidden", "permission_error", None);
    let models =
        Request::get("/v1/models").header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty());
    assert_eq!(call(&s, models.unwrap()).await.0, StatusCode::OK);

    // Kiln's own routes keep Kiln's error shape.
    let (status, _, answer) = call(&s, Request::get("/v1/jobs/x").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].get("type").is_none(), "{answer}");
}

#[tokio::test]
async fn a_job_not_done_within_the_bound_is_a_504_with_retry_after_and_goes_on() {
    // No worker: the job stays queued.
    let config =
        GatewayConfig { auth: AuthMode::Off, openai_wait: Duration::from_millis(300), ..GatewayConfig::default() };
    let s = state_with(config);
    let started = std::time::Instant::now();
    let (status, headers, answer) = call(&s, post(&json!({ "model": MODEL, "input": "nobody runs me" }))).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300), "answered before the bound");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_openai_error("timeout", &answer, "wait_timeout", "server_error", None);
    let message = answer["error"]["message"].as_str().unwrap();
    let id = message.split_whitespace().nth(1).unwrap();
    let (status, _, job) = call(&s, Request::get(format!("/v1/jobs/{id}")).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{message}");
    assert_eq!(job["status"], "queued", "the job goes on: {job}");
}

/// Puts an output for `texts` in the result cache, as a worker would have.
async fn cache_output(s: &AppState, texts: &[&str], output: Value) {
    let spec = s.models.get(MODEL).unwrap();
    let key = kiln_common::cache::key(spec.name.as_str(), &spec.version, &json!({ "texts": texts }));
    s.backend.cache.put(&key, &output.to_string()).await.unwrap();
}

#[tokio::test]
async fn cached_results_answer_with_their_token_counts_in_float_and_base64() {
    let s = state_with(GatewayConfig { auth: AuthMode::Off, ..GatewayConfig::default() });
    let vectors = [[0.6f32, 0.8, 0.0], [0.0, -1.0, 0.0]];
    cache_output(&s, &["a", "b c"], json!({ "embeddings": vectors, "dim": 3, "tokens": [3, 4] })).await;
    cache_output(&s, &["one"], json!({ "embeddings": [vectors[0]], "dim": 3, "tokens": [3] })).await;

    let (status, headers, answer) = call(&s, post(&json!({ "model": MODEL, "input": ["a", "b c"] }))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(headers.contains_key("kiln-job-id"));
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], MODEL);
    assert_eq!(answer["usage"], json!({ "prompt_tokens": 7, "total_tokens": 7 }));
    for (i, v) in vectors.iter().enumerate() {
        assert_eq!(answer["data"][i]["object"], "embedding");
        assert_eq!(answer["data"][i]["index"], i);
        assert_eq!(answer["data"][i]["embedding"], json!(v));
    }

    let body = json!({ "model": MODEL, "input": "one", "encoding_format": "base64", "user": "u-1" });
    let (status, _, answer) = call(&s, post(&body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], 3);
    let bytes = base64::engine::general_purpose::STANDARD.decode(answer["data"][0]["embedding"].as_str().unwrap());
    let decoded: Vec<f32> =
        bytes.unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(decoded, vectors[0]);
}

#[tokio::test]
async fn models_are_listed_in_openai_shape_with_kilns_details() {
    let s = state_with(GatewayConfig { auth: AuthMode::Off, ..GatewayConfig::default() });
    let (status, _, list) = call(&s, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    let minilm = list["data"].as_array().unwrap().iter().find(|m| m["id"] == MODEL).expect("listed").clone();
    assert_eq!(minilm["object"], "model");
    assert!(minilm["created"].is_i64(), "{minilm}");
    assert_eq!(minilm["owned_by"], "kiln");
    assert_eq!(minilm["name"], MODEL);
    assert_eq!(minilm["task"], "embedding");
    assert!(minilm["input_schema"].is_object() && minilm["workers"].is_array(), "{minilm}");
}
