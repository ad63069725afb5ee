//! Configuration pieces shared by the binaries: secrets that never print, duration parsing, and the
//! clap argument groups for the backend (RabbitMQ + Redis, or embedded) and telemetry. Every field
//! is settable by a `KILN_*` environment variable, and its doc comment is its `--help` text.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A secret, or a URL that may carry one. `Debug` and `Display` print `***` in place of the
/// password, so configs can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value with any `user:password@` password and any `?query` (which may hold a token)
    /// masked.
    pub fn redacted(&self) -> String {
        let masked = self.password_masked();
        match masked.find('?') {
            Some(q) if masked.contains("://") => format!("{}?***", &masked[..q]),
            _ => masked,
        }
    }

    fn password_masked(&self) -> String {
        let s = &self.0;
        match (s.find("://"), s.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &s[scheme + 3..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        format!("{}{}:***{}", &s[..scheme + 3], &userinfo[..colon], &s[at..])
                    }
                    None => s.clone(),
                }
            }
            (Some(_), _) => s.clone(),
            _ => "***".into(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Parses `250ms`, `5s`, `10m`, `24h`, `7d` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("{s:?} needs a unit: ms, s, m, h or d"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} must start with a whole number"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"));
        }
    };
    Ok(Duration::from_millis(n * ms))
}

/// Where the job queue and job store live.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// RabbitMQ URL, e.g. `amqp://user:pass@rabbitmq:5672/%2f`. The password is never logged.
    #[arg(long, env = "KILN_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: Secret,
    /// Redis URL of the job store, e.g. `redis://:pass@redis:6379/0`. The password is never logged.
    #[arg(long, env = "KILN_REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: Secret,
    /// Prefix of the RabbitMQ exchange and queue names (`<prefix>.jobs.<model>`).
    #[arg(long, env = "KILN_QUEUE_PREFIX", default_value = "kiln")]
    pub queue_prefix: String,
    /// Prefix of every Redis key.
    #[arg(long, env = "KILN_KEY_PREFIX", default_value = "kiln:")]
    pub key_prefix: String,
    /// How long job records are kept after acceptance and after completion (`24h`, `30m`, ...).
    #[arg(long, env = "KILN_JOB_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub job_retention: Duration,
    /// How long a finished job's record (its result) is kept after completion; default: the job
    /// retention. Keep it at least as long as webhooks are retried (`KILN_WEBHOOK_GIVE_UP_AFTER`).
    /// It bounds the store's memory: about the bytes of one result × finished jobs per second ×
    /// this (see README, "What a job costs the store").
    #[arg(long, env = "KILN_RESULT_RETENTION", value_parser = parse_duration)]
    pub result_retention: Option<Duration>,
    /// How long a live job may go without any transition (or lease renewal) before the sweeper
    /// checks it: a queued or running job with no live lease and no live worker is queued again
    /// from its stored envelope, or ended `job_lost` when it cannot be rebuilt.
    #[arg(long, env = "KILN_SWEEP_AFTER", default_value = "10m", value_parser = parse_duration)]
    pub sweep_after: Duration,
    /// Redis URL of the result cache; default: the job store's Redis. Give the cache its own
    /// instance with `maxmemory-policy allkeys-lfu` in production.
    #[arg(long, env = "KILN_CACHE_REDIS_URL")]
    pub cache_redis_url: Option<Secret>,
    /// How long a finished output is served from the cache; `0s` turns the cache and in-flight
    /// coalescing off.
    #[arg(long, env = "KILN_CACHE_TTL", default_value = "1h", value_parser = parse_duration)]
    pub cache_ttl: Duration,
    /// Bound on connecting to RabbitMQ or Redis; a request that would wait longer gets a 503.
    #[arg(long, env = "KILN_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Bound on waiting for RabbitMQ's publisher confirm or a Redis reply.
    #[arg(long, env = "KILN_IO_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub io_timeout: Duration,
    /// Redis URL for binary job outputs (generated images) and inputs (images and audio given to
    /// jobs, uploaded files); default: the job store's Redis. Give
    /// them their own instance with a `maxmemory` bound and `noeviction`: when it is full, image
    /// jobs fail into retries instead of filling the job state's Redis.
    #[arg(long, env = "KILN_OUTPUTS_REDIS_URL")]
    pub outputs_redis_url: Option<Secret>,
    /// Keep binary job outputs (generated images) in this directory, shared by every gateway and
    /// worker, instead of in Redis. Files expire with the job retention.
    #[arg(long, env = "KILN_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
    /// The embedded backend's API keys: a JSON file `kiln keys` writes and a running `kiln dev`
    /// re-reads within a second of a change. Unset: keys live in memory only. (RabbitMQ + Redis
    /// deployments keep keys in the job store's Redis.)
    #[arg(long, env = "KILN_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// CA bundle (PEM) that the certificates of `amqps://` RabbitMQ and `rediss://` Redis servers
    /// must chain to, for the host in the URL. Unset: the system's roots. Redis trusts only this
    /// bundle; RabbitMQ's client adds it to the system roots (set `SSL_CERT_FILE` to the bundle
    /// to trust it alone). Plain `amqp://` and `redis://` URLs do not use TLS.
    #[arg(long, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// Where the model repository and the cache of fetched assets are.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model repository: one folder per model holding a `kiln.toml`. When the folder does not
    /// exist, the built-in repository (the all-MiniLM-L6-v2 embedding model) is served.
    #[arg(long, env = "KILN_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Cache of fetched model files and the ONNX Runtime library. Default: `$XDG_CACHE_HOME/kiln`
    /// or `~/.cache/kiln`.
    #[arg(long, env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl ModelArgs {
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }
}

