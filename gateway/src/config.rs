//! Gateway settings. Each field is a flag and a `KILN_*` variable; the doc comments are `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_common::audit::AuditConfig;
use kiln_common::config::{Secret, parse_duration};
use kiln_common::tenancy::Limits;
use kiln_common::webhooks::WebhookConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct GatewayConfig {
    /// Address the HTTP API listens on.
    #[arg(long, env = "KILN_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, env = "KILN_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Submissions handled at once; beyond this the gateway answers 503 with `Retry-After`.
    #[arg(long, env = "KILN_MAX_INFLIGHT_SUBMITS", default_value_t = 1024)]
    pub max_inflight_submits: usize,
    /// The `Retry-After` (whole seconds) sent with 503 answers.
    #[arg(long, env = "KILN_RETRY_AFTER", default_value = "1s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// On SIGTERM, how long to keep serving (while `/readyz` already fails) before closing the
    /// listener, so load balancers stop routing here first. In-flight requests always finish.
    #[arg(long, env = "KILN_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Longest `Prefer: wait=N` / `?wait=N` honoured, in seconds.
    #[arg(long, env = "KILN_MAX_WAIT", default_value_t = 60)]
    pub max_wait_s: u64,
    /// Long-polls (`GET /v1/jobs/{id}?wait=N`, `Prefer: wait=N` on a submit) waiting at once.
    /// Beyond this a submit is answered at once without waiting (its `202`), and a long-poll that
    /// asks for the slot first gets 503 with `Retry-After` (code `overloaded`). Each costs a task
    /// and an event subscription, a few kilobytes.
    #[arg(long, env = "KILN_MAX_WAITERS", default_value_t = 4096)]
    pub max_waiters: usize,
    /// How long `POST /v1/embeddings` (OpenAI-compatible, answered on the request) waits for its
    /// job, holding one of the long-poll slots. Past it the answer is 504 with `Retry-After` (code
    /// `wait_timeout`): the job goes on, and a retry joins it or reads its result from the cache.
    #[arg(long, env = "KILN_OPENAI_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub openai_wait: Duration,
    /// Server-sent event streams (`GET /v1/jobs/{id}/events`) open at once; beyond this the
    /// gateway answers 503 with `Retry-After` (code `overloaded`). Each costs a connection, a task
    /// and an event subscription, a few kilobytes.
    #[arg(long, env = "KILN_MAX_EVENT_STREAMS", default_value_t = 4096)]
    pub max_event_streams: usize,
    /// How long an `Idempotency-Key` keeps returning the same job.
    #[arg(long, env = "KILN_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
    #[command(flatten)]
    pub webhooks: WebhookConfig,
    #[command(flatten)]
    pub inputs: InputsConfig,
    /// Bound on each dependency check of `/readyz`.
    #[arg(long, env = "KILN_READY_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// `keys`: every API route needs `Authorization: Bearer kiln_…` (create keys with `kiln keys
    /// create`); `off`: the API is open to whoever reaches it, with no tenants or limits (what
    /// `kiln dev` runs on loopback). `/healthz` and `/readyz` are always open.
    #[arg(long, env = "KILN_AUTH", value_enum, default_value = "keys")]
    pub auth: AuthMode,
    /// `open`: `/metrics` answers anyone (keep it on a private network, as Prometheus scrapes
    /// it); `admin`: it needs an `admin` key.
    #[arg(long, env = "KILN_METRICS_AUTH", value_enum, default_value = "open")]
    pub metrics_auth: MetricsAuth,
    #[command(flatten)]
    pub limits: DefaultLimits,
    #[command(flatten)]
    pub audit: AuditConfig,
    /// The Redis the audit log's stream mirror (`KILN_AUDIT_REDIS_STREAM`) writes to: the job
    /// store's, filled in by the process that runs the gateway.
    #[arg(skip)]
    pub audit_redis_url: Option<Secret>,
    #[command(flatten)]
    pub tls: TlsConfig,
    /// The gateway's public base URL (`https://kiln.example.com`), for the absolute URLs of the
    /// predictions API (a prediction's `urls` and its output files). Unset: each answer derives
    /// it from its request — `X-Forwarded-Proto` (else `https` when the gateway serves TLS, else
    /// `http`) and the `Host` header; webhook bodies use the base of the request that created the
    /// prediction. Set it behind a proxy that rewrites `Host`.
    #[arg(long, env = "KILN_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
}

