//! Plane geometry and pixel sampling of the OCR pipeline: convex hulls and minimum-area
//! rectangles of detected regions, corner order, reading order, the perspective warp that cuts a
//! box out of an image as an upright strip, and the bilinear resize that fills model tensors.

use image::{Rgb, RgbImage};

pub type Point = [f32; 2];

/// Four corners, clockwise from the top left: `[tl, tr, br, bl]`.
pub type Quad = [Point; 4];

/// A rectangle of any rotation: its corners (clockwise from the top left, see [`order_corners`])
/// and its side lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub corners: Quad,
    pub width: f32,
    pub height: f32,
}

impl Rect {
    pub fn short_side(&self) -> f32 {
        self.width.min(self.height)
    }

    /// This rectangle with every side moved out by `d` (its corners stay in [`order_corners`]
    /// order). The min-area rectangle of a rectangle offset with round joins, as DBNet's unclip.
    pub fn grown(&self, d: f32) -> Rect {
        let [tl, tr, _, bl] = self.corners;
        let (u, v) = (unit(sub(tr, tl)), unit(sub(bl, tl)));
        let mut corners = self.corners;
        for (c, (su, sv)) in corners.iter_mut().zip([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]) {
            *c = [c[0] + d * (su * u[0] + sv * v[0]), c[1] + d * (su * u[1] + sv * v[1])];
        }
        Rect { corners: order_corners(corners), width: self.width + 2.0 * d, height: self.height + 2.0 * d }
    }
}

fn sub(a: Point, b: Point) -> Point {
    [a[0] - b[0], a[1] - b[1]]
}

fn cross(o: Point, a: Point, b: Point) -> f32 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

fn norm(a: Point) -> f32 {
    a[0].hypot(a[1])
}

pub fn distance(a: Point, b: Point) -> f32 {
    norm(sub(a, b))
}

/// `a` scaled to length 1; a zero vector gives the x axis (a degenerate rectangle stays one).
fn unit(a: Point) -> Point {
    let n = norm(a);
    if n > 0.0 { [a[0] / n, a[1] / n] } else { [1.0, 0.0] }
}

/// The convex hull of `points` (Andrew's monotone chain), collinear points dropped.
pub fn convex_hull(mut points: Vec<Point>) -> Vec<Point> {
    points.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    points.dedup();
    if points.len() < 3 {
        return points;
    }
    let mut hull: Vec<Point> = Vec::with_capacity(2 * points.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &Point>> =
            if pass == 0 { Box::new(points.iter()) } else { Box::new(points.iter().rev()) };
        for &p in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
                hull.pop();
            }
            hull.push(p);
        }
        // The last point of each chain starts the other.
        hull.pop();
    }
    hull
}

/// The minimum-area rectangle enclosing `points` (one of its sides lies on a hull edge).
pub fn min_area_rect(points: Vec<Point>) -> Rect {
    let hull = convex_hull(points);
    let mut best: Option<(f32, Point, Point, [f32; 4])> = None;
    let n = hull.len();
    let edges = if n >= 2 { n } else { 1 };
    for i in 0..edges {
        let u = if n >= 2 { unit(sub(hull[(i + 1) % n], hull[i])) } else { [1.0, 0.0] };
        let v = [-u[1], u[0]];
        let mut ext = [f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY, f32::NEG_INFINITY];
        for p in &hull {
            let (a, b) = (p[0] * u[0] + p[1] * u[1], p[0] * v[0] + p[1] * v[1]);
            ext = [ext[0].min(a), ext[1].max(a), ext[2].min(b), ext[3].max(b)];
        }
        let area = (ext[1] - ext[0]) * (ext[3] - ext[2]);
        if best.as_ref().is_none_or(|b| area < b.0) {
            best = Some((area, u, v, ext));
        }
    }
    let Some((_, u, v, [a0, a1, b0, b1])) = best.filter(|b| b.3[0].is_finite()) else {
        return Rect { corners: [[0.0; 2]; 4], width: 0.0, height: 0.0 };
    };
    let at = |a: f32, b: f32| [a * u[0] + b * v[0], a * u[1] + b * v[1]];
    let corners = order_corners([at(a0, b0), at(a1, b0), at(a1, b1), at(a0, b1)]);
    let (w, h) = (distance(corners[0], corners[1]), distance(corners[0], corners[3]));
    Rect { corners, width: w, height: h }
}

