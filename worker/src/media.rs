//! Jobs with binary inputs: reading each input back from the input store by its reference,
//! decoding it off the async runtime (the worker trusts nothing off the store: the same limits
//! as the gateway, and a corrupt file fails its job as `invalid_input`), and running it — a batch
//! of OCR or moderation jobs as one request to the model's thread, so their text lines or images
//! share model runs; a speech job alone, reporting each second of audio as progress and stopping
//! between stretches of audio when canceled.

use bytes::Bytes;
use image::RgbImage;
use kiln_common::store::Run;
use kiln_proto::{
    InputLimits, JobId, MediaRef, ModerationInput, ModerationOutput, OcrInput, SpeechSegmentsInput,
    SpeechSegmentsOutput, Task,
};
use tracing::Instrument;

use crate::ctx::Ctx;
use crate::errors::Failure;
use crate::images::{Produced, drain, still_running};
use crate::inference::Update;
use crate::vad::{RATE, VadOptions};

/// The canonical input of a job with a binary input, by task.
#[derive(Debug, Clone)]
pub enum MediaWork {
    Ocr(OcrInput),
    Moderation(ModerationInput),
    Speech(SpeechSegmentsInput),
}

impl MediaWork {
    fn image(&self) -> Option<&MediaRef> {
        match self {
            Self::Ocr(i) => Some(&i.image),
            Self::Moderation(i) => Some(&i.image),
            Self::Speech(_) => None,
        }
    }
}

/// The bytes of `input`, stored for `tenant`. An input the store no longer has (expired) fails
/// the job: running it again cannot bring it back.
async fn fetch(ctx: &Ctx, tenant: Option<&str>, input: &MediaRef) -> Result<Bytes, Failure> {
    let scope = kiln_common::inputs::scope(tenant);
    match ctx.backend.inputs.get(scope, &input.sha256).await {
        Ok(Some((_, bytes))) => Ok(bytes),
        Ok(None) => Err(Failure::Input(format!(
            "input {} is no longer in the input store (expired or deleted); send it again",
            input.sha256
        ))),
        Err(e) => Err(Failure::Outputs(format!("reading input {}: {e}", input.sha256))),
    }
}

/// Decodes an image on a blocking thread, within the model's limits.
async fn decode_image(bytes: Bytes, limits: &InputLimits) -> Result<RgbImage, Failure> {
    let max_pixels = limits.max_pixels;
    tokio::task::spawn_blocking(move || kiln_common::media::image::decode_image(&bytes, max_pixels))
        .await
        .map_err(|e| Failure::Inference(format!("decoding task: {e}")))?
        .map_err(|e| Failure::Input(format!("input.image {e}")))
}

/// Decodes a WAV file on a blocking thread and resamples it to the model's 16 kHz mono.
async fn decode_audio(bytes: Bytes, limits: &InputLimits) -> Result<(Vec<f32>, u32, f64), Failure> {
    let max_s = limits.max_audio_s;
    tokio::task::spawn_blocking(move || {
        let audio = kiln_common::media::audio::decode_wav(&bytes, max_s)?;
        let duration = audio.duration_s();
        let samples = kiln_common::media::audio::resample(&audio.samples, audio.rate, RATE);
        Ok((samples, audio.rate, duration))
    })
    .await
    .map_err(|e| Failure::Inference(format!("decoding task: {e}")))?
    .map_err(|e: kiln_common::media::MediaError| Failure::Input(format!("input.audio {e}")))
}

/// One job of an OCR or moderation batch, as far as the batch is concerned.
pub struct Item<'a> {
    pub tenant: Option<&'a str>,
    pub work: &'a MediaWork,
}

