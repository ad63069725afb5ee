//! open-nsfw on the real model: benign generated images score as safe, scores are a distribution,
//! and batching does not change them.

use std::path::PathBuf;
use std::time::Instant;

use kiln_proto::Colormap;

use super::*;
use crate::noise::Noise;
use crate::render::Field;

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (set by `scripts/test.sh`), else the pinned build
/// in the cache folder, fetched when missing.
fn environment() -> &'static Environment {
    let dylib = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| {
        kiln_common::assets::ensure_onnxruntime(&kiln_common::config::default_cache_dir())
            .expect("ONNX Runtime: set ORT_DYLIB_PATH or let the test fetch it")
    });
    runtime::environment(&dylib).expect("ONNX Runtime loads")
}

fn pipeline() -> ModerationPipeline {
    let model = kiln_common::config::default_cache_dir().join("models/open-nsfw/0.1.0/open-nsfw.onnx");
    assert!(model.is_file(), "{} is missing: run `kiln fetch open-nsfw` (models/open-nsfw)", model.display());
    let threads = Threads { intra: runtime::default_threads(), spin: false };
    let (p, provider) =
        ModerationPipeline::load(&model, environment(), &[ExecutionProvider::Cpu], threads).expect("open-nsfw loads");
    assert_eq!(provider, ExecutionProvider::Cpu);
    assert_eq!((p.input.as_str(), p.fixed_batch), ("input:0", None), "output {:?}", p.output);
    p
}

/// Benign images of several kinds and sizes, with names.
fn images() -> Vec<(&'static str, RgbImage)> {
    let gradient = RgbImage::from_fn(320, 200, |x, y| image::Rgb([(x * 255 / 319) as u8, (y * 255 / 199) as u8, 128]));
    let mut noise = Noise::new(11);
    let coarse = Field { width: 12, height: 12, values: noise.fill(144, 1.0) };
    let terrain = image::load_from_memory(&coarse.resample(384, 384).png(Colormap::Terrain)).expect("PNG").to_rgb8();
    let flat = RgbImage::from_pixel(100, 150, image::Rgb([90, 140, 200]));
    let mut raw = vec![0u8; 256 * 256 * 3];
    raw.iter_mut().for_each(|b| *b = (noise.gaussian() * 60.0 + 128.0).clamp(0.0, 255.0) as u8);
    let random = RgbImage::from_raw(256, 256, raw).expect("size");
    let tiny = RgbImage::from_pixel(1, 1, image::Rgb([255, 255, 255]));
    let wide = RgbImage::from_fn(1000, 120, |x, _| image::Rgb([0, (x % 256) as u8, 60]));
    vec![
        ("gradient", gradient),
        ("terrain", terrain),
        ("flat", flat),
        ("noise", random),
        ("1×1 white", tiny),
        ("wide", wide),
    ]
}

#[test]
fn benign_images_score_safe_and_batches_agree_with_single_runs() {
    let mut p = pipeline();
    let named = images();
    let imgs: Vec<RgbImage> = named.iter().map(|(_, i)| i.clone()).collect();
    let single: Vec<ModerationScores> =
        imgs.iter().flat_map(|i| p.score(std::slice::from_ref(i), 1).expect("scores")).collect();
    for ((name, _), s) in named.iter().zip(&single) {
        eprintln!("{name}: safe {:.5}, nsfw {:.5}", s.safe, s.nsfw);
        assert!((s.safe + s.nsfw - 1.0).abs() < 1e-4, "{name}: {s:?} is not a distribution");
        assert!(s.nsfw < 0.8, "{name}: nsfw {}", s.nsfw);
    }
    for max_batch in [8, 4, 3] {
        let batched = p.score(&imgs, max_batch).expect("scores");
        assert_eq!(batched.len(), imgs.len());
        for ((name, _), (a, b)) in named.iter().zip(single.iter().zip(&batched)) {
            assert!(
                (a.nsfw - b.nsfw).abs() < 1e-4 && (a.safe - b.safe).abs() < 1e-4,
                "{name} at batch {max_batch}: {a:?} vs {b:?}"
            );
        }
    }
    assert_eq!(p.score(&[], 8).expect("nothing to score"), vec![]);
}

#[test]
fn time_per_image_at_batch_1_and_8() {
    let mut p = pipeline();
    let imgs: Vec<RgbImage> = images().into_iter().map(|(_, i)| i).cycle().take(8).collect();
    p.score(&imgs[..1], 1).expect("warm-up");
    let started = Instant::now();
    for i in &imgs {
        p.score(std::slice::from_ref(i), 1).expect("scores");
    }
    let one = started.elapsed().as_secs_f64() * 1e3 / 8.0;
    let started = Instant::now();
    p.score(&imgs, 8).expect("scores");
    let eight = started.elapsed().as_secs_f64() * 1e3 / 8.0;
    let started = Instant::now();
    let mut buf = Vec::new();
    imgs.iter().for_each(|i| preprocess(i, &mut buf));
    let prep = started.elapsed().as_secs_f64() * 1e3 / 8.0;
    eprintln!("output {:?}; preprocessing alone {prep:.1} ms per image (this build's optimisation level)", p.output);
    eprintln!(
        "open-nsfw on CPU ({} threads): {one:.1} ms per image at batch 1, {eight:.1} ms at batch 8",
        runtime::default_threads()
    );
}
