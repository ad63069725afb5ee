//! The images scenario: the terrain pipeline alone (the worker's own code: model run, heights,
//! PNG encoding, one image per run, one session on every core) against images through the fleet — submit with `Prefer:
//! wait`, then download the PNG — with closed-loop clients.

use std::time::Instant;

use anyhow::{Context, bail};
use kiln_common::models::ModelRepository;
use kiln_proto::{Colormap, ImageGenerationInput};
use kiln_worker::{ImageWork, Update};
use serde_json::{Value, json};

use crate::Args;
use crate::stats::Samples;

pub struct Bare {
    pub rate: f64,
    pub single_ms: f64,
}

fn input(seed: u64, count: u32) -> ImageGenerationInput {
    ImageGenerationInput {
        seed,
        difficulty: 50,
        count,
        width: 128,
        height: 128,
        colormap: Colormap::Terrain,
        moderate: false,
    }
}

pub async fn bare(args: &Args) -> anyhow::Result<Bare> {
    let repo = ModelRepository::load(&args.models_dir)?;
    let spec = repo.get(&args.image_model).context("no such image model")?.clone();
    let cache = kiln_common::config::default_cache_dir();
    let config = kiln_worker::WorkerConfig::default();
    let dylib = kiln_worker::resolve_onnxruntime(&config, &cache)?;
    // One session on every core: the image worker's own `auto`.
    let threads = kiln_worker::Threads { intra: kiln_worker::runtime::default_threads(), spin: config.ort_spin };
    let infer = tokio::task::spawn_blocking(move || kiln_worker::load_model(&spec, &dylib, &cache, threads)).await??;
    let mut single = Samples::default();
    let (mut images, mut seed) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < args.duration {
        let mut run = infer.images(ImageWork::Terrain(input(seed, 1)), 0).await?;
        let t = Instant::now();
        loop {
            match run.updates.recv().await.context("inference thread stopped")? {
                Update::Image { .. } => {
                    single.push(t.elapsed());
                    images += 1;
                    run.proceed(true);
                }
                Update::Step { .. } => run.proceed(true),
                Update::Withheld { .. } | Update::Segments(_) => {
                    bail!("a terrain job without moderation withheld an image or sent speech segments")
                }
                Update::Finished(r) => break r?,
            }
        }
        seed += 1;
    }
    Ok(Bare { rate: images as f64 / started.elapsed().as_secs_f64(), single_ms: single.ms(50.0) })
}

async fn one(http: &reqwest::Client, url: &str, model: &str, seed: u64) -> anyhow::Result<()> {
    let body = json!({ "model": model, "input": { "difficulty": 50, "seed": seed, "colormap": "terrain" } });
    let r = http.post(format!("{url}/v1/jobs")).header("prefer", "wait=60").json(&body).send().await?;
    if r.status() != 200 {
        bail!("image job answered {}", r.status());
    }
    let job: Value = r.json().await?;
    let file = job["output"]["images"][0]["url"].as_str().context("no file in the output")?;
    let png = http.get(format!("{url}{file}")).send().await?.error_for_status()?.bytes().await?;
    if png.len() as u64 != job["output"]["images"][0]["size"].as_u64().unwrap_or(0) {
        bail!("downloaded PNG has the wrong size");
    }
    Ok(())
}

pub async fn warm_up(http: &reqwest::Client, url: &str, model: &str) -> anyhow::Result<()> {
    for seed in 0..4 {
        one(http, url, model, 9_000_000 + seed).await?;
    }
    Ok(())
}

pub async fn fleet(http: &reqwest::Client, url: &str, args: &Args, clients: usize) -> anyhow::Result<(f64, Samples)> {
    let (http, url, model) = (http.clone(), url.to_owned(), args.image_model.clone());
    let first = 1_000_000 * clients as u64;
    crate::scenarios::closed_loop(clients, args.duration, move |n| {
        let (http, url, model) = (http.clone(), url.clone(), model.clone());
        async move { one(&http, &url, &model, first + n as u64).await }
    })
    .await
}
