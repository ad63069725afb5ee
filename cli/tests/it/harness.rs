//! Starting the system under test: a backend under fresh prefixes, the real model repository, and
//! gateway and worker roles that each test starts and stops on its own terms.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::config::BackendArgs;
use kiln_common::models::ModelRepository;
use kiln_common::testing::{self, Kind};
use kiln_gateway::GatewayConfig;
use kiln_proto::JobId;
use kiln_worker::WorkerConfig;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const MODEL: &str = "all-minilm-l6-v2";
pub const TERRAIN: &str = "terrain-diffusion";

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("KILN_CACHE_DIR").map(PathBuf::from).unwrap_or_else(kiln_common::config::default_cache_dir)
}

pub struct Env {
    pub backend: Backend,
    /// The settings of the external backend (None for embedded), for child processes.
    pub args: Option<BackendArgs>,
    pub repo: ModelRepository,
    pub http: reqwest::Client,
}

impl Env {
    pub fn new(kind: Kind) -> Self {
        Self::with_retention(kind, Duration::from_secs(3600))
    }

    pub fn with_retention(kind: Kind, retention: Duration) -> Self {
        let (backend, args) = match kind {
            Kind::Embedded => (Backend::embedded(retention), None),
            Kind::External => {
                let args = testing::backend_args(retention);
                (Backend::external(&args).expect("backend"), Some(args))
            }
        };
        Self::from_parts(backend, args)
    }

    /// Serves the model repository at `models` instead of the project's.
    pub fn with_models(mut self, models: &TempRepo) -> Self {
        self.repo = ModelRepository::load(&models.0).expect("model repository");
        self
    }

    pub fn from_parts(backend: Backend, args: Option<BackendArgs>) -> Self {
        let repo = ModelRepository::load(&repo_dir()).expect("model repository");
        let http = kiln_common::tls::http_client().timeout(Duration::from_secs(30)).build().unwrap();
        Self { backend, args, repo, http }
    }

    pub async fn gateway(&self) -> Gateway {
        self.gateway_with(open_gateway()).await
    }

    pub async fn gateway_with(&self, config: GatewayConfig) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kiln_gateway::run(
            config,
            self.backend.clone(),
            self.repo.clone(),
            listener,
            shutdown.clone(),
        ));
        Gateway { addr, shutdown, task, http: self.http.clone() }
    }

    pub fn worker(&self) -> Worker {
        self.worker_with(WorkerConfig { intra_threads: Some(2), ..WorkerConfig::default() })
    }

    /// A worker serving `config.models`, or only the embedding model when that is empty (loading
    /// every model of the repository in every test would only cost time).
    pub fn worker_with(&self, mut config: WorkerConfig) -> Worker {
        if config.models.is_empty() {
            config.models = vec![MODEL.to_owned()];
        }
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kiln_worker::run(
            config,
            self.backend.clone(),
            self.repo.clone(),
            cache_dir(),
            shutdown.clone(),
        ));
        Worker { shutdown, task }
    }
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    pub http: reqwest::Client,
}

pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_raw(&self, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Response {
        let mut req = self.http.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        Self::read(req.send().await.expect("POST")).await
    }

    pub async fn submit(&self, body: &Value) -> Response {
        self.post_raw("/v1/jobs", Some("application/json"), serde_json::to_vec(body).unwrap()).await
    }

    /// Submits and insists on a 202, returning the job id.
    pub async fn submit_ok(&self, input: Value) -> JobId {
        let r = self.submit(&serde_json::json!({ "model": MODEL, "input": input })).await;
        assert_eq!(r.status, 202, "submit answered {}: {}", r.status, r.body);
        r.body["id"].as_str().expect("id").parse().expect("uuid")
    }

    pub async fn get(&self, path: &str) -> Response {
        Self::read(self.http.get(self.url(path)).send().await.expect("GET")).await
    }

    pub async fn job(&self, id: JobId) -> Value {
        let r = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(r.status, 200, "GET job {id}: {}", r.body);
        r.body
    }

    /// Waits until the job is terminal and returns its record.
    pub async fn finished(&self, id: JobId, timeout: Duration) -> Value {
        testing::wait_until(&format!("job {id} finishes"), timeout, || async {
            let job = self.job(id).await;
            match job["status"].as_str() {
                Some("succeeded" | "failed" | "canceled" | "expired") => Ok(job),
                _ => Err(job["status"].clone()),
            }
        })
        .await
    }

    async fn read(resp: reqwest::Response) -> Response {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Response { status, headers, body }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("gateway task").expect("gateway ran");
    }
}

pub struct Worker {
    pub shutdown: CancellationToken,
    task: JoinHandle<Result<(), kiln_worker::WorkerError>>,
}

impl Worker {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("worker task").expect("worker ran");
    }
}

