//! Worker settings. Each field is a flag and a `KILN_*` variable; the doc comments are `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_common::config::parse_duration;

/// A number, or `None` for `auto`.
pub type Auto = Option<usize>;

fn parse_auto(s: &str) -> Result<Auto, String> {
    match s.trim() {
        "auto" | "" => Ok(None),
        n => match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!("expected `auto` or a positive number, got {n:?}")),
            Ok(v) => Ok(Some(v)),
        },
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Models this worker serves (comma-separated); empty serves every model of the repository.
    #[arg(long = "serve", env = "KILN_WORKER_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Unacknowledged jobs a worker holds per model (RabbitMQ prefetch); keep it at least twice
    /// the model's `max_batch`, so the next batch can gather while one runs.
    #[arg(long, env = "KILN_PREFETCH", default_value_t = 128)]
    pub prefetch: u16,
    /// How long a batch waits for more jobs when the queue is thin. At 0 (the default) a batch
    /// takes what has already arrived — under load, all the jobs that queued while the previous
    /// batch ran — and a lone job is never delayed.
    #[arg(long, env = "KILN_BATCH_WAIT", default_value = "0ms", value_parser = parse_duration)]
    pub batch_wait: Duration,
    /// ONNX Runtime intra-op threads per session (`auto` or a number). With both this and
    /// `KILN_SESSIONS` at `auto`, a CPU embedding model gets one session on every core for
    /// requests that come alone (lowest latency) and one single-thread session per core (up to 4
    /// sessions) for load (most throughput), never running at once; an image model gets one
    /// session on every core. Set either to fix the layout: sessions × threads.
    #[arg(long, env = "KILN_INTRA_THREADS", default_value = "auto", value_parser = parse_auto)]
    pub intra_threads: Auto,
    /// Inference sessions per embedding model (`auto` or a number); see `KILN_INTRA_THREADS`.
    /// On a GPU, `auto` is one session.
    #[arg(long, env = "KILN_SESSIONS", default_value = "auto", value_parser = parse_auto)]
    pub sessions: Auto,
    /// Texts per model run at most, overriding the model's `max_batch` (1 turns batching off).
    #[arg(long, env = "KILN_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Padded tokens (texts × the longest text's tokens) per model run at most. `auto`: 2048 on
    /// a CPU, 16384 on a GPU. Bounds the activations' memory; within it, the measured cost
    /// table decides what runs together.
    #[arg(long, env = "KILN_MAX_BATCH_TOKENS", default_value = "auto", value_parser = parse_auto)]
    pub max_batch_tokens: Auto,
    /// Let ONNX Runtime's idle threads spin waiting for work: a little faster when the worker has
    /// the machine to itself, slower when it shares cores with the broker, store or gateway.
    #[arg(long, env = "KILN_ORT_SPIN", default_value_t = false, action = clap::ArgAction::Set)]
    pub ort_spin: bool,
    /// Absolute path of the ONNX Runtime shared library (also read from `ORT_DYLIB_PATH`); when
    /// unset, the pinned build is fetched into the cache folder.
    #[arg(long, env = "KILN_ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,
    /// On shutdown, how long to let the batch in hand finish before handing jobs back.
    #[arg(long, env = "KILN_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Starts a job gets before it is given up (failed and dead-lettered): failed runs that may
    /// be transient, and runs whose worker crashed or was killed, count alike.
    #[arg(long, env = "KILN_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Delay before the first retry; it doubles with each attempt, with jitter.
    #[arg(long, env = "KILN_RETRY_BASE", default_value = "1s", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "KILN_RETRY_MAX", default_value = "10m", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// A batch still running after this long is taken over from RabbitMQ: its messages are
    /// acknowledged and the jobs held by heartbeated leases in Redis instead, so runs longer than
    /// RabbitMQ's `consumer_timeout` are neither killed nor run twice. Keep it well below that
    /// timeout (30 min by default).
    #[arg(long, env = "KILN_LEASE_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub lease_after: Duration,
    /// How long a lease lasts without a heartbeat (heartbeats come every third of it); after
    /// that, any worker queues the job again.
    #[arg(long, env = "KILN_LEASE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Address of the worker's `/healthz` and `/readyz` (for Kubernetes probes); off when unset.
    #[arg(long, env = "KILN_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// `/healthz` fails when a model's consumer has been disconnected, or a batch has made no
    /// progress, for longer than this.
    #[arg(long, env = "KILN_LIVENESS_GRACE", default_value = "120s", value_parser = parse_duration)]
    pub liveness_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            prefetch: 128,
            batch_wait: Duration::ZERO,
            intra_threads: None,
            sessions: None,
            max_batch: None,
            max_batch_tokens: None,
            ort_spin: false,
            ort_dylib_path: None,
            drain_timeout: Duration::from_secs(30),
            max_attempts: 5,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            lease_after: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(30),
            health_listen: None,
            liveness_grace: Duration::from_secs(120),
        }
    }
}
