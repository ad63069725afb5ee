//! The OpenAI-compatible routes, for clients that already speak OpenAI's API (the official
//! `openai` packages, and whatever is built on them): `POST /v1/embeddings`, `GET /v1/models` in
//! OpenAI's list shape, and OpenAI's error shape on both.
//!
//! An embeddings request is a mapping onto a Kiln job, not a second system: its texts become an
//! `embedding` job submitted as `POST /v1/jobs` would submit it (result cache, coalescing onto an
//! identical job in flight, the tenant's slots and quotas, publish with confirm), and the answer
//! waits for the job within `KILN_OPENAI_WAIT` through the gateway's long-poll slots. Past the
//! bound the answer is `504` with `Retry-After`: the job goes on, and the retry joins it (while it
//! runs) or reads its result from the cache.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use kiln_common::models::ModelSpec;
use kiln_proto::{EmbeddingOutput, ErrorCode, JobRecord, JobStatus, Task, json_type};
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::error::{ApiError, Rendered};
use crate::routes::jobs::{self, Admitted, Enqueued};
use crate::state::AppState;

/// The routes whose errors are given in OpenAI's shape.
const ROUTES: [&str; 2] = ["/v1/embeddings", "/v1/models"];
const FIELDS: [&str; 5] = ["input", "model", "encoding_format", "dimensions", "user"];
/// A worker that has not announced itself for this long is no longer listed (they announce every 5 s).
const WORKER_SEEN_WITHIN_MS: i64 = 20_000;

/// How the vectors are written in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// JSON numbers.
    Float,
    /// The little-endian `f32` bytes of each vector, base64-encoded (what the `openai` client
    /// asks for when the caller names no format).
    Base64,
}

/// An embeddings request that passed validation.
struct EmbeddingsRequest<'a> {
    spec: &'a ModelSpec,
    texts: Vec<String>,
    encoding: Encoding,
    dimensions: Option<usize>,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest { field: field.to_owned(), message: message.into() }
}

fn parse<'a>(state: &'a AppState, body: &[u8]) -> Result<EmbeddingsRequest<'a>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(invalid("body", format!("must be a JSON object, got {}", json_type(&value))));
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(unknown, format!("unknown parameter; accepted parameters are {}", FIELDS.join(", "))));
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) => m,
        Some(other) => return Err(invalid("model", format!("must be a string, got {}", json_type(other)))),
        None => return Err(invalid("model", "missing; name an embedding model from GET /v1/models")),
    };
    let spec = state.models.get(model).ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    if spec.task != Task::Embedding {
        return Err(invalid(
            "model",
            format!("{model} is a {} model; /v1/embeddings serves embedding models", spec.task.as_str()),
        ));
    }
    let texts = texts(obj.get("input"))?;
    let encoding = match obj.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(f)) if f == "float" => Encoding::Float,
        Some(Value::String(f)) if f == "base64" => Encoding::Base64,
        Some(other) => return Err(invalid("encoding_format", format!("must be \"float\" or \"base64\", got {other}"))),
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(_) if !spec.embedding.as_ref().is_some_and(|e| e.matryoshka) => {
            return Err(invalid(
                "dimensions",
                format!("{model} does not support dimensions: its vectors cannot be shortened (leave it out)"),
            ));
        }
        Some(v) => match v.as_u64().filter(|n| *n >= 1) {
            Some(n) => Some(n as usize),
            None => return Err(invalid("dimensions", format!("must be a whole number of at least 1, got {v}"))),
        },
    };
    match obj.get("user") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(other) => return Err(invalid("user", format!("must be a string, got {}", json_type(other)))),
    }
    Ok(EmbeddingsRequest { spec, texts, encoding, dimensions })
}

/// The texts of `input`: a string or an array of strings. Token ids (an array of integers, or of
/// arrays of integers) are refused: Kiln's models tokenise the text themselves.
fn texts(input: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let token_ids = || {
        invalid(
            "input",
            "token ids are not accepted here: each model tokenises text with its own tokenizer; send the text as a string or an array of strings",
        )
    };
    match input {
        None | Some(Value::Null) => Err(invalid("input", "missing; give a string or an array of strings")),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.is_empty() => Err(invalid("input", "must hold at least one text")),
        Some(Value::Array(items)) if items.iter().all(|i| i.is_number() || i.is_array()) => Err(token_ids()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Array(_) => Err(token_ids()),
                other => Err(invalid(&format!("input[{i}]"), format!("must be a string, got {}", json_type(other)))),
            })
            .collect(),
        Some(other) => {
            Err(invalid("input", format!("must be a string or an array of strings, got {}", json_type(other))))
        }
    }
}