pub fn default_cache_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("kiln");
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache").join("kiln")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Log filter in `tracing` syntax, e.g. `info,kiln=debug`. ONNX Runtime logs through `ort`;
    /// its session-setup chatter is at info, so the default keeps it at warn.
    #[arg(long, env = "KILN_LOG", default_value = "info,ort=warn")]
    pub log: String,
    /// Log line format.
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// OpenTelemetry collector to export traces to over OTLP/HTTP (protobuf), e.g.
    /// `http://otel-collector:4318`. Unset: no traces are recorded or sent.
    #[arg(long, env = "KILN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<Secret>,
    /// `service.name` of the exported traces; default: the process's role (`kiln-gateway`, ...).
    #[arg(long, env = "KILN_OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
    /// Share of new traces recorded (0..=1); a request that arrives with a sampled `traceparent`
    /// is always followed, so one job is never half traced.
    #[arg(long, env = "KILN_OTEL_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub otel_sample_ratio: f64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio from 0 to 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_ratios_are_bounded() {
        assert_eq!(parse_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_ratio("1"), Ok(1.0));
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            assert!(parse_ratio(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn secrets_never_print_passwords() {
        let s = Secret::new("amqp://kiln:hunter2@rabbit:5672/%2f");
        assert_eq!(format!("{s:?}"), "amqp://kiln:***@rabbit:5672/%2f");
        assert_eq!(s.to_string(), "amqp://kiln:***@rabbit:5672/%2f");
        assert_eq!(Secret::new("redis://127.0.0.1:6379").to_string(), "redis://127.0.0.1:6379");
        assert_eq!(Secret::new("whsec_abc").to_string(), "***");
        assert_eq!(s.expose(), "amqp://kiln:hunter2@rabbit:5672/%2f");
        // A token in the query (an OTLP endpoint's, say) is masked too.
        let otlp = Secret::new("https://u:p@otel.example:4318/v1/traces?api-key=t0k3n");
        assert_eq!(otlp.to_string(), "https://u:***@otel.example:4318/v1/traces?***");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
