//! Inputs in Redis: one hash `{prefix}input:{scope}:{sha256}` per blob with fields `meta` (the
//! `MediaRef` as JSON) and `data` (the bytes), and one string `{prefix}file:{scope}:{id}` per
//! file record (the `FileObject` as JSON), each with its own TTL. A blob is written by a script
//! that stores it only when absent and otherwise extends its TTL, never shortening it. On its own
//! connection (the outputs' Redis), so a large image never queues behind the job store's small
//! commands.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::{FileObject, MediaRef, valid_file_id};
use redis::aio::ConnectionManager;

use super::{InputStore, InputStoreError, check_blob, check_file, media_ref, valid_sha256};
use crate::config::Secret;
use crate::tls::ClientTls;

/// Stores the blob when absent; otherwise raises its TTL to the one asked for when that is
/// longer. Returns 1 when it wrote the blob.
const PUT: &str = r"
local ttl = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'data', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
local left = redis.call('PTTL', KEYS[1])
if left >= 0 and left < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 0
";

pub struct RedisInputs {
    conn: ConnectionManager,
    prefix: String,
    job_ttl: Duration,
    put: redis::Script,
}

impl RedisInputs {
    /// Connects lazily, like the job store. `job_ttl`: see [`InputStore::job_ttl`].
    pub fn new(
        url: &Secret,
        tls: &ClientTls,
        key_prefix: &str,
        job_ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, String> {
        let config = crate::store::redis::connection_config(timeout, timeout);
        let (_, conn) = crate::store::redis::lazy_connection(tls, url.expose(), "Redis", config)?;
        Ok(Self { conn, prefix: key_prefix.to_owned(), job_ttl, put: redis::Script::new(PUT) })
    }

    fn blob_key(&self, scope: &str, sha256: &str) -> String {
        format!("{}input:{scope}:{sha256}", self.prefix)
    }

    fn file_key(&self, scope: &str, id: &str) -> String {
        format!("{}file:{scope}:{id}", self.prefix)
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

fn parse<T: serde::de::DeserializeOwned>(what: &'static str, raw: &[u8]) -> Result<T, InputStoreError> {
    serde_json::from_slice(raw).map_err(|e| InputStoreError::Corrupt { what, detail: e.to_string() })
}

#[async_trait]
impl InputStore for RedisInputs {
    async fn put(
        &self,
        scope: &str,
        content_type: &str,
        data: Bytes,
        ttl: Duration,
    ) -> Result<MediaRef, InputStoreError> {
        check_blob(&data)?;
        let r = media_ref(content_type, &data);
        let meta = serde_json::to_vec(&r).expect("a reference serialises");
        let _: i64 = self
            .put
            .key(self.blob_key(scope, &r.sha256))
            .arg(meta)
            .arg(&data[..])
            .arg(ms(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(InputStoreError::Unavailable)?;
        Ok(r)
    }

    async fn get(&self, scope: &str, sha256: &str) -> Result<Option<(MediaRef, Bytes)>, InputStoreError> {
        if !valid_sha256(sha256) {
            return Ok(None);
        }
        let (meta, data): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.blob_key(scope, sha256))
            .arg("meta")
            .arg("data")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(InputStoreError::Unavailable)?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some((parse("input reference", &meta)?, Bytes::from(data)))),
            _ => Ok(None),
        }
    }

    async fn head(&self, scope: &str, sha256: &str) -> Result<Option<MediaRef>, InputStoreError> {
        if !valid_sha256(sha256) {
            return Ok(None);
        }
        let meta: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.blob_key(scope, sha256))
            .arg("meta")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(InputStoreError::Unavailable)?;
        meta.map(|m| parse("input reference", &m)).transpose()
    }

    async fn create_file(&self, scope: &str, file: &FileObject, ttl: Duration) -> Result<(), InputStoreError> {
        check_file(file)?;
        let record = serde_json::to_vec(file).expect("a file record serialises");
        redis::cmd("SET")
            .arg(self.file_key(scope, &file.id))
            .arg(record)
            .arg("PX")
            .arg(ms(ttl))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(InputStoreError::Unavailable)
    }

    async fn file(&self, scope: &str, id: &str) -> Result<Option<FileObject>, InputStoreError> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.file_key(scope, id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(InputStoreError::Unavailable)?;
        raw.map(|r| parse("file record", &r)).transpose()
    }

    async fn delete_file(&self, scope: &str, id: &str) -> Result<bool, InputStoreError> {
        if !valid_file_id(id) {
            return Ok(false);
        }
        let removed: u64 = redis::cmd("DEL")
            .arg(self.file_key(scope, id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(InputStoreError::Unavailable)?;
        Ok(removed > 0)
    }

    fn job_ttl(&self) -> Duration {
        self.job_ttl
    }
}
