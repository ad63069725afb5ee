//! The worker's log events in one place, so the consume loop holds no logging boilerplate.
//! `kiln::worker::runs` at debug level logs one line per completed run, which the fault-injection
//! suite counts to prove no job ran to completion twice.

use std::fmt::Display;
use std::time::Duration;

use kiln_common::models::{ExecutionProvider, ModelSpec};
use kiln_common::store::Start;
use kiln_proto::{JobId, ModelName};

pub fn model_loaded(spec: &ModelSpec, provider: ExecutionProvider, threads: crate::Threads) {
    tracing::info!(target: "kiln::worker", model = %spec.name, version = %spec.version, execution_provider = ?provider, intra_threads = threads.intra, spinning = threads.spin, max_batch = spec.max_batch, "model loaded");
}

pub fn image_withheld(id: kiln_proto::JobId, index: u32, nsfw: f32, threshold: f32) {
    tracing::info!(target: "kiln::worker", job_id = %id, index, nsfw, threshold, "image withheld by moderation");
    metrics::counter!("kiln_images_withheld_total").increment(1);
}

pub fn consuming(model: &ModelName, prefetch: u16) {
    tracing::info!(target: "kiln::worker", %model, prefetch, "consuming");
}

pub fn lane_consumed(lane: &kiln_common::broker::Lane, prefetch: u16) {
    tracing::info!(target: "kiln::worker", %lane, prefetch, "consuming a tenant's lane");
}

pub fn lanes_unknown(model: &ModelName, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", %model, %error, "tenants' lanes not looked for: the store did not answer");
}

pub fn consumer_lost(model: &ModelName, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", %model, %error, "consumer lost, reconnecting");
}

pub fn batch_done(model: &ModelName, jobs: usize, texts: usize, elapsed: Duration) {
    tracing::debug!(target: "kiln::worker", %model, jobs, texts, elapsed_ms = elapsed.as_secs_f64() * 1e3, "batch done");
}

/// A run that completed: its outcome reached the store, which kept it (`stored`) or had a result
/// from an earlier run already.
pub fn run_completed(id: JobId, attempt: u32, ok: bool, stored: bool) {
    tracing::debug!(target: "kiln::worker::runs", job_id = %id, attempt, ok, stored, "run completed");
}

pub fn charge_failed(id: JobId, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, error = %error, "run time not charged to its tenant's compute quota");
    metrics::counter!("kiln_worker_charge_failures_total").increment(1);
}

pub fn skipped(id: JobId, why: &Start) {
    tracing::info!(target: "kiln::worker", job_id = %id, why = ?why, "delivery skipped");
}

pub fn undecodable(model: &ModelName, error: &dyn Display) {
    tracing::error!(target: "kiln::worker", %model, %error, "undecodable message dead-lettered (kiln dlq list shows it as unreadable)");
}

pub fn job_failed(id: JobId, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "job failed");
}

pub fn retry_scheduled(spec: &ModelSpec, id: JobId, attempt: u32, after: Duration) {
    metrics::counter!("kiln_worker_retries_total", "model" => spec.name.to_string()).increment(1);
    tracing::warn!(target: "kiln::worker", job_id = %id, attempt, after_ms = after.as_millis() as u64, "job will be retried");
}

pub fn dead_lettered(spec: &ModelSpec, id: JobId, error: &dyn Display) {
    metrics::counter!("kiln_worker_dead_letters_total", "model" => spec.name.to_string()).increment(1);
    tracing::error!(target: "kiln::worker", job_id = %id, %error, "job given up and dead-lettered");
}

pub fn duplicate_finish(id: JobId, found: &str) {
    tracing::warn!(target: "kiln::worker", job_id = %id, found, "result not stored: the job finished in another run, or the store no longer knows this run");
}

pub fn handed_back(id: JobId, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "job handed back");
}

pub fn leased(id: JobId) {
    tracing::info!(target: "kiln::worker", job_id = %id, "long job: message acknowledged, lease taken");
}

pub fn lease_refused(id: JobId, why: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %why, "lease not taken or renewed");
}

pub fn lease_lost(id: JobId, found: &str) {
    tracing::warn!(target: "kiln::worker", job_id = %id, found, "lease lost: another worker may run this job");
}

pub fn lease_reaped(id: JobId) {
    tracing::warn!(target: "kiln::worker", job_id = %id, "job queued again (lapsed lease, orphan or stray)");
}

pub fn stray(id: JobId, found: kiln_common::store::Stray) {
    metrics::counter!("kiln_worker_strays_total", "outcome" => if found == kiln_common::store::Stray::Lost { "lost" } else { "requeued" }).increment(1);
    tracing::warn!(target: "kiln::worker", job_id = %id, ?found, "sweeper found a stray job (quiet past KILN_SWEEP_AFTER with no live lease)");
}

pub fn start_failed(id: JobId, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "cannot start the job: store unavailable; holding its message and trying again");
}

pub fn finish_failed(id: JobId, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "cannot store the result: store unavailable; holding it and trying again");
}

pub fn rebuilt(id: JobId) {
    tracing::warn!(target: "kiln::worker", job_id = %id, "job record missing (expired or lost by the store): rebuilt from its message");
}

