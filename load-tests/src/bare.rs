//! The bare ONNX Runtime baseline of a mix: the served embedding model with the worker's session
//! options, tokenisation, pooling and normalisation, and nothing else — at every session × thread
//! layout that fills the cores and every batch size, the best cell being the mix's baseline; and
//! the single-text latency the 1-client figure is compared against.

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_common::models::{EmbeddingSpec, ExecutionProvider, ModelRepository};
use kiln_worker::pool_embedding as pool;
use ndarray::Array2;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::corpus::{Corpus, Mix};
use crate::stats::Samples;

/// Batch sizes tried in every layout.
const BATCHES: [usize; 6] = [1, 2, 4, 8, 16, 32];
/// Texts timed one at a time for the single-text latency.
const SINGLE_TEXTS: usize = 100;

/// One (layout, batch size) measurement; `rate` is `None` when the cell was skipped.
#[derive(Debug, Clone)]
pub struct Cell {
    pub sessions: usize,
    pub threads: usize,
    pub batch: usize,
    pub rate: Option<f64>,
}

impl Cell {
    pub fn label(&self) -> String {
        format!("{}×{} B={}", self.sessions, self.threads, self.batch)
    }
}

#[derive(Debug, Clone)]
pub struct Baseline {
    pub mix: Mix,
    pub cells: Vec<Cell>,
    /// The best cell: the mix's baseline.
    pub best: Cell,
    pub best_rate: f64,
    /// p50 of one text at a time on one session of every core, ms.
    pub single_p50_ms: f64,
}

/// The served model's files and settings, loaded the way the worker loads them.
pub struct Model {
    env: &'static Environment,
    model_path: PathBuf,
    tokenizer: Tokenizer,
    spec: EmbeddingSpec,
}

impl Model {
    pub fn load(models_dir: &std::path::Path, name: &str) -> anyhow::Result<Self> {
        let repo = ModelRepository::load(models_dir)?;
        let spec = repo.get(name).with_context(|| format!("no model {name} in {}", models_dir.display()))?.clone();
        let cache = kiln_common::config::default_cache_dir();
        let dylib = kiln_worker::resolve_onnxruntime(&kiln_worker::WorkerConfig::default(), &cache)?;
        if let Some(source) = &spec.source {
            kiln_common::assets::ensure(source, &spec.dir(&cache))?;
        }
        let env = kiln_worker::runtime::environment(&dylib)?;
        let file =
            |logical: &str| spec.file(&cache, logical).with_context(|| format!("{name}: files.{logical} is not set"));
        let emb = spec.embedding.clone().with_context(|| format!("{name} is not an embedding model"))?;
        let tokenizer_path = file("tokenizer")?;
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer_path.display()))?;
        // As the worker: pad each batch to its longest text, truncate at the model's limit.
        let padding = PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..tokenizer.get_padding().cloned().unwrap_or_default()
        };
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: emb.max_length, ..Default::default() }))
            .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
        Ok(Self { env, model_path: file("model")?, tokenizer, spec: emb })
    }

    fn embedder(&self, intra: usize) -> anyhow::Result<Embedder> {
        let threads = kiln_worker::Threads { intra, spin: false };
        let loaded =
            kiln_worker::runtime::load_session(self.env, &self.model_path, &[ExecutionProvider::Cpu], threads)?;
        Embedder::new(self.tokenizer.clone(), loaded.session, self.spec.clone())
    }
}

/// Tokeniser + session + pooling: what the worker runs for one batch.
struct Embedder {
    tokenizer: Tokenizer,
    session: Session,
    spec: EmbeddingSpec,
    has_type_ids: bool,
    output: String,
}

