//! The audit log: its chain continues across a restart, verify names the first changed, removed,
//! reordered or torn entry and (with the key) a rewritten chain, a torn last line is recovered on
//! reopen, export selects a time range, a full queue drops and says so, and the Redis stream
//! mirrors the file (and being down costs the file nothing).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_common::audit::{
    AuditConfig, AuditEntry, AuditError, AuditLog, BadEntry, Decision, Defect, Event, GENESIS, NewEntry, body_sha256,
    export, format_at, parse_time, verify,
};
use kiln_common::config::Secret;
use kiln_common::testing::{service_urls, unique_prefix};
use sha2::{Digest, Sha256};

const KEY: &str = "test-audit-key-0123456789abcdef";

/// A fresh directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-audit-{}", unique_prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn log(&self) -> PathBuf {
        self.0.join("audit.jsonl")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(path: &Path, key: Option<&str>, every: u64) -> AuditConfig {
    AuditConfig {
        audit_file: Some(path.to_owned()),
        audit_key: key.map(Secret::new),
        audit_checkpoint_every: every,
        ..AuditConfig::default()
    }
}

/// The `i`th request: every third one denied.
fn request(i: usize) -> NewEntry {
    let denied = i % 3 == 2;
    NewEntry {
        key_id: Some(format!("key-{i}")),
        tenant: i.is_multiple_of(2).then(|| "acme".to_owned()),
        method: "POST".into(),
        route: "/v1/jobs".into(),
        job_id: (!denied).then(|| format!("job-{i}")),
        body_sha256: Some(body_sha256(format!("{{\"n\":{i}}}").as_bytes())),
        decision: if denied { Decision::Denied } else { Decision::Allowed },
        reason: denied.then(|| "forbidden".to_owned()),
        status: if denied { 403 } else { 202 },
    }
}

/// Opens the log, records requests `from..to`, and closes it.
async fn session(config: &AuditConfig, from: usize, to: usize) {
    let log = AuditLog::open(config, None).expect("open the audit log");
    for i in from..to {
        assert!(log.record(request(i)), "entry {i} was dropped");
    }
    log.close().await.expect("close the audit log");
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

fn entries(path: &Path) -> Vec<AuditEntry> {
    lines(path).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn kinds(path: &Path) -> Vec<&'static str> {
    entries(path)
        .iter()
        .map(|e| match e.event {
            Event::Request(_) => "request",
            Event::Checkpoint { .. } => "checkpoint",
            Event::Recovered { .. } => "recovered",
            Event::Dropped { .. } => "dropped",
        })
        .collect()
}

/// What a writer of the file without the key can do after editing entries: recompute every hash.
fn rechain(entries: &mut [AuditEntry]) -> Vec<String> {
    let mut prev = GENESIS.to_owned();
    entries
        .iter_mut()
        .map(|e| {
            *e = AuditEntry::seal(e.seq, e.at.clone(), e.event.clone(), prev.clone());
            prev = e.hash.clone();
            e.to_line()
        })
        .collect()
}

fn first_bad(path: &Path, key: Option<&str>) -> BadEntry {
    let report = verify(path, key.map(str::as_bytes)).unwrap();
    match report.first_bad {
        Some(bad) => bad,
        None => panic!("verify passed a tampered log: {report:?}"),
    }
}

fn assert_sound(path: &Path, key: Option<&str>) -> kiln_common::audit::VerifyReport {
    let report = verify(path, key.map(str::as_bytes)).unwrap();
    assert!(report.is_ok(), "verify failed: {report:?}\n{}", lines(path).join("\n"));
    report
}

#[tokio::test]
async fn the_chain_continues_across_a_restart_and_verifies() {
    let dir = Dir::new();
    let config = config(&dir.log(), Some(KEY), 3);
    session(&config, 0, 4).await;
    assert_eq!(kinds(&dir.log()), ["request", "request", "request", "checkpoint", "request", "checkpoint"]);
    session(&config, 4, 6).await;
    assert_eq!(
        kinds(&dir.log()),
        ["request", "request", "request", "checkpoint", "request", "checkpoint", "request", "request", "checkpoint"]
    );

    let all = entries(&dir.log());
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (0..9).collect::<Vec<_>>());
    assert_eq!(all[0].prev, GENESIS);
    assert_eq!(all[6].prev, all[5].hash, "the second session continues from the first's last entry");
    assert_eq!(all[0].event, Event::Request(request(0)));
    assert_eq!(all[7].event, Event::Request(request(5)));
    let at = parse_time(&all[0].at).unwrap();
    assert_eq!(all[0].at, format_at(at), "at is RFC 3339 UTC with milliseconds: {}", all[0].at);
    assert!(all[0].at.ends_with('Z') && all[0].at.len() == 24, "{}", all[0].at);
    for (line, entry) in lines(&dir.log()).iter().zip(&all) {
        assert_eq!(line, &entry.to_line());
        assert!(!line.contains(KEY));
    }

    let report = assert_sound(&dir.log(), Some(KEY));
    assert_eq!(
        (report.entries, report.checkpoints, report.checkpoints_verified, report.last_checkpoint_seq, report.unsealed),
        (9, 3, 3, Some(8), 0)
    );
    let unkeyed = assert_sound(&dir.log(), None);
    assert_eq!((unkeyed.entries, unkeyed.checkpoints_verified), (9, 0));
}

