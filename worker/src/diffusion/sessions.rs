//! The three ONNX sessions of a diffusion export and how to feed them: which inputs each takes
//! (names, element types, static dimensions, read from the model at load) and running them.
//! Real exports differ: `input_ids` is int32 (diffusers) or int64 (optimum), `timestep` is float32
//! or int64 and `[1]`, `[batch]` or a scalar.

use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::embedding::PipelineError;

fn ort_err(e: ort::Error) -> PipelineError {
    PipelineError::Inference(e.to_string())
}

/// Element type and shape (`-1` = dynamic) of the input `name`, or an error listing the inputs.
fn input_type(session: &Session, model: &str, name: &str) -> Result<(TensorElementType, Vec<i64>), String> {
    let input = session.inputs().iter().find(|i| i.name() == name).ok_or_else(|| {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        format!("{model} has no input {name:?} (inputs: {names:?})")
    })?;
    match input.dtype() {
        ValueType::Tensor { ty, shape, .. } => Ok((*ty, shape.to_vec())),
        other => Err(format!("{model} input {name:?} is a {other:?}, not a tensor")),
    }
}

fn only_inputs(session: &Session, model: &str, allowed: &[&str]) -> Result<(), String> {
    match session.inputs().iter().find(|i| !allowed.contains(&i.name())) {
        Some(extra) => Err(format!(
            "{model} takes an input {:?} this pipeline does not provide (it feeds {allowed:?})",
            extra.name()
        )),
        None => Ok(()),
    }
}

fn require_f32(session: &Session, model: &str, name: &str) -> Result<Vec<i64>, String> {
    match input_type(session, model, name)? {
        (TensorElementType::Float32, shape) => Ok(shape),
        (ty, _) => Err(format!("{model} input {name:?} is {ty:?}; only float32 exports are supported")),
    }
}

/// The output called `preferred`, else the first output.
fn output_name(session: &Session, model: &str, preferred: &str) -> Result<String, String> {
    let outputs = session.outputs();
    outputs
        .iter()
        .find(|o| o.name() == preferred)
        .or_else(|| outputs.first())
        .map(|o| o.name().to_owned())
        .ok_or_else(|| format!("{model} has no output"))
}

/// A static dimension, if the model fixes it.
fn fixed(shape: &[i64], axis: usize) -> Option<usize> {
    shape.get(axis).and_then(|&d| usize::try_from(d).ok()).filter(|&d| d > 0)
}

pub struct TextEncoder {
    session: Session,
    ids_int64: bool,
    output: String,
    /// The sequence length, when the model fixes it.
    pub fixed_len: Option<usize>,
}

impl TextEncoder {
    pub fn new(session: Session) -> Result<Self, String> {
        const M: &str = "the text encoder";
        only_inputs(&session, M, &["input_ids"])?;
        let (ty, shape) = input_type(&session, M, "input_ids")?;
        let ids_int64 = match ty {
            TensorElementType::Int64 => true,
            TensorElementType::Int32 => false,
            other => return Err(format!("{M} input \"input_ids\" is {other:?}; expected int32 or int64")),
        };
        if shape.len() != 2 {
            return Err(format!("{M} input \"input_ids\" has shape {shape:?}; expected [batch, sequence]"));
        }
        let output = output_name(&session, M, "last_hidden_state")?;
        Ok(Self { session, ids_int64, output, fixed_len: fixed(&shape, 1) })
    }

