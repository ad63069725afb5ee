//! Inference off the async runtime. An embedding model is served by its pool of sessions
//! ([`crate::pool`]); an image model's pipeline lives on a thread of its own, fed by a bounded
//! channel, and every request carries its reply channel and its tracing span.
//!
//! Image jobs talk back while they run: after each image (or denoising step) the thread sends an
//! [`Update`] and waits for the job's driver to say go on or stop — that handshake is what makes
//! progress exact and cancellation take effect between images, never mid-image. A speech job
//! does the same between stretches of audio. OCR and moderation batches are one request each:
//! every image of the batch in, one result per image out.

use std::sync::mpsc as sync_mpsc;

use image::RgbImage;
use kiln_common::models::{ExecutionProvider, ModelSpec};
use kiln_proto::{ImageGenerationInput, ModerationScores, OcrOutput, Scheduler, SpeechSegment, TextToImageInput};
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use crate::diffusion::{DiffusionPipeline, DiffusionRequest, SchedulerKind};
use crate::embedding::{Embedded, PipelineError};
use crate::moderation::ModerationPipeline;
use crate::ocr::OcrPipeline;
use crate::pool::EmbeddingPool;
use crate::terrain::TerrainPipeline;
use crate::vad::{VadOptions, VadPipeline};

/// A model that runs on a thread of its own, by task.
pub enum Pipeline {
    Terrain(TerrainPipeline),
    Diffusion(Box<DiffusionPipeline>),
    Ocr(Box<OcrPipeline>),
    Moderation(ModerationPipeline),
    Vad(VadPipeline),
}

/// An image model's moderation: the `image-moderation` model that scores each image of a job
/// that asked for it, and the `nsfw` score over which an image is withheld.
pub struct Screen {
    pub pipeline: ModerationPipeline,
    pub threshold: f32,
}

/// The images of one job.
#[derive(Debug, Clone)]
pub enum ImageWork {
    Terrain(ImageGenerationInput),
    TextToImage(TextToImageInput),
}

impl ImageWork {
    /// The seed of image `index`: image i of seed s is image 0 of seed s+i, so any image of a job
    /// can be made again alone. The one place this rule lives.
    pub fn image_seed(&self, index: u32) -> u64 {
        let seed = match self {
            Self::Terrain(i) => i.seed,
            Self::TextToImage(i) => i.seed,
        };
        seed.wrapping_add(u64::from(index))
    }

    /// The job's seed, image count, denoising steps per image, and image size.
    pub fn shape(&self) -> (u64, u32, u32, (u32, u32)) {
        match self {
            Self::Terrain(i) => (i.seed, i.count, 1, (i.width, i.height)),
            Self::TextToImage(i) => (i.seed, i.count, i.steps, (i.width, i.height)),
        }
    }
}

/// What an image job's thread reports as it goes.
pub enum Update {
    /// A denoising step: `done` of `total` steps over all of the job's images.
    Step { done: u32, total: u32 },
    /// Image `index` is ready; `moderation` holds its scores when the job asked for them.
    Image { index: u32, seed: u64, width: u32, height: u32, png: Vec<u8>, moderation: Option<ModerationScores> },
    /// Image `index` was made but withheld: its `nsfw` score passed the threshold.
    Withheld { index: u32, seed: u64, moderation: ModerationScores, threshold: f32 },
    /// A speech job's segments, sent just before `Finished(Ok)` when it ran to the end.
    Segments(Vec<SpeechSegment>),
    /// The end: all images made, stopped when told to, or failed.
    Finished(Result<(), PipelineError>),
}

enum Request {
    Images {
        work: ImageWork,
        first: u32,
        updates: mpsc::Sender<Update>,
        go: sync_mpsc::Receiver<bool>,
        span: Span,
    },
    Read {
        images: Vec<RgbImage>,
        reply: oneshot::Sender<Result<Vec<OcrOutput>, PipelineError>>,
        span: Span,
    },
    Score {
        images: Vec<RgbImage>,
        reply: oneshot::Sender<Result<Vec<ModerationScores>, PipelineError>>,
        span: Span,
    },
    Speech {
        audio: Vec<f32>,
        opts: VadOptions,
        updates: mpsc::Sender<Update>,
        go: sync_mpsc::Receiver<bool>,
        span: Span,
    },
}

/// The async side of a model's inference: its session pool, or its image pipeline's thread. The
/// threads end when the last handle is dropped.
#[derive(Clone)]
pub struct InferenceHandle {
    inner: Inner,
    pub provider: ExecutionProvider,
}

#[derive(Clone)]
enum Inner {
    Pool(std::sync::Arc<EmbeddingPool>),
    Thread(mpsc::Sender<Request>),
}

