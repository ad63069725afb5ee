//! `kiln batch` against the whole system: bad lines reported by line number without stopping the
//! run, a rerun that submits nothing, an interrupted run (library cancellation, and SIGINT to the
//! `kiln` binary) resumed with no line run as two jobs, `--retry-failed` with new keys; and, against
//! a small stand-in gateway, file outputs downloaded, verified and never left half-written; and 50
//! real terrain images through RabbitMQ and Redis with the runner killed (SIGKILL) mid-run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln_cli::batch::{self, BatchConfig, Status, Summary};
use kiln_common::testing::{self, Kind};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{Env, Gateway, MODEL, TERRAIN};

kiln_common::both_backends!(
    bad_lines_are_reported_and_a_rerun_submits_nothing,
    an_interrupted_run_resumes_without_running_any_line_twice,
    retry_failed_resubmits_failed_lines_with_a_new_key,
    the_binary_exits_130_on_sigint_and_a_rerun_completes,
    bad_terrain_lines_are_reported_by_line_number,
);

const T: Duration = Duration::from_secs(120);

/// A fresh directory holding `input.jsonl` (from `lines`) and the `out/` path.
struct Dir(PathBuf);

impl Dir {
    fn new(lines: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-batch-{}", testing::unique_prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("input.jsonl"), lines.join("\n") + "\n").unwrap();
        Self(dir)
    }

    fn input(&self) -> PathBuf {
        self.0.join("input.jsonl")
    }

    fn out(&self) -> PathBuf {
        self.0.join("out")
    }

