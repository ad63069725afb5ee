//! The result cache and in-flight coalescing, on both backends: identical concurrent jobs run
//! once, hits are answered without the broker, `cache: false` always runs, followers of a canceled
//! job run on their own; and batching does not change results.

use std::sync::Arc;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::broker::amqp::{AmqpBroker, AmqpConfig, Topology};
use kiln_common::config::Secret;
use kiln_common::testing::Kind;
use kiln_proto::JobId;
use kiln_worker::WorkerConfig;
use serde_json::{Value, json};

use crate::harness::{Env, MODEL, embeddings};

kiln_common::both_backends!(
    identical_concurrent_jobs_run_once_and_repeats_hit_the_cache,
    cache_false_always_runs,
    a_cache_hit_never_touches_the_broker,
    followers_of_a_canceled_job_run_on_their_own,
    batched_inference_equals_one_at_a_time,
);

const T: Duration = Duration::from_secs(120);

async fn submit(env_gw: &crate::harness::Gateway, input: Value, cache: bool) -> (u16, Value) {
    let r = env_gw.submit(&json!({ "model": MODEL, "input": input, "cache": cache })).await;
    (r.status, r.body)
}

fn id_of(body: &Value) -> JobId {
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn identical_concurrent_jobs_run_once_and_repeats_hit_the_cache(kind: Kind) {
    let env = Env::new(kind);
    let gw = Arc::new(env.gateway().await);
    let input = json!({ "text": format!("asked a hundred times at once {}", uuid()) });
    let answers = futures::future::join_all((0..100).map(|_| {
        let (gw, input) = (gw.clone(), input.clone());
        async move { submit(&gw, input, true).await }
    }))
    .await;
    let ids: Vec<JobId> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 202, "{body}");
            id_of(body)
        })
        .collect();
    let worker = env.worker();
    let records: Vec<Value> = futures::future::join_all(ids.iter().map(|id| gw.finished(*id, T))).await;
    let first = embeddings(&records[0]);
    for r in &records {
        assert_eq!(embeddings(r), first, "coalesced jobs share one output");
    }
    let runs: u64 = records.iter().map(|r| r["attempts"].as_u64().unwrap()).sum();
    assert_eq!(runs, 1, "100 identical jobs, {runs} inference runs");

    // Later repeats are answered from the cache: 200, at once, no run.
    let (status, hit) = submit(&gw, input, true).await;
    assert_eq!(
        (status, hit["status"].as_str(), hit["cached"].as_bool()),
        (200, Some("succeeded"), Some(true)),
        "{hit}"
    );
    assert_eq!(embeddings(&hit), first);
    assert_eq!(hit["attempts"], 0);
    let again = gw.job(id_of(&hit)).await;
    assert_eq!((again["cached"].as_bool(), again["status"].as_str()), (Some(true), Some("succeeded")));
    worker.stop().await;
}

async fn cache_false_always_runs(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let input = json!({ "text": format!("never cached {}", uuid()) });
    for _ in 0..3 {
        let (status, body) = submit(&gw, input.clone(), false).await;
        assert_eq!(status, 202, "{body}");
        let done = gw.finished(id_of(&body), T).await;
        assert_eq!((done["attempts"].as_u64(), done["cached"].as_bool()), (Some(1), Some(false)), "{done}");
    }
    let (status, body) = submit(&gw, json!({ "text": "x" }), true).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = submit(&gw, json!({ "text": "x" }), false).await;
    assert_eq!(status, 202, "{body}");
    let r = gw.submit(&json!({ "model": MODEL, "input": { "text": "x" }, "cache": "no" })).await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (422, Some("invalid_request")));
    worker.stop().await;
}

async fn a_cache_hit_never_touches_the_broker(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let input = json!({ "text": format!("warm the cache {}", uuid()) });
    let (_, body) = submit(&gw, input.clone(), true).await;
    gw.finished(id_of(&body), T).await;
    worker.stop().await;

    // The same store and cache, with a broker nobody can reach.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = AmqpBroker::new(AmqpConfig {
        url: Secret::new(format!("amqp://127.0.0.1:{port}/%2f")),
        topology: Topology::new("unreachable"),
        connect_timeout: Duration::from_millis(300),
        confirm_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(100),
        tls: Default::default(),
    });
    let cut_off = Backend { broker: Arc::new(dead), ..env.backend.clone() };
    let isolated = Env::from_parts(cut_off, env.args.clone()).gateway().await;
    let (status, hit) = submit(&isolated, input, true).await;
    assert_eq!((status, hit["cached"].as_bool()), (200, Some(true)), "{hit}");
    let (status, miss) = submit(&isolated, json!({ "text": format!("not cached {}", uuid()) }), true).await;
    assert_eq!((status, miss["error"]["code"].as_str()), (503, Some("broker_unavailable")), "{miss}");
    isolated.stop().await;
}

async fn followers_of_a_canceled_job_run_on_their_own(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let input = json!({ "text": format!("leader canceled {}", uuid()) });
    let (_, leader) = submit(&gw, input.clone(), true).await;
    let (_, follower) = submit(&gw, input, true).await;
    let (leader, follower) = (id_of(&leader), id_of(&follower));
    let r = gw.http.post(gw.url(&format!("/v1/jobs/{leader}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let worker = env.worker_with(WorkerConfig { lease_ttl: Duration::from_millis(600), ..WorkerConfig::default() });
    let done = gw.finished(follower, T).await;
    assert_eq!((done["status"].as_str(), done["attempts"].as_u64()), (Some("succeeded"), Some(1)), "{done}");
    assert_eq!(gw.job(leader).await["status"], "canceled");
    worker.stop().await;
}

async fn batched_inference_equals_one_at_a_time(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let long = "This is a considerably longer sentence, with several clauses and commas, that pads a batch well beyond the shortest of its neighbours. ";
    let texts: Vec<String> = (0..12)
        .map(|i| if i % 3 == 0 { format!("{long}{}", long.repeat(i % 4)) } else { format!("short {i}") })
        .collect();
    let (_, batch) = submit(&gw, json!({ "texts": texts }), false).await;
    let batched = embeddings(&gw.finished(id_of(&batch), T).await);
    for (i, text) in texts.iter().enumerate() {
        let (_, one) = submit(&gw, json!({ "text": text }), false).await;
        let alone = embeddings(&gw.finished(id_of(&one), T).await);
        let diff = alone[0].iter().zip(&batched[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "text {i}: batched differs from alone by {diff}");
    }
    worker.stop().await;
}

fn uuid() -> String {
    JobId::random().to_string()
}
