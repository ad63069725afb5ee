//! The client commands over the HTTP API: `kiln submit`, `get`, `wait`, `cancel`, `jobs`,
//! `models`, `events` and `run`. Each takes the gateway's URL and API key ([`ApiArgs`]), prints
//! for people by default and with `--json` one compact JSON document per line for scripts, and
//! the commands that wait for a job exit with its outcome ([`crate::outcome`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_common::config::{Secret, parse_duration};
use serde_json::{Value, json};

use crate::client::{Client, JobsQuery, safe_file_name};
use crate::inputs::{self, Pair, parse_pair};
use crate::outcome::Outcome;

/// How long `kiln wait` and `kiln run` wait for a job unless told (`--timeout`).
pub const DEFAULT_WAIT: &str = "10m";

/// Where the gateway is and how to prove who we are.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Base URL of the gateway.
    #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key, sent as `Authorization: Bearer …` on every call (`kiln keys create` makes one).
    /// Prefer the environment variable to the flag, which other users of the machine can see.
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
}

impl ApiArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::with_key(&self.url, self.api_key.clone()).context("cannot make an HTTP client")
    }
}

/// `kiln submit`
#[derive(Args, Debug)]
#[command(after_help = crate::outcome::EXIT_CODES_HELP)]
pub struct SubmitArgs {
    /// Model name, as in `kiln models`.
    #[arg(long, env = "KILN_MODEL")]
    pub model: String,
    /// The job input as JSON, e.g. '{"text": "hello"}'; or give it as `-i` pairs.
    #[arg(required_unless_present = "pairs", conflicts_with = "pairs")]
    pub input: Option<String>,
    /// One field of the input, `key=value` (repeat): see `kiln run --help`.
    #[arg(short = 'i', long = "input", id = "pairs", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub pairs: Vec<Pair>,
    /// Wait for the job to finish, at most this long (`30s`), and exit with its outcome.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Print the job record as one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln get`
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The job id.
    pub id: String,
    /// Print the job record as one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln wait`
#[derive(Args, Debug)]
#[command(after_help = crate::outcome::EXIT_CODES_HELP)]
pub struct WaitArgs {
    /// The job id.
    pub id: String,
    /// Give up waiting after this long (exit 6, the job left as it is).
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_WAIT)]
    pub timeout: Duration,
    /// Print the job record as one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln cancel`
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The job id.
    pub id: String,
    /// Print the canceled job's record as one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln jobs`
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs in this state: queued, running, succeeded, failed, canceled, expired.
    #[arg(long)]
    pub status: Option<String>,
    /// Only jobs of this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Jobs per page (the gateway caps it).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Start at this page (the `next_cursor` of an earlier listing).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow every page to the end.
    #[arg(long)]
    pub all: bool,
    /// Print one job record per line, as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln models`
#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Print one model per line, as JSON (name, version, task, max_batch, input_schema, workers).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln events`
#[derive(Args, Debug)]
#[command(after_help = crate::outcome::EXIT_CODES_HELP)]
pub struct EventsArgs {
    /// The job id.
    pub id: String,
    /// Print each event as a JSON line: `{"event", "id", "data"}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kiln run`
#[derive(Args, Debug)]
#[command(after_help = crate::outcome::EXIT_CODES_HELP)]
pub struct RunArgs {
    /// Model name, as in `kiln models`.
    pub model: String,
    /// One field of the input, `key=value`; repeat for more. The value is JSON when it parses
    /// (`steps=30`, `fast=true`, `texts=["a","b"]`, `id="42"` for a string), else text
    /// (`prompt=a red fox`). `key=@file` reads a file: UTF-8 text as a string, anything else
    /// (an image, audio) as a `data:` URL with base64; `key=@-` reads standard input.
    #[arg(short = 'i', long = "input", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub pairs: Vec<Pair>,
    /// Download the job's output files (images) into this directory, created if needed.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Give up waiting after this long (exit 6; the job goes on, `kiln wait ID` picks it up).
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_WAIT)]
    pub timeout: Duration,
    /// Print the finished job record as one line of JSON (instead of its output).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let input = match &args.input {
        Some(text) => serde_json::from_str(text).context("the input is not valid JSON")?,
        None => {
            let input = inputs::build(&args.pairs, std::io::stdin().lock())?;
            Value::Object(input.upload(&client).await?)
        }
    };
    let body = json!({ "model": args.model, "input": input });
    let Some(wait) = args.wait else {
        let job = client.submit(&body, None).await?;
        print_record(&job, args.json)?;
        return Ok(ExitCode::SUCCESS);
    };
    let job = submit_and_wait(&client, &body, wait, args.json).await?;
    print_record(&job, args.json)?;
    Ok(finish(&job))
}