impl Embedder {
    fn new(tokenizer: Tokenizer, session: Session, spec: EmbeddingSpec) -> anyhow::Result<Self> {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                bail!("model has no input {required:?} (inputs: {names:?})");
            }
        }
        let has_type_ids = names.contains(&"token_type_ids");
        let output = session.outputs().first().map(|o| o.name().to_owned()).context("model has no output")?;
        Ok(Self { tokenizer, session, spec, has_type_ids, output })
    }

    /// Embeds `texts` as one batch: tokenise, run, pool, normalise.
    fn embed(&mut self, texts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = self.tokenizer.encode_batch(inputs, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let batch = encodings.len();
        let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Array2::<i64>::zeros((batch, seq));
        let mut mask = Array2::<i64>::zeros((batch, seq));
        for (row, enc) in encodings.iter().enumerate() {
            for (col, (&id, &m)) in enc.get_ids().iter().zip(enc.get_attention_mask()).enumerate() {
                ids[[row, col]] = i64::from(id);
                mask[[row, col]] = i64::from(m);
            }
        }
        let type_ids = Array2::<i64>::zeros((batch, seq));
        let mut feed = vec![
            ("input_ids", TensorRef::from_array_view(&ids)?),
            ("attention_mask", TensorRef::from_array_view(&mask)?),
        ];
        if self.has_type_ids {
            feed.push(("token_type_ids", TensorRef::from_array_view(&type_ids)?));
        }
        let outputs = self.session.run(feed)?;
        let (shape, hidden) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        if shape.len() != 3 || shape[0] as usize != batch || shape[1] as usize != seq {
            bail!("unexpected output shape {shape:?} for batch {batch}×{seq}");
        }
        let dim = shape[2] as usize;
        let mut out = Vec::with_capacity(batch);
        for row in 0..batch {
            let mask_row = mask.row(row);
            let mask_row = mask_row.as_slice().context("attention mask not contiguous")?;
            out.push(pool(&hidden[row * seq * dim..(row + 1) * seq * dim], mask_row, dim, &self.spec));
        }
        Ok(out)
    }
}

/// Every `sessions × threads` that uses exactly `cores`, widest session first.
pub fn layouts(cores: usize) -> Vec<(usize, usize)> {
    (1..=cores).filter(|s| cores.is_multiple_of(*s)).map(|s| (s, cores / s)).collect()
}

/// The baseline of `mix`: every layout × batch size for `cell` each, after one warm-up batch.
/// A batch size is skipped (with the larger ones of that layout) when one batch of it would take
/// more than a third of the cell, judged from the previous size's rate: too few batches in a
/// cell to measure it.
pub fn run(model: &Model, mix: Mix, cores: usize, cell: Duration) -> anyhow::Result<Baseline> {
    let mut cells = Vec::new();
    let mut single_p50_ms = f64::NAN;
    for (sessions, threads) in layouts(cores) {
        let mut embedders = (0..sessions).map(|_| model.embedder(threads)).collect::<anyhow::Result<Vec<_>>>()?;
        if sessions == 1 {
            single_p50_ms = single(&mut embedders[0], &Corpus::new(mix))?;
            println!("  bare {mix} 1×{threads}: one text at a time, p50 {single_p50_ms:.2} ms");
        }
        // Set once a batch of the next size would take more than a third of a cell.
        let mut too_slow: Option<Duration> = None;
        for (i, &batch) in BATCHES.iter().enumerate() {
            if let Some(t) = too_slow {
                let c = Cell { sessions, threads, batch, rate: None };
                println!("  bare {mix} {}: skipped (one batch would take ~{} ms)", c.label(), t.as_millis());
                cells.push(c);
                continue;
            }
            // Every cell walks the mix from the same start: the cells see the same texts.
            let (rate, warm) = measure(&mut embedders, &Corpus::new(mix), batch, cell)?;
            let c = Cell { sessions, threads, batch, rate };
            match rate {
                Some(r) => {
                    println!("  bare {mix} {}: {r:.1} texts/s", c.label());
                    // Each session does r / sessions texts/s: the next size's batch takes this long.
                    if let Some(&next) = BATCHES.get(i + 1) {
                        let t = Duration::from_secs_f64(next as f64 * sessions as f64 / r);
                        if t * 3 > cell {
                            too_slow = Some(t);
                        }
                    }
                }
                None => {
                    println!("  bare {mix} {}: skipped (one batch takes {} ms)", c.label(), warm.as_millis());
                    too_slow = Some(warm);
                }
            }
            cells.push(c);
        }
    }
    if single_p50_ms.is_nan() {
        let mut e = model.embedder(cores)?;
        single_p50_ms = single(&mut e, &Corpus::new(mix))?;
    }
    let best = cells
        .iter()
        .filter(|c| c.rate.is_some())
        .max_by(|a, b| a.rate.unwrap_or(0.0).total_cmp(&b.rate.unwrap_or(0.0)))
        .cloned()
        .context("no bare cell could be measured")?;
    let best_rate = best.rate.unwrap_or(f64::NAN);
    Ok(Baseline { mix, cells, best, best_rate, single_p50_ms })
}