/// A log of `n` requests and its final checkpoint.
async fn log_of(dir: &Dir, n: usize) -> Vec<String> {
    session(&config(&dir.log(), Some(KEY), 1000), 0, n).await;
    let lines = lines(&dir.log());
    assert_eq!(lines.len(), n + 1);
    assert_sound(&dir.log(), Some(KEY));
    lines
}

/// The index of a line, how to edit it, and what verify must say.
type Edit = (usize, fn(&str) -> String, Defect);

#[tokio::test]
async fn a_changed_entry_is_named() {
    let dir = Dir::new();
    let original = log_of(&dir, 6).await;
    let edits: [Edit; 5] = [
        // One byte of a field: 202 → 302.
        (3, |l| l.replacen("\"status\":2", "\"status\":3", 1), Defect::HashMismatch),
        // One byte of the hash itself.
        (
            1,
            |l| format!("{}{}\"}}", &l[..l.len() - 3], if l.as_bytes()[l.len() - 3] == b'0' { '1' } else { '0' }),
            Defect::HashMismatch,
        ),
        // The decision, and the reason dropped with it.
        (
            2,
            |l| l.replacen("\"decision\":\"denied\",\"reason\":\"forbidden\"", "\"decision\":\"allowed\"", 1),
            Defect::HashMismatch,
        ),
        // A field the hash would not cover if verify went by the parsed entry alone.
        (4, |l| l.replacen("{", "{\"note\":\"x\",", 1), Defect::NotCanonical),
        (5, |l| l.replacen(",", ", ", 1), Defect::NotCanonical),
    ];
    for (index, edit, why) in edits {
        let mut lines = original.clone();
        let edited = edit(&lines[index]);
        assert_ne!(edited, lines[index], "the edit of line {} changed nothing", index + 1);
        lines[index] = edited;
        write_lines(&dir.log(), &lines);
        let bad = first_bad(&dir.log(), None);
        assert_eq!(bad, BadEntry { line: index as u64 + 1, seq: Some(index as u64), why }, "{}", lines[index]);
    }
    let mut lines = original.clone();
    lines[2].truncate(30);
    write_lines(&dir.log(), &lines);
    let bad = first_bad(&dir.log(), None);
    assert_eq!((bad.line, bad.seq), (3, None));
    assert!(matches!(bad.why, Defect::NotAnEntry(_)), "{bad:?}");
}

