//! Hard faults under mixed load, all with real processes (`kiln gateway` and `kiln worker` children,
//! private Redis and RabbitMQ where a scenario crashes them): Redis (`appendfsync everysec`) and
//! RabbitMQ killed with SIGKILL mid-run and restarted, a worker killed while it holds a lease, the
//! gateway killed in the middle of a burst of identical submissions and of idempotent ones, and a
//! webhook receiver that is slow, then down, then back; and (ignored for now) Redis crashed as its
//! machine would, losing the writes since its last fsync. Embedding, image and deadline jobs are
//! mixed in every load; the history checker ([`crate::history`]) judges each scenario and prints
//! `scenario=… accepted refused lost duplicated wrong stuck`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use kiln_common::config::{BackendArgs, Secret};
use kiln_common::testing::servers::{Fsync, RabbitMq, Redis};
use kiln_common::testing::{self, wait_until};
use kiln_proto::JobId;
use serde_json::{Value, json};

use crate::harness::{ChildGateway, ChildWorker, MODEL, TERRAIN, repo_dir, runs_logged};
use crate::history::{Expect, History};

/// How long every accepted job has to reach a terminal state once the faults are over: the
/// backlog's drain plus the store's sweeper (`KILN_SWEEP_AFTER`) finding what a crash stranded.
const SETTLE: Duration = Duration::from_secs(90);
/// How long an idempotent client keeps retrying its request.
const KEY_RETRY: Duration = Duration::from_secs(60);
/// Waits for a scenario's own milestones (a lease taken, a backlog built).
const MILESTONE: Duration = Duration::from_secs(120);
/// Stale-after of the store's sweeper, for every gateway and worker.
const SWEEP: (&str, &str) = ("KILN_SWEEP_AFTER", "5s");

/// A scenario's progress line, stamped with the time since its history began.
macro_rules! say {
    ($h:expr, $($arg:tt)*) => { println!("[{:>7.1?}] {}", $h.clock(), format!($($arg)*)) };
}

fn worker_env(models: &'static str, extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env =
        vec![("KILN_RETRY_BASE", "100ms"), ("KILN_DRAIN_TIMEOUT", "60s"), ("KILN_WORKER_MODELS", models), SWEEP];
    env.extend_from_slice(extra);
    env
}

const BOTH_MODELS: &str = "all-minilm-l6-v2,terrain-diffusion";

fn embedding(text: String) -> (Value, Expect) {
    (json!({ "model": MODEL, "input": { "text": text } }), Expect::Embedding(vec![text]))
}

fn embedding_of(texts: Vec<String>) -> (Value, Expect) {
    (json!({ "model": MODEL, "input": { "texts": texts } }), Expect::Embedding(texts))
}

/// Tiny terrain images, seeded so each job's images are its own.
fn images(seed: u64, count: usize) -> (Value, Expect) {
    let input = json!({ "difficulty": 40, "seed": seed, "count": count, "width": 64, "height": 64 });
    (json!({ "model": TERRAIN, "input": input }), Expect::Images { seed, count })
}

fn with_deadline((mut body, expect): (Value, Expect), seconds: f64) -> (Value, Expect) {
    body["deadline_s"] = json!(seconds);
    (body, expect)
}

/// Job `i` of a mixed load for scenario `tag`: mostly single-text embeddings, every 7th of three
/// texts, every 20th an image job of three images, every 9th with a deadline (alternately 1 s,
/// which a backlog may outlast, and 120 s). Every input is unique.
fn mixed_job(tag: &str, i: usize, first_seed: u64) -> (String, Value, Expect) {
    let label = format!("{tag}-{i}");
    let job = if i % 20 == 10 {
        images(first_seed + 10 * i as u64, 3)
    } else if i % 7 == 3 {
        embedding_of((0..3).map(|k| format!("Text {k} of job {i} in {tag}, which must come through.")).collect())
    } else {
        embedding(format!("Job {i} of {tag}: one sentence that must come through the faults."))
    };
    let job = if i % 9 == 4 { with_deadline(job, if i % 18 == 4 { 1.0 } else { 120.0 }) } else { job };
    (label, job.0, job.1)
}

