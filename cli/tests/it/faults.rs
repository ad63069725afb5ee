//! Faults with the real servers: an unreachable broker or store answers 503 + Retry-After fast and
//! leaves no job behind; a worker process killed with SIGKILL mid-run loses nothing.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_common::Backend;
use kiln_common::config::Secret;
use kiln_common::testing::{self, Kind, wait_until};
use serde_json::json;

use crate::harness::{Env, MODEL, cache_dir, embeddings, repo_dir};

/// An address where nothing listens.
fn dead_url(scheme: &str) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("{scheme}://127.0.0.1:{port}/")
}

async fn redis_keys(url: &str, prefix: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap()
}

async fn assert_fast_503(env: &Env, code: &str) {
    let gw = env.gateway().await;
    for _ in 0..3 {
        let started = Instant::now();
        let r = gw.submit(&json!({ "model": MODEL, "input": { "text": "x" } })).await;
        let elapsed = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.body["error"]["code"], code);
        assert!(r.body.get("id").is_none(), "no id for a job that was not enqueued");
        assert!(r.headers.get("retry-after").is_some(), "503 without Retry-After");
        assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");
    }
    let ready = gw.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.headers.get("retry-after").is_some());
    assert_eq!(ready.body["status"], "not_ready");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_gives_fast_503_and_leaves_no_job() {
    let mut args = testing::backend_args(Duration::from_secs(60));
    args.amqp_url = Secret::new(dead_url("amqp"));
    let env = Env::from_parts(Backend::external(&args).unwrap(), Some(args.clone()));
    assert_fast_503(&env, "broker_unavailable").await;
    let ready_body = {
        let gw = env.gateway().await;
        let b = gw.get("/readyz").await.body;
        gw.stop().await;
        b
    };
    assert_eq!(ready_body["checks"]["store"], "ok");
    assert!(ready_body["checks"]["broker"].as_str().unwrap().contains("RabbitMQ"), "{ready_body}");
    let keys = redis_keys(args.redis_url.expose(), &args.key_prefix).await;
    assert!(keys.is_empty(), "records left for jobs that were never enqueued: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_gives_fast_503() {
    let mut args = testing::backend_args(Duration::from_secs(60));
    args.redis_url = Secret::new(dead_url("redis"));
    let env = Env::from_parts(Backend::external(&args).unwrap(), Some(args));
    assert_fast_503(&env, "store_unavailable").await;
}

/// Kills a child worker process with SIGKILL when dropped, so a failing test leaves no process.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_killed_mid_run_loses_no_job() {
    let env = Env::new(Kind::External);
    let args = env.args.clone().unwrap();
    let gw = env.gateway().await;

    let mut child = Child(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("worker")
            .env("KILN_AMQP_URL", args.amqp_url.expose())
            .env("KILN_REDIS_URL", args.redis_url.expose())
            .env("KILN_QUEUE_PREFIX", &args.queue_prefix)
            .env("KILN_KEY_PREFIX", &args.key_prefix)
            .env("KILN_MODELS_DIR", repo_dir())
            .env("KILN_CACHE_DIR", cache_dir())
            .env("KILN_INTRA_THREADS", "1")
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kiln worker"),
    );

    // Jobs of several texts each keep the worker busy, so the kill lands mid-batch.
    let texts: Vec<String> = (0..8).map(|i| format!("Sentence number {i} of a job that must not be lost.")).collect();
    let ids: Vec<_> = futures::stream::iter((0..300).map(|_| gw.submit_ok(json!({ "texts": texts }))))
        .buffer_unordered(64)
        .collect()
        .await;

    let count = |status: &'static str| {
        let gw = &gw;
        let ids = &ids;
        async move {
            futures::stream::iter(ids.iter().map(|id| gw.job(*id)))
                .buffer_unordered(32)
                .filter(|j| std::future::ready(j["status"] == status))
                .count()
                .await
        }
    };
    wait_until("the child worker has finished some jobs", Duration::from_secs(120), || async {
        let done = count("succeeded").await;
        if done >= 20 { Ok(done) } else { Err(done) }
    })
    .await;
    child.0.start_kill().unwrap();
    let status = child.0.wait().await.unwrap();
    assert!(!status.success(), "the worker was killed, not stopped: {status:?}");
    let running_at_kill = count("running").await;

    let worker = env.worker();
    let mut retried = 0;
    for id in &ids {
        let job = gw.finished(*id, Duration::from_secs(240)).await;
        assert_eq!(embeddings(&job).len(), 8, "{job}");
        if job["attempts"].as_u64().unwrap() >= 2 {
            retried += 1;
        }
    }
    println!(
        "scenario=worker-kill submitted=300 accepted={} succeeded=300 running_at_kill={running_at_kill} retried={retried}",
        ids.len()
    );
    assert!(retried >= running_at_kill, "every job running at the kill must have run again");
    worker.stop().await;
    gw.stop().await;
}
