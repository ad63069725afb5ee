//! The audit log's writer: the cheap handle the request path records through (a bounded queue,
//! never waited on), the one thread that owns the file (it assigns `seq`, `prev` and `hash`,
//! appends each batch and `sync_data`s it before taking the next), reopening an existing file
//! where its chain left off (cutting a torn last line and saying so in a `recovered` entry), and
//! the best-effort mirror to a Redis stream.
//!
//! When the queue is full an entry is dropped, not waited for: a slow disk must not turn into an
//! API outage, and a request that waited on the audit queue would hold its connection and its
//! admission slot while it did. Drops are not silent: each is counted in
//! `kiln_audit_dropped_total`, logged (once per burst), and the next entry written is a `dropped`
//! entry with their number, so the log itself shows where it is incomplete. A gateway that must
//! refuse what it cannot audit can do so: [`AuditLog::record`] says whether the entry was queued.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    AuditConfig, AuditEntry, AuditError, Defect, Event, GENESIS, MAX_LINE, MIN_KEY_BYTES, NewEntry, checkpoint_mac,
    events, format_at,
};
use crate::config::Secret;

/// Entries the writer appends (and syncs) at once at most.
const MAX_BATCH: usize = 1024;
/// Batches waiting for the Redis mirror at most; beyond it they are dropped from the stream.
const MIRROR_QUEUE: usize = 256;
const MIRROR_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MIRROR_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `close` waits for the mirror to send what it holds before abandoning it.
const MIRROR_DRAIN: Duration = Duration::from_secs(5);

enum Msg {
    Record(NewEntry, String),
    Close(oneshot::Sender<Result<(), AuditError>>),
}

/// Handle to a gateway's audit log; clones share one writer. [`AuditLog::disabled`] (and
/// [`AuditLog::open`] without a file) records nothing.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    /// Entries dropped since the writer last noted them in a `dropped` entry.
    dropped: Arc<AtomicU64>,
    mirror: TaskTracker,
    mirror_stop: CancellationToken,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("enabled", &self.is_enabled()).finish()
    }
}

