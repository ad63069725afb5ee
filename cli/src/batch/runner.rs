//! The core of `kiln batch run`: plan every line against the manifest, then drive up to
//! `concurrency` lines at a time through submit → long-poll → download, journaling each step
//! before acting on it, until all are done or the cancellation token fires.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::input::{self, Item, idempotency_key};
use super::manifest::{self, Event, FileEntry, Journal};
use super::plan::{self, Action};
use super::progress::Progress;
use super::{BatchConfig, BatchError, Failure, Summary};
use crate::client::{Client, ClientError, is_terminal, safe_file_name};

/// How one line ended in this run.
#[derive(Debug)]
enum Outcome {
    Succeeded {
        files: usize,
        bytes: u64,
    },
    Skipped,
    Failed(Failure),
    /// Transient errors for longer than `give_up_after`: left as it was in the manifest.
    Unfinished,
    Interrupted,
}

/// The next thing to do for a line.
enum Step {
    Submit { generation: u32 },
    Follow { job: String, generation: u32, record: Option<Value> },
}

enum Waited {
    Done(Value),
    Gone,
    GaveUp,
}

struct Ctx {
    config: BatchConfig,
    client: Client,
    journal: Journal,
    progress: Progress,
    submitted: AtomicU64,
    resumed: AtomicU64,
}

