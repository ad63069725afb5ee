//! The input store: binary job inputs (images, audio) by (scope, sha256), and the records of files
//! uploaded with `POST /v1/files` by (scope, id). A scope is a tenant, or `-` on an open gateway,
//! so one tenant never reads another's bytes or files. A blob is written once per content: writing
//! the same bytes again keeps the one copy and extends its lifetime (never shortens it). The
//! gateway writes what a job's input names, the worker reads it back by the `MediaRef` in the
//! canonical input. Implementations: [`redis`] (RabbitMQ + Redis) and [`EmbeddedInputs`] (in
//! memory, `kiln dev`), both bounded.

pub mod fetch;
pub mod redis;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::{FileObject, MediaRef, valid_file_id};
use sha2::{Digest, Sha256};

/// Largest single input stored.
pub const MAX_INPUT_BYTES: usize = 64 << 20;
/// Longest `filename` kept on a file record.
pub const MAX_FILENAME_CHARS: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum InputStoreError {
    /// The backing Redis cannot be reached or failed; retry later.
    #[error("input store unavailable: {0}")]
    Unavailable(#[source] ::redis::RedisError),
    /// What the store holds does not read back (a record that is not JSON).
    #[error("input store holds an unreadable {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A blob over [`MAX_INPUT_BYTES`], or a record that cannot name a file.
    #[error("invalid input: {0}")]
    Invalid(String),
}

/// The scope of `tenant`'s inputs and files: its name, or `-` on an open gateway.
pub fn scope(tenant: Option<&str>) -> &str {
    tenant.unwrap_or("-")
}

/// Whether `sha256` can name a blob: 64 lower-case hex digits.
pub fn valid_sha256(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh file id: `file_` and 24 random alphanumerics.
pub fn new_file_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // 62 does not divide 256: bytes at or above 248 are skipped, so every character is as likely.
    let random = (0..).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).filter(|b| *b < 248);
    let rest: String = random.take(24).map(|b| char::from(ALPHABET[usize::from(b % 62)])).collect();
    format!("file_{rest}")
}

/// The reference of `data` as stored with `content_type`.
pub fn media_ref(content_type: &str, data: &[u8]) -> MediaRef {
    MediaRef {
        sha256: hex::encode(Sha256::digest(data)),
        content_type: content_type.to_owned(),
        size: data.len() as u64,
    }
}

#[async_trait]
pub trait InputStore: Send + Sync + 'static {
    /// Stores `data` in `scope` under its sha256 for at least `ttl`. Idempotent: the same bytes
    /// are the same blob, kept once; its lifetime is extended to `ttl` from now when that is
    /// later than what it had, never shortened.
    async fn put(
        &self,
        scope: &str,
        content_type: &str,
        data: Bytes,
        ttl: Duration,
    ) -> Result<MediaRef, InputStoreError>;

    /// The blob and its reference, if it is there and has not expired.
    async fn get(&self, scope: &str, sha256: &str) -> Result<Option<(MediaRef, Bytes)>, InputStoreError>;

    /// The reference alone.
    async fn head(&self, scope: &str, sha256: &str) -> Result<Option<MediaRef>, InputStoreError>;

    /// Records an uploaded file (its blob stored with [`InputStore::put`]) until `ttl` from now.
    async fn create_file(&self, scope: &str, file: &FileObject, ttl: Duration) -> Result<(), InputStoreError>;

    /// The file record, if it is there and has not expired.
    async fn file(&self, scope: &str, id: &str) -> Result<Option<FileObject>, InputStoreError>;

    /// Removes a file record; whether there was one. Its blob stays for the jobs made from it
    /// and expires on its own.
    async fn delete_file(&self, scope: &str, id: &str) -> Result<bool, InputStoreError>;

    /// How long a job's inputs are kept at least: the job retention, so that a job queued, run
    /// or rebuilt from its envelope within it still finds its bytes.
    fn job_ttl(&self) -> Duration;
}

fn check_blob(data: &[u8]) -> Result<(), InputStoreError> {
    if data.len() > MAX_INPUT_BYTES {
        return Err(InputStoreError::Invalid(format!(
            "an input of {} bytes; at most {MAX_INPUT_BYTES} are stored",
            data.len()
        )));
    }
    Ok(())
}

fn check_file(file: &FileObject) -> Result<(), InputStoreError> {
    if !valid_file_id(&file.id) || !valid_sha256(&file.sha256) {
        return Err(InputStoreError::Invalid(format!("file {:?} of {:?}", file.id, file.sha256)));
    }
    if file.filename.as_ref().is_some_and(|n| n.chars().count() > MAX_FILENAME_CHARS) {
        return Err(InputStoreError::Invalid(format!("a filename over {MAX_FILENAME_CHARS} characters")));
    }
    Ok(())
}

/// In-memory inputs for `kiln dev`: each expires at its own time, and the oldest written go
/// first when the bytes pass `max_bytes` or the file records pass `max_files`.
pub struct EmbeddedInputs {
    job_ttl: Duration,
    max_bytes: usize,
    max_files: usize,
    inner: Mutex<Embedded>,
}

type BlobKey = (String, String);

#[derive(Default)]
struct Embedded {
    /// Blob, its reference, when it expires, and its write's sequence number.
    blobs: HashMap<BlobKey, (MediaRef, Bytes, Instant, u64)>,
    /// Blobs in the order first written, for eviction over the budget; entries whose sequence
    /// number no longer matches were replaced or removed.
    order: VecDeque<(BlobKey, u64)>,
    bytes: usize,
    files: HashMap<BlobKey, (FileObject, Instant)>,
    file_order: VecDeque<BlobKey>,
    seq: u64,
}