#[tokio::test]
async fn a_removed_entry_names_the_one_after_the_gap() {
    let dir = Dir::new();
    let original = log_of(&dir, 6).await;
    for removed in [0, 2, 5] {
        let mut lines = original.clone();
        lines.remove(removed);
        write_lines(&dir.log(), &lines);
        let bad = first_bad(&dir.log(), Some(KEY));
        let after = removed as u64 + 1;
        let why = Defect::SeqOutOfOrder { expected: removed as u64, found: after };
        assert_eq!(bad, BadEntry { line: after, seq: Some(after), why });
        let report = verify(&dir.log(), None).unwrap();
        assert_eq!(report.entries, removed as u64, "entries before the gap are sound");
    }
    // The last entries cannot be told from a log that simply ended there, but the report shows
    // that none of them is sealed by a checkpoint.
    write_lines(&dir.log(), &original[..6]);
    let report = assert_sound(&dir.log(), Some(KEY));
    assert_eq!((report.entries, report.last_checkpoint_seq, report.unsealed), (6, None, 6));
}

#[tokio::test]
async fn swapped_entries_name_the_first_swapped_one() {
    let dir = Dir::new();
    let original = log_of(&dir, 6).await;
    let mut lines = original.clone();
    lines.swap(2, 3);
    write_lines(&dir.log(), &lines);
    let bad = first_bad(&dir.log(), Some(KEY));
    assert_eq!(bad, BadEntry { line: 3, seq: Some(3), why: Defect::SeqOutOfOrder { expected: 2, found: 3 } });

    // Renumbered to hide the swap, the chain no longer links.
    let mut swapped = entries(&dir.log());
    swapped[2].seq = 2;
    swapped[3].seq = 3;
    let relabelled: Vec<String> = swapped
        .iter()
        .map(|e| AuditEntry::seal(e.seq, e.at.clone(), e.event.clone(), e.prev.clone()).to_line())
        .collect();
    write_lines(&dir.log(), &relabelled);
    assert_eq!(first_bad(&dir.log(), None), BadEntry { line: 3, seq: Some(2), why: Defect::PrevMismatch });
}

#[tokio::test]
async fn a_rewritten_chain_passes_only_without_the_key() {
    let dir = Dir::new();
    session(&config(&dir.log(), Some(KEY), 3), 0, 6).await;
    let original = entries(&dir.log());
    assert_eq!(kinds(&dir.log())[3], "checkpoint");

    // A denied request turned into an allowed one, every hash after it recomputed.
    let mut forged = original.clone();
    let Event::Request(r) = &mut forged[2].event else { panic!("entry 2 is a request") };
    assert_eq!(r.decision, Decision::Denied);
    (r.decision, r.reason, r.status) = (Decision::Allowed, None, 202);
    write_lines(&dir.log(), &rechain(&mut forged));
    assert_sound(&dir.log(), None);
    assert_eq!(first_bad(&dir.log(), Some(KEY)), BadEntry { line: 4, seq: Some(3), why: Defect::MacMismatch });

    // A checkpoint's MAC replaced, and the chain after it recomputed.
    let mut forged = original.clone();
    forged[3].event = Event::Checkpoint { mac: Some(hex::encode([7u8; 32])) };
    write_lines(&dir.log(), &rechain(&mut forged));
    assert_sound(&dir.log(), None);
    assert_eq!(first_bad(&dir.log(), Some(KEY)), BadEntry { line: 4, seq: Some(3), why: Defect::MacMismatch });

    // The untouched log, checked with another key.
    let mut untouched = original.clone();
    write_lines(&dir.log(), &rechain(&mut untouched));
    assert_sound(&dir.log(), Some(KEY));
    assert_eq!(
        first_bad(&dir.log(), Some("another-key-0123456789")),
        BadEntry { line: 4, seq: Some(3), why: Defect::MacMismatch }
    );

    // A log written without a key has unsigned checkpoints, which a keyed verify refuses.
    let unsigned = Dir::new();
    session(&config(&unsigned.log(), None, 1000), 0, 2).await;
    assert_sound(&unsigned.log(), None);
    assert_eq!(first_bad(&unsigned.log(), Some(KEY)), BadEntry { line: 3, seq: Some(2), why: Defect::Unsigned });
}

