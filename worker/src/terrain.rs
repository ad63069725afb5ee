//! The one-step consistency image pipeline (the terrain model): seeded noise at `sigma` in, the
//! denoised field out, turned into heights (`h = s·sinh(u·asinh(max/s))`, minimum subtracted).
//! One image per model run, so every image of a seed is the same whatever the job's `count` and
//! batch-mates, and progress and cancellation work between images.

use kiln_common::models::ConsistencySpec;
use ndarray::{Array1, Array4};
use ort::session::Session;
use ort::value::TensorRef;

use crate::embedding::PipelineError;
use crate::noise::Noise;
use crate::render::Field;

pub struct TerrainPipeline {
    session: Session,
    spec: ConsistencySpec,
    output: String,
}

impl TerrainPipeline {
    pub fn new(session: Session, spec: ConsistencySpec) -> Result<Self, String> {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["noisy", "sigma", "difficulty"] {
            if !names.contains(&required) {
                return Err(format!("model has no input {required:?} (inputs: {names:?})"));
            }
        }
        let output = session.outputs().first().map(|o| o.name().to_owned()).ok_or("model has no output")?;
        Ok(Self { session, spec, output })
    }

    /// The height field of one image: `seed` draws the noise, `difficulty` is 1..=100.
    pub fn heights(&mut self, seed: u64, difficulty: u32) -> Result<Field, PipelineError> {
        let n = self.spec.native_size as usize;
        let sigma = self.spec.sigma;
        let noise = Noise::new(seed).fill(n * n, f64::from(sigma));
        let noisy = Array4::from_shape_vec((1, 1, n, n), noise).expect("n·n samples");
        let sigma = Array1::from_elem(1, sigma);
        let difficulty = Array1::from_elem(1, (difficulty.clamp(1, 100) - 1) as f32 / 99.0);
        let err = |e: ort::Error| PipelineError::Inference(e.to_string());
        let outputs = self
            .session
            .run(ort::inputs![
                "noisy" => TensorRef::from_array_view(&noisy).map_err(err)?,
                "sigma" => TensorRef::from_array_view(&sigma).map_err(err)?,
                "difficulty" => TensorRef::from_array_view(&difficulty).map_err(err)?,
            ])
            .map_err(err)?;
        let (shape, denoised) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(err)?;
        if shape.iter().product::<i64>() != (n * n) as i64 {
            return Err(PipelineError::Inference(format!("unexpected output shape {shape:?}, wanted [1,1,{n},{n}]")));
        }
        Ok(Field { width: n, height: n, values: to_heights(denoised, &self.spec) })
    }
}

/// The model's field (about −1..1) to heights above the lowest point.
fn to_heights(v: &[f32], spec: &ConsistencySpec) -> Vec<f32> {
    let (s, top) = (spec.height_scale, spec.max_height);
    let k = (top / s).asinh();
    let h: Vec<f64> = v.iter().map(|&v| s * (((f64::from(v) + 1.0) / 2.0).clamp(0.0, 1.0) * k).sinh()).collect();
    let lo = h.iter().copied().fold(f64::INFINITY, f64::min);
    h.into_iter().map(|h| (h - lo) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn height_curve_matches_the_model_card() {
        let spec = ConsistencySpec::default();
        // v = 1 → u = 1 → h = max height; v = −1 → u = 0 → h = 0; the minimum is subtracted.
        let h = to_heights(&[-1.0, 1.0, 0.0, 3.0], &spec);
        assert_eq!(h[0], 0.0);
        assert!((f64::from(h[1]) - 22.168_640_136_718_75).abs() < 1e-4, "{}", h[1]);
        let mid = 0.1 * (0.5 * (22.168_640_136_718_75f64 / 0.1).asinh()).sinh();
        assert!((f64::from(h[2]) - mid).abs() < 1e-5, "{} vs {mid}", h[2]);
        assert_eq!(h[3], h[1], "clamped above 1");
    }
}
