//! The text-to-image diffusion pipeline for Stable-Diffusion-style ONNX exports (the folder layout
//! of diffusers' and optimum's exports): tokenize the prompts, encode them, denoise seeded latents
//! with the UNet under a DDIM or Euler schedule (classifier-free guidance batched into one UNet run),
//! decode with the VAE, and return RGB8 pixels.

mod clip;
mod scheduler;
mod sessions;
#[cfg(test)]
mod tests;

use std::path::Path;

use kiln_common::models::ExecutionProvider;
use ort::environment::Environment;
use serde::Deserialize;

use crate::embedding::PipelineError;
use crate::noise::Noise;
use crate::runtime::{self, Threads};
use scheduler::{Schedule, SchedulerConfig};
use sessions::{TextEncoder, Unet, VaeDecoder};

/// The sampler that walks the noise schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Euler,
    Ddim,
}

/// One image to generate.
#[derive(Debug, Clone)]
pub struct DiffusionRequest<'a> {
    pub prompt: &'a str,
    /// `""` = unconditional.
    pub negative_prompt: &'a str,
    /// 1..=150.
    pub steps: u32,
    /// Classifier-free guidance; `<= 1.0` runs the UNet once per step on the prompt alone.
    pub guidance_scale: f32,
    pub scheduler: SchedulerKind,
    pub seed: u64,
    /// Multiples of the VAE's factor (8 for Stable Diffusion).
    pub width: u32,
    pub height: u32,
}

/// RGB8, row-major, `width × height × 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

pub const MAX_STEPS: u32 = 150;
/// Larger images would take minutes per step on a CPU and gigabytes in the VAE.
pub const MAX_SIDE: u32 = 2048;
/// The CLIP text encoder's sequence length, when the model leaves it dynamic.
const DEFAULT_MAX_TOKENS: usize = 77;

/// `vae_decoder/config.json` (the VAE's diffusers config).
#[derive(Debug, Deserialize)]
struct VaeConfig {
    #[serde(default = "default_scaling")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default)]
    block_out_channels: Option<Vec<u64>>,
    #[serde(default)]
    latent_channels: Option<usize>,
}

fn default_scaling() -> f64 {
    0.18215
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self { scaling_factor: default_scaling(), shift_factor: None, block_out_channels: None, latent_channels: None }
    }
}

/// `unet/config.json`, when the export ships one.
#[derive(Debug, Default, Deserialize)]
struct UnetConfig {
    #[serde(default)]
    in_channels: Option<usize>,
}

pub struct DiffusionPipeline {
    tokenizer: clip::PromptTokenizer,
    text_encoder: TextEncoder,
    unet: Unet,
    vae: VaeDecoder,
    scheduler: SchedulerConfig,
    latent_channels: usize,
    /// Image pixels per latent pixel along each side.
    vae_factor: u32,
    scaling_factor: f64,
    shift_factor: f64,
    /// UNet session runs, and the batch rows they ran, since load: what the tests count.
    unet_runs: u64,
    unet_rows: u64,
}

