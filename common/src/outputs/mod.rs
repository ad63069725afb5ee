//! The output store: binary job outputs (generated images), kept out of the job record and
//! served by `GET /v1/jobs/{id}/outputs/{name}`. Implementations: [`redis`] (the default with
//! RabbitMQ + Redis: one hash per file, expiring with the job), [`FsOutputs`] (a directory shared
//! by gateways and workers, `KILN_OUTPUT_DIR`), and [`EmbeddedOutputs`] (in memory, `kiln dev`).
//! Every file is addressed by job id and a path-safe name, and carries its content type, size
//! and sha256 (the ETag).

pub mod redis;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::JobId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest single output accepted.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The backing store cannot be reached or failed; retry later.
    #[error("output store unavailable: {0}")]
    Unavailable(String),
    /// A name that is not path-safe, or a file over the size limit.
    #[error("invalid output: {0}")]
    Invalid(String),
}

/// What is known about a stored file without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub content_type: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl FileMeta {
    pub fn of(content_type: &str, data: &[u8]) -> Self {
        Self {
            content_type: content_type.to_owned(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        }
    }
}

#[async_trait]
pub trait OutputStore: Send + Sync + 'static {
    /// Stores (or replaces: a retried job writes the same file again) one output of `job`.
    async fn put(&self, job: JobId, name: &str, content_type: &str, data: Bytes) -> Result<FileMeta, OutputError>;

    /// The file and its metadata, if it exists and has not expired.
    async fn get(&self, job: JobId, name: &str) -> Result<Option<(FileMeta, Bytes)>, OutputError>;

    /// The metadata alone.
    async fn head(&self, job: JobId, name: &str) -> Result<Option<FileMeta>, OutputError>;
}

/// Whether `name` can name an output: 1–128 characters of `[A-Za-z0-9._-]`, not starting with a
/// dot (so it is always one plain file name on disk).
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check(name: &str, data: &[u8]) -> Result<(), OutputError> {
    if !valid_name(name) {
        return Err(OutputError::Invalid(format!("output name {name:?} is not [A-Za-z0-9._-]{{1,128}}")));
    }
    if data.len() > MAX_OUTPUT_BYTES {
        return Err(OutputError::Invalid(format!(
            "output {name} is {} bytes; at most {MAX_OUTPUT_BYTES} are stored",
            data.len()
        )));
    }
    Ok(())
}

/// In-memory outputs for `kiln dev`: expire with the job's retention, and the oldest go first
/// when the total passes `max_bytes`.
pub struct EmbeddedOutputs {
    retention: Duration,
    max_bytes: usize,
    inner: Mutex<Embedded>,
}

#[derive(Default)]
struct Embedded {
    files: HashMap<(JobId, String), (FileMeta, Bytes, Instant)>,
    order: VecDeque<((JobId, String), Instant)>,
    bytes: usize,
}

impl EmbeddedOutputs {
    pub fn new(retention: Duration, max_bytes: usize) -> Self {
        Self { retention, max_bytes, inner: Mutex::default() }
    }

    fn lookup(&self, job: JobId, name: &str) -> Option<(FileMeta, Bytes)> {
        let inner = self.inner.lock().expect("outputs lock");
        let (meta, data, at) = inner.files.get(&(job, name.to_owned()))?;
        (at.elapsed() < self.retention).then(|| (meta.clone(), data.clone()))
    }
}

#[async_trait]
impl OutputStore for EmbeddedOutputs {
    async fn put(&self, job: JobId, name: &str, content_type: &str, data: Bytes) -> Result<FileMeta, OutputError> {
        check(name, &data)?;
        let meta = FileMeta::of(content_type, &data);
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("outputs lock");
        let key = (job, name.to_owned());
        inner.bytes += data.len();
        if let Some((_, old, _)) = inner.files.insert(key.clone(), (meta.clone(), data, now)) {
            inner.bytes -= old.len();
        }
        inner.order.push_back((key, now));
        // Expired first, then the oldest while over budget; `order` may hold stale entries of
        // replaced files, recognised by their timestamp.
        while let Some((key, at)) = inner.order.front().cloned() {
            let expired = at.elapsed() >= self.retention;
            if !expired && inner.bytes <= self.max_bytes {
                break;
            }
            inner.order.pop_front();
            if inner.files.get(&key).is_some_and(|(_, _, t)| *t == at)
                && let Some((_, old, _)) = inner.files.remove(&key)
            {
                inner.bytes -= old.len();
            }
        }
        Ok(meta)
    }

    async fn get(&self, job: JobId, name: &str) -> Result<Option<(FileMeta, Bytes)>, OutputError> {
        Ok(self.lookup(job, name))
    }

    async fn head(&self, job: JobId, name: &str) -> Result<Option<FileMeta>, OutputError> {
        Ok(self.lookup(job, name).map(|(meta, _)| meta))
    }
}

/// Outputs in a directory every gateway and worker mounts: `DIR/<job id>/<name>` and its
/// metadata beside it in `DIR/<job id>/.<name>.meta`, written last so a reader never sees a
/// partial file. Job folders older than the retention are removed by a sweep that runs at most
/// once per [`FsOutputs::SWEEP_EVERY`] from `put`.
pub struct FsOutputs {
    dir: PathBuf,
    retention: Duration,
    last_sweep: Mutex<Option<Instant>>,
}

impl FsOutputs {
    pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

    pub fn new(dir: PathBuf, retention: Duration) -> Self {
        Self { dir, retention, last_sweep: Mutex::new(None) }
    }

    fn paths(&self, job: JobId, name: &str) -> (PathBuf, PathBuf) {
        let folder = self.dir.join(job.to_string());
        (folder.join(name), folder.join(format!(".{name}.meta")))
    }

