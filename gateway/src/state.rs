//! Shared state of the handlers: config, backend, model repository, the admission semaphores
//! (submissions, long-polls, event streams) and the shutdown token (readiness turns false as soon
//! as draining starts).

use std::sync::Arc;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::audit::AuditLog;
use kiln_common::models::ModelRepository;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::KeyCache;
use crate::config::GatewayConfig;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<GatewayConfig>,
    pub backend: Backend,
    pub models: Arc<ModelRepository>,
    pub admission: Arc<Semaphore>,
    /// Long-poll slots (`max_waiters`), taken through `waiting`.
    pub waiters: Arc<Semaphore>,
    /// Event stream slots (`max_event_streams`), held by each open SSE stream.
    pub streams: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// API keys as last read (see `auth`).
    pub keys: Arc<KeyCache>,
    pub audit: AuditLog,
}

impl AppState {
    pub fn new(
        config: GatewayConfig,
        backend: Backend,
        models: Arc<ModelRepository>,
        shutdown: CancellationToken,
    ) -> Self {
        let admission = Arc::new(Semaphore::new(config.max_inflight_submits));
        let waiters = Arc::new(Semaphore::new(config.max_waiters));
        let streams = Arc::new(Semaphore::new(config.max_event_streams));
        Self {
            config: Arc::new(config),
            backend,
            models,
            admission,
            waiters,
            streams,
            shutdown,
            keys: Arc::default(),
            audit: AuditLog::disabled(),
        }
    }

    /// Records every call in `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// Declares the models' queues, retrying with backoff while the broker is down, so the first
    /// submission after an outage does not pay for it.
    pub fn declare_topology_in_background(&self) {
        let broker = self.backend.broker.clone();
        let names = self.models.names();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match broker.declare(&names).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot declare queues yet")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        });
    }
}
