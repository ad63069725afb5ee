//! The hard cases of getting results out, on both backends: resuming an SSE stream at or past a
//! finished job's last event, the per-gateway bounds on event streams and long-polls, and
//! webhooks to receivers that hang, answer slowly or go down and come back — one receiver never
//! holds up the others, a job's events arrive in order with their `seq`, and retries deliver all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use kiln_common::config::Secret;
use kiln_common::testing::{Kind, wait_until};
use kiln_common::webhooks::WebhookConfig;
use kiln_gateway::GatewayConfig;
use kiln_proto::JobId;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::delivery::SECRET;
use crate::harness::{Env, Gateway, MODEL, SseClient};

kiln_common::both_backends!(
    sse_resume_at_or_past_the_last_event_of_a_finished_job_ends_at_once,
    a_hanging_receiver_does_not_hold_up_deliveries_to_others,
    a_jobs_webhook_events_arrive_in_order_with_their_seq,
    webhooks_to_a_receiver_that_hangs_then_is_down_then_back_all_arrive,
);

const T: Duration = Duration::from_secs(120);

async fn submit(gw: &Gateway, body: Value) -> JobId {
    let r = gw.submit(&body).await;
    assert_eq!(r.status, 202, "submit answered {}: {}", r.status, r.body);
    r.body["id"].as_str().expect("id").parse().expect("uuid")
}

fn hooked(text: &str, url: &str, events: &[&str]) -> Value {
    json!({ "model": MODEL, "input": { "text": text }, "webhook": url, "webhook_events": events })
}

/// `GET /v1/jobs/{id}/events` with `Last-Event-ID`, read to its end within `within`.
async fn resume(gw: &Gateway, id: JobId, last: &str, within: Duration) -> (u16, String) {
    let read = async {
        let resp = gw
            .http
            .get(gw.url(&format!("/v1/jobs/{id}/events")))
            .header("last-event-id", last)
            .send()
            .await
            .expect("SSE request");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("SSE body"))
    };
    match tokio::time::timeout(within, read).await {
        Ok(answer) => answer,
        Err(_) => panic!("resuming at {last:?}: the stream was still open after {within:?}"),
    }
}

async fn sse_resume_at_or_past_the_last_event_of_a_finished_job_ends_at_once(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let id = gw.submit_ok(json!({ "text": "resumed after the end" })).await;
    let mut sse = SseClient::open(&gw, id, None).await;
    let worker = env.worker();
    let events = sse.rest().await;
    let last = events.last().expect("events");
    assert_eq!(last.event, "completed", "{events:?}");
    let completed = last.id.clone().expect("the completed event has an id");

    // An EventSource reconnects with the id of the last event it saw: the completed one. It has
    // everything, so the answer is 204 (which also stops its reconnecting), at once.
    for resume_at in [completed.as_str(), "99999999999999-0"] {
        let started = Instant::now();
        let (status, body) = resume(&gw, id, resume_at, Duration::from_secs(10)).await;
        assert_eq!((status, body.as_str()), (204, ""), "resuming at {resume_at:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{resume_at:?}: {:?}", started.elapsed());
    }
    // Resuming before the end still replays the rest, and then ends.
    let before = events[events.len() - 2].id.clone().expect("id");
    let (status, body) = resume(&gw, id, &before, Duration::from_secs(10)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("event: completed") && body.contains(&format!("id: {completed}")), "{body}");
    worker.stop().await;
    gw.stop().await;
}