/// Runs (or resumes) the batch described by `config`. Returns when every line is done, or soon
/// after `cancel` fires (with [`Summary::interrupted`] set); jobs still running at the gateway
/// are picked up by id on the next run.
pub async fn run(config: BatchConfig, cancel: CancellationToken) -> Result<Summary, BatchError> {
    let started = Instant::now();
    let client = Client::with_key(&config.url, config.api_key.clone()).map_err(BatchError::Http)?;
    let model = preflight(&client, &config.model).await?;
    let items = match &config.files {
        Some(pattern) => {
            let field = match &config.field {
                Some(f) => f.clone(),
                None => file_field(&config.model, model.as_ref())?,
            };
            input::from_files(pattern, &field)?
        }
        None => input::read(&config.input)?,
    };
    let out = config.out.clone();
    std::fs::create_dir_all(&out).map_err(|source| BatchError::OutDir { path: out.clone(), source })?;
    let (journal, replay) = Journal::open(&out)?;
    if let Some(was) = replay.model.as_ref().filter(|m| **m != config.model) {
        return Err(BatchError::ModelChanged { dir: out, was: was.clone(), now: config.model.clone() });
    }
    remove_partials(&out)?;
    let run = Event::Run {
        version: manifest::VERSION,
        model: config.model.clone(),
        input: config.files.clone().unwrap_or_else(|| config.input.display().to_string()),
        items: items.len(),
        at_ms: kiln_proto::now_millis(),
    };
    journal.append(&run)?;

    let progress = Progress::new(items.len(), config.progress);
    let ctx =
        Arc::new(Ctx { config, client, journal, progress, submitted: AtomicU64::new(0), resumed: AtomicU64::new(0) });
    let stop_progress = CancellationToken::new();
    let renderer = tokio::spawn({
        let (ctx, stop) = (ctx.clone(), stop_progress.clone());
        async move { ctx.progress.render(stop).await }
    });

    let mut summary = Summary { total: items.len(), ..Summary::default() };
    let mut running = JoinSet::new();
    let mut fatal = None;
    let concurrency = ctx.config.concurrency.max(1);
    let mut started_items = 0;
    for item in items {
        while running.len() >= concurrency && fatal.is_none() {
            collect(running.join_next().await, &mut summary, &mut fatal, &cancel);
        }
        if fatal.is_some() || cancel.is_cancelled() {
            break;
        }
        let action = plan::decide(&ctx.config.model, &item, replay.lines.get(&item.line), ctx.config.retry_failed);
        started_items += 1;
        running.spawn(process(ctx.clone(), item, action, cancel.clone()));
    }
    while let Some(done) = running.join_next().await {
        collect(Some(done), &mut summary, &mut fatal, &cancel);
    }
    stop_progress.cancel();
    let _ = renderer.await;
    if let Some(e) = fatal {
        return Err(e);
    }
    summary.not_started = summary.total - started_items;
    summary.interrupted = cancel.is_cancelled();
    summary.submitted = ctx.submitted.load(Ordering::Relaxed);
    summary.resumed = ctx.resumed.load(Ordering::Relaxed);
    summary.failures.sort_by_key(|f| f.line);
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn collect(
    done: Option<Result<Result<Outcome, BatchError>, tokio::task::JoinError>>,
    summary: &mut Summary,
    fatal: &mut Option<BatchError>,
    cancel: &CancellationToken,
) {
    let outcome = match done {
        None => return,
        Some(Ok(Ok(outcome))) => outcome,
        Some(Ok(Err(e))) => {
            // The manifest cannot be written: stop everything rather than run unrecorded jobs.
            cancel.cancel();
            fatal.get_or_insert(e);
            return;
        }
        Some(Err(panic)) => std::panic::resume_unwind(panic.into_panic()),
    };
    match outcome {
        Outcome::Succeeded { files, bytes } => {
            summary.succeeded += 1;
            summary.files_written += files;
            summary.bytes_written += bytes;
        }
        Outcome::Skipped => summary.skipped += 1,
        Outcome::Failed(f) => {
            summary.failed += 1;
            summary.failures.push(f);
        }
        Outcome::Unfinished => summary.unfinished += 1,
        Outcome::Interrupted => summary.in_flight += 1,
    }
}

/// Fails fast on a wrong URL or model name instead of failing every line; the model's entry of
/// `GET /v1/models` when the gateway lists it.
async fn preflight(client: &Client, model: &str) -> Result<Option<Value>, BatchError> {
    let models = client.models().await.map_err(BatchError::Unreachable)?;
    // OpenAI's list shape (`data`); `models` is what gateways before it answered.
    let list = if models["data"].is_array() { &models["data"] } else { &models["models"] };
    let list = list.as_array().cloned().unwrap_or_default();
    let served: Vec<String> = list.iter().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect();
    if served.is_empty() {
        return Ok(None);
    }
    match list.into_iter().find(|m| m["name"] == model) {
        Some(entry) => Ok(Some(entry)),
        None => Err(BatchError::UnknownModel { model: model.to_owned(), served }),
    }
}

/// The model's one binary input field (`x-kiln-file` in its input schema).
fn file_field(model: &str, entry: Option<&Value>) -> Result<String, BatchError> {
    let no = |problem: &str| BatchError::NoFileField { model: model.to_owned(), problem: problem.to_owned() };
    let entry = entry.ok_or_else(|| no("is not listed by the gateway"))?;
    let fields: Vec<&String> = entry["input_schema"]["properties"]
        .as_object()
        .map(|props| props.iter().filter(|(_, p)| p.get("x-kiln-file").is_some()).map(|(k, _)| k).collect())
        .unwrap_or_default();
    match fields.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(no("takes no file input")),
        _ => Err(no("takes several file inputs")),
    }
}

/// Removes `.*.part` files a killed run left behind; they never carry a final name.
fn remove_partials(dir: &Path) -> Result<(), BatchError> {
    let err = |source| BatchError::OutDir { path: dir.to_owned(), source };
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let name = entry.map_err(err)?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".part") {
            std::fs::remove_file(dir.join(&*name)).map_err(err)?;
        }
    }
    Ok(())
}

