//! `kiln`: the embedded default (`kiln dev`), each role on its own (`kiln gateway`, `kiln worker`),
//! asset fetching, the client commands, `kiln batch`, and shell completions. The command line is
//! defined in `kiln_cli::app`; this file dispatches it.

/// A process of many small short-lived allocations (requests, JSON, AMQP frames): glibc malloc
/// was about a sixth of the gateway's CPU under submit load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use kiln_cli::app::{Command, DlqAction};
use kiln_cli::commands;
use kiln_cli::outcome::EXIT_ERROR;
use kiln_cli::system::{self, SystemConfig};
use kiln_common::models::ModelRepository;
use kiln_common::process::prepare;
use kiln_common::{Backend, dlq, shutdown};
use kiln_gateway::{AuthMode, GatewayConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = kiln_cli::app::parse();
    let telemetry = kiln_common::telemetry::init(&cli.telemetry, "kiln");
    let result = match cli.command {
        Command::Batch(batch) => kiln_cli::batch::command(batch).await,
        Command::Submit(args) => commands::submit(args).await,
        Command::Run(args) => commands::run(args).await,
        Command::Get(args) => commands::get(args).await,
        Command::Wait(args) => commands::wait(args).await,
        Command::Cancel(args) => commands::cancel(args).await,
        Command::Jobs(args) => commands::jobs(args).await,
        Command::Models(args) => commands::models(args).await,
        Command::Events(args) => commands::events(args).await,
        command => run(command).await.map(|()| ExitCode::SUCCESS),
    };
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {}", describe(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The error and its causes on one line, each cause once: errors that print their source in
/// their own message (reqwest's do) would otherwise repeat it.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
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
            eprintln!("  or:  kiln run all-minilm-l6-v2 -i text=hello --url {}", running.url(""));
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
            Ok(kiln_gateway::run(*gateway, p.backend, p.models, listener, p.shutdown).await?)
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
        Command::Completions { shell } => {
            match std::io::stdout().lock().write_all(&kiln_cli::app::completions(shell)) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the script"),
                _ => Ok(()),
            }
        }
        Command::Batch(_)
        | Command::Submit(_)
        | Command::Run(_)
        | Command::Get(_)
        | Command::Wait(_)
        | Command::Cancel(_)
        | Command::Jobs(_)
        | Command::Models(_)
        | Command::Events(_) => unreachable!("the commands with an exit status of their own are dispatched in main"),
        Command::Audit { command } => kiln_cli::audit::command(command),
        Command::Keys(args) => kiln_cli::keys::command(args).await,
    }
}
