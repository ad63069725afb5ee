//! Outputs in Redis: one hash `{prefix}job:{id}:out:{name}` per file with fields `meta` (JSON)
//! and `data` (the bytes), written in one MULTI with the job's retention as its TTL. On its own
//! connection, so a large image never queues behind the job store's small commands.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::JobId;
use redis::aio::ConnectionManager;

use super::{FileMeta, OutputError, OutputStore, check, valid_name};
use crate::config::Secret;
use crate::tls::ClientTls;

pub struct RedisOutputs {
    conn: ConnectionManager,
    prefix: String,
    retention: Duration,
}

impl RedisOutputs {
    /// Connects lazily, like the job store.
    pub fn new(
        url: &Secret,
        tls: &ClientTls,
        key_prefix: &str,
        retention: Duration,
        timeout: Duration,
    ) -> Result<Self, OutputError> {
        let config = crate::store::redis::connection_config(timeout, timeout);
        let (_, conn) = crate::store::redis::lazy_connection(tls, url.expose(), "Redis", config)
            .map_err(OutputError::Unavailable)?;
        Ok(Self { conn, prefix: key_prefix.to_owned(), retention })
    }

    fn key(&self, job: JobId, name: &str) -> String {
        format!("{}job:{job}:out:{name}", self.prefix)
    }
}

fn unavailable(e: redis::RedisError) -> OutputError {
    OutputError::Unavailable(e.to_string())
}

fn parse_meta(raw: &[u8]) -> Result<FileMeta, OutputError> {
    serde_json::from_slice(raw).map_err(|e| OutputError::Unavailable(format!("unreadable output metadata: {e}")))
}

#[async_trait]
impl OutputStore for RedisOutputs {
    async fn put(&self, job: JobId, name: &str, content_type: &str, data: Bytes) -> Result<FileMeta, OutputError> {
        check(name, &data)?;
        let meta = FileMeta::of(content_type, &data);
        let key = self.key(job, name);
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("meta")
            .arg(serde_json::to_vec(&meta).expect("metadata serialises"))
            .arg("data")
            .arg(&data[..])
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.retention.as_millis() as u64)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(meta)
    }

    async fn get(&self, job: JobId, name: &str) -> Result<Option<(FileMeta, Bytes)>, OutputError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let (meta, data): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.key(job, name))
            .arg("meta")
            .arg("data")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some((parse_meta(&meta)?, Bytes::from(data)))),
            _ => Ok(None),
        }
    }

    async fn head(&self, job: JobId, name: &str) -> Result<Option<FileMeta>, OutputError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let meta: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.key(job, name))
            .arg("meta")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        meta.map(|m| parse_meta(&m)).transpose()
    }
}
