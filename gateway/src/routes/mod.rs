//! Route table and the per-request span.

mod events;
pub(crate) mod jobs;
mod openapi;
mod outputs;
mod system;

pub use jobs::current;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Uri;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    // The body limit is enforced in the handler so the 413 carries our error body; the extractor
    // limit sits a little above it as a backstop.
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(events::stream))
        .route("/v1/jobs/{id}/outputs/{name}", get(outputs::get))
        .route("/openapi.json", get(openapi::spec))
        .route("/v1/models", get(system::models))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .layer(middleware::from_fn(span))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn span(req: Request, next: Next) -> Response {
    let span =
        tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), status = tracing::field::Empty);
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    span.record("status", resp.status().as_u16());
    tracing::debug!(parent: &span, elapsed_us = elapsed.as_micros() as u64, "request done");
    // Server time, for clients and benchmarks (waits such as `Prefer: wait` included).
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("app;dur={:.3}", elapsed.as_secs_f64() * 1e3)) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}
