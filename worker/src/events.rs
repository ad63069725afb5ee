//! The worker's log events in one place, so the consume loop holds no logging boilerplate.

use kiln_common::models::{ExecutionProvider, ModelSpec};
use kiln_proto::{JobId, JobStatus, ModelName};

pub fn model_loaded(spec: &ModelSpec, provider: ExecutionProvider, threads: usize) {
    tracing::info!(target: "kiln::worker", model = %spec.name, version = %spec.version, execution_provider = ?provider, intra_threads = threads, max_batch = spec.max_batch, "model loaded");
}

pub fn consuming(model: &ModelName, prefetch: u16) {
    tracing::info!(target: "kiln::worker", %model, prefetch, "consuming");
}

pub fn consumer_lost(model: &ModelName, error: &dyn std::fmt::Display) {
    tracing::warn!(target: "kiln::worker", %model, %error, "consumer lost, reconnecting");
}

pub fn batch_done(model: &ModelName, jobs: usize, texts: usize, elapsed: std::time::Duration) {
    tracing::debug!(target: "kiln::worker", %model, jobs, texts, elapsed_ms = elapsed.as_secs_f64() * 1e3, "batch done");
}

pub fn skipped(id: JobId, why: &str, status: Option<JobStatus>) {
    tracing::info!(target: "kiln::worker", job_id = %id, why, status = status.map(|s| s.as_str()), "delivery skipped");
}

pub fn undecodable(model: &ModelName, error: &dyn std::fmt::Display) {
    tracing::error!(target: "kiln::worker", %model, %error, "undecodable message dropped");
}

pub fn job_failed(id: JobId, error: &dyn std::fmt::Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "job failed");
}

pub fn handed_back(id: JobId, error: &dyn std::fmt::Display) {
    tracing::warn!(target: "kiln::worker", job_id = %id, %error, "job handed back to the queue");
}
