//! A small client of the HTTP API, behind `kiln submit/get/wait/cancel/jobs/models/events/run`
//! and `kiln batch`: submission (keyed or not), long-poll, listing, cancel, the event stream and
//! verified download, each sending the API key when there is one. [`ClientError`] says whether a
//! failure is worth retrying and after how long.

use std::path::Path;
use std::time::Duration;

use kiln_common::config::Secret;
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::sse::{Parser, SseEvent};

/// The longest long-poll one request asks for; the gateway caps it too (`KILN_MAX_WAIT_S`).
pub const MAX_POLL: Duration = Duration::from_secs(60);
/// An event stream with no byte for this long is dead (the gateway sends a keep-alive every 15 s).
const STREAM_STALL: Duration = Duration::from_secs(60);

pub struct Client {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …` to this gateway (never to another host an output URL
    /// might name).
    api_key: Option<Secret>,
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
    /// A client of the gateway at `base`, without an API key.
    pub fn new(base: &str) -> Result<Self, reqwest::Error> {
        Self::with_key(base, None)
    }

    /// A client of the gateway at `base` that sends `api_key` on every call.
    pub fn with_key(base: &str, api_key: Option<Secret>) -> Result<Self, reqwest::Error> {
        let http = kiln_common::tls::http_client()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http, api_key })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `url`, with the API key when `url` is on this gateway.
    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        let ours = url.strip_prefix(&self.base).is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']));
        match &self.api_key {
            Some(key) if ours => req.bearer_auth(key.expose()),
            _ => req,
        }
    }

    /// `POST /v1/jobs`; with `wait`, `Prefer: wait=N` (the answer is the finished job if it ends
    /// within it).
    pub async fn submit(&self, body: &Value, wait: Option<Duration>) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs", self.base);
        let mut req = self.request(Method::POST, &url).json(body);
        if let Some(wait) = wait {
            req = req.header("prefer", format!("wait={}", wait.as_secs())).timeout(wait + Duration::from_secs(15));
        }
        self.typed_json(&url, req).await
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn get(&self, id: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs/{id}", self.base);
        let req = self.request(Method::GET, &url);
        self.typed_json(&url, req).await
    }

    /// Long-polls (`GET /v1/jobs/{id}?wait=N`, at most [`MAX_POLL`] a request) until the job is
    /// over or `timeout` passes, and returns the last record seen: finished, or still on its way.
    /// An overloaded or restarting gateway is asked again after its `Retry-After`, within the
    /// timeout.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Whole seconds on the wire: ask for at least one, so a short wait is not a busy loop.
            let poll = left.min(MAX_POLL).max(Duration::from_secs(1));
            match self.get_waiting(id, poll).await {
                Ok(job) if is_terminal(&job) || tokio::time::Instant::now() >= deadline => return Ok(job),
                Ok(_) => {}
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    let pause = e.retry_after().unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep(pause.min(deadline.saturating_duration_since(tokio::time::Instant::now())))
                        .await;
                    if tokio::time::Instant::now() >= deadline {
                        return self.get(id).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `POST /v1/jobs/{id}/cancel`: the canceled job's record.
    pub async fn cancel(&self, id: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs/{id}/cancel", self.base);
        let req = self.request(Method::POST, &url);
        self.typed_json(&url, req).await
    }

    /// `GET /v1/jobs?status=&model=&limit=&cursor=`: one page, `{"data": [records], "next_cursor"}`.
    pub async fn list_jobs(&self, query: &JobsQuery) -> Result<JobsPage, ClientError> {
        let url = format!("{}/v1/jobs", self.base);
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(s) = &query.status {
            params.push(("status", s.clone()));
        }
        if let Some(m) = &query.model {
            params.push(("model", m.clone()));
        }
        if let Some(l) = query.limit {
            params.push(("limit", l.to_string()));
        }
        if let Some(c) = &query.cursor {
            params.push(("cursor", c.clone()));
        }
        let url = reqwest::Url::parse_with_params(&url, &params)
            .map_err(|e| ClientError::Protocol { url: url.clone(), detail: format!("not a URL: {e}") })?
            .to_string();
        let req = self.request(Method::GET, &url);
        let body = self.typed_json(&url, req).await?;
        let protocol = |detail: &str| ClientError::Protocol { url: url.clone(), detail: detail.to_owned() };
        let data = body["data"].as_array().cloned().ok_or_else(|| protocol("no `data` list"))?;
        let next_cursor = match &body["next_cursor"] {
            Value::Null => None,
            Value::String(c) => Some(c.clone()),
            _ => return Err(protocol("`next_cursor` is neither a string nor null")),
        };
        Ok(JobsPage { data, next_cursor })
    }

    /// `GET /v1/jobs/{id}/events`, resuming after `last_event_id`; `None` when the gateway says
    /// there is nothing more to send (`204`: the job is over and the client has its end).
    pub async fn events(&self, id: &str, last_event_id: Option<&str>) -> Result<Option<EventStream>, ClientError> {
        let url = format!("{}/v1/jobs/{id}/events", self.base);
        // The stream lasts as long as the job: no overall deadline, a stall limit instead.
        let mut req = self.request(Method::GET, &url).timeout(Duration::from_secs(7 * 24 * 3600));
        if let Some(last) = last_event_id {
            req = req.header("last-event-id", last);
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(Self::error_of(&url, resp).await);
        }
        Ok(Some(EventStream { url, resp, parser: Parser::default() }))
    }

    /// `POST /v1/jobs` with an `Idempotency-Key`: the same key and body always name the same job.
    pub async fn submit_keyed(&self, body: &Value, key: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs", self.base);
        let req = self.request(Method::POST, &url).header("idempotency-key", key).json(body);
        self.typed_json(&url, req).await
    }

    /// `GET /v1/jobs/{id}?wait=N`: the record once the job finishes, or after `wait`.
    pub async fn get_waiting(&self, id: &str, wait: Duration) -> Result<Value, ClientError> {
        let url = format!("{}/v1/jobs/{id}?wait={}", self.base, wait.as_secs());
        // The server holds the request for up to `wait`: the client's own limit must be longer.
        let req = self.request(Method::GET, &url).timeout(wait + Duration::from_secs(15));
        self.typed_json(&url, req).await
    }

    /// `POST /v1/files` with the bytes as the raw body: the file object (`id`, `sha256`, …), to
    /// be given in a job's input as `"file:<id>"`.
    pub async fn upload(&self, bytes: Vec<u8>, content_type: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/files", self.base);
        let req = self
            .request(Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .timeout(Duration::from_secs(600))
            .body(bytes);
        self.typed_json(&url, req).await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<Value, ClientError> {
        let url = format!("{}/v1/models", self.base);
        let req = self.request(Method::GET, &url);
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
        let mut resp =
            self.request(Method::GET, &url).timeout(Duration::from_secs(3600)).send().await.map_err(transport)?;
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

/// The filters and page of `GET /v1/jobs`.
#[derive(Debug, Clone, Default)]
pub struct JobsQuery {
    pub status: Option<String>,
    pub model: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// One page of `GET /v1/jobs`.
#[derive(Debug, Clone)]
pub struct JobsPage {
    pub data: Vec<Value>,
    pub next_cursor: Option<String>,
}

/// A job's event stream, open.
pub struct EventStream {
    url: String,
    resp: reqwest::Response,
    parser: Parser,
}

impl EventStream {
    /// The next event, or `None` when the gateway ended the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Ok(Some(event));
            }
            let chunk = tokio::time::timeout(STREAM_STALL, self.resp.chunk())
                .await
                .map_err(|_| ClientError::Protocol {
                    url: self.url.clone(),
                    detail: format!("no data for {} s", STREAM_STALL.as_secs()),
                })?
                .map_err(|source| ClientError::Transport { url: self.url.clone(), source })?;
            let Some(chunk) = chunk else { return Ok(None) };
            self.parser
                .push(&chunk)
                .map_err(|e| ClientError::Protocol { url: self.url.clone(), detail: e.to_string() })?;
        }
    }
}

/// Whether a job record is in a final state.
pub fn is_terminal(record: &Value) -> bool {
    crate::outcome::Outcome::of(record).is_terminal()
}

/// A file name the server gave us, used inside an output directory only.
pub fn safe_file_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']) && name.len() <= 200
}
