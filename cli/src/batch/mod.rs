//! `kiln batch`: run a file of job inputs (one JSON object per line) through the gateway with
//! bounded concurrency, saving every output into a directory, resumable after Ctrl-C or a crash
//! without running any line twice; and `kiln batch status` to summarise such a directory.
//!
//! Layout: [`input`] reads lines and derives idempotency keys, [`manifest`] is the journal and its
//! replay, [`plan`] decides per line what a (re)run does, [`runner`] drives lines through submit →
//! long-poll → download, [`progress`] draws the bar. [`run`] is the library entry point the CLI and
//! the tests share; it stops on a [`CancellationToken`].

pub mod input;
pub mod manifest;
pub mod plan;
pub mod progress;
mod runner;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kiln_common::config::{Secret, parse_duration};
pub use runner::run;
use tokio_util::sync::CancellationToken;

use crate::client::ClientError;
use manifest::{Phase, Replay};

/// Exit status when some lines failed (or could not be finished) and the rest completed.
pub const EXIT_FAILED: u8 = 3;
/// Exit status when the run was interrupted; running it again resumes.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Failed lines listed at the end of a run; `kiln batch status` lists all.
const SUMMARY_FAILURES: usize = 20;

/// Everything a run needs; the CLI fills it from flags, tests directly.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The JSON-lines input file (unused when `files` is set).
    pub input: PathBuf,
    /// One job per file matching this glob instead (`scans/*.png`), its bytes the input field
    /// `field` (default: the model's one binary input field).
    pub files: Option<String>,
    pub field: Option<String>,
    pub out: PathBuf,
    pub url: String,
    /// Sent as `Authorization: Bearer …` on every call.
    pub api_key: Option<Secret>,
    pub model: String,
    /// Lines in flight at once (submitted and not yet finished).
    pub concurrency: usize,
    /// Submit lines that failed in an earlier run again, with a new idempotency key.
    pub retry_failed: bool,
    /// How long one line keeps retrying an unreachable or overloaded gateway in this run.
    pub give_up_after: Duration,
    /// The long-poll wait (`GET /v1/jobs/{id}?wait=N`).
    pub poll_wait: Duration,
    /// Draw progress and per-line messages on stderr.
    pub progress: bool,
}

impl BatchConfig {
    pub fn new(input: impl Into<PathBuf>, out: impl Into<PathBuf>, url: &str, model: &str) -> Self {
        Self {
            input: input.into(),
            files: None,
            field: None,
            out: out.into(),
            url: url.to_owned(),
            api_key: None,
            model: model.to_owned(),
            concurrency: 8,
            retry_failed: false,
            give_up_after: Duration::from_secs(15 * 60),
            poll_wait: Duration::from_secs(30),
            progress: true,
        }
    }
}

/// Why a run could not go on at all (as opposed to one line failing, which is in the summary).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read the input {path}: {source}")]
    Input {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the output directory {}: {source}", path.display())]
    OutDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read or write the manifest {}: {source}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds a batch of model {was:?}, not {now:?}: use another --out", dir.display())]
    ModelChanged { dir: PathBuf, was: String, now: String },
    #[error("cannot set up the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("model {model} {problem}: name the input field with --field")]
    NoFileField { model: String, problem: String },
    #[error("the gateway cannot be asked for its models: {0}")]
    Unreachable(#[source] ClientError),
    #[error("the gateway does not serve model {model:?}; it serves {}", served.join(", "))]
    UnknownModel { model: String, served: Vec<String> },
}

/// A line that failed, with the stable error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub line: usize,
    pub code: String,
    pub message: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Items (non-empty lines) in the input.
    pub total: usize,
    /// Finished in this run, outputs saved.
    pub succeeded: usize,
    /// Found finished by an earlier run, outputs verified.
    pub skipped: usize,
    /// Failed in this run or an earlier one (and not retried).
    pub failed: usize,
    /// Given up on for this run (the gateway unreachable too long); the next run picks them up.
    pub unfinished: usize,
    /// Interrupted while in flight; the next run picks them up.
    pub in_flight: usize,
    /// Not reached before an interruption.
    pub not_started: usize,
    pub interrupted: bool,
    /// Submissions the gateway answered with a job (new, or the one the key already named).
    pub submitted: u64,
    /// Lines whose job from an earlier run was picked up by id.
    pub resumed: u64,
    pub files_written: usize,
    pub bytes_written: u64,
    pub elapsed: Duration,
    pub failures: Vec<Failure>,
}

