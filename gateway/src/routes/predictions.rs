//! The Replicate-compatible predictions API, a mapping onto Kiln jobs (a prediction *is* a job: same
//! id, same record, same queue, tenancy and limits): `POST /v1/predictions`,
//! `POST /v1/models/{owner}/{name}/predictions`, `GET /v1/predictions/{id}`,
//! `POST /v1/predictions/{id}/cancel`, and the problem-details shape of their errors.
//!
//! - A model is named `kiln/<model>` (the only owner accepted) or `<model>`, either optionally
//!   followed by `:<version>`, which must then be the served version.
//! - `Prefer: wait` holds the create up to 60 s (`wait=N`: N s), capped by `KILN_MAX_WAIT`.
//! - `Cancel-After: 30s | 1h30m | 90` (a duration from creation, or seconds) cancels the
//!   prediction if it has not finished by then, running or not.
//! - `webhook` receives the prediction itself, signed per Standard Webhooks, on the events of
//!   `webhook_events_filter` (`start`, `output`, `logs`, `completed`; default all; `completed` is
//!   always sent).

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_common::store::Transition;
use kiln_proto::{JobId, JobRecord, PREDICTION_OWNER, Prediction, PredictionStatus, PredictionView, json_type};
use serde_json::{Map, Value, json};

use super::jobs::{self, Extra, invalid};
use super::listing::{self, ListParams};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::events;
use crate::state::AppState;

/// How long a bare `Prefer: wait` holds the request, as on Replicate.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Error bodies read back to reshape them, at most.
const MAX_ERROR_BODY: usize = 64 * 1024;
const FIELDS: [&str; 6] = ["version", "input", "webhook", "webhook_completed", "webhook_events_filter", "stream"];
/// Replicate's webhook events, and the Kiln job event each is sent on (a job's `progress` is
/// both its new output and its new logs).
const EVENTS: [(&str, &str); 4] =
    [("start", "start"), ("output", "progress"), ("logs", "progress"), ("completed", "completed")];

/// The absolute base of the URLs in an answer: `KILN_PUBLIC_URL`, or the request's own origin
/// (`X-Forwarded-Proto` or the gateway's scheme, and `Host` or the URI's authority).
pub struct Base(pub String);

impl FromRequestParts<AppState> for Base {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(url) = &state.config.public_url {
            return Ok(Self(url.clone()));
        }
        let tls = state.config.tls.tls_cert.is_some();
        base_of(&parts.headers, parts.uri.authority().map(|a| a.as_str()), tls).map(Self)
    }
}

fn base_of(headers: &HeaderMap, authority: Option<&str>, tls: bool) -> Result<String, ApiError> {
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').next().unwrap_or("").trim().to_ascii_lowercase())
        .filter(|p| p == "http" || p == "https");
    let scheme = forwarded.unwrap_or_else(|| if tls { "https" } else { "http" }.to_owned());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).or(authority).map(str::trim);
    let host = host.filter(|h| {
        !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:[]".contains(c))
    });
    let host = host.ok_or_else(|| invalid("Host", "missing or not host[:port]; or set KILN_PUBLIC_URL"))?;
    Ok(format!("{scheme}://{host}"))
}

/// `Cancel-After`: a duration such as `30s`, `5m`, `1h30m`, `1.5h` or `250ms` (units `h`, `m`,
/// `s`, `ms`, summed), or a plain number of seconds.
pub fn parse_cancel_after(text: &str) -> Option<Duration> {
    let text = text.trim();
    let secs = match text.parse::<f64>() {
        Ok(secs) => secs,
        Err(_) => {
            let mut total = 0.0;
            let mut rest = text;
            while !rest.is_empty() {
                let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
                let n: f64 = rest[..digits].parse().ok()?;
                rest = &rest[digits..];
                let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
                let scale = match &rest[..unit_len] {
                    "h" => 3600.0,
                    "m" => 60.0,
                    "s" => 1.0,
                    "ms" => 0.001,
                    _ => return None,
                };
                total += n * scale;
                rest = &rest[unit_len..];
            }
            total
        }
    };
    (secs.is_finite() && secs > 0.0 && secs <= jobs::MAX_DEADLINE_S).then(|| Duration::from_secs_f64(secs))
}

