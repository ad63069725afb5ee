//! The `embedding` task's two halves: [`TextEncoder`] turns a text into token ids (truncated at the
//! model's limit, no padding), and [`Encoder`] runs one batch of such texts through the model —
//! padding to the batch's longest, mean- or CLS-pooling over the attention mask, L2-normalising.
//! The split lets texts be tokenised where they arrive, in parallel, and batched by length after.

use std::path::Path;

use kiln_common::models::{EmbeddingSpec, Pooling};
use ndarray::Array2;
use ort::session::Session;
use ort::value::TensorRef;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The input cannot be processed by this model; retrying will not help.
    #[error("invalid input: {0}")]
    Input(String),
    /// ONNX Runtime failed running the batch.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What embedding some texts gives: a vector for each, and the tokens each was as the model saw
/// it (special tokens included, after truncation), both in the order of the texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: Vec<usize>,
}

/// The model's tokenizer, set up to produce one text's ids unpadded.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad_id: u32,
    max_length: usize,
}

impl TextEncoder {
    pub fn new(tokenizer_path: &Path, spec: &EmbeddingSpec) -> Result<Self, String> {
        let mut tokenizer =
            Tokenizer::from_file(tokenizer_path).map_err(|e| format!("{}: {e}", tokenizer_path.display()))?;
        // Shipped tokenizer configs often force fixed-length padding; batches pad themselves.
        let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: spec.max_length, ..Default::default() }))
            .map_err(|e| e.to_string())?;
        Ok(Self { tokenizer, pad_id, max_length: spec.max_length })
    }

    /// The ids of one text, special tokens included, at most the model's `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| PipelineError::Input(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.max_length);
        if ids.is_empty() {
            // A text of nothing the vocabulary knows still gets a vector, from one pad token.
            ids.push(self.pad_id);
        }
        Ok(ids)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// One ONNX Runtime session of an embedding model, with what it needs to run a batch.
pub struct Encoder {
    session: Session,
    spec: EmbeddingSpec,
    pad_id: i64,
    has_type_ids: bool,
    output: String,
}

impl Encoder {
    pub fn new(session: Session, spec: EmbeddingSpec, pad_id: u32) -> Result<Self, String> {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                return Err(format!("model has no input {required:?} (inputs: {names:?})"));
            }
        }
        let has_type_ids = names.contains(&"token_type_ids");
        let output = session.outputs().first().map(|o| o.name().to_owned()).ok_or("model has no output")?;
        Ok(Self { session, spec, pad_id: i64::from(pad_id), has_type_ids, output })
    }

    /// Embeds the texts whose ids are `rows` as one batch, padded to the longest.
    pub fn run(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>, PipelineError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let batch = rows.len();
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = Array2::<i64>::from_elem((batch, seq), self.pad_id);
        let mut mask = Array2::<i64>::zeros((batch, seq));
        for (row, tokens) in rows.iter().enumerate() {
            for (col, &id) in tokens.iter().enumerate() {
                ids[[row, col]] = i64::from(id);
                mask[[row, col]] = 1;
            }
        }
        let type_ids = Array2::<i64>::zeros((batch, seq));
        let err = |e: ort::Error| PipelineError::Inference(e.to_string());
        let mut feed = vec![
            ("input_ids", TensorRef::from_array_view(&ids).map_err(err)?),
            ("attention_mask", TensorRef::from_array_view(&mask).map_err(err)?),
        ];
        if self.has_type_ids {
            feed.push(("token_type_ids", TensorRef::from_array_view(&type_ids).map_err(err)?));
        }
        let outputs = self.session.run(feed).map_err(err)?;
        let (shape, hidden) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(err)?;
        if shape.len() != 3 || shape[0] as usize != batch || shape[1] as usize != seq {
            return Err(PipelineError::Inference(format!("unexpected output shape {shape:?} for batch {batch}×{seq}")));
        }
        let dim = shape[2] as usize;
        Ok((0..batch)
            .map(|row| {
                pool(
                    &hidden[row * seq * dim..(row + 1) * seq * dim],
                    mask.row(row).as_slice().expect("contiguous"),
                    dim,
                    &self.spec,
                )
            })
            .collect())
    }
}

/// Pools one text's token vectors (`seq × dim`, row-major) into one vector: mean over the
/// attention mask (or the CLS token), then L2 normalisation, as the model's spec says.
pub fn pool(hidden: &[f32], mask: &[i64], dim: usize, spec: &EmbeddingSpec) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    match spec.pooling {
        Pooling::Cls => out.copy_from_slice(&hidden[..dim]),
        Pooling::Mean => {
            let mut count = 0f32;
            for (tok, &m) in hidden.chunks_exact(dim).zip(mask) {
                if m != 0 {
                    count += 1.0;
                    out.iter_mut().zip(tok).for_each(|(o, t)| *o += t);
                }
            }
            let count = count.max(1e-9);
            out.iter_mut().for_each(|o| *o /= count);
        }
    }
    if spec.normalize {
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_padding_and_normalises() {
        let spec = EmbeddingSpec { max_length: 8, pooling: Pooling::Mean, normalize: true, matryoshka: false };
        // two tokens + one padding token with a huge value that must not count
        let hidden = [3.0, 0.0, 1.0, 4.0, 100.0, 100.0];
        let v = pool(&hidden, &[1, 1, 0], 2, &spec);
        let expect = [2.0f32 / (2.0f32 * 2.0 + 2.0 * 2.0).sqrt(), 2.0 / (8.0f32).sqrt()];
        assert!((v[0] - expect[0]).abs() < 1e-6 && (v[1] - expect[1]).abs() < 1e-6, "{v:?}");
    }
}