/// A rectangle's corners as `[tl, tr, br, bl]`, the way PaddleOCR orders them: of the two
/// leftmost corners the upper is the top left, of the two rightmost the upper is the top right.
pub fn order_corners(mut c: Quad) -> Quad {
    c.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let (tl, bl) = if c[1][1] > c[0][1] { (c[0], c[1]) } else { (c[1], c[0]) };
    let (tr, br) = if c[3][1] > c[2][1] { (c[2], c[3]) } else { (c[3], c[2]) };
    [tl, tr, br, bl]
}

/// Whether `p` lies inside or on the convex quadrilateral `q` (corners in either winding).
pub fn inside(q: &Quad, p: Point) -> bool {
    let mut sign = 0.0f32;
    for i in 0..4 {
        let c = cross(q[i], q[(i + 1) % 4], p);
        if c != 0.0 {
            if sign != 0.0 && c.signum() != sign {
                return false;
            }
            sign = c.signum();
        }
    }
    true
}

/// Sorts boxes into reading order: by the top-left corner's y then x, then boxes whose tops lie
/// within 10 px of each other are put left to right (PaddleOCR's `sorted_boxes`).
pub fn reading_order(boxes: &mut [Quad]) {
    boxes.sort_by(|a, b| a[0][1].total_cmp(&b[0][1]).then(a[0][0].total_cmp(&b[0][0])));
    for i in 0..boxes.len().saturating_sub(1) {
        for j in (0..=i).rev() {
            if (boxes[j + 1][0][1] - boxes[j][0][1]).abs() < 10.0 && boxes[j + 1][0][0] < boxes[j][0][0] {
                boxes.swap(j, j + 1);
            } else {
                break;
            }
        }
    }
}