fn cancel_after(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get("cancel-after") else { return Ok(None) };
    let parsed = v.to_str().ok().and_then(parse_cancel_after);
    parsed.map(Some).ok_or_else(|| {
        invalid(
            "Cancel-After",
            format!("must be a duration such as 30s, 5m or 1h30m (or seconds), at most {} s", jobs::MAX_DEADLINE_S),
        )
    })
}

/// `Prefer: wait` (60 s) or `Prefer: wait=N`, capped by `KILN_MAX_WAIT`.
fn prefer_wait(headers: &HeaderMap, max_s: u64) -> Option<Duration> {
    let bare = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|p| p.trim().eq_ignore_ascii_case("wait"));
    let cap = Duration::from_secs(max_s);
    jobs::prefer_wait(headers, max_s).or_else(|| bare.then(|| DEFAULT_WAIT.min(cap)))
}

/// A model reference: `kiln/<model>` or `<model>`, optionally `:<version>`.
fn reference(text: &str) -> Result<(&str, Option<&str>), ApiError> {
    let (model, version) = match text.rsplit_once(':') {
        Some((m, v)) => (m, Some(v)),
        None => (text, None),
    };
    let name = match model.split_once('/') {
        Some((owner, name)) if owner.eq_ignore_ascii_case(PREDICTION_OWNER) => name,
        Some(_) => return Err(ApiError::ModelNotFound(format!("{text} (models here are kiln/<model>)"))),
        None => model,
    };
    Ok((name, version))
}

/// The Kiln job request a prediction request maps to, with the served version of its model.
fn job_request(state: &AppState, model: &str, mut body: Map<String, Value>) -> Result<(Value, String), ApiError> {
    let (name, version) = reference(model)?;
    let spec = state.models.get(name).ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))?;
    if let Some(v) = version.filter(|v| *v != spec.version) {
        return Err(ApiError::ModelNotFound(format!("{name}:{v} (it serves version {})", spec.version)));
    }
    let mut job = json!({ "model": spec.name.as_str(), "input": body.remove("input").unwrap_or(Value::Null) });
    let webhook = match (body.remove("webhook"), body.remove("webhook_completed")) {
        (Some(Value::Null) | None, Some(Value::Null) | None) => None,
        (Some(w), None | Some(Value::Null)) => Some((w, body.remove("webhook_events_filter"))),
        (None | Some(Value::Null), Some(w)) => Some((w, Some(json!(["completed"])))),
        (Some(_), Some(_)) => return Err(invalid("webhook_completed", "give webhook or webhook_completed, not both")),
    };
    if let Some((url, filter)) = webhook {
        job["webhook"] = url;
        job["webhook_events"] = Value::Array(kiln_events(filter)?);
    } else if body.get("webhook_events_filter").is_some_and(|f| !f.is_null()) {
        return Err(invalid("webhook_events_filter", "given without a webhook"));
    }
    match body.remove("stream") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(other) => return Err(invalid("stream", format!("must be a boolean, got {}", json_type(&other)))),
    }
    Ok((job, spec.version.clone()))
}

/// `webhook_events_filter` as Kiln job events; all of them when absent.
fn kiln_events(filter: Option<Value>) -> Result<Vec<Value>, ApiError> {
    let names: Vec<String> = match filter {
        None | Some(Value::Null) => EVENTS.iter().map(|(r, _)| (*r).to_owned()).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, e)| match e.as_str() {
                Some(n) if EVENTS.iter().any(|(r, _)| *r == n) => Ok(n.to_owned()),
                _ => Err(invalid(
                    &format!("webhook_events_filter[{i}]"),
                    format!("must be one of start, output, logs, completed; got {e}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(invalid("webhook_events_filter", format!("must be an array, got {}", json_type(&other))));
        }
    };
    let mut kiln: Vec<Value> = Vec::new();
    for (_, k) in EVENTS.iter().filter(|(r, _)| names.iter().any(|n| n == r)) {
        if !kiln.iter().any(|v| v == k) {
            kiln.push(Value::String((*k).to_owned()));
        }
    }
    Ok(kiln)
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(invalid("body", format!("must be a JSON object, got {}", json_type(&value))));
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(unknown, format!("unknown field; accepted fields are {}", FIELDS.join(", "))));
    }
    Ok(obj)
}