impl Summary {
    pub fn exit_code(&self) -> u8 {
        if self.interrupted {
            EXIT_INTERRUPTED
        } else if self.failed > 0 || self.unfinished > 0 {
            EXIT_FAILED
        } else {
            0
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kiln batch: {} succeeded, {} failed, {} skipped (done before) of {} items; {} files written ({}) in {}",
            self.succeeded,
            self.failed,
            self.skipped,
            self.total,
            self.files_written,
            bytes(self.bytes_written),
            progress::human(self.elapsed),
        )?;
        writeln!(f, "  {} submitted, {} picked up by job id", self.submitted, self.resumed)?;
        if self.interrupted {
            writeln!(
                f,
                "  interrupted: {} in flight and {} not started; run the same command again to resume",
                self.in_flight, self.not_started
            )?;
        }
        if self.unfinished > 0 {
            writeln!(f, "  {} lines unfinished (gateway unreachable); run again to resume", self.unfinished)?;
        }
        if !self.failures.is_empty() {
            writeln!(f, "failed lines (--retry-failed submits them again):")?;
            for x in self.failures.iter().take(SUMMARY_FAILURES) {
                writeln!(f, "  line {}: {}: {}", x.line, x.code, x.message)?;
            }
            if self.failures.len() > SUMMARY_FAILURES {
                writeln!(
                    f,
                    "  ... and {} more (`kiln batch status DIR` lists them all)",
                    self.failures.len() - SUMMARY_FAILURES
                )?;
            }
        }
        Ok(())
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// `kiln batch status`: a run's state, from its manifest alone (the gateway is not asked).
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub model: Option<String>,
    pub items: Option<usize>,
    pub runs: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub in_flight: usize,
    pub files: usize,
    pub bytes: u64,
    /// Recorded files no longer in the directory with their recorded size.
    pub missing: Vec<String>,
    pub failures: Vec<Failure>,
    pub unreadable: usize,
}

impl Status {
    pub fn load(dir: &Path) -> Result<Self, BatchError> {
        let replay: Replay = Replay::load(dir)?;
        let mut s = Status {
            model: replay.model,
            items: replay.items,
            runs: replay.runs,
            unreadable: replay.unreadable,
            ..Self::default()
        };
        for (line, state) in replay.lines {
            match state.phase {
                Phase::Submitting | Phase::Accepted { .. } => s.in_flight += 1,
                Phase::Succeeded { files, .. } => {
                    s.succeeded += 1;
                    for f in files {
                        let present = std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size);
                        if !present {
                            s.missing.push(f.name.clone());
                        }
                        s.files += 1;
                        s.bytes += f.size;
                    }
                }
                Phase::Failed { code, message, .. } => {
                    s.failed += 1;
                    s.failures.push(Failure { line, code, message });
                }
            }
        }
        Ok(s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = self.items.map_or_else(|| "?".to_owned(), |n| n.to_string());
        let not_started = self.items.map_or(0, |n| n.saturating_sub(self.succeeded + self.failed + self.in_flight));
        writeln!(f, "model {}, {items} items, runs so far: {}", self.model.as_deref().unwrap_or("?"), self.runs)?;
        writeln!(
            f,
            "succeeded {}, failed {}, in flight {}, not started {not_started}",
            self.succeeded, self.failed, self.in_flight
        )?;
        writeln!(f, "files {} ({}), missing {}", self.files, bytes(self.bytes), self.missing.len())?;
        for name in &self.missing {
            writeln!(f, "  missing: {name}")?;
        }
        if self.unreadable > 0 {
            writeln!(f, "{} unreadable manifest lines skipped (a crash mid-write)", self.unreadable)?;
        }
        if !self.failures.is_empty() {
            writeln!(f, "failed lines:")?;
            for x in &self.failures {
                writeln!(f, "  line {}: {}: {}", x.line, x.code, x.message)?;
            }
        }
        Ok(())
    }
}

/// `kiln batch ...`
#[derive(clap::Subcommand, Debug)]
pub enum BatchCommand {
    /// Run every line of FILE (one job `input` JSON object per line) and save the outputs in
    /// --out. Running the same command again resumes: finished lines are skipped, jobs in flight
    /// are picked up by id, and nothing is submitted twice. Exit status: 0 all succeeded, 3 some
    /// lines failed, 130 interrupted.
    Run {
        /// The input file, JSON lines (or give --inputs).
        #[arg(required_unless_present = "inputs", conflicts_with = "inputs")]
        file: Option<PathBuf>,
        /// One job per file matching this glob (quote it: `--inputs 'scans/*.png'`), in name
        /// order; each file's bytes are the job's binary input (uploaded to POST /v1/files).
        #[arg(long)]
        inputs: Option<String>,
        /// The input field the files go in; default: the model's one binary input field.
        #[arg(long, requires = "inputs")]
        field: Option<String>,
        /// Directory for the outputs (`<line>-<name>`, `<line>.json`) and the manifest.
        #[arg(long, env = "KILN_BATCH_OUT")]
        out: PathBuf,
        /// Jobs in flight at once.
        #[arg(long, env = "KILN_BATCH_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// Model name, as in `kiln models` (`terrain-diffusion`); no default.
        #[arg(long, env = "KILN_MODEL")]
        model: String,
        #[command(flatten)]
        api: crate::commands::ApiArgs,
        /// Submit lines that failed in an earlier run again (with a new idempotency key).
        #[arg(long, env = "KILN_BATCH_RETRY_FAILED")]
        retry_failed: bool,
        /// How long a line keeps retrying an unreachable or overloaded gateway before this run
        /// leaves it for the next (`15m`).
        #[arg(long, env = "KILN_BATCH_GIVE_UP_AFTER", value_parser = parse_duration, default_value = "15m")]
        give_up_after: Duration,
    },
    /// Summarise a batch directory from its manifest: counts by status, failed lines, files.
    Status {
        /// The --out directory of a run.
        dir: PathBuf,
    },
}

/// Runs a `kiln batch` command; SIGINT/SIGTERM interrupt a run cleanly.
pub async fn command(command: BatchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BatchCommand::Run { file, inputs, field, out, concurrency, model, api, retry_failed, give_up_after } => {
            let mut config = BatchConfig::new(file.unwrap_or_default(), out, &api.url, &model);
            config.files = inputs;
            config.field = field;
            config.api_key = api.api_key;
            config.concurrency = usize::from(concurrency);
            config.retry_failed = retry_failed;
            config.give_up_after = give_up_after;
            let cancel = CancellationToken::new();
            kiln_common::shutdown::cancel_on_signal(cancel.clone());
            let summary = run(config, cancel).await?;
            eprint!("{summary}");
            Ok(ExitCode::from(summary.exit_code()))
        }
        BatchCommand::Status { dir } => {
            let report = Status::load(&dir)?.to_string();
            // `kiln batch status DIR | head` closes the pipe early: not an error worth a panic.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), report.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}