/// The homography taking `from[i]` to `to[i]`, as the 8 free entries of a 3×3 matrix with 1 in
/// the corner; `None` when the points are degenerate.
fn homography(from: &Quad, to: &Quad) -> Option<[f64; 8]> {
    let mut m = [[0f64; 9]; 8];
    for i in 0..4 {
        let ([x, y], [u, v]) =
            ([f64::from(from[i][0]), f64::from(from[i][1])], [f64::from(to[i][0]), f64::from(to[i][1])]);
        m[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u, u];
        m[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v, v];
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..8 {
        let pivot = (col..8).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col];
        for (row, r) in m.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (v, p) in r.iter_mut().zip(pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    let mut h = [0f64; 8];
    for (i, v) in h.iter_mut().enumerate() {
        *v = m[i][8] / m[i][i];
    }
    Some(h)
}

/// The pixel of `img` at real coordinates `(x, y)` (pixel centres at integers), bilinear, the
/// border replicated outside.
fn sample(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x, y) = (x.clamp(0.0, (w - 1) as f32), y.clamp(0.0, (h - 1) as f32));
    let (x0, y0) = (x.floor() as i64, y.floor() as i64);
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let px = |x: i64, y: i64| img.get_pixel(x as u32, y as u32).0;
    let (a, b, c, d) = (px(x0, y0), px(x1, y0), px(x0, y1), px(x1, y1));
    let mut out = [0f32; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let top = f32::from(a[k]) * (1.0 - fx) + f32::from(b[k]) * fx;
        let bottom = f32::from(c[k]) * (1.0 - fx) + f32::from(d[k]) * fx;
        *o = top * (1.0 - fy) + bottom * fy;
    }
    out
}

/// Cuts the box `q` out of `img` as an upright `width × height` strip (PaddleOCR's
/// `get_rotate_crop_image`: the width is the longer of the top and bottom edges, the height the
/// longer of the sides).
pub fn crop(img: &RgbImage, q: &Quad) -> RgbImage {
    let w = distance(q[0], q[1]).max(distance(q[2], q[3])).max(1.0) as u32;
    let h = distance(q[0], q[3]).max(distance(q[1], q[2])).max(1.0) as u32;
    let (wf, hf) = (w as f32, h as f32);
    let target: Quad = [[0.0, 0.0], [wf, 0.0], [wf, hf], [0.0, hf]];
    let Some(m) = homography(&target, q) else {
        // Degenerate (zero-area) box: the pixel at its corner, stretched.
        let p = sample(img, q[0][0], q[0][1]);
        return RgbImage::from_pixel(w, h, Rgb(p.map(|v| v.round() as u8)));
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (f64::from(x), f64::from(y));
        let d = m[6] * x + m[7] * y + 1.0;
        let d = if d.abs() < 1e-12 { 1e-12 } else { d };
        let sx = (m[0] * x + m[1] * y + m[2]) / d;
        let sy = (m[3] * x + m[4] * y + m[5]) / d;
        Rgb(sample(img, sx as f32, sy as f32).map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

/// Resizes `img` to `width × height` (bilinear, pixel centres aligned as OpenCV does) and writes
/// it normalised to `(v/255 − 0.5)/0.5`, BGR, into the three planes of `dst` (a `[3, rows,
/// stride]` tensor of one image), leaving columns from `width` to `stride` as they are.
pub fn resize_into(img: &RgbImage, width: usize, height: usize, dst: &mut [f32], stride: usize) {
    let plane = stride * height;
    if img.width() == 0 || img.height() == 0 || width == 0 || height == 0 || dst.len() < 3 * plane || width > stride {
        return;
    }
    let (sx, sy) = (img.width() as f32 / width as f32, img.height() as f32 / height as f32);
    for y in 0..height {
        let fy = (y as f32 + 0.5) * sy - 0.5;
        for x in 0..width {
            let fx = (x as f32 + 0.5) * sx - 0.5;
            let [r, g, b] = sample(img, fx, fy);
            let at = y * stride + x;
            dst[at] = b / 127.5 - 1.0;
            dst[plane + at] = g / 127.5 - 1.0;
            dst[2 * plane + at] = r / 127.5 - 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_area_rect_of_a_rotated_rectangle_finds_it() {
        // A 10 × 4 rectangle turned by 30°, sampled on its corners and edges.
        let (c, s) = (30f32.to_radians().cos(), 30f32.to_radians().sin());
        let mut pts = Vec::new();
        for i in 0..=10 {
            for j in 0..=4 {
                let (x, y) = (i as f32, j as f32);
                pts.push([50.0 + x * c - y * s, 20.0 + x * s + y * c]);
            }
        }
        let r = min_area_rect(pts);
        let (w, h) = (r.width.max(r.height), r.width.min(r.height));
        assert!((w - 10.0).abs() < 1e-3 && (h - 4.0).abs() < 1e-3, "{r:?}");
        let [tl, tr, br, bl] = r.corners;
        assert!(tl[0] <= tr[0] && bl[0] <= br[0] && tl[1] < bl[1], "{r:?}");
    }

    #[test]
    fn degenerate_point_sets_give_empty_rectangles() {
        assert_eq!(min_area_rect(vec![]).short_side(), 0.0);
        assert_eq!(min_area_rect(vec![[3.0, 3.0]]).short_side(), 0.0);
        assert_eq!(min_area_rect(vec![[0.0, 0.0], [5.0, 0.0], [9.0, 0.0]]).short_side(), 0.0);
    }

    #[test]
    fn growing_moves_every_side_out() {
        let r = Rect { corners: [[10.0, 10.0], [30.0, 10.0], [30.0, 20.0], [10.0, 20.0]], width: 20.0, height: 10.0 };
        let g = r.grown(2.0);
        assert_eq!(g.corners, [[8.0, 8.0], [32.0, 8.0], [32.0, 22.0], [8.0, 22.0]]);
        assert_eq!((g.width, g.height), (24.0, 14.0));
    }

    #[test]
    fn reading_order_is_rows_then_left_to_right() {
        let b = |x: f32, y: f32| -> Quad { [[x, y], [x + 5.0, y], [x + 5.0, y + 5.0], [x, y + 5.0]] };
        let mut boxes = vec![b(100.0, 52.0), b(0.0, 50.0), b(0.0, 0.0), b(50.0, 5.0)];
        reading_order(&mut boxes);
        assert_eq!(boxes, vec![b(0.0, 0.0), b(50.0, 5.0), b(0.0, 50.0), b(100.0, 52.0)]);
    }

    #[test]
    fn crop_of_an_axis_aligned_box_copies_the_pixels() {
        let img = RgbImage::from_fn(20, 10, |x, y| Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let c = crop(&img, &[[4.0, 2.0], [12.0, 2.0], [12.0, 7.0], [4.0, 7.0]]);
        assert_eq!((c.width(), c.height()), (8, 5));
        assert_eq!(c.get_pixel(0, 0).0, [40, 40, 7]);
        assert_eq!(c.get_pixel(7, 4).0, [110, 120, 7]);
    }

    #[test]
    fn inside_accepts_edges_and_rejects_outside() {
        let q: Quad = [[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [0.0, 2.0]];
        assert!(inside(&q, [2.0, 1.0]) && inside(&q, [4.0, 2.0]) && inside(&q, [0.0, 1.0]));
        assert!(!inside(&q, [5.0, 1.0]) && !inside(&q, [2.0, -0.5]));
    }
}
