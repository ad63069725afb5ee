//! What the audit writer logs and counts, in one place: drops from the queue and from failed
//! writes, recovery on open, and the Redis mirror's losses.

use std::path::Path;

/// An entry did not fit in the writer's queue; warns once per burst (the writer reports the total).
pub(super) fn queue_full(first_of_burst: bool) {
    metrics::counter!("kiln_audit_dropped_total", "reason" => "queue_full").increment(1);
    if first_of_burst {
        tracing::warn!("audit queue full: dropping audit entries until the writer catches up");
    }
}

/// An entry recorded after the log was closed (or its writer stopped); warns the first time.
pub(super) fn closed_drop(first: bool) {
    metrics::counter!("kiln_audit_dropped_total", "reason" => "closed").increment(1);
    if first {
        tracing::warn!("audit entry recorded after the audit log was closed: dropped (and any after it)");
    }
}

/// Entries of a batch that could not be written (the file is unusable).
pub(super) fn write_dropped(count: u64) {
    metrics::counter!("kiln_audit_dropped_total", "reason" => "write").increment(count);
}

pub(super) fn drops_noted(count: u64) {
    tracing::warn!(count, "audit entries were dropped; a `dropped` entry records how many");
}

pub(super) fn written(lines: usize) {
    metrics::counter!("kiln_audit_entries_total").increment(lines as u64);
}

pub(super) fn write_failed(path: &Path, error: &std::io::Error, requests: u64) {
    metrics::counter!("kiln_audit_dropped_total", "reason" => "write").increment(requests);
    tracing::error!(path = %path.display(), %error, requests, "cannot append to the audit log; these entries are lost");
}

pub(super) fn broken(path: &Path, error: &std::io::Error) {
    tracing::error!(path = %path.display(), %error,
        "cannot cut a failed write off the audit log; no further entries are written to it");
}

pub(super) fn recovered(path: &Path, torn_bytes: usize) {
    tracing::warn!(path = %path.display(), torn_bytes, "audit log ended in a torn line; cut it off and continued the chain");
}

pub(super) fn unsigned(path: &Path) {
    tracing::warn!(path = %path.display(), "KILN_AUDIT_KEY is unset: audit checkpoints are unsigned");
}

pub(super) fn mirror_dropped(reason: &'static str, entries: usize) {
    metrics::counter!("kiln_audit_mirror_dropped_total", "reason" => reason).increment(entries as u64);
}

/// Warns at the first failure of an outage only.
pub(super) fn mirror_failed(error: &redis::RedisError, entries: usize, first: bool) {
    metrics::counter!("kiln_audit_mirror_dropped_total", "reason" => "redis").increment(entries as u64);
    if first {
        tracing::warn!(%error, entries, "cannot append to the audit stream; entries are missing from it until Redis answers (the file has them)");
    }
}

pub(super) fn mirror_resumed() {
    tracing::info!("appending to the audit stream again");
}

pub(super) fn mirror_abandoned() {
    tracing::warn!("the audit stream did not drain in time on close; its last entries are only in the file");
}