fn mixed(tag: &str, n: usize, first_seed: u64) -> Vec<(String, Value, Expect)> {
    (0..n).map(|i| mixed_job(tag, i, first_seed)).collect()
}

/// An open-ended load: the submissions of tick `i` (one job of a mixed load, or a group of
/// identical ones) are sent `spacing·i` after the start (an arrival profile, not a wait), each on
/// its own, until [`Load::finish`] or `LOAD_TICKS` ticks (a bound for a milestone that never comes).
const LOAD_TICKS: usize = 5000;

struct Load {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<usize>,
}

impl Load {
    /// A mixed load (see [`mixed_job`]), one job per tick.
    fn start(h: &Arc<History>, tag: &'static str, first_seed: u64, spacing: Duration) -> Self {
        Self::ticks(h, spacing, move |i| vec![mixed_job(tag, i, first_seed)])
    }

    fn ticks(
        h: &Arc<History>,
        spacing: Duration,
        tick: impl Fn(usize) -> Vec<(String, Value, Expect)> + Send + 'static,
    ) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let (h, halt) = (h.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut inflight = tokio::task::JoinSet::new();
            let mut i = 0;
            while i < LOAD_TICKS {
                tokio::select! {
                    () = halt.cancelled() => break,
                    () = tokio::time::sleep_until(start + spacing * i as u32) => {}
                }
                for (label, body, expect) in tick(i) {
                    let (h, n) = (h.clone(), h.add(label, body, expect, None));
                    inflight.spawn(async move { h.attempt(n).await });
                }
                i += 1;
            }
            while inflight.join_next().await.is_some() {}
            i
        });
        Self { stop, task }
    }

    /// Stops submitting and waits for the answers to what was sent; returns how many were.
    async fn finish(self) -> usize {
        self.stop.cancel();
        self.task.await.expect("load task")
    }
}

/// Registers `jobs` and sends them one every `spacing` from now (an arrival profile, not a wait);
/// returns when every one was answered (or got no answer).
async fn send_on_schedule(h: &Arc<History>, jobs: Vec<(String, Value, Expect)>, spacing: Duration) {
    send_groups(h, jobs.into_iter().map(|job| vec![job]).collect(), spacing).await;
}

/// Registers `groups` and sends group `i` all at once, `spacing·i` from now; returns when every
/// submission was answered (or got no answer).
async fn send_groups(h: &Arc<History>, groups: Vec<Vec<(String, Value, Expect)>>, spacing: Duration) {
    let plan: Vec<(usize, Duration)> = groups
        .into_iter()
        .enumerate()
        .flat_map(|(i, group)| {
            group.into_iter().map(move |(label, body, expect)| (label, body, expect, spacing * i as u32))
        })
        .map(|(label, body, expect, at)| (h.add(label, body, expect, None), at))
        .collect();
    let start = tokio::time::Instant::now();
    futures::stream::iter(plan.into_iter().map(|(n, at)| {
        let h = h.clone();
        async move {
            tokio::time::sleep_until(start + at).await;
            h.attempt(n).await
        }
    }))
    .buffer_unordered(100_000)
    .collect::<Vec<_>>()
    .await;
}

fn gateway_lines(gw: &ChildGateway) -> Vec<Value> {
    gw.lines()
}

/// The worker's JSON lines that say it took a lease, with the job's id.
fn leases_taken(w: &ChildWorker) -> Vec<String> {
    w.lines()
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains("lease taken")))
        .filter_map(|l| l["job_id"].as_str().map(str::to_owned))
        .collect()
}

fn ran_in(w: &ChildWorker, job: &str) -> bool {
    runs_logged(&[w]).iter().any(|(id, ..)| id == job)
}