async fn process(ctx: Arc<Ctx>, item: Item, action: Action, cancel: CancellationToken) -> Result<Outcome, BatchError> {
    let line = item.line;
    let work = async {
        let first = match action {
            Action::Invalid { message, recorded } => {
                let failure = Failure { line, code: "invalid_line".into(), message };
                if !recorded {
                    ctx.record(Event::Failed {
                        line,
                        key: None,
                        job: None,
                        code: failure.code.clone(),
                        message: failure.message.clone(),
                    })
                    .await?;
                }
                return Ok(ctx.failed(failure));
            }
            Action::StillFailed { code, message } => {
                ctx.progress.failed.fetch_add(1, Ordering::Relaxed);
                ctx.progress.finished.fetch_add(1, Ordering::Relaxed);
                return Ok(Outcome::Failed(Failure { line, code, message }));
            }
            Action::Verify { job, generation, files } => {
                let dir = ctx.config.out.clone();
                let intact =
                    tokio::task::spawn_blocking(move || files.iter().all(|f| verify(&dir, f))).await.unwrap_or(false);
                if intact {
                    ctx.progress.skipped.fetch_add(1, Ordering::Relaxed);
                    return Ok(Outcome::Skipped);
                }
                ctx.progress.println(&format!("line {line}: outputs missing or changed; fetching them again"));
                Step::Follow { job, generation, record: None }
            }
            Action::Watch { job, generation } => {
                ctx.resumed.fetch_add(1, Ordering::Relaxed);
                Step::Follow { job, generation, record: None }
            }
            Action::Submit { generation } => Step::Submit { generation },
        };
        ctx.drive(&item, first).await
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Ok(Outcome::Interrupted),
        outcome = work => outcome,
    }
}