/// `POST /v1/embeddings`.
/// Embed texts (OpenAI-compatible)
///
/// OpenAI's embeddings API, served as an embedding job of the model (result cache, coalescing, the
/// tenant's quotas) and answered on the request. The job is waited for up to KILN_OPENAI_WAIT
/// (default 30 s); past it the answer is 504 wait_timeout with Retry-After while the job goes on,
/// and a retry joins it or reads its result from the cache. usage counts the tokens the model saw
/// (special tokens included, after truncation). Errors are in OpenAI's shape, with Kiln's stable
/// code in error.code.
#[utoipa::path(post, path = "/v1/embeddings", operation_id = "create_embeddings", tag = "openai",
    request_body(content = super::openapi::EmbeddingsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The vectors, in the order of the input", body = super::openapi::EmbeddingsResponse,
         headers(("Kiln-Job-Id" = kiln_proto::JobId, description = "The job that made them (GET /v1/jobs/{id})"))),
        (status = 400, description = "malformed_json", body = super::openapi::OpenAIError),
        (status = 404, description = "model_not_found (param: model)", body = super::openapi::OpenAIError),
        (status = 409, description = "canceled, deadline_exceeded: the job was canceled (POST /v1/jobs/{id}/cancel) before it finished", body = super::openapi::OpenAIError),
        (status = 413, description = "payload_too_large", body = super::openapi::OpenAIError),
        (status = 415, description = "unsupported_media_type", body = super::openapi::OpenAIError),
        (status = 422, description = "invalid_request (param names the field: input, model, encoding_format, dimensions, user; token-id input and dimensions on a model that does not support it are refused here), invalid_input (the worker refused the input)", body = super::openapi::OpenAIError),
        (status = 502, description = "inference_failed, worker_lost, job_lost: the job failed; a retry runs it again", body = super::openapi::OpenAIError, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
        (status = 503, description = "broker_unavailable, store_unavailable, overloaded (submissions or long-poll slots, KILN_MAX_WAITERS)", body = super::openapi::OpenAIError, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
        (status = 504, description = "wait_timeout: the job did not finish within KILN_OPENAI_WAIT; it goes on, retry after Retry-After", body = super::openapi::OpenAIError, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = jobs::checked_body(&state, &headers, body)?;
    let request = parse(&state, &body)?;
    // The long-poll slot is taken first: with none free the answer is 503 before anything runs.
    let waiter = crate::waiting::waiter(&state)?;
    let job = json!({ "model": request.spec.name.as_str(), "input": { "texts": request.texts } });
    let Enqueued { admitted, completion } =
        jobs::submit_on_behalf(&state, &who, &job).await.map_err(in_openai_terms)?;
    let record = match admitted {
        Admitted::Existing(record) | Admitted::Cached(record) => record,
        Admitted::New(record) => match completion {
            Some(mut rx) if !record.status.is_terminal() => {
                let wait = state.config.openai_wait;
                match waiter.completion(&state, record.id, &mut rx, wait).await {
                    Some(done) => done,
                    // It may have finished at the very end of the wait.
                    None => jobs::current(&state, record.id).await?.unwrap_or(record),
                }
            }
            _ => record,
        },
    };
    answer(&state, &request, record)
}

/// Errors of the submission that name Kiln's job fields, said in terms of this request.
fn in_openai_terms(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidInput(e) => invalid("input", e.message),
        other => other,
    }
}

/// The answer for a job as it stands: its vectors if it succeeded.
fn answer(state: &AppState, request: &EmbeddingsRequest<'_>, record: JobRecord) -> Result<Response, ApiError> {
    let job = record.id;
    let retry_after = state.config.retry_after;
    let status = match record.status {
        JobStatus::Succeeded => None,
        JobStatus::Queued | JobStatus::Running => {
            return Err(ApiError::WaitTimeout { job, waited: state.config.openai_wait, retry_after });
        }
        s @ (JobStatus::Failed | JobStatus::Canceled | JobStatus::Expired) => Some(s),
    };
    if let Some(status) = status {
        return Err(ApiError::JobFailed { job, status: status.as_str(), error: record.error, retry_after });
    }
    let output: EmbeddingOutput = record
        .output
        .and_then(|o| serde_json::from_value(o).ok())
        .ok_or_else(|| ApiError::Internal(format!("job {job} succeeded without an embedding output")))?;
    if output.embeddings.len() != request.texts.len() {
        return Err(ApiError::Internal(format!(
            "job {job} gave {} vectors for {} texts",
            output.embeddings.len(),
            request.texts.len()
        )));
    }
    let normalize = request.spec.embedding.as_ref().is_none_or(|e| e.normalize);
    let mut data = Vec::with_capacity(output.embeddings.len());
    for (index, vector) in output.embeddings.into_iter().enumerate() {
        let vector = match request.dimensions {
            Some(n) if n > vector.len() => {
                return Err(invalid(
                    "dimensions",
                    format!("{} has {} dimensions; ask for at most that", request.spec.name, vector.len()),
                ));
            }
            Some(n) => shortened(vector, n, normalize),
            None => vector,
        };
        let embedding = match request.encoding {
            Encoding::Float => json!(vector),
            Encoding::Base64 => json!(base64_f32(&vector)),
        };
        data.push(json!({ "object": "embedding", "index": index, "embedding": embedding }));
    }
    // Outputs of workers from before token counts were recorded have none: they count as 0.
    let tokens: usize = output.tokens.iter().sum();
    let body = json!({
        "object": "list",
        "data": data,
        "model": request.spec.name.as_str(),
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    let mut resp = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&job.to_string()) {
        resp.headers_mut().insert("kiln-job-id", v);
    }
    Ok(resp)
}

/// The first `n` components of a Matryoshka vector, normalised again when the model normalises.
fn shortened(mut vector: Vec<f32>, n: usize, normalize: bool) -> Vec<f32> {
    vector.truncate(n);
    if normalize {
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

/// The vector's little-endian `f32` bytes, base64-encoded (standard alphabet, padded).
fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `GET /v1/models`: OpenAI's list shape, each entry carrying Kiln's description of the model
/// as well (`name`, `version`, `task`, `max_batch`, `input_schema`, `workers`).
#[utoipa::path(get, path = "/v1/models", operation_id = "list_models", tag = "openai",
    summary = "Served models (OpenAI's list shape, with Kiln's details in each entry)",
    responses((status = 200, description = "Every served model: task, version, max_batch, input JSON Schema, and the workers serving each", body = super::openapi::ModelList)),
)]
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let since = kiln_proto::now_millis() - WORKER_SEEN_WITHIN_MS;
    let mut data = Vec::new();
    for spec in state.models.iter() {
        let mut info = spec.info();
        // The list is informative: with the store down, models are still listed.
        info.workers = state.backend.store.workers(&spec.name, since).await.unwrap_or_default();
        let mut entry = serde_json::to_value(&info).unwrap_or_else(|_| json!({}));
        entry["id"] = json!(spec.name.as_str());
        entry["object"] = json!("model");
        // Kiln does not know when a model was made.
        entry["created"] = json!(0);
        entry["owned_by"] = json!("kiln");
        data.push(entry);
    }
    Json(json!({ "object": "list", "data": data }))
}

/// OpenAI's `error.type` for each of Kiln's codes.
fn error_type(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::MalformedJson
        | ErrorCode::InvalidRequest
        | ErrorCode::InvalidInput
        | ErrorCode::PayloadTooLarge
        | ErrorCode::UnsupportedMediaType
        | ErrorCode::ModelNotFound
        | ErrorCode::JobNotFound
        | ErrorCode::OutputNotFound
        | ErrorCode::FileNotFound
        | ErrorCode::NotFound
        | ErrorCode::MethodNotAllowed
        | ErrorCode::IdempotencyKeyReused
        | ErrorCode::IdempotencyKeyInFlight
        | ErrorCode::JobFinished
        | ErrorCode::Canceled
        | ErrorCode::DeadlineExceeded => "invalid_request_error",
        ErrorCode::Unauthorized => "authentication_error",
        ErrorCode::Forbidden => "permission_error",
        ErrorCode::RateLimited => "rate_limit_error",
        ErrorCode::QuotaExceeded => "insufficient_quota",
        ErrorCode::BrokerUnavailable
        | ErrorCode::StoreUnavailable
        | ErrorCode::Overloaded
        | ErrorCode::InferenceFailed
        | ErrorCode::WorkerLost
        | ErrorCode::JobLost
        | ErrorCode::WaitTimeout
        | ErrorCode::Internal => "server_error",
    }
}

