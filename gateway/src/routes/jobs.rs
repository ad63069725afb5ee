//! `POST /v1/jobs` and `GET /v1/jobs/{id}`: validate, record, publish with confirm, answer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_proto::{EmbeddingInput, Envelope, JobId, JobRecord, JobStatus, Task, json_type, now_millis};
use serde_json::Value;

use crate::error::ApiError;
use crate::events;
use crate::state::AppState;

/// Largest `metadata` object accepted, serialised.
const MAX_METADATA_BYTES: usize = 4096;

/// A submission that passed validation.
struct Submission {
    spec_name: kiln_proto::ModelName,
    input: Value,
    metadata: Option<Value>,
    deadline: Option<std::time::Duration>,
}

/// Longest `deadline_s` accepted: a week.
const MAX_DEADLINE_S: f64 = 7.0 * 86_400.0;

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limit = state.config.max_body_bytes;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    if body.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    check_content_type(&headers)?;
    let submission = validate(&state, &body)?;

    let _permit =
        state.admission.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded(state.config.retry_after))?;

    let id = JobId::random();
    let created_at = now_millis();
    let deadline = submission.deadline.map(|d| created_at + d.as_millis() as i64);
    let mut record = JobRecord::queued(id, submission.spec_name.clone(), created_at, submission.metadata);
    record.deadline_at = deadline;
    let retry = state.config.retry_after;
    state.backend.store.create(&record).await.map_err(|e| ApiError::Store(e, retry))?;

    let envelope = Envelope::new(id, submission.spec_name.clone(), submission.input, created_at, deadline);
    let payload = serde_json::to_vec(&envelope).map_err(|e| ApiError::Internal(format!("encoding envelope: {e}")))?;
    if let Err(e) = state.backend.broker.publish(&submission.spec_name, payload).await {
        // No id goes out for a job that was not durably enqueued.
        let discarded = state.backend.store.discard(id).await.is_ok();
        events::enqueue_rolled_back(id, discarded);
        return Err(ApiError::Broker(e, retry));
    }
    events::job_accepted(id, &submission.spec_name);

    let location = format!("/v1/jobs/{id}");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(record)).into_response())
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<JobRecord>, ApiError> {
    let job_id: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let retry = state.config.retry_after;
    let store = &state.backend.store;
    let mut record =
        store.get(job_id).await.map_err(|e| ApiError::Store(e, retry))?.ok_or(ApiError::JobNotFound(id.clone()))?;
    // A queued job whose deadline passed is expired whether or not a worker has looked at it yet.
    let now = now_millis();
    if record.status == JobStatus::Queued && record.deadline_at.is_some_and(|d| d < now) {
        store.expire_if_due(job_id, now).await.map_err(|e| ApiError::Store(e, retry))?;
        record = store.get(job_id).await.map_err(|e| ApiError::Store(e, retry))?.ok_or(ApiError::JobNotFound(id))?;
    }
    Ok(Json(record))
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(ct.to_owned()))
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest { field: field.to_owned(), message: message.into() }
}

fn validate(state: &AppState, body: &[u8]) -> Result<Submission, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(invalid("body", format!("must be a JSON object, got {}", json_type(&value))));
    };
    if let Some(unknown) = obj.keys().find(|k| !matches!(k.as_str(), "model" | "input" | "metadata" | "deadline_s")) {
        return Err(invalid(unknown, "unknown field; accepted fields are model, input, metadata, deadline_s"));
    }
    let model = match obj.remove("model") {
        Some(Value::String(m)) => m,
        Some(other) => {
            return Err(invalid("model", format!("must be a string, got {}", json_type(&other))));
        }
        None => {
            return Err(invalid("model", "missing; name a model from GET /v1/models"));
        }
    };
    let spec = state.models.get(&model).ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    let input = obj.remove("input").ok_or_else(|| invalid("input", "missing"))?;
    let input = match spec.task {
        Task::Embedding => EmbeddingInput::parse(&input, &spec.limits).map_err(ApiError::InvalidInput)?.to_value(),
    };
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) => {
            if m.to_string().len() > MAX_METADATA_BYTES {
                return Err(invalid("metadata", format!("is larger than {MAX_METADATA_BYTES} bytes")));
            }
            Some(m)
        }
        Some(other) => {
            return Err(invalid("metadata", format!("must be an object, got {}", json_type(&other))));
        }
    };
    let deadline = match obj.remove("deadline_s") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(secs) if secs > 0.0 && secs <= MAX_DEADLINE_S => Some(std::time::Duration::from_secs_f64(secs)),
            _ => {
                return Err(invalid(
                    "deadline_s",
                    format!("must be a number of seconds in (0, {MAX_DEADLINE_S}], got {n}"),
                ));
            }
        },
        Some(other) => {
            return Err(invalid("deadline_s", format!("must be a number of seconds, got {}", json_type(&other))));
        }
    };
    Ok(Submission { spec_name: spec.name.clone(), input, metadata, deadline })
}