/// Scenario: a worker SIGKILLed while it holds a lease, then Redis (`appendfsync everysec`) killed
/// with SIGKILL and restarted, both in the middle of a mixed load of embedding, image and deadline
/// jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_a_leasing_worker_killed_under_mixed_load() {
    let mut redis = Redis::start_with(Fsync::EverySec).await;
    let mut args = testing::backend_args(Duration::from_secs(3600));
    args.redis_url = Secret::new(redis.url());
    let models = repo_dir();
    let gw = ChildGateway::spawn(&args, &models, &[SWEEP]).await;
    let lease = [("KILN_LEASE_AFTER", "300ms"), ("KILN_LEASE_TTL", "3s")];
    let env = worker_env(BOTH_MODELS, &lease);
    let mut workers = vec![ChildWorker::spawn(&args, &models, &env), ChildWorker::spawn(&args, &models, &env)];
    let h = History::new(&gw.url(""));

    let load = Load::start(&h, "redis-kill", 1_000, Duration::from_millis(25));

    // Fault 1: the first lease a worker takes on a job it is still running; kill that worker.
    let (victim, job) = wait_until("a worker holds a lease on a job it is running", MILESTONE, || async {
        let found = workers
            .iter()
            .enumerate()
            .find_map(|(i, w)| leases_taken(w).into_iter().find(|job| !ran_in(w, job)).map(|job| (i, job)));
        found.ok_or_else(|| h.counts())
    })
    .await;
    workers[victim].kill();
    workers[victim].wait().await;
    let finished_before_kill = ran_in(&workers[victim], &job);
    say!(
        h,
        "redis-kill: worker {victim} killed holding the lease of job {job} (its run logged before the kill: {finished_before_kill})"
    );
    workers.push(ChildWorker::spawn(&args, &models, &env));

    // Fault 2: Redis killed mid-run; the results read so far are the first of two reads.
    wait_until("200 submissions are answered", MILESTONE, || async {
        let c = h.counts();
        if c.answered >= 200 { Ok(()) } else { Err(c) }
    })
    .await;
    h.observe().await;
    let before = h.counts();
    redis.kill().await;
    wait_until("submissions meet the outage (503)", MILESTONE, || async {
        let c = h.counts();
        if c.refused >= before.refused + 40 { Ok(()) } else { Err(c) }
    })
    .await;
    redis.restart().await;
    let restarted = h.counts();
    say!(
        h,
        "redis-kill: Redis killed after {} answers, restarted after {} refusals",
        before.answered,
        restarted.refused - before.refused
    );
    wait_until("200 more submissions are accepted after the restart", MILESTONE, || async {
        let c = h.counts();
        if c.accepted >= restarted.accepted + 200 { Ok(()) } else { Err(c) }
    })
    .await;
    let sent = load.finish().await;
    say!(h, "redis-kill: {sent} submissions sent");

    let stuck = h.settle(SETTLE).await;
    say!(h, "redis-kill: settled, {} not terminal within {SETTLE:?}", stuck.len());
    let refs: Vec<&ChildWorker> = workers.iter().collect();
    let verdict = h.check("redis-kill", &refs, &gateway_lines(&gw)).await;
    let leased = h.read(job.parse().unwrap(), None).await.unwrap().unwrap_or_default();
    verdict.finish();
    // The job whose worker died holding its lease was taken over: started again once its lease
    // lapsed (the history checked it ran to a stored result once).
    if !finished_before_kill {
        assert!(leased["attempts"].as_u64().unwrap_or(0) >= 2, "the leased job was not started again: {leased}");
    }
}