impl AuditLog {
    /// A log that records nothing.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Opens (or creates) `config.audit_file` and starts its writer thread; with
    /// `audit_redis_stream` set, also the mirror to that stream on `redis_url` (which then needs
    /// a tokio runtime). An existing file's chain is continued from its last entry; a torn last
    /// line is cut off and a `recovered` entry written, and an unsealed tail (a crash) gets a
    /// checkpoint, before this returns. Without a file: [`AuditLog::disabled`].
    pub fn open(config: &AuditConfig, redis_url: Option<&Secret>) -> Result<Self, AuditError> {
        let Some(path) = &config.audit_file else { return Ok(Self::disabled()) };
        let key = config.audit_key.as_ref().map(|k| k.expose().as_bytes().to_vec());
        if key.as_ref().is_some_and(|k| k.len() < MIN_KEY_BYTES) {
            return Err(AuditError::Config("KILN_AUDIT_KEY must be at least 16 bytes"));
        }
        if key.is_none() {
            events::unsigned(path);
        }
        let (mirror_tx, mirror, mirror_stop) = match (&config.audit_redis_stream, redis_url) {
            (Some(stream), Some(url)) => {
                let (tx, tracker, stop) = spawn_mirror(url, stream.clone(), config.audit_redis_maxlen)?;
                (Some(tx), tracker, stop)
            }
            (Some(_), None) => return Err(AuditError::Config("KILN_AUDIT_REDIS_STREAM needs a Redis URL")),
            (None, _) => (None, TaskTracker::new(), CancellationToken::new()),
        };
        let (chain, written) = Chain::open(path, key, config.audit_checkpoint_every)?;
        let mut writer = Writer { chain, mirror: mirror_tx };
        writer.mirror(written);
        let (tx, rx) = mpsc::channel(config.audit_queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("kiln-audit".into())
            .spawn(move || writer.run(rx, &counter))
            .map_err(AuditError::Thread)?;
        Ok(Self { inner: Some(Arc::new(Inner { tx, dropped, mirror, mirror_stop })) })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues one API call's entry, stamped with the time now; never waits. Returns whether it was
    /// queued: `false` when the queue is full (or the log closed) and the entry is dropped (see
    /// the module documentation), and `true` on a disabled log.
    pub fn record(&self, entry: NewEntry) -> bool {
        let Some(inner) = &self.inner else { return true };
        let at = format_at(OffsetDateTime::now_utc());
        match inner.tx.try_send(Msg::Record(entry.bounded(), at)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let before = inner.dropped.fetch_add(1, Ordering::Relaxed);
                events::queue_full(before == 0);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Nothing consumes the counter any more, so this warns once.
                let before = inner.dropped.fetch_add(1, Ordering::Relaxed);
                events::closed_drop(before == 0);
                false
            }
        }
    }

    /// Writes everything queued so far (from every clone), then a final checkpoint, and stops the
    /// writer; waits up to 5 s for the Redis mirror to send what it holds. Entries recorded
    /// through other clones after this are dropped. The error is that of the last write.
    pub async fn close(self) -> Result<(), AuditError> {
        let Some(inner) = self.inner else { return Ok(()) };
        let (ack, done) = oneshot::channel();
        inner.tx.send(Msg::Close(ack)).await.map_err(|_| AuditError::WriterStopped)?;
        let result = done.await.map_err(|_| AuditError::WriterStopped)?;
        inner.mirror.close();
        if tokio::time::timeout(MIRROR_DRAIN, inner.mirror.wait()).await.is_err() {
            events::mirror_abandoned();
            inner.mirror_stop.cancel();
        }
        result
    }
}

/// The chain's state and the file, owned by the writer thread.
struct Chain {
    path: PathBuf,
    file: File,
    /// Bytes of sound entries in the file; a failed write is cut back to this.
    len: u64,
    next_seq: u64,
    prev: String,
    /// Entries other than checkpoints since the last checkpoint.
    since_checkpoint: u64,
    key: Option<Vec<u8>>,
    every: u64,
    /// Request entries lost to failed writes, not yet noted in a `dropped` entry.
    lost: u64,
    /// A failed write could not be cut back: nothing more is appended to this file.
    broken: bool,
}

/// The chain's state before a batch, to return to when its write fails.
struct Mark {
    next_seq: u64,
    prev: String,
    since_checkpoint: u64,
}

/// Entries of one batch: `(seq, line)` with the line's `\n`.
type Lines = Vec<(u64, String)>;

impl Chain {
    /// Opens the file and continues its chain; returns the entries that recovery wrote.
    fn open(path: &Path, key: Option<Vec<u8>>, every: u64) -> Result<(Self, Lines), AuditError> {
        let open_err = |source| AuditError::Open { path: path.to_owned(), source };
        let read_err = |source| AuditError::Read { path: path.to_owned(), source };
        let existed = path.exists();
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(open_err)?;
        if !existed {
            sync_parent(path).map_err(open_err)?;
        }
        let len = file.metadata().map_err(read_err)?.len();
        let corrupt = |offset, defect| AuditError::Corrupt { path: path.to_owned(), offset, defect };
        let tail = read_tail(&mut file, len).map_err(read_err)?.ok_or_else(|| corrupt(len, Defect::TooLong))?;
        let (next_seq, prev, sealed) = match &tail.last {
            None => (0, GENESIS.to_owned(), true),
            Some((offset, line)) => {
                let entry = AuditEntry::parse_sealed(line).map_err(|d| corrupt(*offset, d))?;
                (entry.seq + 1, entry.hash, matches!(entry.event, Event::Checkpoint { .. }))
            }
        };
        let mut chain = Self {
            path: path.to_owned(),
            file,
            len: tail.complete_end,
            next_seq,
            prev,
            since_checkpoint: if sealed { 0 } else { 1 },
            key,
            every,
            lost: 0,
            broken: false,
        };
        let mut lines = Lines::new();
        if let Some(torn) = &tail.torn {
            chain.file.set_len(tail.complete_end).map_err(|source| chain.write_err(source))?;
            events::recovered(path, torn.len());
            let torn_sha256 = hex::encode(Sha256::digest(torn));
            chain.push(Event::Recovered { truncated_bytes: torn.len() as u64, torn_sha256 }, &mut lines);
        }
        if chain.since_checkpoint > 0 {
            chain.checkpoint(&mut lines);
        }
        if !lines.is_empty() {
            chain.append(&lines).map_err(|source| chain.write_err(source))?;
        }
        Ok((chain, lines))
    }

    fn write_err(&self, source: std::io::Error) -> AuditError {
        AuditError::Write { path: self.path.clone(), source }
    }

    fn mark(&self) -> Mark {
        Mark { next_seq: self.next_seq, prev: self.prev.clone(), since_checkpoint: self.since_checkpoint }
    }

    fn reset(&mut self, mark: Mark) {
        self.next_seq = mark.next_seq;
        self.prev = mark.prev;
        self.since_checkpoint = mark.since_checkpoint;
    }

    fn push(&mut self, event: Event, lines: &mut Lines) {
        self.push_at(event, format_at(OffsetDateTime::now_utc()), lines);
    }

