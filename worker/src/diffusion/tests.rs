//! The pipeline against tiny exports written by `kiln_common::testing::onnx`, in the real ONNX
//! Runtime: step reporting, cancellation, shapes, seeds, guidance, both samplers, the input
//! variants of real exports, and one run checked against a closed form computed here in f64.

use std::path::PathBuf;

use kiln_common::models::ExecutionProvider;
use kiln_common::testing::onnx::{
    TimestepInput, TinySdOptions, tiny_embedding, tiny_token_id, write_tiny_stable_diffusion,
};

use super::clip::tempdir;
use super::*;

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (set by `scripts/test.sh`), else the pinned build
/// in the cache folder, fetched when missing.
fn environment() -> &'static Environment {
    let dylib = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| {
        kiln_common::assets::ensure_onnxruntime(&kiln_common::config::default_cache_dir())
            .expect("ONNX Runtime: set ORT_DYLIB_PATH or let the test fetch it")
    });
    runtime::environment(&dylib).expect("ONNX Runtime loads")
}

fn load(opts: &TinySdOptions) -> (tempdir::Dir, DiffusionPipeline) {
    let dir = tempdir::Dir::new("diffusion");
    write_tiny_stable_diffusion(dir.path(), opts).expect("write the tiny export");
    let (pipeline, provider) = DiffusionPipeline::load(
        dir.path(),
        environment(),
        &[ExecutionProvider::Cpu],
        Threads { intra: 1, spin: false },
    )
    .expect("load the tiny export");
    assert_eq!(provider, ExecutionProvider::Cpu);
    (dir, pipeline)
}

fn request(steps: u32, scheduler: SchedulerKind, seed: u64) -> DiffusionRequest<'static> {
    DiffusionRequest {
        prompt: "a cat",
        negative_prompt: "",
        steps,
        guidance_scale: 7.5,
        scheduler,
        seed,
        width: 64,
        height: 48,
    }
}

fn image(p: &mut DiffusionPipeline, req: &DiffusionRequest) -> RgbImage {
    p.generate(req, &mut |_, _| true).expect("generate").expect("not cancelled")
}

#[test]
fn every_step_is_reported_and_the_image_has_the_requested_shape() {
    let (_dir, mut p) = load(&TinySdOptions::default());
    let mut seen = Vec::new();
    let img = p
        .generate(&request(5, SchedulerKind::Euler, 1), &mut |done, total| {
            seen.push((done, total));
            true
        })
        .expect("generate")
        .expect("not cancelled");
    assert_eq!(seen, [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]);
    // Guidance batches both halves into one UNet run per step.
    assert_eq!(p.unet_runs, 5);
    assert_eq!((img.width, img.height, img.pixels.len()), (64, 48, 64 * 48 * 3));
}

#[test]
fn returning_false_cancels_between_steps_without_decoding() {
    let (_dir, mut p) = load(&TinySdOptions::default());
    let mut calls = 0;
    let out = p
        .generate(&request(10, SchedulerKind::Ddim, 1), &mut |done, _| {
            calls += 1;
            done < 3
        })
        .expect("generate");
    assert!(out.is_none(), "a cancelled generation returns no image");
    assert_eq!((calls, p.unet_runs), (3, 3));
}

#[test]
fn the_seed_decides_the_image() {
    let (_dir, mut p) = load(&TinySdOptions::default());
    let a = image(&mut p, &request(3, SchedulerKind::Euler, 42));
    let b = image(&mut p, &request(3, SchedulerKind::Euler, 42));
    let c = image(&mut p, &request(3, SchedulerKind::Euler, 43));
    assert_eq!(a, b, "same seed, same pixels");
    assert_ne!(a.pixels, c.pixels, "another seed, another image");
}

