//! The Kiln worker: loads each served model onto an inference thread, consumes its queue, batches
//! jobs, runs them and stores results before acknowledging.

mod batch;
pub mod config;
mod consumer;
mod ctx;
pub mod diffusion;
mod embedding;
mod errors;
mod events;
mod gpu;
mod health;
mod images;
mod inference;
mod job;
mod lanes;
mod lease;
mod media;
pub mod moderation;
mod noise;
pub mod ocr;
pub mod planner;
mod pool;
mod render;
pub mod runtime;
mod terrain;
pub mod vad;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_common::Backend;
use kiln_common::assets::{self, AssetError};
use kiln_common::models::{ModelRepository, ModelSpec};
use kiln_proto::Task;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Auto, WorkerConfig};
pub use embedding::{Embedded, PipelineError, pool as pool_embedding};
pub use inference::{ImageRun, ImageWork, InferenceHandle, Pipeline, Screen, Update};
pub use runtime::{RuntimeError, Threads};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("model {model}: {reason}")]
    Model { model: String, reason: String },
    #[error("{0}")]
    Config(String),
}

/// Resolves the ONNX Runtime library: the configured path, `ORT_DYLIB_PATH`, or the pinned build
/// fetched into `cache_dir`.
pub fn resolve_onnxruntime(config: &WorkerConfig, cache_dir: &Path) -> Result<PathBuf, WorkerError> {
    let configured = config.ort_dylib_path.clone().or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
    match configured {
        Some(p) if p.is_absolute() => Ok(p),
        Some(p) => Err(WorkerError::Config(format!("the ONNX Runtime library path {} must be absolute", p.display()))),
        None => Ok(assets::ensure_onnxruntime(cache_dir)?),
    }
}

/// How a model's sessions are laid out over the machine and its batches bounded; `None` is `auto`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    pub sessions: Auto,
    pub threads: Auto,
    pub spin: bool,
    /// Texts per model run at most; default: the model's `max_batch`.
    pub max_batch: Option<usize>,
    pub max_batch_tokens: Auto,
}

impl Layout {
    pub fn from_config(config: &WorkerConfig) -> Self {
        Self {
            sessions: config.sessions,
            threads: config.intra_threads,
            spin: config.ort_spin,
            max_batch: config.max_batch,
            max_batch_tokens: config.max_batch_tokens,
        }
    }

    /// One session of `threads`.
    pub fn single(threads: Threads) -> Self {
        Self { sessions: Some(1), threads: Some(threads.intra), spin: threads.spin, ..Self::default() }
    }

    /// The CPU layout: the narrow sessions (count × threads) and the wide session's threads, if any.
    fn cpu(&self, cores: usize) -> ((usize, usize), Option<usize>) {
        match (self.sessions, self.threads) {
            (Some(s), Some(t)) => ((s, t), None),
            (Some(s), None) => ((s, (cores / s).max(1)), None),
            (None, Some(t)) => (((cores / t).max(1), t), None),
            (None, None) if cores <= 1 => ((1, 1), None),
            (None, None) => {
                let n = cores.min(4);
                ((n, cores / n), Some(cores))
            }
        }
    }
}

/// Fetches the model's files if they come from a package, then loads it with one session of
/// `threads` (see [`load_model_with`]).
pub fn load_model(
    spec: &ModelSpec,
    dylib: &Path,
    cache_dir: &Path,
    threads: Threads,
) -> Result<InferenceHandle, WorkerError> {
    load_model_with(spec, dylib, cache_dir, Layout::single(threads))
}

