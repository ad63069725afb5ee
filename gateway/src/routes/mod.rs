//! Route table and the per-request span.

mod events;
mod files;
pub(crate) mod jobs;
mod listing;
mod openai;
mod openapi;
mod outputs;
mod predictions;
mod system;

pub use jobs::current;

use axum::Router;
use axum::extract::MatchedPath;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Uri;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::AppState;

/// Bytes a multipart upload may carry beyond its file: boundaries, part headers, other parts.
pub(crate) const UPLOAD_FRAMING: usize = 64 << 10;

pub fn router(state: AppState) -> Router {
    // The body limit is enforced in the handler so the 413 carries our error body; the extractor
    // limit sits a little above it as a backstop.
    let limit = state.config.max_body_bytes;
    // Uploads are bounded by the largest file taken (the handler says so with our 413), whatever
    // the JSON bodies' limit; a multipart body's framing adds a little.
    let upload_limit = state.max_file_bytes.saturating_add(UPLOAD_FRAMING);
    // The job routes, and their unversioned aliases for clients that call `/jobs` (the same
    // handlers and scopes; records' `Location` stays `/v1/jobs/{id}`).
    let mut routes = Router::new();
    for jobs in ["/v1/jobs", "/jobs"] {
        routes = routes
            .route(jobs, post(jobs::submit).get(listing::list))
            .route(&format!("{jobs}/{{id}}"), get(jobs::get))
            .route(&format!("{jobs}/{{id}}/cancel"), post(jobs::cancel))
            .route(&format!("{jobs}/{{id}}/events"), get(events::stream))
            .route(&format!("{jobs}/{{id}}/outputs/{{name}}"), get(outputs::get));
    }
    routes
        .route("/v1/predictions", post(predictions::create).get(predictions::list))
        .route("/v1/predictions/{id}", get(predictions::get))
        .route("/v1/predictions/{id}/cancel", post(predictions::cancel))
        .route("/v1/models/{owner}/{name}/predictions", post(predictions::create_for_model))
        .route("/v1/files", post(files::upload).layer(DefaultBodyLimit::max(upload_limit)))
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/openapi.json", get(openapi::spec))
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::auth::guard))
        // Outside the guard, so that its refusals on the OpenAI routes are said in OpenAI's shape.
        .route_layer(middleware::from_fn(openai::error_shape))
        .route_layer(middleware::from_fn(measure))
        .layer(middleware::from_fn(predictions::problems))
        .layer(middleware::from_fn_with_state(state.clone(), crate::auth::audit))
        .layer(middleware::from_fn(span))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Request metrics of routed requests, labelled by route pattern (one series per endpoint,
/// whatever the ids in the path).
async fn measure(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let in_flight = metrics::gauge!("kiln_gateway_in_flight_requests");
    in_flight.increment(1.0);
    let resp = next.run(req).await;
    in_flight.decrement(1.0);
    let status = resp.status().as_u16().to_string();
    metrics::counter!("kiln_gateway_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("kiln_gateway_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed());
    resp
}

async fn span(req: Request, next: Next) -> Response {
    let span =
        tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), status = tracing::field::Empty);
    // A caller's trace context (W3C `traceparent`) makes this request part of its trace.
    let caller = req.headers().get("traceparent").and_then(|v| v.to_str().ok());
    kiln_common::telemetry::set_parent(&span, caller);
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
