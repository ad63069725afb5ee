//! Binary inputs of a job, resolved before its input is parsed: each media field of the model's
//! task (base64, a `data:` URL, `file:ID`, an `https://` URL, or an already stored reference)
//! becomes bytes, which are checked (the byte bound, then an image decoded in full on a blocking
//! thread, at most `decode_concurrency` at once, or a WAV's header read for its length), stored
//! in the input store under the caller's scope for the job retention, and replaced by their
//! `MediaRef`. So the canonical input (and the cache key made from it) is the same for the same
//! bytes however they were given, and a corrupt or oversized file is a 4xx here, never a worker's
//! crash.

use std::time::Duration;

use axum::body::Bytes;
use kiln_common::inputs::fetch::FetchError;
use kiln_common::inputs::{self, InputStoreError};
use kiln_common::media::{MediaError, audio, image};
use kiln_proto::{InputError, InputLimits, MediaKind, MediaRef, MediaSource};
use serde_json::Value;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// How long a request waits for a turn at decoding before it is answered `503 overloaded`.
const DECODE_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Replaces the media fields of `body`'s `input` with stored references. A body that names no
/// served model, or no input object, is left for the parse to refuse.
pub(crate) async fn resolve(state: &AppState, who: &Principal, body: &mut Value) -> Result<(), ApiError> {
    let Some(obj) = body.as_object_mut() else { return Ok(()) };
    let Some(spec) = obj.get("model").and_then(Value::as_str).and_then(|m| state.models.get(m)) else {
        return Ok(());
    };
    let (task, limits) = (spec.task, spec.limits);
    let Some(Value::Object(input)) = obj.get_mut("input") else { return Ok(()) };
    for &(name, kind) in task.media_fields() {
        let Some(v) = input.get_mut(name) else { continue };
        let field = format!("input.{name}");
        let stored = resolve_one(state, who, v, &field, kind, &limits).await?;
        *v = serde_json::to_value(stored).map_err(|e| ApiError::Internal(format!("encoding a reference: {e}")))?;
    }
    Ok(())
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidInput(InputError::new(field, message))
}

fn store_err(state: &AppState) -> impl Fn(InputStoreError) -> ApiError {
    let retry = state.config.retry_after;
    move |e| ApiError::Inputs(e, retry)
}

async fn resolve_one(
    state: &AppState,
    who: &Principal,
    v: &Value,
    field: &str,
    kind: MediaKind,
    limits: &InputLimits,
) -> Result<MediaRef, ApiError> {
    let scope = inputs::scope(who.tenant.as_deref());
    let store = &state.backend.inputs;
    // Inline bytes are bounded by the body already; the model's own bound is checked below, so
    // that going over it is a 413 whichever way the bytes came.
    let parse_bound = state.config.max_body_bytes.max(limits.max_input_bytes);
    let bytes: Bytes = match MediaSource::parse(v, field, parse_bound).map_err(ApiError::InvalidInput)? {
        MediaSource::Inline { bytes, .. } => bytes.into(),
        MediaSource::File(id) => {
            let gone =
                || invalid(field, format!("file:{id} is not an uploaded file of yours (unknown, deleted or expired)"));
            let file = store.file(scope, &id).await.map_err(store_err(state))?.ok_or_else(gone)?;
            store.get(scope, &file.sha256).await.map_err(store_err(state))?.ok_or_else(gone)?.1
        }
        MediaSource::Url(url) => {
            state.fetcher.fetch(&url, limits.max_input_bytes).await.map_err(|e| fetch_err(field, e))?
        }
        MediaSource::Stored(r) => {
            let found = store.get(scope, &r.sha256).await.map_err(store_err(state))?;
            found.ok_or_else(|| invalid(field, format!("no stored input of yours has sha256 {}", r.sha256)))?.1
        }
    };
    if bytes.len() > limits.max_input_bytes {
        return Err(ApiError::InputTooLarge { field: field.to_owned(), limit: limits.max_input_bytes });
    }
    let content_type = check(state, bytes.clone(), kind, limits).await?.map_err(|e| invalid(field, e.to_string()))?;
    let ttl = store.job_ttl();
    store.put(scope, content_type, bytes, ttl).await.map_err(store_err(state))
}

/// A refused URL is answered as a refused webhook URL is (`422 invalid_request`, naming the
/// field); one over the bound as any input over it; one that could not be fetched as bad input.
fn fetch_err(field: &str, e: FetchError) -> ApiError {
    match e {
        FetchError::TooLarge { max } => ApiError::InputTooLarge { field: field.to_owned(), limit: max },
        e if e.refused() => ApiError::InvalidRequest { field: field.to_owned(), message: e.to_string() },
        e @ (FetchError::Delivery(_) | FetchError::Status(_) | FetchError::Timeout(_)) => {
            invalid(field, format!("the URL {e}"))
        }
    }
}

/// Checks `bytes` are a usable input of `kind`: their sniffed content type, or why they are not
/// (the outer error: no turn at decoding came in time).
async fn check(
    state: &AppState,
    bytes: Bytes,
    kind: MediaKind,
    limits: &InputLimits,
) -> Result<Result<&'static str, MediaError>, ApiError> {
    match kind {
        MediaKind::Image => {
            // The header first, here: a huge image is refused without waiting for a decoder.
            let info = match image::probe_image(&bytes, limits.max_pixels) {
                Ok(info) => info,
                Err(e) => return Ok(Err(e)),
            };
            let permit = tokio::time::timeout(DECODE_QUEUE_WAIT, state.decoders.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or(ApiError::Overloaded(state.config.retry_after))?;
            let max_pixels = limits.max_pixels;
            let decoded = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                image::decode_image(&bytes, max_pixels).map(|_| ())
            })
            .await;
            Ok(match decoded {
                Ok(result) => result.map(|()| info.content_type),
                // A decoder that panicked on these bytes: they are not a usable image.
                Err(e) => Err(MediaError::Corrupt(format!("the decoder failed: {e}"))),
            })
        }
        MediaKind::Audio => Ok(check_audio(&bytes, limits)),
    }
}

fn check_audio(bytes: &[u8], limits: &InputLimits) -> Result<&'static str, MediaError> {
    if image::sniff(bytes) != Some("audio/wav") {
        let found = image::sniff(bytes).unwrap_or("no known format").to_owned();
        return Err(MediaError::Unsupported { expected: "a WAV file", found });
    }
    let wav = audio::probe_wav(bytes)?;
    if wav.duration_s > f64::from(limits.max_audio_s) {
        return Err(MediaError::TooLong { seconds: wav.duration_s, max: limits.max_audio_s });
    }
    Ok("audio/wav")
}
