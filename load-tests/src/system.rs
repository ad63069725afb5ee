//! One mix through the whole system: end-to-end closed loops with the default worker, again at
//! the highest concurrency with the batch-1 worker (`KILN_MAX_BATCH=1`), the backlog drain with
//! both, and the workers' memory — each phase on its own gateway, worker and prefix.

use std::sync::Arc;
use std::time::Duration;

use crate::Args;
use crate::backlog::{self, Drain};
use crate::bare::Baseline;
use crate::corpus::{Corpus, Mix};
use crate::procs::{Proc, Rss};
use crate::report::Report;
use crate::scenarios;
use crate::stats::Samples;

/// The batch-1 configuration of the same worker: at most one text per model run.
pub const BATCH_ONE: [(&str, &str); 1] = [("KILN_MAX_BATCH", "1")];
const WARM_UP_JOBS: usize = 64;
const WARM_UP_DEADLINE: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct MixResult {
    /// (clients, jobs/s, latencies) with the default worker.
    pub e2e: Vec<(usize, f64, Samples)>,
    /// jobs/s with the batch-1 worker at the highest concurrency.
    pub e2e_batch_one: Option<f64>,
    pub backlog: Option<Drain>,
    pub backlog_batch_one: Option<Drain>,
}

impl MixResult {
    /// The best end-to-end rate at 32 clients or more (the throughput figure).
    pub fn e2e_best(&self) -> Option<f64> {
        self.e2e.iter().filter(|(c, _, _)| *c >= 32).map(|(_, r, _)| *r).reduce(f64::max)
    }

    /// The default worker's rate at the highest concurrency (compared with the batch-1 worker).
    pub fn e2e_top(&self) -> Option<f64> {
        self.e2e.iter().max_by_key(|(c, _, _)| *c).map(|(_, r, _)| *r)
    }

    pub fn one_client_p50_ms(&self) -> Option<f64> {
        self.e2e.iter().find(|(c, _, _)| *c == 1).map(|(_, _, l)| l.ms(50.0))
    }
}

fn note_rss(report: &mut Report, what: &str, rss: Option<Rss>) {
    let value = match rss {
        Some(r) => format!("{:.0} / {:.0}", r.peak_mib, r.current_mib),
        None => "unavailable".into(),
    };
    report.note(&format!("{what}: worker RSS peak / now, MiB"), value);
}

fn note_usage(report: &mut Report, what: &str, usage: crate::corpus::Usage) {
    if let Some(n) = usage.note() {
        report.remark(format!("{what}: {n}"));
    }
}

/// The end-to-end phases of `mix`: the default worker at every concurrency, then the batch-1
/// worker at the highest.
pub async fn e2e(
    args: &Args,
    http: &reqwest::Client,
    prefix: &str,
    corpus: &Arc<Corpus>,
    bare: Option<&Baseline>,
    report: &mut Report,
    out: &mut MixResult,
) -> anyhow::Result<()> {
    let mix = corpus.mix();
    let gw = Proc::gateway(args, prefix).await?;
    let top = args.concurrency.iter().copied().max().unwrap_or(1);
    for (label, env) in [("default worker", &[][..]), ("batch-1 worker", &BATCH_ONE[..])] {
        let worker = Proc::worker(args, prefix, &args.model, env)?;
        scenarios::warm_up(http, &gw.url, &args.model, corpus.take(WARM_UP_JOBS), WARM_UP_DEADLINE).await?;
        let batch_one = !env.is_empty();
        let clients: Vec<usize> = if batch_one { vec![top] } else { args.concurrency.clone() };
        for c in clients {
            let mark = corpus.mark();
            let (rate, lat) = scenarios::e2e(http, &gw.url, &args.model, c, args.duration, corpus).await?;
            note_usage(report, &format!("{mix} end-to-end, {c} clients, {label}"), corpus.usage_since(mark));
            report.note(&format!("{mix} end-to-end, {c} clients, {label}, jobs/s"), format!("{rate:.1}"));
            report.note(
                &format!("{mix} end-to-end, {c} clients, {label}, p50 / p90 / p99 ms"),
                format!("{:.1} / {:.1} / {:.1}", lat.ms(50.0), lat.ms(90.0), lat.ms(99.0)),
            );
            if batch_one {
                out.e2e_batch_one = Some(rate);
                continue;
            }
            if c == 1
                && let Some(b) = bare
            {
                report.note(
                    &format!("{mix} end-to-end at 1 client minus bare single text, p50 ms"),
                    format!("{:.2}", lat.ms(50.0) - b.single_p50_ms),
                );
            }
            out.e2e.push((c, rate, lat));
        }
        note_rss(report, &format!("{mix} after end-to-end, {label}"), worker.rss().ok());
        worker.stop().await?;
    }
    gw.stop().await?;
    scenarios::delete_queue(args, &format!("{prefix}.jobs.{}", args.model)).await?;
    Ok(())
}

/// How many jobs the backlog of `mix` gets: `--backlog`, capped at what the bare baseline does
/// in twice `--duration` so a drain stays that long.
pub fn backlog_size(args: &Args, bare: Option<&Baseline>) -> usize {
    let cap = bare.map_or(usize::MAX, |b| (b.best_rate * 2.0 * args.duration.as_secs_f64()).ceil() as usize);
    args.backlog.min(cap).max(1)
}

/// The backlog phases of `mix`: the default worker's drain, then the batch-1 worker's, each on a
/// fresh prefix.
pub async fn backlog(
    args: &Args,
    http: &reqwest::Client,
    prefix: &str,
    corpus: &Corpus,
    bare: Option<&Baseline>,
    report: &mut Report,
    out: &mut MixResult,
) -> anyhow::Result<()> {
    let mix: Mix = corpus.mix();
    let n = backlog_size(args, bare);
    if n < args.backlog {
        report.remark(format!(
            "{mix} backlog: {n} jobs instead of {} (capped at the bare rate × 2 × --duration)",
            args.backlog
        ));
    }
    // Generous: ten times the drain at the bare rate, at least a minute.
    let deadline = Duration::from_secs_f64(bare.map_or(600.0, |b| (10.0 * n as f64 / b.best_rate).max(60.0)));
    for (label, tag, env) in [("default worker", "d", &[][..]), ("batch-1 worker", "1", &BATCH_ONE[..])] {
        let d = backlog::run(args, http, &format!("{prefix}{tag}"), corpus, n, env, deadline).await?;
        note_usage(report, &format!("{mix} backlog, {label}"), d.usage);
        report.note(
            &format!("{mix} backlog of {}, {label}: drain jobs/s", d.jobs),
            format!("{:.1} ({:.1} s; submitted in {:.1} s)", d.rate, d.span_s, d.submit_s),
        );
        note_rss(report, &format!("{mix} after the backlog, {label}"), d.rss);
        if env.is_empty() {
            out.backlog = Some(d);
        } else {
            out.backlog_batch_one = Some(d);
        }
    }
    Ok(())
}
