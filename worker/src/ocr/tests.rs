//! The pipeline with the real PP-OCRv4 models on text rendered by
//! `kiln_common::testing::media`: exact read-back at several sizes, two lines in order, text
//! upside down, blank and degenerate images, and batching that changes nothing.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use image::{Rgb, RgbImage};
use kiln_common::models::ModelRepository;
use kiln_common::testing::media::{TextLayout, render_text};

use super::*;

const LINE_1: &str = "Hello ONNX Runtime 2026";
const LINE_2: &str = "Kiln reads 42 lines";

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (set by `scripts/test.sh`), else the pinned build
/// in the cache folder, fetched when missing.
fn environment(cache: &Path) -> &'static Environment {
    let dylib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| kiln_common::assets::ensure_onnxruntime(cache).expect("ONNX Runtime"));
    runtime::environment(&dylib).expect("ONNX Runtime loads")
}

/// One pipeline for the module's tests (loading three sessions per test would dominate), taken
/// in turn: the tests then also do not fight over the machine's cores.
fn pipeline() -> MutexGuard<'static, OcrPipeline> {
    static PIPELINE: OnceLock<Mutex<OcrPipeline>> = OnceLock::new();
    let p = PIPELINE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo = ModelRepository::load(&root.join("models")).expect("model repository");
        let spec = repo.get("ppocr-v4").expect("the OCR model").clone();
        let cache = kiln_common::config::default_cache_dir();
        if let Some(source) = &spec.source {
            kiln_common::assets::ensure(source, &spec.dir(&cache)).expect("model files");
        }
        let threads = Threads { intra: runtime::default_threads(), spin: false };
        let (p, provider) = OcrPipeline::load(&spec, &cache, environment(&cache), threads).expect("load PP-OCRv4");
        eprintln!("PP-OCRv4 on {provider:?}");
        Mutex::new(p)
    });
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_one(img: &RgbImage) -> OcrOutput {
    let mut out = pipeline().read(std::slice::from_ref(img)).expect("read");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn texts(out: &OcrOutput) -> Vec<&str> {
    out.lines.iter().map(|l| l.text.as_str()).collect()
}

fn assert_boxes_inside(out: &OcrOutput) {
    for line in &out.lines {
        for [x, y] in line.bbox {
            assert!(x >= 0.0 && y >= 0.0 && x < out.width as f32 && y < out.height as f32, "{line:?} in {out:?}");
        }
    }
}

#[test]
fn one_line_reads_back_exactly_at_several_sizes() {
    for px in [24.0, 40.0, 64.0] {
        let img = render_text(&[LINE_1], px, TextLayout::default());
        let mut p = pipeline();
        let started = Instant::now();
        let out = p.read(std::slice::from_ref(&img)).expect("read").remove(0);
        eprintln!("{px} px, {}×{}: read in {:?}", img.width(), img.height(), started.elapsed());
        drop(p);
        assert_eq!(texts(&out), [LINE_1], "at {px} px: {out:?}");
        assert_eq!(out.text, LINE_1);
        assert_eq!((out.width, out.height), (img.width(), img.height()));
        assert!(out.lines[0].confidence > 0.9, "at {px} px: {out:?}");
        assert_boxes_inside(&out);
    }
}

#[test]
fn two_lines_read_in_order_with_the_first_box_above() {
    let img = render_text(&[LINE_1, LINE_2], 40.0, TextLayout::default());
    let out = read_one(&img);
    assert_eq!(texts(&out), [LINE_1, LINE_2], "{out:?}");
    assert_eq!(out.text, format!("{LINE_1}\n{LINE_2}"));
    assert_boxes_inside(&out);
    let (a, b) = (&out.lines[0].bbox, &out.lines[1].bbox);
    let bottom_of_first = a[2][1].max(a[3][1]);
    let top_of_second = b[0][1].min(b[1][1]);
    assert!(bottom_of_first <= top_of_second, "{a:?} above {b:?}");
    // Clockwise from the top left: right along the top, then down.
    assert!(a[1][0] > a[0][0] && a[2][1] > a[1][1], "{a:?}");
}

#[test]
fn text_upside_down_is_turned_by_the_classifier() {
    let img = image::imageops::rotate180(&render_text(&[LINE_1, LINE_2], 40.0, TextLayout::default()));
    let out = read_one(&img);
    // Turned, the second line is on top.
    assert_eq!(texts(&out), [LINE_2, LINE_1], "{out:?}");
    assert_boxes_inside(&out);
    // The text's top left is the box's bottom right on the image.
    let b = &out.lines[0].bbox;
    assert!(b[0][0] > b[2][0] && b[0][1] > b[2][1], "{b:?}");
}

#[test]
fn blank_and_degenerate_images_give_no_lines() {
    let white = |w, h| RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    for img in [white(640, 480), white(1, 1), white(0, 0), white(5000, 3), white(3, 5000), RgbImage::new(40, 40)] {
        let out = read_one(&img);
        assert!(out.lines.is_empty() && out.text.is_empty(), "{}×{}: {out:?}", img.width(), img.height());
        assert_eq!((out.width, out.height), (img.width(), img.height()));
    }
    assert!(pipeline().read(&[]).expect("read nothing").is_empty());
}

#[test]
fn very_wide_and_tall_text_images_do_not_fail() {
    let wide = render_text(&[&LINE_1.repeat(12)], 24.0, TextLayout { line_spacing: 1.6, margin: 4 });
    let out = read_one(&wide);
    assert_boxes_inside(&out);
    let tall: Vec<&str> = std::iter::repeat_n(LINE_2, 60).collect();
    let tall = render_text(&tall, 12.0, TextLayout { line_spacing: 1.4, margin: 2 });
    let out = read_one(&tall);
    assert_boxes_inside(&out);
}

#[test]
fn batched_reading_equals_one_at_a_time() {
    let a = render_text(&[LINE_1], 40.0, TextLayout::default());
    let b = render_text(&[LINE_2, LINE_1], 32.0, TextLayout { line_spacing: 2.0, margin: 30 });
    let c = RgbImage::from_pixel(300, 200, Rgb([255, 255, 255]));
    let mut p = pipeline();
    let started = Instant::now();
    let together = p.read(&[a.clone(), b.clone(), c.clone()]).expect("read the batch");
    drop(p);
    eprintln!("three images in one call: {:?}", started.elapsed());
    let alone: Vec<OcrOutput> = [a, b, c].iter().map(read_one).collect();
    assert_eq!(together.len(), 3);
    for (t, a) in together.iter().zip(&alone) {
        assert_eq!(texts(t), texts(a));
        assert_eq!((&t.text, t.width, t.height), (&a.text, a.width, a.height));
        for (lt, la) in t.lines.iter().zip(&a.lines) {
            assert!((lt.confidence - la.confidence).abs() < 1e-3, "{lt:?} vs {la:?}");
            assert_eq!(lt.bbox, la.bbox);
        }
    }
    assert_eq!(texts(&together[1]), [LINE_2, LINE_1]);
    assert!(together[2].lines.is_empty());
}
