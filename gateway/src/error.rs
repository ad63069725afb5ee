//! `ApiError`, every way a request can fail, and the one exhaustive mapping to an HTTP status, a
//! stable error code and a `Retry-After` where retrying helps. 5xx answers never carry internals.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_common::broker::BrokerError;
use kiln_common::inputs::InputStoreError;
use kiln_common::outputs::OutputError;
use kiln_common::store::StoreError;
use kiln_common::tenancy::{KeyError, Scope};
use kiln_proto::{ApiErrorBody, ErrorCode, ErrorDetail, InputError, JobError, JobId};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{field}: {message}")]
    InvalidRequest { field: String, message: String },
    #[error("{0}")]
    InvalidInput(InputError),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body must be application/json, got {0}")]
    UnsupportedMediaType(String),
    /// A binary input over its model's `max_input_bytes`.
    #[error("{field}: is larger than the limit of {limit} bytes")]
    InputTooLarge { field: String, limit: usize },
    /// An upload that is none of the accepted formats (sniffed from its bytes).
    #[error("the file is not PNG, JPEG, WebP or WAV (sniffed from its bytes, not its declared type {declared:?})")]
    UnsupportedFile { declared: Option<String> },
    #[error("file {0} not found")]
    FileNotFound(String),
    #[error("the input store is unavailable, retry later")]
    Inputs(#[source] InputStoreError, Duration),
    #[error("model {0:?} is not served here; see GET /v1/models")]
    ModelNotFound(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("job {0} has no output named {1:?}")]
    OutputNotFound(String, String),
    #[error("the output store is unavailable, retry later")]
    Outputs(#[source] OutputError, Duration),
    #[error("no route for {0}")]
    NotFound(String),
    /// A path parameter that axum could not extract (not UTF-8 once percent-decoded): it names
    /// nothing here.
    #[error("nothing here: {0}")]
    UndecodablePath(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the job queue is unavailable, retry later")]
    Broker(#[source] BrokerError, Duration),
    #[error("the job store is unavailable, retry later")]
    Store(#[source] StoreError, Duration),
    #[error("the gateway is at capacity, retry later")]
    Overloaded(Duration),
    /// Every slot of a bounded kind of open request (long-polls, event streams) is taken.
    #[error("the gateway has as many {0} open as it serves; retry later")]
    TooManyOpen(&'static str, Duration),
    #[error("Idempotency-Key {0:?} was already used with a different request")]
    IdempotencyKeyReused(String),
    #[error("a request with Idempotency-Key {0:?} is still being accepted; retry shortly")]
    IdempotencyKeyInFlight(String, Duration),
    #[error("job {0} is already {1}")]
    JobFinished(String, &'static str),
    #[error("{0}")]
    Unauthorized(Unauthorized),
    #[error("this API key lacks the scope {0}")]
    Forbidden(Scope),
    #[error("{0}")]
    RateLimited(Limited),
    #[error("{0}")]
    QuotaExceeded(Limited),
    #[error("the key store is unavailable, retry later")]
    Keys(#[source] KeyError, Duration),
    /// A request answered synchronously whose job did not finish within the bound; the job goes
    /// on, and a retry joins it or reads its cached result.
    #[error(
        "job {job} did not finish within {}s; it goes on running: retry after Retry-After for its result, or read GET /v1/jobs/{job}",
        waited.as_secs()
    )]
    WaitTimeout { job: JobId, waited: Duration, retry_after: Duration },
    /// A request answered synchronously whose job ended without a result.
    #[error("job {job} ended {status}: {}", error.as_ref().map_or("without a result", |e| e.message.as_str()))]
    JobFailed { job: JobId, status: &'static str, error: Option<JobError>, retry_after: Duration },
    #[error("internal error")]
    Internal(String),
}

/// Why a request has no valid key; the message says which, the code is always `unauthorized`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    #[error("an API key is required: send `Authorization: Bearer kiln_…`")]
    Missing,
    #[error("the Authorization header is not a Kiln API key (`Bearer kiln_…`)")]
    Malformed,
    #[error("the API key is not valid (unknown, revoked or expired)")]
    Invalid,
}

/// A limit that was reached: what to say, when to come back, and the IETF `RateLimit-Policy` /
/// `RateLimit` field values describing it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Limited {
    pub message: String,
    pub retry_after: Duration,
    pub headers: RateHeaders,
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) field values.
#[derive(Debug, Clone, Default)]
pub struct RateHeaders {
    pub policy: String,
    pub state: String,
}

impl RateHeaders {
    pub fn apply(&self, headers: &mut axum::http::HeaderMap) {
        for (name, value) in [("ratelimit-policy", &self.policy), ("ratelimit", &self.state)] {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        }
    }
}

impl ApiError {
    /// Status, code and retry hint: the one place that decides them.
    fn parts(&self) -> (StatusCode, ErrorCode, Option<Duration>) {
        match self {
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::MalformedJson, None),
            Self::InvalidRequest { .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidRequest, None),
            Self::InvalidInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidInput, None),
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge, None),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedMediaType, None)
            }
            Self::InputTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge, None),
            Self::UnsupportedFile { .. } => (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedMediaType, None),
            Self::FileNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::FileNotFound, None),
            Self::Inputs(e, retry) => match e {
                InputStoreError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable, Some(*retry))
                }
                InputStoreError::Corrupt { .. } | InputStoreError::Invalid(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, None)
                }
            },
            Self::ModelNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::ModelNotFound, None),
            Self::JobNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::JobNotFound, None),
            Self::OutputNotFound(..) => (StatusCode::NOT_FOUND, ErrorCode::OutputNotFound, None),
            Self::Outputs(e, retry) => match e {
                OutputError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable, Some(*retry))
                }
                OutputError::Invalid(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, None),
            },
            Self::NotFound(_) | Self::UndecodablePath(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound, None),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed, None),
            Self::Broker(e, retry) => match e {
                BrokerError::Unavailable(_)
                | BrokerError::ConfirmTimeout(_)
                | BrokerError::Amqp(_)
                | BrokerError::Unroutable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::BrokerUnavailable, Some(*retry))
                }
                BrokerError::Rejected(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded, Some(*retry)),
            },
            Self::Store(e, retry) => match e {
                StoreError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable, Some(*retry))
                }
                StoreError::Corrupt { .. } | StoreError::Conflict(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, None)
                }
            },
            Self::Overloaded(retry) | Self::TooManyOpen(_, retry) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded, Some(*retry))
            }
            Self::IdempotencyKeyReused(_) => (StatusCode::CONFLICT, ErrorCode::IdempotencyKeyReused, None),
            Self::IdempotencyKeyInFlight(_, retry) => {
                (StatusCode::CONFLICT, ErrorCode::IdempotencyKeyInFlight, Some(*retry))
            }
            Self::JobFinished(..) => (StatusCode::CONFLICT, ErrorCode::JobFinished, None),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, None),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden, None),
            Self::RateLimited(l) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, Some(l.retry_after)),
            Self::QuotaExceeded(l) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::QuotaExceeded, Some(l.retry_after)),
            Self::Keys(e, retry) => match e {
                KeyError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable, Some(*retry))
                }
                KeyError::Corrupt(_) | KeyError::Invalid(_) | KeyError::NotFound(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, None)
                }
            },
            Self::WaitTimeout { retry_after, .. } => {
                (StatusCode::GATEWAY_TIMEOUT, ErrorCode::WaitTimeout, Some(*retry_after))
            }
            Self::JobFailed { error: None, retry_after, .. } => {
                (StatusCode::BAD_GATEWAY, ErrorCode::InferenceFailed, Some(*retry_after))
            }
            Self::JobFailed { error: Some(error), retry_after, .. } => job_failed(error.code, *retry_after),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, None),
        }
    }

    /// The request field the error is about, when it is about one (OpenAI's `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { field, .. } => Some(field),
            Self::InvalidInput(e) => Some(&e.field),
            Self::InputTooLarge { field, .. } => Some(field),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }
}