/// Runs a batch of OCR or moderation jobs: every input read and decoded (each failing alone),
/// then one model request for all that decoded. One result per item, in order.
pub async fn analyse(ctx: &Ctx, items: &[Item<'_>]) -> Vec<Result<Produced, Failure>> {
    let mut results: Vec<Option<Result<Produced, Failure>>> = Vec::with_capacity(items.len());
    let mut images = Vec::with_capacity(items.len());
    let mut sizes = Vec::with_capacity(items.len());
    for item in items {
        let decoded = match item.work.image() {
            Some(input) => match fetch(ctx, item.tenant, input).await {
                Ok(bytes) => decode_image(bytes, &ctx.spec.limits).await,
                Err(e) => Err(e),
            },
            None => Err(Failure::Input("not an image job".into())),
        };
        match decoded {
            Ok(image) => {
                sizes.push(image.dimensions());
                images.push(image);
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    if images.is_empty() {
        return results.into_iter().map(|r| r.expect("every item failed")).collect();
    }
    let span = tracing::info_span!("inference", model = %ctx.spec.name, images = images.len());
    // The model's task says which pipeline its thread holds (every job was parsed for it).
    let outputs: Result<Vec<String>, Failure> = match ctx.spec.task {
        Task::Ocr => ctx
            .infer
            .read(images)
            .instrument(span)
            .await
            .map_err(Failure::from)
            .map(|outs| outs.iter().map(|o| serde_json::to_string(o).expect("OCR output serialises")).collect()),
        Task::ImageModeration => ctx.infer.score(images).instrument(span).await.map_err(Failure::from).map(|scores| {
            scores
                .iter()
                .zip(&sizes)
                .map(|(&scores, &(width, height))| {
                    serde_json::to_string(&ModerationOutput { scores, width, height })
                        .expect("moderation output serialises")
                })
                .collect()
        }),
        other => Err(Failure::Input(format!("a {} model does not run image batches", other.as_str()))),
    };
    let mut outputs = match outputs {
        Ok(outputs) if outputs.len() == sizes.len() => outputs.into_iter().map(Ok).collect::<Vec<_>>(),
        Ok(outputs) => {
            let e = format!("the model gave {} results for {} images", outputs.len(), sizes.len());
            (0..sizes.len()).map(|_| Err(Failure::Inference(e.clone()))).collect()
        }
        Err(e) => (0..sizes.len()).map(|_| Err(e.clone())).collect(),
    }
    .into_iter();
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| outputs.next().expect("one output per decoded image").map(Produced::Output)))
        .collect()
}

/// Runs a speech job to the end, or until it is canceled between stretches of audio.
pub async fn speech(
    ctx: &Ctx,
    id: JobId,
    run: Run,
    tenant: Option<&str>,
    input: &SpeechSegmentsInput,
) -> Result<Produced, Failure> {
    let bytes = fetch(ctx, tenant, &input.audio).await?;
    let (samples, sample_rate, duration_s) = decode_audio(bytes, &ctx.spec.limits).await?;
    let span = tracing::info_span!("inference", model = %ctx.spec.name, audio_s = duration_s);
    let mut job = ctx.infer.speech(samples, VadOptions::from(input)).instrument(span).await?;
    let mut segments = None;
    let mut stopped = false;
    loop {
        let Some(update) = job.updates.recv().await else {
            return Err(Failure::Inference("inference thread stopped".into()));
        };
        match update {
            Update::Step { done, total } => {
                let go_on = still_running(ctx, id, run, done, total).await;
                stopped |= !go_on;
                job.proceed(go_on);
            }
            Update::Segments(found) => segments = Some(found),
            Update::Finished(Err(e)) => return Err(e.into()),
            Update::Finished(Ok(())) => {
                return match segments {
                    Some(segments) if !stopped => {
                        let output = SpeechSegmentsOutput { segments, duration_s, sample_rate };
                        Ok(Produced::Output(serde_json::to_string(&output).expect("segments serialise")))
                    }
                    _ => Ok(Produced::Stopped),
                };
            }
            Update::Image { .. } | Update::Withheld { .. } => {
                job.proceed(false);
                drain(&mut job.updates).await;
                return Err(Failure::Inference("a speech job got images".into()));
            }
        }
    }
}
