//! `kiln-gateway`: parse config, init telemetry, bind, serve until SIGTERM, drain.

/// A process of many small short-lived allocations (requests, JSON, AMQP frames): glibc malloc
/// was about a sixth of the gateway's CPU under submit load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use kiln_common::config::{BackendArgs, ModelArgs, TelemetryArgs};
use kiln_common::process::{EXIT_CONFIG, config_error, prepare};
use kiln_gateway::GatewayConfig;

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
async fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.gateway.audit_redis_url.get_or_insert_with(|| cli.backend.redis_url.clone());
    if let Err(e) = kiln_gateway::tls::ServerTls::load(&cli.gateway.tls) {
        eprintln!("kiln-gateway: TLS: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let p = match prepare(&cli.models, &cli.backend) {
        Ok(p) => p,
        Err(e) => return config_error("kiln-gateway", &e),
    };
    let telemetry = kiln_common::telemetry::init(&cli.telemetry, "kiln-gateway");
    tracing::info!(config = ?cli, "starting");
    let listener = match tokio::net::TcpListener::bind(cli.gateway.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln-gateway: cannot listen on {}: {e}", cli.gateway.listen);
            return ExitCode::from(69);
        }
    };
    let result = kiln_gateway::run(cli.gateway, p.backend, p.models, listener, p.shutdown).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            ExitCode::FAILURE
        }
    }
}