/// Says the errors of the OpenAI routes — the handlers' and the auth guard's alike — in OpenAI's
/// shape, `{"error": {"message", "type", "param", "code"}}`, with the same status and headers
/// (`Retry-After`, `WWW-Authenticate`, `RateLimit`). `code` is Kiln's stable code.
pub async fn error_shape(req: Request, next: Next) -> Response {
    let ours = req.extensions().get::<MatchedPath>().is_some_and(|p| ROUTES.contains(&p.as_str()));
    let resp = next.run(req).await;
    let Some(rendered) = resp.extensions().get::<Rendered>().filter(|_| ours).cloned() else { return resp };
    let body = json!({ "error": {
        "message": rendered.message,
        "type": error_type(rendered.code),
        "param": rendered.param,
        "code": rendered.code.as_str(),
    } });
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        let encoded = base64_f32(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }

    #[test]
    fn token_ids_are_refused_and_texts_accepted() {
        let field = |v: Value| match texts(Some(&v)) {
            Err(ApiError::InvalidRequest { field, message }) => format!("{field}: {message}"),
            other => panic!("{v} gave {:?}", other.map_err(|e| e.to_string())),
        };
        assert!(field(json!([1, 2, 3])).starts_with("input: token ids"));
        assert!(field(json!([[1, 2], [3]])).starts_with("input: token ids"));
        assert!(field(json!(["a", [3]])).starts_with("input: token ids"));
        assert!(field(json!([])).starts_with("input: must hold"));
        assert!(field(json!(["a", null])).starts_with("input[1]:"));
        assert!(field(json!({"text": "a"})).starts_with("input: must be a string or an array"));
        assert_eq!(texts(Some(&json!("one"))).unwrap(), ["one"]);
        assert_eq!(texts(Some(&json!(["a", "b"]))).unwrap(), ["a", "b"]);
    }

    #[test]
    fn a_shortened_vector_is_normalised_again() {
        let v = shortened(vec![3.0, 4.0, 12.0], 2, true);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6, "{v:?}");
    }
}
