//! The Kiln worker: loads each served model onto an inference thread, consumes its queue, batches
//! jobs, runs them and stores results before acknowledging.

mod batch;
pub mod config;
mod consumer;
pub mod diffusion;
mod embedding;
mod errors;
mod events;
mod gpu;
mod health;
mod images;
mod inference;
mod lease;
mod noise;
mod render;
mod runtime;
mod terrain;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_common::Backend;
use kiln_common::assets::{self, AssetError};
use kiln_common::models::{ModelRepository, ModelSpec};
use kiln_proto::Task;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::WorkerConfig;
pub use embedding::PipelineError;
pub use inference::{ImageRun, ImageWork, InferenceHandle, Pipeline, Update};
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

/// Fetches the model's files if they come from a package, then loads it onto an inference thread.
pub fn load_model(
    spec: &ModelSpec,
    dylib: &Path,
    cache_dir: &Path,
    threads: Threads,
) -> Result<InferenceHandle, WorkerError> {
    let model_err = |reason: String| WorkerError::Model { model: spec.name.to_string(), reason };
    if let Some(source) = &spec.source {
        assets::ensure(source, &spec.dir(cache_dir))?;
    }
    let env = runtime::environment(dylib)?;
    let file =
        |logical: &str| spec.file(cache_dir, logical).ok_or_else(|| model_err(format!("files.{logical} is not set")));
    match spec.task {
        Task::Embedding => {
            let loaded = runtime::load_session(env, &file("model")?, &spec.execution_providers, threads)?;
            let emb = spec
                .embedding
                .clone()
                .ok_or_else(|| model_err("an embedding model needs an [embedding] section".into()))?;
            let pipeline =
                embedding::EmbeddingPipeline::new(&file("tokenizer")?, loaded.session, emb).map_err(model_err)?;
            spawn(spec, Pipeline::Embedding(Box::new(pipeline)), loaded.provider, threads)
        }
        Task::ImageGeneration => {
            let loaded = runtime::load_session(env, &file("model")?, &spec.execution_providers, threads)?;
            let pipeline =
                terrain::TerrainPipeline::new(loaded.session, spec.consistency.clone()).map_err(model_err)?;
            spawn(spec, Pipeline::Terrain(pipeline), loaded.provider, threads)
        }
        Task::TextToImage => {
            let dir = spec.dir(cache_dir);
            let (pipeline, provider) =
                diffusion::DiffusionPipeline::load(&dir, env, &spec.execution_providers, threads).map_err(model_err)?;
            spawn(spec, Pipeline::Diffusion(Box::new(pipeline)), provider, threads)
        }
    }
}

fn spawn(
    spec: &ModelSpec,
    pipeline: Pipeline,
    provider: kiln_common::models::ExecutionProvider,
    threads: Threads,
) -> Result<InferenceHandle, WorkerError> {
    events::model_loaded(spec, provider, threads);
    InferenceHandle::spawn(spec, pipeline, provider).map_err(|e| WorkerError::Model {
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
    let threads =
        Threads { intra: config.intra_threads.unwrap_or_else(runtime::default_threads), spin: config.ort_spin };
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
    tokio::spawn(lease::reap(backend.clone(), owner.clone(), lease, background.clone()));
    tokio::spawn(gpu::report(background.clone()));
    let config = Arc::new(config);
    for spec in repo.iter().cloned() {
        let infer = {
            let (spec, dylib, cache_dir) = (spec.clone(), dylib.clone(), cache_dir.clone());
            tokio::task::spawn_blocking(move || load_model(&spec, &dylib, &cache_dir, threads))
                .await
                .expect("load task")?
        };
        let ctx = consumer::Ctx {
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
