//! The fair-share scenario: an interactive tenant's jobs, one a second, while another tenant floods
//! the same model, against the interactive tenant alone. One worker, three phases:
//! - alone: tenant B's jobs and nothing else; then the same through the gateway without keys,
//!   for what a key costs (its check and the rate limiter's Redis round trip);
//! - flooded: tenant A keeps at least [`FLOOD_LOW`] jobs queued in its lane, B as before;
//! - one queue: the same flood and B's jobs through a gateway without keys, which puts every job
//!   in the model's shared lane: one FIFO queue, as Kiln had before lanes.
//!
//! B's latency is its client's: a submit with `Prefer: wait` until the job's end. B's first job,
//! which waits for the worker to find B's new lane, is timed on its own before the phases.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use kiln_proto::{JobRecord, JobStatus};
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use crate::Args;
use crate::corpus::Corpus;
use crate::procs::Proc;
use crate::scenarios::{self, job};
use crate::sentences;
use crate::stats::Samples;

/// The flooding tenant's backlog is topped up whenever fewer than this many of its jobs wait.
pub const FLOOD_LOW: u32 = 2000;
/// Jobs per top-up, and the clients that submit them.
const FLOOD_TOP_UP: usize = 1000;
const FLOOD_CLIENTS: usize = 16;
/// Tries of one flood job that is answered 503.
const FLOOD_RETRIES: usize = 10;

pub struct Fairness {
    pub alone: Samples,
    /// The same jobs through the gateway without keys.
    pub alone_open: Samples,
    pub flooded: Samples,
    pub one_queue: Samples,
    /// The interactive tenant's first job: its lane is new.
    pub first: Samples,
    /// Jobs the flooding tenant submitted, over both flooded phases.
    pub flood_jobs: usize,
    /// The fewest of its jobs seen waiting during a flooded phase, after the first top-up.
    pub flood_min_depth: u32,
}

pub async fn run(args: &Args, http: &reqwest::Client, prefix: &str, corpus: &Arc<Corpus>) -> anyhow::Result<Fairness> {
    let phase = args.duration * 2;
    // Keys on, and limits out of the way: the flood is meant to reach the queue.
    let unlimited = [
        ("KILN_AUTH", "keys"),
        ("KILN_RATE_LIMIT", "1000000"),
        ("KILN_RATE_BURST", "1000000"),
        ("KILN_MAX_JOBS_IN_FLIGHT", "10000000"),
    ];
    let keyed = Proc::gateway_with(args, prefix, &unlimited).await?;
    let open = Proc::gateway(args, prefix).await?;
    let worker = Proc::worker(args, prefix, &args.model, &[])?;
    let flood_key = Proc::key(args, prefix, "flood").await?;
    let lone_key = Proc::key(args, prefix, "interactive").await?;
    scenarios::warm_up(http, &open.url, &args.model, sentences::batch(800_000, 16), Duration::from_secs(300)).await?;

    let first = interactive(http, &keyed.url, Some(&lone_key), &args.model, corpus, Duration::from_secs(1)).await?;
    let alone = interactive(http, &keyed.url, Some(&lone_key), &args.model, corpus, phase).await?;
    let alone_open = interactive(http, &open.url, None, &args.model, corpus, phase).await?;

    let lane = format!("{prefix}.jobs.{}@flood", args.model);
    let flood = Flood::start(args, http, &keyed.url, Some(flood_key), &lane, corpus).await?;
    let flooded = interactive(http, &keyed.url, Some(&lone_key), &args.model, corpus, phase).await?;
    let (mut flood_jobs, mut flood_min_depth) = flood.stop().await?;
    purge(args, &lane).await?;

    let shared = format!("{prefix}.jobs.{}", args.model);
    let flood = Flood::start(args, http, &open.url, None, &shared, corpus).await?;
    let one_queue = interactive(http, &open.url, None, &args.model, corpus, phase).await?;
    let (jobs, depth) = flood.stop().await?;
    purge(args, &shared).await?;
    flood_jobs += jobs;
    flood_min_depth = flood_min_depth.min(depth);

    worker.stop().await?;
    keyed.stop().await?;
    open.stop().await?;
    Ok(Fairness { alone, alone_open, flooded, one_queue, first, flood_jobs, flood_min_depth })
}

