//! The tamper-evident audit log of API calls: its entry format and hash chain (this file), the
//! writer that appends it durably off the request path (`writer`), and verification and export
//! (`verify`). The file is the source of truth; a Redis stream can mirror it.
//!
//! # File format
//!
//! One file per gateway, UTF-8 JSON lines, each line one entry ending in `\n`, appended only.
//! Every entry has `seq` (0, 1, 2, … with no gaps), `at` (UTC, RFC 3339 with exactly three
//! fractional digits and `Z`, e.g. `2025-06-01T12:00:00.123Z`; for a request, when the gateway
//! recorded it, so between concurrent requests `at` may step back a little from one `seq` to the
//! next), `kind`, the fields of its kind, `prev` and `hash`. Kinds:
//!
//! - `request`: one API call. `key_id`, `tenant` (absent when unknown), `method`, `route` (the
//!   route pattern, `/v1/jobs/{id}`), `job_id`, `body_sha256` (hex SHA-256 of the request body,
//!   never the body), `decision` (`allowed` | `denied`), `reason` (why it was denied:
//!   `unauthorized`, `forbidden`, `rate_limited`, …), `status` (the HTTP status answered).
//! - `checkpoint`: `mac` = lowercase hex HMAC-SHA256(key, the 64 ASCII hex characters of this
//!   entry's `prev`), i.e. a signature over the whole chain before it. Written after every
//!   `KILN_AUDIT_CHECKPOINT_EVERY` other entries, on clean shutdown, and on opening a file whose
//!   last entry is not one. `mac` is absent when no key is configured.
//! - `recovered`: written on open after a torn last line (a crash mid-write) was cut off:
//!   `truncated_bytes` and `torn_sha256` (hex SHA-256 of the bytes removed).
//! - `dropped`: `count` request entries the gateway recorded that never reached the file (the
//!   writer's queue was full, or a write failed) since the entry before this one.
//!
//! # Canonical form and hash chain
//!
//! The canonical form `C` of an entry is its JSON object without `hash`: compact (no whitespace),
//! keys in this order: `seq`, `at`, `kind`, then the kind's fields in the order listed above, then
//! `prev`; optional fields that are absent are omitted (never `null`); strings escaped minimally
//! (only `"`, `\` and control characters: `\b \f \n \r \t`, others `\u00XX` with lowercase hex;
//! non-ASCII as raw UTF-8); integers in decimal. The stored line is `C` with
//! `,"hash":"<hash>"` inserted before its closing `}` — so `C` is recovered from a line by
//! removing its last member.
//!
//! `hash` = lowercase hex SHA-256 of the bytes `prev ‖ C`, where `prev` is the 64 ASCII hex
//! characters of the previous entry's `hash` (64 `0`s for the entry with `seq` 0).
//!
//! To verify, for each line in order: take `C` as above, check the line's fields re-encode to
//! exactly `C` (so no field can hide from the hash), check `hash`, check `seq` is one more than
//! the previous entry's and `prev` equals its `hash`, and with the key check each checkpoint's
//! `mac`. Any edit, removal or reordering breaks the first affected line's check. SHA-256 alone
//! is keyless: whoever can write the file can recompute every hash after an edit. The
//! checkpoint MACs are what such a rewrite cannot forge, so verify with the key; entries after
//! the last checkpoint are protected by the chain only (the report says how many).

use std::fmt;
use std::path::PathBuf;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::Secret;

mod events;
mod verify;
mod writer;

pub use verify::{BadEntry, VerifyReport, export, verify};
pub use writer::AuditLog;

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line the writer produces, and the longest one verify and recovery accept.
pub const MAX_LINE: usize = 64 * 1024;

/// Longest text field the writer keeps (bytes, cut at a character boundary), so an entry stays
/// far below [`MAX_LINE`] even with every character escaped.
pub const MAX_FIELD: usize = 512;

pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
pub const DEFAULT_QUEUE: usize = 65_536;
pub const DEFAULT_REDIS_MAXLEN: u64 = 100_000;

