//! `kiln-worker`: parse config, init telemetry, serve the models until SIGTERM, drain.

/// A process of many small short-lived allocations (requests, JSON, AMQP frames): glibc malloc
/// was about a sixth of the gateway's CPU under submit load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use kiln_common::config::{BackendArgs, ModelArgs, TelemetryArgs};
use kiln_common::process::{config_error, prepare};
use kiln_worker::WorkerConfig;

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
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let p = match prepare(&cli.models, &cli.backend) {
        Ok(p) => p,
        Err(e) => return config_error("kiln-worker", &e),
    };
    let telemetry = kiln_common::telemetry::init(&cli.telemetry, "kiln-worker");
    tracing::info!(config = ?cli, "starting");
    let result = kiln_worker::run(cli.worker, p.backend, p.models, cli.models.cache_dir(), p.shutdown).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            eprintln!("kiln-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