    /// `kiln batch run` on this directory as a process, its stderr going to `log`.
    fn spawn(&self, gw: &Gateway, model: &str, concurrency: usize, log: &Path) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["batch", "run"])
            .arg(self.input())
            .arg("--out")
            .arg(self.out())
            .args(["--model", model, "--concurrency", &concurrency.to_string()])
            .env("KILN_URL", gw.url(""))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kiln")
    }

    fn config(&self, gw: &Gateway) -> BatchConfig {
        let mut c = BatchConfig::new(self.input(), self.out(), &gw.url(""), MODEL);
        c.concurrency = 4;
        c.progress = false;
        c.give_up_after = Duration::from_secs(60);
        c.poll_wait = Duration::from_secs(5);
        c
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The manifest's events, in order.
fn journal(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn events<'a>(journal: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    journal.iter().filter(move |e| e["event"] == kind)
}

/// Every job id each line was ever given, across all runs.
fn jobs_per_line(out: &Path) -> BTreeMap<u64, BTreeSet<String>> {
    let mut map: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in events(&journal(out), "accepted") {
        map.entry(e["line"].as_u64().unwrap()).or_default().insert(e["job"].as_str().unwrap().to_owned());
    }
    map
}

fn text_lines(n: usize, tag: &str) -> Vec<String> {
    (1..=n).map(|i| json!({ "text": format!("batch line {i} {tag}") }).to_string()).collect()
}

fn counts(s: &Summary) -> [usize; 4] {
    [s.succeeded, s.skipped, s.failed, s.unfinished]
}

async fn bad_lines_are_reported_and_a_rerun_submits_nothing(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let tag = testing::unique_prefix();
    let mut lines = text_lines(30, &tag);
    lines[6] = r#"{"text": 5}"#.into();
    lines[12] = r#"{"text": "unterminated"#.into();
    lines[19] = lines[1].clone();
    lines[24] = "   ".into();
    let dir = Dir::new(&lines);

    let first = batch::run(dir.config(&gw), CancellationToken::new()).await.expect("batch runs");
    assert_eq!(counts(&first), [27, 0, 2, 0], "{first}");
    assert_eq!((first.total, first.submitted, first.exit_code()), (29, 27, batch::EXIT_FAILED), "{first}");
    let failed: Vec<(usize, &str)> = first.failures.iter().map(|f| (f.line, f.code.as_str())).collect();
    assert_eq!(failed, [(7, "invalid_input"), (13, "invalid_line")], "{first}");
    assert!(first.failures[1].message.contains("not valid JSON"), "{:?}", first.failures[1]);

    // One JSON file per good line, named by line number, holding the output.
    let out = dir.out();
    let jobs = jobs_per_line(&out);
    for line in (1..=30u64).filter(|l| ![7, 13, 25].contains(l)) {
        let saved: Value =
            serde_json::from_slice(&std::fs::read(out.join(format!("{line:06}.json"))).expect("output file")).unwrap();
        assert_eq!(saved["dim"], 384, "line {line}: {saved}");
        assert_eq!(jobs[&line].len(), 1, "line {line}: {:?}", jobs[&line]);
        let job = jobs[&line].first().unwrap();
        assert_eq!(gw.job(job.parse().unwrap()).await["status"], "succeeded");
    }
    assert!(!out.join("000007.json").exists() && !out.join("000013.json").exists());
    // Identical lines are distinct jobs (the occurrence number is in the key) with equal outputs.
    assert_ne!(jobs[&2], jobs[&20]);
    assert_eq!(std::fs::read(out.join("000002.json")).unwrap(), std::fs::read(out.join("000020.json")).unwrap());

    // The recorded key still names the recorded job at the gateway.
    let j = journal(&out);
    let submit3 = events(&j, "submit").find(|e| e["line"] == 3).unwrap();
    let again = gw
        .http
        .post(gw.url("/v1/jobs"))
        .header("idempotency-key", submit3["key"].as_str().unwrap())
        .json(&json!({ "model": MODEL, "input": serde_json::from_str::<Value>(&lines[2]).unwrap() }))
        .send()
        .await
        .unwrap();
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"].as_str(), jobs[&3].first().map(String::as_str), "{again}");

    // A rerun verifies the files and submits nothing.
    let before = journal(&out).len();
    let second = batch::run(dir.config(&gw), CancellationToken::new()).await.expect("rerun");
    assert_eq!(counts(&second), [0, 27, 2, 0], "{second}");
    assert_eq!((second.submitted, second.resumed, second.exit_code()), (0, 0, batch::EXIT_FAILED), "{second}");
    let after = journal(&out);
    assert_eq!(after.len(), before + 1, "only the run header is new: {:?}", &after[before..]);
    assert_eq!(jobs_per_line(&out), jobs);

    let status = Status::load(&out).unwrap();
    assert_eq!((status.succeeded, status.failed, status.in_flight, status.files), (27, 2, 0, 27), "{status}");
    assert!(status.missing.is_empty(), "{status}");
    assert_eq!((status.items, status.runs), (Some(29), 2));
    worker.stop().await;
}

async fn an_interrupted_run_resumes_without_running_any_line_twice(kind: Kind) {
    let env = Env::new(kind);
    // No worker yet: the first lines stay queued, so the interruption finds them in flight.
    let gw = env.gateway().await;
    let dir = Dir::new(&text_lines(12, &testing::unique_prefix()));
    let out = dir.out();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(batch::run(dir.config(&gw), cancel.clone()));
    testing::wait_until("4 lines accepted", T, || async {
        let n = events(&journal(&out), "accepted").count();
        if n >= 4 { Ok(()) } else { Err(n) }
    })
    .await;
    cancel.cancel();
    let first = tokio::time::timeout(T, running).await.expect("run stops promptly").unwrap().expect("run");
    assert!(first.interrupted, "{first}");
    assert_eq!((first.in_flight, first.not_started, first.submitted), (4, 8, 4), "{first}");
    assert_eq!(first.exit_code(), batch::EXIT_INTERRUPTED);
    assert_eq!(Status::load(&out).unwrap().in_flight, 4);

    let worker = env.worker();
    let second = batch::run(dir.config(&gw), CancellationToken::new()).await.expect("resume");
    assert_eq!(counts(&second), [12, 0, 0, 0], "{second}");
    assert_eq!((second.resumed, second.submitted, second.exit_code()), (4, 8, 0), "{second}");
    let jobs = jobs_per_line(&out);
    assert_eq!(jobs.len(), 12);
    for (line, ids) in &jobs {
        assert_eq!(ids.len(), 1, "line {line} ran as {ids:?}");
        let record = gw.job(ids.first().unwrap().parse().unwrap()).await;
        assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("succeeded"), Some(1)), "{record}");
        assert!(out.join(format!("{line:06}.json")).is_file());
    }
    worker.stop().await;
}

