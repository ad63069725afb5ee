//! Jobs on the wire: the status state machine, the job record the API returns, the envelope that
//! travels through the queue, and the model description served by `GET /v1/models`.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, JobId, ModelName, PredictionView, Task, UnixMillis};

/// `queued → running → succeeded | failed | canceled`, `queued → canceled | expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Expired,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            "expired" => Self::Expired,
            _ => return None,
        })
    }

    /// Terminal states are final: the first terminal write wins.
    pub fn is_terminal(self) -> bool {
        match self {
            Self::Queued | Self::Running => false,
            Self::Succeeded | Self::Failed | Self::Canceled | Self::Expired => true,
        }
    }
}

/// Why a job failed, as the client sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobMetrics {
    /// Time from acceptance to the start of the (last) run.
    pub queue_ms: Option<i64>,
    /// Time from the start of the (last) run to the terminal state.
    pub run_ms: Option<i64>,
}

/// The job record of `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Job))]
pub struct JobRecord {
    pub id: JobId,
    pub model: ModelName,
    pub status: JobStatus,
    #[serde(with = "rfc3339_millis")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: UnixMillis,
    #[serde(with = "rfc3339_millis::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub started_at: Option<UnixMillis>,
    #[serde(with = "rfc3339_millis::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub completed_at: Option<UnixMillis>,
    pub attempts: u32,
    /// The running job's last progress report, as its task reports it.
    pub progress: Option<serde_json::Value>,
    /// The task's output, once succeeded (generated images: `images[]` with `url`, `size`, `sha256`).
    pub output: Option<serde_json::Value>,
    pub error: Option<JobError>,
    pub cached: bool,
    pub metrics: JobMetrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
    /// When a job not started by then ends `expired`.
    #[serde(default, with = "rfc3339_millis::option", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub deadline_at: Option<UnixMillis>,
    /// When a job not finished by then is canceled, running or not (a finish-by time: the
    /// predictions API's `Cancel-After`). Enforced by the worker that runs it and by reads of it.
    #[serde(default, with = "rfc3339_millis::option", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub cancel_at: Option<UnixMillis>,
    /// Where and how its events are delivered, when a webhook was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookState>,
    /// The W3C trace context the job was accepted under, so later work on it (the webhook
    /// deliveries) joins the same trace. Internal: not part of the API.
    #[serde(skip)]
    pub traceparent: Option<String>,
    /// The tenant that owns the job (its API key's); none when the gateway runs without keys.
    /// Only its own tenant (or an admin key) can see the job at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A job's webhook and the state of its deliveries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookState {
    pub url: String,
    /// Which events are sent: `start`, `progress`, `completed` (always sent).
    pub events: Vec<String>,
    /// Delivery attempts so far, all events together.
    pub attempts: u32,
    /// HTTP status of the last attempt (none when it got no answer).
    pub last_status: Option<u16>,
    #[serde(with = "rfc3339_millis::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub delivered_at: Option<UnixMillis>,
    #[serde(with = "rfc3339_millis::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub gave_up_at: Option<UnixMillis>,
    /// When set, each delivery's body is the job as a prediction (the predictions API's
    /// webhooks) instead of a Kiln event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionView>,
}

/// The kinds of job events, as SSE event names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The job changed status (queued, running); `data` holds `{status, attempt?}`.
    Status,
    /// Progress of a running job; `data` holds the progress value.
    Progress,
    /// The job reached a terminal state; `data` holds `{status}` (SSE sends the full record).
    Completed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Progress => "progress",
            Self::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "status" => Self::Status,
            "progress" => Self::Progress,
            "completed" => Self::Completed,
            _ => return None,
        })
    }
}

/// One event of a job's log. `id` orders the log and resumes SSE streams (`Last-Event-ID`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub id: String,
    pub kind: EventKind,
    pub data: serde_json::Value,
    /// With a live `completed` event: the finished record as the transition left it, so a
    /// waiter can answer without reading it back. Never in the log.
    #[serde(skip)]
    pub record: Option<Box<JobRecord>>,
}

impl JobRecord {
    /// A freshly accepted job.
    pub fn queued(id: JobId, model: ModelName, created_at: UnixMillis, metadata: Option<serde_json::Value>) -> Self {
        Self {
            id,
            model,
            status: JobStatus::Queued,
            created_at,
            started_at: None,
            completed_at: None,
            attempts: 0,
            progress: None,
            output: None,
            error: None,
            cached: false,
            metrics: JobMetrics::default(),
            metadata,
            deadline_at: None,
            cancel_at: None,
            webhook: None,
            traceparent: None,
            tenant: None,
        }
    }

