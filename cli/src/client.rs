//! A small client of the HTTP API, for `kiln submit`, `kiln get` and `kiln wait`.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http })
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
}