/// Status, code and retry hint of a job that ended without a result, by its error's code: the
/// input's fault (the worker refused it) is the client's, a cancel or expiry is a conflict with
/// what happened to the job, the rest failed upstream of the gateway and may go through on a retry.
fn job_failed(code: ErrorCode, retry: Duration) -> (StatusCode, ErrorCode, Option<Duration>) {
    match code {
        ErrorCode::InvalidInput
        | ErrorCode::InvalidRequest
        | ErrorCode::MalformedJson
        | ErrorCode::PayloadTooLarge
        | ErrorCode::UnsupportedMediaType => (StatusCode::UNPROCESSABLE_ENTITY, code, None),
        ErrorCode::Canceled | ErrorCode::DeadlineExceeded => (StatusCode::CONFLICT, code, None),
        ErrorCode::InferenceFailed
        | ErrorCode::WorkerLost
        | ErrorCode::JobLost
        | ErrorCode::Internal
        | ErrorCode::ModelNotFound
        | ErrorCode::JobNotFound
        | ErrorCode::OutputNotFound
        | ErrorCode::FileNotFound
        | ErrorCode::NotFound
        | ErrorCode::MethodNotAllowed
        | ErrorCode::BrokerUnavailable
        | ErrorCode::StoreUnavailable
        | ErrorCode::Overloaded
        | ErrorCode::IdempotencyKeyReused
        | ErrorCode::IdempotencyKeyInFlight
        | ErrorCode::JobFinished
        | ErrorCode::Unauthorized
        | ErrorCode::Forbidden
        | ErrorCode::RateLimited
        | ErrorCode::QuotaExceeded
        | ErrorCode::WaitTimeout => (StatusCode::BAD_GATEWAY, code, Some(retry)),
    }
}

/// An error answer as it was rendered, left on the response so that a route speaking another
/// API's dialect (`routes::openai`) can say the same in that API's error shape.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
}

/// axum's rejection of a path parameter, as an error of ours (its own answer is plain text).
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::UndecodablePath(rejection.body_text())
    }
}

/// axum's rejection of a query string (a parameter of the wrong type, or given twice), as an
/// error of ours (its own answer is plain text).
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::InvalidRequest { field: "query".to_owned(), message: rejection.body_text() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry) = self.parts();
        crate::events::request_failed(&self, status, code);
        let message =
            if status.is_server_error() && retry.is_none() { "internal error".to_owned() } else { self.to_string() };
        let rendered = Rendered { code, message: message.clone(), param: self.param().map(str::to_owned) };
        let mut resp = (status, Json(ApiErrorBody { error: ErrorDetail { code, message } })).into_response();
        resp.extensions_mut().insert(rendered);
        if let Some(retry) = retry {
            // Whole seconds, rounded up: a client that waits this long is let in.
            let secs = retry.as_millis().div_ceil(1000).max(1) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        let challenge = match &self {
            Self::Unauthorized(Unauthorized::Missing) => Some(r#"Bearer realm="kiln""#.to_owned()),
            Self::Unauthorized(_) => Some(r#"Bearer realm="kiln", error="invalid_token""#.to_owned()),
            Self::Forbidden(scope) => {
                Some(format!(r#"Bearer realm="kiln", error="insufficient_scope", scope="{scope}""#))
            }
            _ => None,
        };
        if let Some(v) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if let Self::RateLimited(l) | Self::QuotaExceeded(l) = &self {
            l.headers.apply(resp.headers_mut());
        }
        resp
    }
}