#[tokio::test]
async fn a_torn_last_line_is_cut_off_and_recorded_on_reopen() {
    let dir = Dir::new();
    let config = config(&dir.log(), Some(KEY), 1000);
    session(&config, 0, 3).await;
    let torn = "{\"seq\":4,\"at\":\"2025-06-01T12:00:00.000Z\",\"kind\":\"requ";
    let mut content = std::fs::read_to_string(dir.log()).unwrap();
    content.push_str(torn);
    std::fs::write(dir.log(), &content).unwrap();
    assert_eq!(first_bad(&dir.log(), None), BadEntry { line: 5, seq: None, why: Defect::Torn });

    session(&config, 3, 4).await;
    assert_eq!(
        kinds(&dir.log()),
        ["request", "request", "request", "checkpoint", "recovered", "checkpoint", "request", "checkpoint"]
    );
    let recovered = &entries(&dir.log())[4];
    assert_eq!(
        recovered.event,
        Event::Recovered { truncated_bytes: torn.len() as u64, torn_sha256: hex::encode(Sha256::digest(torn)) }
    );
    assert_eq!(recovered.seq, 4);
    let report = assert_sound(&dir.log(), Some(KEY));
    assert_eq!((report.entries, report.checkpoints_verified), (8, 3));
}

#[tokio::test]
async fn a_crash_without_a_torn_line_is_sealed_on_reopen_and_a_bad_last_entry_refuses_to_open() {
    let dir = Dir::new();
    let config = config(&dir.log(), Some(KEY), 1000);
    session(&config, 0, 3).await;
    // As after a crash: the requests are there, the final checkpoint is not.
    let mut lines = lines(&dir.log());
    lines.pop();
    write_lines(&dir.log(), &lines);
    assert_eq!(assert_sound(&dir.log(), Some(KEY)).unsealed, 3);
    let log = AuditLog::open(&config, None).unwrap();
    assert_eq!(kinds(&dir.log()), ["request", "request", "request", "checkpoint"], "sealed before open returns");
    log.close().await.unwrap();
    assert_eq!(kinds(&dir.log()).len(), 4, "nothing new to seal on close");
    assert_eq!(assert_sound(&dir.log(), Some(KEY)).unsealed, 0);

    let mut lines = self::lines(&dir.log());
    let last = lines.len() - 1;
    lines[last] = lines[last].replacen("\"seq\":3", "\"seq\":9", 1);
    write_lines(&dir.log(), &lines);
    match AuditLog::open(&config, None) {
        Err(AuditError::Corrupt { defect: Defect::HashMismatch, .. }) => {}
        other => panic!("opened a log whose last entry is bad: {other:?}"),
    }
}

#[test]
fn export_selects_a_time_range() {
    let dir = Dir::new();
    let base = parse_time("2025-06-01T12:00:00Z").unwrap();
    let mut prev = GENESIS.to_owned();
    let mut lines = Vec::new();
    for i in 0..5u64 {
        let at = format_at(base + time::Duration::hours(i as i64));
        let entry = AuditEntry::seal(i, at, Event::Request(request(i as usize)), prev.clone());
        prev = entry.hash.clone();
        lines.push(entry.to_line());
    }
    write_lines(&dir.log(), &lines);
    assert_sound(&dir.log(), None);

    let run = |since: Option<&str>, until: Option<&str>| {
        let mut out = Vec::new();
        let n =
            export(&dir.log(), since.map(|s| parse_time(s).unwrap()), until.map(|s| parse_time(s).unwrap()), &mut out)
                .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(n as usize, text.lines().count());
        text
    };
    let want = |range: std::ops::Range<usize>| lines[range].iter().map(|l| format!("{l}\n")).collect::<String>();
    // `since` is inclusive, `until` exclusive; offsets other than Z are understood.
    assert_eq!(run(Some("2025-06-01T13:00:00Z"), Some("2025-06-01T15:00:00Z")), want(1..3));
    assert_eq!(run(Some("2025-06-01T15:00:00+02:00"), None), want(1..5));
    assert_eq!(run(None, Some("2025-06-01T12:00:00.001Z")), want(0..1));
    assert_eq!(run(None, None), want(0..5));
    assert_eq!(run(Some("2026-01-01T00:00:00Z"), None), "");

    // A line the writer is still writing is left out; a broken line in the middle is an error.
    let mut content = std::fs::read_to_string(dir.log()).unwrap();
    content.push_str("{\"seq\":5,\"at\":\"2025-06");
    std::fs::write(dir.log(), &content).unwrap();
    assert_eq!(run(None, None), want(0..5));
    let mut broken = lines.clone();
    broken[1] = "not json".into();
    write_lines(&dir.log(), &broken);
    match export(&dir.log(), None, None, std::io::sink()) {
        Err(AuditError::Unreadable { line: 2, .. }) => {}
        other => panic!("exported a broken log: {other:?}"),
    }
}

