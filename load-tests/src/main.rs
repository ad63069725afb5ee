//! `kiln-load`: the benchmark. Measures, in one run on one machine, the baselines — bare ONNX
//! Runtime on the served model per input mix (best of every session × thread layout and batch
//! size) and a raw confirmed-publish loop to RabbitMQ — then the system as separate processes:
//! gateway submit rate and latency, end-to-end closed loops and backlog drains per mix with the
//! default and the batch-1 worker, the worker's memory, cache hits, fair share between tenants and
//! images; and prints each
//! figure with the ratios against the baselines. `scripts/bench.sh` starts what it needs and
//! runs it.

mod backlog;
mod bare;
mod corpus;
mod fairness;
mod images;
mod ocr;
mod procs;
mod report;
mod scenarios;
mod sentences;
mod soak;
mod stats;
mod system;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use corpus::{Corpus, Mix};
use kiln_common::config::parse_duration;
use procs::Proc;
use report::{Report, div};

const SCENARIOS: [&str; 7] = ["submit", "e2e", "backlog", "cache", "fair", "images", "ocr"];

/// Kiln's benchmark: baselines and scenarios in one run, reported as ratios.
#[derive(Parser, Debug)]
pub struct Args {
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
    /// How long each measured phase runs (a bare cell: a quarter of it, at least 2 s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Closed-loop client counts of the end-to-end scenario; the batch-1 worker runs at the highest.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    concurrency: Vec<usize>,
    /// Input mixes of the end-to-end and backlog scenarios (and their bare baselines).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "short,realistic,long")]
    mixes: Vec<Mix>,
    /// Jobs queued per backlog run (capped per mix at what the bare baseline does in 2 × --duration).
    #[arg(long, default_value_t = 3000)]
    backlog: usize,
    /// An environment variable for every worker started (repeatable), e.g. KILN_INTRA_THREADS=2.
    #[arg(long = "worker-env", value_name = "KEY=VAL", value_parser = parse_env)]
    worker_env: Vec<(String, String)>,
    /// Also soak: the realistic mix at 32 clients for this long, sampling the worker's RSS.
    #[arg(long, value_parser = parse_duration)]
    soak: Option<Duration>,
    /// Concurrent submitters for the submit scenario and the raw publish loop.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Scenarios to run: submit, e2e, backlog, cache, fair, images, ocr (the bare baseline runs
    /// for e2e and backlog, the raw publish loop for submit, the bare pipeline for images and
    /// ocr). The default leaves ocr out to stay under 12 minutes; `--scenarios ocr` runs it.
    #[arg(long, value_delimiter = ',', default_value = "submit,e2e,backlog,cache,fair,images")]
    scenarios: Vec<String>,
    /// The image model of the images scenario.
    #[arg(long, default_value = "terrain-diffusion")]
    image_model: String,
    /// The OCR model of the ocr scenario.
    #[arg(long, default_value = "ppocr-v4")]
    ocr_model: String,
    /// Where to write the results as Markdown.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VAL, got {s:?}")),
    }
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    /// How long a bare cell runs.
    fn cell(&self) -> Duration {
        (self.duration / 4).max(Duration::from_secs(2))
    }
}

