//! `POST /v1/files` (a `multipart/form-data` body with a `file` part, or the raw bytes with their
//! `Content-Type`), `GET /v1/files/{id}` (the record), `GET /v1/files/{id}/content` (the bytes,
//! ETag = sha256) and `DELETE /v1/files/{id}`. Files belong to the caller's tenant (another's id
//! is a 404), are sniffed on upload (only PNG, JPEG, WebP and WAV are taken), bounded by
//! `max_file_bytes` and kept for `KILN_FILE_TTL_S`. A job names one as `"file:<id>"`.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_common::inputs::{self, new_file_id};
use kiln_common::media::image::sniff;
use kiln_proto::{FileObject, valid_file_id};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// Upload a file
///
/// A multipart/form-data body with a `file` part (its filename is kept), or the raw bytes. The
/// content type is sniffed from the bytes. Use the id as `"file:<id>"` in a job's input.
#[utoipa::path(post, path = "/v1/files", operation_id = "upload_file", tag = "files",
    request_body(content = Vec<u8>, description = "multipart/form-data with a `file` part, or the raw bytes (image/png, image/jpeg, image/webp, audio/wav)", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = kiln_proto::FileObject, headers(("Location" = String, description = "/v1/files/{id}"))),
        (status = 413, description = "payload_too_large: over KILN_MAX_FILE_BYTES (or the largest max_input_bytes of the models)", body = kiln_proto::ApiErrorBody),
        (status = 415, description = "unsupported_media_type: not PNG, JPEG, WebP or WAV", body = kiln_proto::ApiErrorBody),
        (status = 422, description = "invalid_request: a multipart body without a `file` part", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn upload(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    req: Request,
) -> Result<Response, ApiError> {
    let limit = state.max_file_bytes;
    let declared = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let multipart = declared.as_deref().is_some_and(|ct| ct.to_ascii_lowercase().starts_with("multipart/form-data"));
    let (data, filename, declared) = if multipart {
        let form =
            Multipart::from_request(req, &state).await.map_err(|e| form_err(e.status(), e.body_text(), limit))?;
        file_part(form, limit).await?
    } else {
        let data =
            axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| ApiError::PayloadTooLarge { limit })?;
        (data, None, declared)
    };
    if data.is_empty() {
        return Err(ApiError::InvalidRequest { field: "file".into(), message: "is empty".into() });
    }
    let content_type = sniff(&data).ok_or(ApiError::UnsupportedFile { declared })?;
    let scope = inputs::scope(who.tenant.as_deref());
    let retry = state.config.retry_after;
    let ttl = Duration::from_secs(state.config.inputs.file_ttl_s.max(1));
    let stored =
        state.backend.inputs.put(scope, content_type, data, ttl).await.map_err(|e| ApiError::Inputs(e, retry))?;
    let now = OffsetDateTime::now_utc();
    let file = FileObject {
        id: new_file_id(),
        sha256: stored.sha256,
        size: stored.size,
        content_type: content_type.to_owned(),
        filename,
        created_at: rfc3339(now),
        expires_at: rfc3339(now + ttl),
    };
    state.backend.inputs.create_file(scope, &file, ttl).await.map_err(|e| ApiError::Inputs(e, retry))?;
    let location = format!("/v1/files/{}", file.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(file)).into_response())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn form_err(status: StatusCode, text: String, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::InvalidRequest { field: "file".into(), message: format!("not a readable multipart body: {text}") }
    }
}

/// The `file` part's bytes (at most `limit`), its filename and its declared content type.
async fn file_part(mut form: Multipart, limit: usize) -> Result<(Bytes, Option<String>, Option<String>), ApiError> {
    while let Some(mut field) = form.next_field().await.map_err(|e| form_err(e.status(), e.body_text(), limit))? {
        if field.name() != Some("file") {
            continue;
        }
        let filename = field.file_name().map(|n| n.chars().take(inputs::MAX_FILENAME_CHARS).collect());
        let declared = field.content_type().map(str::to_owned);
        let mut data = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| form_err(e.status(), e.body_text(), limit))? {
            if data.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            data.extend_from_slice(&chunk);
        }
        return Ok((Bytes::from(data), filename, declared));
    }
    Err(ApiError::InvalidRequest {
        field: "file".into(),
        message: "missing: send the bytes in a part named `file`".into(),
    })
}

/// The caller's file `id`; another tenant's is not found.
async fn own_file(state: &AppState, who: &Principal, id: &str) -> Result<FileObject, ApiError> {
    if !valid_file_id(id) {
        return Err(ApiError::FileNotFound(id.to_owned()));
    }
    let scope = inputs::scope(who.tenant.as_deref());
    let found =
        state.backend.inputs.file(scope, id).await.map_err(|e| ApiError::Inputs(e, state.config.retry_after))?;
    found.ok_or_else(|| ApiError::FileNotFound(id.to_owned()))
}

/// An uploaded file's record
#[utoipa::path(get, path = "/v1/files/{id}", operation_id = "get_file", tag = "files",
    params(("id" = String, Path, description = "The file's id (`file_…`).")),
    responses(
        (status = 200, description = "The record", body = kiln_proto::FileObject),
        (status = 404, description = "file_not_found: unknown, another tenant's, deleted or expired", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    Ok(Json(own_file(&state, &who, &id).await?).into_response())
}

/// An uploaded file's bytes
#[utoipa::path(get, path = "/v1/files/{id}/content", operation_id = "get_file_content", tag = "files",
    params(("id" = String, Path, description = "The file's id (`file_…`).")),
    responses(
        (status = 200, description = "The bytes, with Content-Type and ETag", content_type = "application/octet-stream", body = Vec<u8>,
         headers(("ETag" = String, description = "The file's sha256, quoted"))),
        (status = 404, description = "file_not_found", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn content(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let file = own_file(&state, &who, &id).await?;
    let scope = inputs::scope(who.tenant.as_deref());
    let retry = state.config.retry_after;
    let (stored, data) = state
        .backend
        .inputs
        .get(scope, &file.sha256)
        .await
        .map_err(|e| ApiError::Inputs(e, retry))?
        .ok_or(ApiError::FileNotFound(id))?;
    let content_type =
        HeaderValue::from_str(&stored.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let etag =
        HeaderValue::from_str(&format!("\"{}\"", stored.sha256)).map_err(|_| ApiError::Internal("etag".into()))?;
    Ok(([(header::CONTENT_TYPE, content_type), (header::ETAG, etag)], Body::from(data)).into_response())
}

/// Delete an uploaded file
///
/// Jobs already made from it keep their own copy of its bytes.
#[utoipa::path(delete, path = "/v1/files/{id}", operation_id = "delete_file", tag = "files",
    params(("id" = String, Path, description = "The file's id (`file_…`).")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "file_not_found", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let scope = inputs::scope(who.tenant.as_deref());
    let retry = state.config.retry_after;
    let removed = valid_file_id(&id)
        && state.backend.inputs.delete_file(scope, &id).await.map_err(|e| ApiError::Inputs(e, retry))?;
    if !removed {
        return Err(ApiError::FileNotFound(id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
