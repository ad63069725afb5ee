//! A small client of the HTTP API: `kiln submit/get/wait` (the `anyhow` methods), and the typed
//! calls `kiln batch` builds on — keyed submission, long-poll, verified download — whose
//! [`ClientError`] says whether a failure is worth retrying and after how long.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// Why a typed call failed. [`ClientError::is_transient`] drives the batch runner's retries.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body `{"error": {"code", "message"}}` (or a bare status).
    #[error("{status} {code}: {message}")]
    Api { status: u16, code: String, message: String, retry_after: Option<Duration> },
    /// No answer: connection refused or reset, timeout, a body cut short.
    #[error("no answer from {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that does not follow the API contract.
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
    /// A downloaded body that does not match the size or sha256 the job record announced.
    #[error("{url}: {detail}")]
    Mismatch { url: String, detail: String },
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// Worth another try of the same request: no answer, the server busy or restarting, a key
    /// still being accepted by a concurrent request, or a corrupted download.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { status, code, .. } => *status == 429 || *status >= 500 || code == "idempotency_key_in_flight",
            Self::Transport { .. } | Self::Mismatch { .. } => true,
            Self::Protocol { .. } | Self::Io { .. } => false,
        }
    }

    /// The server's `Retry-After`, when it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The stable error code, for the manifest: the server's, or one naming the local failure.
    pub fn code(&self) -> &str {
        match self {
            Self::Api { code, .. } => code,
            Self::Transport { .. } => "unreachable",
            Self::Protocol { .. } => "protocol",
            Self::Mismatch { .. } => "output_mismatch",
            Self::Io { .. } => "io",
        }
    }

    /// The message without the code, for the manifest.
    pub fn message(&self) -> String {
        match self {
            Self::Api { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// What a verified download wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    pub sha256: String,
}

impl Client {
    pub fn new(base: &str) -> Result<Self, reqwest::Error> {
        let http = kiln_common::tls::http_client()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn submit(&self, body: &Value) -> anyhow::Result<Value> {
        let resp =
            self.http.post(format!("{}/v1/jobs", self.base)).json(body).send().await.context("submitting the job")?;
        Self::json(resp).await
    }

    pub async fn get(&self, id: &str) -> anyhow::Result<Value> {
        let resp = self.http.get(format!("{}/v1/jobs/{id}", self.base)).send().await.context("fetching the job")?;
        Self::json(resp).await
    }

    /// Polls until the job is terminal or `timeout` passes, backing off from 20 ms to 1 s.
    pub async fn wait(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            let job = self.get(id).await?;
            let status = job["status"].as_str().unwrap_or("");
            if matches!(status, "succeeded" | "failed" | "canceled" | "expired") {
                return Ok(job);
            }
            if tokio::time::Instant::now() + delay > deadline {
                bail!("job {id} still {status} after {timeout:?}");
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    async fn json(resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let body: Value = resp.json().await.with_context(|| format!("reading the {status} answer"))?;
        if status.is_client_error() || status.is_server_error() {
            let code = body["error"]["code"].as_str().unwrap_or("?");
            let message = body["error"]["message"].as_str().unwrap_or("?");
            bail!("{status}: {code}: {message}");
        }
        Ok(body)
    }

    /// `POST /v1/jobs` with an `Idempotency-Key`: the same key and body always name the same job.
    pub async fn submit_keyed(&self, body: &Value, key: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs", self.base);
        let req = self.http.post(&url).header("idempotency-key", key).json(body);
        self.typed_json(&url, req).await
    }

    /// `GET /v1/jobs/{id}?wait=N`: the record once the job finishes, or after `wait`.
    pub async fn get_waiting(&self, id: &str, wait: Duration) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs/{id}?wait={}", self.base, wait.as_secs());
        // The server holds the request for up to `wait`: the client's own limit must be longer.
        let req = self.http.get(&url).timeout(wait + Duration::from_secs(15));
        self.typed_json(&url, req).await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<Value, ClientError> {
        let url = format!("{}/v1/models", self.base);
        let req = self.http.get(&url);
        self.typed_json(&url, req).await
    }

    /// Streams `path` (relative to the base URL, or absolute) into `dest`, hashing as it goes,
    /// and checks the announced size and sha256. `dest` is synced to disk before returning; on any
    /// error it may hold a partial body, which the caller discards.
    pub async fn download(
        &self,
        path: &str,
        dest: &Path,
        size: Option<u64>,
        sha256: Option<&str>,
    ) -> Result<Downloaded, ClientError> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        };
        let transport = |source| ClientError::Transport { url: url.clone(), source };
        let io = |source| ClientError::Io { path: dest.display().to_string(), source };
        // Outputs can be large: no overall deadline, only the connect timeout and a stall limit.
        let mut resp = self.http.get(&url).timeout(Duration::from_secs(3600)).send().await.map_err(transport)?;
        if !resp.status().is_success() {
            return Err(Self::error_of(&url, resp).await);
        }
        if let (Some(announced), Some(len)) = (size, resp.content_length())
            && announced != len
        {
            return Err(ClientError::Mismatch {
                url,
                detail: format!("Content-Length {len} but the job record says {announced} bytes"),
            });
        }
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
                .await
                .map_err(|_| ClientError::Protocol { url: url.clone(), detail: "no data for 60 s".into() })?
                .map_err(transport)?;
            let Some(chunk) = chunk else { break };
            hasher.update(&chunk);
            written += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        let got = hex::encode(hasher.finalize());
        if let Some(announced) = size
            && announced != written
        {
            return Err(ClientError::Mismatch { url, detail: format!("got {written} bytes, expected {announced}") });
        }
        if let Some(announced) = sha256
            && !announced.eq_ignore_ascii_case(&got)
        {
            return Err(ClientError::Mismatch { url, detail: format!("sha256 {got}, expected {announced}") });
        }
        Ok(Downloaded { size: written, sha256: got })
    }

    async fn typed_json(&self, url: &str, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.to_owned(), source })?;
        if !resp.status().is_success() {
            return Err(Self::error_of(url, resp).await);
        }
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url: url.to_owned(), source })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol { url: url.to_owned(), detail: format!("body is not JSON: {e}") })
    }

    /// The typed error of a non-2xx answer; a body without the error shape keeps the status.
    async fn error_of(url: &str, resp: reqwest::Response) -> ClientError {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Value = match resp.bytes().await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            Err(source) => return ClientError::Transport { url: url.to_owned(), source },
        };
        let code = body["error"]["code"].as_str().map(str::to_owned);
        let message = body["error"]["message"].as_str().map(str::to_owned);
        ClientError::Api {
            status: status.as_u16(),
            code: code.unwrap_or_else(|| format!("http_{}", status.as_u16())),
            message: message.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned()),
            retry_after,
        }
    }
}
