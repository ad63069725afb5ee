//! Worker settings. Each field is a flag and a `KILN_*` variable; the doc comments are `--help`.

use std::path::PathBuf;
use std::time::Duration;

use kiln_common::config::parse_duration;

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Models this worker serves (comma-separated); empty serves every model of the repository.
    #[arg(long = "serve", env = "KILN_WORKER_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Unacknowledged jobs a worker holds per model (RabbitMQ prefetch).
    #[arg(long, env = "KILN_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,
    /// How long a batch waits for more jobs when the queue is thin.
    #[arg(long, env = "KILN_BATCH_WAIT", default_value = "2ms", value_parser = parse_duration)]
    pub batch_wait: Duration,
    /// ONNX Runtime intra-op threads per model; default: all available cores.
    #[arg(long, env = "KILN_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// Absolute path of the ONNX Runtime shared library (also read from `ORT_DYLIB_PATH`); when
    /// unset, the pinned build is fetched into the cache folder.
    #[arg(long, env = "KILN_ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,
    /// On shutdown, how long to let the batch in hand finish before handing jobs back.
    #[arg(long, env = "KILN_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            prefetch: 64,
            batch_wait: Duration::from_millis(2),
            intra_threads: None,
            ort_dylib_path: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}
