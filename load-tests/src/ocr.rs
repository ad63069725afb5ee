//! The OCR scenario: the PP-OCRv4 pipeline alone (the worker's own code: PNG decoding, detection,
//! angle classification and recognition, batches of the model's `max_batch` images, one set of
//! sessions on every core) against OCR jobs through the fleet — the image inline as base64 in
//! `POST /v1/jobs` with `Prefer: wait`, the gateway checking and storing it, the worker reading it
//! back and batching it with other jobs — with closed-loop clients.
//!
//! The scans are pages rendered here from the realistic corpus: 1 to 6 lines each, wrapped at
//! 28 to 64 characters, in DejaVu Sans at 18 to 40 px, every page different, so the pipeline sees
//! the spread of line counts, lengths and sizes of real scans, not one repeated image.

use std::time::Instant;

use anyhow::{Context, bail};
use base64::Engine as _;
use kiln_common::models::ModelRepository;
use kiln_common::testing::media::{TextLayout, render_text};
use serde_json::{Value, json};

use crate::Args;
use crate::stats::Samples;

/// Distinct pages rendered for a run.
const PAGES: usize = 48;

/// The pages: PNG bytes, each a different part of the corpus at a different size.
pub fn pages() -> Vec<Vec<u8>> {
    let corpus: Vec<&str> = include_str!("../data/realistic.txt").lines().filter(|l| !l.trim().is_empty()).collect();
    (0..PAGES)
        .map(|i| {
            let lines = 1 + i % 6;
            let width = 28 + (i * 7) % 37;
            let px = 18.0 + ((i * 5) % 23) as f32;
            let words: Vec<&str> = corpus[(i * 13) % corpus.len()..]
                .iter()
                .chain(corpus.iter())
                .flat_map(|l| l.split_whitespace())
                .collect();
            let mut text = Vec::new();
            let mut line = String::new();
            for w in words {
                if line.len() + w.len() + 1 > width {
                    text.push(std::mem::take(&mut line));
                    if text.len() == lines {
                        break;
                    }
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(w);
            }
            let text: Vec<&str> = text.iter().map(String::as_str).collect();
            let image = render_text(&text, px, TextLayout::default());
            let mut png = std::io::Cursor::new(Vec::new());
            image.write_to(&mut png, image::ImageFormat::Png).expect("PNG encodes");
            png.into_inner()
        })
        .collect()
}

pub struct Bare {
    /// Pages per second in batches of the model's `max_batch`.
    pub rate: f64,
    /// One page alone, p50.
    pub single_ms: f64,
}

pub async fn bare(args: &Args, pages: &[Vec<u8>]) -> anyhow::Result<Bare> {
    let repo = ModelRepository::load(&args.models_dir)?;
    let spec = repo.get(&args.ocr_model).context("no such OCR model")?.clone();
    let cache = kiln_common::config::default_cache_dir();
    let config = kiln_worker::WorkerConfig::default();
    let dylib = kiln_worker::resolve_onnxruntime(&config, &cache)?;
    if let Some(source) = &spec.source {
        kiln_common::assets::ensure(source, &spec.dir(&cache))?;
    }
    // The worker's own `auto` for a model on a thread of its own: every core.
    let threads = kiln_worker::Threads { intra: kiln_worker::runtime::default_threads(), spin: config.ort_spin };
    let (pages, max_batch, limits, duration) = (pages.to_vec(), spec.max_batch, spec.limits, args.duration);
    tokio::task::spawn_blocking(move || -> anyhow::Result<Bare> {
        let env = kiln_worker::runtime::environment(&dylib)?;
        let (mut ocr, _) =
            kiln_worker::ocr::OcrPipeline::load(&spec, &cache, env, threads).map_err(anyhow::Error::msg)?;
        let decode = |png: &[u8]| kiln_common::media::image::decode_image(png, limits.max_pixels);
        let mut single = Samples::default();
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < duration / 4 {
            let t = Instant::now();
            ocr.read(&[decode(&pages[n % pages.len()])?])?;
            single.push(t.elapsed());
            n += 1;
        }
        let (mut done, mut next) = (0usize, 0usize);
        let started = Instant::now();
        while started.elapsed() < duration {
            let batch: Vec<_> =
                (0..max_batch).map(|k| decode(&pages[(next + k) % pages.len()])).collect::<Result<_, _>>()?;
            let out = ocr.read(&batch)?;
            if out.len() != batch.len() {
                bail!("the pipeline read {} of {} pages", out.len(), batch.len());
            }
            next += max_batch;
            done += batch.len();
        }
        Ok(Bare { rate: done as f64 / started.elapsed().as_secs_f64(), single_ms: single.ms(50.0) })
    })
    .await?
}

async fn one(http: &reqwest::Client, url: &str, model: &str, page: &[u8]) -> anyhow::Result<()> {
    let image = base64::engine::general_purpose::STANDARD.encode(page);
    let body = json!({ "model": model, "input": { "image": image }, "cache": false });
    let r = http.post(format!("{url}/v1/jobs")).header("prefer", "wait=60").json(&body).send().await?;
    if r.status() != 200 {
        bail!("OCR job answered {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    let job: Value = r.json().await?;
    if job["status"] != "succeeded" || job["output"]["lines"].as_array().is_none_or(Vec::is_empty) {
        bail!("OCR job did not read its page: {job}");
    }
    Ok(())
}

pub async fn warm_up(http: &reqwest::Client, url: &str, model: &str, pages: &[Vec<u8>]) -> anyhow::Result<()> {
    for page in pages.iter().take(4) {
        one(http, url, model, page).await?;
    }
    Ok(())
}

pub async fn fleet(
    http: &reqwest::Client,
    url: &str,
    args: &Args,
    pages: &[Vec<u8>],
    clients: usize,
) -> anyhow::Result<(f64, Samples)> {
    let (http, url, model) = (http.clone(), url.to_owned(), args.ocr_model.clone());
    let pages = std::sync::Arc::new(pages.to_vec());
    crate::scenarios::closed_loop(clients, args.duration, move |n| {
        let (http, url, model, pages) = (http.clone(), url.clone(), model.clone(), pages.clone());
        async move { one(&http, &url, &model, &pages[n % pages.len()]).await }
    })
    .await
}
