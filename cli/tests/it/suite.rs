//! The fault-injection suite: real worker processes, real RabbitMQ and Redis (private instances
//! where a scenario stops or reconfigures them). Each scenario prints
//! `scenario=… submitted=N accepted=N succeeded=N failed=N lost=N duplicated=N`, where lost counts
//! accepted jobs that did not reach the expected terminal state and duplicated counts jobs that a
//! worker ran to completion more than once (from the workers' own logs).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_common::Backend;
use kiln_common::config::Secret;
use kiln_common::dlq;
use kiln_common::testing::servers::{RabbitMq, Redis};
use kiln_common::testing::{self, wait_until};
use kiln_proto::JobId;
use serde_json::{Value, json};

use crate::harness::{ChildWorker, Env, Gateway, MODEL, TempRepo, completed_runs, embeddings, repo_dir, set};
use crate::reliability::{poison_text, poisonable_repo};

const DONE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Tally {
    submitted: usize,
    accepted: Vec<JobId>,
}

/// Waits for every accepted job, checks each with `expect`, prints the scenario line, and asserts
/// nothing was lost or run twice.
async fn report(
    name: &str,
    gw: &Gateway,
    tally: &Tally,
    workers: &[&ChildWorker],
    expect: impl Fn(JobId, &Value) -> bool,
) {
    let records: Vec<(JobId, Value)> = futures::stream::iter(
        tally.accepted.iter().map(|id| async move { (*id, gw.finished(*id, DONE_TIMEOUT).await) }),
    )
    .buffer_unordered(32)
    .collect()
    .await;
    let succeeded = records.iter().filter(|(_, r)| r["status"] == "succeeded").count();
    let failed = records.iter().filter(|(_, r)| r["status"] == "failed").count();
    let lost: Vec<_> = records.iter().filter(|(id, r)| !expect(*id, r)).collect();
    let runs = completed_runs(workers);
    let duplicated: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    let line = format!(
        "scenario={name} submitted={} accepted={} succeeded={succeeded} failed={failed} lost={} duplicated={}",
        tally.submitted,
        tally.accepted.len(),
        lost.len(),
        duplicated.len()
    );
    println!("{line}");
    // Collected for the test command's summary (cargo captures the output of passing tests).
    let summary = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-suite.txt");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(summary).unwrap();
    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes()).unwrap();
    assert!(lost.is_empty(), "{name}: lost jobs, e.g. {:?}", lost.first());
    assert!(duplicated.is_empty(), "{name}: jobs run to completion twice: {duplicated:?}");
}

fn succeeded(_: JobId, r: &Value) -> bool {
    r["status"] == "succeeded" && !embeddings(r).is_empty()
}

async fn submit_all(gw: &Gateway, inputs: Vec<Value>, concurrency: usize) -> Tally {
    let submitted = inputs.len();
    // In submission order, so tests can find a job by its input's position.
    let accepted = futures::stream::iter(inputs.into_iter().map(|input| gw.submit_ok(input)))
        .buffered(concurrency)
        .collect()
        .await;
    Tally { submitted, accepted }
}

fn worker_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![("KILN_RETRY_BASE", "100ms"), ("KILN_DRAIN_TIMEOUT", "60s")];
    env.extend_from_slice(extra);
    env
}

/// Scenario 1: SIGKILL one of two workers in the middle of a run of 1,000 jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_worker_killed_mid_run() {
    let env = Env::new(testing::Kind::External);
    let args = env.args.clone().unwrap();
    let gw = env.gateway().await;
    let mut a = ChildWorker::spawn(&args, &repo_dir(), &worker_env(&[]));
    let b = ChildWorker::spawn(&args, &repo_dir(), &worker_env(&[]));
    let inputs = (0..1000).map(|j| json!({ "texts": (0..4).map(|i| format!("Sentence {i} of job {j}, which must survive its worker.")).collect::<Vec<_>>() }));
    let tally = submit_all(&gw, inputs.collect(), 64).await;
    a.wait_for("worker A has finished some runs", DONE_TIMEOUT, |l| l["target"] == "kiln::worker::runs").await;
    wait_until("worker A is in the middle of the run", DONE_TIMEOUT, || async {
        let n = a.lines().iter().filter(|l| l["target"] == "kiln::worker::runs").count();
        if n >= 50 { Ok(()) } else { Err(n) }
    })
    .await;
    a.kill();
    assert!(!a.wait().await.success());
    report("worker-kill", &gw, &tally, &[&a, &b], succeeded).await;
    gw.stop().await;
}

