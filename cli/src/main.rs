//! `kiln`: the embedded default (`kiln dev`), each role on its own (`kiln gateway`, `kiln worker`),
//! asset fetching, client commands, and `kiln batch`.

/// A process of many small short-lived allocations (requests, JSON, AMQP frames): glibc malloc
/// was about a sixth of the gateway's CPU under submit load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_cli::batch::BatchCommand;
use kiln_cli::client::Client;
use kiln_cli::system::{self, SystemConfig};
use kiln_common::config::{BackendArgs, ModelArgs, TelemetryArgs, parse_duration};
use kiln_common::models::ModelRepository;
use kiln_common::process::prepare;
use kiln_common::webhooks::WebhookConfig;
use kiln_common::{Backend, dlq, shutdown};
use kiln_gateway::{AuthMode, GatewayConfig};
use kiln_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

/// Kiln: an inference job fleet. HTTP gateway → RabbitMQ → ONNX Runtime workers → Redis.
#[derive(Parser, Debug)]
#[command(name = "kiln", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run gateway and worker in one process on the embedded broker and store (no RabbitMQ or
    /// Redis needed), fetching ONNX Runtime and the models on first use.
    Dev {
        /// Port of the HTTP API.
        #[arg(long, env = "KILN_PORT", default_value_t = 8080)]
        port: u16,
        /// Address of the HTTP API.
        #[arg(long, env = "KILN_HOST", default_value = "127.0.0.1")]
        host: IpAddr,
        /// Use RabbitMQ and Redis (`--amqp-url`, `--redis-url`) instead of the embedded backend.
        #[arg(long)]
        external: bool,
        /// `off` (the default here): the API is open, for one developer on loopback; `keys`: API
        /// keys as in production (`kiln keys create --keys-file …`).
        #[arg(long, env = "KILN_AUTH", value_enum, default_value = "off")]
        auth: AuthMode,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        models: ModelArgs,
        #[command(flatten)]
        webhooks: WebhookConfig,
    },
    /// Run only the gateway against RabbitMQ and Redis (as `kiln-gateway`).
    Gateway {
        #[command(flatten)]
        gateway: GatewayConfig,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        models: ModelArgs,
    },
    /// Run only a worker against RabbitMQ and Redis (as `kiln-worker`).
    Worker {
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        models: ModelArgs,
    },
    /// Inspect and redrive the dead-letter queue of a RabbitMQ + Redis deployment.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Fetch the ONNX Runtime library and every model's files into the cache, then exit.
    Fetch {
        #[command(flatten)]
        models: ModelArgs,
    },
    /// Submit a job and print the answer. `--wait` polls until it is done.
    Submit {
        /// Model name, as in `GET /v1/models`.
        #[arg(long, default_value = "all-minilm-l6-v2")]
        model: String,
        /// The job input as JSON, e.g. '{"text": "hello"}'.
        input: String,
        /// Wait for the result, at most this long (`30s`).
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
        #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Print a job record.
    Get {
        id: String,
        #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Wait for a job to finish and print its record.
    Wait {
        id: String,
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        timeout: Duration,
        #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Run a file of job inputs (JSON lines) with a progress bar, resumable after Ctrl-C or a
    /// crash; summarise such a run.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Create, list and revoke API keys; set tenants' limits.
    Keys(kiln_cli::keys::KeysArgs),
    /// Verify or export a gateway's audit log file.
    Audit {
        #[command(subcommand)]
        command: kiln_cli::audit::AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DlqAction {
    /// Print the dead jobs, oldest first, one JSON object per line: id, model, who dead-lettered it
    /// (`by`: `kiln`, or `broker` over its delivery limit or rejected), reason, attempts, when;
    /// then any message that is not a job. A read: the queue is left as it was, in its order.
    List {
        /// Most entries to print.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Queue dead jobs again, with their attempt counts reset.
    Redrive {
        /// Redrive this job only.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Redrive every dead job.
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = kiln_common::telemetry::init(&cli.telemetry, "kiln");
    let result = match cli.command {
        Command::Batch(batch) => kiln_cli::batch::command(batch).await,
        command => run(command).await.map(|()| ExitCode::SUCCESS),
    };
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev { port, host, external, auth, backend, worker, models, mut webhooks } => {
            let repo = ModelRepository::load(&models.models_dir)?;
            let backend = if external { Backend::external(&backend)? } else { Backend::embedded_for(&backend) };
            let addr = SocketAddr::new(host, port);
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            // Development defaults: a fresh signing secret, and receivers on this machine allowed.
            let secret = webhooks.webhook_secret.get_or_insert_with(kiln_common::webhooks::generate_secret).clone();
            if webhooks.webhook_allowed_hosts.is_empty() {
                webhooks.webhook_allowed_hosts = vec!["127.0.0.1".into(), "localhost".into(), "::1".into()];
            }
            let gateway = GatewayConfig { listen: addr, webhooks, auth, ..GatewayConfig::default() };
            let token = CancellationToken::new();
            shutdown::cancel_on_signal(token.clone());
            let config = SystemConfig { gateway, worker, backend, models: repo, cache_dir: models.cache_dir() };
            let running = system::start(config, listener, token)?;
            eprintln!(
                "kiln dev: API on {} (first start fetches ONNX Runtime and the model; Ctrl-C stops)",
                running.url("")
            );
            eprintln!(
                "  try: curl -s {} -H 'content-type: application/json' -d '{{\"model\":\"all-minilm-l6-v2\",\"input\":{{\"text\":\"hello\"}}}}'",
                running.url("/v1/jobs")
            );
            eprintln!("  webhooks are signed with {} (set KILN_WEBHOOK_SECRET to choose it)", secret.expose());
            if auth == AuthMode::Off {
                eprintln!("  the API is open, with no keys (fine on loopback; --auth keys turns keys on)");
            }
            running.join().await
        }
        Command::Gateway { mut gateway, backend, models } => {
            let p = prepare(&models, &backend)?;
            gateway.audit_redis_url.get_or_insert_with(|| backend.redis_url.clone());
            let listener = tokio::net::TcpListener::bind(gateway.listen)
                .await
                .with_context(|| format!("cannot listen on {}", gateway.listen))?;
            Ok(kiln_gateway::run(gateway, p.backend, p.models, listener, p.shutdown).await?)
        }
        Command::Worker { worker, backend, models } => {
            let p = prepare(&models, &backend)?;
            Ok(kiln_worker::run(worker, p.backend, p.models, models.cache_dir(), p.shutdown).await?)
        }
        Command::Dlq { action, backend } => {
            let backend = Backend::external(&backend)?;
            match action {
                DlqAction::List { limit } => {
                    let listing = dlq::read(&backend, limit).await?;
                    for l in &listing.letters {
                        println!("{}", l.to_json());
                    }
                    for u in &listing.unreadable {
                        println!("{}", u.to_json());
                    }
                }
                DlqAction::Redrive { id, all } => {
                    let selection = match (id, all) {
                        (Some(id), _) => dlq::Selection::Job(id.parse().context("--id is not a job id")?),
                        (None, _) => dlq::Selection::All,
                    };
                    let report = dlq::redrive(&backend, selection).await?;
                    println!(
                        "redriven {}, dropped {} (no longer failed), left in the queue {}",
                        report.redriven.len(),
                        report.dropped.len(),
                        report.left
                    );
                }
            }
            Ok(())
        }
        Command::Fetch { models } => {
            let repo = ModelRepository::load(&models.models_dir)?;
            let cache = models.cache_dir();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let lib = kiln_common::assets::ensure_onnxruntime(&cache)?;
                println!("onnxruntime: {}", lib.display());
                for spec in repo.iter() {
                    if let Some(source) = &spec.source {
                        kiln_common::assets::ensure(source, &spec.dir(&cache))?;
                    }
                    println!("{}: {}", spec.name, spec.dir(&cache).display());
                }
                Ok(())
            })
            .await?
        }
        Command::Submit { model, input, wait, url } => {
            let input: serde_json::Value = serde_json::from_str(&input).context("the input is not valid JSON")?;
            let client = Client::new(&url)?;
            let mut job = client.submit(&serde_json::json!({ "model": model, "input": input })).await?;
            if let (Some(timeout), Some(id)) = (wait, job["id"].as_str().map(str::to_owned)) {
                job = client.wait(&id, timeout).await?;
            }
            println!("{}", serde_json::to_string_pretty(&job)?);
            Ok(())
        }
        Command::Get { id, url } => {
            println!("{}", serde_json::to_string_pretty(&Client::new(&url)?.get(&id).await?)?);
            Ok(())
        }
        Command::Wait { id, timeout, url } => {
            println!("{}", serde_json::to_string_pretty(&Client::new(&url)?.wait(&id, timeout).await?)?);
            Ok(())
        }
        Command::Batch(_) => unreachable!("kiln batch is dispatched in main"),
        Command::Audit { command } => kiln_cli::audit::command(command),
        Command::Keys(args) => kiln_cli::keys::command(args).await,
    }
}