/// A rough upper estimate of the run's length, from the phases it will run.
fn estimate(args: &Args, cores: usize) -> Duration {
    let d = args.duration.as_secs_f64();
    let mixes = args.mixes.len() as f64;
    let mut s = 0.0;
    if args.wants("e2e") || args.wants("backlog") {
        let cells = (bare::layouts(cores).len() * 6) as f64;
        s += mixes * (cells * (args.cell().as_secs_f64() + 0.5) + 5.0);
    }
    if args.wants("submit") {
        s += 3.0 * d + 5.0;
    }
    if args.wants("e2e") {
        s += mixes * ((args.concurrency.len() + 1) as f64 * d + 15.0);
    }
    if args.wants("backlog") {
        s += mixes * 2.0 * (2.5 * d + 10.0);
    }
    if args.wants("cache") {
        s += d / 2.0 + 10.0;
    }
    if args.wants("fair") {
        s += 8.0 * d + 40.0;
    }
    if args.wants("images") {
        s += 4.0 * d + 15.0;
    }
    if args.wants("ocr") {
        s += 4.25 * d + 20.0;
    }
    if let Some(soak) = args.soak {
        s += soak.as_secs_f64() + 15.0;
    }
    Duration::from_secs_f64(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(bad) = args.scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        bail!("unknown scenario {bad:?} (known: {})", SCENARIOS.join(", "));
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs client counts of at least 1");
    }
    let cores = kiln_worker::runtime::default_threads();
    let est = estimate(&args, cores);
    println!(
        "kiln-load: {cores} cores, mixes {}, scenarios {}; estimated duration about {:.0} min ({:.0} s)",
        args.mixes.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        args.scenarios.join(","),
        (est.as_secs_f64() / 60.0).ceil(),
        est.as_secs_f64()
    );
    let mut report = Report::default();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let http = kiln_common::tls::http_client().pool_max_idle_per_host(512).timeout(Duration::from_secs(120)).build()?;

    // Baseline 1, per mix: bare ONNX Runtime, before any process shares the cores.
    let mut bares = Vec::new();
    if args.wants("e2e") || args.wants("backlog") {
        let (models_dir, model, mixes, cell) =
            (args.models_dir.clone(), args.model.clone(), args.mixes.clone(), args.cell());
        bares = tokio::task::spawn_blocking(move || {
            let m = bare::Model::load(&models_dir, &model)?;
            mixes.iter().map(|&mix| bare::run(&m, mix, cores, cell)).collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        for b in &bares {
            note_bare(&mut report, b);
        }
    }
    let bare_of = |mix: Mix| bares.iter().find(|b| b.mix == mix);

    // Baseline 2 and the submit scenario: a gateway with no worker.
    let (mut raw, mut submit_rate) = (f64::NAN, f64::NAN);
    if args.wants("submit") {
        raw = scenarios::raw_publish(&args, &format!("bench-raw-{run}")).await?;
        report.note("raw confirmed publish, msgs/s", format!("{raw:.0}"));
        let prefix = format!("bs{run}");
        let gw = Proc::gateway(&args, &prefix).await?;
        let (rate, lat) = scenarios::submit(&http, &gw.url, &args, None, 0).await?;
        submit_rate = rate;
        report.note("gateway submit (max), jobs/s", format!("{rate:.0}"));
        report.note("gateway submit (max), p50 / p99 ms", format!("{:.2} / {:.2}", lat.ms(50.0), lat.ms(99.0)));
        let half = rate / 2.0;
        let (paced, lat) = scenarios::submit(&http, &gw.url, &args, Some(half), 1_000_000).await?;
        report.note(&format!("gateway submit at {half:.0}/s, achieved jobs/s"), format!("{paced:.0}"));
        report.note("gateway submit at half rate, p50 / p99 ms", format!("{:.2} / {:.2}", lat.ms(50.0), lat.ms(99.0)));
        // Its backlog (no worker drains it) would keep RabbitMQ busy in the later scenarios.
        gw.stop().await?;
        scenarios::delete_queue(&args, &format!("{prefix}.jobs.{}", args.model)).await?;
    }

    // Per mix: end-to-end and backlog, default and batch-1 worker, and the workers' memory.
    let mut results = Vec::new();
    for &mix in &args.mixes {
        let corpus = Arc::new(Corpus::new(mix));
        let mut out = system::MixResult::default();
        let tag = &mix.name()[..1];
        if args.wants("e2e") {
            system::e2e(&args, &http, &format!("be{run}{tag}"), &corpus, bare_of(mix), &mut report, &mut out).await?;
        }
        if args.wants("backlog") {
            system::backlog(&args, &http, &format!("bb{run}{tag}"), &corpus, bare_of(mix), &mut report, &mut out)
                .await?;
        }
        results.push((mix, out));
    }

    if args.wants("cache") {
        let prefix = format!("bc{run}");
        let gw = Proc::gateway(&args, &prefix).await?;
        let worker = Proc::worker(&args, &prefix, &args.model, &[])?;
        let warm = sentences::batch(800_000, 16);
        scenarios::warm_up(&http, &gw.url, &args.model, warm, Duration::from_secs(300)).await?;
        let (client, server) = scenarios::cache_hits(&http, &gw.url, &args).await?;
        report.note("cache hit, client p50 / p99 ms", format!("{:.3} / {:.3}", client.ms(50.0), client.ms(99.0)));
        report.note("cache hit, server time p50 / p99 ms", format!("{:.3} / {:.3}", server.ms(50.0), server.ms(99.0)));
        worker.stop().await?;
        gw.stop().await?;
        scenarios::delete_queue(&args, &format!("{prefix}.jobs.{}", args.model)).await?;
    }

    if args.wants("fair") {
        let corpus = Arc::new(Corpus::new(Mix::Realistic));
        let f = fairness::run(&args, &http, &format!("bf{run}"), &corpus).await?;
        let what = "fair share, realistic, tenant B at 1 job/s";
        let line = |s: &stats::Samples| format!("{:.1} / {:.1} ({} jobs)", s.ms(50.0), s.ms(99.0), s.len());
        report.note(
            "fair share: a new tenant's first job (its lane found by the worker), ms",
            format!("{:.1}", f.first.ms(50.0)),
        );
        report.note(&format!("{what}, alone: p50 / p99 ms"), line(&f.alone));
        report.note(&format!("{what}, alone, gateway without keys: p50 / p99 ms"), line(&f.alone_open));
        report.note(
            "fair share: what a key costs a request (keyed minus open p50), ms",
            format!("{:.2}", f.alone.ms(50.0) - f.alone_open.ms(50.0)),
        );
        report.note(&format!("{what}, while tenant A floods: p50 / p99 ms"), line(&f.flooded));
        report.note(&format!("{what}, while A floods one shared queue (no lanes): p50 / p99 ms"), line(&f.one_queue));
        report.note(
            "fair share: tenant A's flood, jobs submitted / fewest waiting",
            format!("{} / {} (topped up below {})", f.flood_jobs, f.flood_min_depth, fairness::FLOOD_LOW),
        );
        report.ratio("fair share: B's p50 while A floods / B alone", f.flooded.ms(50.0) / f.alone.ms(50.0), "≤ 2");
        report.ratio("fair share: B's p99 while A floods / B alone", f.flooded.ms(99.0) / f.alone.ms(99.0), "≤ 2");
        report.ratio(
            "fair share: B's p99 while A floods one shared queue / B alone",
            f.one_queue.ms(99.0) / f.alone.ms(99.0),
            "(before lanes)",
        );
    }
    if let Some(duration) = args.soak {
        let corpus = Arc::new(Corpus::new(Mix::Realistic));
        let s = soak::run(&args, &http, &format!("bk{run}"), &corpus, duration).await?;
        let (mean, dev) = s.after_first_minute();
        let what = format!("soak, realistic, {} clients, {:.0} s", soak::CLIENTS, duration.as_secs_f64());
        report.note(&format!("{what}: jobs/s, p99 ms"), format!("{:.1}, {:.1}", s.rate, s.p99_ms));
        report.note(
            &format!("{what}: worker RSS at 1 min / at the end, MiB"),
            format!("{:.0} / {:.0}", s.first_minute_mib(), s.last_mib()),
        );
        report.note(
            &format!("{what}: RSS after 1 min, mean MiB, max deviation %"),
            format!("{mean:.0}, {dev:.1} ({} samples every 10 s)", s.samples.len()),
        );
    }

    let mut image_ratio = f64::NAN;
    if args.wants("images") {
        let bare = images::bare(&args).await?;
        report.note("bare terrain pipeline, images/s (128², PNG included)", format!("{:.2}", bare.rate));
        report.note("bare terrain pipeline, one image, p50 ms", format!("{:.1}", bare.single_ms));
        let prefix = format!("bi{run}");
        let gw = Proc::gateway(&args, &prefix).await?;
        let worker = Proc::worker(&args, &prefix, &args.image_model, &[])?;
        images::warm_up(&http, &gw.url, &args.image_model).await?;
        for clients in [1, 2, 4] {
            let (rate, lat) = images::fleet(&http, &gw.url, &args, clients).await?;
            image_ratio = if image_ratio.is_nan() { rate / bare.rate } else { image_ratio.max(rate / bare.rate) };
            report.note(&format!("images through the fleet, {clients} clients, images/s"), format!("{rate:.2}"));
            report.note(
                &format!("images through the fleet, {clients} clients, p50 / p99 ms"),
                format!("{:.1} / {:.1}", lat.ms(50.0), lat.ms(99.0)),
            );
            if clients == 1 {
                report.note(
                    "image at 1 client minus one bare image, p50 ms",
                    format!("{:.1}", lat.ms(50.0) - bare.single_ms),
                );
            }
        }
        worker.stop().await?;
        gw.stop().await?;
        scenarios::delete_queue(&args, &format!("{prefix}.jobs.{}", args.image_model)).await?;
    }

    let mut ocr_ratio = f64::NAN;
    if args.wants("ocr") {
        let pages = ocr::pages();
        let bare = ocr::bare(&args, &pages).await?;
        report.note(
            &format!("bare OCR pipeline, pages/s (batches of the model's max_batch, {} distinct pages)", pages.len()),
            format!("{:.2}", bare.rate),
        );
        report.note("bare OCR pipeline, one page alone, p50 ms", format!("{:.1}", bare.single_ms));
        let prefix = format!("bo{run}");
        let gw = Proc::gateway(&args, &prefix).await?;
        let worker = Proc::worker(&args, &prefix, &args.ocr_model, &[])?;
        ocr::warm_up(&http, &gw.url, &args.ocr_model, &pages).await?;
        for clients in [1, 4, 8] {
            let (rate, lat) = ocr::fleet(&http, &gw.url, &args, &pages, clients).await?;
            ocr_ratio = if ocr_ratio.is_nan() { rate / bare.rate } else { ocr_ratio.max(rate / bare.rate) };
            report.note(&format!("OCR through the fleet, {clients} clients, pages/s"), format!("{rate:.2}"));
            report.note(
                &format!("OCR through the fleet, {clients} clients, p50 / p99 ms"),
                format!("{:.1} / {:.1}", lat.ms(50.0), lat.ms(99.0)),
            );
        }
        worker.stop().await?;
        gw.stop().await?;
        scenarios::delete_queue(&args, &format!("{prefix}.jobs.{}", args.ocr_model)).await?;
    }

    for (mix, r) in &results {
        let bare = bare_of(*mix);
        let bare_best = bare.map(|b| b.best_rate);
        let drain = r.backlog.as_ref().map(|d| d.rate);
        let drain_one = r.backlog_batch_one.as_ref().map(|d| d.rate);
        if args.wants("e2e") {
            report.ratio(
                &format!("{mix}: fleet efficiency (e2e ≥32 clients / bare best)"),
                div(r.e2e_best(), bare_best),
                "≥ 0.9",
            );
        }
        if args.wants("backlog") {
            report.ratio(&format!("{mix}: backlog drain / bare best"), div(drain, bare_best), "≥ 0.9");
        }
        if args.wants("e2e") {
            report.ratio(&format!("{mix}: e2e default / batch-1 worker"), div(r.e2e_top(), r.e2e_batch_one), "≥ 1.0");
        }
        if args.wants("backlog") {
            report.ratio(&format!("{mix}: backlog default / batch-1 worker"), div(drain, drain_one), "≥ 1.0");
        }
        if let (Some(p50), Some(b)) = (r.one_client_p50_ms(), bare) {
            report.note(
                &format!("TARGET {mix}: 1-client p50 − bare single p50, ms"),
                format!("{:.2} (target ≤ 1.5)", p50 - b.single_p50_ms),
            );
        }
    }
    if args.wants("submit") {
        report.ratio("submit (gateway / raw publish)", submit_rate / raw, "≥ 0.8");
    }
    if args.wants("images") {
        report.note("RATIO images (fleet, best of 1/2/4 clients / bare pipeline)", format!("{image_ratio:.3}"));
    }
    if args.wants("ocr") {
        report.note("RATIO ocr (fleet, best of 1/4/8 clients / bare pipeline)", format!("{ocr_ratio:.3}"));
    }

    if let Some(out) = &args.out {
        report.write_markdown(out)?;
    }
    Ok(())
}

fn note_bare(report: &mut Report, b: &bare::Baseline) {
    let mix = b.mix;
    report.note(
        &format!("{mix} bare ONNX Runtime, texts/s (best cell)"),
        format!(
            "{:.1} ({} sessions × {} threads, batch {})",
            b.best_rate, b.best.sessions, b.best.threads, b.best.batch
        ),
    );
    report.note(&format!("{mix} bare ONNX Runtime, one text, p50 ms"), format!("{:.2}", b.single_p50_ms));
    let mut layouts: Vec<(usize, usize)> = b.cells.iter().map(|c| (c.sessions, c.threads)).collect();
    layouts.dedup();
    for (s, t) in layouts {
        let cells: Vec<&bare::Cell> = b.cells.iter().filter(|c| c.sessions == s && c.threads == t).collect();
        let batches = cells.iter().map(|c| c.batch.to_string()).collect::<Vec<_>>().join("/");
        let rates =
            cells.iter().map(|c| c.rate.map_or("—".into(), |r| format!("{r:.1}"))).collect::<Vec<_>>().join(" / ");
        report.note(&format!("{mix} bare {s}×{t}, texts/s at batch {batches}"), rates);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_run_is_estimated_under_twelve_minutes_on_two_cores() {
        let args =
            Args::try_parse_from(["kiln-load", "--amqp-url", "amqp://x", "--redis-url", "redis://y"]).expect("args");
        assert_eq!(args.mixes, vec![Mix::Short, Mix::Realistic, Mix::Long]);
        assert_eq!(args.concurrency, vec![1, 32]);
        let est = estimate(&args, 2);
        assert!(est < Duration::from_secs(12 * 60) && est > Duration::from_secs(5 * 60), "{est:?}");
    }

    #[test]
    fn worker_env_is_key_value() {
        assert_eq!(parse_env("KILN_MAX_BATCH=1"), Ok(("KILN_MAX_BATCH".into(), "1".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=1").is_err() && parse_env("X").is_err());
    }
}
