//! Liveness, readiness (dependency checks, false while draining) and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

/// Liveness
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "system",
    responses((status = 200, description = "Alive", body = super::openapi::Health)))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "system",
    responses(
        (status = 200, description = "Broker and store reachable, not draining", body = super::openapi::Readiness),
        (status = 503, description = "Not ready: a dependency is down, or the gateway is draining. The body says which (not an Error)",
         body = super::openapi::Readiness, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let timeout = state.config.ready_timeout;
    // The answer says which dependency is down, in a stable word; why is in the gateway's log
    // (an error's text can carry host names and internals).
    let broker = async {
        match tokio::time::timeout(timeout, state.backend.broker.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::events::dependency_down("broker", &e)),
            Err(_) => Err("timeout"),
        }
    };
    let store = async {
        match tokio::time::timeout(timeout, state.backend.store.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::events::dependency_down("store", &e)),
            Err(_) => Err("timeout"),
        }
    };
    let (broker, store) = tokio::join!(broker, store);
    let draining = state.shutdown.is_cancelled();
    let ready = broker.is_ok() && store.is_ok() && !draining;
    let show = |r: &Result<(), &str>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "draining": draining,
        "checks": { "broker": show(&broker), "store": show(&store) },
    });
    if ready {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        let secs = state.config.retry_after.as_secs().max(1);
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }
}

/// Prometheus text exposition of this process's metrics.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "system",
    summary = "Prometheus metrics of this process (text format 0.0.4)",
    responses((status = 200, description = "kiln_gateway_* series (and kiln_worker_* where a worker runs in the same process)",
               content_type = "text/plain", body = String)),
)]
pub async fn metrics() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], kiln_common::telemetry::prometheus().render())
}
