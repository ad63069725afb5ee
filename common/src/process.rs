//! What every Kiln role does before it serves against RabbitMQ and Redis: load the model
//! repository, validate the backend settings and build the backend (nothing connects yet), and arm
//! the shutdown signal. A bad config is one line on stderr and exit code 64.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::Backend;
use crate::backend::BackendError;
use crate::config::{BackendArgs, ModelArgs};
use crate::models::{ModelConfigError, ModelRepository};

/// Exit code for a configuration error (EX_CONFIG-style usage error).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Models(#[from] ModelConfigError),
    #[error("KILN_AMQP_URL {url} is not an AMQP URL: {reason}")]
    AmqpUrl { url: String, reason: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Everything a role needs to start.
pub struct Prepared {
    pub models: ModelRepository,
    pub backend: Backend,
    pub shutdown: CancellationToken,
}

/// Validates the config and builds what the roles run on. Call it inside the async runtime (it
/// spawns the signal handler).
pub fn prepare(models: &ModelArgs, backend: &BackendArgs) -> Result<Prepared, ConfigError> {
    let repo = ModelRepository::load(&models.models_dir)?;
    backend
        .amqp_url
        .expose()
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|reason| ConfigError::AmqpUrl { url: backend.amqp_url.to_string(), reason })?;
    let backend = Backend::external(backend)?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    Ok(Prepared { models: repo, backend, shutdown })
}

/// Reports a configuration error of the binary `name` and gives its exit code.
pub fn config_error(name: &str, e: &ConfigError) -> ExitCode {
    eprintln!("{name}: {e}");
    ExitCode::from(EXIT_CONFIG)
}
