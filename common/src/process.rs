//! What every Kiln binary does before it serves: load the model repository and build the backend
//! from validated config (a bad config is one line on stderr and exit code 64), start telemetry,
//! and arm the shutdown signal.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::Backend;
use crate::config::{BackendArgs, ModelArgs, TelemetryArgs};
use crate::models::ModelRepository;

/// Exit code for a configuration error (EX_CONFIG-style usage error).
pub const EXIT_CONFIG: u8 = 64;

/// Everything a role needs to start.
pub struct Prepared {
    pub models: ModelRepository,
    pub backend: Backend,
    pub shutdown: CancellationToken,
}

/// Loads config-derived state for the binary `name` against RabbitMQ and Redis, logging `config`
/// (whose secrets print redacted) once telemetry is up.
pub fn prepare(
    name: &str,
    models: &ModelArgs,
    backend: &BackendArgs,
    telemetry: &TelemetryArgs,
    config: &dyn std::fmt::Debug,
) -> Result<Prepared, ExitCode> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("{name}: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let repo = ModelRepository::load(&models.models_dir).map_err(|e| fail(&e))?;
    backend
        .amqp_url
        .expose()
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|e| fail(&format!("KILN_AMQP_URL {} is not an AMQP URL: {e}", backend.amqp_url)))?;
    crate::telemetry::init(telemetry);
    tracing::info!(config = ?config, "starting");
    let backend = Backend::external(backend).map_err(|e| fail(&e))?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    Ok(Prepared { models: repo, backend, shutdown })
}