#[test]
fn guidance_mixes_in_the_negative_prompt_only_when_on() {
    let (_dir, mut p) = load(&TinySdOptions::default());
    let with = |guidance_scale, negative_prompt| DiffusionRequest {
        guidance_scale,
        negative_prompt,
        ..request(3, SchedulerKind::Ddim, 7)
    };
    let guided = image(&mut p, &with(7.5, ""));
    let guided_neg = image(&mut p, &with(7.5, "dog"));
    assert_eq!((p.unet_runs, p.unet_rows), (6, 12), "with guidance, one UNet run of batch 2 per step");
    let plain = image(&mut p, &with(1.0, ""));
    let plain_neg = image(&mut p, &with(1.0, "dog"));
    assert_eq!((p.unet_runs, p.unet_rows), (12, 18), "without guidance, one UNet run of batch 1 per step");
    assert_ne!(guided.pixels, plain.pixels, "guidance changes the image");
    assert_ne!(guided.pixels, guided_neg.pixels, "with guidance the negative prompt counts");
    assert_eq!(plain, plain_neg, "without guidance the negative prompt is ignored");
}

#[test]
fn both_schedulers_produce_different_images() {
    let (_dir, mut p) = load(&TinySdOptions::default());
    let euler = image(&mut p, &request(4, SchedulerKind::Euler, 5));
    let ddim = image(&mut p, &request(4, SchedulerKind::Ddim, 5));
    // They differ through SD's set_alpha_to_one = false only: deterministic DDIM is Euler in
    // x/√ᾱ coordinates, so with the final ᾱ = 1 this linear toy UNet would give the same image.
    assert_ne!(euler.pixels, ddim.pixels);
}

#[test]
fn optimum_style_inputs_int64_ids_and_batched_int64_timestep() {
    let opts = TinySdOptions { input_ids_int64: true, timestep: TimestepInput::I64Batch, ..Default::default() };
    let (_dir, mut p) = load(&opts);
    let img = image(&mut p, &request(2, SchedulerKind::Euler, 1));
    assert_eq!(img.pixels.len(), 64 * 48 * 3);
    // Same arithmetic as the float32-timestep export at integer timesteps: same image.
    let (_dir2, mut reference) = load(&TinySdOptions::default());
    assert_eq!(img, image(&mut reference, &request(2, SchedulerKind::Euler, 1)));
}

#[test]
fn a_unet_fixed_at_batch_1_runs_the_two_halves_separately() {
    let (_dir, mut p) = load(&TinySdOptions { unet_batch: Some(1), ..Default::default() });
    let img = image(&mut p, &request(3, SchedulerKind::Ddim, 9));
    assert_eq!((p.unet_runs, p.unet_rows), (6, 6));
    let (_dir2, mut batched) = load(&TinySdOptions::default());
    assert_eq!(img, image(&mut batched, &request(3, SchedulerKind::Ddim, 9)));
}

#[test]
fn scalar_timestep_input() {
    let (_dir, mut p) = load(&TinySdOptions { timestep: TimestepInput::F32Scalar, ..Default::default() });
    assert_eq!(image(&mut p, &request(2, SchedulerKind::Ddim, 1)).pixels.len(), 64 * 48 * 3);
}

#[test]
fn a_static_sequence_length_is_taken_from_the_text_encoder() {
    // A 77-token feed would not fit this model's fixed 16.
    let (_dir, mut p) = load(&TinySdOptions { text_seq_len: Some(16), ..Default::default() });
    let long = "a photo of a cat and a dog and a cat and a dog and a cat and a dog and a cat";
    let req = DiffusionRequest { prompt: long, ..request(2, SchedulerKind::Ddim, 1) };
    assert_eq!(image(&mut p, &req).pixels.len(), 64 * 48 * 3);
}

