//! The one table of stable, machine-readable error codes, and the JSON error body
//! `{"error": {"code": "...", "message": "..."}}` every API error uses.

use serde::{Deserialize, Serialize};

/// Stable error codes. Clients match on these strings; never rename one, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body is not valid JSON.
    MalformedJson,
    /// The body is JSON but a field is missing, unknown or of the wrong type; or a header or query
    /// parameter is malformed.
    InvalidRequest,
    /// The job's `input` does not fit the model's task schema.
    InvalidInput,
    /// The request body is larger than the configured limit.
    PayloadTooLarge,
    /// The request body is not `application/json`.
    UnsupportedMediaType,
    /// No model of that name is served.
    ModelNotFound,
    /// No job with that id exists (or it expired).
    JobNotFound,
    /// The job has no output file of that name (not produced yet, or expired).
    OutputNotFound,
    /// No uploaded file with that id (never uploaded, another tenant's, deleted or expired).
    FileNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The message broker cannot take the job right now; retry after the `Retry-After` delay.
    BrokerUnavailable,
    /// The job store cannot be reached right now; retry after the `Retry-After` delay.
    StoreUnavailable,
    /// The server is over capacity; retry after the `Retry-After` delay.
    Overloaded,
    /// The `Idempotency-Key` was used before with a different request body.
    IdempotencyKeyReused,
    /// A request with the same `Idempotency-Key` is still being accepted; retry shortly.
    IdempotencyKeyInFlight,
    /// The job is already in a terminal state (e.g. cancelling a finished job).
    JobFinished,
    /// The job was canceled.
    Canceled,
    /// The model failed while running the job (after the retries allowed).
    InferenceFailed,
    /// The job's deadline passed before it started.
    DeadlineExceeded,
    /// The job was started too many times without finishing: its workers crashed or were killed.
    WorkerLost,
    /// The job's work was lost and could not be rebuilt (no message, no lease, no stored envelope).
    JobLost,
    /// No valid API key: none given, malformed, unknown, revoked or expired (`401`).
    Unauthorized,
    /// The API key lacks the scope this route needs (`403`).
    Forbidden,
    /// The tenant's request rate is used up; retry after the `Retry-After` delay (`429`).
    RateLimited,
    /// The tenant has as many jobs in flight, or has used as much compute this hour, as its
    /// quota allows; retry after the `Retry-After` delay (`429`).
    QuotaExceeded,
    /// A request answered synchronously (`POST /v1/embeddings`) whose job did not finish within
    /// the gateway's bound; the job goes on, and a retry after `Retry-After` joins it or reads
    /// its result from the cache (`504`).
    WaitTimeout,
    /// An unexpected server error; details are in the server log, never in the response.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation (the OpenAPI description lists them).
    pub const ALL: [ErrorCode; 28] = [
        Self::MalformedJson,
        Self::InvalidRequest,
        Self::InvalidInput,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::ModelNotFound,
        Self::JobNotFound,
        Self::OutputNotFound,
        Self::FileNotFound,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::BrokerUnavailable,
        Self::StoreUnavailable,
        Self::Overloaded,
        Self::IdempotencyKeyReused,
        Self::IdempotencyKeyInFlight,
        Self::JobFinished,
        Self::Canceled,
        Self::InferenceFailed,
        Self::DeadlineExceeded,
        Self::WorkerLost,
        Self::JobLost,
        Self::Unauthorized,
        Self::Forbidden,
        Self::RateLimited,
        Self::QuotaExceeded,
        Self::WaitTimeout,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidInput => "invalid_input",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::ModelNotFound => "model_not_found",
            Self::JobNotFound => "job_not_found",
            Self::OutputNotFound => "output_not_found",
            Self::FileNotFound => "file_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::StoreUnavailable => "store_unavailable",
            Self::Overloaded => "overloaded",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyKeyInFlight => "idempotency_key_in_flight",
            Self::JobFinished => "job_finished",
            Self::Canceled => "canceled",
            Self::InferenceFailed => "inference_failed",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::WorkerLost => "worker_lost",
            Self::JobLost => "job_lost",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::WaitTimeout => "wait_timeout",
            Self::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Error))]
pub struct ApiErrorBody {
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_name_matches_as_str() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
