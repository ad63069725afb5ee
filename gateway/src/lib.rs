//! The Kiln HTTP gateway: validates jobs, writes their records, publishes them with confirms and
//! answers with an id; serves job records, models, health and readiness. Never links ONNX Runtime.

mod auth;
pub mod config;
mod error;
mod events;
mod inputs;
mod routes;
mod state;
pub mod tls;
mod waiting;

use std::sync::Arc;

use axum::Router;
use kiln_common::Backend;
use kiln_common::audit::AuditLog;
use kiln_common::models::ModelRepository;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{AuthMode, GatewayConfig};
pub use error::ApiError;
pub use state::AppState;

/// The gateway's routes over the given state; tests drive it in-process with `oneshot`.
pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// Serves the API on `listener` (HTTPS when `config.tls` names a certificate) until `shutdown` is
/// cancelled, then stops taking connections, finishes the requests in flight and returns.
pub async fn run(
    config: GatewayConfig,
    backend: Backend,
    models: ModelRepository,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tls =
        tls::ServerTls::load(&config.tls).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // A CA bundle for input URLs that does not load stops the start, as a bad certificate does.
    state::fetcher(&config.inputs).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // Metrics recorded from here on land in the recorder `/metrics` renders.
    kiln_common::telemetry::prometheus();
    let audit = AuditLog::open(&config.audit, config.audit_redis_url.as_ref()).map_err(std::io::Error::other)?;
    let state = AppState::new(config, backend, Arc::new(models), shutdown.clone()).with_audit(audit.clone());
    if state.config.auth == AuthMode::Off {
        tracing::warn!("KILN_AUTH=off: the API is open to whoever reaches it, with no tenants or limits");
    }
    state.declare_topology_in_background();
    if state.config.webhooks.webhook_dispatch && state.config.webhooks.webhook_secret.is_some() {
        tokio::spawn(kiln_common::webhooks::dispatch(
            state.backend.store.clone(),
            state.config.webhooks.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(addr = %listener.local_addr()?, https = tls.is_some(), broker = state.backend.broker.kind(), store = state.backend.store.kind(), "gateway listening");
    let delay = state.config.shutdown_delay;
    let stop = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(delay).await;
        }
    };
    let served = match tls {
        Some(tls) => {
            let listener = tls.listen(listener, shutdown)?;
            axum::serve(listener, router(state)).with_graceful_shutdown(stop).await
        }
        None => axum::serve(listener, router(state)).with_graceful_shutdown(stop).await,
    };
    if let Err(e) = audit.close().await {
        tracing::error!(error = %e, "the audit log did not close cleanly");
    }
    served
}