/// An http(s) URL with no path, query or fragment beyond `/`, kept without the trailing slash.
fn parse_public_url(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("{s:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!("{s:?} must be scheme://host[:port], without a path, query or credentials"));
    }
    Ok(s.to_owned())
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Keys,
    Off,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAuth {
    Open,
    Admin,
}

/// The limits of a tenant that has none of its own (`kiln keys limits`), per tenant across every
/// gateway. `0` turns a limit off.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq)]
pub struct DefaultLimits {
    /// Requests per second, sustained.
    #[arg(long, env = "KILN_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,
    /// Requests at once above the sustained rate.
    #[arg(long, env = "KILN_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,
    /// Jobs accepted and not yet finished.
    #[arg(long, env = "KILN_MAX_JOBS_IN_FLIGHT", default_value_t = 1000)]
    pub max_jobs_in_flight: u32,
    /// Seconds of worker run time per sliding hour.
    #[arg(long, env = "KILN_COMPUTE_S_PER_HOUR", default_value_t = 0.0)]
    pub compute_s_per_hour: f64,
}

impl Default for DefaultLimits {
    fn default() -> Self {
        Self { rate_limit: 50.0, rate_burst: 100, max_jobs_in_flight: 1000, compute_s_per_hour: 0.0 }
    }
}

impl DefaultLimits {
    pub fn as_limits(&self) -> Limits {
        let positive = |v: f64| (v > 0.0).then_some(v);
        Limits {
            rate: positive(self.rate_limit),
            burst: Some(self.rate_burst.max(1)),
            max_in_flight: (self.max_jobs_in_flight > 0).then_some(self.max_jobs_in_flight),
            compute_s_per_hour: positive(self.compute_s_per_hour),
        }
    }
}

/// Binary inputs: uploaded files (`POST /v1/files`) and the URLs the gateway fetches.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct InputsConfig {
    /// How long an uploaded file is kept, in seconds (jobs made from it keep their own copy for
    /// the job retention).
    #[arg(long, env = "KILN_FILE_TTL_S", default_value_t = 86_400)]
    pub file_ttl_s: u64,
    /// Largest file `POST /v1/files` takes, in bytes. Unset: the largest `max_input_bytes` of the
    /// served models. This route's body limit, not `KILN_MAX_BODY_BYTES`.
    #[arg(long, env = "KILN_MAX_FILE_BYTES")]
    pub max_file_bytes: Option<usize>,
    /// Bound on fetching one `https://` input URL, in seconds, from connecting to the last byte.
    #[arg(long, env = "KILN_FETCH_TIMEOUT_S", default_value_t = 10)]
    pub fetch_timeout_s: u64,
    /// Hosts (names or IP addresses) that input URLs may name even though they are loopback,
    /// private or link-local, comma-separated; for development. Every other internal address is
    /// refused, as for webhooks.
    #[arg(long, env = "KILN_FETCH_ALLOWED_HOSTS", value_delimiter = ',')]
    pub fetch_allowed_hosts: Vec<String>,
    /// CA bundle (PEM) that the servers of input URLs may chain to, besides the system's roots.
    #[arg(long, env = "KILN_FETCH_CA")]
    pub fetch_ca: Option<PathBuf>,
    /// Input images decoded at once (each on a blocking thread) to check them before a job is
    /// accepted; more wait their turn.
    #[arg(long, env = "KILN_DECODE_CONCURRENCY", default_value_t = 2)]
    pub decode_concurrency: usize,
}