/// Scenario: Redis (`appendfsync everysec`) crashed as its machine would crash: SIGKILL, with the
/// writes since its last fsync gone (its append-only file cut back to where it was a moment
/// before), in the middle of a mixed load. The history allows what the README says such a crash
/// may do — a job run again, a result replaced by an equal one — for the jobs whose first result
/// fell in the lost writes, and nothing else.
/// A job whose whole life (accepted, run, acknowledged) fell in the lost writes is gone with them
/// (404), as README says; a job running when its finish was lost is found by the sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_loses_its_last_writes_under_mixed_load() {
    let mut redis = Redis::start_with(Fsync::EverySec).await;
    let mut args = testing::backend_args(Duration::from_secs(3600));
    args.redis_url = Secret::new(redis.url());
    let models = repo_dir();
    let gw = ChildGateway::spawn(&args, &models, &[SWEEP]).await;
    let env = worker_env(BOTH_MODELS, &[]);
    let workers = [ChildWorker::spawn(&args, &models, &env), ChildWorker::spawn(&args, &models, &env)];
    let h = History::new(&gw.url(""));
    let load = Load::start(&h, "redis-crash", 500_000, Duration::from_millis(25));
    wait_until("200 submissions are answered", MILESTONE, || async {
        let c = h.counts();
        if c.answered >= 200 { Ok(()) } else { Err(c) }
    })
    .await;
    h.observe().await;
    // The last fsync: what follows in the file is lost in the crash. The workers' logs are read
    // first, so every line before these counts reports a write before the mark.
    let window_start = h.clock();
    let lines_at_mark: Vec<usize> = workers.iter().map(|w| w.lines().len()).collect();
    let mark = redis.aof_mark();
    let marked = h.counts();
    wait_until("30 more submissions are accepted after the last fsync", MILESTONE, || async {
        let c = h.counts();
        if c.accepted >= marked.accepted + 30 { Ok(()) } else { Err(c) }
    })
    .await;
    h.observe().await;
    redis.crash_back_to(&mark).await;
    let window_end = h.clock();
    let crashed = h.counts();
    wait_until("submissions meet the outage (503)", MILESTONE, || async {
        let c = h.counts();
        if c.refused >= crashed.refused + 10 { Ok(()) } else { Err(c) }
    })
    .await;
    // Until the restart nothing can be stored, so every line logged by now reports a write made
    // before the crash (a worker may log a store a moment after it returned).
    let lines_at_crash: Vec<usize> = workers.iter().map(|w| w.lines().len()).collect();
    redis.restart().await;
    let restarted = h.counts();
    say!(
        h,
        "redis-crash: crashed {:?} after the last fsync, losing the writes of {} accepted jobs",
        window_end - window_start,
        crashed.accepted - marked.accepted
    );
    wait_until("100 more submissions are accepted after the restart", MILESTONE, || async {
        let c = h.counts();
        if c.accepted >= restarted.accepted + 100 { Ok(()) } else { Err(c) }
    })
    .await;
    load.finish().await;
    h.writes_lost(window_start, window_end, lines_at_mark.into_iter().zip(lines_at_crash).map(|(a, b)| a..b).collect());
    let stuck = h.settle(SETTLE).await;
    say!(h, "redis-crash: settled, {} not terminal within {SETTLE:?}", stuck.len());
    h.check("redis-crash", &[&workers[0], &workers[1]], &gateway_lines(&gw)).await.finish();
}