/// One job a second for `phase`, each waited for to its end; their latencies.
async fn interactive(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    model: &str,
    corpus: &Arc<Corpus>,
    phase: Duration,
) -> anyhow::Result<Samples> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut jobs = Vec::new();
    for _ in 0..phase.as_secs().max(1) {
        tick.tick().await;
        let request = authorised(http.post(format!("{url}/v1/jobs")), token).header("prefer", "wait=60").json(&job(
            model,
            corpus.next_text(),
            false,
        ));
        jobs.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = request.send().await?;
            let status = r.status();
            if status != 200 {
                bail!("an interactive job answered {status}: {}", r.text().await.unwrap_or_default());
            }
            let record: JobRecord = r.json().await?;
            if record.status != JobStatus::Succeeded {
                bail!("interactive job {} ended {} within 60 s: {:?}", record.id, record.status.as_str(), record.error);
            }
            Ok(started.elapsed())
        }));
    }
    let mut samples = Samples::default();
    for j in jobs {
        samples.push(j.await??);
    }
    Ok(samples)
}

fn authorised(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// A tenant flooding a queue: whenever fewer than [`FLOOD_LOW`] of its jobs wait in it, another
/// [`FLOOD_TOP_UP`] are submitted (without waiting for them).
struct Flood {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<(usize, u32)>>,
}

impl Flood {
    /// Starts once the first top-up is queued.
    async fn start(
        args: &Args,
        http: &reqwest::Client,
        url: &str,
        token: Option<String>,
        queue: &str,
        corpus: &Arc<Corpus>,
    ) -> anyhow::Result<Self> {
        let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let (http, url, model, queue, corpus) =
            (http.clone(), url.to_owned(), args.model.clone(), queue.to_owned(), corpus.clone());
        let submit = move |n: usize| {
            let (http, url, model, corpus, token) =
                (http.clone(), url.clone(), model.clone(), corpus.clone(), token.clone());
            async move {
                futures::stream::iter(0..n)
                    .map(|_| {
                        let req = authorised(http.post(format!("{url}/v1/jobs")), token.as_deref()).json(&job(
                            &model,
                            corpus.next_text(),
                            false,
                        ));
                        async move {
                            // A 503 is retried after its Retry-After, as a client that floods would.
                            for _ in 0..FLOOD_RETRIES {
                                let r = req.try_clone().context("a flood request")?.send().await?;
                                match r.status().as_u16() {
                                    202 => return Ok(()),
                                    503 => {
                                        let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok());
                                        let wait = wait.and_then(|v| v.parse().ok()).unwrap_or(1);
                                        tokio::time::sleep(Duration::from_secs(wait)).await;
                                    }
                                    s => bail!("a flood job answered {s}: {}", r.text().await.unwrap_or_default()),
                                }
                            }
                            bail!("a flood job answered 503 {FLOOD_RETRIES} times")
                        }
                    })
                    .buffer_unordered(FLOOD_CLIENTS)
                    .collect::<Vec<anyhow::Result<()>>>()
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<Vec<()>>>()
                    .map(|_| n)
            }
        };
        let mut submitted = submit(FLOOD_TOP_UP).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let _conn = conn;
            let mut least = u32::MAX;
            while !stopping.load(Ordering::Relaxed) {
                let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
                let depth = ch
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .with_context(|| format!("the depth of {queue}"))?
                    .message_count();
                least = least.min(depth);
                if depth < FLOOD_LOW {
                    submitted += submit(FLOOD_TOP_UP).await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Ok((submitted, least))
        });
        Ok(Self { stop, task })
    }

    /// Stops submitting; answers the jobs submitted and the least backlog seen.
    async fn stop(self) -> anyhow::Result<(usize, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Empties a queue of what waits in it (what a worker holds runs to its end).
async fn purge(args: &Args, queue: &str) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    Ok(())
}
