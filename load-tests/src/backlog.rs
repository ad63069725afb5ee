//! The backlog scenario: N jobs queued with no worker running, then one worker started; its drain
//! rate is N over the span from the first job's start to the last one's completion, both from the
//! job records (so neither the worker's start-up nor the polling counts).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_proto::{JobRecord, JobStatus};

use crate::Args;
use crate::corpus::{Corpus, Usage};
use crate::procs::{Proc, Rss};
use crate::scenarios::{self, job};

/// Submissions in flight at once while the backlog is built.
const SUBMITTERS: usize = 64;
/// Record reads in flight at once after the drain.
const READERS: usize = 16;

pub struct Drain {
    pub jobs: usize,
    /// Jobs per second, first start → last completion.
    pub rate: f64,
    pub span_s: f64,
    /// How long submitting the backlog took.
    pub submit_s: f64,
    pub rss: Option<Rss>,
    pub usage: Usage,
}

/// Builds a backlog of `n` jobs on a gateway with the fresh `prefix`, starts a worker with
/// `worker_env`, and waits (at most `deadline`) until every job is terminal.
pub async fn run(
    args: &Args,
    http: &reqwest::Client,
    prefix: &str,
    corpus: &Corpus,
    n: usize,
    worker_env: &[(&str, &str)],
    deadline: Duration,
) -> anyhow::Result<Drain> {
    let gw = Proc::gateway(args, prefix).await?;
    let mark = corpus.mark();
    let texts = Arc::new(corpus.take(n));
    let usage = corpus.usage_since(mark);
    let started = Instant::now();
    let ids = submit_all(http, &gw.url, &args.model, texts).await?;
    let submit_s = started.elapsed().as_secs_f64();

    let mut worker = Proc::worker(args, prefix, &args.model, worker_env)?;
    let until = Instant::now() + deadline;
    // Jobs are taken roughly in order: wait on the last one first (a long poll costs nothing
    // while the worker drains), then read every record.
    let last = ids.last().context("an empty backlog")?.clone();
    let mut record = scenarios::get(http, &gw.url, &last, None).await?;
    while !record.status.is_terminal() {
        worker.check_alive("worker draining the backlog")?;
        if Instant::now() > until {
            let done = count_terminal(http, &gw.url, &ids).await.unwrap_or(0);
            bail!(
                "backlog not drained within {:.0} s: {done} of {n} jobs terminal (raise --duration, lower --backlog)",
                deadline.as_secs_f64()
            );
        }
        record = scenarios::get(http, &gw.url, &last, Some(30)).await?;
    }
    let records = read_all(http, &gw.url, &ids, until).await?;
    let rss = worker.rss().ok();
    worker.stop().await?;
    gw.stop().await?;
    scenarios::delete_queue(args, &format!("{prefix}.jobs.{}", args.model)).await?;

    let failed: Vec<&JobRecord> = records.iter().filter(|r| r.status != JobStatus::Succeeded).collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {n} backlog jobs did not succeed; e.g. {} ended {}: {:?}",
            failed.len(),
            first.id,
            first.status.as_str(),
            first.error
        );
    }
    let first_start = records.iter().filter_map(|r| r.started_at).min().context("no job has started_at")?;
    let last_end = records.iter().filter_map(|r| r.completed_at).max().context("no job has completed_at")?;
    let span_s = ((last_end - first_start).max(1)) as f64 / 1e3;
    Ok(Drain { jobs: n, rate: n as f64 / span_s, span_s, submit_s, rss, usage })
}

/// Submits every text (plain `202`s, `cache: false`), `SUBMITTERS` at a time; the job ids in
/// submission order.
async fn submit_all(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    texts: Arc<Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..SUBMITTERS)
        .map(|_| {
            let (http, url, model, texts, next) =
                (http.clone(), url.to_owned(), model.to_owned(), texts.clone(), next.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(text) = texts.get(i) else { return Ok::<_, anyhow::Error>(ids) };
                    let r = http.post(format!("{url}/v1/jobs")).json(&job(&model, text.clone(), false)).send().await?;
                    if r.status() != 202 {
                        bail!("backlog submit answered {}: {}", r.status(), r.text().await.unwrap_or_default());
                    }
                    let record: JobRecord = r.json().await?;
                    ids.push((i, record.id.to_string()));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(texts.len());
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_unstable_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, id)| id).collect())
}

/// Every record, terminal, `READERS` at a time (long-polling any that is not yet).
async fn read_all(http: &reqwest::Client, url: &str, ids: &[String], until: Instant) -> anyhow::Result<Vec<JobRecord>> {
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..READERS)
        .map(|_| {
            let (http, url, ids, next) = (http.clone(), url.to_owned(), ids.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let record = scenarios::get(&http, &url, id, None).await?;
                    out.push(scenarios::finished(&http, &url, record, until).await?);
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(ids.len());
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// How many of `ids` are terminal now (for the error message of a drain that timed out).
async fn count_terminal(http: &reqwest::Client, url: &str, ids: &[String]) -> anyhow::Result<usize> {
    let mut done = 0;
    for id in ids {
        if scenarios::get(http, url, id, None).await?.status.is_terminal() {
            done += 1;
        }
    }
    Ok(done)
}