/// Scenario: RabbitMQ killed with SIGKILL twice — while submissions arrive, and while the workers
/// consume a backlog — and restarted each time, under a mixed load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_killed_mid_submit_and_mid_consume() {
    let mut rabbit = RabbitMq::start(None).await;
    let mut args = testing::backend_args(Duration::from_secs(3600));
    args.amqp_url = Secret::new(rabbit.url());
    let models = repo_dir();
    let gw = ChildGateway::spawn(&args, &models, &[SWEEP]).await;
    let env = worker_env(BOTH_MODELS, &[]);
    let workers = [ChildWorker::spawn(&args, &models, &env), ChildWorker::spawn(&args, &models, &env)];
    let h = History::new(&gw.url(""));

    // Kill 1: submissions arriving every 20 ms meet the crash and the restart.
    let load = Load::start(&h, "rabbitmq-kill", 100_000, Duration::from_millis(20));
    wait_until("200 submissions are accepted", MILESTONE, || async {
        let c = h.counts();
        if c.accepted >= 200 { Ok(()) } else { Err(c) }
    })
    .await;
    let t = std::time::Instant::now();
    rabbit.kill().await;
    let at_kill = h.counts();
    rabbit.restart().await;
    say!(h, "rabbitmq-kill: killed and restarted in {:?}", t.elapsed());
    let restarted = h.counts();
    wait_until("100 more submissions are accepted after the restart", MILESTONE, || async {
        let c = h.counts();
        if c.accepted >= restarted.accepted + 100 { Ok(()) } else { Err(c) }
    })
    .await;
    load.finish().await;
    let after_load = h.counts();
    say!(h, "rabbitmq-kill: killed at {at_kill:?}; after the load {after_load:?}");
    assert!(after_load.refused > at_kill.refused, "premise: submissions met the crash");
    assert_eq!(after_load.answered, after_load.submitted, "every submission is answered while the broker is down");
    assert_eq!(after_load.unanswered, 0, "no submission goes unanswered while the broker is down");

    // Kill 2: a backlog built as fast as the gateway takes it, killed while the workers consume it.
    let backlog = mixed("rabbitmq-backlog", 400, 200_000);
    send_on_schedule(&h, backlog, Duration::ZERO).await;
    let runs_then = runs_logged(&[&workers[0], &workers[1]]).len();
    wait_until("the workers are consuming the backlog", MILESTONE, || async {
        let n = runs_logged(&[&workers[0], &workers[1]]).len();
        if n >= runs_then + 50 { Ok(()) } else { Err(n - runs_then) }
    })
    .await;
    let before_kill = runs_logged(&[&workers[0], &workers[1]]).len();
    let t = std::time::Instant::now();
    rabbit.kill().await;
    rabbit.restart().await;
    say!(h, "rabbitmq-kill: killed and restarted in {:?}", t.elapsed());
    let accepted = h.counts().accepted;
    say!(h, "rabbitmq-kill: second kill with {} runs logged for {accepted} accepted jobs", before_kill);
    assert!(before_kill + 100 < accepted, "premise: a backlog was left when the broker was killed");

    let t = std::time::Instant::now();
    let stuck = h.settle(SETTLE).await;
    say!(h, "rabbitmq-kill: settled in {:?}, {} not terminal within {SETTLE:?}", t.elapsed(), stuck.len());
    let t = std::time::Instant::now();
    let verdict = h.check("rabbitmq-kill", &[&workers[0], &workers[1]], &gateway_lines(&gw)).await;
    say!(h, "rabbitmq-kill: checked in {:?}", t.elapsed());
    verdict.finish();
}

/// One request the webhook receiver got, and whether it answered 200 within the sender's timeout.
#[derive(Clone)]
struct Hit {
    headers: HeaderMap,
    body: String,
    answered_in_time: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HookMode {
    /// Every other request is answered after 1.5 s, past the gateway's 1 s timeout; the others
    /// after 100 ms.
    Slow,
    /// Answered at once.
    Fast,
}

/// A webhook receiver: a real HTTP server that can be slow, go down (its port closed, so
/// deliveries are refused) and come back on the same port. Every answer closes its connection,
/// so no delivery rides on a connection opened before the receiver went down.
struct Hook {
    addr: std::net::SocketAddr,
    mode: Arc<Mutex<HookMode>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Hook {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut me = Self {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(Mutex::new(HookMode::Slow)),
            hits: Arc::default(),
            server: None,
        };
        me.serve(listener);
        me
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (mode, hits) = (self.mode.clone(), self.hits.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (mode, hits) = (mode.clone(), hits.clone());
                async move {
                    let (n, mode) = (hits.lock().unwrap().len(), *mode.lock().unwrap());
                    // The receiver's own slowness, the fault being injected.
                    let delay = match mode {
                        HookMode::Slow if n % 2 == 1 => Duration::from_millis(1500),
                        HookMode::Slow => Duration::from_millis(100),
                        HookMode::Fast => Duration::ZERO,
                    };
                    hits.lock().unwrap().push(Hit { headers, body, answered_in_time: delay < Duration::from_secs(1) });
                    tokio::time::sleep(delay).await;
                    (StatusCode::OK, [("connection", "close")])
                }
            }),
        );
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Closes the port: deliveries are refused until [`Hook::back`].
    async fn down(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
        let addr = self.addr;
        wait_until("the webhook receiver refuses connections", MILESTONE, || async move {
            match tokio::net::TcpStream::connect(addr).await {
                Err(_) => Ok(()),
                Ok(_) => Err("still accepting"),
            }
        })
        .await;
    }