/// Fetches the model's files if they come from a package, then loads it: an embedding model into
/// a pool of sessions laid out by `layout`, an image model onto an inference thread.
pub fn load_model_with(
    spec: &ModelSpec,
    dylib: &Path,
    cache_dir: &Path,
    layout: Layout,
) -> Result<InferenceHandle, WorkerError> {
    let model_err = |reason: String| WorkerError::Model { model: spec.name.to_string(), reason };
    if let Some(source) = &spec.source {
        assets::ensure(source, &spec.dir(cache_dir))?;
    }
    let env = runtime::environment(dylib)?;
    let file =
        |logical: &str| spec.file(cache_dir, logical).ok_or_else(|| model_err(format!("files.{logical} is not set")));
    let cores = runtime::default_threads();
    let image_threads = Threads { intra: layout.threads.unwrap_or(cores), spin: layout.spin };
    match spec.task {
        Task::Embedding => {
            let emb = spec
                .embedding
                .clone()
                .ok_or_else(|| model_err("an embedding model needs an [embedding] section".into()))?;
            let text = embedding::TextEncoder::new(&file("tokenizer")?, &emb).map_err(model_err)?;
            embedding_pool(spec, env, &file("model")?, emb, text, layout, cores)
        }
        Task::ImageGeneration => {
            let loaded = runtime::load_session(env, &file("model")?, &spec.execution_providers, image_threads)?;
            let pipeline =
                terrain::TerrainPipeline::new(loaded.session, spec.consistency.clone()).map_err(model_err)?;
            let screen = screen(spec, env, cache_dir, image_threads)?;
            spawn(spec, Pipeline::Terrain(pipeline), screen, loaded.provider, image_threads)
        }
        Task::TextToImage => {
            let dir = spec.dir(cache_dir);
            let (pipeline, provider) =
                diffusion::DiffusionPipeline::load(&dir, env, &spec.execution_providers, image_threads)
                    .map_err(model_err)?;
            let screen = screen(spec, env, cache_dir, image_threads)?;
            spawn(spec, Pipeline::Diffusion(Box::new(pipeline)), screen, provider, image_threads)
        }
        Task::Ocr => {
            let (pipeline, provider) =
                ocr::OcrPipeline::load(spec, cache_dir, env, image_threads).map_err(model_err)?;
            spawn(spec, Pipeline::Ocr(Box::new(pipeline)), None, provider, image_threads)
        }
        Task::ImageModeration => {
            let (pipeline, provider) =
                moderation::ModerationPipeline::load(&file("model")?, env, &spec.execution_providers, image_threads)
                    .map_err(model_err)?;
            spawn(spec, Pipeline::Moderation(pipeline), None, provider, image_threads)
        }
        Task::SpeechSegments => {
            let (pipeline, provider) =
                vad::VadPipeline::load(&file("model")?, env, &spec.execution_providers, image_threads)
                    .map_err(model_err)?;
            spawn(spec, Pipeline::Vad(pipeline), None, provider, image_threads)
        }
    }
}

/// The moderation of an image model that has a `[moderation]` section: the named model, from the
/// same repository (fetched when it comes from a package), on the image model's thread.
fn screen(
    spec: &ModelSpec,
    env: &ort::environment::Environment,
    cache_dir: &Path,
    threads: Threads,
) -> Result<Option<Screen>, WorkerError> {
    let Some(m) = &spec.moderation else { return Ok(None) };
    let model_err = |reason: String| WorkerError::Model { model: spec.name.to_string(), reason };
    let repo = match spec.folder.as_deref().and_then(Path::parent) {
        Some(dir) => ModelRepository::load(dir),
        None => ModelRepository::builtin(),
    }
    .map_err(|e| model_err(format!("reading its moderation model: {e}")))?;
    let moderator = repo
        .get(&m.model)
        .filter(|s| s.task == Task::ImageModeration)
        .ok_or_else(|| model_err(format!("moderation.model {:?} is not an image-moderation model here", m.model)))?;
    if let Some(source) = &moderator.source {
        assets::ensure(source, &moderator.dir(cache_dir))?;
    }
    let file = moderator
        .file(cache_dir, "model")
        .ok_or_else(|| model_err(format!("moderation model {} has no files.model", m.model)))?;
    let (pipeline, _) = moderation::ModerationPipeline::load(&file, env, &moderator.execution_providers, threads)
        .map_err(|e| model_err(format!("loading its moderation model {}: {e}", m.model)))?;
    Ok(Some(Screen { pipeline, threshold: m.threshold }))
}