#[tokio::test]
async fn a_full_queue_drops_entries_and_the_log_says_how_many() {
    let dir = Dir::new();
    let config = AuditConfig { audit_queue: 1, ..config(&dir.log(), Some(KEY), 1000) };
    let log = AuditLog::open(&config, None).unwrap();
    let clone = log.clone();
    let queued = (0..5000).filter(|&i| clone.record(request(i))).count();
    log.close().await.unwrap();
    assert!(!clone.record(request(0)), "recorded after close");

    let dropped = 5000 - queued;
    assert!(dropped > 0, "a queue of one took 5000 entries without a drop");
    let all = entries(&dir.log());
    let requests = all.iter().filter(|e| matches!(e.event, Event::Request(_))).count();
    let noted: u64 = all.iter().map(|e| if let Event::Dropped { count } = e.event { count } else { 0 }).sum();
    assert_eq!((requests, noted), (queued, dropped as u64));
    assert_sound(&dir.log(), Some(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_stream_mirrors_the_file() {
    let (_, redis_url) = service_urls();
    let dir = Dir::new();
    let stream = format!("{}:audit", unique_prefix());
    let config = AuditConfig { audit_redis_stream: Some(stream.clone()), ..config(&dir.log(), Some(KEY), 3) };
    let log = AuditLog::open(&config, Some(&Secret::new(redis_url.clone()))).unwrap();
    for i in 0..7 {
        assert!(log.record(request(i)));
    }
    log.close().await.unwrap();

    let mut conn = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mirrored: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut conn).await.unwrap();
    let file = lines(&dir.log());
    assert_eq!(file.len(), 10, "7 requests and 3 checkpoints");
    let got: Vec<(String, String)> = mirrored
        .into_iter()
        .map(|(_, fields)| {
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
            (field("seq"), field("entry"))
        })
        .collect();
    let want: Vec<(String, String)> = file.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone())).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_costs_the_file_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = Dir::new();
    let config = AuditConfig { audit_redis_stream: Some("kiln:audit".into()), ..config(&dir.log(), Some(KEY), 1000) };
    let log = AuditLog::open(&config, Some(&Secret::new(format!("redis://127.0.0.1:{port}/0")))).unwrap();
    for i in 0..5 {
        assert!(log.record(request(i)));
    }
    tokio::time::timeout(Duration::from_secs(15), log.close()).await.expect("close is bounded").unwrap();
    assert_eq!(kinds(&dir.log()).len(), 6);
    assert_sound(&dir.log(), Some(KEY));
}

#[tokio::test]
async fn config_is_checked_and_the_key_never_printed() {
    let dir = Dir::new();
    let config = config(&dir.log(), Some(KEY), 1000);
    let printed = format!("{config:?}");
    assert!(!printed.contains(KEY) && printed.contains("<redacted>"), "{printed}");

    let short = AuditConfig { audit_key: Some(Secret::new("short")), ..config.clone() };
    assert!(matches!(AuditLog::open(&short, None), Err(AuditError::Config(_))));
    let no_url = AuditConfig { audit_redis_stream: Some("s".into()), ..config.clone() };
    assert!(matches!(AuditLog::open(&no_url, None), Err(AuditError::Config(_))));
    let off = AuditLog::open(&AuditConfig::default(), None).unwrap();
    assert!(!off.is_enabled() && off.record(request(0)));
    off.close().await.unwrap();
    assert!(!dir.log().exists());
}
