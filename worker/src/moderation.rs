//! The `image-moderation` task (and the screening of generated images): Yahoo's open-nsfw scoring
//! each image {safe, nsfw}. Preprocessing as the model was trained (Caffe style): 256×256
//! bilinear, centre crop 224, BGR with the channel means subtracted, channels last.

use std::path::Path;

use image::RgbImage;
use image::imageops::{self, FilterType};
use kiln_common::models::ExecutionProvider;
use kiln_proto::ModerationScores;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::embedding::PipelineError;
use crate::runtime::{self, Threads};

/// The side images are resized to before the crop.
const RESIZE: u32 = 256;
/// The side of the model's input.
const SIDE: u32 = 224;
/// Channel means subtracted, in the model's order (B, G, R).
const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];
const PIXELS: usize = (SIDE * SIDE) as usize;

/// One ONNX Runtime session of open-nsfw.
pub struct ModerationPipeline {
    session: Session,
    input: String,
    output: String,
    /// The batch size the graph fixes, if it does.
    fixed_batch: Option<usize>,
}

impl ModerationPipeline {
    pub fn load(
        model: &Path,
        env: &Environment,
        providers: &[ExecutionProvider],
        threads: Threads,
    ) -> Result<(Self, ExecutionProvider), String> {
        let loaded = runtime::load_session(env, model, providers, threads).map_err(|e| e.to_string())?;
        Ok((Self::new(loaded.session)?, loaded.provider))
    }

    /// Checks the graph: one float input `[N, 224, 224, 3]`, one output `[N, 2]`.
    fn new(session: Session) -> Result<Self, String> {
        let [input] = session.inputs() else {
            let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
            return Err(format!("open-nsfw takes one image input; this model takes {names:?}"));
        };
        let shape = match input.dtype() {
            ValueType::Tensor { ty: TensorElementType::Float32, shape, .. } => shape.to_vec(),
            other => return Err(format!("open-nsfw input {:?} is {other:?}; expected float32", input.name())),
        };
        let side = i64::from(SIDE);
        match shape.as_slice() {
            [_, h, w, 3] if [*h, *w].iter().all(|&d| d == side || d < 0) => {}
            _ => return Err(format!("open-nsfw input has shape {shape:?}; expected [N, {SIDE}, {SIDE}, 3]")),
        }
        let fixed_batch = usize::try_from(shape[0]).ok().filter(|&n| n > 0);
        let input = input.name().to_owned();
        let output = match session.outputs() {
            [output] => output.name().to_owned(),
            outputs => {
                let names: Vec<&str> = outputs.iter().map(|o| o.name()).collect();
                return Err(format!("open-nsfw has one output [N, 2]; this model has {names:?}"));
            }
        };
        Ok(Self { session, input, output, fixed_batch })
    }

    /// Scores each image, batched (chunks of at most `max_batch`), in order.
    pub fn score(&mut self, images: &[RgbImage], max_batch: usize) -> Result<Vec<ModerationScores>, PipelineError> {
        let batch = self.fixed_batch.unwrap_or(max_batch).clamp(1, max_batch.max(1));
        let mut scores = Vec::with_capacity(images.len());
        let mut tensor = Vec::new();
        for chunk in images.chunks(batch) {
            tensor.clear();
            for image in chunk {
                preprocess(image, &mut tensor);
            }
            let n = match self.fixed_batch {
                // A graph of fixed batch takes a full one: the rest is zero padding.
                Some(fixed) => {
                    tensor.resize(fixed * PIXELS * 3, 0.0);
                    fixed
                }
                None => chunk.len(),
            };
            let err = |e: ort::Error| PipelineError::Inference(e.to_string());
            let shape = [n, SIDE as usize, SIDE as usize, 3];
            let value = TensorRef::from_array_view((shape, &tensor[..])).map_err(err)?;
            let outputs = self.session.run(vec![(self.input.as_str(), value)]).map_err(err)?;
            let (out_shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(err)?;
            if **out_shape != [n as i64, 2] {
                return Err(PipelineError::Inference(format!(
                    "open-nsfw returned shape {out_shape:?} for {n} images; expected [{n}, 2]"
                )));
            }
            scores.extend(data.chunks_exact(2).take(chunk.len()).map(|p| ModerationScores { safe: p[0], nsfw: p[1] }));
        }
        Ok(scores)
    }
}

/// Appends `image` as the model sees it: 256×256 bilinear, the centre 224×224, BGR minus the means,
/// channels last.
fn preprocess(image: &RgbImage, out: &mut Vec<f32>) {
    let resized = imageops::resize(image, RESIZE, RESIZE, FilterType::Triangle);
    let offset = (RESIZE - SIDE) / 2;
    for y in offset..offset + SIDE {
        for x in offset..offset + SIDE {
            let [r, g, b] = resized.get_pixel(x, y).0;
            out.extend([f32::from(b) - MEAN_BGR[0], f32::from(g) - MEAN_BGR[1], f32::from(r) - MEAN_BGR[2]]);
        }
    }
}

#[cfg(test)]
mod tests;
