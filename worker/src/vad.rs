//! The `speech-segments` task: silero VAD v6 run as the stream it was trained as (512 new samples
//! at 16 kHz per call, after the previous call's last 64, with the recurrent state carried from
//! each call to the next), and the probabilities turned into segments the way silero's
//! `get_speech_timestamps` does (hysteresis, minimum silence and speech, padding).

use std::path::Path;

use kiln_common::models::ExecutionProvider;
use kiln_proto::{SpeechSegment, SpeechSegmentsInput};
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::embedding::PipelineError;
use crate::runtime::{self, Threads};

/// The model's sample rate: audio is resampled to it before [`VadPipeline::segments`].
pub const RATE: u32 = 16_000;
/// New samples per call.
pub const CHUNK: usize = 512;
/// Samples of the previous call prepended to each call's input.
const CONTEXT: usize = 64;
/// The recurrent state's shape, `[2, batch, 128]`, for one stream.
const STATE_SHAPE: [usize; 3] = [2, 1, 128];
const STATE_LEN: usize = STATE_SHAPE[0] * STATE_SHAPE[1] * STATE_SHAPE[2];
/// Chunks between progress reports (and cancellation checks): about one second of audio.
const CHUNKS_PER_REPORT: usize = 32;
/// Speech ends below `threshold` minus this (silero's hysteresis).
const HYSTERESIS: f32 = 0.15;

/// How probabilities become segments, in seconds (see [`SpeechSegmentsInput`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadOptions {
    pub threshold: f32,
    pub min_speech_s: f32,
    pub min_silence_s: f32,
    pub pad_s: f32,
}

impl From<&SpeechSegmentsInput> for VadOptions {
    fn from(input: &SpeechSegmentsInput) -> Self {
        Self {
            threshold: input.threshold,
            min_speech_s: input.min_speech_s,
            min_silence_s: input.min_silence_s,
            pad_s: input.pad_s,
        }
    }
}

/// What one audio stream carries from a call to the next: the recurrent state and the last
/// [`CONTEXT`] samples; both zeros at the start.
#[derive(Debug, Clone)]
pub struct VadStream {
    state: Vec<f32>,
    context: [f32; CONTEXT],
}

impl Default for VadStream {
    fn default() -> Self {
        Self { state: vec![0.0; STATE_LEN], context: [0.0; CONTEXT] }
    }
}

/// One ONNX Runtime session of silero VAD.
pub struct VadPipeline {
    session: Session,
    probability: String,
    state_out: String,
    /// The model's input buffer, `[1, CONTEXT + CHUNK]`, reused between calls.
    input: Vec<f32>,
}

impl VadPipeline {
    pub fn load(
        model: &Path,
        env: &Environment,
        providers: &[ExecutionProvider],
        threads: Threads,
    ) -> Result<(Self, ExecutionProvider), String> {
        let loaded = runtime::load_session(env, model, providers, threads).map_err(|e| e.to_string())?;
        Ok((Self::new(loaded.session)?, loaded.provider))
    }

    /// Checks that the session is silero VAD's streaming graph: inputs `input` f32, `state` f32,
    /// `sr` int64; outputs a probability and `stateN`.
    fn new(session: Session) -> Result<Self, String> {
        let inputs: Vec<(String, Option<TensorElementType>)> = session
            .inputs()
            .iter()
            .map(|i| {
                let ty = match i.dtype() {
                    ValueType::Tensor { ty, .. } => Some(*ty),
                    _ => None,
                };
                (i.name().to_owned(), ty)
            })
            .collect();
        let mut wanted = [
            ("input", TensorElementType::Float32),
            ("state", TensorElementType::Float32),
            ("sr", TensorElementType::Int64),
        ];
        wanted.sort_by_key(|w| w.0);
        let mut found: Vec<(&str, Option<TensorElementType>)> = inputs.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        found.sort_by_key(|f| f.0);
        if found.len() != wanted.len() || found.iter().zip(&wanted).any(|(f, w)| f.0 != w.0 || f.1 != Some(w.1)) {
            return Err(format!(
                "not silero VAD's streaming graph: inputs {found:?}; expected input f32, state f32, sr int64"
            ));
        }
        let outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
        let state_out = outputs.iter().find(|n| n.as_str() == "stateN").cloned();
        let probability = outputs.iter().find(|n| n.as_str() != "stateN").cloned();
        match (probability, state_out) {
            (Some(probability), Some(state_out)) if outputs.len() == 2 => {
                Ok(Self { session, probability, state_out, input: vec![0.0; CONTEXT + CHUNK] })
            }
            _ => {
                Err(format!("not silero VAD's streaming graph: outputs {outputs:?}; expected a probability and stateN"))
            }
        }
    }