impl Ctx {
    async fn record(self: &Arc<Self>, event: Event) -> Result<(), BatchError> {
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || ctx.journal.append(&event)).await.expect("journal append panicked")
    }

    /// Journals that `job` ended without its outputs, then reports it.
    async fn job_failed(self: &Arc<Self>, job: &str, failure: Failure) -> Result<Outcome, BatchError> {
        self.record(Event::Failed {
            line: failure.line,
            key: None,
            job: Some(job.to_owned()),
            code: failure.code.clone(),
            message: failure.message.clone(),
        })
        .await?;
        Ok(self.failed(failure))
    }

    fn failed(&self, failure: Failure) -> Outcome {
        self.progress.println(&format!("line {}: {}: {}", failure.line, failure.code, failure.message));
        self.progress.failed.fetch_add(1, Ordering::Relaxed);
        self.progress.finished.fetch_add(1, Ordering::Relaxed);
        Outcome::Failed(failure)
    }

    async fn drive(self: &Arc<Self>, item: &Item, first: Step) -> Result<Outcome, BatchError> {
        let line = item.line;
        let Ok(input) = &item.input else { unreachable!("bad lines never reach drive") };
        let model = &self.config.model;
        let mut body = json!({ "model": model, "input": input.value });
        let mut step = first;
        loop {
            step = match step {
                Step::Submit { generation } => {
                    let key = idempotency_key(model, input, generation);
                    self.record(Event::Submit { line, key: key.clone(), generation }).await?;
                    let mut retry = Retry::new(self.config.give_up_after);
                    loop {
                        let submitted = match self.upload_files(input, &mut body).await {
                            Ok(()) => self.client.submit_keyed(&body, &key).await,
                            Err(e) => Err(e),
                        };
                        match submitted {
                            Ok(record) => {
                                let Some(job) = record["id"].as_str().map(str::to_owned) else {
                                    let message = format!("the gateway answered without a job id: {record}");
                                    return Ok(self.failed(Failure { line, code: "protocol".into(), message }));
                                };
                                self.submitted.fetch_add(1, Ordering::Relaxed);
                                self.record(Event::Accepted { line, key: key.clone(), job: job.clone() }).await?;
                                break Step::Follow { job, generation, record: Some(record) };
                            }
                            // The key still names a job that has expired from the store.
                            Err(ClientError::Api { status: 404, code, .. }) if code == "job_not_found" => {
                                break Step::Submit { generation: generation + 1 };
                            }
                            Err(e) if e.is_transient() => {
                                if !retry.pause(&e, line, &self.progress).await {
                                    return Ok(Outcome::Unfinished);
                                }
                            }
                            Err(e) => {
                                let failure = Failure { line, code: e.code().to_owned(), message: e.message() };
                                self.record(Event::Failed {
                                    line,
                                    key: Some(key),
                                    job: None,
                                    code: failure.code.clone(),
                                    message: failure.message.clone(),
                                })
                                .await?;
                                return Ok(self.failed(failure));
                            }
                        }
                    }
                }
                Step::Follow { job, generation, record } => {
                    let waited = match record.filter(is_terminal) {
                        Some(record) => Waited::Done(record),
                        None => self.wait_for(line, &job).await,
                    };
                    match waited {
                        Waited::Done(record) => {
                            if let Some(outcome) = self.finish(item, &job, &record).await? {
                                return Ok(outcome);
                            }
                        }
                        Waited::Gone => {}
                        Waited::GaveUp => return Ok(Outcome::Unfinished),
                    }
                    self.progress.println(&format!(
                        "line {line}: job {job} or its outputs expired from the gateway; submitting again"
                    ));
                    Step::Submit { generation: generation + 1 }
                }
            };
        }
    }

    /// Long-polls until the job is terminal, the gateway no longer knows it, or it could not be
    /// asked for `give_up_after`.
    async fn wait_for(&self, line: usize, job: &str) -> Waited {
        let mut retry = Retry::new(self.config.give_up_after);
        loop {
            match self.client.get_waiting(job, self.config.poll_wait).await {
                Ok(record) if is_terminal(&record) => return Waited::Done(record),
                Ok(_) => retry = Retry::new(self.config.give_up_after),
                Err(ClientError::Api { status: 404, .. }) => return Waited::Gone,
                // Transient or not, the job exists: keep asking, with backoff, until giving up.
                Err(e) => {
                    if !retry.pause(&e, line, &self.progress).await {
                        return Waited::GaveUp;
                    }
                }
            }
        }
    }

    /// Records a terminal job: its outputs saved and verified, or its error. `None` when its
    /// outputs are gone from the gateway (expired), so the line must run again.
    async fn finish(self: &Arc<Self>, item: &Item, job: &str, record: &Value) -> Result<Option<Outcome>, BatchError> {
        let line = item.line;
        let status = record["status"].as_str().unwrap_or("");
        if status != "succeeded" {
            let code = record["error"]["code"].as_str().unwrap_or(status).to_owned();
            let message =
                record["error"]["message"].as_str().map_or_else(|| format!("job ended {status}"), str::to_owned);
            let failure = Failure { line, code, message: format!("{message} (job {job})") };
            return self.job_failed(job, failure).await.map(Some);
        }
        let mut attempts = 0;
        let files = loop {
            attempts += 1;
            match self.save_outputs(line, &record["output"]).await {
                Ok(files) => break files,
                Err(ClientError::Api { status: 404, .. }) => return Ok(None),
                Err(e) if e.is_transient() && attempts < 3 => {
                    self.progress.println(&format!("line {line}: {e}; downloading again"));
                }
                Err(e) => {
                    let failure =
                        Failure { line, code: e.code().to_owned(), message: format!("{} (job {job})", e.message()) };
                    return self.job_failed(job, failure).await.map(Some);
                }
            }
        };
        let (count, bytes) = (files.len(), files.iter().map(|f| f.size).sum());
        self.record(Event::Succeeded { line, job: job.to_owned(), files }).await?;
        self.progress.finished.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Outcome::Succeeded { files: count, bytes }))
    }

    /// Uploads the item's files (`--inputs`) and puts their `file:<id>` in the body.
    async fn upload_files(&self, input: &input::Input, body: &mut Value) -> Result<(), ClientError> {
        for (field, path) in &input.files {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|source| ClientError::Io { path: path.display().to_string(), source })?;
            let mime = crate::inputs::media_type(&bytes, Some(path));
            let file = self.client.upload(bytes, mime).await?;
            let id = file["id"].as_str().ok_or_else(|| ClientError::Protocol {
                url: "/v1/files".into(),
                detail: format!("POST /v1/files answered without an id: {file}"),
            })?;
            body["input"][field] = Value::String(format!("file:{id}"));
        }
        Ok(())
    }

    /// Writes every output of a finished job under its final name: each `output.images` (or `output.files`) entry
    /// downloaded and verified, or the output JSON itself when there are no files.
    async fn save_outputs(&self, line: usize, output: &Value) -> Result<Vec<FileEntry>, ClientError> {
        let dir = &self.config.out;
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| ClientError::Io { path, source }
        };
        let mut saved = Vec::new();
        // Image jobs list their files as `images`; other file outputs as `files`.
        match output.get("images").or_else(|| output.get("files")).and_then(Value::as_array) {
            Some(files) => {
                for f in files {
                    let (name, url) = (f["name"].as_str().unwrap_or(""), f["url"].as_str().unwrap_or(""));
                    if !safe_file_name(name) || url.is_empty() {
                        return Err(ClientError::Protocol {
                            url: url.to_owned(),
                            detail: format!("output file {f} has no usable name and url"),
                        });
                    }
                    let (size, sha256) = (f["size"].as_u64(), f["sha256"].as_str());
                    let final_name = format!("{line:06}-{name}");
                    let target = dir.join(&final_name);
                    if let (Some(size), Some(sha256)) = (size, sha256) {
                        let entry = FileEntry { name: final_name.clone(), size, sha256: sha256.to_ascii_lowercase() };
                        let (d, e) = (dir.clone(), entry.clone());
                        if tokio::task::spawn_blocking(move || verify(&d, &e)).await.unwrap_or(false) {
                            saved.push(entry);
                            continue;
                        }
                    }
                    let partial = dir.join(format!(".{final_name}.part"));
                    let got = match self.client.download(url, &partial, size, sha256).await {
                        Ok(got) => got,
                        Err(e) => {
                            let _ = tokio::fs::remove_file(&partial).await;
                            return Err(e);
                        }
                    };
                    tokio::fs::rename(&partial, &target).await.map_err(io(&target))?;
                    saved.push(FileEntry { name: final_name, size: got.size, sha256: got.sha256 });
                }
            }
            None => {
                let final_name = format!("{line:06}.json");
                let (target, partial) = (dir.join(&final_name), dir.join(format!(".{final_name}.part")));
                let mut bytes = serde_json::to_vec_pretty(output).expect("JSON values serialise");
                bytes.push(b'\n');
                let entry = FileEntry {
                    name: final_name,
                    size: bytes.len() as u64,
                    sha256: hex::encode(Sha256::digest(&bytes)),
                };
                let (p, t) = (partial.clone(), target.clone());
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let mut file = std::fs::File::create(&p)?;
                    std::io::Write::write_all(&mut file, &bytes)?;
                    file.sync_all()?;
                    std::fs::rename(&p, &t)
                })
                .await
                .expect("write panicked")
                .map_err(io(&target))?;
                saved.push(entry);
            }
        }
        manifest::sync_dir(dir).map_err(io(dir))?;
        Ok(saved)
    }
}

