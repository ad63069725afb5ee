//! `kiln-load`: the benchmark. Measures, in one run on one machine, bare ONNX Runtime throughput
//! on the served model and a raw confirmed-publish loop to RabbitMQ (the baselines), then the
//! gateway's submit rate and latency, end-to-end throughput and latency through gateway → RabbitMQ
//! → worker → Redis at several concurrencies, and cache hits; and prints each figure with the
//! ratios against the baselines. `scripts/bench.sh` starts what it needs and runs it.

mod images;
mod sentences;
mod stats;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use kiln_common::config::parse_duration;
use kiln_common::models::ModelRepository;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use stats::Samples;

/// Kiln's benchmark: baselines and scenarios in one run, reported as ratios.
#[derive(Parser, Debug)]
struct Args {
    /// The `kiln` binary to run the gateway and worker with (build it in release mode).
    #[arg(long, default_value = "target/release/kiln")]
    kiln: PathBuf,
    #[arg(long, env = "KILN_TEST_AMQP_URL")]
    amqp_url: String,
    #[arg(long, env = "KILN_TEST_REDIS_URL")]
    redis_url: String,
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    #[arg(long, default_value = "all-minilm-l6-v2")]
    model: String,
    /// ONNX Runtime intra-op threads, for the bare baseline and the worker alike.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// How long each measured phase runs.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Closed-loop client counts of the end-to-end scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    concurrency: Vec<usize>,
    /// Concurrent submitters for the submit scenario and the raw publish loop.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Scenarios to run (baselines always run): submit, e2e, cache, images.
    #[arg(long, value_delimiter = ',', default_value = "submit,e2e,cache,images")]
    scenarios: Vec<String>,
    /// The image model of the images scenario.
    #[arg(long, default_value = "terrain-diffusion")]
    image_model: String,
    /// Where to write the results as Markdown.
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Line {
    name: String,
    value: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut report: Vec<Line> = Vec::new();
    let mut note = |name: &str, value: String| {
        println!("{name:<48} {value}");
        report.push(Line { name: name.to_owned(), value });
    };

    // Baseline 1: bare ONNX Runtime on the same model, threads and inputs, at its best batch size.
    let (bare_best, bare_single_ms, best_batch) = bare(&args).await?;
    note("bare ONNX Runtime, texts/s (best batch)", format!("{bare_best:.1} (batch {best_batch})"));
    note("bare ONNX Runtime, one text, p50 ms", format!("{bare_single_ms:.2}"));

    // The system under test, as separate processes.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let submit_prefix = format!("bs{}", &run[..8]);
    let submit_gw = Proc::gateway(&args, &submit_prefix).await?;
    let e2e_gw = Proc::gateway(&args, &format!("be{}", &run[..8])).await?;
    let worker = Proc::worker(&args, &format!("be{}", &run[..8]), &args.model)?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(512).timeout(Duration::from_secs(120)).build()?;
    warm_up(&http, &e2e_gw.url, &args.model).await?;

    // Baseline 2: a raw confirmed-publish loop to the same broker, same concurrency.
    let raw = raw_publish(&args, &format!("bench-raw-{}", &run[..8])).await?;
    note("raw confirmed publish, msgs/s", format!("{raw:.0}"));

    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    let (mut submit_rate, mut best_e2e) = (f64::NAN, f64::NAN);
    if wants("submit") {
        let (rate, submit_lat) = submit(&http, &submit_gw.url, &args, None, 0).await?;
        submit_rate = rate;
        note("gateway submit (max), jobs/s", format!("{submit_rate:.0}"));
        note("gateway submit (max), p50 / p99 ms", format!("{:.2} / {:.2}", submit_lat.ms(50.0), submit_lat.ms(99.0)));
        let half = submit_rate / 2.0;
        let (paced_rate, paced_lat) = submit(&http, &submit_gw.url, &args, Some(half), 1_000_000).await?;
        note(&format!("gateway submit at {half:.0}/s, achieved jobs/s"), format!("{paced_rate:.0}"));
        note(
            "gateway submit at half rate, p50 / p99 ms",
            format!("{:.2} / {:.2}", paced_lat.ms(50.0), paced_lat.ms(99.0)),
        );
    }
    // The submit scenario's backlog (no worker drains it) would otherwise keep RabbitMQ busy
    // during the end-to-end runs: stop that gateway and delete its queue first.
    drop(submit_gw);
    delete_queue(&args, &format!("{submit_prefix}.jobs.{}", args.model)).await?;
    if wants("e2e") {
        best_e2e = 0.0;
        let mut offset = 2_000_000;
        for &c in &args.concurrency {
            let (rate, lat) = e2e(&http, &e2e_gw.url, &args, c, offset).await?;
            offset += 1_000_000;
            if c >= 32 {
                best_e2e = best_e2e.max(rate);
            }
            note(&format!("end-to-end, {c} clients, jobs/s"), format!("{rate:.1}"));
            note(
                &format!("end-to-end, {c} clients, p50 / p90 / p99 ms"),
                format!("{:.1} / {:.1} / {:.1}", lat.ms(50.0), lat.ms(90.0), lat.ms(99.0)),
            );
            if c == 1 {
                note(
                    "end-to-end at 1 client minus one bare inference, p50 ms",
                    format!("{:.2}", lat.ms(50.0) - bare_single_ms),
                );
            }
        }
    }
    if wants("cache") {
        let (client, server) = cache_hits(&http, &e2e_gw.url, &args).await?;
        note("cache hit, client p50 / p99 ms", format!("{:.3} / {:.3}", client.ms(50.0), client.ms(99.0)));
        note("cache hit, server time p50 / p99 ms", format!("{:.3} / {:.3}", server.ms(50.0), server.ms(99.0)));
    }

    let mut image_ratio = f64::NAN;
    if wants("images") {
        // The embedding fleet is idle now; it must not share the cores with the image run.
        drop((e2e_gw, worker));
        let bare = images::bare(&args).await?;
        note("bare terrain pipeline, images/s (128², PNG included)", format!("{:.2}", bare.rate));
        note("bare terrain pipeline, one image, p50 ms", format!("{:.1}", bare.single_ms));
        let prefix = format!("bi{}", &run[..8]);
        let gw = Proc::gateway(&args, &prefix).await?;
        let _images_worker = Proc::worker(&args, &prefix, &args.image_model)?;
        images::warm_up(&http, &gw.url, &args.image_model).await?;
        for clients in [1, 2, 4] {
            let (rate, lat) = images::fleet(&http, &gw.url, &args, clients).await?;
            image_ratio = if image_ratio.is_nan() { rate / bare.rate } else { image_ratio.max(rate / bare.rate) };
            note(&format!("images through the fleet, {clients} clients, images/s"), format!("{rate:.2}"));
            note(
                &format!("images through the fleet, {clients} clients, p50 / p99 ms"),
                format!("{:.1} / {:.1}", lat.ms(50.0), lat.ms(99.0)),
            );
            if clients == 1 {
                note("image at 1 client minus one bare image, p50 ms", format!("{:.1}", lat.ms(50.0) - bare.single_ms));
            }
        }
    }

    note("RATIO fleet efficiency (e2e ≥32 clients / bare)", format!("{:.3} (target ≥ 0.9)", best_e2e / bare_best));
    note("RATIO submit (gateway / raw publish)", format!("{:.3} (target ≥ 0.8)", submit_rate / raw));
    note("RATIO images (fleet, best of 1/2/4 clients / bare pipeline)", format!("{image_ratio:.3}"));

    if let Some(out) = &args.out {
        let mut md = String::from("| measure | value |\n| --- | --- |\n");
        for l in &report {
            md.push_str(&format!("| {} | {} |\n", l.name, l.value));
        }
        std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

async fn bare(args: &Args) -> anyhow::Result<(f64, f64, usize)> {
    let repo = ModelRepository::load(&args.models_dir)?;
    let spec = repo.get(&args.model).context("no such model")?.clone();
    let cache = kiln_common::config::default_cache_dir();
    let config = kiln_worker::WorkerConfig::default();
    let dylib = kiln_worker::resolve_onnxruntime(&config, &cache)?;
    let threads = kiln_worker::Threads { intra: args.threads, spin: config.ort_spin };
    let infer = tokio::task::spawn_blocking(move || kiln_worker::load_model(&spec, &dylib, &cache, threads)).await??;
    infer.embed(sentences::batch(900_000, 64)).await?;
    let mut single = Samples::default();
    for t in sentences::batch(910_000, 100) {
        let started = Instant::now();
        infer.embed(vec![t]).await?;
        single.push(started.elapsed());
    }
    let (mut best, mut best_batch) = (0.0, 1);
    let mut next = 920_000;
    for batch in [1usize, 8, 16, 32, 64] {
        let started = Instant::now();
        let mut texts = 0;
        while started.elapsed() < args.duration / 2 {
            infer.embed(sentences::batch(next, batch)).await?;
            next += batch;
            texts += batch;
        }
        let rate = texts as f64 / started.elapsed().as_secs_f64();
        println!("  bare batch {batch:>3}: {rate:.1} texts/s");
        if rate > best {
            (best, best_batch) = (rate, batch);
        }
    }
    Ok((best, single.ms(50.0), best_batch))
}

/// A `kiln gateway` or `kiln worker` process, killed on drop.
struct Proc {
    child: tokio::process::Child,
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Proc {
    fn command(args: &Args, role: &str, prefix: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&args.kiln);
        cmd.arg(role)
            .env("KILN_AMQP_URL", &args.amqp_url)
            .env("KILN_REDIS_URL", &args.redis_url)
            .env("KILN_QUEUE_PREFIX", prefix)
            .env("KILN_KEY_PREFIX", format!("{prefix}:"))
            .env("KILN_MODELS_DIR", &args.models_dir)
            .env("KILN_INTRA_THREADS", args.threads.to_string())
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn gateway(args: &Args, prefix: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Self::command(args, "gateway", prefix).env("KILN_LISTEN", format!("127.0.0.1:{port}")).spawn()?;
        let me = Self { child, url: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", me.url)).send().await
                && r.status() == 200
            {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("the gateway at {} did not become ready", me.url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn worker(args: &Args, prefix: &str, model: &str) -> anyhow::Result<Self> {
        let child = Self::command(args, "worker", prefix).env("KILN_WORKER_MODELS", model).spawn()?;
        Ok(Self { child, url: String::new() })
    }
}

fn job(model: &str, text: String, cache: bool) -> serde_json::Value {
    json!({ "model": model, "input": { "text": text }, "cache": cache })
}

async fn warm_up(http: &reqwest::Client, url: &str, model: &str) -> anyhow::Result<()> {
    for text in sentences::batch(800_000, 64) {
        let r = http
            .post(format!("{url}/v1/jobs"))
            .header("prefer", "wait=60")
            .json(&job(model, text, false))
            .send()
            .await?;
        if r.status() != 200 {
            bail!("warm-up job answered {}", r.status());
        }
    }
    Ok(())
}

async fn raw_publish(args: &Args, queue: &str) -> anyhow::Result<f64> {
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut qargs = FieldTable::default();
    qargs.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, qargs).await?;
    let body = serde_json::to_vec(
        &json!({ "v": 1, "id": uuid::Uuid::new_v4(), "model": args.model, "input": { "texts": [sentences::sentence(1)] }, "created_at": 0 }),
    )?;
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.submitters)
        .map(|_| {
            let (ch, body, sent, queue, d) = (ch.clone(), body.clone(), sent.clone(), queue.to_owned(), args.duration);
            tokio::spawn(async move {
                while started.elapsed() < d {
                    let props = BasicProperties::default().with_delivery_mode(2);
                    let confirm = ch
                        .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, props)
                        .await?
                        .await?;
                    if confirm.is_ack() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<(), lapin::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let rate = sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
    Ok(rate)
}

async fn delete_queue(args: &Args, queue: &str) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
    Ok(())
}

/// Submissions without waiting, by `args.submitters` clients: as fast as they go, or paced to `rate`.
async fn submit(
    http: &reqwest::Client,
    url: &str,
    args: &Args,
    rate: Option<f64>,
    offset: usize,
) -> anyhow::Result<(f64, Samples)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.submitters)
        .map(|_| {
            let (http, url, next, model, d) =
                (http.clone(), url.to_owned(), next.clone(), args.model.clone(), args.duration);
            tokio::spawn(async move {
                let mut lat = Samples::default();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if let Some(rate) = rate {
                        // Open-loop pacing: request n is due at n / rate.
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    if started.elapsed() >= d {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    let t = Instant::now();
                    let r = http
                        .post(format!("{url}/v1/jobs"))
                        .json(&job(&model, sentences::batch(offset + n, 1).remove(0), false))
                        .send()
                        .await?;
                    if r.status() != 202 {
                        bail!("submit answered {}", r.status());
                    }
                    lat.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut all = Samples::default();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
}

/// Closed loop: `clients` clients each submit with `Prefer: wait` and submit again on completion.
async fn e2e(
    http: &reqwest::Client,
    url: &str,
    args: &Args,
    clients: usize,
    offset: usize,
) -> anyhow::Result<(f64, Samples)> {
    let (http, url, model) = (http.clone(), url.to_owned(), args.model.clone());
    closed_loop(clients, args.duration, move |n| {
        let (http, url, model) = (http.clone(), url.clone(), model.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/jobs"))
                .header("prefer", "wait=60")
                .json(&job(&model, sentences::batch(offset + n, 1).remove(0), false))
                .send()
                .await?;
            if r.status() != 200 {
                bail!("end-to-end job answered {}", r.status());
            }
            r.bytes().await?;
            Ok(())
        }
    })
    .await
}

/// `clients` clients, each running `one(n)` (with a fresh `n` every time) again as soon as the
/// last finished, for `duration`. Returns the completions per second and their latencies.
pub async fn closed_loop<F, Fut>(clients: usize, duration: Duration, one: F) -> anyhow::Result<(f64, Samples)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (next, one) = (next.clone(), one.clone());
            tokio::spawn(async move {
                let mut lat = Samples::default();
                while started.elapsed() < duration {
                    let t = Instant::now();
                    one(next.fetch_add(1, Ordering::Relaxed)).await?;
                    lat.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            })
        })
        .collect();
    let mut all = Samples::default();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
}

async fn cache_hits(http: &reqwest::Client, url: &str, args: &Args) -> anyhow::Result<(Samples, Samples)> {
    let inputs = sentences::batch(700_000, 64);
    for text in &inputs {
        let r = http
            .post(format!("{url}/v1/jobs"))
            .header("prefer", "wait=60")
            .json(&job(&args.model, text.clone(), true))
            .send()
            .await?;
        r.bytes().await?;
    }
    let (mut client, mut server) = (Samples::default(), Samples::default());
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < args.duration / 2 {
        let t = Instant::now();
        let r = http
            .post(format!("{url}/v1/jobs"))
            .json(&job(&args.model, inputs[i % inputs.len()].clone(), true))
            .send()
            .await?;
        let timing = r.headers().get("server-timing").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body: serde_json::Value = r.json().await?;
        client.push(t.elapsed());
        if body["cached"] != true {
            bail!("expected a cache hit: {body}");
        }
        if let Some(ms) = timing.as_deref().and_then(|t| t.split("dur=").nth(1)).and_then(|v| v.parse::<f64>().ok()) {
            server.push(Duration::from_secs_f64(ms / 1e3));
        }
        i += 1;
    }
    Ok((client, server))
}