pub fn reaper_failed(error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", %error, "lease reaper round failed");
}

pub fn draining(grace: Duration) {
    tracing::info!(target: "kiln::worker", ?grace, "draining: no new jobs, finishing the batches in hand");
}

pub fn cache_unavailable(error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", %error, "result not cached");
}

pub fn batch_gathered(model: &ModelName, jobs: usize) {
    metrics::histogram!("kiln_worker_batch_size", "model" => model.to_string()).record(jobs as f64);
    tracing::debug!(target: "kiln::worker", %model, jobs, "batch gathered");
}

/// One model run of an embedding pool: the shape the planner chose, what it expected it to cost
/// and what it took. `kiln_worker_batch_size` counts texts per run.
pub fn batch_run(
    model: &ModelName,
    wide: bool,
    shape: crate::planner::Shape,
    real_tokens: usize,
    estimate_ms: f64,
    ms: f64,
) {
    let session = if wide { "wide" } else { "narrow" };
    let m = model.to_string();
    metrics::histogram!("kiln_worker_batch_size", "model" => m.clone()).record(shape.batch as f64);
    metrics::histogram!("kiln_worker_batch_seq_len", "model" => m.clone()).record(shape.len as f64);
    metrics::histogram!("kiln_worker_batch_padded_tokens", "model" => m.clone()).record(shape.padded_tokens() as f64);
    metrics::histogram!("kiln_worker_batch_run_seconds", "model" => m, "session" => session).record(ms / 1e3);
    tracing::debug!(target: "kiln::worker::batches", %model, session, texts = shape.batch, seq_len = shape.len, padded_tokens = shape.padded_tokens(), real_tokens, estimate_ms, ms, "batch run");
}

pub fn calibrated(sessions: usize, shapes: usize, took: Duration) {
    tracing::info!(target: "kiln::worker", sessions, shapes, took_ms = took.as_millis() as u64, "cost table calibrated");
}

pub fn pool_started(spec: &ModelSpec, provider: ExecutionProvider, layout: &str, limits: crate::planner::Limits) {
    tracing::info!(target: "kiln::worker", model = %spec.name, version = %spec.version, execution_provider = ?provider, layout, max_batch = limits.max_batch, max_batch_tokens = limits.max_batch_tokens, "model loaded");
}

pub fn images_resumed(id: JobId, stored: u32, count: u32) {
    tracing::info!(target: "kiln::worker", job_id = %id, stored, count, "resuming image job after the images already stored");
}

pub fn images_stopped(id: JobId, made: u32, count: u32) {
    tracing::info!(target: "kiln::worker", job_id = %id, made, count, "image job stopped between images: no longer running (canceled?)");
}

pub fn progress_refused(id: JobId, found: &str) {
    tracing::info!(target: "kiln::worker", job_id = %id, found, "progress not recorded: the job is no longer running; stopping it");
}

pub fn progress_unavailable(id: JobId, error: &dyn Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "progress not recorded: store unavailable; the job goes on");
}

/// When a run started, and when its job was submitted.
pub struct RunTiming {
    pub started: std::time::Instant,
    pub created_at: kiln_proto::UnixMillis,
}

/// A job run ended (`succeeded`, `failed`, `canceled`) or a delivery was not run (`expired`,
/// `skipped`); for runs, also how long it ran and how long since it was submitted.
pub fn job_outcome(spec: &ModelSpec, outcome: &'static str, run: Option<RunTiming>) {
    let (model, task) = (spec.name.to_string(), spec.task.as_str());
    metrics::counter!("kiln_worker_jobs_total", "model" => model.clone(), "task" => task, "outcome" => outcome)
        .increment(1);
    if let Some(job) = run {
        metrics::histogram!("kiln_worker_run_duration_seconds", "model" => model.clone(), "task" => task)
            .record(job.started.elapsed());
        let e2e = (kiln_proto::now_millis() - job.created_at).max(0) as f64 / 1e3;
        metrics::histogram!("kiln_worker_end_to_end_seconds", "model" => model, "task" => task).record(e2e);
    }
}

/// Time a job waited in the queue before its first start.
pub fn queue_wait(spec: &ModelSpec, created_at: kiln_proto::UnixMillis) {
    let waited = (kiln_proto::now_millis() - created_at).max(0) as f64 / 1e3;
    metrics::histogram!("kiln_worker_queue_wait_seconds", "model" => spec.name.to_string(), "task" => spec.task.as_str())
        .record(waited);
}

/// Jobs of a model between start and settle on this worker.
pub fn in_flight(spec: &ModelSpec, delta: f64) {
    metrics::gauge!("kiln_worker_in_flight_jobs", "model" => spec.name.to_string()).increment(delta);
}

/// A running job's `Cancel-After` passed: `outcome` is what the cancel found (`canceled`, or the
/// state that was there first), or why it could not be written.
pub fn cancel_after_reached(id: JobId, outcome: &str) {
    metrics::counter!("kiln_worker_cancel_after_total", "outcome" => if outcome == "canceled" { "canceled" } else { "other" }).increment(1);
    tracing::info!(target: "kiln::worker", job_id = %id, outcome, "the job's Cancel-After passed while it ran; canceling it");
}