/// Whether `file` is in `dir` with its recorded size and sha256. Blocking.
pub(super) fn verify(dir: &Path, file: &FileEntry) -> bool {
    let path = dir.join(&file.name);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.len() == file.size => {}
        _ => return false,
    }
    let Ok(mut f) = std::fs::File::open(&path) else { return false };
    let mut hasher = Sha256::new();
    if std::io::copy(&mut f, &mut hasher).is_err() {
        return false;
    }
    hex::encode(hasher.finalize()) == file.sha256
}

/// Backoff for transient errors: the server's `Retry-After` when given, else 0.5 s doubling to
/// 30 s; gives up once errors have lasted `give_up_after`.
struct Retry {
    delay: Duration,
    since: Instant,
    give_up_after: Duration,
    warned: bool,
}

impl Retry {
    fn new(give_up_after: Duration) -> Self {
        Self { delay: Duration::from_millis(500), since: Instant::now(), give_up_after, warned: false }
    }

    async fn pause(&mut self, e: &ClientError, line: usize, progress: &Progress) -> bool {
        let waited = self.since.elapsed();
        if waited >= self.give_up_after {
            progress.println(&format!("line {line}: giving up for this run after {waited:?}: {e}"));
            return false;
        }
        if !self.warned {
            progress.println(&format!("line {line}: {e}; retrying"));
            self.warned = true;
        }
        let pause = e.retry_after().unwrap_or(self.delay).min(self.give_up_after - waited);
        tokio::time::sleep(pause).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(30));
        true
    }
}