    /// Hidden states `[seq, hidden]` (row-major) of one prompt's ids, and `hidden`.
    pub fn encode(&mut self, ids: &[u32]) -> Result<(Vec<f32>, usize), PipelineError> {
        let shape = vec![1, ids.len() as i64];
        let (wide, narrow): (Vec<i64>, Vec<i32>);
        let input: SessionInputValue = if self.ids_int64 {
            wide = ids.iter().map(|&i| i64::from(i)).collect();
            TensorRef::from_array_view((shape, &wide[..])).map_err(ort_err)?.into()
        } else {
            narrow = ids.iter().map(|&i| i as i32).collect();
            TensorRef::from_array_view((shape, &narrow[..])).map_err(ort_err)?.into()
        };
        let outputs = self.session.run(vec![("input_ids", input)]).map_err(ort_err)?;
        let (shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(ort_err)?;
        match **shape {
            [1, seq, hidden] if seq as usize == ids.len() && hidden > 0 => Ok((data.to_vec(), hidden as usize)),
            _ => Err(PipelineError::Inference(format!(
                "the text encoder returned shape {shape:?} for {} ids; expected [1, {}, hidden]",
                ids.len(),
                ids.len()
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimestepShape {
    Scalar,
    One,
    Batch,
}

pub struct Unet {
    session: Session,
    timestep_int64: bool,
    timestep_shape: TimestepShape,
    output: String,
    /// The batch size, when the model fixes it (1 rules out batching CFG's two halves).
    pub fixed_batch: Option<usize>,
    /// The latent channels, when the model fixes them.
    pub fixed_channels: Option<usize>,
}

impl Unet {
    pub fn new(session: Session) -> Result<Self, String> {
        const M: &str = "the UNet";
        only_inputs(&session, M, &["sample", "timestep", "encoder_hidden_states"])?;
        let sample = require_f32(&session, M, "sample")?;
        if sample.len() != 4 {
            return Err(format!(
                "{M} input \"sample\" has shape {sample:?}; expected [batch, channels, height, width]"
            ));
        }
        require_f32(&session, M, "encoder_hidden_states")?;
        let (ty, shape) = input_type(&session, M, "timestep")?;
        let timestep_int64 = match ty {
            TensorElementType::Int64 => true,
            TensorElementType::Float32 => false,
            other => return Err(format!("{M} input \"timestep\" is {other:?}; expected float32 or int64")),
        };
        let timestep_shape = match shape[..] {
            [] => TimestepShape::Scalar,
            [1] => TimestepShape::One,
            [_] => TimestepShape::Batch,
            _ => return Err(format!("{M} input \"timestep\" has shape {shape:?}; expected [], [1] or [batch]")),
        };
        let output = output_name(&session, M, "out_sample")?;
        Ok(Self {
            session,
            timestep_int64,
            timestep_shape,
            output,
            fixed_batch: fixed(&sample, 0),
            fixed_channels: fixed(&sample, 1),
        })
    }

    /// The UNet's output for `sample` `[batch, c, h, w]` at `timestep`, conditioned on
    /// `hidden` `[batch, seq, dim]`; same length as `sample`.
    pub fn run(
        &mut self,
        sample: &[f32],
        latent_shape: [usize; 3],
        timestep: f64,
        hidden: &[f32],
        hidden_shape: [usize; 2],
    ) -> Result<Vec<f32>, PipelineError> {
        let [c, h, w] = latent_shape;
        let batch = sample.len() / (c * h * w);
        let sample_shape = vec![batch as i64, c as i64, h as i64, w as i64];
        let hidden_dims = vec![batch as i64, hidden_shape[0] as i64, hidden_shape[1] as i64];
        let t_shape: Vec<i64> = match self.timestep_shape {
            TimestepShape::Scalar => vec![],
            TimestepShape::One => vec![1],
            TimestepShape::Batch => vec![batch as i64],
        };
        let t_len = if self.timestep_shape == TimestepShape::Batch { batch } else { 1 };
        // As numpy's cast in diffusers' ONNX pipeline: a fractional timestep is truncated.
        let (t_wide, t_float): (Vec<i64>, Vec<f32>);
        let t_input: SessionInputValue = if self.timestep_int64 {
            t_wide = vec![timestep as i64; t_len];
            TensorRef::from_array_view((t_shape, &t_wide[..])).map_err(ort_err)?.into()
        } else {
            t_float = vec![timestep as f32; t_len];
            TensorRef::from_array_view((t_shape, &t_float[..])).map_err(ort_err)?.into()
        };
        let feed: Vec<(&str, SessionInputValue)> = vec![
            ("sample", TensorRef::from_array_view((sample_shape, sample)).map_err(ort_err)?.into()),
            ("timestep", t_input),
            ("encoder_hidden_states", TensorRef::from_array_view((hidden_dims, hidden)).map_err(ort_err)?.into()),
        ];
        let outputs = self.session.run(feed).map_err(ort_err)?;
        let (shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(ort_err)?;
        if data.len() != sample.len() {
            return Err(PipelineError::Inference(format!(
                "the UNet returned shape {shape:?} for a sample of [{batch}, {c}, {h}, {w}]"
            )));
        }
        Ok(data.to_vec())
    }
}

pub struct VaeDecoder {
    session: Session,
    output: String,
}

impl VaeDecoder {
    pub fn new(session: Session) -> Result<Self, String> {
        const M: &str = "the VAE decoder";
        only_inputs(&session, M, &["latent_sample"])?;
        let shape = require_f32(&session, M, "latent_sample")?;
        if shape.len() != 4 {
            return Err(format!(
                "{M} input \"latent_sample\" has shape {shape:?}; expected [batch, channels, height, width]"
            ));
        }
        let output = output_name(&session, M, "sample")?;
        Ok(Self { session, output })
    }

    /// Decodes one latent `[c, h, w]` into an image `[3, height, width]` (values about −1..1).
    pub fn decode(&mut self, latent: &[f32], shape: [usize; 3], image: [usize; 2]) -> Result<Vec<f32>, PipelineError> {
        let dims = vec![1, shape[0] as i64, shape[1] as i64, shape[2] as i64];
        let outputs = self
            .session
            .run(vec![("latent_sample", TensorRef::from_array_view((dims, latent)).map_err(ort_err)?)])
            .map_err(ort_err)?;
        let (out_shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(ort_err)?;
        let expected = [1, 3, image[0] as i64, image[1] as i64];
        if **out_shape != expected {
            return Err(PipelineError::Inference(format!(
                "the VAE decoder returned shape {out_shape:?}; expected {expected:?}"
            )));
        }
        Ok(data.to_vec())
    }
}
