//! Why a job did not succeed, and the one exhaustive mapping from that to what happens next:
//! fail now, retry after a backoff, or give up into the dead-letter queue.

use std::time::Duration;

use kiln_proto::{ErrorCode, JobError, JobId};

use crate::embedding::PipelineError;

/// A job's failure, as the worker classifies it.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The input cannot be processed by this model; running it again cannot help.
    Input(String),
    /// The model failed while running it. It may be transient (resources) or the job may be
    /// poison; retries with backoff tell the two apart, up to the attempt limit.
    Inference(String),
    /// The job was started `starts` times and never finished: its workers crashed or were killed.
    Abandoned { starts: u32 },
    /// Its outputs could not be written (the output store is down): retried like an inference
    /// failure, since the job's work is lost with them.
    Outputs(String),
}

impl From<PipelineError> for Failure {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Input(m) => Self::Input(m),
            PipelineError::Inference(m) => Self::Inference(m),
        }
    }
}

/// What to do with a failed job.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Terminal `failed`, no retry.
    Fail(JobError),
    /// Back to `queued`, delivered again after the delay.
    Retry { after: Duration, error: JobError },
    /// Terminal `failed`, and a copy in the dead-letter queue for an operator.
    DeadLetter(JobError),
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Exponential backoff with "equal jitter": half the step fixed, half drawn per job and attempt.
    pub fn delay(&self, id: JobId, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(self.max);
        let half = exp / 2;
        half + half.mul_f64(jitter(id, attempt))
    }
}

/// A number in [0, 1) that differs per job and attempt, so retries of a failed batch spread out.
fn jitter(id: JobId, attempt: u32) -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(id.to_string().as_bytes());
    h.write_u32(attempt);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The one mapping from a failure on the `attempt`-th start to its disposition.
pub fn dispose(failure: Failure, id: JobId, attempt: u32, policy: &RetryPolicy) -> Disposition {
    match failure {
        Failure::Input(message) => Disposition::Fail(JobError { code: ErrorCode::InvalidInput, message }),
        Failure::Inference(message) if attempt >= policy.max_attempts => Disposition::DeadLetter(JobError {
            code: ErrorCode::InferenceFailed,
            message: format!("gave up after {attempt} attempts: {message}"),
        }),
        Failure::Inference(message) => Disposition::Retry {
            after: policy.delay(id, attempt),
            error: JobError { code: ErrorCode::InferenceFailed, message },
        },
        Failure::Outputs(message) if attempt >= policy.max_attempts => Disposition::DeadLetter(JobError {
            code: ErrorCode::StoreUnavailable,
            message: format!("gave up after {attempt} attempts: {message}"),
        }),
        Failure::Outputs(message) => Disposition::Retry {
            after: policy.delay(id, attempt),
            error: JobError { code: ErrorCode::StoreUnavailable, message },
        },
        Failure::Abandoned { starts } => Disposition::DeadLetter(JobError {
            code: ErrorCode::WorkerLost,
            message: format!("started {starts} times without finishing: its workers crashed or were killed"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy =
        RetryPolicy { max_attempts: 3, base: Duration::from_secs(1), max: Duration::from_secs(10) };

    #[test]
    fn input_errors_fail_at_once() {
        let d = dispose(Failure::Input("bad".into()), JobId::random(), 1, &POLICY);
        assert!(matches!(d, Disposition::Fail(JobError { code: ErrorCode::InvalidInput, .. })));
    }

    #[test]
    fn inference_errors_retry_until_the_limit_then_dead_letter() {
        let id = JobId::random();
        for attempt in 1..3 {
            match dispose(Failure::Inference("oom".into()), id, attempt, &POLICY) {
                Disposition::Retry { after, .. } => {
                    let step = Duration::from_secs(1 << (attempt - 1));
                    assert!(after >= step / 2 && after <= step, "attempt {attempt}: {after:?}");
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        let last = dispose(Failure::Inference("oom".into()), id, 3, &POLICY);
        assert!(matches!(last, Disposition::DeadLetter(JobError { code: ErrorCode::InferenceFailed, .. })), "{last:?}");
    }

    #[test]
    fn backoff_is_capped() {
        assert!(POLICY.delay(JobId::random(), 30) <= Duration::from_secs(10));
    }

    #[test]
    fn abandoned_jobs_are_dead_lettered() {
        let d = dispose(Failure::Abandoned { starts: 5 }, JobId::random(), 6, &POLICY);
        assert!(matches!(d, Disposition::DeadLetter(JobError { code: ErrorCode::WorkerLost, .. })));
    }
}