    /// Listens again on the same port, answering at once.
    async fn back(&mut self) {
        *self.mode.lock().unwrap() = HookMode::Fast;
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("the receiver's port again");
        self.serve(listener);
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

fn verify(headers: &HeaderMap, body: &str) -> bool {
    crate::delivery::verify(crate::delivery::SECRET, headers, body)
}

fn webhook_gateway_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KILN_WEBHOOK_SECRET", crate::delivery::SECRET),
        ("KILN_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1"),
        ("KILN_WEBHOOK_TIMEOUT", "1s"),
        ("KILN_WEBHOOK_RETRY_BASE", "200ms"),
        ("KILN_WEBHOOK_RETRY_MAX", "1s"),
        SWEEP,
    ]
}

/// The webhook jobs' delivery attempts so far, summed over their records.
async fn webhook_attempts(h: &History, ids: &[JobId]) -> u64 {
    let mut total = 0;
    for id in ids {
        if let Ok(Some(r)) = h.read(*id, None).await {
            total += r["webhook"]["attempts"].as_u64().unwrap_or(0);
        }
    }
    total
}

/// Scenario: the gateway SIGKILLed in the middle of a burst of identical submissions (coalesced,
/// cache on) and of submissions with idempotency keys, which their clients retry against the
/// restarted gateway; meanwhile a webhook receiver is slow, then down, then back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_burst_while_webhooks_are_slow_down_and_back() {
    let args: BackendArgs = testing::backend_args(Duration::from_secs(3600));
    let models = repo_dir();
    let mut hook = Hook::start().await;
    let mut gw = ChildGateway::spawn(&args, &models, &webhook_gateway_env()).await;
    let env = worker_env(MODEL, &[]);
    let workers = [ChildWorker::spawn(&args, &models, &env), ChildWorker::spawn(&args, &models, &env)];
    let h = History::new(&gw.url(""));

    // Webhooks against a slow receiver: half its answers come after the sender gave up.
    let hook_url = hook.url();
    let hooked = |i: usize| {
        let (mut body, expect) = embedding(format!("Webhook job {i} of gateway-kill, delivered whatever happens."));
        body["webhook"] = json!(hook_url);
        (format!("webhook-{i}"), body, expect)
    };
    send_on_schedule(&h, (0..30).map(hooked).collect(), Duration::ZERO).await;
    wait_until("the slow receiver got 15 requests", MILESTONE, || async {
        let n = hook.hits().len();
        if n >= 15 { Ok(()) } else { Err(n) }
    })
    .await;
    hook.down().await;
    send_on_schedule(&h, (30..50).map(hooked).collect(), Duration::ZERO).await;
    let hooked_ids = h.accepted();
    let attempts_at_down = webhook_attempts(&h, &hooked_ids).await;

    // Four bursts, each with a kill in its middle: the window between a leader's record and its
    // publish is short, so each kill strands a leader (and its followers) only by chance.
    let mut keyed = Vec::new();
    let mut retrying = Vec::new();
    for round in 0..4 {
        let (keys, clients) = burst_with_a_kill(&h, &mut gw, round).await;
        keyed.extend(keys);
        retrying.push(clients);
    }
    for clients in retrying {
        clients.await.unwrap();
    }
    let after = h.counts();
    say!(h, "gateway-kill: after the bursts {after:?}");
    assert!(after.unanswered > 0, "premise: the kills cut submissions in flight");
    // Every idempotent client that holds an id sends its request once more to the restarted
    // gateway: it must name the same job.
    let holders: Vec<usize> = keyed.into_iter().filter(|n| h.id_of(*n).is_some()).collect();
    futures::stream::iter(holders.iter().map(|&n| h.submit_retrying(n, KEY_RETRY)))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    say!(h, "gateway-kill: {} idempotent clients that hold an id repeated their request", holders.len());

    // The receiver stays down until the dispatcher has met it so, then comes back.
    wait_until("deliveries meet the receiver down", MILESTONE, || async {
        let n = webhook_attempts(&h, &hooked_ids).await;
        if n >= attempts_at_down + 10 { Ok(()) } else { Err(n - attempts_at_down) }
    })
    .await;
    let attempts_while_down = webhook_attempts(&h, &hooked_ids).await - attempts_at_down;
    hook.back().await;

    let stuck = h.settle(SETTLE).await;
    say!(h, "gateway-kill: settled, {} not terminal within {SETTLE:?}", stuck.len());
    // Every webhook is delivered within the bound.
    let undelivered = tokio::time::timeout(SETTLE, async {
        wait_until("every webhook is delivered", SETTLE * 2, || async {
            let mut left = Vec::new();
            for id in &hooked_ids {
                let r = h.read(*id, None).await.ok().flatten();
                if !r.as_ref().is_some_and(|r| r["webhook"]["delivered_at"].is_string()) {
                    left.push((*id, r.map(|r| r["webhook"].clone())));
                }
            }
            if left.is_empty() { Ok(()) } else { Err(left) }
        })
        .await
    })
    .await
    .is_err();

    let mut verdict = h.check("gateway-kill", &[&workers[0], &workers[1]], &gateway_lines(&gw)).await;
    let hits = hook.hits();
    check_webhooks(&h, &hooked_ids, &hits, undelivered, &mut verdict).await;
    say!(
        h,
        "gateway-kill: the receiver got {} requests, {} answered too late; {} delivery attempts met it down",
        hits.len(),
        hits.iter().filter(|hit| !hit.answered_in_time).count(),
        attempts_while_down
    );
    verdict.finish();
}