    fn push_at(&mut self, event: Event, at: String, lines: &mut Lines) {
        match event {
            Event::Checkpoint { .. } => self.since_checkpoint = 0,
            Event::Request(_) | Event::Recovered { .. } | Event::Dropped { .. } => self.since_checkpoint += 1,
        }
        let entry = AuditEntry::seal(self.next_seq, at, event, std::mem::take(&mut self.prev));
        let mut line = entry.to_line();
        debug_assert!(line.len() <= MAX_LINE);
        line.push('\n');
        lines.push((entry.seq, line));
        self.next_seq += 1;
        self.prev = entry.hash;
    }

    fn checkpoint(&mut self, lines: &mut Lines) {
        let mac = self.key.as_deref().map(|k| checkpoint_mac(k, &self.prev));
        self.push(Event::Checkpoint { mac }, lines);
    }

    /// Appends the lines in one write and syncs them.
    fn append(&mut self, lines: &Lines) -> std::io::Result<()> {
        let bytes: String = lines.iter().map(|(_, l)| l.as_str()).collect();
        self.file.seek(SeekFrom::Start(self.len))?;
        self.file.write_all(bytes.as_bytes())?;
        self.file.sync_data()?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Cuts a failed write's partial bytes off, so the file ends with a sound entry again.
    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_data()
    }
}

struct Writer {
    chain: Chain,
    mirror: Option<mpsc::Sender<Lines>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>, dropped: &AtomicU64) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut acks = Vec::new();
        loop {
            if rx.blocking_recv_many(&mut batch, MAX_BATCH) == 0 {
                // Every handle is gone without a close: write what is noted, then seal.
                let _ = self.write_batch(Vec::new(), dropped, true);
                return;
            }
            let mut requests = Vec::with_capacity(batch.len());
            for msg in batch.drain(..) {
                match msg {
                    Msg::Record(entry, at) => requests.push((entry, at)),
                    Msg::Close(ack) => acks.push(ack),
                }
            }
            let closing = !acks.is_empty();
            if closing {
                // What is already queued still goes in; nothing after it.
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    match msg {
                        Msg::Record(entry, at) => requests.push((entry, at)),
                        Msg::Close(ack) => acks.push(ack),
                    }
                }
            }
            let result = self.write_batch(requests, dropped, closing);
            if closing {
                // The mirror ends once it has sent what it holds.
                self.mirror = None;
                let mut result = Some(result);
                for ack in acks.drain(..) {
                    let r = match result.take() {
                        Some(r) => r,
                        None => Ok(()),
                    };
                    let _ = ack.send(r);
                }
                return;
            }
        }
    }

    /// Writes one batch: a `dropped` entry when drops are unnoted, the requests with their
    /// periodic checkpoints, and a final checkpoint when `seal`.
    fn write_batch(
        &mut self,
        requests: Vec<(NewEntry, String)>,
        dropped: &AtomicU64,
        seal: bool,
    ) -> Result<(), AuditError> {
        let chain = &mut self.chain;
        let count = requests.len() as u64;
        if chain.broken {
            dropped.fetch_add(count, Ordering::Relaxed);
            events::write_dropped(count);
            return Err(AuditError::WriterStopped);
        }
        let mark = chain.mark();
        let unnoted = dropped.swap(0, Ordering::Relaxed) + chain.lost;
        let mut lines = Lines::with_capacity(requests.len() + 2);
        if unnoted > 0 {
            events::drops_noted(unnoted);
            chain.push(Event::Dropped { count: unnoted }, &mut lines);
        }
        for (entry, at) in requests {
            chain.push_at(Event::Request(entry), at, &mut lines);
            if chain.since_checkpoint >= chain.every {
                chain.checkpoint(&mut lines);
            }
        }
        if seal && chain.since_checkpoint > 0 {
            chain.checkpoint(&mut lines);
        }
        if lines.is_empty() {
            return Ok(());
        }
        match chain.append(&lines) {
            Ok(()) => {
                chain.lost = 0;
                events::written(lines.len());
                self.mirror(lines);
                Ok(())
            }
            Err(source) => {
                events::write_failed(&chain.path, &source, count);
                chain.reset(mark);
                chain.lost = unnoted + count;
                if let Err(e) = chain.cut_back() {
                    events::broken(&chain.path, &e);
                    chain.broken = true;
                }
                Err(chain.write_err(source))
            }
        }
    }

    fn mirror(&mut self, lines: Lines) {
        let Some(tx) = &self.mirror else { return };
        if lines.is_empty() {
            return;
        }
        let n = lines.len();
        match tx.try_send(lines) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => events::mirror_dropped("queue_full", n),
            Err(mpsc::error::TrySendError::Closed(_)) => events::mirror_dropped("closed", n),
        }
    }
}