async fn retry_failed_resubmits_failed_lines_with_a_new_key(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let mut lines = text_lines(3, &testing::unique_prefix());
    lines.push(r#"{"text": 5}"#.into());
    let dir = Dir::new(&lines);
    let out = dir.out();
    let running = tokio::spawn(batch::run(dir.config(&gw), CancellationToken::new()));
    // Line 2's job is canceled while queued (no worker yet), so it ends failed.
    let job2 = testing::wait_until("line 2 accepted", T, || async {
        let j = journal(&out);
        events(&j, "accepted").find(|e| e["line"] == 2).map(|e| e["job"].as_str().unwrap().to_owned()).ok_or(j.len())
    })
    .await;
    let canceled = gw.http.post(gw.url(&format!("/v1/jobs/{job2}/cancel"))).send().await.unwrap();
    assert_eq!(canceled.status(), 200);
    let worker = env.worker();
    let first = tokio::time::timeout(T, running).await.expect("run ends").unwrap().expect("run");
    assert_eq!(counts(&first), [2, 0, 2, 0], "{first}");
    let failed: Vec<(usize, &str)> = first.failures.iter().map(|f| (f.line, f.code.as_str())).collect();
    assert_eq!(failed, [(2, "canceled"), (4, "invalid_input")], "{first}");

    let plain = batch::run(dir.config(&gw), CancellationToken::new()).await.unwrap();
    assert_eq!((counts(&plain), plain.submitted), ([0, 2, 2, 0], 0), "without --retry-failed: {plain}");

    let keys_before: Vec<String> =
        events(&journal(&out), "submit").map(|e| e["key"].as_str().unwrap().to_owned()).collect();
    let mut config = dir.config(&gw);
    config.retry_failed = true;
    let retried = batch::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!(counts(&retried), [1, 2, 1, 0], "{retried}");
    assert_eq!(retried.submitted, 1, "line 4 is refused again, line 2 runs: {retried}");
    let j = journal(&out);
    let new_submits: Vec<&Value> = events(&j, "submit").skip(keys_before.len()).collect();
    let mut lines_and_generations: Vec<(u64, u64)> =
        new_submits.iter().map(|e| (e["line"].as_u64().unwrap(), e["generation"].as_u64().unwrap())).collect();
    lines_and_generations.sort();
    assert_eq!(lines_and_generations, [(2, 1), (4, 1)]);
    for e in new_submits {
        assert!(!keys_before.contains(&e["key"].as_str().unwrap().to_owned()), "a retry reused key {}", e["key"]);
    }
    let jobs = jobs_per_line(&out);
    assert_eq!(jobs[&2].len(), 2, "line 2: the canceled job and its retry");
    assert!(jobs[&2].contains(&job2));
    assert!(out.join("000002.json").is_file());
    worker.stop().await;
}

async fn the_binary_exits_130_on_sigint_and_a_rerun_completes(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let dir = Dir::new(&text_lines(6, &testing::unique_prefix()));
    let out = dir.out();
    let log = dir.0.join("stderr.log");
    let kiln = |log: &Path| dir.spawn(&gw, MODEL, 2, log);
    let mut child = kiln(&log);
    testing::wait_until("2 lines accepted", T, || async {
        let n = events(&journal(&out), "accepted").count();
        if n >= 2 { Ok(()) } else { Err((n, std::fs::read_to_string(&log).unwrap_or_default())) }
    })
    .await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(T, child.wait()).await.expect("kiln exits").unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: 2 in flight and 4 not started"), "{stderr}");

    let worker = env.worker();
    let log2 = dir.0.join("stderr2.log");
    let status = tokio::time::timeout(T, kiln(&log2).wait()).await.expect("kiln exits").unwrap();
    let stderr = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("6 succeeded, 0 failed, 0 skipped"), "{stderr}");
    assert!(stderr.contains("4 submitted, 2 picked up by job id"), "{stderr}");
    assert!(jobs_per_line(&out).values().all(|ids| ids.len() == 1), "{:?}", jobs_per_line(&out));

    let report =
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(["batch", "status"]).arg(&out).output().unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(report.contains("succeeded 6, failed 0, in flight 0, not started 0"), "{report}");
    assert!(report.contains("files 6 "), "{report}");
    worker.stop().await;
}

