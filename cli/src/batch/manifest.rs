//! The crash-safe manifest of a batch: `DIR/manifest.jsonl`, an append-only journal of events
//! (one JSON object per line, each synced to disk before the runner acts on it), and its replay
//! into the latest state of every line.
//!
//! Why a journal and not a rewritten snapshot: a run of thousands of items changes state three
//! times per item; appending one short line is O(1) where an atomic rewrite is O(items) each time.
//! A crash can only tear the last line, which replay recognises (no newline, or not JSON) and
//! skips; the next append starts on a fresh line. Every event is safe to replay twice, and the
//! idempotency key is written *before* the submission, so a crash between the gateway's answer
//! and our record resubmits with the same key and gets the same job back.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::BatchError;

pub const FILE_NAME: &str = "manifest.jsonl";
pub const VERSION: u32 = 1;

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A `kiln batch run` started on this directory.
    Run { version: u32, model: String, input: String, items: usize, at_ms: i64 },
    /// About to submit `line` with `key` (generation `gen`).
    Submit { line: usize, key: String, generation: u32 },
    /// The gateway accepted (or returned, for a known key) job `job` for `line`.
    Accepted { line: usize, key: String, job: String },
    /// Finished and every output is on disk, verified.
    Succeeded { line: usize, job: String, files: Vec<FileEntry> },
    /// A bad line, a request the gateway refused, or a job that ended failed/canceled/expired.
    Failed {
        line: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<String>,
        code: String,
        message: String,
    },
}

/// An output written into the batch directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name in the directory, e.g. `000012-image-0.png` or `000012.json`.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Where a line stands after replaying the journal.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// A submission was started; the job id may or may not exist at the gateway.
    Submitting,
    Accepted {
        job: String,
    },
    Succeeded {
        job: String,
        files: Vec<FileEntry>,
    },
    Failed {
        job: Option<String>,
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemState {
    /// The key of the latest submission (none for a line that never parsed).
    pub key: Option<String>,
    pub generation: u32,
    pub phase: Phase,
}

/// The journal replayed.
#[derive(Debug, Default)]
pub struct Replay {
    pub model: Option<String>,
    /// Items in the input file, as recorded by the latest run.
    pub items: Option<usize>,
    pub runs: usize,
    pub lines: BTreeMap<usize, ItemState>,
    /// Lines that were not events (a torn last line after a crash).
    pub unreadable: usize,
}

impl Replay {
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Run { model, items, .. } => {
                self.model = Some(model);
                self.items = Some(items);
                self.runs += 1;
            }
            Event::Submit { line, key, generation } => {
                self.lines.insert(line, ItemState { key: Some(key), generation, phase: Phase::Submitting });
            }
            Event::Accepted { line, key, job } => {
                let generation =
                    self.lines.get(&line).filter(|s| s.key.as_ref() == Some(&key)).map_or(0, |s| s.generation);
                self.lines.insert(line, ItemState { key: Some(key), generation, phase: Phase::Accepted { job } });
            }
            Event::Succeeded { line, job, files } => {
                let state =
                    self.lines.entry(line).or_insert(ItemState { key: None, generation: 0, phase: Phase::Submitting });
                state.phase = Phase::Succeeded { job, files };
            }
            Event::Failed { line, key, job, code, message } => {
                let state =
                    self.lines.entry(line).or_insert(ItemState { key: None, generation: 0, phase: Phase::Submitting });
                if key.is_some() {
                    state.key = key;
                }
                state.phase = Phase::Failed { job, code, message };
            }
        }
    }

    pub fn parse(text: &str) -> Self {
        let mut replay = Self::default();
        let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
        replay.unreadable += usize::from(complete.len() < text.len());
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Event>(line) {
                Ok(event) => replay.apply(event),
                Err(_) => replay.unreadable += 1,
            }
        }
        replay
    }

    /// Reads `dir`'s manifest without opening it for writing (`kiln batch status`).
    pub fn load(dir: &Path) -> Result<Self, BatchError> {
        let path = dir.join(FILE_NAME);
        let text = std::fs::read_to_string(&path).map_err(|source| BatchError::Manifest { path, source })?;
        Ok(Self::parse(&text))
    }
}