/// p50 of one text at a time, after one warm-up text.
fn single(e: &mut Embedder, corpus: &Corpus) -> anyhow::Result<f64> {
    e.embed(&corpus.take(1))?;
    let mut lat = Samples::default();
    for _ in 0..SINGLE_TEXTS {
        let text = corpus.take(1);
        let t = Instant::now();
        std::hint::black_box(e.embed(&text)?);
        lat.push(t.elapsed());
    }
    Ok(lat.ms(50.0))
}

/// One cell: each session on its own OS thread takes the next `batch` texts from the shared walk
/// until `time` is up. Returns texts/s (`None` if skipped) and the slowest warm-up batch's time.
fn measure(
    embedders: &mut [Embedder],
    corpus: &Corpus,
    batch: usize,
    time: Duration,
) -> anyhow::Result<(Option<f64>, Duration)> {
    let barrier = Barrier::new(embedders.len());
    let results: Vec<anyhow::Result<(usize, Duration, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = embedders
            .iter_mut()
            .map(|e| {
                let barrier = &barrier;
                s.spawn(move || {
                    let t = Instant::now();
                    let warm_up = e.embed(&corpus.take(batch));
                    let warm = t.elapsed();
                    // Every thread reaches the barrier, even after an error, or the others hang.
                    barrier.wait();
                    warm_up?;
                    if warm * 3 > time {
                        return Ok((0, Duration::ZERO, warm));
                    }
                    let started = Instant::now();
                    let mut done = 0;
                    while started.elapsed() < time {
                        std::hint::black_box(e.embed(&corpus.take(batch))?);
                        done += batch;
                    }
                    Ok((done, started.elapsed(), warm))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a bare inference thread panicked"))))
            .collect()
    });
    let (mut texts, mut elapsed, mut warm) = (0, Duration::ZERO, Duration::ZERO);
    for r in results {
        let (t, e, w) = r?;
        texts += t;
        elapsed = elapsed.max(e);
        warm = warm.max(w);
    }
    if warm * 3 > time {
        return Ok((None, warm));
    }
    Ok((Some(texts as f64 / elapsed.as_secs_f64()), warm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fill_the_cores() {
        assert_eq!(layouts(2), vec![(1, 2), (2, 1)]);
        assert_eq!(layouts(4), vec![(1, 4), (2, 2), (4, 1)]);
        assert_eq!(layouts(1), vec![(1, 1)]);
    }

    /// Needs ONNX Runtime and the model fetched (`kiln fetch`): `cargo test -p kiln-load-tests -- --ignored`.
    #[test]
    #[ignore]
    fn embeds_unit_vectors_independent_of_padding() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let model = Model::load(&dir, "all-minilm-l6-v2").expect("model");
        let mut e = model.embedder(1).expect("session");
        let texts = Corpus::new(Mix::Realistic).take(3);
        let together = e.embed(&texts).expect("batch");
        assert_eq!(together.len(), 3);
        for (i, t) in texts.iter().enumerate() {
            let alone = e.embed(std::slice::from_ref(t)).expect("one");
            assert_eq!(alone[0].len(), 384);
            let norm: f32 = alone[0].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
            let diff = alone[0].iter().zip(&together[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-3, "text {i}: batched and alone differ by {diff}");
        }
        let mut two = vec![e, model.embedder(1).expect("session")];
        let corpus = Corpus::new(Mix::Short);
        let mark = corpus.mark();
        let (rate, _) = measure(&mut two, &corpus, 2, Duration::from_millis(300)).expect("cell");
        assert!(rate.is_some_and(|r| r > 0.0), "{rate:?}");
        // two warm-up batches and at least one timed batch per session
        assert!(corpus.usage_since(mark).texts >= 8, "{} texts taken", corpus.usage_since(mark).texts);
    }
}