impl Default for InputsConfig {
    fn default() -> Self {
        Self {
            file_ttl_s: 86_400,
            max_file_bytes: None,
            fetch_timeout_s: 10,
            fetch_allowed_hosts: Vec::new(),
            fetch_ca: None,
            decode_concurrency: 2,
        }
    }
}

/// HTTPS: served when a certificate and its key are configured, plain HTTP otherwise.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain (PEM, the server's certificate first) to serve HTTPS with; needs
    /// `KILN_TLS_KEY`. Unset: plain HTTP (terminate TLS in front of the gateway).
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `KILN_TLS_CERT`.
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Lowest TLS version a client may use: `1.3`, or `1.2` for clients that cannot do 1.3.
    #[arg(long, env = "KILN_TLS_MIN_VERSION", value_enum, default_value = "1.3")]
    pub tls_min_version: TlsVersion,
    /// How often the certificate and key files are checked for a change (their modification
    /// time and size). A changed pair serves new connections without a restart; a pair that does
    /// not load (or whose key does not fit) is logged and the one in use kept.
    #[arg(long, env = "KILN_TLS_RELOAD_EVERY", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_every: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            tls_min_version: TlsVersion::V1_3,
            tls_reload_every: Duration::from_secs(10),
        }
    }
}

/// A TLS protocol version, as `KILN_TLS_MIN_VERSION` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum TlsVersion {
    #[value(name = "1.2")]
    V1_2,
    #[value(name = "1.3")]
    V1_3,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid address"),
            max_body_bytes: 1 << 20,
            max_inflight_submits: 1024,
            retry_after: Duration::from_secs(1),
            shutdown_delay: Duration::ZERO,
            max_wait_s: 60,
            max_waiters: 4096,
            openai_wait: Duration::from_secs(30),
            max_event_streams: 4096,
            idempotency_ttl: Duration::from_secs(86_400),
            webhooks: WebhookConfig::default(),
            inputs: InputsConfig::default(),
            ready_timeout: Duration::from_secs(1),
            auth: AuthMode::Keys,
            metrics_auth: MetricsAuth::Open,
            limits: DefaultLimits::default(),
            audit: AuditConfig::default(),
            audit_redis_url: None,
            tls: TlsConfig::default(),
            public_url: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayConfig,
    }

    /// Each default is written in clap's attribute and again in `Default`: they must agree.
    #[test]
    fn defaults_agree_with_the_flags() {
        let parsed = Cli::try_parse_from(["kiln-gateway"]).expect("no flags needed").gateway;
        assert_eq!(format!("{parsed:?}"), format!("{:?}", GatewayConfig::default()));
    }

    #[test]
    fn a_public_url_is_a_bare_origin() {
        let parse = |v: &str| Cli::try_parse_from(["kiln-gateway", "--public-url", v]).map(|c| c.gateway.public_url);
        assert_eq!(parse("https://kiln.example.com/").unwrap().as_deref(), Some("https://kiln.example.com"));
        assert_eq!(parse("http://127.0.0.1:8080").unwrap().as_deref(), Some("http://127.0.0.1:8080"));
        for bad in ["kiln.example.com", "ftp://x", "https://", "https://x/api", "https://u@x"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_certificate_needs_its_key_and_versions_are_spelled_as_numbers() {
        assert!(Cli::try_parse_from(["kiln-gateway", "--tls-cert", "c.pem"]).is_err());
        assert!(Cli::try_parse_from(["kiln-gateway", "--tls-key", "k.pem"]).is_err());
        let both = Cli::try_parse_from(["kiln-gateway", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap().gateway;
        assert_eq!(both.tls.tls_cert, Some(PathBuf::from("c.pem")));
        let old = Cli::try_parse_from(["kiln-gateway", "--tls-min-version", "1.2"]).unwrap().gateway;
        assert_eq!(old.tls.tls_min_version, TlsVersion::V1_2);
        assert!(Cli::try_parse_from(["kiln-gateway", "--tls-min-version", "1.1"]).is_err());
    }
}