/// `POST /v1/predictions`: `{"version": "kiln/<model>[:<version>]", "input": {..}, "webhook"?, ..}`.
#[utoipa::path(post, path = "/v1/predictions", operation_id = "create_prediction", tag = "predictions",
    summary = "Create a prediction (Replicate-compatible): a Kiln job",
    params(
        ("Prefer" = Option<String>, Header, example = "wait",
         description = "wait (60 s) or wait=N (seconds), capped by KILN_MAX_WAIT: hold the request until the prediction finishes. A wait that runs out answers status starting, as Replicate does."),
        ("Cancel-After" = Option<String>, Header, example = "1h30m",
         description = "A duration from creation (30s, 5m, 1h30m, 250ms; or seconds): the prediction is canceled if not finished by then, queued or running. Bad values: 422 naming Cancel-After."),
        ("Idempotency-Key" = Option<String>, Header, max_length = 255, description = "As for POST /v1/jobs."),
    ),
    request_body(content = super::openapi::PredictionRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created (a job, durably queued); finished already when the wait sufficed", body = kiln_proto::Prediction,
         headers(("Location" = String, description = "urls.get"), ("Preference-Applied" = String))),
        (status = 400, description = "malformed_json", body = super::openapi::Problem),
        (status = 404, description = "model_not_found: not a served model (kiln/<model>[:<served version>]); not_found for a path parameter that is not UTF-8", body = super::openapi::Problem),
        (status = 409, description = "idempotency_key_reused, idempotency_key_in_flight", body = super::openapi::Problem),
        (status = 413, description = "payload_too_large", body = super::openapi::Problem),
        (status = 415, description = "unsupported_media_type", body = super::openapi::Problem),
        (status = 422, description = "invalid_request, invalid_input: the message names the field or header", body = super::openapi::Problem),
        (status = 503, description = "broker_unavailable, store_unavailable, overloaded", body = super::openapi::Problem, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Base(base): Base,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = jobs::checked_body(&state, &headers, body)?;
    let mut obj = object(&body)?;
    let model = match obj.remove("version") {
        Some(Value::String(v)) => v,
        Some(other) => return Err(invalid("version", format!("must be a string, got {}", json_type(&other)))),
        None => return Err(invalid("version", "missing; name a model as kiln/<model> (see GET /v1/models)")),
    };
    start(state, who, base, &headers, &model, obj).await
}