/// A running image job, seen from its driver: read [`Update`]s, answer each but the last with
/// [`ImageRun::proceed`].
pub struct ImageRun {
    pub updates: mpsc::Receiver<Update>,
    go: sync_mpsc::SyncSender<bool>,
}

impl ImageRun {
    /// Lets the thread go on (`true`) or stop before the next image or step (`false`).
    pub fn proceed(&self, go_on: bool) {
        let _ = self.go.send(go_on);
    }
}

impl InferenceHandle {
    /// An embedding model's running pool.
    pub fn pool(pool: EmbeddingPool, provider: ExecutionProvider) -> Self {
        Self { inner: Inner::Pool(std::sync::Arc::new(pool)), provider }
    }

    /// Moves `pipeline` (with the moderation `screen` of an image model) onto a new thread.
    pub fn spawn(
        spec: &ModelSpec,
        mut pipeline: Pipeline,
        mut screen: Option<Screen>,
        provider: ExecutionProvider,
    ) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        let max_batch = spec.max_batch;
        std::thread::Builder::new().name(format!("infer-{}", spec.name)).spawn(move || {
            while let Some(req) = rx.blocking_recv() {
                match req {
                    Request::Images { work, first, updates, go, span } => {
                        let _enter = span.enter();
                        let result = run_images(&mut pipeline, screen.as_mut(), work, first, &updates, &go);
                        let _ = updates.blocking_send(Update::Finished(result));
                    }
                    Request::Read { images, reply, span } => {
                        let _enter = span.enter();
                        let result = match &mut pipeline {
                            Pipeline::Ocr(p) => p.read(&images),
                            _ => Err(wrong_task("ocr")),
                        };
                        let _ = reply.send(result);
                    }
                    Request::Score { images, reply, span } => {
                        let _enter = span.enter();
                        let result = match &mut pipeline {
                            Pipeline::Moderation(p) => p.score(&images, max_batch),
                            _ => Err(wrong_task("image-moderation")),
                        };
                        let _ = reply.send(result);
                    }
                    Request::Speech { audio, opts, updates, go, span } => {
                        let _enter = span.enter();
                        let result = run_speech(&mut pipeline, &audio, &opts, &updates, &go);
                        let _ = updates.blocking_send(Update::Finished(result));
                    }
                }
            }
        })?;
        Ok(Self { inner: Inner::Thread(tx), provider })
    }

    /// Embeds `texts` of `tenant` (batched with other requests by the pool, in fair order among
    /// tenants); vectors and token counts in the order given.
    pub async fn embed(&self, texts: Vec<String>, tenant: Option<&str>) -> Result<Embedded, PipelineError> {
        match &self.inner {
            Inner::Pool(pool) => pool.embed(texts, tenant).await,
            Inner::Thread(_) => Err(wrong_task("embedding")),
        }
    }

    /// Starts an image job on the model's thread, at image `first` (those before are made).
    pub async fn images(&self, work: ImageWork, first: u32) -> Result<ImageRun, PipelineError> {
        let (updates_tx, updates) = mpsc::channel(1);
        let (go, go_rx) = sync_mpsc::sync_channel(1);
        let req = Request::Images { work, first, updates: updates_tx, go: go_rx, span: Span::current() };
        self.send(req, "image").await?;
        Ok(ImageRun { updates, go })
    }

    /// Reads the text of every image (one OCR batch), one output per image in order.
    pub async fn read(&self, images: Vec<RgbImage>) -> Result<Vec<OcrOutput>, PipelineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Read { images, reply, span: Span::current() }, "ocr").await?;
        rx.await.map_err(|_| gone())?
    }

    /// Scores every image (one moderation batch), one score per image in order.
    pub async fn score(&self, images: Vec<RgbImage>) -> Result<Vec<ModerationScores>, PipelineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Score { images, reply, span: Span::current() }, "image-moderation").await?;
        rx.await.map_err(|_| gone())?
    }

    /// Starts a speech job on the model's thread: `audio` is mono at 16 kHz. Progress comes as
    /// `Step`s of whole seconds of audio; the segments as `Segments`, then `Finished`.
    pub async fn speech(&self, audio: Vec<f32>, opts: VadOptions) -> Result<ImageRun, PipelineError> {
        let (updates_tx, updates) = mpsc::channel(1);
        let (go, go_rx) = sync_mpsc::sync_channel(1);
        let req = Request::Speech { audio, opts, updates: updates_tx, go: go_rx, span: Span::current() };
        self.send(req, "speech-segments").await?;
        Ok(ImageRun { updates, go })
    }

    async fn send(&self, req: Request, task: &str) -> Result<(), PipelineError> {
        let Inner::Thread(tx) = &self.inner else { return Err(wrong_task(task)) };
        tx.send(req).await.map_err(|_| gone())
    }
}

