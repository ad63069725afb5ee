//! The `kiln` command line: every subcommand and flag (the manual that `--help` prints), and
//! parsing, with the top-level flags (`--log`, `--log-format`, the OpenTelemetry ones) accepted
//! after the subcommand too: `kiln dev --log debug`. `main.rs` dispatches what this parses.

use std::net::IpAddr;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use kiln_common::config::{BackendArgs, ModelArgs, TelemetryArgs};
use kiln_common::webhooks::WebhookConfig;
use kiln_gateway::{AuthMode, GatewayConfig};
use kiln_worker::WorkerConfig;

use crate::batch::BatchCommand;
use crate::commands;

/// Kiln: an inference job fleet. HTTP gateway → RabbitMQ → ONNX Runtime workers → Redis.
#[derive(Parser, Debug)]
#[command(name = "kiln", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
        gateway: Box<GatewayConfig>,
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
    /// Submit a job and print its record; `--wait` waits for it to finish.
    Submit(commands::SubmitArgs),
    /// Run a model on `-i key=value` inputs, wait, print the output; `-o DIR` saves its files.
    Run(commands::RunArgs),
    /// Print a job record.
    #[command(visible_alias = "status")]
    Get(commands::GetArgs),
    /// Wait for a job to finish (long-polling), print its record and exit with its outcome.
    Wait(commands::WaitArgs),
    /// Cancel a queued or running job.
    Cancel(commands::CancelArgs),
    /// List jobs, newest first: `--status`, `--model`, `--limit`, `--all` to follow every page.
    Jobs(commands::JobsArgs),
    /// List the models the gateway serves, with their task, version and workers.
    Models(commands::ModelsArgs),
    /// Follow a job's events (status, progress, completed) until it ends; exit with its outcome.
    Events(commands::EventsArgs),
    /// Run a file of job inputs (JSON lines) with a progress bar, resumable after Ctrl-C or a
    /// crash; summarise such a run.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Create, list and revoke API keys; set tenants' limits.
    Keys(crate::keys::KeysArgs),
    /// Verify or export a gateway's audit log file.
    Audit {
        #[command(subcommand)]
        command: crate::audit::AuditCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// `kiln completions bash > ~/.local/share/bash-completion/completions/kiln`,
    /// `kiln completions zsh > ~/.zfunc/_kiln` (with `~/.zfunc` in `fpath`),
    /// `kiln completions fish > ~/.config/fish/completions/kiln.fish`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
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

/// The command line's definition, top-level flags made global (`kiln dev --log debug`).
pub fn command() -> clap::Command {
    Cli::command().mut_args(|a| a.global(true))
}

/// Parses the process's arguments; bad usage prints clap's message and exits 2.
pub fn parse() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// Parses `args` (the first is the program name).
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// The completion script of `shell` for `kiln`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "kiln", &mut script);
    script
}
