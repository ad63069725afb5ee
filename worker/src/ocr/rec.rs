//! The two models that read cut-out text lines: the angle classifier (is a line upside down?)
//! and the recogniser (a CTC model over PP-OCR's 6,623-character dictionary), each run in chunks
//! over many lines at once, and the greedy CTC decode.
//!
//! Recognition pads each line to a width bucket that depends on the line alone, and a chunk
//! holds lines of one bucket, so a line reads the same whatever lines share its model run (the
//! model's attention sees the padding: padding a line to a longer batch-mate would change it).

use image::RgbImage;
use ndarray::Array4;
use ort::session::Session;
use ort::value::TensorRef;

use super::geometry;
use crate::embedding::PipelineError;

/// Height of the classifier's and the recogniser's input.
const LINE_H: usize = 48;
/// The classifier's fixed input width.
const CLS_W: usize = 192;
/// A line classified as 180° with at least this score is turned.
const CLS_THRESH: f32 = 0.9;
/// Lines per classifier run at most.
const CLS_CHUNK: usize = 32;
/// The recogniser's narrowest input; lines are padded to a multiple of [`REC_BUCKET`] above it.
const REC_MIN_W: usize = 320;
const REC_BUCKET: usize = 64;
/// The widest line the recogniser sees (a longer line is squeezed to it): 66 × its height.
const REC_MAX_W: usize = 3200;
/// Lines per recogniser run at most, and their summed padded width (bounding the output, which
/// is `width / 8 × 6,625` floats per line).
const REC_CHUNK: usize = 32;
const REC_CHUNK_W: usize = 12_800;

fn ort_err(e: ort::Error) -> PipelineError {
    PipelineError::Inference(e.to_string())
}

/// The width a line of `w × h` pixels is resized to at height 48, aspect kept.
fn scaled_width(w: u32, h: u32, max: usize) -> usize {
    let w = (LINE_H as f64 * f64::from(w) / f64::from(h.max(1))).ceil() as usize;
    w.clamp(1, max)
}

/// A `[n, 3, 48, width]` tensor of `lines` resized to height 48 at their own widths (at most
/// `max`, squeezed beyond) and padded on the right with zeros.
fn line_batch(lines: &[&RgbImage], width: usize, max: usize) -> Result<Array4<f32>, PipelineError> {
    let mut x = Array4::<f32>::zeros((lines.len(), 3, LINE_H, width));
    let per_line = 3 * LINE_H * width;
    let data = x.as_slice_mut().ok_or_else(|| PipelineError::Inference("line batch not contiguous".into()))?;
    for (line, dst) in lines.iter().zip(data.chunks_mut(per_line)) {
        geometry::resize_into(line, scaled_width(line.width(), line.height(), max).min(width), LINE_H, dst, width);
    }
    Ok(x)
}

pub struct Classifier {
    session: Session,
    input: String,
    output: String,
}

impl Classifier {
    pub fn new(session: Session) -> Result<Self, String> {
        let input = session.inputs().first().map(|i| i.name().to_owned()).ok_or("cls model has no input")?;
        let output = session.outputs().first().map(|o| o.name().to_owned()).ok_or("cls model has no output")?;
        Ok(Self { session, input, output })
    }

    /// Whether each line is upside down (label 180° with a score of at least 0.9).
    pub fn upside_down(&mut self, lines: &[&RgbImage]) -> Result<Vec<bool>, PipelineError> {
        let mut out = Vec::with_capacity(lines.len());
        for chunk in lines.chunks(CLS_CHUNK) {
            let x = line_batch(chunk, CLS_W, CLS_W)?;
            let outputs = self
                .session
                .run(vec![(self.input.as_str(), TensorRef::from_array_view(&x).map_err(ort_err)?)])
                .map_err(ort_err)?;
            let (shape, probs) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(ort_err)?;
            if shape.len() != 2 || shape[0] != chunk.len() as i64 || shape[1] != 2 || probs.len() != 2 * chunk.len() {
                return Err(PipelineError::Inference(format!(
                    "cls output has shape {shape:?}, wanted [{}, 2]",
                    chunk.len()
                )));
            }
            out.extend(probs.chunks_exact(2).map(|p| p[1] > p[0] && p[1] >= CLS_THRESH));
        }
        Ok(out)
    }
}

pub struct Recognizer {
    session: Session,
    input: String,
    output: String,
    /// Index 0 is CTC's blank (never emitted), then the dictionary, then a space.
    charset: Vec<String>,
}

impl Recognizer {
    /// The recogniser, with its dictionary from the model's metadata key `character`.
    pub fn new(session: Session) -> Result<Self, String> {
        let input = session.inputs().first().map(|i| i.name().to_owned()).ok_or("rec model has no input")?;
        let output = session.outputs().first().map(|o| o.name().to_owned()).ok_or("rec model has no output")?;
        let dictionary = session
            .metadata()
            .map_err(|e| format!("rec model metadata: {e}"))?
            .custom("character")
            .ok_or("rec model has no `character` in its metadata")?;
        let mut charset = vec![String::new()];
        charset.extend(dictionary.lines().map(str::to_owned));
        charset.push(" ".to_owned());
        if charset.len() < 3 {
            return Err("rec model's `character` metadata is empty".into());
        }
        Ok(Self { session, input, output, charset })
    }

