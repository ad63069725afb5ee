//! Kiln's wire types, versioned JSON and nothing else: ids, job requests and records, the queue
//! envelope, task inputs and outputs, and the table of stable error codes. No I/O lives here.

mod error;
mod id;
mod job;
mod media;
mod prediction;
mod task;

pub use error::{ApiErrorBody, ErrorCode, ErrorDetail};
pub use id::{JobId, ModelName, ModelNameError};
pub use job::{
    AttemptRecord, DeadLetter, ENVELOPE_VERSION, Envelope, EnvelopeWebhook, EventKind, JobError, JobEvent, JobMetrics,
    JobRecord, JobStatus, ModelInfo, WebhookState,
};
pub use media::{FileObject, MediaKind, MediaRef, MediaSource, valid_file_id};
pub use prediction::{
    OWNER as PREDICTION_OWNER, Prediction, PredictionMetrics, PredictionStatus, PredictionUrls, PredictionView,
};
pub use task::{
    Colormap, EmbeddingInput, EmbeddingOutput, ImageGenerationInput, ImageOutput, InputError, InputLimits, MAX_SEED,
    ModerationInput, ModerationOutput, ModerationScores, OcrInput, OcrLine, OcrOutput, OutputFile, Scheduler,
    SpeechSegment, SpeechSegmentsInput, SpeechSegmentsOutput, Task, TextToImageInput, WithheldImage, json_type,
    stored_output_name,
};

/// Milliseconds since the Unix epoch, the one time representation stored and queued.
pub type UnixMillis = i64;

/// The current time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