/// One burst with a gateway kill in its middle: a group of 8 identical submissions every 5 ms (the
/// first of a group leads, the others follow it) and 60 idempotent ones (one every 5 ms, each
/// retried by its client); the gateway is SIGKILLed once 200 of them were answered and restarted
/// on its port, and then the texts of the last 50 groups before the kill are submitted again, 8
/// times each, to the restarted gateway (they must not join a leader the dead gateway left
/// behind). Returns the idempotent submissions and their clients, still retrying.
async fn burst_with_a_kill(
    h: &Arc<History>,
    gw: &mut ChildGateway,
    round: usize,
) -> (Vec<usize>, tokio::task::JoinHandle<()>) {
    let text = move |g: usize| format!("Burst text {g} of round {round} of gateway-kill, sent eight times at once.");
    let group = move |g: usize, copy: &str| {
        (0..8)
            .map(|c| {
                let (body, expect) = embedding(text(g));
                (format!("burst{round}-{g}/{copy}{c}"), body, expect)
            })
            .collect::<Vec<_>>()
    };
    let before = h.counts();
    let burst = Load::ticks(h, Duration::from_millis(5), move |g| group(g, ""));
    let run_id = testing::unique_prefix();
    let keyed: Vec<usize> = (0..60u32)
        .map(|k| {
            let (body, expect) =
                embedding(format!("Idempotent job {k} of round {round} of gateway-kill, accepted once."));
            h.add(format!("keyed{round}-{k}"), body, expect, Some(format!("{run_id}-order-{k}")))
        })
        .collect();
    let start = tokio::time::Instant::now();
    let clients = {
        let (h, keyed) = (h.clone(), keyed.clone());
        tokio::spawn(async move {
            futures::stream::iter(keyed.into_iter().enumerate().map(|(k, n)| {
                let h = h.clone();
                async move {
                    tokio::time::sleep_until(start + Duration::from_millis(5) * k as u32).await;
                    h.submit_retrying(n, KEY_RETRY).await;
                }
            }))
            .buffer_unordered(100_000)
            .collect::<Vec<_>>()
            .await;
        })
    };
    wait_until(&format!("200 submissions of burst {round} are answered"), MILESTONE, || async {
        let answered = h.counts().responded - before.responded;
        if answered >= 200 { Ok(()) } else { Err(answered) }
    })
    .await;
    let t = std::time::Instant::now();
    gw.kill().await;
    let at_kill = h.counts();
    let groups = burst.finish().await;
    gw.restart().await;
    say!(
        h,
        "gateway-kill: burst {round}: killed with {} answered after {groups} groups, restarted in {:?}",
        at_kill.responded - before.responded,
        t.elapsed()
    );
    let again: Vec<_> = (groups.saturating_sub(50)..groups).map(|g| group(g, "again")).collect();
    send_groups(h, again, Duration::from_millis(5)).await;
    (keyed, clients)
}