/// Builds an embedding model's sessions (sharing their pre-packed weights) and starts its pool.
fn embedding_pool(
    spec: &ModelSpec,
    env: &ort::environment::Environment,
    model: &Path,
    emb: kiln_common::models::EmbeddingSpec,
    text: embedding::TextEncoder,
    layout: Layout,
    cores: usize,
) -> Result<InferenceHandle, WorkerError> {
    let model_err = |reason: String| WorkerError::Model { model: spec.name.to_string(), reason };
    let weights = ort::session::builder::PrepackedWeights::new();
    let ((narrow_n, narrow_t), wide_t) = layout.cpu(cores);
    let threads = |intra: usize| Threads { intra, spin: layout.spin };
    // The first session says which provider runs; a GPU gets one session unless told otherwise.
    let first = runtime::load_pool_session(
        env,
        model,
        &spec.execution_providers,
        threads(wide_t.unwrap_or(narrow_t)),
        &weights,
    )?;
    let provider = first.provider;
    let pad = text.pad_id();
    let encoder = |session| embedding::Encoder::new(session, emb.clone(), pad).map_err(model_err);
    let on_gpu = provider != kiln_common::models::ExecutionProvider::Cpu;
    let (narrow_n, wide_t) = if on_gpu { (layout.sessions.unwrap_or(1), None) } else { (narrow_n, wide_t) };
    let mut wide = None;
    let mut narrow = Vec::with_capacity(narrow_n);
    match wide_t {
        Some(t) => wide = Some(pool::SessionClass { encoders: vec![encoder(first.session)?], threads: t }),
        None => narrow.push(encoder(first.session)?),
    }
    while narrow.len() < narrow_n {
        let s = runtime::load_pool_session(env, model, &[provider], threads(narrow_t), &weights)?;
        narrow.push(encoder(s.session)?);
    }
    let limits = planner::Limits {
        max_batch: layout.max_batch.unwrap_or(spec.max_batch).max(1),
        max_batch_tokens: layout.max_batch_tokens.unwrap_or(if on_gpu { 16384 } else { 2048 }),
    };
    let described = match wide_t {
        Some(t) => format!("1x{t} alone, {narrow_n}x{narrow_t} under load"),
        None => format!("{narrow_n}x{narrow_t}"),
    };
    events::pool_started(spec, provider, &described, limits);
    let pool_spec = pool::PoolSpec {
        model: spec.name.clone(),
        calibration_key: format!("{}|{provider:?}|{described}|{limits:?}|{}", model.display(), layout.spin),
        limits,
        narrow: pool::SessionClass { encoders: narrow, threads: narrow_t },
        wide,
        cores,
    };
    let pool = pool::EmbeddingPool::start(pool_spec, text)
        .map_err(|e| model_err(format!("cannot start its inference threads: {e}")))?;
    Ok(InferenceHandle::pool(pool, provider))
}

fn spawn(
    spec: &ModelSpec,
    pipeline: Pipeline,
    screen: Option<Screen>,
    provider: kiln_common::models::ExecutionProvider,
    threads: Threads,
) -> Result<InferenceHandle, WorkerError> {
    events::model_loaded(spec, provider, threads);
    InferenceHandle::spawn(spec, pipeline, screen, provider).map_err(|e| WorkerError::Model {
        model: spec.name.to_string(),
        reason: format!("cannot start its inference thread: {e}"),
    })
}

/// Loads the served models and consumes their queues until `shutdown` is cancelled; then stops
/// taking jobs, lets the batches in hand finish (bounded by the drain timeout) and returns.
/// Deliveries not started go back to the queue as their consumers close.
pub async fn run(
    config: WorkerConfig,
    backend: Backend,
    repo: ModelRepository,
    cache_dir: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    kiln_common::telemetry::prometheus();
    let repo = repo.select(&config.models).map_err(WorkerError::Config)?;
    let dylib = {
        let (config, cache_dir) = (config.clone(), cache_dir.clone());
        tokio::task::spawn_blocking(move || resolve_onnxruntime(&config, &cache_dir)).await.expect("fetch task")?
    };
    let layout = Layout::from_config(&config);
    let health = health::Health::new(config.liveness_grace);
    let tracker = TaskTracker::new();
    // Probes and the reaper outlive the drain of the consume loops.
    let background = CancellationToken::new();
    if let Some(addr) = config.health_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| WorkerError::Config(format!("cannot listen on {addr}: {e}")))?;
        tokio::spawn(health::serve(listener, health.clone(), background.clone()));
    }
    let owner = format!("{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let lease = lease::LeasePolicy { after: config.lease_after, ttl: config.lease_ttl };
    let retry =
        errors::RetryPolicy { max_attempts: config.max_attempts, base: config.retry_base, max: config.retry_max };
    tokio::spawn(lease::reap(backend.clone(), lease, background.clone()));
    tokio::spawn(gpu::report(background.clone()));
    let config = Arc::new(config);
    for spec in repo.iter().cloned() {
        let infer = {
            let (spec, dylib, cache_dir) = (spec.clone(), dylib.clone(), cache_dir.clone());
            tokio::task::spawn_blocking(move || load_model_with(&spec, &dylib, &cache_dir, layout))
                .await
                .expect("load task")?
        };
        let ctx = ctx::Ctx {
            spec,
            infer,
            backend: backend.clone(),
            config: config.clone(),
            retry,
            lease,
            owner: owner.clone(),
            health: health.clone(),
        };
        tracker.spawn(consumer::consume(ctx, shutdown.clone()));
    }
    shutdown.cancelled().await;
    events::draining(config.drain_timeout);
    kiln_common::shutdown::drain(&tracker, config.drain_timeout).await;
    background.cancel();
    Ok(())
}
