//! An unreachable broker or store: the gateway answers 503 + Retry-After fast, reports not-ready,
//! and leaves no job behind. (Crashes and restarts mid-run are the fault-injection suite's.)

use std::time::{Duration, Instant};

use kiln_common::Backend;
use kiln_common::config::Secret;
use kiln_common::testing;
use serde_json::json;

use crate::harness::{Env, MODEL};

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
    // Which dependency is down, in a stable word: no error text, host or port in the answer.
    assert_eq!(ready_body["checks"]["broker"], "unavailable", "{ready_body}");
    let records = redis_keys(args.redis_url.expose(), &format!("{}job:", args.key_prefix)).await;
    assert!(records.is_empty(), "records left for jobs that were never enqueued: {records:?}");
    // Each refused job leaves a withdrawal marker, so a late delivery of it would be dropped.
    let withdrawn = redis_keys(args.redis_url.expose(), &format!("{}withdrawn:", args.key_prefix)).await;
    assert_eq!(withdrawn.len(), 3, "{withdrawn:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_gives_fast_503() {
    let mut args = testing::backend_args(Duration::from_secs(60));
    args.redis_url = Secret::new(dead_url("redis"));
    let env = Env::from_parts(Backend::external(&args).unwrap(), Some(args));
    assert_fast_503(&env, "store_unavailable").await;
}
