//! The hot-query result cache: finished outputs by a hash of (model, version, canonical input),
//! in a Redis that can be separate from the job store (`KILN_CACHE_REDIS_URL`, run it with LFU
//! eviction), or in process for the embedded default.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::Secret;
use crate::store::StoreError;
use crate::tls::ClientTls;

/// The shape of the outputs cached, in every key: an output of an older shape (embeddings
/// without their token counts) is never served after an upgrade, it is simply missed.
const OUTPUT_SHAPE: &str = "2";

/// The cache key of a job: what determines its output. `input` is the canonical input (the
/// gateway's normalised form, with ordered keys).
pub fn key(model: &str, version: &str, input: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    for part in [OUTPUT_SHAPE, "\0", model, "\0", version, "\0", &input.to_string()] {
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// The cached output (JSON text).
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Caches an output for the configured time.
    async fn put(&self, key: &str, output: &str) -> Result<(), StoreError>;

    /// Whether caching is on at all.
    fn enabled(&self) -> bool;
}

pub struct RedisCache {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
}

impl RedisCache {
    pub fn new(
        url: &Secret,
        tls: &ClientTls,
        prefix: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let config = crate::store::redis::connection_config(timeout, timeout);
        let (_, conn) = crate::store::redis::lazy_connection(tls, url.expose(), "cache Redis", config)
            .map_err(StoreError::Unavailable)?;
        Ok(Self { conn, prefix: format!("{prefix}cache:"), ttl })
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    async fn put(&self, key: &str, output: &str) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(output)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }
}

/// In-process cache, bounded: past `max_entries`, expired entries go first, then the oldest.
pub struct EmbeddedCache {
    entries: Mutex<HashMap<String, (String, Instant)>>,
    ttl: Duration,
    max_entries: usize,
}

impl EmbeddedCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self { entries: Mutex::default(), ttl, max_entries }
    }
}

#[async_trait]
impl Cache for EmbeddedCache {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let entries = self.entries.lock().expect("cache lock");
        Ok(entries.get(key).filter(|(_, until)| *until > Instant::now()).map(|(v, _)| v.clone()))
    }

    async fn put(&self, key: &str, output: &str) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().expect("cache lock");
        let now = Instant::now();
        if entries.len() >= self.max_entries {
            entries.retain(|_, (_, until)| *until > now);
        }
        if entries.len() >= self.max_entries
            && let Some(oldest) = entries.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone())
        {
            entries.remove(&oldest);
        }
        entries.insert(key.to_owned(), (output.to_owned(), now + self.ttl));
        Ok(())
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_model_version_and_input_only() {
        let a = key("m", "1", &serde_json::json!({"texts": ["x"]}));
        assert_eq!(a, key("m", "1", &serde_json::json!({"texts": ["x"]})));
        assert_ne!(a, key("m", "2", &serde_json::json!({"texts": ["x"]})));
        assert_ne!(a, key("n", "1", &serde_json::json!({"texts": ["x"]})));
        assert_ne!(a, key("m", "1", &serde_json::json!({"texts": ["y"]})));
    }

    #[tokio::test]
    async fn embedded_cache_is_bounded() {
        let c = EmbeddedCache::new(Duration::from_secs(60), 2);
        for k in ["a", "b", "c"] {
            c.put(k, k).await.unwrap();
        }
        assert_eq!(c.entries.lock().unwrap().len(), 2);
        assert_eq!(c.get("c").await.unwrap().as_deref(), Some("c"));
    }
}