/// Scenario 2: stop RabbitMQ during a 2,000-job submission and start it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_broker_restarted_during_submission() {
    let mut rabbit = RabbitMq::start(None).await;
    let mut args = testing::backend_args(Duration::from_secs(3600));
    args.amqp_url = Secret::new(rabbit.url());
    let env = Env::from_parts(Backend::external(&args).unwrap(), Some(args.clone()));
    let gw = Arc::new(env.gateway().await);
    let worker = ChildWorker::spawn(&args, &repo_dir(), &worker_env(&[]));

    let accepted = Arc::new(AtomicUsize::new(0));
    let submitter = {
        let (gw, accepted) = (gw.clone(), accepted.clone());
        tokio::spawn(async move {
            // The arrival schedule: job i is submitted 10·i ms after the start, so submissions keep
            // arriving before, during and after the outage (a load profile, not a wait).
            let start = tokio::time::Instant::now();
            let results: Vec<(u16, Duration, bool, Value)> = futures::stream::iter(0..2000)
                .map(|i| {
                    let (gw, accepted) = (gw.clone(), accepted.clone());
                    async move {
                        tokio::time::sleep_until(start + Duration::from_millis(10 * i)).await;
                        let started = Instant::now();
                        let r = gw.submit(&json!({ "model": MODEL, "input": { "text": format!("job {i}") } })).await;
                        if r.status == 202 {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        (r.status, started.elapsed(), r.headers.contains_key("retry-after"), r.body)
                    }
                })
                .buffer_unordered(2000)
                .collect()
                .await;
            results
        })
    };
    wait_until("a fifth of the jobs are accepted", DONE_TIMEOUT, || async {
        let n = accepted.load(Ordering::Relaxed);
        if n >= 400 { Ok(()) } else { Err(n) }
    })
    .await;
    rabbit.stop().await;
    let at_stop = accepted.load(Ordering::Relaxed);
    rabbit.restart().await;
    let mut results = submitter.await.unwrap();
    // The gateway takes jobs again once RabbitMQ is back. On a loaded machine the outage can
    // outlast the schedule above, so submissions go on after it until one is accepted.
    let after = Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until("a submission is accepted after the restart", DONE_TIMEOUT, || {
        let (gw, after) = (gw.clone(), after.clone());
        async move {
            let started = Instant::now();
            let n = after.lock().unwrap().len();
            let r = gw.submit(&json!({ "model": MODEL, "input": { "text": format!("after the restart {n}") } })).await;
            let accepted = r.status == 202;
            let status = r.status;
            after.lock().unwrap().push((r.status, started.elapsed(), r.headers.contains_key("retry-after"), r.body));
            if accepted { Ok(()) } else { Err(status) }
        }
    })
    .await;
    results.extend(std::mem::take(&mut *after.lock().unwrap()));

    let mut tally = Tally { submitted: results.len(), ..Default::default() };
    let mut refused = 0;
    for (status, elapsed, retry_after, body) in &results {
        match status {
            202 => tally.accepted.push(body["id"].as_str().unwrap().parse().unwrap()),
            503 => {
                refused += 1;
                assert!(*retry_after, "503 without Retry-After: {body}");
                assert!(*elapsed < Duration::from_secs(1), "503 took {elapsed:?}: {body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    println!("broker-restart: accepted before the stop {at_stop}, refused with 503 {refused}");
    assert!(refused > 0, "no submission met the outage");
    assert!(tally.accepted.len() > at_stop, "no submission was accepted after the restart");
    report("broker-restart", &gw, &tally, &[&worker], succeeded).await;
}

/// Scenario 3: restart Redis (append-only file on) during a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_redis_restarted_during_run() {
    let mut redis = Redis::start().await;
    let mut args = testing::backend_args(Duration::from_secs(3600));
    args.redis_url = Secret::new(redis.url());
    let env = Env::from_parts(Backend::external(&args).unwrap(), Some(args.clone()));
    let gw = env.gateway().await;
    let worker = ChildWorker::spawn(&args, &repo_dir(), &worker_env(&[]));
    let texts = |j: usize| {
        (0..4).map(|i| format!("Sentence {i} of job {j}, which outlives a Redis restart.")).collect::<Vec<_>>()
    };
    let mut tally = submit_all(&gw, (0..500).map(|j| json!({ "texts": texts(j) })).collect(), 32).await;
    worker.wait_for("the worker is busy", DONE_TIMEOUT, |l| l["target"] == "kiln::worker::runs").await;
    redis.stop().await;
    // While Redis is down, submissions are refused quickly, never accepted.
    let started = Instant::now();
    let r = gw.submit(&json!({ "model": MODEL, "input": { "text": "during the outage" } })).await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (503, Some("store_unavailable")), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(1) + Duration::from_millis(500), "{:?}", started.elapsed());
    tally.submitted += 1;
    redis.restart().await;
    let more = submit_all(&gw, (500..600).map(|j| json!({ "texts": texts(j) })).collect(), 32).await;
    tally.submitted += more.submitted;
    tally.accepted.extend(more.accepted);
    report("redis-restart", &gw, &tally, &[&worker], succeeded).await;
    gw.stop().await;
}

/// Scenario 4: one poison job among 200 good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_poison_job() {
    let models = poisonable_repo();
    let env = Env::new(testing::Kind::External).with_models(&models);
    let args = env.args.clone().unwrap();
    let gw = env.gateway().await;
    let worker = ChildWorker::spawn(&args, &models.0, &worker_env(&[("KILN_MAX_ATTEMPTS", "3")]));
    let mut inputs: Vec<Value> = (0..200).map(|i| json!({ "text": format!("good job {i}") })).collect();
    inputs.insert(100, json!({ "text": poison_text() }));
    let tally = submit_all(&gw, inputs, 32).await;
    let poison = tally.accepted[100];
    report("poison", &gw, &tally, &[&worker], |id, r| {
        if id == poison {
            r["status"] == "failed" && r["attempts"] == 3 && r["error"]["code"] == "inference_failed"
        } else {
            succeeded(id, r)
        }
    })
    .await;
    let letters = dlq::list(&env.backend, 10).await.unwrap();
    assert_eq!(letters.iter().map(|l| l.envelope.id).collect::<Vec<_>>(), vec![poison], "dead letters: {letters:?}");

    // The operator's view, through the command line.
    let kiln_dlq = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("dlq")
            .args(args)
            .env("KILN_AMQP_URL", env.args.as_ref().unwrap().amqp_url.expose())
            .env("KILN_REDIS_URL", env.args.as_ref().unwrap().redis_url.expose())
            .env("KILN_QUEUE_PREFIX", &env.args.as_ref().unwrap().queue_prefix)
            .env("KILN_KEY_PREFIX", &env.args.as_ref().unwrap().key_prefix)
            .env("KILN_LOG", "warn")
            .output()
            .expect("run kiln dlq");
        assert!(out.status.success(), "kiln dlq {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = kiln_dlq(&["list"]);
    let line: Value = serde_json::from_str(listed.lines().next().unwrap_or("null")).unwrap();
    assert_eq!(
        (line["id"].as_str(), line["attempts"].as_u64()),
        (Some(poison.to_string().as_str()), Some(3)),
        "{listed}"
    );
    assert_eq!(line["reason"]["code"], "inference_failed", "{listed}");
    let redriven = kiln_dlq(&["redrive", "--id", &poison.to_string()]);
    assert!(redriven.starts_with("redriven 1,"), "{redriven}");
    // Still poison: it fails again after its attempts, and is back in the queue.
    wait_until("the redriven poison job is dead again", DONE_TIMEOUT, || async {
        let job = gw.job(poison).await;
        let back = dlq::list(&env.backend, 10).await.unwrap().len();
        if job["status"] == "failed" && back == 1 { Ok(()) } else { Err((job["status"].clone(), back)) }
    })
    .await;
    gw.stop().await;
}

/// Scenario 5: SIGTERM a worker while it holds a full batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_worker_terminated_with_a_full_batch() {
    let env = Env::new(testing::Kind::External);
    let args = env.args.clone().unwrap();
    let gw = env.gateway().await;
    let mut a = ChildWorker::spawn(&args, &repo_dir(), &worker_env(&[]));
    let inputs = (0..300).map(|j| json!({ "texts": (0..8).map(|i| format!("Sentence {i} of job {j}, in a batch being drained.")).collect::<Vec<_>>() }));
    let tally = submit_all(&gw, inputs.collect(), 64).await;
    a.wait_for("worker A has started on the run", DONE_TIMEOUT, |l| l["target"] == "kiln::worker::runs").await;
    a.terminate();
    let status = a.wait().await;
    assert!(status.success(), "a drained worker exits 0, got {status:?}");
    let drained = a.lines().iter().any(|l| l["message"].as_str().is_some_and(|m| m.starts_with("draining")));
    assert!(drained, "worker A did not log its drain");
    let b = ChildWorker::spawn(&args, &repo_dir(), &worker_env(&[]));
    report("worker-sigterm", &gw, &tally, &[&a, &b], succeeded).await;
    gw.stop().await;
}

/// Scenario 6: a job longer than RabbitMQ's consumer timeout completes once; and when its worker
/// dies mid-run, the lapsed lease brings it back exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_job_longer_than_the_consumer_timeout() {
    let consumer_timeout = Duration::from_secs(2);
    let rabbit = RabbitMq::start(Some(consumer_timeout)).await;
    let mut args = testing::backend_args(Duration::from_secs(3600));
    args.amqp_url = Secret::new(rabbit.url());
    let models = TempRepo::new(set("max_batch", "2"));
    let env = Env::from_parts(Backend::external(&args).unwrap(), Some(args.clone())).with_models(&models);
    let gw = env.gateway().await;
    // One session, so the job's batches run one after another and the run outlasts the timeout.
    let lease = [("KILN_LEASE_AFTER", "500ms"), ("KILN_LEASE_TTL", "3s"), ("KILN_SESSIONS", "1")];
    let mut a = ChildWorker::spawn(&args, &models.0, &worker_env(&lease));
    let texts: Vec<String> = (0..256)
        .map(|i| format!("Sentence {i} of a long job: {}", "the quick brown fox jumps over the lazy dog ".repeat(8)))
        .collect();
    let long = gw.submit_ok(json!({ "texts": texts })).await;
    let job = gw.finished(long, DONE_TIMEOUT).await;
    let run_ms = job["metrics"]["run_ms"].as_i64().unwrap();
    assert!(
        run_ms > consumer_timeout.as_millis() as i64 + 1000,
        "premise: the run ({run_ms} ms) outlasts the consumer timeout"
    );
    let tally = Tally { submitted: 1, accepted: vec![long] };
    assert_eq!(job["attempts"], 1, "{job}");

    // The same, with the worker killed after it took the lease: another worker runs it, once.
    let second =
        gw.submit_ok(json!({ "texts": texts.iter().map(|t| format!("again: {t}")).collect::<Vec<_>>() })).await;
    a.wait_for("worker A leased the job", DONE_TIMEOUT, |l| {
        l["message"].as_str().is_some_and(|m| m.contains("lease taken")) && l["job_id"] == second.to_string()
    })
    .await;
    a.kill();
    a.wait().await;
    let b = ChildWorker::spawn(&args, &models.0, &worker_env(&lease));
    let tally = Tally { submitted: 2, accepted: vec![tally.accepted[0], second] };
    report("long-job", &gw, &tally, &[&a, &b], |id, r| succeeded(id, r) && (id == long || r["attempts"] == 2)).await;
    let runs: HashMap<String, usize> = completed_runs(&[&a, &b]);
    assert_eq!(runs.get(&second.to_string()), Some(&1), "{runs:?}");
    gw.stop().await;
}
