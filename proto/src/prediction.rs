//! Jobs as Replicate predictions: the status names, the prediction object a job is shown as (by
//! the predictions API and in its webhooks), and what a job keeps so that it can be shown so
//! where no request is at hand (a webhook delivery).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::rfc3339_millis;
use crate::{JobRecord, JobStatus, now_millis};

/// The owner every Kiln model is published under on the predictions API (`kiln/<model>`).
pub const OWNER: &str = "kiln";

/// What showing a job as a prediction needs beyond its record: the absolute base of its URLs and
/// its model's version. Kept with a job whose webhook sends predictions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PredictionView {
    /// `scheme://host[:port]`, no trailing slash.
    pub base_url: String,
    pub version: String,
}

/// Replicate's prediction statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PredictionStatus {
    Starting,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl PredictionStatus {
    /// Kiln's status as Replicate names it: a queued job is `starting` (it waits for a worker, as
    /// a Replicate prediction waits for its model to boot), a running one `processing`, and an
    /// expired one (its deadline or `Cancel-After` passed before it started) `canceled`.
    pub fn of(status: JobStatus) -> Self {
        match status {
            JobStatus::Queued => Self::Starting,
            JobStatus::Running => Self::Processing,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Canceled | JobStatus::Expired => Self::Canceled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        match self {
            Self::Starting | Self::Processing => false,
            Self::Succeeded | Self::Failed | Self::Canceled => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PredictionMetrics {
    /// Seconds the (last) run took, once it finished.
    pub predict_time: Option<f64>,
    /// Seconds from creation to completion.
    pub total_time: Option<f64>,
}

/// Absolute, under `KILN_PUBLIC_URL` or the request's origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PredictionUrls {
    pub get: String,
    pub cancel: String,
    /// Kiln's server-sent events of the job (`status`, `progress`, `completed`).
    pub stream: String,
}

/// A job shown as a Replicate prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Prediction {
    pub id: String,
    /// `kiln/<model>`.
    pub model: String,
    pub version: String,
    /// queued: starting; running: processing; expired (not started by its deadline or
    /// `Cancel-After`): canceled.
    pub status: PredictionStatus,
    /// The canonical input (defaults filled in): on the answer to a create; none later, as the
    /// job record does not keep it.
    pub input: Option<Value>,
    /// File outputs (generated images) as a list of absolute URLs; any other output as it is.
    pub output: Option<Value>,
    pub logs: String,
    pub error: Option<String>,
    pub metrics: PredictionMetrics,
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub created_at: String,
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub started_at: Option<String>,
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub completed_at: Option<String>,
    pub urls: PredictionUrls,
    pub source: String,
    pub data_removed: bool,
}

impl Prediction {
    /// `record` as a prediction, its URLs under `view.base_url`.
    pub fn of(record: &JobRecord, view: &PredictionView, input: Option<Value>) -> Self {
        let base = view.base_url.trim_end_matches('/');
        let id = record.id.to_string();
        let seconds = |from: i64, to: i64| (to - from).max(0) as f64 / 1000.0;
        let predict_time = record.started_at.zip(record.completed_at).map(|(s, c)| seconds(s, c));
        Self {
            model: format!("{OWNER}/{}", record.model),
            version: view.version.clone(),
            status: PredictionStatus::of(record.status),
            input,
            output: record.output.as_ref().map(|o| output(o, base)),
            logs: logs(record),
            error: record.error.as_ref().map(|e| e.message.clone()),
            metrics: PredictionMetrics {
                predict_time,
                total_time: record.completed_at.map(|c| seconds(record.created_at, c)),
            },
            created_at: rfc3339_millis::to_string(record.created_at),
            started_at: record.started_at.map(rfc3339_millis::to_string),
            completed_at: record.completed_at.map(rfc3339_millis::to_string),
            urls: PredictionUrls {
                get: format!("{base}/v1/predictions/{id}"),
                cancel: format!("{base}/v1/predictions/{id}/cancel"),
                stream: format!("{base}/v1/jobs/{id}/events"),
            },
            source: "api".into(),
            data_removed: false,
            id,
        }
    }

    /// Whether a job with a `Cancel-After` is past it, unfinished: it is to be canceled now.
    pub fn overdue(record: &JobRecord) -> bool {
        !record.status.is_terminal() && record.cancel_at.is_some_and(|at| at <= now_millis())
    }
}

/// An output as a prediction's: the files of an image output (`{"images": [{url, ..}], ..}`) as
/// their absolute URLs, anything else unchanged.
fn output(output: &Value, base: &str) -> Value {
    let Some(images) = output.get("images").and_then(Value::as_array) else { return output.clone() };
    let urls: Option<Vec<Value>> = images
        .iter()
        .map(|image| {
            let url = image.get("url")?.as_str()?;
            Some(Value::String(if url.starts_with('/') { format!("{base}{url}") } else { url.to_owned() }))
        })
        .collect();
    urls.map_or_else(|| output.clone(), Value::Array)
}

/// A few lines of what happened to the job. Progress is written the way `tqdm` draws it
/// (` 50%|█████     | 2/4`), which Replicate's clients parse into `prediction.progress`.
fn logs(record: &JobRecord) -> String {
    let mut lines = vec!["queued".to_owned()];
    if record.started_at.is_some() {
        lines.push(format!("started (attempt {})", record.attempts.max(1)));
    }
    let step = |k: &str| record.progress.as_ref().and_then(|p| p.get(k)).and_then(Value::as_u64);
    if let (Some(step), Some(total)) = (step("step"), step("total"))
        && total > 0
    {
        let done = (step.min(total) * 10 / total) as usize;
        let bar = format!("{}{}", "█".repeat(done), " ".repeat(10 - done));
        lines.push(format!("{:3}%|{bar}| {step}/{total}", step.min(total) * 100 / total));
    }
    if record.status.is_terminal() {
        let how = match &record.error {
            Some(e) => format!("{}: {}", record.status.as_str(), e.message),
            None => record.status.as_str().to_owned(),
        };
        lines.push(how);
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, JobError, JobId, ModelName};

    fn view() -> PredictionView {
        PredictionView { base_url: "https://kiln.example.com/".into(), version: "0.4.2".into() }
    }

    #[test]
    fn every_kiln_status_has_a_replicate_name() {
        let cases = [
            (JobStatus::Queued, "starting"),
            (JobStatus::Running, "processing"),
            (JobStatus::Succeeded, "succeeded"),
            (JobStatus::Failed, "failed"),
            (JobStatus::Canceled, "canceled"),
            (JobStatus::Expired, "canceled"),
        ];
        for (kiln, replicate) in cases {
            let s = PredictionStatus::of(kiln);
            assert_eq!(s.as_str(), replicate);
            assert_eq!(serde_json::to_value(s).unwrap(), replicate);
            assert_eq!(s.is_terminal(), kiln.is_terminal(), "{kiln:?}");
        }
    }

    #[test]
    fn a_finished_image_job_has_absolute_file_urls_metrics_and_logs() {
        let id = JobId::random();
        let mut r = JobRecord::queued(id, ModelName::new("terrain-diffusion").unwrap(), 1_700_000_000_000, None);
        r.status = JobStatus::Succeeded;
        r.attempts = 1;
        r.started_at = Some(1_700_000_000_500);
        r.completed_at = Some(1_700_000_002_000);
        r.progress = Some(serde_json::json!({ "step": 2, "total": 4 }));
        r.output = Some(serde_json::json!({ "images": [
            { "name": "0.png", "url": format!("/v1/jobs/{id}/outputs/0.png") },
            { "name": "1.png", "url": "https://cdn.example.com/1.png" },
        ], "seed": 3 }));
        let p = Prediction::of(&r, &view(), None);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["model"], "kiln/terrain-diffusion");
        assert_eq!(v["version"], "0.4.2");
        assert_eq!(v["status"], "succeeded");
        assert_eq!(
            v["output"],
            serde_json::json!([
                format!("https://kiln.example.com/v1/jobs/{id}/outputs/0.png"),
                "https://cdn.example.com/1.png"
            ])
        );
        assert_eq!(v["metrics"]["predict_time"], 1.5);
        assert_eq!(v["metrics"]["total_time"], 2.0);
        assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["urls"]["get"], format!("https://kiln.example.com/v1/predictions/{id}"));
        assert_eq!(v["urls"]["cancel"], format!("https://kiln.example.com/v1/predictions/{id}/cancel"));
        assert_eq!(v["urls"]["stream"], format!("https://kiln.example.com/v1/jobs/{id}/events"));
        assert!(p.logs.contains(" 50%|█████     | 2/4"), "{}", p.logs);
        assert!(p.logs.ends_with("succeeded"), "{}", p.logs);
    }

    #[test]
    fn other_outputs_are_unchanged_and_errors_are_their_message() {
        let mut r = JobRecord::queued(JobId::random(), ModelName::new("m").unwrap(), 0, None);
        r.status = JobStatus::Failed;
        r.output = Some(serde_json::json!({ "embeddings": [[1.0]], "dim": 1 }));
        r.error = Some(JobError { code: ErrorCode::InferenceFailed, message: "boom".into() });
        let p = Prediction::of(&r, &view(), Some(serde_json::json!({ "text": "x" })));
        assert_eq!(p.output, r.output);
        assert_eq!(p.error.as_deref(), Some("boom"));
        assert_eq!(p.input, Some(serde_json::json!({ "text": "x" })));
        assert_eq!(p.metrics.predict_time, None);
        assert!(p.logs.ends_with("failed: boom"));
    }

    #[test]
    fn only_an_unfinished_job_past_its_cancel_after_is_overdue() {
        let mut r = JobRecord::queued(JobId::random(), ModelName::new("m").unwrap(), 0, None);
        assert!(!Prediction::overdue(&r));
        r.cancel_at = Some(now_millis() - 1);
        assert!(Prediction::overdue(&r));
        r.status = JobStatus::Succeeded;
        assert!(!Prediction::overdue(&r));
        r.status = JobStatus::Running;
        r.cancel_at = Some(now_millis() + 60_000);
        assert!(!Prediction::overdue(&r));
    }
}
