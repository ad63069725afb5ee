//! `kiln-worker`: parse config, init telemetry, serve the models until SIGTERM, drain.

use clap::Parser;
use kiln_common::config::{BackendArgs, ModelArgs, TelemetryArgs};
use kiln_common::models::ModelRepository;
use kiln_common::{Backend, shutdown};
use kiln_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

/// The Kiln worker: consumes jobs from RabbitMQ, runs them with ONNX Runtime, stores results in Redis.
#[derive(Parser, Debug)]
#[command(name = "kiln-worker", version)]
struct Cli {
    #[command(flatten)]
    worker: WorkerConfig,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let repo = match ModelRepository::load(&cli.models.models_dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kiln-worker: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    kiln_common::telemetry::init(&cli.telemetry);
    tracing::info!(config = ?cli, "starting");
    let backend = match Backend::external(&cli.backend) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kiln-worker: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    match kiln_worker::run(cli.worker, backend, repo, cli.models.cache_dir(), token).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            eprintln!("kiln-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