/// One event stream per gateway: a second is refused with 503, and the slot comes back as soon as
/// the first client hangs up, though its job has nothing new to say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_bounded_per_gateway() {
    let env = Env::new(Kind::Embedded);
    let gw = env.gateway_with(GatewayConfig { max_event_streams: 1, ..crate::harness::open_gateway() }).await;
    let id = gw.submit_ok(json!({ "text": "streamed to one client at a time" })).await;
    let mut first = SseClient::open(&gw, id, None).await;
    assert_eq!(first.next().await.expect("the current state").event, "status");
    let refused = gw.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (503, Some("overloaded")), "{}", refused.body);
    assert_eq!(refused.headers["retry-after"], "1");
    drop(first);
    // No worker runs: the job stays queued, so only noticing the hang-up frees the slot.
    wait_until("a stream can be opened again", Duration::from_secs(10), || async {
        let resp = gw.http.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
        if resp.status() == 200 { Ok(()) } else { Err(resp.status()) }
    })
    .await;
    gw.stop().await;
}

/// One long-poll per gateway: while it waits, another long-poll is answered `503 overloaded` at
/// once instead of waiting too, a submit with `Prefer: wait` gets its `202` without the wait, and once the first
/// is answered its slot serves the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_are_bounded_per_gateway() {
    let env = Env::new(Kind::Embedded);
    let gw = Arc::new(env.gateway_with(GatewayConfig { max_waiters: 1, ..crate::harness::open_gateway() }).await);
    let id = gw.submit_ok(json!({ "text": "long-polled by one client at a time" })).await;
    let long_poll = |wait_s: u64| {
        let gw = gw.clone();
        async move {
            let started = Instant::now();
            let r = gw.get(&format!("/v1/jobs/{id}?wait={wait_s}")).await;
            (r, started.elapsed())
        }
    };
    // Two long-polls at once: one parks in the only slot, and the other is answered `503
    // overloaded` at once (either may be first to the slot).
    let (first, parked) = match futures::future::select(tokio::spawn(long_poll(60)), tokio::spawn(long_poll(60))).await
    {
        futures::future::Either::Left((done, other)) | futures::future::Either::Right((done, other)) => {
            (done.unwrap(), other)
        }
    };
    let (r, took) = first;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (503, Some("overloaded")), "{}", r.body);
    assert!(r.headers.contains_key("retry-after"), "503 without Retry-After");
    assert!(took < Duration::from_secs(2), "the refused long-poll waited {took:?}");
    let started = Instant::now();
    let submitted = gw
        .http
        .post(gw.url("/v1/jobs"))
        .header("prefer", "wait=3")
        .json(&json!({ "model": MODEL, "input": { "text": "no slot to wait in" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 202);
    assert!(started.elapsed() < Duration::from_secs(2), "the submit waited: {:?}", started.elapsed());
    assert!(!parked.is_finished(), "the first long-poll still waits");
    let worker = env.worker();
    let (done, _) = parked.await.unwrap();
    assert_eq!((done.status, done.body["status"].as_str()), (200, Some("succeeded")), "{}", done.body);
    worker.stop().await;
    // The slot is free again: a long-poll on a job that will not finish waits its full time.
    let waiting = gw.submit_ok(json!({ "text": "queued with no worker" })).await;
    let started = Instant::now();
    let r = gw.get(&format!("/v1/jobs/{waiting}?wait=2")).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("queued")), "{}", r.body);
    assert!(started.elapsed() >= Duration::from_millis(1900), "it did not wait: {:?}", started.elapsed());
}

fn webhook_config(tune: impl FnOnce(&mut WebhookConfig)) -> GatewayConfig {
    let mut webhooks = WebhookConfig {
        webhook_secret: Some(Secret::new(SECRET)),
        webhook_allowed_hosts: vec!["127.0.0.1".into()],
        webhook_retry_base: Duration::from_millis(100),
        webhook_retry_max: Duration::from_millis(400),
        webhook_give_up_after: Duration::from_secs(3600),
        webhook_timeout: Duration::from_secs(5),
        ..WebhookConfig::default()
    };
    tune(&mut webhooks);
    GatewayConfig { webhooks, ..crate::harness::open_gateway() }
}