/// Shortest accepted checkpoint key, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// Where and how the gateway keeps its audit log.
#[derive(clap::Args, Clone)]
pub struct AuditConfig {
    /// Append the audit log (hash-chained JSON lines, one entry per API call) to this file; give
    /// each gateway its own. On start the chain continues from the file's last entry. Unset: no
    /// audit log.
    #[arg(long, env = "KILN_AUDIT_FILE")]
    pub audit_file: Option<std::path::PathBuf>,
    /// Key of the HMAC-SHA256 that signs the log's checkpoints (at least 16 bytes); the same key
    /// verifies them (`kiln audit verify --key`). Unset: checkpoints are unsigned, and a rewrite of
    /// the whole file cannot be told from the original. Never logged.
    #[arg(long, env = "KILN_AUDIT_KEY")]
    pub audit_key: Option<Secret>,
    /// Entries between two signed checkpoints.
    #[arg(long, env = "KILN_AUDIT_CHECKPOINT_EVERY", default_value_t = DEFAULT_CHECKPOINT_EVERY,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_every: u64,
    /// Also append every entry to this Redis stream (XADD on the job store's Redis), for
    /// shipping elsewhere. Best effort: while Redis is down entries are missing from the stream,
    /// never from the file.
    #[arg(long, env = "KILN_AUDIT_REDIS_STREAM")]
    pub audit_redis_stream: Option<String>,
    /// Approximate length the Redis stream is trimmed to (`MAXLEN ~`).
    #[arg(long, env = "KILN_AUDIT_REDIS_MAXLEN", default_value_t = DEFAULT_REDIS_MAXLEN)]
    pub audit_redis_maxlen: u64,
    /// Entries waiting for the writer at most. When full, further entries are dropped (counted in
    /// `kiln_audit_dropped_total`, and noted in the log as a `dropped` entry) instead of making
    /// requests wait on the disk.
    #[arg(long, env = "KILN_AUDIT_QUEUE", default_value_t = DEFAULT_QUEUE,
          value_parser = parse_queue)]
    pub audit_queue: usize,
}

fn parse_queue(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a queue size of at least 1")),
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            audit_file: None,
            audit_key: None,
            audit_checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            audit_redis_stream: None,
            audit_redis_maxlen: DEFAULT_REDIS_MAXLEN,
            audit_queue: DEFAULT_QUEUE,
        }
    }
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("audit_file", &self.audit_file)
            .field("audit_key", &self.audit_key.as_ref().map(|_| format_args!("<redacted>")))
            .field("audit_checkpoint_every", &self.audit_checkpoint_every)
            .field("audit_redis_stream", &self.audit_redis_stream)
            .field("audit_redis_maxlen", &self.audit_redis_maxlen)
            .field("audit_queue", &self.audit_queue)
            .finish()
    }
}

/// What is wrong with one line of an audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Defect {
    #[error("not an audit entry: {0}")]
    NotAnEntry(String),
    #[error("not in canonical form (a field was added, reordered or re-encoded)")]
    NotCanonical,
    #[error("hash does not match the entry's content (the entry was changed)")]
    HashMismatch,
    #[error("seq {found} where {expected} was expected (an entry was removed, reordered or duplicated)")]
    SeqOutOfOrder { expected: u64, found: u64 },
    #[error("prev does not match the hash of the entry before it (an entry was removed or reordered)")]
    PrevMismatch,
    #[error("checkpoint has no mac")]
    Unsigned,
    #[error("checkpoint mac does not match (the chain before it was rewritten, or the key is wrong)")]
    MacMismatch,
    #[error("incomplete last line (a torn write, or the writer is mid-write)")]
    Torn,
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
}

/// Errors of opening, writing, verifying and exporting an audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit config: {0}")]
    Config(&'static str),
    #[error("cannot open the audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the audit log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the audit log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The last complete line of an existing file is not a sound entry, so the chain cannot be
    /// continued from it; an operator must look at the file (or move it aside).
    #[error("the audit log {path} cannot be continued: its last entry (at byte {offset}) is bad")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        #[source]
        defect: Defect,
    },
    #[error("line {line} of the audit log is unreadable")]
    Unreadable {
        line: u64,
        #[source]
        defect: Defect,
    },
    #[error("bad Redis URL for the audit stream")]
    RedisUrl(#[source] redis::RedisError),
    #[error("the audit stream needs a tokio runtime to run in")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    #[error("cannot start the audit writer thread")]
    Thread(#[source] std::io::Error),
    #[error("the audit writer has stopped")]
    WriterStopped,
    #[error("cannot write the export")]
    Output(#[source] std::io::Error),
}

/// `allowed` or `denied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Denied,
}

/// One API call, as the gateway records it and as a `request` entry stores it. Holds ids and
/// digests only: the API key's id (never the key) and the body's SHA-256 (never the body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub method: String,
    /// The route pattern (`/v1/jobs/{id}`), not the path, so ids stay in `job_id`.
    pub route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// See [`body_sha256`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub status: u16,
}

