//! Text detection (PP-OCRv4 det, a DBNet): the image resized to multiples of 32 into the model,
//! its text-probability map back into boxes — threshold, dilation, connected regions, their
//! minimum-area rectangles, the box score, the unclip that grows each box, and the scale back to
//! the image's pixels, in reading order.

use image::RgbImage;
use ndarray::Array4;
use ort::session::Session;
use ort::value::TensorRef;

use super::geometry::{self, Point, Quad, Rect};
use crate::embedding::PipelineError;

/// Probability above which a map pixel is text.
const THRESH: f32 = 0.3;
/// Mean probability inside a box below which it is dropped.
const BOX_THRESH: f32 = 0.5;
/// How far a box grows: its area × this / its perimeter on every side. rapidocr uses 1.6 on a
/// map scaled up; at the image's own scale 1.6 cuts boxes so tight to the glyphs that the
/// recogniser drops spaces ("HelloONNXRuntime2026" at 24 px); 2.0 read every test size exactly.
const UNCLIP_RATIO: f32 = 2.0;
/// Regions looked at per image at most.
const MAX_CANDIDATES: usize = 1000;
/// Boxes whose short side (in map pixels) is below this are noise.
const MIN_SIZE: f32 = 3.0;
/// The long side is scaled down to at most this many pixels (bounding the map's memory); an
/// image is never scaled up. rapidocr scales the short side up to 736, but text made large that
/// way is split at word gaps and boxed too tightly: rendered lines read back wrong from 2× up.
const MAX_SIDE: f32 = 2000.0;

pub struct Detector {
    session: Session,
    input: String,
    output: String,
}

impl Detector {
    pub fn new(session: Session) -> Result<Self, String> {
        let input = session.inputs().first().map(|i| i.name().to_owned()).ok_or("det model has no input")?;
        let output = session.outputs().first().map(|o| o.name().to_owned()).ok_or("det model has no output")?;
        Ok(Self { session, input, output })
    }

    /// The text boxes of `img`, in its pixels, in reading order.
    pub fn detect(&mut self, img: &RgbImage) -> Result<Vec<Quad>, PipelineError> {
        let (w, h) = (img.width(), img.height());
        if w == 0 || h == 0 {
            return Ok(Vec::new());
        }
        let (mw, mh) = map_size(w, h);
        let mut x = Array4::<f32>::zeros((1, 3, mh, mw));
        let dst = x.as_slice_mut().ok_or_else(|| PipelineError::Inference("det input not contiguous".into()))?;
        geometry::resize_into(img, mw, mh, dst, mw);
        let err = |e: ort::Error| PipelineError::Inference(e.to_string());
        let outputs =
            self.session.run(vec![(self.input.as_str(), TensorRef::from_array_view(&x).map_err(err)?)]).map_err(err)?;
        let (shape, prob) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(err)?;
        if shape.len() != 4 || shape[2] != mh as i64 || shape[3] != mw as i64 || prob.len() != mw * mh {
            return Err(PipelineError::Inference(format!("det output has shape {shape:?}, wanted [1,1,{mh},{mw}]")));
        }
        let mut boxes = boxes_from_map(prob, mw, mh, w, h);
        geometry::reading_order(&mut boxes);
        Ok(boxes)
    }
}

/// The model's input size for a `w × h` image: the long side at most [`MAX_SIDE`], aspect kept,
/// both rounded to multiples of 32 (at least 32).
pub fn map_size(w: u32, h: u32) -> (usize, usize) {
    let (w, h) = (w.max(1) as f32, h.max(1) as f32);
    let ratio = (MAX_SIDE / w.max(h)).min(1.0);
    // The epsilon keeps a side scaled to exactly the cap from flooring below it.
    let side = |v: f32| (((v * ratio + 1e-3).floor() / 32.0).round() as usize * 32).max(32);
    (side(w), side(h))
}

/// DBNet's post-processing of a `mw × mh` probability map into boxes of an `iw × ih` image.
pub fn boxes_from_map(prob: &[f32], mw: usize, mh: usize, iw: u32, ih: u32) -> Vec<Quad> {
    let text = dilate(&prob.iter().map(|&p| p > THRESH).collect::<Vec<_>>(), mw, mh);
    let mut seen = vec![false; mw * mh];
    let mut stack = Vec::new();
    let mut pixels = Vec::new();
    let mut boxes = Vec::new();
    let mut candidates = 0;
    for start in 0..mw * mh {
        if !text[start] || seen[start] {
            continue;
        }
        if candidates == MAX_CANDIDATES {
            break;
        }
        candidates += 1;
        region(&text, &mut seen, mw, mh, start, &mut stack, &mut pixels);
        let rect = geometry::min_area_rect(hull_candidates(&pixels, mw));
        if rect.short_side() < MIN_SIZE || box_score(prob, mw, mh, &rect.corners) < BOX_THRESH {
            continue;
        }
        let grown = unclip(&rect);
        if grown.short_side() < MIN_SIZE + 2.0 {
            continue;
        }
        if let Some(q) = to_image(&grown.corners, mw, mh, iw, ih) {
            boxes.push(q);
        }
    }
    boxes
}

/// OpenCV's dilation with a 2 × 2 kernel of ones (anchor at its centre): a pixel is set when it
/// or its left, upper or upper-left neighbour is.
fn dilate(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let at = |dx: usize, dy: usize| x >= dx && y >= dy && mask[(y - dy) * w + (x - dx)];
            out[y * w + x] = at(0, 0) || at(1, 0) || at(0, 1) || at(1, 1);
        }
    }
    out
}