/// A receiver that takes connections and never answers; [`Hang::close`] takes it down (the port
/// then refuses connections).
struct Hang {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Hang {
    async fn start() -> Self {
        Self::on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(listener: tokio::net::TcpListener) -> Self {
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        Self { port, accepted, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection it holds.
    async fn close(self) -> u16 {
        self.task.abort();
        let _ = self.task.await;
        self.port
    }
}

/// A receiver answering 200, except that requests of the `held` event type wait until
/// [`Receiver::release`]. It notes, for each request, whether a held one was still unanswered.
#[derive(Clone)]
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: watch::Sender<bool>,
    holding: Arc<AtomicUsize>,
}

#[derive(Debug, Clone)]
struct Seen {
    payload: Value,
    /// A held request was still waiting for its answer when this one arrived.
    while_held: bool,
}

impl Receiver {
    async fn start(held: Option<&'static str>) -> Self {
        Self::on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), held)
    }

    fn on(listener: tokio::net::TcpListener, held: Option<&'static str>) -> Self {
        let port = listener.local_addr().unwrap().port();
        let (gate, _) = watch::channel(held.is_none());
        let this = Self { port, seen: Arc::default(), gate, holding: Arc::default() };
        let state = this.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |_headers: HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    let payload: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
                    let hold = held.is_some_and(|h| payload["type"] == h);
                    let while_held = state.holding.load(Ordering::SeqCst) > 0;
                    state.seen.lock().unwrap().push(Seen { payload, while_held });
                    if hold {
                        state.holding.fetch_add(1, Ordering::SeqCst);
                        let mut open = state.gate.subscribe();
                        let _ = open.wait_for(|open| *open).await;
                        state.holding.fetch_sub(1, Ordering::SeqCst);
                    }
                    StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        this
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// (type, seq) of each request about `job`, in arrival order.
    fn of(&self, job: JobId) -> Vec<(String, u64)> {
        self.seen()
            .iter()
            .filter(|s| s.payload["data"]["id"] == job.to_string())
            .map(|s| (s.payload["type"].as_str().unwrap_or("?").to_owned(), s.payload["seq"].as_u64().unwrap_or(0)))
            .collect()
    }

    fn release(&self) {
        self.gate.send_replace(true);
    }
}

async fn a_hanging_receiver_does_not_hold_up_deliveries_to_others(kind: Kind) {
    // Four slots in all, one per receiver; an attempt is given a minute, far beyond the test.
    let hang = Hang::start().await;
    let fast = Receiver::start(None).await;
    let env = Env::new(kind);
    let gw = env
        .gateway_with(webhook_config(|w| {
            w.webhook_concurrency = 4;
            w.webhook_concurrency_per_host = 1;
            w.webhook_timeout = Duration::from_secs(60);
        }))
        .await;
    let worker = env.worker();
    let mut stuck = Vec::new();
    for i in 0..6 {
        stuck.push(submit(&gw, hooked(&format!("to the hanging receiver {i}"), &hang.url(), &[])).await);
    }
    for id in &stuck {
        gw.finished(*id, T).await;
    }
    wait_until("the hanging receiver holds a delivery", T, || async {
        if hang.accepted() >= 1 { Ok(()) } else { Err(hang.accepted()) }
    })
    .await;
    let mut flowing = Vec::new();
    for i in 0..3 {
        flowing.push(submit(&gw, hooked(&format!("to the fast receiver {i}"), &fast.url(), &[])).await);
    }
    // Well within the hanging attempts' minute: their slots are still taken.
    let started = Instant::now();
    for id in &flowing {
        wait_until("the fast receiver gets its deliveries", Duration::from_secs(30), || async {
            let got = fast.of(*id);
            if got.iter().any(|(t, _)| t == "job.completed") {
                Ok(())
            } else {
                Err((got, hang.accepted(), started.elapsed()))
            }
        })
        .await;
    }
    assert_eq!(hang.accepted(), 1, "the hanging receiver got more than its one slot");
    worker.stop().await;
    gw.stop().await;
}

async fn a_jobs_webhook_events_arrive_in_order_with_their_seq(kind: Kind) {
    let ordered = Receiver::start(Some("job.started")).await;
    let control = Receiver::start(None).await;
    let env = Env::new(kind);
    let gw = env.gateway_with(webhook_config(|_| {})).await;
    let worker = env.worker();
    let id = submit(&gw, hooked("started, then completed", &ordered.url(), &["start"])).await;
    wait_until("job.started arrives (and is held)", T, || async {
        let got = ordered.of(id);
        if got.iter().any(|(t, _)| t == "job.started") { Ok(()) } else { Err(got) }
    })
    .await;
    gw.finished(id, T).await;
    // A later job's completion reaching another receiver shows the dispatcher went past this
    // job's completion, which is due already.
    let later = submit(&gw, hooked("a later job", &control.url(), &[])).await;
    wait_until("the later job's webhook arrives", T, || async {
        let got = control.of(later);
        if got.iter().any(|(t, _)| t == "job.completed") { Ok(()) } else { Err(got) }
    })
    .await;
    assert_eq!(
        ordered.of(id),
        [("job.started".to_owned(), 1)],
        "job.completed was sent while job.started was unanswered"
    );
    ordered.release();
    let got = wait_until("job.completed arrives", T, || async {
        let got = ordered.of(id);
        if got.len() >= 2 { Ok(got) } else { Err(got) }
    })
    .await;
    assert_eq!(got, [("job.started".to_owned(), 1), ("job.completed".to_owned(), 2)]);
    assert!(ordered.seen().iter().all(|s| !s.while_held), "{:?}", ordered.seen());
    let first = &ordered.seen()[0].payload;
    assert!(first["timestamp"].is_string() && first["data"]["id"].is_string(), "the Standard Webhooks shape: {first}");
    worker.stop().await;
    gw.stop().await;
}

async fn webhooks_to_a_receiver_that_hangs_then_is_down_then_back_all_arrive(kind: Kind) {
    let hang = Hang::start().await;
    let env = Env::new(kind);
    let gw = env.gateway_with(webhook_config(|w| w.webhook_timeout = Duration::from_millis(500))).await;
    let worker = env.worker();
    let id = submit(&gw, hooked("outlasts its receiver's troubles", &hang.url(), &["start"])).await;
    let hook = |min_attempts: u64| {
        let gw = &gw;
        async move {
            wait_until(&format!("{min_attempts} failed attempts"), T, || async {
                let job = gw.job(id).await;
                let hook = job["webhook"].clone();
                match hook["attempts"].as_u64() {
                    Some(n) if n >= min_attempts && hook["delivered_at"].is_null() => Ok(hook),
                    _ => Err(hook),
                }
            })
            .await
        }
    };
    // Slow: the attempts time out.
    let timed_out = hook(2).await;
    assert!(timed_out["last_status"].is_null(), "{timed_out}");
    assert!(hang.accepted() >= 2);
    // Down: connections are refused.
    let port = hang.close().await;
    let before = gw.job(id).await["webhook"]["attempts"].as_u64().unwrap();
    let refused = hook(before + 2).await;
    assert!(refused["last_status"].is_null(), "{refused}");
    // Back, on the same port: everything arrives, in order.
    let back = Receiver::on(tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap(), None);
    let job = wait_until("the webhook is delivered", T, || async {
        let job = gw.job(id).await;
        let delivered = job["webhook"]["delivered_at"].is_string() && back.of(id).len() >= 2;
        if delivered { Ok(job) } else { Err((job["webhook"].clone(), back.of(id))) }
    })
    .await;
    assert_eq!(back.of(id), [("job.started".to_owned(), 1), ("job.completed".to_owned(), 2)]);
    assert_eq!(job["webhook"]["last_status"], 200, "{}", job["webhook"]);
    assert!(job["webhook"]["gave_up_at"].is_null());
    worker.stop().await;
    gw.stop().await;
}