pub async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let job = args.api.client()?.get(&args.id).await?;
    print_record(&job, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn wait(args: WaitArgs) -> anyhow::Result<ExitCode> {
    let job = args.api.client()?.wait(&args.id, args.timeout).await?;
    print_record(&job, args.json)?;
    Ok(finish(&job))
}

pub async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let job = args.api.client()?.cancel(&args.id).await?;
    print_record(&job, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let mut query = JobsQuery { status: args.status, model: args.model, limit: args.limit, cursor: args.cursor };
    let mut header = !args.json;
    loop {
        let page = client.list_jobs(&query).await?;
        // After the first answer, so an error is not preceded by a table's header.
        if std::mem::take(&mut header) && !emit(&format!("{:<36}  {:<9}  {:<24}  CREATED", "ID", "STATUS", "MODEL"))? {
            return Ok(ExitCode::SUCCESS);
        }
        for job in &page.data {
            let line = if args.json {
                job.to_string()
            } else {
                let field = |k: &str| job[k].as_str().unwrap_or("-").to_owned();
                format!("{:<36}  {:<9}  {:<24}  {}", field("id"), field("status"), field("model"), field("created_at"))
            };
            if !emit(&line)? {
                return Ok(ExitCode::SUCCESS);
            }
        }
        match page.next_cursor {
            Some(next) if args.all => query.cursor = Some(next),
            Some(next) => {
                eprintln!("kiln: more jobs: --cursor {next} (or --all)");
                return Ok(ExitCode::SUCCESS);
            }
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub async fn models(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let body = args.api.client()?.models().await?;
    // OpenAI's list shape (`data`), with Kiln's details in each entry; `models` from older gateways.
    let models = body["data"].as_array().or_else(|| body["models"].as_array()).cloned().unwrap_or_default();
    if !args.json
        && !emit(&format!("{:<24}  {:<10}  {:<18}  {:>9}  {}", "NAME", "VERSION", "TASK", "MAX_BATCH", "WORKERS"))?
    {
        return Ok(ExitCode::SUCCESS);
    }
    for m in &models {
        let line = if args.json {
            m.to_string()
        } else {
            let field = |k: &str| m[k].as_str().unwrap_or("-").to_owned();
            let workers = m["workers"].as_array().map_or(0, Vec::len);
            let batch = m["max_batch"].as_u64().map_or_else(|| "-".to_owned(), |b| b.to_string());
            format!("{:<24}  {:<10}  {:<18}  {batch:>9}  {workers}", field("name"), field("version"), field("task"))
        };
        if !emit(&line)? {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reconnects of the event stream in a row without an event before `kiln events` gives up.
const EVENT_RECONNECTS: u32 = 5;

pub async fn events(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let mut last: Option<String> = None;
    let mut failures = 0;
    loop {
        let stream = match client.events(&args.id, last.as_deref()).await {
            Ok(Some(stream)) => Some(stream),
            // Nothing more to send: the job is over and its end was printed; say how it ended.
            Ok(None) => None,
            Err(e) if e.is_transient() && failures < EVENT_RECONNECTS => {
                failures += 1;
                eprintln!("kiln: {e}; reconnecting");
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_secs(1))).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let Some(mut stream) = stream else {
            return Ok(finish(&client.get(&args.id).await?));
        };
        loop {
            match stream.next().await {
                Ok(Some(event)) => {
                    failures = 0;
                    if event.id.is_some() {
                        last.clone_from(&event.id);
                    }
                    let line =
                        if args.json { event.to_json().to_string() } else { human_event(&event.event, &event.data) };
                    if !emit(&line)? {
                        return Ok(ExitCode::SUCCESS);
                    }
                    if event.event == "completed" {
                        return Ok(finish(&event.data));
                    }
                }
                // The gateway went away mid-stream (a restart, a drain): resume after the last event.
                Ok(None) => break,
                Err(e) if e.is_transient() || matches!(e, crate::client::ClientError::Protocol { .. }) => {
                    eprintln!("kiln: {e}; reconnecting");
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        failures += 1;
        if failures > EVENT_RECONNECTS {
            anyhow::bail!("the event stream of job {} ended {failures} times without the job's end", args.id);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let input = inputs::build(&args.pairs, std::io::stdin().lock())?.upload(&client).await?;
    let body = json!({ "model": args.model, "input": input });
    let job = submit_and_wait(&client, &body, args.timeout, args.json).await?;
    if let (Some(dir), Outcome::Succeeded) = (&args.out, Outcome::of(&job)) {
        for path in download_outputs(&client, &job, dir).await? {
            eprintln!("kiln: saved {}", path.display());
        }
    }
    if args.json {
        emit(&job.to_string())?;
    } else if Outcome::of(&job) == Outcome::Succeeded {
        emit(&serde_json::to_string_pretty(&job["output"])?)?;
    }
    Ok(finish(&job))
}

/// How long a submit that will be waited on waits on the request itself: a quick job is answered
/// in one round trip, and a longer one has its id printed within seconds (for `kiln cancel`).
const SUBMIT_WAIT: Duration = Duration::from_secs(5);

/// Submits `body`, waiting on the request for up to [`SUBMIT_WAIT`], then long-polls for the rest
/// of `wait`. Returns the last record seen.
async fn submit_and_wait(client: &Client, body: &Value, wait: Duration, quiet: bool) -> anyhow::Result<Value> {
    let started = tokio::time::Instant::now();
    let job = client.submit(body, Some(wait.min(SUBMIT_WAIT))).await?;
    if Outcome::of(&job).is_terminal() {
        return Ok(job);
    }
    let id = job["id"].as_str().context("the gateway answered a job without an id")?.to_owned();
    if !quiet {
        eprintln!("kiln: job {id} is {}; waiting", job["status"].as_str().unwrap_or("queued"));
    }
    match wait.checked_sub(started.elapsed()) {
        Some(left) if !left.is_zero() => Ok(client.wait(&id, left).await?),
        _ => Ok(job),
    }
}

/// Says on stderr why a job did not succeed, and gives the exit status of its outcome.
fn finish(job: &Value) -> ExitCode {
    let outcome = Outcome::of(job);
    if let Some(why) = outcome.complaint(job) {
        eprintln!("kiln: {why}");
    }
    outcome.exit_code()
}

/// Downloads each file a finished job lists (`output.images`, or `output.files`) into `dir`,
/// checked against its size and sha256; a file is written under a temporary name and renamed
/// once whole.
pub async fn download_outputs(client: &Client, job: &Value, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = &job["output"];
    let Some(files) = output.get("images").or_else(|| output.get("files")).and_then(Value::as_array) else {
        eprintln!("kiln: the job has no output files; nothing saved in {}", dir.display());
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut saved = Vec::new();
    for f in files {
        let (name, url) = (f["name"].as_str().unwrap_or(""), f["url"].as_str().unwrap_or(""));
        if !safe_file_name(name) || url.is_empty() {
            anyhow::bail!("output file {f} has no usable name and url");
        }
        let (target, partial) = (dir.join(name), dir.join(format!(".{name}.part")));
        if let Err(e) = client.download(url, &partial, f["size"].as_u64(), f["sha256"].as_str()).await {
            let _ = std::fs::remove_file(&partial);
            return Err(e).with_context(|| format!("downloading {name}"));
        }
        std::fs::rename(&partial, &target).with_context(|| format!("cannot write {}", target.display()))?;
        saved.push(target);
    }
    Ok(saved)
}

/// A record for people (indented JSON) or scripts (one line).
fn print_record(record: &Value, json: bool) -> anyhow::Result<()> {
    let text = if json { record.to_string() } else { serde_json::to_string_pretty(record)? };
    emit(&text)?;
    Ok(())
}

/// One line of an event for people: the kind, then what changed.
fn human_event(kind: &str, data: &Value) -> String {
    match kind {
        "status" => match data["attempt"].as_u64() {
            Some(a) => format!("status {} (attempt {a})", data["status"].as_str().unwrap_or("?")),
            None => format!("status {}", data["status"].as_str().unwrap_or("?")),
        },
        "progress" => match (data["step"].as_u64(), data["total"].as_u64()) {
            (Some(s), Some(t)) => format!("progress {s}/{t}"),
            _ => format!("progress {data}"),
        },
        "completed" => format!(
            "completed {}\n{}",
            data["status"].as_str().unwrap_or("?"),
            serde_json::to_string_pretty(data).unwrap_or_default()
        ),
        other => format!("{other} {data}"),
    }
}

/// Writes a line to stdout; `false` once the reader went away (`kiln jobs --all | head`).
fn emit(line: &str) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to standard output"),
    }
}