    /// The text and confidence of each line, in order.
    pub fn read(&mut self, lines: &[&RgbImage]) -> Result<Vec<(String, f32)>, PipelineError> {
        let scaled: Vec<usize> = lines.iter().map(|l| scaled_width(l.width(), l.height(), REC_MAX_W)).collect();
        let padded: Vec<usize> =
            scaled.iter().map(|&w| w.div_ceil(REC_BUCKET).max(1) * REC_BUCKET).map(|w| w.max(REC_MIN_W)).collect();
        let mut order: Vec<usize> = (0..lines.len()).collect();
        order.sort_by_key(|&i| (padded[i], scaled[i]));
        let mut out = vec![(String::new(), 0.0f32); lines.len()];
        let mut start = 0;
        while start < order.len() {
            let width = padded[order[start]];
            let mut end = start + 1;
            while end < order.len()
                && padded[order[end]] == width
                && end - start < REC_CHUNK
                && (end - start + 1) * width <= REC_CHUNK_W
            {
                end += 1;
            }
            let chunk: Vec<&RgbImage> = order[start..end].iter().map(|&i| lines[i]).collect();
            let read = self.run(&chunk, width)?;
            for (&i, r) in order[start..end].iter().zip(read) {
                out[i] = r;
            }
            start = end;
        }
        Ok(out)
    }

    fn run(&mut self, lines: &[&RgbImage], width: usize) -> Result<Vec<(String, f32)>, PipelineError> {
        let x = line_batch(lines, width, REC_MAX_W)?;
        let outputs = self
            .session
            .run(vec![(self.input.as_str(), TensorRef::from_array_view(&x).map_err(ort_err)?)])
            .map_err(ort_err)?;
        let (shape, probs) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(ort_err)?;
        let classes = self.charset.len();
        let steps = match shape[..] {
            [n, t, c] if n == lines.len() as i64 && c == classes as i64 && t > 0 => t as usize,
            _ => {
                return Err(PipelineError::Inference(format!(
                    "rec output has shape {shape:?}, wanted [{}, T, {classes}]",
                    lines.len()
                )));
            }
        };
        if probs.len() != lines.len() * steps * classes {
            return Err(PipelineError::Inference(format!("rec output has {} values for shape {shape:?}", probs.len())));
        }
        Ok(probs.chunks_exact(steps * classes).map(|p| ctc_decode(p, classes, &self.charset)).collect())
    }
}

/// Greedy CTC: the most probable class of each step, repeats collapsed, blanks dropped; the
/// confidence is the mean probability of the characters kept (0 when none is).
pub fn ctc_decode(probs: &[f32], classes: usize, charset: &[String]) -> (String, f32) {
    let mut text = String::new();
    let (mut sum, mut kept) = (0f64, 0usize);
    let mut previous = None;
    for step in probs.chunks_exact(classes) {
        let Some((best, &p)) = step.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) else { continue };
        if best != 0
            && previous != Some(best)
            && let Some(c) = charset.get(best)
        {
            text.push_str(c);
            sum += f64::from(p);
            kept += 1;
        }
        previous = Some(best);
    }
    (text, if kept == 0 { 0.0 } else { (sum / kept as f64) as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctc_collapses_repeats_and_drops_blanks() {
        let charset: Vec<String> = ["", "a", "b", " "].iter().map(|s| s.to_string()).collect();
        let step = |k: usize, p: f32| {
            let mut v = vec![(1.0 - p) / 3.0; 4];
            v[k] = p;
            v
        };
        // a a _ a b b _ " " → "aab "
        let probs: Vec<f32> = [(1, 0.9), (1, 0.7), (0, 0.99), (1, 0.8), (2, 0.6), (2, 0.9), (0, 0.5), (3, 0.7)]
            .iter()
            .flat_map(|&(k, p)| step(k, p))
            .collect();
        let (text, conf) = ctc_decode(&probs, 4, &charset);
        assert_eq!(text, "aab ");
        assert!((conf - (0.9 + 0.8 + 0.6 + 0.7) / 4.0).abs() < 1e-6, "{conf}");
        assert_eq!(ctc_decode(&step(0, 0.9), 4, &charset), (String::new(), 0.0));
    }

    #[test]
    fn widths_keep_aspect_within_bounds() {
        assert_eq!(scaled_width(100, 48, REC_MAX_W), 100);
        assert_eq!(scaled_width(10, 480, REC_MAX_W), 1);
        assert_eq!(scaled_width(1_000_000, 10, REC_MAX_W), REC_MAX_W);
        assert_eq!(scaled_width(500, 48, CLS_W), CLS_W);
    }
}
