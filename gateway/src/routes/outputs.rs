//! `GET /v1/jobs/{id}/outputs/{name}`: a job's binary output (a generated image) from the output
//! store, with its content type, length and a strong ETag (the sha256), `304` for a matching
//! `If-None-Match`, and caching headers: an output never changes once written. Each run of a job
//! stores its files under its own names; the finished record says which run made each file, and
//! until then the files of the latest run are served.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_proto::{ImageOutput, JobId, stored_output_name};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// A job's output file (a generated image)
///
/// Listed in the job's output as images[].url with size and sha256. Strong ETag = the sha256;
/// If-None-Match answers 304. Outputs expire with the job.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{name}", operation_id = "job_output", tag = "jobs",
    params(
        ("id" = kiln_proto::JobId, Path, description = "The job's id."),
        ("name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "The output's name, as in its url."),
        ("If-None-Match" = Option<String>, Header, description = "The ETag of a copy the client has."),
    ),
    responses(
        (status = 200, description = "The file, with Content-Type, Content-Length and ETag", content_type = "image/png", body = Vec<u8>,
         headers(("ETag" = String, description = "The file's sha256, quoted"))),
        (status = 304, description = "Not modified"),
        (status = 404, description = "job_not_found, output_not_found; not_found for a path parameter that is not UTF-8", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((id, name)) = path?;
    let job: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let retry = state.config.retry_after;
    let not_found = || ApiError::OutputNotFound(id.clone(), name.clone());
    let outputs = &state.backend.outputs;
    let name = stored_name(&state, &who, job, &name).await?.ok_or_else(not_found)?;
    let etag = |sha: &str| HeaderValue::from_str(&format!("\"{sha}\"")).map_err(|_| ApiError::Internal("etag".into()));
    if let Some(tags) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let meta = outputs.head(job, &name).await.map_err(|e| ApiError::Outputs(e, retry))?.ok_or_else(not_found)?;
        let matches = tags
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t.trim_matches('"') == meta.sha256);
        if matches {
            return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(&meta.sha256)?)]).into_response());
        }
    }
    let (meta, data) = outputs.get(job, &name).await.map_err(|e| ApiError::Outputs(e, retry))?.ok_or_else(not_found)?;
    let content_type =
        HeaderValue::from_str(&meta.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::ETAG, etag(&meta.sha256)?),
            (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable")),
            (header::HeaderName::from_static("x-content-sha256"), HeaderValue::from_str(&meta.sha256).expect("hex")),
        ],
        Body::from(data),
    )
        .into_response())
}

/// Where the output store keeps the job's file `name`: the run the record lists for it, else the
/// latest run's; a file of a record written before runs named their files keeps its own name.
async fn stored_name(state: &AppState, who: &Principal, job: JobId, name: &str) -> Result<Option<String>, ApiError> {
    let retry = state.config.retry_after;
    let Some(record) = state.backend.store.get(job).await.map_err(|e| ApiError::Store(e, retry))? else {
        return Ok(None);
    };
    // Another tenant's files are not there.
    let Some(record) = crate::routes::jobs::shown(who, record) else { return Ok(None) };
    let listed = record
        .output
        .and_then(|o| serde_json::from_value::<ImageOutput>(o).ok())
        .and_then(|o| o.images.into_iter().find(|f| f.name == name));
    Ok(Some(match listed {
        Some(file) => file.attempt.map_or_else(|| name.to_owned(), |a| stored_output_name(name, a)),
        None => stored_output_name(name, record.attempts.max(1)),
    }))
}
