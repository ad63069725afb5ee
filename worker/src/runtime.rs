//! ONNX Runtime: loading the shared library once per process, and building sessions on the first
//! execution provider of a model's preference list that actually works here. The log says which
//! provider runs; nothing falls back silently.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_common::models::ExecutionProvider;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("cannot load model {path}: {reason}")]
    Session { path: PathBuf, reason: String },
    #[error("no execution provider of {wanted:?} could run {path}: {reasons}")]
    NoProvider { path: PathBuf, wanted: Vec<ExecutionProvider>, reasons: String },
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process's one ONNX Runtime environment, loading the library at `dylib` on first use. Later
/// calls return the first result whatever path they pass: ONNX Runtime allows one per process.
pub fn environment(dylib: &Path) -> Result<&'static Environment, RuntimeError> {
    let env = ENVIRONMENT.get_or_init(|| {
        if !dylib.is_absolute() || !dylib.is_file() {
            return Err(format!("{} is not an absolute path to a file", dylib.display()));
        }
        ort::init_from(dylib)
            .map_err(|e| e.to_string())?
            .with_name("kiln")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|reason| RuntimeError::Load { path: dylib.to_owned(), reason: reason.clone() })
}

/// A session and the provider it runs on.
pub struct LoadedSession {
    pub session: Session,
    pub provider: ExecutionProvider,
}

/// Builds a session on the first provider of `providers` that registers and loads the model.
pub fn load_session(
    env: &Environment,
    model: &Path,
    providers: &[ExecutionProvider],
    threads: Threads,
) -> Result<LoadedSession, RuntimeError> {
    load_first(env, model, providers, threads, None)
}

/// [`load_session`] for one session of a pool: the pre-packed weights are shared by every session
/// built with the same container (several sessions of one model hold one copy of them), and no
/// memory patterns are kept (inputs of every shape come through).
pub fn load_pool_session(
    env: &Environment,
    model: &Path,
    providers: &[ExecutionProvider],
    threads: Threads,
    prepacked: &PrepackedWeights,
) -> Result<LoadedSession, RuntimeError> {
    load_first(env, model, providers, threads, Some(prepacked))
}

fn load_first(
    env: &Environment,
    model: &Path,
    providers: &[ExecutionProvider],
    threads: Threads,
    prepacked: Option<&PrepackedWeights>,
) -> Result<LoadedSession, RuntimeError> {
    let mut reasons = Vec::new();
    for &provider in providers {
        match try_load(env, model, provider, threads, prepacked) {
            Ok(session) => return Ok(LoadedSession { session, provider }),
            Err(reason) => {
                tracing::info!(model = %model.display(), ?provider, %reason, "execution provider unavailable here, trying the next");
                reasons.push(format!("{provider:?}: {reason}"));
            }
        }
    }
    Err(RuntimeError::NoProvider { path: model.to_owned(), wanted: providers.to_vec(), reasons: reasons.join("; ") })
}

fn try_load(
    env: &Environment,
    model: &Path,
    provider: ExecutionProvider,
    threads: Threads,
    prepacked: Option<&PrepackedWeights>,
) -> Result<Session, String> {
    let mut builder = Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| e.to_string())?
        .with_intra_threads(threads.intra)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(threads.spin)
        .map_err(|e| e.to_string())?
        .with_inter_op_spinning(threads.spin)
        .map_err(|e| e.to_string())?;
    if let Some(weights) = prepacked {
        // A pool's inputs change shape on every run: a memory pattern is planned and kept per
        // shape, so with patterns on, the cache of them grows with every new (batch, length).
        // The arena stays (without it, runs of varying shapes were 7 % slower here): its peak
        // is bounded by the batch token budget.
        builder = builder
            .with_prepacked_weights(weights)
            .map_err(|e| e.to_string())?
            .with_memory_pattern(false)
            .map_err(|e| e.to_string())?;
    }
    let mut builder = match provider {
        ExecutionProvider::Cpu => builder,
        ExecutionProvider::Cuda => cuda(builder)?,
    };
    builder.commit_from_file(model).map_err(|e| e.to_string())
}

#[cfg(feature = "cuda")]
fn cuda(builder: ort::session::builder::SessionBuilder) -> Result<ort::session::builder::SessionBuilder, String> {
    builder.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()]).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: ort::session::builder::SessionBuilder) -> Result<ort::session::builder::SessionBuilder, String> {
    Err("this worker was built without the `cuda` feature".into())
}

/// How a session uses threads.
#[derive(Debug, Clone, Copy)]
pub struct Threads {
    pub intra: usize,
    /// Whether idle pool threads spin waiting for work (faster alone on a machine; steals CPU from
    /// the broker, store and gateway when they share it).
    pub spin: bool,
}

/// Intra-op threads when not configured: every core this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
