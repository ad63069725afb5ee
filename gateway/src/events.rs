//! The gateway's log events in one place, so handlers hold no logging boilerplate (metrics join
//! these same functions).

use axum::http::StatusCode;
use kiln_proto::{ErrorCode, JobId, ModelName};

use crate::error::ApiError;

pub fn job_accepted(id: JobId, model: &ModelName, took: std::time::Duration) {
    tracing::debug!(target: "kiln::gateway", job_id = %id, %model, "job accepted");
    metrics::counter!("kiln_gateway_jobs_submitted_total", "model" => model.to_string()).increment(1);
    metrics::histogram!("kiln_gateway_submit_duration_seconds", "model" => model.to_string()).record(took);
}

/// A cache lookup of a submission: `hit`, `miss`, or `coalesced` onto an identical job in flight.
pub fn cache_lookup(model: &ModelName, result: &'static str) {
    metrics::counter!("kiln_gateway_cache_lookups_total", "model" => model.to_string(), "result" => result)
        .increment(1);
}

pub fn request_failed(err: &ApiError, status: StatusCode, code: ErrorCode) {
    if status.is_server_error() {
        let source = std::error::Error::source(err).map(|s| s.to_string());
        let detail = match err {
            ApiError::Internal(why) => Some(why.clone()),
            _ => source,
        };
        tracing::warn!(target: "kiln::gateway", status = status.as_u16(), code = code.as_str(), error = %err, detail = detail.as_deref().unwrap_or(""), "request failed");
    } else {
        tracing::debug!(target: "kiln::gateway", status = status.as_u16(), code = code.as_str(), error = %err, "request rejected");
    }
}

pub fn enqueue_rolled_back(id: JobId, discarded: bool) {
    tracing::warn!(target: "kiln::gateway", job_id = %id, discarded, "publish failed; job record withdrawn");
}

pub fn confirm_not_recorded(id: JobId, error: &dyn std::fmt::Display) {
    tracing::warn!(target: "kiln::gateway", job_id = %id, %error, "job enqueued, but its confirmation was not recorded; its first start records it");
}

pub fn slot_not_released(id: JobId, error: &dyn std::fmt::Display) {
    tracing::warn!(target: "kiln::gateway", job_id = %id, %error, "a jobs-in-flight slot of a job not accepted was not given back; it lapses with the job retention");
}

pub fn job_canceled(id: JobId) {
    tracing::info!(target: "kiln::gateway", job_id = %id, "job canceled");
}

pub fn cache_hit(id: JobId, model: &ModelName) {
    tracing::debug!(target: "kiln::gateway", job_id = %id, %model, "answered from the cache");
    cache_lookup(model, "hit");
}

pub fn coalesced(id: JobId, leader: JobId) {
    tracing::debug!(target: "kiln::gateway", job_id = %id, %leader, "attached to an identical job in flight");
}

pub fn cache_unavailable(error: &dyn std::fmt::Display) {
    tracing::warn!(target: "kiln::gateway", %error, "result cache unavailable; running the job");
}

/// A dependency failed its readiness check: the detail goes to the log, the answer gets a word.
pub fn dependency_down(which: &'static str, error: &dyn std::fmt::Display) -> &'static str {
    tracing::warn!(target: "kiln::gateway", dependency = which, %error, "readiness check failed");
    "unavailable"
}