impl NewEntry {
    /// Cuts every text field to [`MAX_FIELD`] bytes.
    fn bounded(mut self) -> Self {
        for s in [&mut self.method, &mut self.route] {
            truncate(s);
        }
        for s in [&mut self.key_id, &mut self.tenant, &mut self.job_id, &mut self.body_sha256, &mut self.reason]
            .into_iter()
            .flatten()
        {
            truncate(s);
        }
        self
    }
}

fn truncate(s: &mut String) {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Hex SHA-256 of a request body, for [`NewEntry::body_sha256`].
pub fn body_sha256(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// What an entry records; `kind` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Request(NewEntry),
    Checkpoint {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    Recovered {
        truncated_bytes: u64,
        torn_sha256: String,
    },
    Dropped {
        count: u64,
    },
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: String,
    #[serde(flatten)]
    pub event: Event,
    pub prev: String,
    pub hash: String,
}

/// The canonical form: the entry without `hash`, fields in file order.
#[derive(Serialize)]
struct Unsealed<'a> {
    seq: u64,
    at: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    prev: &'a str,
}

impl AuditEntry {
    /// The entry `seq` after the one whose hash is `prev`, with its hash.
    pub fn seal(seq: u64, at: String, event: Event, prev: String) -> Self {
        let mut entry = Self { seq, at, event, prev, hash: String::new() };
        entry.hash = chain_hash(&entry.prev, &entry.canonical());
        entry
    }

    /// The canonical form `C` (see the module documentation).
    pub fn canonical(&self) -> String {
        let unsealed = Unsealed { seq: self.seq, at: &self.at, event: &self.event, prev: &self.prev };
        serde_json::to_string(&unsealed).expect("an audit entry serialises")
    }

    /// The line as stored, without its `\n`.
    pub fn to_line(&self) -> String {
        seal_line(&self.canonical(), &self.hash)
    }

    /// Parses a stored line and checks it on its own: canonical form and hash. The chain (`seq`,
    /// `prev`) and checkpoint MACs need the entries around it.
    pub fn parse_sealed(line: &[u8]) -> Result<Self, Defect> {
        let entry: Self = serde_json::from_slice(line).map_err(|e| Defect::NotAnEntry(e.to_string()))?;
        let canonical = entry.canonical();
        if seal_line(&canonical, &entry.hash).as_bytes() != line {
            return Err(Defect::NotCanonical);
        }
        if chain_hash(&entry.prev, &canonical) != entry.hash {
            return Err(Defect::HashMismatch);
        }
        Ok(entry)
    }

    /// `at` as a time.
    pub fn time(&self) -> Result<OffsetDateTime, Defect> {
        OffsetDateTime::parse(&self.at, &Rfc3339).map_err(|e| Defect::NotAnEntry(format!("at: {e}")))
    }
}

fn seal_line(canonical: &str, hash: &str) -> String {
    let body = canonical.strip_suffix('}').expect("canonical JSON is an object");
    format!("{body},\"hash\":\"{hash}\"}}")
}

/// Lowercase hex SHA-256 of `prev ‖ canonical`.
pub fn chain_hash(prev: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// A checkpoint's `mac`: lowercase hex HMAC-SHA256(key, `prev`).
pub fn checkpoint_mac(key: &[u8], prev: &str) -> String {
    let mut m = mac(key);
    m.update(prev.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Whether `mac` is the checkpoint MAC of `prev` under `key` (in constant time).
pub fn checkpoint_mac_ok(key: &[u8], prev: &str, mac_hex: &str) -> bool {
    let Ok(tag) = hex::decode(mac_hex) else { return false };
    let mut m = mac(key);
    m.update(prev.as_bytes());
    m.verify_slice(&tag).is_ok()
}

/// `t` as an entry's `at`: UTC, milliseconds, `Z`.
pub fn format_at(t: OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(time::UtcOffset::UTC).format(&fmt).expect("a UTC time formats")
}

/// Parses an RFC 3339 time (`2025-06-01T12:00:00Z`, `2025-06-01T14:00:00.5+02:00`), as
/// `kiln audit export --since/--until` take it.
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}