fn gone() -> PipelineError {
    PipelineError::Inference("inference thread stopped".into())
}

fn wrong_task(task: &str) -> PipelineError {
    PipelineError::Input(format!("this model does not serve {task} jobs"))
}

/// Runs an image job, one image at a time, reporting each and stopping when told to. A driver
/// that went away counts as "stop".
fn run_images(
    pipeline: &mut Pipeline,
    mut screen: Option<&mut Screen>,
    work: ImageWork,
    first: u32,
    updates: &mpsc::Sender<Update>,
    go: &sync_mpsc::Receiver<bool>,
) -> Result<(), PipelineError> {
    let report = |u: Update| updates.blocking_send(u).is_ok() && go.recv().unwrap_or(false);
    let moderate = match &work {
        ImageWork::Terrain(i) => i.moderate,
        ImageWork::TextToImage(_) => false,
    };
    if moderate && screen.is_none() {
        return Err(PipelineError::Input("this model has no moderation model ([moderation] in its kiln.toml)".into()));
    }
    let mut made = |index: u32, seed: u64, width: u32, height: u32, png: Vec<u8>| -> Result<Update, PipelineError> {
        let Some(screen) = screen.as_deref_mut().filter(|_| moderate) else {
            return Ok(Update::Image { index, seed, width, height, png, moderation: None });
        };
        let pixels = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
            .map_err(|e| PipelineError::Inference(format!("reading back image {index} to moderate it: {e}")))?
            .to_rgb8();
        let scores = screen.pipeline.score(std::slice::from_ref(&pixels), 1)?;
        let moderation =
            scores.first().copied().ok_or_else(|| PipelineError::Inference("no moderation score".into()))?;
        Ok(if moderation.nsfw > screen.threshold {
            Update::Withheld { index, seed, moderation, threshold: screen.threshold }
        } else {
            Update::Image { index, seed, width, height, png, moderation: Some(moderation) }
        })
    };
    match (pipeline, &work) {
        (Pipeline::Terrain(p), ImageWork::Terrain(input)) => {
            for index in first..input.count {
                let seed = work.image_seed(index);
                let field = p.heights(seed, input.difficulty)?;
                let png = field.resample(input.width as usize, input.height as usize).png(input.colormap);
                let image = made(index, seed, input.width, input.height, png)?;
                if !report(image) {
                    break;
                }
            }
            Ok(())
        }
        (Pipeline::Diffusion(p), ImageWork::TextToImage(input)) => {
            let total = input.count * input.steps;
            for index in first..input.count {
                let seed = work.image_seed(index);
                let req = DiffusionRequest {
                    prompt: &input.prompt,
                    negative_prompt: &input.negative_prompt,
                    steps: input.steps,
                    guidance_scale: input.guidance_scale,
                    scheduler: match input.scheduler {
                        Scheduler::Euler => SchedulerKind::Euler,
                        Scheduler::Ddim => SchedulerKind::Ddim,
                    },
                    seed,
                    width: input.width,
                    height: input.height,
                };
                let base = index * input.steps;
                let mut on_step = |done: u32, _: u32| report(Update::Step { done: base + done, total });
                let Some(image) = p.generate(&req, &mut on_step)? else { break };
                let png = crate::render::rgb_png(image.width as usize, image.height as usize, &image.pixels);
                let image = made(index, seed, image.width, image.height, png)?;
                if !report(image) {
                    break;
                }
            }
            Ok(())
        }
        (_, ImageWork::Terrain(_)) => Err(wrong_task("image-generation")),
        (_, ImageWork::TextToImage(_)) => Err(wrong_task("text-to-image")),
    }
}

/// Runs a speech job, reporting each whole second of audio heard and stopping when told to.
fn run_speech(
    pipeline: &mut Pipeline,
    audio: &[f32],
    opts: &VadOptions,
    updates: &mpsc::Sender<Update>,
    go: &sync_mpsc::Receiver<bool>,
) -> Result<(), PipelineError> {
    let Pipeline::Vad(p) = pipeline else { return Err(wrong_task("speech-segments")) };
    const RATE: usize = crate::vad::RATE as usize;
    let total = audio.len().div_ceil(RATE) as u32;
    let mut reported = 0;
    let mut on_chunk = |done: usize, _: usize| {
        let second = (done / RATE) as u32;
        if second <= reported {
            return true;
        }
        reported = second;
        updates.blocking_send(Update::Step { done: second, total }).is_ok() && go.recv().unwrap_or(false)
    };
    if let Some(segments) = p.segments(audio, opts, &mut on_chunk)? {
        let _ = updates.blocking_send(Update::Segments(segments));
    }
    Ok(())
}