/// Starts the task that XADDs each written batch to `stream`, trimmed to about `maxlen`.
fn spawn_mirror(
    url: &Secret,
    stream: String,
    maxlen: u64,
) -> Result<(mpsc::Sender<Lines>, TaskTracker, CancellationToken), AuditError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(AuditError::NoRuntime)?;
    let client = redis::Client::open(url.expose()).map_err(AuditError::RedisUrl)?;
    let config = crate::store::redis::connection_config(MIRROR_CONNECT_TIMEOUT, MIRROR_IO_TIMEOUT);
    let _guard = runtime.enter();
    let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(AuditError::RedisUrl)?;
    let (tx, mut rx) = mpsc::channel::<Lines>(MIRROR_QUEUE);
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    tracker.spawn_on(
        async move {
            let mut failing = false;
            loop {
                let lines = tokio::select! {
                    () = cancelled.cancelled() => return,
                    lines = rx.recv() => match lines { Some(l) => l, None => return },
                };
                let mut pipe = redis::pipe();
                for (seq, line) in &lines {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(maxlen)
                        .arg("*")
                        .arg("seq")
                        .arg(*seq)
                        .arg("entry")
                        .arg(line.trim_end_matches('\n'))
                        .ignore();
                }
                let mut conn = conn.clone();
                let sent = tokio::select! {
                    () = cancelled.cancelled() => return,
                    sent = pipe.query_async::<()>(&mut conn) => sent,
                };
                match sent {
                    Ok(()) if failing => {
                        failing = false;
                        events::mirror_resumed();
                    }
                    Ok(()) => {}
                    Err(e) => {
                        events::mirror_failed(&e, lines.len(), !failing);
                        failing = true;
                    }
                }
            }
        },
        &runtime,
    );
    Ok((tx, tracker, stop))
}

/// The end of a file: where its complete lines end, the torn bytes after them (no `\n`), and
/// its last complete line with its offset.
struct Tail {
    complete_end: u64,
    torn: Option<Vec<u8>>,
    last: Option<(u64, Vec<u8>)>,
}

/// Reads at most two lines' worth from the end, never the whole file. `None`: no line break where
/// one must be (a line longer than [`MAX_LINE`]).
fn read_tail(file: &mut File, len: u64) -> std::io::Result<Option<Tail>> {
    let window = len.min(2 * MAX_LINE as u64 + 2);
    let base = len - window;
    let mut buf = vec![0; window as usize];
    file.seek(SeekFrom::Start(base))?;
    file.read_exact(&mut buf)?;
    let (complete, torn) = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) if i + 1 == buf.len() => (buf.len(), None),
        Some(i) => (i + 1, Some(buf[i + 1..].to_vec())),
        None if base == 0 => (0, (!buf.is_empty()).then(|| buf.clone())),
        None => return Ok(None),
    };
    let last = if complete == 0 {
        None
    } else {
        let body = &buf[..complete - 1];
        match body.iter().rposition(|&b| b == b'\n') {
            Some(j) => Some((base + j as u64 + 1, body[j + 1..].to_vec())),
            None if base == 0 => Some((0, body.to_vec())),
            None => return Ok(None),
        }
    };
    Ok(Some(Tail { complete_end: base + complete as u64, torn, last }))
}

/// Makes a new file's directory entry durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(content: &[u8]) -> Tail {
        let dir = std::env::temp_dir().join(format!("kiln-audit-tail-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&dir, content).unwrap();
        let mut f = File::open(&dir).unwrap();
        let t = read_tail(&mut f, content.len() as u64).unwrap().unwrap();
        std::fs::remove_file(&dir).unwrap();
        t
    }

    #[test]
    fn the_tail_is_split_into_last_line_and_torn_bytes() {
        let t = tail_of(b"");
        assert!(t.last.is_none() && t.torn.is_none() && t.complete_end == 0);
        let t = tail_of(b"a\nbc\n");
        assert_eq!((t.complete_end, t.torn, t.last), (5, None, Some((2, b"bc".to_vec()))));
        let t = tail_of(b"a\nbc\nde");
        assert_eq!((t.complete_end, t.torn, t.last), (5, Some(b"de".to_vec()), Some((2, b"bc".to_vec()))));
        let t = tail_of(b"abc\n");
        assert_eq!((t.complete_end, t.torn, t.last), (4, None, Some((0, b"abc".to_vec()))));
        let t = tail_of(b"ab");
        assert_eq!((t.complete_end, t.torn, t.last), (0, Some(b"ab".to_vec()), None));
    }
}
