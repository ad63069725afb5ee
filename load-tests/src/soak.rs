//! The soak: the realistic mix closed-loop at 32 clients for a long while, the worker's resident
//! memory sampled every 10 s, to show whether it settles (first minute vs the end, and how far it
//! strays from its mean once warm).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::corpus::Corpus;
use crate::procs::{self, Proc};
use crate::scenarios;

pub const CLIENTS: usize = 32;
const EVERY: Duration = Duration::from_secs(10);
const WARM: Duration = Duration::from_secs(60);

pub struct Soak {
    pub rate: f64,
    pub p99_ms: f64,
    /// (seconds since the start, VmRSS MiB)
    pub samples: Vec<(f64, f64)>,
}

impl Soak {
    /// RSS at the end of the first minute (the last sample taken by then).
    pub fn first_minute_mib(&self) -> f64 {
        self.samples.iter().filter(|(t, _)| *t <= WARM.as_secs_f64()).map(|(_, m)| *m).next_back().unwrap_or(f64::NAN)
    }

    pub fn last_mib(&self) -> f64 {
        self.samples.last().map_or(f64::NAN, |(_, m)| *m)
    }

    /// Mean of the samples after the first minute, and the largest deviation from it in %.
    pub fn after_first_minute(&self) -> (f64, f64) {
        let late: Vec<f64> = self.samples.iter().filter(|(t, _)| *t > WARM.as_secs_f64()).map(|(_, m)| *m).collect();
        if late.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let mean = late.iter().sum::<f64>() / late.len() as f64;
        let dev = late.iter().map(|m| (m - mean).abs() / mean * 100.0).fold(0.0, f64::max);
        (mean, dev)
    }
}

pub async fn run(
    args: &crate::Args,
    http: &reqwest::Client,
    prefix: &str,
    corpus: &Arc<Corpus>,
    duration: Duration,
) -> anyhow::Result<Soak> {
    let gw = Proc::gateway(args, prefix).await?;
    let worker = Proc::worker(args, prefix, &args.model, &[])?;
    scenarios::warm_up(http, &gw.url, &args.model, corpus.take(64), Duration::from_secs(300)).await?;
    let pid = worker.pid().context("the soak worker has exited")?;
    let started = Instant::now();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut k = 0u32;
        while EVERY * k <= duration {
            tokio::time::sleep_until((started + EVERY * k).into()).await;
            samples.push((started.elapsed().as_secs_f64(), procs::rss_of(pid)?.current_mib));
            k += 1;
        }
        Ok::<_, anyhow::Error>(samples)
    });
    let (rate, lat) = scenarios::e2e(http, &gw.url, &args.model, CLIENTS, duration, corpus).await?;
    let samples = sampler.await??;
    worker.stop().await?;
    gw.stop().await?;
    scenarios::delete_queue(args, &format!("{prefix}.jobs.{}", args.model)).await?;
    Ok(Soak { rate, p99_ms: lat.ms(99.0), samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_minute_last_and_deviation() {
        let samples =
            (0..=12).map(|k| (k as f64 * 10.0, if k <= 6 { 100.0 } else { 190.0 + (k % 2) as f64 * 20.0 })).collect();
        let s = Soak { rate: 1.0, p99_ms: 1.0, samples };
        assert_eq!(s.first_minute_mib(), 100.0);
        assert_eq!(s.last_mib(), 190.0);
        let (mean, dev) = s.after_first_minute();
        assert!((mean - 200.0).abs() < 1e-9 && (dev - 5.0).abs() < 1e-9, "{mean} {dev}");
    }
}