/// A stand-in gateway that can lie: every job finishes at once with one PNG-named file;
/// `bad_sha_line` is announced with a wrong sha256, which a real gateway never does.
struct FakeGateway {
    url: String,
    downloads: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

async fn fake_gateway() -> FakeGateway {
    use axum::extract::{Json, Path as P, State};
    use axum::routing::{get, post};
    #[derive(Clone)]
    struct S {
        downloads: Arc<AtomicUsize>,
    }
    fn bytes_of(id: &str) -> Vec<u8> {
        format!("\u{89}PNG fake image of {id}").into_bytes().repeat(1000)
    }
    fn record(id: &str) -> Value {
        use sha2::Digest;
        let bytes = bytes_of(id);
        let mut sha = hex::encode(sha2::Sha256::digest(&bytes));
        if id == "job-bad" {
            sha = "0".repeat(64);
        }
        json!({ "id": id, "status": "succeeded", "output": { "files": [{
            "name": "image-0.png", "url": format!("/v1/jobs/{id}/outputs/image-0.png"),
            "size": bytes.len(), "sha256": sha, "content_type": "image/png" }] } })
    }
    let downloads = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/v1/models", get(|| async { Json(json!({ "models": [{ "name": "fake" }] })) }))
        .route(
            "/v1/jobs",
            post(|Json(body): Json<Value>| async move {
                let id = if body["input"]["bad"] == true {
                    "job-bad".to_owned()
                } else {
                    format!("job-{}", body["input"]["n"])
                };
                Json(record(&id))
            }),
        )
        .route("/v1/jobs/{id}", get(|P(id): P<String>| async move { Json(record(&id)) }))
        .route(
            "/v1/jobs/{id}/outputs/{name}",
            get(|State(s): State<S>, P((id, _name)): P<(String, String)>| async move {
                s.downloads.fetch_add(1, Ordering::SeqCst);
                bytes_of(&id)
            }),
        )
        .with_state(S { downloads: downloads.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await });
    FakeGateway { url, downloads, shutdown }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_outputs_are_downloaded_verified_and_never_left_half_written() {
    let fake = fake_gateway().await;
    let dir = Dir::new(&[r#"{"n": 1}"#.to_owned(), r#"{"n": 2, "bad": true}"#.to_owned(), r#"{"n": 3}"#.to_owned()]);
    let out = dir.out();
    let config = || {
        let mut c = BatchConfig::new(dir.input(), dir.out(), &fake.url, "fake");
        c.progress = false;
        c
    };
    let first = batch::run(config(), CancellationToken::new()).await.unwrap();
    assert_eq!(counts(&first), [2, 0, 1, 0], "{first}");
    assert_eq!((first.failures[0].line, first.failures[0].code.as_str()), (2, "output_mismatch"), "{first}");
    assert_eq!(first.files_written, 2);
    let png = std::fs::read(out.join("000001-image-0.png")).expect("line 1's image");
    assert!(png.starts_with("\u{89}PNG fake image of job-1".as_bytes()));
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["000001-image-0.png", "000003-image-0.png", "manifest.jsonl"], "no partial or bad file");
    // Three attempts at the corrupted file, one each for the good ones.
    assert_eq!(fake.downloads.load(Ordering::SeqCst), 5);

    // A deleted output is fetched again from its job (by id, not resubmitted); the rest verify.
    std::fs::remove_file(out.join("000003-image-0.png")).unwrap();
    let second = batch::run(config(), CancellationToken::new()).await.unwrap();
    assert_eq!(counts(&second), [1, 1, 1, 0], "{second}");
    assert_eq!((second.submitted, second.files_written), (0, 1), "{second}");
    assert_eq!(fake.downloads.load(Ordering::SeqCst), 6);
    assert!(out.join("000003-image-0.png").is_file());
    fake.shutdown.cancel();
}

/// Job records under the test's key prefix: one per job ever created.
async fn job_records(env: &Env) -> usize {
    let args = env.args.as_ref().expect("external backend");
    let client = redis::Client::open(args.redis_url.expose()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}job:*", args.key_prefix)).query_async(&mut conn).await.unwrap();
    keys.iter().filter(|k| !k.trim_start_matches(&args.key_prefix).trim_start_matches("job:").contains(':')).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_terrain_images_survive_a_killed_runner() {
    let env = Env::new(Kind::External);
    let gw = env.gateway().await;
    let worker = env.worker_with(kiln_worker::WorkerConfig {
        models: vec![TERRAIN.into()],
        intra_threads: Some(2),
        ..kiln_worker::WorkerConfig::default()
    });
    let lines: Vec<String> = (0..50)
        .map(|i| {
            let colormap = if i % 2 == 0 { "terrain" } else { "gray" };
            json!({ "seed": 1000 + i, "difficulty": 1 + (i * 2) % 100, "width": 96, "height": 80, "colormap": colormap })
                .to_string()
        })
        .collect();
    let dir = Dir::new(&lines);
    let out = dir.out();
    let kiln = |log: &Path| dir.spawn(&gw, TERRAIN, 4, log);
    let log = dir.0.join("first.log");
    let mut first = kiln(&log);
    testing::wait_until("10 images downloaded", T, || async {
        let n = events(&journal(&out), "succeeded").count();
        if n >= 10 { Ok(()) } else { Err((n, std::fs::read_to_string(&log).unwrap_or_default())) }
    })
    .await;
    first.start_kill().unwrap();
    let killed = first.wait().await.unwrap();
    assert!(killed.code().is_none(), "killed by a signal: {killed:?}");
    let done_before = events(&journal(&out), "succeeded").count();
    assert!(done_before < 50, "the runner was killed mid-run ({done_before} done)");

    let log2 = dir.0.join("second.log");
    let status = tokio::time::timeout(Duration::from_secs(300), kiln(&log2).wait()).await.expect("kiln exits").unwrap();
    let stderr = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");

    // Exactly 50 distinct PNGs, each decoding at the requested size.
    let mut shas = BTreeSet::new();
    let mut pngs = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            pngs += 1;
            let bytes = std::fs::read(&path).unwrap();
            let reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
            let info = reader.info();
            assert_eq!((info.width, info.height), (96, 80), "{}", path.display());
            shas.insert(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)));
        }
    }
    assert_eq!((pngs, shas.len()), (50, 50), "50 distinct PNGs in {}", out.display());
    // The manifest is complete, and no line was ever given two jobs — nor did the store see more.
    let per_line = jobs_per_line(&out);
    assert_eq!(per_line.len(), 50, "{per_line:?}");
    assert!(per_line.values().all(|ids| ids.len() == 1), "a line was submitted as two jobs: {per_line:?}");
    let succeeded: BTreeSet<u64> = events(&journal(&out), "succeeded").map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(succeeded, (1..=50).collect());
    assert_eq!(job_records(&env).await, 50, "jobs created in the store");
    let report =
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(["batch", "status"]).arg(&out).output().unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(report.contains("succeeded 50, failed 0, in flight 0, not started 0"), "{report}");
    worker.stop().await;
}