impl DiffusionPipeline {
    /// Loads from a folder in the layout diffusers/optimum ONNX exports use: `model_index.json`
    /// (optional), `text_encoder/model.onnx`, `unet/model.onnx`, `vae_decoder/model.onnx`,
    /// `tokenizer/` (`tokenizer.json`, or `vocab.json` + `merges.txt` = CLIP BPE),
    /// `scheduler/scheduler_config.json` (optional; defaults = SD 1.x), `vae_decoder/config.json`
    /// (optional; `scaling_factor` default 0.18215). Returns the provider the UNet runs on.
    pub fn load(
        dir: &Path,
        env: &Environment,
        providers: &[ExecutionProvider],
        threads: Threads,
    ) -> Result<(Self, ExecutionProvider), String> {
        let index = dir.join("model_index.json");
        if let Some(text) = read_optional(&index)? {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                .map_err(|e| format!("{}: {e}", index.display()))?;
        }
        let open = |part: &str| {
            let path = dir.join(part).join("model.onnx");
            if !path.is_file() {
                return Err(format!("{} is missing: not a diffusion export", path.display()));
            }
            runtime::load_session(env, &path, providers, threads).map_err(|e| e.to_string())
        };
        let (text, unet, vae) = (open("text_encoder")?, open("unet")?, open("vae_decoder")?);
        let provider = unet.provider;
        if text.provider != provider || vae.provider != provider {
            tracing::warn!(dir = %dir.display(), text_encoder = ?text.provider, unet = ?unet.provider,
                vae_decoder = ?vae.provider, "the diffusion sessions run on different execution providers");
        }
        let text_encoder = TextEncoder::new(text.session)?;
        let unet = Unet::new(unet.session)?;
        let vae = VaeDecoder::new(vae.session)?;

        let max_len = text_encoder.fixed_len.unwrap_or(DEFAULT_MAX_TOKENS);
        let tokenizer_dir = dir.join("tokenizer");
        let tokenizer = clip::PromptTokenizer::load(&tokenizer_dir, max_len)
            .map_err(|e| format!("tokenizer in {}: {e}", tokenizer_dir.display()))?;
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = match read_optional(&scheduler_path)? {
            Some(text) => {
                SchedulerConfig::from_json(&text).map_err(|e| format!("{}: {e}", scheduler_path.display()))?
            }
            None => SchedulerConfig::default(),
        };
        let vae_config: VaeConfig = read_json(&dir.join("vae_decoder").join("config.json"))?.unwrap_or_default();
        let unet_config: UnetConfig = read_json(&dir.join("unet").join("config.json"))?.unwrap_or_default();
        // diffusers' `vae_scale_factor`: one halving per down block after the first.
        let vae_factor = match &vae_config.block_out_channels {
            Some(blocks) if !blocks.is_empty() && blocks.len() <= 6 => 1u32 << (blocks.len() - 1),
            Some(blocks) => {
                return Err(format!("vae_decoder/config.json: block_out_channels {blocks:?} is not a VAE's"));
            }
            None => 8,
        };
        let latent_channels =
            unet.fixed_channels.or(unet_config.in_channels).or(vae_config.latent_channels).unwrap_or(4);
        if !(vae_config.scaling_factor.is_finite() && vae_config.scaling_factor > 0.0) {
            return Err(format!(
                "vae_decoder/config.json: scaling_factor {} must be positive",
                vae_config.scaling_factor
            ));
        }
        let pipeline = Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            latent_channels,
            vae_factor,
            scaling_factor: vae_config.scaling_factor,
            shift_factor: vae_config.shift_factor.unwrap_or(0.0),
            unet_runs: 0,
            unet_rows: 0,
        };
        Ok((pipeline, provider))
    }

    /// One image. `on_step(done, total)` is called after each denoising step; returning false
    /// cancels: generate then returns `Ok(None)` without decoding.
    pub fn generate(
        &mut self,
        req: &DiffusionRequest,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Option<RgbImage>, PipelineError> {
        let Some(latents) = self.denoise(req, on_step)? else { return Ok(None) };
        self.decode(&latents, req).map(Some)
    }

    /// The latent grid `[channels, height, width]` for a request, after checking the request.
    fn latent_shape(&self, req: &DiffusionRequest) -> Result<[usize; 3], PipelineError> {
        let bad = |m: String| Err(PipelineError::Input(m));
        if !(1..=MAX_STEPS).contains(&req.steps) {
            return bad(format!("steps must be in 1..={MAX_STEPS}, not {}", req.steps));
        }
        if !req.guidance_scale.is_finite() {
            return bad(format!("guidance_scale must be a finite number, not {}", req.guidance_scale));
        }
        let f = self.vae_factor;
        for (name, side) in [("width", req.width), ("height", req.height)] {
            if side == 0 || side > MAX_SIDE || side % f != 0 {
                return bad(format!("{name} must be a positive multiple of {f} up to {MAX_SIDE}, not {side}"));
            }
        }
        Ok([self.latent_channels, (req.height / f) as usize, (req.width / f) as usize])
    }

    /// The prompt's hidden states (row-major) and their shape `[seq, dim]`.
    fn encode_prompt(&mut self, text: &str) -> Result<(Vec<f32>, [usize; 2]), PipelineError> {
        let ids = self.tokenizer.encode(text).map_err(PipelineError::Input)?;
        let (hidden, dim) = self.text_encoder.encode(&ids)?;
        Ok((hidden, [ids.len(), dim]))
    }

    /// Runs the denoising loop: the final latents, or `None` when `on_step` cancelled.
    fn denoise(
        &mut self,
        req: &DiffusionRequest,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Option<Vec<f32>>, PipelineError> {
        let shape = self.latent_shape(req)?;
        let schedule =
            Schedule::new(&self.scheduler, req.scheduler, req.steps as usize).map_err(PipelineError::Input)?;
        let guided = req.guidance_scale > 1.0;
        let (cond, hidden_shape) = self.encode_prompt(req.prompt)?;
        let uncond = if guided {
            let (uncond, uncond_shape) = self.encode_prompt(req.negative_prompt)?;
            if uncond_shape != hidden_shape {
                return Err(PipelineError::Inference(format!(
                    "the text encoder gave {uncond_shape:?} for the negative prompt but {hidden_shape:?} for the prompt"
                )));
            }
            Some(uncond)
        } else {
            None
        };
        // Both halves in one UNet run, unless the model fixes its batch at 1.
        let batched = guided && self.unet.fixed_batch != Some(1);
        let both_hidden = match &uncond {
            Some(u) if batched => [u.as_slice(), cond.as_slice()].concat(),
            _ => Vec::new(),
        };

        let n: usize = shape.iter().product();
        let mut latents = Noise::new(req.seed).fill(n, schedule.init_noise_sigma());
        let total = req.steps;
        for (i, &t) in schedule.timesteps().iter().enumerate() {
            let scale = schedule.input_scale(i) as f32;
            let input: Vec<f32> = latents.iter().map(|x| x * scale).collect();
            let output = match &uncond {
                None => self.run_unet(&input, shape, t, &cond, hidden_shape)?,
                Some(_) if batched => {
                    let doubled = [input.as_slice(), input.as_slice()].concat();
                    let out = self.run_unet(&doubled, shape, t, &both_hidden, hidden_shape)?;
                    guide(&out[..n], &out[n..], req.guidance_scale)
                }
                Some(u) => {
                    let out_u = self.run_unet(&input, shape, t, u, hidden_shape)?;
                    let out_c = self.run_unet(&input, shape, t, &cond, hidden_shape)?;
                    guide(&out_u, &out_c, req.guidance_scale)
                }
            };
            schedule.step(i, &output, &mut latents);
            if !on_step(i as u32 + 1, total) {
                return Ok(None);
            }
        }
        Ok(Some(latents))
    }

    fn run_unet(
        &mut self,
        sample: &[f32],
        shape: [usize; 3],
        t: f64,
        hidden: &[f32],
        hidden_shape: [usize; 2],
    ) -> Result<Vec<f32>, PipelineError> {
        self.unet_runs += 1;
        self.unet_rows += (sample.len() / shape.iter().product::<usize>()) as u64;
        self.unet.run(sample, shape, t, hidden, hidden_shape)
    }

    fn decode(&mut self, latents: &[f32], req: &DiffusionRequest) -> Result<RgbImage, PipelineError> {
        let shape = self.latent_shape(req)?;
        let (scale, shift) = (self.scaling_factor, self.shift_factor);
        let z: Vec<f32> = latents.iter().map(|&x| (f64::from(x) / scale + shift) as f32).collect();
        let (h, w) = (req.height as usize, req.width as usize);
        let planes = self.vae.decode(&z, shape, [h, w])?;
        Ok(RgbImage { width: req.width, height: req.height, pixels: to_rgb8(&planes, h * w) })
    }
}

/// Classifier-free guidance: `u + g·(c − u)`.
fn guide(uncond: &[f32], cond: &[f32], scale: f32) -> Vec<f32> {
    uncond.iter().zip(cond).map(|(&u, &c)| u + scale * (c - u)).collect()
}

/// Planar `[3, h·w]` values in about −1..1 → interleaved RGB8: `round(clamp(x/2 + 0.5, 0, 1)·255)`.
fn to_rgb8(planes: &[f32], pixels: usize) -> Vec<u8> {
    let (r, rest) = planes.split_at(pixels);
    let (g, b) = rest.split_at(pixels);
    let byte = |x: f32| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
    r.iter().zip(g).zip(b).flat_map(|((&r, &g), &b)| [byte(r), byte(g), byte(b)]).collect()
}

fn read_optional(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    read_optional(path)?
        .map(|text| serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())))
        .transpose()
}
