//! Reading an audit log back: `verify` walks the whole chain and names the first entry that was
//! changed, removed or reordered (and, with the key, the first checkpoint whose MAC fails);
//! `export` copies the entries of a time range. Both stream the file, one bounded line at a time.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use time::OffsetDateTime;

use super::{AuditEntry, AuditError, Defect, Event, GENESIS, MAX_LINE, checkpoint_mac_ok};

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Sound entries before the first bad one (all of them when none is bad).
    pub entries: u64,
    /// Checkpoints among them.
    pub checkpoints: u64,
    /// Checkpoints whose MAC was checked against the key (0 without a key).
    pub checkpoints_verified: u64,
    /// `seq` of the last sound checkpoint.
    pub last_checkpoint_seq: Option<u64>,
    /// Sound entries after the last checkpoint: protected by the chain only, since no MAC covers
    /// them yet (after a crash, or in a live file).
    pub unsealed: u64,
    pub first_bad: Option<BadEntry>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// The first entry that fails verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// 1-based line number in the file.
    pub line: u64,
    /// The `seq` the line claims, when it can be read.
    pub seq: Option<u64>,
    pub why: Defect,
}

/// Checks the whole file (see the module documentation of `audit` for the rules). With `key`,
/// every checkpoint must carry a MAC made with it. Stops at the first bad entry: nothing after
/// it can be trusted to belong to this chain. Errors only when the file cannot be read.
pub fn verify(path: &Path, key: Option<&[u8]>) -> Result<VerifyReport, AuditError> {
    let read_err = |source| AuditError::Read { path: path.to_owned(), source };
    let mut lines = Lines::new(File::open(path).map_err(read_err)?);
    let mut report = VerifyReport {
        entries: 0,
        checkpoints: 0,
        checkpoints_verified: 0,
        last_checkpoint_seq: None,
        unsealed: 0,
        first_bad: None,
    };
    let mut prev = GENESIS.to_owned();
    while let Some(line) = lines.next().map_err(read_err)? {
        match check(&line, report.entries, &prev, key) {
            Ok((entry, verified)) => {
                report.entries += 1;
                if let Event::Checkpoint { .. } = entry.event {
                    report.checkpoints += 1;
                    report.checkpoints_verified += u64::from(verified);
                    report.last_checkpoint_seq = Some(entry.seq);
                    report.unsealed = 0;
                } else {
                    report.unsealed += 1;
                }
                prev = entry.hash;
            }
            Err((seq, why)) => {
                report.first_bad = Some(BadEntry { line: line.number, seq, why });
                break;
            }
        }
    }
    Ok(report)
}

/// Checks one line as the entry `expected_seq` after `prev`; returns it and whether a MAC was
/// verified, or the `seq` it claims and what is wrong.
fn check(
    line: &Line,
    expected_seq: u64,
    prev: &str,
    key: Option<&[u8]>,
) -> Result<(AuditEntry, bool), (Option<u64>, Defect)> {
    let claimed_seq = || serde_json::from_slice::<serde_json::Value>(&line.bytes).ok()?.get("seq")?.as_u64();
    match line.state {
        LineState::Complete => {}
        LineState::Torn => return Err((claimed_seq(), Defect::Torn)),
        LineState::TooLong => return Err((None, Defect::TooLong)),
    }
    let entry = AuditEntry::parse_sealed(&line.bytes).map_err(|d| (claimed_seq(), d))?;
    let seq = Some(entry.seq);
    if entry.seq != expected_seq {
        return Err((seq, Defect::SeqOutOfOrder { expected: expected_seq, found: entry.seq }));
    }
    if entry.prev != prev {
        return Err((seq, Defect::PrevMismatch));
    }
    let verified = match (&entry.event, key) {
        (Event::Checkpoint { mac: None }, Some(_)) => return Err((seq, Defect::Unsigned)),
        (Event::Checkpoint { mac: Some(mac) }, Some(key)) => {
            if !checkpoint_mac_ok(key, &entry.prev, mac) {
                return Err((seq, Defect::MacMismatch));
            }
            true
        }
        (Event::Checkpoint { .. } | Event::Request(_) | Event::Recovered { .. } | Event::Dropped { .. }, _) => false,
    };
    Ok((entry, verified))
}

/// Writes the lines whose `at` is in `[since, until)` (either bound open when `None`) to `out`,
/// unchanged, each with its `\n`; returns how many. An incomplete last line (the writer is
/// mid-write) is skipped; any other unreadable line is an error naming it. Entries are not
/// verified: run [`verify`] for that.
pub fn export(
    path: &Path,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    mut out: impl Write,
) -> Result<u64, AuditError> {
    let read_err = |source| AuditError::Read { path: path.to_owned(), source };
    let mut lines = Lines::new(File::open(path).map_err(read_err)?);
    let mut written = 0;
    while let Some(line) = lines.next().map_err(read_err)? {
        let unreadable = |defect| AuditError::Unreadable { line: line.number, defect };
        match line.state {
            LineState::Complete => {}
            LineState::Torn => break,
            LineState::TooLong => return Err(unreadable(Defect::TooLong)),
        }
        let entry: AuditEntry =
            serde_json::from_slice(&line.bytes).map_err(|e| unreadable(Defect::NotAnEntry(e.to_string())))?;
        let at = entry.time().map_err(unreadable)?;
        if since.is_some_and(|s| at < s) || until.is_some_and(|u| at >= u) {
            continue;
        }
        out.write_all(&line.bytes).and_then(|()| out.write_all(b"\n")).map_err(AuditError::Output)?;
        written += 1;
    }
    out.flush().map_err(AuditError::Output)?;
    Ok(written)
}

enum LineState {
    Complete,
    /// The file ends without a `\n`.
    Torn,
    TooLong,
}

struct Line {
    number: u64,
    /// Without the `\n`.
    bytes: Vec<u8>,
    state: LineState,
}

/// A file's lines, each read into at most [`MAX_LINE`] + 1 bytes.
struct Lines<R> {
    reader: BufReader<R>,
    number: u64,
    done: bool,
}

impl<R: Read> Lines<R> {
    fn new(r: R) -> Self {
        Self { reader: BufReader::with_capacity(256 * 1024, r), number: 0, done: false }
    }

    fn next(&mut self) -> std::io::Result<Option<Line>> {
        if self.done {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut bytes)?;
        if n == 0 {
            return Ok(None);
        }
        self.number += 1;
        let state = if bytes.last() == Some(&b'\n') {
            bytes.pop();
            LineState::Complete
        } else if bytes.len() > MAX_LINE {
            self.done = true;
            LineState::TooLong
        } else {
            self.done = true;
            LineState::Torn
        };
        Ok(Some(Line { number: self.number, bytes, state }))
    }
}