#[test]
fn bad_requests_are_input_errors() {
    let (_dir, mut p) = load(&TinySdOptions::default());
    let cases = [
        DiffusionRequest { width: 60, ..request(2, SchedulerKind::Ddim, 1) },
        DiffusionRequest { height: 0, ..request(2, SchedulerKind::Ddim, 1) },
        DiffusionRequest { width: MAX_SIDE + 8, ..request(2, SchedulerKind::Ddim, 1) },
        request(0, SchedulerKind::Euler, 1),
        request(MAX_STEPS + 1, SchedulerKind::Euler, 1),
        DiffusionRequest { guidance_scale: f32::NAN, ..request(2, SchedulerKind::Ddim, 1) },
    ];
    for req in &cases {
        match p.generate(req, &mut |_, _| true) {
            Err(PipelineError::Input(_)) => {}
            Err(other) => panic!("{req:?}: expected an input error, got {other:?}"),
            Ok(_) => panic!("{req:?}: accepted"),
        }
    }
    assert_eq!(p.unet_runs, 0, "nothing runs for a bad request");
}

#[test]
fn load_names_the_missing_part_and_refuses_unsupported_schedulers() {
    let dir = tempdir::Dir::new("diffusion-broken");
    write_tiny_stable_diffusion(dir.path(), &TinySdOptions::default()).expect("write the tiny export");
    std::fs::remove_file(dir.path().join("unet/model.onnx")).expect("remove the UNet");
    let threads = Threads { intra: 1, spin: false };
    let err = DiffusionPipeline::load(dir.path(), environment(), &[ExecutionProvider::Cpu], threads)
        .err()
        .expect("no UNet, no pipeline");
    assert!(err.contains("unet"), "{err}");

    let opts = TinySdOptions { scheduler_config: Some(r#"{"use_karras_sigmas": true}"#.into()), ..Default::default() };
    let dir = tempdir::Dir::new("diffusion-karras");
    write_tiny_stable_diffusion(dir.path(), &opts).expect("write the tiny export");
    let err = DiffusionPipeline::load(dir.path(), environment(), &[ExecutionProvider::Cpu], threads)
        .err()
        .expect("karras sigmas are refused");
    assert!(err.contains("use_karras_sigmas"), "{err}");
}

// ---- closed form -------------------------------------------------------------------------------

/// Mean of the tiny text encoder's output over tokens and features for `ids`.
fn mean_hidden(ids: &[u32], hidden: usize) -> f64 {
    let sum: f64 = ids.iter().flat_map(|&id| (0..hidden).map(move |h| f64::from(tiny_embedding(id as usize, h)))).sum();
    sum / (ids.len() * hidden) as f64
}

fn ids(words: &[&str]) -> Vec<u32> {
    let token = |t: &str| tiny_token_id(t).unwrap_or_else(|| panic!("{t} in the tiny vocab"));
    let mut ids: Vec<u32> = std::iter::once("<|startoftext|>").chain(words.iter().copied()).map(token).collect();
    ids.resize(77, token("<|endoftext|>"));
    ids
}

/// The four-step schedules of SD 1.x's config, from `reference.py`.
const TIMESTEPS_4: [f64; 4] = [751.0, 501.0, 251.0, 1.0];
const DDIM_ALPHA_4: [f64; 4] = [0.05571902929837482, 0.2749990668501319, 0.6721514702792801, 0.9982960278384514];
const DDIM_ALPHA_PREV_4: [f64; 4] = [0.2749990668501319, 0.6721514702792801, 0.9982960278384514, 0.99915];
const EULER_SIGMAS_4: [f64; 5] = [4.116696479276065, 1.623692081515863, 0.6983980911630334, 0.04131441199678309, 0.0];
const EULER_INIT_SIGMA_4: f64 = 4.236412385791066;

/// Expected final latents of a 4-step guided run on the tiny export, whose UNet is linear:
/// ε = a·x_in + b·m + c·t with m the guided mix of the prompts' mean hidden states.
fn expected_latents(opts: &TinySdOptions, kind: SchedulerKind, seed: u64, guidance: f64, n: usize) -> Vec<f64> {
    let (a, b, c) = (f64::from(opts.unet.0), f64::from(opts.unet.1), f64::from(opts.unet.2));
    let m_cond = mean_hidden(&ids(&["a</w>", "cat</w>"]), opts.hidden);
    let m_uncond = mean_hidden(&ids(&[]), opts.hidden);
    let m = m_uncond + guidance * (m_cond - m_uncond);
    let init = if kind == SchedulerKind::Euler { EULER_INIT_SIGMA_4 } else { 1.0 };
    let mut noise = crate::noise::Noise::new(seed);
    (0..n)
        .map(|_| {
            let mut x = f64::from((noise.gaussian() * init) as f32);
            for (i, &t) in TIMESTEPS_4.iter().enumerate() {
                match kind {
                    SchedulerKind::Ddim => {
                        let (at, ap) = (DDIM_ALPHA_4[i], DDIM_ALPHA_PREV_4[i]);
                        let eps = a * x + b * m + c * t;
                        let x0 = (x - (1.0 - at).sqrt() * eps) / at.sqrt();
                        x = ap.sqrt() * x0 + (1.0 - ap).sqrt() * eps;
                    }
                    SchedulerKind::Euler => {
                        let (s, next) = (EULER_SIGMAS_4[i], EULER_SIGMAS_4[i + 1]);
                        let eps = a * x / (s * s + 1.0).sqrt() + b * m + c * t;
                        // x + (x − x₀)/σ·dt with x₀ = x − σ·ε
                        x += eps * (next - s);
                    }
                }
            }
            x
        })
        .collect()
}

fn check_closed_form(kind: SchedulerKind) {
    let opts = TinySdOptions::default();
    let (_dir, mut p) = load(&opts);
    let req = request(4, kind, 11);
    let latents = p.denoise(&req, &mut |_, _| true).expect("denoise").expect("not cancelled");
    let (lh, lw) = (48 / 8, 64 / 8);
    let expected = expected_latents(&opts, kind, 11, f64::from(req.guidance_scale), 4 * lh * lw);
    let peak = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (&got, &want)) in latents.iter().zip(&expected).enumerate() {
        assert!((f64::from(got) - want).abs() <= 1e-4 * peak, "{kind:?} latent {i}: {got} vs closed form {want}");
    }
    assert_eq!(latents.len(), expected.len());

    let img = p.decode(&latents, &req).expect("decode");
    let z: Vec<f64> = expected.iter().map(|x| x / f64::from(opts.scaling_factor)).collect();
    let mut inside = 0;
    for y in 0..48 {
        for x in 0..64 {
            for ch in 0..3 {
                let v: f64 = (0..4)
                    .map(|k| f64::from(opts.vae_weight(k, ch, y % 8, x % 8)) * z[(k * lh + y / 8) * lw + x / 8])
                    .sum::<f64>()
                    + f64::from(opts.vae_bias[ch]);
                let unit = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                inside += usize::from(unit > 0.0 && unit < 1.0);
                let exact = unit * 255.0;
                let got = f64::from(img.pixels[(y * 64 + x) * 3 + ch]);
                // f32 inference moves a value by far less than 0.05 of a level: exact, except
                // next to a rounding boundary.
                let tolerance = if (exact.fract() - 0.5).abs() < 0.05 { 1.0 } else { 0.0 };
                assert!(
                    (got - exact.round()).abs() <= tolerance,
                    "{kind:?} pixel ({x}, {y}) channel {ch}: {got} vs closed form {exact}"
                );
            }
        }
    }
    // The comparison means something only if most values are not clamped.
    assert!(inside > 64 * 48 * 3 / 2, "{kind:?}: only {inside} values inside (0, 255)");
}

#[test]
fn ddim_run_matches_the_closed_form() {
    check_closed_form(SchedulerKind::Ddim);
}

#[test]
fn euler_run_matches_the_closed_form() {
    check_closed_form(SchedulerKind::Euler);
}