    /// The speech probability of the next `chunk` (at most [`CHUNK`] samples at 16 kHz; a shorter
    /// last chunk is zero-padded) of `stream`, advancing the stream.
    pub fn probability(&mut self, stream: &mut VadStream, chunk: &[f32]) -> Result<f32, PipelineError> {
        if chunk.len() > CHUNK {
            return Err(PipelineError::Input(format!("a VAD chunk is at most {CHUNK} samples, not {}", chunk.len())));
        }
        self.input[..CONTEXT].copy_from_slice(&stream.context);
        self.input[CONTEXT..CONTEXT + chunk.len()].copy_from_slice(chunk);
        self.input[CONTEXT + chunk.len()..].fill(0.0);
        let err = |e: ort::Error| PipelineError::Inference(e.to_string());
        let sr = [i64::from(RATE)];
        let feed: Vec<(&str, SessionInputValue)> = vec![
            ("input", TensorRef::from_array_view(([1usize, CONTEXT + CHUNK], &self.input[..])).map_err(err)?.into()),
            ("state", TensorRef::from_array_view((STATE_SHAPE, &stream.state[..])).map_err(err)?.into()),
            ("sr", TensorRef::from_array_view(([0usize; 0], &sr[..])).map_err(err)?.into()),
        ];
        let outputs = self.session.run(feed).map_err(err)?;
        let (_, p) = outputs[self.probability.as_str()].try_extract_tensor::<f32>().map_err(err)?;
        let (state_shape, state) = outputs[self.state_out.as_str()].try_extract_tensor::<f32>().map_err(err)?;
        if p.len() != 1 || state.len() != STATE_LEN {
            return Err(PipelineError::Inference(format!(
                "silero VAD returned {} probabilities and a state of shape {state_shape:?}; expected 1 and {STATE_SHAPE:?}",
                p.len()
            )));
        }
        stream.state.copy_from_slice(state);
        let tail = &self.input[CONTEXT + CHUNK - CONTEXT..];
        stream.context.copy_from_slice(tail);
        Ok(p[0])
    }

    /// Finds speech in `audio` (mono, 16 kHz). Calls `on_chunk(done_samples, total_samples)` every
    /// [`CHUNKS_PER_REPORT`] chunks (about a second of audio) and after the last, and stops
    /// (returning `Ok(None)`) as soon as it returns false.
    pub fn segments(
        &mut self,
        audio: &[f32],
        opts: &VadOptions,
        on_chunk: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Option<Vec<SpeechSegment>>, PipelineError> {
        let mut stream = VadStream::default();
        let mut segmenter = Segmenter::new(opts);
        let chunks = audio.len().div_ceil(CHUNK);
        for (i, chunk) in audio.chunks(CHUNK).enumerate() {
            let p = self.probability(&mut stream, chunk)?;
            segmenter.push(i * CHUNK, p);
            if ((i + 1) % CHUNKS_PER_REPORT == 0 || i + 1 == chunks)
                && !on_chunk(((i + 1) * CHUNK).min(audio.len()), audio.len())
            {
                return Ok(None);
            }
        }
        Ok(Some(segmenter.finish(audio.len())))
    }
}

/// silero's `get_speech_timestamps` over a stream of chunk probabilities (without its splitting of
/// over-long speech), in samples at [`RATE`].
struct Segmenter {
    threshold: f32,
    neg_threshold: f32,
    min_speech: usize,
    min_silence: usize,
    pad: usize,
    /// The start of the speech in progress, if any.
    start: Option<usize>,
    /// Where the silence that may end the speech in progress began.
    silence_from: Option<usize>,
    speeches: Vec<(usize, usize)>,
}

impl Segmenter {
    fn new(opts: &VadOptions) -> Self {
        let samples = |s: f32| (f64::from(s.max(0.0)) * f64::from(RATE)).round() as usize;
        Self {
            threshold: opts.threshold,
            neg_threshold: (opts.threshold - HYSTERESIS).max(0.01),
            min_speech: samples(opts.min_speech_s),
            min_silence: samples(opts.min_silence_s),
            pad: samples(opts.pad_s),
            start: None,
            silence_from: None,
            speeches: Vec::new(),
        }
    }

    /// The probability of the chunk starting at sample `at`.
    fn push(&mut self, at: usize, p: f32) {
        if p >= self.threshold {
            self.silence_from = None;
            if self.start.is_none() {
                self.start = Some(at);
            }
            return;
        }
        let Some(start) = self.start else { return };
        if p < self.neg_threshold {
            let from = *self.silence_from.get_or_insert(at);
            if at - from >= self.min_silence {
                if from - start > self.min_speech {
                    self.speeches.push((start, from));
                }
                self.start = None;
                self.silence_from = None;
            }
        }
    }

    /// The segments of audio `len` samples long, each widened by the padding (halfway into a gap
    /// narrower than two paddings), in seconds.
    fn finish(mut self, len: usize) -> Vec<SpeechSegment> {
        if let Some(start) = self.start.take()
            && len - start > self.min_speech
        {
            self.speeches.push((start, len));
        }
        let mut s = self.speeches;
        let n = s.len();
        for i in 0..n {
            if i == 0 {
                s[i].0 = s[i].0.saturating_sub(self.pad);
            }
            if i + 1 < n {
                let gap = s[i + 1].0 - s[i].1;
                let widen = if gap < 2 * self.pad { gap / 2 } else { self.pad };
                s[i].1 += widen;
                s[i + 1].0 = s[i + 1].0.saturating_sub(widen);
            } else {
                s[i].1 = (s[i].1 + self.pad).min(len);
            }
        }
        let secs = |x: usize| x as f64 / f64::from(RATE);
        s.into_iter().map(|(a, b)| SpeechSegment { start_s: secs(a), end_s: secs(b) }).collect()
    }
}

#[cfg(test)]
mod tests;