    /// Fills `metrics` from the timestamps, which are the source of truth.
    pub fn derive_metrics(&mut self) {
        self.metrics = JobMetrics {
            queue_ms: self.started_at.map(|s| s - self.created_at),
            run_ms: self.started_at.zip(self.completed_at).map(|(s, c)| c - s),
        };
    }
}

pub const ENVELOPE_VERSION: u32 = 1;

/// What travels through the queue: everything a worker needs to run the job without reading the
/// store first. The input has already been validated and canonicalised by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub id: JobId,
    pub model: ModelName,
    pub input: serde_json::Value,
    pub created_at: UnixMillis,
    /// A job not started by then ends `expired` instead of running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<UnixMillis>,
    /// A job not finished by then is canceled, running or not (see [`JobRecord::cancel_at`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_at: Option<UnixMillis>,
    /// The failed attempts so far, oldest first; carried along with retries and into the
    /// dead-letter queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRecord>,
    /// Where the output goes in the result cache; none when the job opted out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// The job's metadata, webhook and trace context: what a worker needs to rebuild its record
    /// if the store lost it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<EnvelopeWebhook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The tenant that owns the job: its record's, and whose compute quota its runs are charged to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A job's webhook, as its envelope carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeWebhook {
    pub url: String,
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionView>,
}

impl Envelope {
    pub fn new(
        id: JobId,
        model: ModelName,
        input: serde_json::Value,
        created_at: UnixMillis,
        deadline: Option<UnixMillis>,
    ) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id,
            model,
            input,
            created_at,
            deadline,
            cancel_at: None,
            history: Vec::new(),
            cache_key: None,
            metadata: None,
            webhook: None,
            traceparent: None,
            tenant: None,
        }
    }

    /// The queued record of this job, rebuilt from its message: for a store that lost it.
    pub fn record(&self) -> JobRecord {
        let mut record = JobRecord::queued(self.id, self.model.clone(), self.created_at, self.metadata.clone());
        record.deadline_at = self.deadline;
        record.cancel_at = self.cancel_at;
        record.webhook = self.webhook.as_ref().map(|w| WebhookState {
            url: w.url.clone(),
            events: w.events.clone(),
            prediction: w.prediction.clone(),
            ..Default::default()
        });
        record.traceparent = self.traceparent.clone();
        record.tenant = self.tenant.clone();
        record
    }
}

/// One failed attempt at a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub at: UnixMillis,
    pub error: JobError,
}

/// A message of the dead-letter queue: the job as it was last queued, and why it was given up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u32,
    pub envelope: Envelope,
    pub reason: JobError,
    pub attempts: u32,
    pub dead_at: UnixMillis,
}

/// A served model, as listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelInfo {
    pub name: ModelName,
    pub version: String,
    pub task: Task,
    pub max_batch: usize,
    /// JSON Schema of the task's input of `POST /v1/jobs`.
    pub input_schema: serde_json::Value,
    /// Workers that consumed this model's queue in the last seconds.
    #[serde(default)]
    pub workers: Vec<String>,
}

pub(crate) mod rfc3339_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;

    pub fn to_string(ms: i64) -> String {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default()
    }

    pub fn parse(s: &str) -> Result<i64, String> {
        time::OffsetDateTime::parse(s, &Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|e| e.to_string())
    }

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_string(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => s.serialize_some(&to_string(*ms)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            Option::<String>::deserialize(d)?.map(|s| parse(&s).map_err(serde::de::Error::custom)).transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_serialises_timestamps_as_rfc3339_and_round_trips() {
        let mut r = JobRecord::queued(JobId::random(), ModelName::new("m").unwrap(), 1_700_000_000_123, None);
        r.started_at = Some(1_700_000_000_200);
        r.completed_at = Some(1_700_000_000_250);
        r.derive_metrics();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["created_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["metrics"]["queue_ms"], 77);
        assert_eq!(v["metrics"]["run_ms"], 50);
        assert!(v.get("metadata").is_none());
        let back: JobRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn status_strings_round_trip() {
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Canceled,
            JobStatus::Expired,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(!JobStatus::Running.is_terminal());
        assert!(JobStatus::Expired.is_terminal());
    }
}
