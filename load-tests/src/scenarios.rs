//! The HTTP-side scenarios and their building blocks: warm-up, the raw confirmed-publish
//! baseline, gateway submit (max and paced), end-to-end closed loops, cache hits, and waiting
//! for a job record to be terminal.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_proto::{JobRecord, JobStatus};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

use crate::Args;
use crate::corpus::Corpus;
use crate::sentences;
use crate::stats::Samples;

/// Clients of the warm-up.
const WARM_UP_CLIENTS: usize = 8;

pub fn job(model: &str, text: String, cache: bool) -> serde_json::Value {
    json!({ "model": model, "input": { "text": text }, "cache": cache })
}

/// `texts` as jobs through the fleet, 8 at a time, each to its end: the worker has loaded the
/// model and run batches of several sizes. Bounded by `deadline`.
pub async fn warm_up(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    texts: Vec<String>,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    let texts = Arc::new(texts);
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..WARM_UP_CLIENTS)
        .map(|_| {
            let (http, url, model, texts, next) =
                (http.clone(), url.to_owned(), model.to_owned(), texts.clone(), next.clone());
            tokio::spawn(async move {
                while let Some(text) = texts.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let r = http
                        .post(format!("{url}/v1/jobs"))
                        .header("prefer", "wait=60")
                        .json(&job(&model, text.clone(), false))
                        .send()
                        .await?;
                    let status = r.status();
                    if status != 200 && status != 202 {
                        bail!("warm-up job answered {status}: {}", r.text().await.unwrap_or_default());
                    }
                    let record: JobRecord = r.json().await?;
                    let record = finished(&http, &url, record, until).await?;
                    if record.status != JobStatus::Succeeded {
                        bail!("warm-up job {} ended {}: {:?}", record.id, record.status.as_str(), record.error);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// `record` once terminal: long-polls `GET /v1/jobs/{id}?wait=30` until then or `until`.
pub async fn finished(
    http: &reqwest::Client,
    url: &str,
    mut record: JobRecord,
    until: Instant,
) -> anyhow::Result<JobRecord> {
    while !record.status.is_terminal() {
        if Instant::now() > until {
            bail!("job {} still {} at the deadline", record.id, record.status.as_str());
        }
        record = get(http, url, &record.id.to_string(), Some(30)).await?;
    }
    Ok(record)
}

/// `GET /v1/jobs/{id}`, long-polling for `wait` seconds when given.
pub async fn get(http: &reqwest::Client, url: &str, id: &str, wait: Option<u64>) -> anyhow::Result<JobRecord> {
    let target = match wait {
        Some(w) => format!("{url}/v1/jobs/{id}?wait={w}"),
        None => format!("{url}/v1/jobs/{id}"),
    };
    let r = http.get(&target).send().await.with_context(|| format!("GET {target}"))?;
    if r.status() != 200 {
        bail!("GET {target} answered {}", r.status());
    }
    r.json().await.with_context(|| format!("GET {target}: not a job record"))
}

pub async fn raw_publish(args: &Args, queue: &str) -> anyhow::Result<f64> {
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

/// Deletes a queue if it exists (a benchmark's leftovers must not load the broker later).
pub async fn delete_queue(args: &Args, queue: &str) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
    Ok(())
}

/// Submissions without waiting, by `args.submitters` clients: as fast as they go, or paced to `rate`.
pub async fn submit(
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
                        .json(&job(&model, sentences::numbered(offset + n), false))
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

/// Closed loop: `clients` clients each submit the next text of `corpus` with `Prefer: wait` and
/// submit again on completion, for `duration`.
pub async fn e2e(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    clients: usize,
    duration: Duration,
    corpus: &Arc<Corpus>,
) -> anyhow::Result<(f64, Samples)> {
    let (http, url, model, corpus) = (http.clone(), url.to_owned(), model.to_owned(), corpus.clone());
    closed_loop(clients, duration, move |_| {
        let (http, url, model, text) = (http.clone(), url.clone(), model.clone(), corpus.next_text());
        async move {
            let r = http
                .post(format!("{url}/v1/jobs"))
                .header("prefer", "wait=60")
                .json(&job(&model, text, false))
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

pub async fn cache_hits(http: &reqwest::Client, url: &str, args: &Args) -> anyhow::Result<(Samples, Samples)> {
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
