//! The `ocr` task's pipeline (PP-OCRv4 mobile, as rapidocr runs it): text boxes detected per
//! image, each cut out as an upright strip, then the strips of all the images given classified
//! (turned when upside down) and read together, so the lines of a batch's jobs share model runs.
//! Lines come back per image in reading order, with their boxes in the image's pixels.

mod det;
mod geometry;
mod rec;
#[cfg(test)]
mod tests;

use std::path::Path;

use image::RgbImage;
use kiln_common::models::{ExecutionProvider, ModelSpec};
use kiln_proto::{OcrLine, OcrOutput};
use ort::environment::Environment;

use crate::embedding::PipelineError;
use crate::runtime::{self, Threads};
use geometry::Quad;

/// Lines read with a lower confidence are dropped (rapidocr's `text_score`).
const MIN_CONFIDENCE: f32 = 0.5;
/// A strip at least this much taller than wide is vertical text: it is turned to read it.
const VERTICAL_RATIO: f32 = 1.5;

pub struct OcrPipeline {
    det: det::Detector,
    cls: rec::Classifier,
    rec: rec::Recognizer,
}

/// A text line cut out of an image, upright as far as known, and where it came from.
struct Strip {
    image: usize,
    /// The box's corners, clockwise from the top left of the text as read.
    corners: Quad,
    pixels: RgbImage,
}

impl OcrPipeline {
    /// Loads det, cls and rec (files of `spec.files`: det, cls, rec, in spec.dir(cache_dir)) on
    /// the first execution provider of `spec.execution_providers` that works; the other two
    /// then load on the same provider.
    pub fn load(
        spec: &ModelSpec,
        cache_dir: &Path,
        env: &Environment,
        threads: Threads,
    ) -> Result<(Self, ExecutionProvider), String> {
        let file = |logical: &str| spec.file(cache_dir, logical).ok_or_else(|| format!("files.{logical} is not set"));
        let (det, cls, rec) = (file("det")?, file("cls")?, file("rec")?);
        let first = runtime::load_session(env, &det, &spec.execution_providers, threads).map_err(|e| e.to_string())?;
        let provider = first.provider;
        let load = |path: &Path| {
            runtime::load_session(env, path, &[provider], threads).map(|l| l.session).map_err(|e| e.to_string())
        };
        let pipeline = Self {
            det: det::Detector::new(first.session)?,
            cls: rec::Classifier::new(load(&cls)?)?,
            rec: rec::Recognizer::new(load(&rec)?)?,
        };
        Ok((pipeline, provider))
    }

    /// Reads every image; one output per image, in order. Detection runs per image; angle
    /// classification and recognition run over all the text lines of all the images, in chunks
    /// bounded in count and width.
    pub fn read(&mut self, images: &[RgbImage]) -> Result<Vec<OcrOutput>, PipelineError> {
        let mut strips = Vec::new();
        for (i, img) in images.iter().enumerate() {
            for q in self.det.detect(img)? {
                strips.push(cut(img, i, q));
            }
        }
        let pixels: Vec<&RgbImage> = strips.iter().map(|s| &s.pixels).collect();
        let flip = self.cls.upside_down(&pixels)?;
        for (s, flip) in strips.iter_mut().zip(flip) {
            if flip {
                image::imageops::rotate180_in_place(&mut s.pixels);
                s.corners.rotate_left(2);
            }
        }
        let pixels: Vec<&RgbImage> = strips.iter().map(|s| &s.pixels).collect();
        let read = self.rec.read(&pixels)?;
        let mut outputs: Vec<OcrOutput> = images
            .iter()
            .map(|img| OcrOutput { lines: Vec::new(), text: String::new(), width: img.width(), height: img.height() })
            .collect();
        for (strip, (text, confidence)) in strips.into_iter().zip(read) {
            let text = text.trim();
            if text.is_empty() || confidence < MIN_CONFIDENCE {
                continue;
            }
            if let Some(out) = outputs.get_mut(strip.image) {
                out.lines.push(OcrLine { text: text.to_owned(), confidence, bbox: strip.corners });
            }
        }
        for out in &mut outputs {
            out.text = out.lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n");
        }
        Ok(outputs)
    }
}

/// Cuts box `q` out of image `image` as an upright strip; a tall one (vertical text) is turned a
/// quarter counter-clockwise, its corners rotated to match.
fn cut(img: &RgbImage, image: usize, q: Quad) -> Strip {
    let pixels = geometry::crop(img, &q);
    let mut corners = q;
    if pixels.height() as f32 >= VERTICAL_RATIO * pixels.width() as f32 {
        // Turned counter-clockwise, the strip's right edge is its top: the box's top right corner
        // becomes the text's top left.
        corners.rotate_left(1);
        return Strip { image, corners, pixels: image::imageops::rotate270(&pixels) };
    }
    Strip { image, corners, pixels }
}