/// `POST /v1/models/{owner}/{name}/predictions`: the model in the path, the rest as for
/// `POST /v1/predictions` without `version`.
#[utoipa::path(post, path = "/v1/models/{owner}/{name}/predictions", operation_id = "create_model_prediction", tag = "predictions",
    summary = "Create a prediction of the model in the path",
    params(
        ("owner" = String, Path, description = "kiln"),
        ("name" = String, Path, description = "A served model (GET /v1/models)"),
        ("Prefer" = Option<String>, Header, example = "wait",
         description = "wait (60 s) or wait=N (seconds), capped by KILN_MAX_WAIT: hold the request until the prediction finishes. A wait that runs out answers status starting, as Replicate does."),
        ("Cancel-After" = Option<String>, Header, example = "1h30m",
         description = "A duration from creation (30s, 5m, 1h30m, 250ms; or seconds): the prediction is canceled if not finished by then, queued or running. Bad values: 422 naming Cancel-After."),
        ("Idempotency-Key" = Option<String>, Header, max_length = 255, description = "As for POST /v1/jobs."),
    ),
    request_body(content = super::openapi::ModelPredictionRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created (a job, durably queued); finished already when the wait sufficed", body = kiln_proto::Prediction,
         headers(("Location" = String, description = "urls.get"), ("Preference-Applied" = String))),
        (status = 400, description = "malformed_json", body = super::openapi::Problem),
        (status = 404, description = "model_not_found: not a served model (kiln/<model>[:<served version>]); not_found for a path parameter that is not UTF-8", body = super::openapi::Problem),
        (status = 409, description = "idempotency_key_reused, idempotency_key_in_flight", body = super::openapi::Problem),
        (status = 413, description = "payload_too_large", body = super::openapi::Problem),
        (status = 415, description = "unsupported_media_type", body = super::openapi::Problem),
        (status = 422, description = "invalid_request, invalid_input: the message names the field or header", body = super::openapi::Problem),
        (status = 503, description = "broker_unavailable, store_unavailable, overloaded", body = super::openapi::Problem, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn create_for_model(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Base(base): Base,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((owner, name)) = path?;
    let body = jobs::checked_body(&state, &headers, body)?;
    let obj = object(&body)?;
    if obj.contains_key("version") {
        return Err(invalid("version", "the model is named by the path; drop version or use POST /v1/predictions"));
    }
    start(state, who, base, &headers, &format!("{owner}/{name}"), obj).await
}

/// Accepts the job a prediction maps to and answers `201` with the prediction.
async fn start(
    state: AppState,
    who: Principal,
    base: String,
    headers: &HeaderMap,
    model: &str,
    obj: Map<String, Value>,
) -> Result<Response, ApiError> {
    let (request, version) = job_request(&state, model, obj)?;
    let input = request["input"].clone();
    let view = PredictionView { base_url: base, version };
    let extra = Extra { finish_within: cancel_after(headers)?, prediction: Some(view.clone()), ..Extra::default() };
    let wait = prefer_wait(headers, state.config.max_wait_s);
    let body = serde_json::to_vec(&request).map_err(|e| ApiError::Internal(format!("encoding a job request: {e}")))?;
    let done = jobs::submit_with(&state, &who, headers, &body, wait, extra).await?;
    // The job's record holds its canonical input only in its message: echo what was asked.
    let mut prediction = Prediction::of(&done.record, &view, Some(input));
    // A wait that ran out answers `starting` whatever the job is doing, as Replicate's blocking
    // API does: its clients take any other status after a wait to be final and stop polling.
    if done.waited.is_some() && !prediction.status.is_terminal() {
        prediction.status = PredictionStatus::Starting;
    }
    let mut resp = (StatusCode::CREATED, Json(&prediction)).into_response();
    if let Ok(v) = HeaderValue::from_str(&prediction.urls.get) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(w) = done.waited
        && let Ok(v) = HeaderValue::from_str(&format!("wait={}", w.as_secs()))
    {
        resp.headers_mut().insert("preference-applied", v);
    }
    Ok(resp)
}

/// `GET /v1/predictions`: the caller's predictions (every job is one), newest first, in
/// Replicate's page shape: `results`, `next` the absolute URL of the next page (the same query
/// with the next `cursor`), `previous` always null (pages go forwards). Takes the parameters of
/// `GET /v1/jobs` (`limit` default 20, `status` in Kiln's names, `model`, `created_after`).
#[utoipa::path(get, path = "/v1/predictions", operation_id = "list_predictions", tag = "predictions",
    summary = "List predictions, newest first (Replicate-compatible)",
    description = "The caller's predictions (every job is one), as GET /v1/jobs lists them and with its parameters, in Replicate's page shape: results, and next, the absolute URL of the next page (null on the last); previous is always null.",
    params(ListParams),
    responses(
        (status = 200, description = "A page of predictions", body = super::openapi::PredictionList),
        (status = 403, description = "forbidden: another tenant's listing (tenant) needs an admin key", body = super::openapi::Problem),
        (status = 422, description = "invalid_request: the message names the parameter (status, model, created_after, limit, cursor, tenant; Host when KILN_PUBLIC_URL is unset)", body = super::openapi::Problem),
        (status = 503, description = "store_unavailable", body = super::openapi::Problem, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Base(base): Base,
    uri: Uri,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let page = listing::page(&state, &who, p).await?;
    let results: Vec<Prediction> = page.data.iter().map(|r| shown(&state, r, base.clone())).collect();
    let next = page.next_cursor.map(|cursor| {
        // The cursor is base64url: nothing in it needs escaping.
        let kept = uri.query().unwrap_or("").split('&').filter(|kv| !kv.is_empty() && !kv.starts_with("cursor="));
        let query: Vec<String> = kept.map(str::to_owned).chain([format!("cursor={cursor}")]).collect();
        format!("{base}/v1/predictions?{}", query.join("&"))
    });
    Ok(Json(json!({ "previous": null, "next": next, "results": results })).into_response())
}

/// `GET /v1/predictions/{id}`.
#[utoipa::path(get, path = "/v1/predictions/{id}", operation_id = "get_prediction", tag = "predictions",
    summary = "A prediction",
    params(
        ("id" = String, Path, description = "The prediction's id, which is its job's."),
    ),
    responses(
        (status = 200, description = "The prediction", body = kiln_proto::Prediction),
        (status = 404, description = "job_not_found (another tenant's too); not_found for a path parameter that is not UTF-8", body = super::openapi::Problem),
        (status = 422, description = "invalid_request: the Host header is missing or malformed (and KILN_PUBLIC_URL is unset)", body = super::openapi::Problem),
        (status = 503, description = "store_unavailable", body = super::openapi::Problem, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Base(base): Base,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let record = current(&state, &who, &id).await?;
    Ok(Json(shown(&state, &record, base)).into_response())
}

/// `POST /v1/predictions/{id}/cancel`: cancels a queued or running prediction (a running one
/// stops within one step); a finished one is answered as it is, as Replicate does.
#[utoipa::path(post, path = "/v1/predictions/{id}/cancel", operation_id = "cancel_prediction", tag = "predictions",
    summary = "Cancel a prediction: a queued one never runs, a running one stops within one step; a finished one is answered as it is",
    params(
        ("id" = String, Path, description = "The prediction's id, which is its job's."),
    ),
    responses(
        (status = 200, description = "The prediction", body = kiln_proto::Prediction),
        (status = 404, description = "job_not_found (another tenant's too); not_found for a path parameter that is not UTF-8", body = super::openapi::Problem),
        (status = 422, description = "invalid_request: the Host header is missing or malformed (and KILN_PUBLIC_URL is unset)", body = super::openapi::Problem),
        (status = 503, description = "store_unavailable", body = super::openapi::Problem, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Base(base): Base,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let record = current(&state, &who, &id).await?;
    if !record.status.is_terminal() {
        cancel_job(&state, record.id).await?;
    }
    let record = current(&state, &who, &id).await?;
    Ok(Json(shown(&state, &record, base)).into_response())
}

async fn cancel_job(state: &AppState, id: JobId) -> Result<(), ApiError> {
    match state.backend.store.cancel(id).await.map_err(|e| ApiError::Store(e, state.config.retry_after))? {
        Transition::Applied => events::job_canceled(id),
        Transition::AlreadyTerminal(_)
        | Transition::NotApplicable(_)
        | Transition::Missing
        | Transition::Superseded => {}
    }
    Ok(())
}

/// The job `id` as `who` may see it (another tenant's is not found), canceled first when its
/// `Cancel-After` passed (a job nobody runs meanwhile is ended here).
async fn current(state: &AppState, who: &Principal, id: &str) -> Result<JobRecord, ApiError> {
    let job_id: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.to_owned()))?;
    let not_found = || ApiError::JobNotFound(id.to_owned());
    let record = jobs::visible(state, who, job_id).await?.ok_or_else(not_found)?;
    if !Prediction::overdue(&record) {
        return Ok(record);
    }
    cancel_job(state, job_id).await?;
    jobs::visible(state, who, job_id).await?.ok_or_else(not_found)
}

fn shown(state: &AppState, record: &JobRecord, base: String) -> Prediction {
    let version = state.models.get(record.model.as_str()).map(|s| s.version.clone()).unwrap_or_default();
    Prediction::of(record, &PredictionView { base_url: base, version }, None)
}

fn is_prediction_path(path: &str) -> bool {
    path == "/v1/predictions"
        || path.starts_with("/v1/predictions/")
        || (path.starts_with("/v1/models/") && path.ends_with("/predictions"))
}

/// Errors of the predictions API in the problem-details shape (RFC 9457) that Replicate's clients
/// read into their exceptions — `title`, `status`, `detail` — next to Kiln's own `error` object,
/// so both kinds of client understand them. Refusals of the auth guard and the router included.
pub async fn problems(req: Request, next: Next) -> Response {
    let ours = is_prediction_path(req.uri().path());
    let resp = next.run(req).await;
    if !ours || resp.status().as_u16() < 400 {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY).await else {
        return ApiError::Internal("an error body past its bound".into()).into_response();
    };
    let mut obj = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(obj)) if obj.get("error").is_some_and(Value::is_object) => obj,
        _ => return Response::from_parts(parts, Body::from(bytes)),
    };
    let detail = obj["error"]["message"].clone();
    let status = parts.status;
    obj.insert("title".into(), json!(status.canonical_reason().unwrap_or("Error")));
    obj.insert("status".into(), json!(status.as_u16()));
    obj.insert("detail".into(), detail);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(Value::Object(obj).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_after_takes_durations_and_seconds() {
        let s = |n: f64| Some(Duration::from_secs_f64(n));
        assert_eq!(parse_cancel_after("30s"), s(30.0));
        assert_eq!(parse_cancel_after("1h30m"), s(5400.0));
        assert_eq!(parse_cancel_after("1h30m45s"), s(5445.0));
        assert_eq!(parse_cancel_after("5m"), s(300.0));
        assert_eq!(parse_cancel_after("1.5h"), s(5400.0));
        assert_eq!(parse_cancel_after("250ms"), s(0.25));
        assert_eq!(parse_cancel_after(" 90 "), s(90.0));
        for bad in ["", "0s", "-5s", "30x", "h", "1h 30m", "30s5", "abc", "9999h", "NaN", "inf"] {
            assert_eq!(parse_cancel_after(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn prefer_wait_bare_is_sixty_seconds_and_capped() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("prefer", HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(prefer_wait(&h("wait"), 600), Some(Duration::from_secs(60)));
        assert_eq!(prefer_wait(&h("wait"), 10), Some(Duration::from_secs(10)));
        assert_eq!(prefer_wait(&h("wait=5"), 60), Some(Duration::from_secs(5)));
        assert_eq!(prefer_wait(&h("respond-async, wait=7"), 60), Some(Duration::from_secs(7)));
        assert_eq!(prefer_wait(&h("return=minimal"), 60), None);
        assert_eq!(prefer_wait(&HeaderMap::new(), 60), None);
    }

    #[test]
    fn models_are_named_kiln_slash_model_or_bare() {
        assert_eq!(reference("kiln/terrain-diffusion").unwrap(), ("terrain-diffusion", None));
        assert_eq!(reference("terrain-diffusion:0.4.2").unwrap(), ("terrain-diffusion", Some("0.4.2")));
        assert_eq!(reference("KILN/m:1").unwrap(), ("m", Some("1")));
        assert!(matches!(reference("stability-ai/sdxl"), Err(ApiError::ModelNotFound(_))));
    }

    #[test]
    fn webhook_filters_map_onto_job_events() {
        let events = |f: Value| kiln_events(Some(f)).map(|v| Value::Array(v).to_string());
        assert_eq!(
            kiln_events(None).map(|v| Value::Array(v).to_string()).unwrap(),
            r#"["start","progress","completed"]"#
        );
        assert_eq!(events(json!(["completed"])).unwrap(), r#"["completed"]"#);
        assert_eq!(events(json!(["logs", "output"])).unwrap(), r#"["progress"]"#);
        assert!(
            matches!(events(json!(["done"])), Err(ApiError::InvalidRequest { field, .. }) if field == "webhook_events_filter[0]")
        );
        assert!(events(json!("start")).is_err());
    }

    #[test]
    fn the_base_url_comes_from_the_request_unless_configured() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(base_of(&h, None, false).unwrap(), "http://127.0.0.1:8080");
        assert_eq!(base_of(&h, None, true).unwrap(), "https://127.0.0.1:8080");
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert_eq!(base_of(&h, None, false).unwrap(), "https://127.0.0.1:8080");
        h.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        assert_eq!(base_of(&h, None, false).unwrap(), "http://127.0.0.1:8080");
        assert_eq!(base_of(&HeaderMap::new(), Some("kiln.example.com"), true).unwrap(), "https://kiln.example.com");
        h.insert(header::HOST, HeaderValue::from_static("evil.example.com/x?"));
        assert!(matches!(base_of(&h, None, false), Err(ApiError::InvalidRequest { field, .. }) if field == "Host"));
    }

    #[test]
    fn prediction_paths_are_recognised() {
        for p in ["/v1/predictions", "/v1/predictions/x/cancel", "/v1/models/kiln/m/predictions"] {
            assert!(is_prediction_path(p), "{p}");
        }
        for p in ["/v1/jobs", "/v1/models", "/v1/predictionsx"] {
            assert!(!is_prediction_path(p), "{p}");
        }
    }
}