/// Webhook promises: every delivery signed, one body per `webhook-id`, one `completed` event per
/// job carrying the job's stored result, and every job's `completed` delivered (the receiver
/// answered it in time).
async fn check_webhooks(h: &History, ids: &[JobId], hits: &[Hit], undelivered: bool, v: &mut crate::history::Verdict) {
    let mut bodies: std::collections::HashMap<String, String> = Default::default();
    let mut completed: std::collections::HashMap<String, std::collections::BTreeSet<String>> = Default::default();
    let mut acknowledged: std::collections::BTreeSet<String> = Default::default();
    for hit in hits {
        if !verify(&hit.headers, &hit.body) {
            v.wrong.push(format!("a webhook whose signature does not verify: {:?}", hit.headers));
            continue;
        }
        let wid = hit.headers["webhook-id"].to_str().unwrap_or_default().to_owned();
        if let Some(earlier) = bodies.insert(wid.clone(), hit.body.clone())
            && earlier != hit.body
        {
            v.wrong.push(format!("webhook {wid}: its body changed between attempts"));
        }
        let payload: Value = serde_json::from_str(&hit.body).unwrap_or(Value::Null);
        if payload["type"] == "job.completed" {
            let job = payload["data"]["id"].as_str().unwrap_or_default().to_owned();
            completed.entry(job.clone()).or_default().insert(wid);
            if hit.answered_in_time {
                acknowledged.insert(job);
            }
        }
    }
    for id in ids {
        let key = id.to_string();
        let record = h.read(*id, None).await.ok().flatten().unwrap_or(Value::Null);
        let events = completed.get(&key).cloned().unwrap_or_default();
        if events.len() > 1 {
            v.duplicated.push(format!("job {id}: {} different job.completed webhooks: {events:?}", events.len()));
        }
        for wid in &events {
            let payload: Value = serde_json::from_str(&bodies[wid]).unwrap_or(Value::Null);
            if payload["data"]["output"] != record["output"] || payload["data"]["status"] != record["status"] {
                v.wrong.push(format!("job {id}: webhook {wid} carries another result than the job's record"));
            }
        }
        let delivered = record["webhook"]["delivered_at"].is_string();
        if !delivered {
            v.stuck.push(format!(
                "job {id}: its webhook was not delivered (undelivered at the bound: {undelivered}): {}",
                record["webhook"]
            ));
        } else if !acknowledged.contains(&key) {
            v.wrong.push(format!(
                "job {id}: recorded as delivered, but the receiver never answered its completed event in time"
            ));
        }
    }
}