/// The embedding vectors of a succeeded record.
pub fn embeddings(job: &Value) -> Vec<Vec<f32>> {
    assert_eq!(job["status"], "succeeded", "job did not succeed: {job}");
    serde_json::from_value(job["output"]["embeddings"].clone()).expect("embeddings")
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// A model repository in a temporary folder: the project's, with each `kiln.toml` passed through
/// `edit`. Model names and versions stay, so the fetched files in the cache are shared.
pub struct TempRepo(pub PathBuf);

impl TempRepo {
    pub fn new(edit: impl Fn(String) -> String) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-models-{}", testing::unique_prefix()));
        let mut changed = 0;
        for entry in std::fs::read_dir(repo_dir()).unwrap() {
            let entry = entry.unwrap();
            let toml = entry.path().join("kiln.toml");
            if toml.is_file() {
                std::fs::create_dir_all(dir.join(entry.file_name())).unwrap();
                let original = std::fs::read_to_string(&toml).unwrap();
                let text = edit(original.clone());
                changed += usize::from(text != original);
                std::fs::write(dir.join(entry.file_name()).join("kiln.toml"), text).unwrap();
            }
        }
        assert!(changed > 0, "the edit changed no model config");
        Self(dir)
    }
}

impl Drop for TempRepo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces one `key = value` line of a model config (configs without the key are left alone;
/// [`TempRepo::new`] insists that some config changed).
pub fn set(key: &str, value: &str) -> impl Fn(String) -> String {
    let (key, value) = (key.to_owned(), value.to_owned());
    move |text: String| {
        let prefix = format!("{key} =");
        if !text.lines().any(|l| l.starts_with(&prefix)) {
            return text;
        }
        text.lines()
            .map(|l| if l.starts_with(&prefix) { format!("{key} = {value}") } else { l.to_owned() })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Gateway settings of the tests that are not about keys: an open API (`KILN_AUTH=off`).
pub fn open_gateway() -> GatewayConfig {
    GatewayConfig { auth: kiln_gateway::AuthMode::Off, ..GatewayConfig::default() }
}

/// A `kiln worker` process, logging JSON to a file so tests can read what it did.
pub struct ChildWorker {
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl ChildWorker {
    pub fn spawn(args: &BackendArgs, models: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!("kiln-worker-{}.log", testing::unique_prefix()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("worker")
            .env("KILN_AMQP_URL", args.amqp_url.expose())
            .env("KILN_REDIS_URL", args.redis_url.expose())
            .env("KILN_QUEUE_PREFIX", &args.queue_prefix)
            .env("KILN_KEY_PREFIX", &args.key_prefix)
            .env("KILN_MODELS_DIR", models)
            .env("KILN_CACHE_DIR", cache_dir())
            .env("KILN_INTRA_THREADS", "1")
            .env("KILN_WORKER_MODELS", MODEL)
            .env("KILN_LOG", "warn,kiln::worker=info,kiln::worker::runs=debug")
            .env("KILN_LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self { child: cmd.spawn().expect("spawn kiln worker"), log }
    }

    pub fn lines(&self) -> Vec<Value> {
        read_log(&self.log)
    }

    /// Waits until the worker has logged a line for which `pred` holds, and returns it.
    pub async fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        testing::wait_until(what, timeout, || async {
            let lines = self.lines();
            lines.iter().find(|l| pred(l)).cloned().ok_or_else(|| lines.last().cloned().unwrap_or(Value::Null))
        })
        .await
    }

    pub fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
    }

    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success();
        assert!(ok, "kill -TERM {pid}");
    }

    pub async fn wait(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(120), self.child.wait()).await.expect("worker exits").unwrap()
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn read_log(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Successful runs that reached the store, per job, across the workers' logs: more than one is a
/// job run to completion twice.
pub fn completed_runs(workers: &[&ChildWorker]) -> std::collections::HashMap<String, usize> {
    let mut runs = std::collections::HashMap::new();
    for w in workers {
        for line in w.lines() {
            if line["target"] == "kiln::worker::runs" && line["ok"] == true {
                *runs.entry(line["job_id"].as_str().unwrap_or_default().to_owned()).or_insert(0) += 1;
            }
        }
    }
    runs
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// A client of `GET /v1/jobs/{id}/events`.
pub struct SseClient {
    resp: reqwest::Response,
    buf: String,
}

impl SseClient {
    pub async fn open(gw: &Gateway, id: JobId, last_event_id: Option<&str>) -> Self {
        let mut req = gw.http.get(gw.url(&format!("/v1/jobs/{id}/events"))).timeout(Duration::from_secs(300));
        if let Some(last) = last_event_id {
            req = req.header("last-event-id", last);
        }
        let resp = req.send().await.expect("SSE request");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        Self { resp, buf: String::new() }
    }

    /// The next event (keep-alive comments skipped), or None when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() && id.is_none() {
                    continue;
                }
                return Some(SseEvent { event, id, data: serde_json::from_str(&data).unwrap_or(Value::String(data)) });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(120), self.resp.chunk())
                .await
                .expect("an SSE chunk within 120s");
            match chunk.expect("SSE body") {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes).replace("\r\n", "\n")),
                None => return None,
            }
        }
    }

    /// Events until the stream ends.
    pub async fn rest(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

/// The environment a `kiln` child process needs to reach `args`' RabbitMQ, Redis and prefixes.
fn backend_env(cmd: &mut tokio::process::Command, args: &BackendArgs) {
    cmd.env("KILN_AMQP_URL", args.amqp_url.expose())
        .env("KILN_REDIS_URL", args.redis_url.expose())
        .env("KILN_QUEUE_PREFIX", &args.queue_prefix)
        .env("KILN_KEY_PREFIX", &args.key_prefix)
        .env("KILN_JOB_RETENTION", format!("{}ms", args.job_retention.as_millis()))
        .env("KILN_SWEEP_AFTER", format!("{}ms", args.sweep_after.as_millis()))
        .env("KILN_CACHE_TTL", format!("{}ms", args.cache_ttl.as_millis()))
        .env("KILN_CONNECT_TIMEOUT", format!("{}ms", args.connect_timeout.as_millis()))
        .env("KILN_IO_TIMEOUT", format!("{}ms", args.io_timeout.as_millis()));
    if let Some(retention) = args.result_retention {
        cmd.env("KILN_RESULT_RETENTION", format!("{}ms", retention.as_millis()));
    }
    if let Some(cache) = &args.cache_redis_url {
        cmd.env("KILN_CACHE_REDIS_URL", cache.expose());
    }
    if let Some(outputs) = &args.outputs_redis_url {
        cmd.env("KILN_OUTPUTS_REDIS_URL", outputs.expose());
    }
    if let Some(dir) = &args.output_dir {
        cmd.env("KILN_OUTPUT_DIR", dir);
    }
}

/// A `kiln gateway` process on a port of its own, logging JSON to one file per start, which a test
/// can SIGKILL and start again on the same port, so its clients keep their URL as they would behind
/// a load balancer.
pub struct ChildGateway {
    pub addr: SocketAddr,
    args: BackendArgs,
    models: PathBuf,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
    /// One log per start, oldest first.
    pub logs: Vec<PathBuf>,
}

impl ChildGateway {
    /// Starts the gateway and waits until `/readyz` answers 200 (broker and store reached).
    pub async fn spawn(args: &BackendArgs, models: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut me = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            args: args.clone(),
            models: models.to_owned(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            child: None,
            logs: Vec::new(),
        };
        me.launch().await;
        me
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn launch(&mut self) {
        let log = std::env::temp_dir().join(format!("kiln-gateway-{}.log", testing::unique_prefix()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("gateway").env("KILN_LISTEN", self.addr.to_string());
        backend_env(&mut cmd, &self.args);
        cmd.env("KILN_MODELS_DIR", &self.models)
            .env("KILN_CACHE_DIR", cache_dir())
            .env("KILN_AUTH", "off")
            .env("KILN_LOG", "warn,kiln::gateway=debug")
            .env("KILN_LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = std::sync::Mutex::new(cmd.spawn().expect("spawn kiln gateway"));
        self.logs.push(log.clone());
        let http = kiln_common::tls::http_client().timeout(Duration::from_secs(2)).build().unwrap();
        let ready = self.url("/readyz");
        let exited =
            testing::wait_until(&format!("kiln gateway on {} is ready", self.addr), Duration::from_secs(60), || {
                let (http, ready, child) = (&http, &ready, &child);
                async move {
                    if let Some(status) = child.lock().unwrap().try_wait().expect("gateway status") {
                        return Ok(Some(status));
                    }
                    match http.get(ready).send().await {
                        Ok(r) if r.status() == 200 => Ok(None),
                        Ok(r) => Err(format!("/readyz answered {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
            .await;
        if let Some(status) = exited {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("kiln gateway exited at start ({status}): {tail}");
        }
        self.child = Some(child.into_inner().unwrap());
    }

    /// SIGKILL: the gateway dies wherever it is, requests in flight and all.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the gateway is running");
        child.start_kill().expect("SIGKILL");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("gateway exits").unwrap();
        assert!(!status.success(), "a killed gateway does not exit 0: {status}");
    }

    /// Starts the gateway again on the same port (after [`ChildGateway::kill`]).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill");
        self.launch().await;
    }

    /// Every JSON log line of every start, in order.
    pub fn lines(&self) -> Vec<Value> {
        self.logs.iter().flat_map(|l| read_log(l)).collect()
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("kiln gateway logs kept for the failed test: {:?}", self.logs);
        } else {
            for log in &self.logs {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

/// Every run a worker logged (`kiln::worker::runs`): `(job_id, attempt, ok, stored)`, across the
/// workers' logs, for checks finer than [`completed_runs`].
pub fn runs_logged(workers: &[&ChildWorker]) -> Vec<(String, u64, bool, bool)> {
    workers
        .iter()
        .flat_map(|w| w.lines())
        .filter(|l| l["target"] == "kiln::worker::runs")
        .map(|l| {
            (
                l["job_id"].as_str().unwrap_or_default().to_owned(),
                l["attempt"].as_u64().unwrap_or(0),
                l["ok"] == true,
                l["stored"] == true,
            )
        })
        .collect()
}