async fn bad_terrain_lines_are_reported_by_line_number(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker_with(kiln_worker::WorkerConfig {
        models: vec![TERRAIN.into()],
        intra_threads: Some(2),
        ..kiln_worker::WorkerConfig::default()
    });
    let lines = [
        r#"{"difficulty": 10, "seed": 1}"#,
        r#"{"difficulty": 0, "seed": 2}"#,
        r#"{"difficulty": "high"}"#,
        r#"{"difficulty": 20, "seed": 3}"#,
    ]
    .map(String::from);
    let dir = Dir::new(&lines);
    let mut config = dir.config(&gw);
    config.model = TERRAIN.into();
    let summary = batch::run(config, CancellationToken::new()).await.expect("batch runs");
    assert_eq!(counts(&summary), [2, 0, 2, 0], "{summary}");
    let failed: Vec<(usize, &str)> = summary.failures.iter().map(|f| (f.line, f.code.as_str())).collect();
    assert_eq!(failed, [(2, "invalid_input"), (3, "invalid_input")], "{summary}");
    assert!(summary.failures[0].message.contains("input.difficulty"), "{:?}", summary.failures[0]);
    for line in [1, 4] {
        assert!(dir.out().join(format!("{line:06}-image-0.png")).is_file(), "line {line}'s image");
    }
    worker.stop().await;
}