    fn due_for_sweep(&self) -> bool {
        let mut last = self.last_sweep.lock().expect("sweep lock");
        if last.is_some_and(|t| t.elapsed() < Self::SWEEP_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Removes job folders last written more than the retention ago. Returns how many went.
    pub fn sweep(dir: &Path, retention: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let cutoff = SystemTime::now() - retention;
        entries
            .flatten()
            .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < cutoff))
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<JobId>().is_ok()))
            .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
            .count()
    }

    fn read_meta(path: &Path) -> Result<Option<FileMeta>, OutputError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| OutputError::Unavailable(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(OutputError::Unavailable(format!("{}: {e}", path.display()))),
        }
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn blocking_err(e: tokio::task::JoinError) -> OutputError {
    OutputError::Unavailable(format!("output task failed: {e}"))
}

#[async_trait]
impl OutputStore for FsOutputs {
    async fn put(&self, job: JobId, name: &str, content_type: &str, data: Bytes) -> Result<FileMeta, OutputError> {
        check(name, &data)?;
        let meta = FileMeta::of(content_type, &data);
        let (file, meta_path) = self.paths(job, name);
        let sweep = self.due_for_sweep().then(|| (self.dir.clone(), self.retention));
        let meta_json = serde_json::to_vec(&meta).expect("metadata serialises");
        tokio::task::spawn_blocking(move || {
            if let Some((dir, retention)) = sweep {
                Self::sweep(&dir, retention);
            }
            let folder = file.parent().expect("job folder");
            std::fs::create_dir_all(folder)?;
            write_atomically(&file, &data)?;
            write_atomically(&meta_path, &meta_json)
        })
        .await
        .map_err(blocking_err)?
        .map_err(|e| OutputError::Unavailable(format!("writing {name} of job {job}: {e}")))?;
        Ok(meta)
    }

    async fn get(&self, job: JobId, name: &str) -> Result<Option<(FileMeta, Bytes)>, OutputError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let (file, meta_path) = self.paths(job, name);
        tokio::task::spawn_blocking(move || {
            let Some(meta) = Self::read_meta(&meta_path)? else { return Ok(None) };
            match std::fs::read(&file) {
                Ok(data) => Ok(Some((meta, Bytes::from(data)))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(OutputError::Unavailable(format!("{}: {e}", file.display()))),
            }
        })
        .await
        .map_err(blocking_err)?
    }

    async fn head(&self, job: JobId, name: &str) -> Result<Option<FileMeta>, OutputError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let (_, meta_path) = self.paths(job, name);
        tokio::task::spawn_blocking(move || Self::read_meta(&meta_path)).await.map_err(blocking_err)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_path_safe() {
        assert!(valid_name("image-0.png") && valid_name("a_b.C-1"));
        for bad in ["", ".hidden", "../x", "a/b", "a b", "é.png", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    async fn round_trip(store: &dyn OutputStore) {
        let job = JobId::random();
        let meta = store.put(job, "image-0.png", "image/png", Bytes::from_static(b"png!")).await.unwrap();
        assert_eq!(meta, FileMeta::of("image/png", b"png!"));
        assert_eq!(meta.sha256, hex::encode(Sha256::digest(b"png!")));
        let (got, data) = store.get(job, "image-0.png").await.unwrap().unwrap();
        assert_eq!((got, &data[..]), (meta.clone(), &b"png!"[..]));
        assert_eq!(store.head(job, "image-0.png").await.unwrap(), Some(meta));
        assert!(store.get(job, "image-1.png").await.unwrap().is_none());
        assert!(store.get(JobId::random(), "image-0.png").await.unwrap().is_none());
        assert!(matches!(store.put(job, "../evil", "x", Bytes::new()).await, Err(OutputError::Invalid(_))));
        let too_big = Bytes::from(vec![0u8; MAX_OUTPUT_BYTES + 1]);
        assert!(matches!(store.put(job, "big", "x", too_big).await, Err(OutputError::Invalid(_))));
        // A retried job writes the same name again: the newest wins.
        store.put(job, "image-0.png", "image/png", Bytes::from_static(b"again")).await.unwrap();
        assert_eq!(&store.get(job, "image-0.png").await.unwrap().unwrap().1[..], b"again");
    }

    #[tokio::test]
    async fn embedded_round_trip_and_budget() {
        round_trip(&EmbeddedOutputs::new(Duration::from_secs(60), 1 << 20)).await;
        let small = EmbeddedOutputs::new(Duration::from_secs(60), 10);
        let job = JobId::random();
        small.put(job, "a", "x", Bytes::from_static(b"123456")).await.unwrap();
        small.put(job, "b", "x", Bytes::from_static(b"123456")).await.unwrap();
        assert!(small.get(job, "a").await.unwrap().is_none(), "oldest evicted over budget");
        assert!(small.get(job, "b").await.unwrap().is_some());
        let expired = EmbeddedOutputs::new(Duration::ZERO, 1 << 20);
        expired.put(job, "a", "x", Bytes::from_static(b"1")).await.unwrap();
        assert!(expired.get(job, "a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn filesystem_round_trip_and_sweep() {
        let dir = std::env::temp_dir().join(format!("kiln-outputs-{}", uuid::Uuid::new_v4().simple()));
        round_trip(&FsOutputs::new(dir.clone(), Duration::from_secs(60))).await;
        let folders = || std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(folders(), 1);
        assert_eq!(FsOutputs::sweep(&dir, Duration::from_secs(3600)), 0);
        assert_eq!(FsOutputs::sweep(&dir, Duration::ZERO), 1);
        assert_eq!(folders(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
