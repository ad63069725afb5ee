//! Shared state of the handlers: config, backend, model repository, the admission semaphores
//! (submissions, long-polls, event streams, image decoding), the input fetcher and the shutdown
//! token (readiness turns false as soon as draining starts).

use std::sync::Arc;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::audit::AuditLog;
use kiln_common::inputs::fetch::{FetchSettings, Fetcher};
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
    /// Fetches `https://` inputs behind the webhooks' address policy.
    pub fetcher: Arc<Fetcher>,
    /// Input images being decoded to check them (`decode_concurrency`).
    pub decoders: Arc<Semaphore>,
    /// Largest file `POST /v1/files` takes: `KILN_MAX_FILE_BYTES`, else the largest
    /// `max_input_bytes` of the served models.
    pub max_file_bytes: usize,
}

/// Why the gateway cannot start with its configuration of inputs.
#[derive(Debug, thiserror::Error)]
pub enum InputsSetupError {
    #[error("KILN_FETCH_CA {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] kiln_common::inputs::fetch::FetcherError),
}

/// The fetcher of input URLs that `config` describes (its CA bundle read here).
pub fn fetcher(config: &crate::config::InputsConfig) -> Result<Fetcher, InputsSetupError> {
    let ca_pem = match &config.fetch_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| InputsSetupError::Ca { path: path.display().to_string(), source })?,
        ),
        None => None,
    };
    let settings = FetchSettings {
        timeout: Duration::from_secs(config.fetch_timeout_s.max(1)),
        allowed_hosts: config.fetch_allowed_hosts.clone(),
        ca_pem,
    };
    Fetcher::new(&settings).map_err(InputsSetupError::Client)
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
        let decoders = Arc::new(Semaphore::new(config.inputs.decode_concurrency.max(1)));
        // `run` checks the configuration first; a state made without it (tests) that cannot
        // build this fetcher gets one without the extra CA, and says so.
        let fetcher = fetcher(&config.inputs).unwrap_or_else(|e| {
            tracing::error!(error = %e, "input URLs are fetched without KILN_FETCH_CA");
            let plain = crate::config::InputsConfig { fetch_ca: None, ..config.inputs.clone() };
            fetcher(&plain).expect("a fetcher without a CA bundle builds")
        });
        let max_file_bytes = config.inputs.max_file_bytes.unwrap_or_else(|| {
            models
                .iter()
                .map(|m| m.limits.max_input_bytes)
                .max()
                .unwrap_or(kiln_proto::InputLimits::default().max_input_bytes)
        });
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
            fetcher: Arc::new(fetcher),
            decoders,
            max_file_bytes,
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