impl EmbeddedInputs {
    pub fn new(job_ttl: Duration, max_bytes: usize, max_files: usize) -> Self {
        Self { job_ttl, max_bytes, max_files, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Embedded> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lookup(&self, scope: &str, sha256: &str) -> Option<(MediaRef, Bytes)> {
        let inner = self.lock();
        let (r, data, until, _) = inner.blobs.get(&(scope.to_owned(), sha256.to_owned()))?;
        (Instant::now() < *until).then(|| (r.clone(), data.clone()))
    }
}

impl Embedded {
    fn evict_blobs(&mut self, max_bytes: usize, now: Instant) {
        while let Some((key, seq)) = self.order.front().cloned() {
            let live = self.blobs.get(&key).filter(|(.., s)| *s == seq);
            let expired = live.is_some_and(|(_, _, until, _)| *until <= now);
            if live.is_some() && !expired && self.bytes <= max_bytes {
                break;
            }
            self.order.pop_front();
            if live.is_some()
                && let Some((_, data, ..)) = self.blobs.remove(&key)
            {
                self.bytes -= data.len();
            }
        }
    }
}

#[async_trait]
impl InputStore for EmbeddedInputs {
    async fn put(
        &self,
        scope: &str,
        content_type: &str,
        data: Bytes,
        ttl: Duration,
    ) -> Result<MediaRef, InputStoreError> {
        check_blob(&data)?;
        let r = media_ref(content_type, &data);
        let now = Instant::now();
        let until = now + ttl;
        let mut inner = self.lock();
        let key = (scope.to_owned(), r.sha256.clone());
        match inner.blobs.get_mut(&key) {
            Some((_, _, at, _)) if *at > now => *at = (*at).max(until),
            _ => {
                inner.seq += 1;
                let seq = inner.seq;
                inner.bytes += data.len();
                if let Some((_, old, ..)) = inner.blobs.insert(key.clone(), (r.clone(), data, until, seq)) {
                    inner.bytes -= old.len();
                }
                inner.order.push_back((key, seq));
            }
        }
        inner.evict_blobs(self.max_bytes, now);
        Ok(r)
    }

    async fn get(&self, scope: &str, sha256: &str) -> Result<Option<(MediaRef, Bytes)>, InputStoreError> {
        Ok(self.lookup(scope, sha256))
    }

    async fn head(&self, scope: &str, sha256: &str) -> Result<Option<MediaRef>, InputStoreError> {
        Ok(self.lookup(scope, sha256).map(|(r, _)| r))
    }

    async fn create_file(&self, scope: &str, file: &FileObject, ttl: Duration) -> Result<(), InputStoreError> {
        check_file(file)?;
        let now = Instant::now();
        let mut inner = self.lock();
        let key = (scope.to_owned(), file.id.clone());
        if inner.files.insert(key.clone(), (file.clone(), now + ttl)).is_none() {
            inner.file_order.push_back(key);
        }
        // Expired records first, then the oldest while over the bound.
        while let Some(key) = inner.file_order.front().cloned() {
            let expired = inner.files.get(&key).is_none_or(|(_, until)| *until <= now);
            if !expired && inner.files.len() <= self.max_files {
                break;
            }
            inner.file_order.pop_front();
            inner.files.remove(&key);
        }
        Ok(())
    }

    async fn file(&self, scope: &str, id: &str) -> Result<Option<FileObject>, InputStoreError> {
        let inner = self.lock();
        let found = inner.files.get(&(scope.to_owned(), id.to_owned()));
        Ok(found.filter(|(_, until)| Instant::now() < *until).map(|(f, _)| f.clone()))
    }

    async fn delete_file(&self, scope: &str, id: &str) -> Result<bool, InputStoreError> {
        let mut inner = self.lock();
        let removed = inner.files.remove(&(scope.to_owned(), id.to_owned()));
        // Its place in `file_order` goes when it reaches the front.
        Ok(removed.is_some_and(|(_, until)| Instant::now() < until))
    }

    fn job_ttl(&self) -> Duration {
        self.job_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_are_valid_and_distinct() {
        let a = new_file_id();
        assert!(valid_file_id(&a) && a.len() == 5 + 24, "{a}");
        assert_ne!(a, new_file_id());
        assert!(valid_sha256(&"ab".repeat(32)) && !valid_sha256(&"AB".repeat(32)) && !valid_sha256("ab"));
        assert_eq!((scope(Some("acme")), scope(None)), ("acme", "-"));
    }

    #[tokio::test]
    async fn embedded_evicts_the_oldest_over_its_budget() {
        let store = EmbeddedInputs::new(Duration::from_secs(60), 10, 2);
        let ttl = Duration::from_secs(60);
        let a = store.put("-", "image/png", Bytes::from_static(b"aaaaaa"), ttl).await.unwrap();
        let b = store.put("-", "image/png", Bytes::from_static(b"bbbbbb"), ttl).await.unwrap();
        assert!(store.head("-", &a.sha256).await.unwrap().is_none(), "oldest evicted over budget");
        assert!(store.head("-", &b.sha256).await.unwrap().is_some());
        let file = |id: &str| FileObject {
            id: id.into(),
            sha256: b.sha256.clone(),
            size: 6,
            content_type: "image/png".into(),
            filename: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2026-01-02T00:00:00Z".into(),
        };
        for id in ["file_a", "file_b", "file_c"] {
            store.create_file("-", &file(id), ttl).await.unwrap();
        }
        assert!(store.file("-", "file_a").await.unwrap().is_none(), "oldest record evicted over the bound");
        assert!(store.file("-", "file_c").await.unwrap().is_some());
    }
}
