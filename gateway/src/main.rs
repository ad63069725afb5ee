//! `kiln-gateway`: parse config, init telemetry, bind, serve until SIGTERM, drain.

use clap::Parser;
use kiln_common::config::{BackendArgs, ModelArgs, TelemetryArgs};
use kiln_common::models::ModelRepository;
use kiln_common::{Backend, shutdown};
use kiln_gateway::GatewayConfig;
use tokio_util::sync::CancellationToken;

/// The Kiln HTTP gateway: accepts jobs, puts them on RabbitMQ, serves their status from Redis.
#[derive(Parser, Debug)]
#[command(name = "kiln-gateway", version)]
struct Cli {
    #[command(flatten)]
    gateway: GatewayConfig,
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
    let models = match ModelRepository::load(&cli.models.models_dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kiln-gateway: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    kiln_common::telemetry::init(&cli.telemetry);
    tracing::info!(config = ?cli, "starting");
    let backend = match Backend::external(&cli.backend) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kiln-gateway: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let listener = match tokio::net::TcpListener::bind(cli.gateway.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln-gateway: cannot listen on {}: {e}", cli.gateway.listen);
            return std::process::ExitCode::from(69);
        }
    };
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    match kiln_gateway::run(cli.gateway, backend, models, listener, token).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            std::process::ExitCode::FAILURE
        }
    }
}
