//! `GET /v1/jobs/{id}/outputs/{name}`: a job's binary output (a generated image) from the output
//! store, with its content type, length and a strong ETag (the sha256), `304` for a matching
//! `If-None-Match`, and caching headers: an output never changes once written.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_proto::JobId;

use crate::error::ApiError;
use crate::state::AppState;

pub async fn get(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let retry = state.config.retry_after;
    let not_found = || ApiError::OutputNotFound(id.clone(), name.clone());
    let outputs = &state.backend.outputs;
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