/// The journal open for appending.
pub struct Journal {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Journal {
    /// Opens (or creates) `dir`'s manifest and replays it. A torn last line is cut off so the next
    /// append starts a line of its own.
    pub fn open(dir: &Path) -> Result<(Self, Replay), BatchError> {
        let path = dir.join(FILE_NAME);
        let err = |source| BatchError::Manifest { path: path.clone(), source };
        let mut file = std::fs::OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let text = String::from_utf8_lossy(&bytes);
        let replay = Replay::parse(&text);
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).map_err(err)?;
            file.seek(SeekFrom::End(0)).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        if bytes.is_empty() {
            // A new file: make its directory entry durable too.
            sync_dir(dir).map_err(err)?;
        }
        Ok((Self { path: path.clone(), file: Mutex::new(file) }, replay))
    }

    /// Appends one event and syncs it to disk. Blocking: call it from `spawn_blocking`.
    pub fn append(&self, event: &Event) -> Result<(), BatchError> {
        let mut line = serde_json::to_vec(event).expect("events serialise");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|source| BatchError::Manifest { path: self.path.clone(), source })
    }
}

/// Syncs a directory, so a file created or renamed in it survives a power loss.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(events: &[Event]) -> String {
        events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect()
    }

    #[test]
    fn replay_keeps_the_latest_state_of_each_line() {
        let file = FileEntry { name: "000001.json".into(), size: 3, sha256: "ab".into() };
        let text = lines(&[
            Event::Run { version: 1, model: "m".into(), input: "in".into(), items: 3, at_ms: 0 },
            Event::Submit { line: 1, key: "k1".into(), generation: 0 },
            Event::Submit { line: 2, key: "k2".into(), generation: 0 },
            Event::Accepted { line: 1, key: "k1".into(), job: "j1".into() },
            Event::Accepted { line: 2, key: "k2".into(), job: "j2".into() },
            Event::Succeeded { line: 1, job: "j1".into(), files: vec![file.clone()] },
            Event::Failed { line: 2, key: None, job: Some("j2".into()), code: "canceled".into(), message: "x".into() },
            Event::Submit { line: 2, key: "k2b".into(), generation: 1 },
            Event::Accepted { line: 2, key: "k2b".into(), job: "j2b".into() },
            Event::Failed { line: 3, key: None, job: None, code: "invalid_line".into(), message: "bad".into() },
        ]);
        let r = Replay::parse(&text);
        assert_eq!((r.model.as_deref(), r.items, r.runs, r.unreadable), (Some("m"), Some(3), 1, 0));
        assert_eq!(r.lines[&1].phase, Phase::Succeeded { job: "j1".into(), files: vec![file] });
        assert_eq!(
            r.lines[&2],
            ItemState { key: Some("k2b".into()), generation: 1, phase: Phase::Accepted { job: "j2b".into() } }
        );
        assert_eq!(r.lines[&3].key, None);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_cut_off_before_the_next_append() {
        let dir = std::env::temp_dir().join(format!("kiln-journal-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let whole = lines(&[Event::Submit { line: 1, key: "k1".into(), generation: 0 }]);
        let torn = r#"{"event":"accepted","line":1,"key":"k1","jo"#;
        std::fs::write(dir.join(FILE_NAME), format!("{whole}{torn}")).unwrap();

        let (journal, replay) = Journal::open(&dir).unwrap();
        assert_eq!(replay.unreadable, 1);
        assert_eq!(replay.lines[&1].phase, Phase::Submitting, "the torn event did not happen");
        journal.append(&Event::Accepted { line: 1, key: "k1".into(), job: "j1".into() }).unwrap();
        drop(journal);

        let replay = Replay::load(&dir).unwrap();
        assert_eq!((replay.unreadable, &replay.lines[&1].phase), (0, &Phase::Accepted { job: "j1".into() }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn uuid_like() -> String {
        format!("{}-{:?}", std::process::id(), std::time::SystemTime::now())
            .replace(|c: char| !c.is_ascii_alphanumeric(), "")
    }
}