/// Collects into `pixels` the 8-connected region of `mask` holding `start`, marking it seen.
fn region(
    mask: &[bool],
    seen: &mut [bool],
    w: usize,
    h: usize,
    start: usize,
    stack: &mut Vec<usize>,
    pixels: &mut Vec<usize>,
) {
    pixels.clear();
    stack.clear();
    stack.push(start);
    seen[start] = true;
    while let Some(p) = stack.pop() {
        pixels.push(p);
        let (x, y) = (p % w, p / w);
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    continue;
                }
                let n = ny as usize * w + nx as usize;
                if mask[n] && !seen[n] {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
    }
}

/// The leftmost and rightmost pixel of every row of a region: the only pixels its convex hull
/// can have as vertices.
fn hull_candidates(pixels: &[usize], w: usize) -> Vec<Point> {
    let ys = pixels.iter().map(|p| p / w);
    let (Some(y0), Some(y1)) = (ys.clone().min(), ys.max()) else {
        return Vec::new();
    };
    let mut rows = vec![(usize::MAX, 0usize); y1 - y0 + 1];
    for &p in pixels {
        let (x, y) = (p % w, p / w);
        let r = &mut rows[y - y0];
        *r = (r.0.min(x), r.1.max(x));
    }
    let mut points = Vec::with_capacity(2 * rows.len());
    for (i, &(lo, hi)) in rows.iter().enumerate() {
        if lo <= hi {
            let y = (y0 + i) as f32;
            points.push([lo as f32, y]);
            points.push([hi as f32, y]);
        }
    }
    points
}

/// The mean probability of the map pixels inside the box (DBNet's "fast" score).
fn box_score(prob: &[f32], w: usize, h: usize, q: &Quad) -> f32 {
    let span = |values: [f32; 4], len: usize| {
        let lo = values.iter().copied().fold(f32::INFINITY, f32::min).floor().max(0.0) as usize;
        let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max).ceil().max(0.0) as usize;
        (lo.min(len - 1), hi.min(len - 1))
    };
    let (x0, x1) = span(q.map(|p| p[0]), w);
    let (y0, y1) = span(q.map(|p| p[1]), h);
    let (mut sum, mut n) = (0f64, 0u64);
    for y in y0..=y1 {
        for x in x0..=x1 {
            if geometry::inside(q, [x as f32, y as f32]) {
                sum += f64::from(prob[y * w + x]);
                n += 1;
            }
        }
    }
    if n == 0 { 0.0 } else { (sum / n as f64) as f32 }
}

/// Grows the box by `area × UNCLIP_RATIO / perimeter` on every side: the map marks the text's
/// shrunk core, and without growing, a box cuts off its edges and the spaces between words.
fn unclip(rect: &Rect) -> Rect {
    let perimeter = 2.0 * (rect.width + rect.height);
    let d = if perimeter > 0.0 { rect.width * rect.height * UNCLIP_RATIO / perimeter } else { 0.0 };
    rect.grown(d)
}

/// A box on the map to the image's pixels: scaled, rounded, clipped to the image. `None` when it
/// ends up 3 px or thinner.
fn to_image(q: &Quad, mw: usize, mh: usize, iw: u32, ih: u32) -> Option<Quad> {
    let (sx, sy) = (iw as f32 / mw as f32, ih as f32 / mh as f32);
    let (xmax, ymax) = ((iw - 1) as f32, (ih - 1) as f32);
    let q = q.map(|[x, y]| [(x * sx).round().clamp(0.0, xmax), (y * sy).round().clamp(0.0, ymax)]);
    let (w, h) = (geometry::distance(q[0], q[1]) as u32, geometry::distance(q[0], q[3]) as u32);
    (w > 3 && h > 3).then_some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_size_rounds_to_32_and_caps_the_long_side() {
        assert_eq!(map_size(100, 100), (96, 96));
        assert_eq!(map_size(1, 1), (32, 32));
        assert_eq!(map_size(400, 100), (416, 96));
        assert_eq!(map_size(1000, 800), (992, 800));
        assert_eq!(map_size(4000, 3000), (2016, 1504));
        assert_eq!(map_size(100_000, 1), (2016, 32));
        assert_eq!(map_size(1, 100_000), (32, 2016));
    }

    #[test]
    fn a_bright_bar_on_the_map_becomes_one_grown_box() {
        let (w, h) = (64usize, 32usize);
        let mut prob = vec![0.0f32; w * h];
        for y in 10..20 {
            for x in 8..56 {
                prob[y * w + x] = 0.9;
            }
        }
        let boxes = boxes_from_map(&prob, w, h, 128, 64);
        assert_eq!(boxes.len(), 1, "{boxes:?}");
        let [tl, tr, br, bl] = boxes[0];
        // The region spans 8..=56 × 10..=20 after dilation; grown by 48·10·2/116 ≈ 8.3 map px,
        // then doubled to the image's scale.
        assert!(tl[0] < 8.0 * 2.0 && tl[1] < 10.0 * 2.0 && br[0] > 55.0 * 2.0 && br[1] > 19.0 * 2.0, "{boxes:?}");
        assert!(tl[1] == tr[1] && bl[1] == br[1] && tl[0] == bl[0], "{boxes:?}");
    }

    #[test]
    fn faint_and_tiny_regions_are_dropped() {
        let (w, h) = (32usize, 32usize);
        let mut prob = vec![0.0f32; w * h];
        // Above the pixel threshold but a mean below the box threshold.
        for y in 2..12 {
            for x in 2..30 {
                prob[y * w + x] = 0.4;
            }
        }
        // A 2 × 2 speck.
        for y in 20..22 {
            for x in 20..22 {
                prob[y * w + x] = 1.0;
            }
        }
        assert!(boxes_from_map(&prob, w, h, 32, 32).is_empty());
    }
}
