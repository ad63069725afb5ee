//! Media fixtures for tests: lines of text rendered into an image (black on white, DejaVu Sans),
//! the input of the OCR tests.

use std::sync::OnceLock;

use ab_glyph::{Font, FontArc, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage};

/// The system font the fixtures use (Debian's `fonts-dejavu-core`, installed by
/// `scripts/services.sh`).
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// How rendered lines are laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextLayout {
    /// Distance between baselines, as a multiple of the font size.
    pub line_spacing: f32,
    /// White space around the text on every side, in pixels.
    pub margin: u32,
}

impl Default for TextLayout {
    fn default() -> Self {
        Self { line_spacing: 1.6, margin: 24 }
    }
}

fn font() -> &'static FontArc {
    static FONT: OnceLock<FontArc> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = std::fs::read(FONT_PATH)
            .unwrap_or_else(|e| panic!("{FONT_PATH}: {e} (install fonts-dejavu-core, as scripts/services.sh does)"));
        FontArc::try_from_vec(bytes).unwrap_or_else(|e| panic!("{FONT_PATH}: {e}"))
    })
}

/// `lines` of black text at `px` pixels (the font's em size) on a white image just large enough
/// for the longest line, with `layout`'s margins and line spacing. An empty list gives an image
/// of the margins alone.
pub fn render_text(lines: &[&str], px: f32, layout: TextLayout) -> RgbImage {
    let font = font().as_scaled(PxScale::from(px));
    let line_height = (px * layout.line_spacing).max(font.height());
    let widths: Vec<f32> = lines.iter().map(|l| line_width(&font, l)).collect();
    let text_w = widths.iter().copied().fold(0.0, f32::max).ceil() as u32;
    let text_h = match lines.len() {
        0 => 0,
        n => ((n - 1) as f32 * line_height + font.height()).ceil() as u32,
    };
    let m = layout.margin;
    let (width, height) = ((text_w + 2 * m).max(1), (text_h + 2 * m).max(1));
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (i, line) in lines.iter().enumerate() {
        let baseline = m as f32 + font.ascent() + i as f32 * line_height;
        let mut x = m as f32;
        let mut previous = None;
        for c in line.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = previous {
                x += font.kern(p, id);
            }
            let glyph = id.with_scale_and_position(font.scale(), point(x, baseline));
            x += font.h_advance(id);
            previous = Some(id);
            let Some(outlined) = font.outline_glyph(glyph) else { continue };
            let bounds = outlined.px_bounds();
            outlined.draw(|gx, gy, coverage| {
                let (px_x, px_y) = (bounds.min.x as i64 + i64::from(gx), bounds.min.y as i64 + i64::from(gy));
                if px_x < 0 || px_y < 0 || px_x >= i64::from(width) || px_y >= i64::from(height) {
                    return;
                }
                let pixel = img.get_pixel_mut(px_x as u32, px_y as u32);
                let ink = coverage.clamp(0.0, 1.0);
                for ch in &mut pixel.0 {
                    // Darken only: overlapping glyph edges never lighten each other.
                    let v = (255.0 * (1.0 - ink)).round() as u8;
                    *ch = (*ch).min(v);
                }
            });
        }
    }
    img
}

fn line_width(font: &ab_glyph::PxScaleFont<&FontArc>, line: &str) -> f32 {
    let mut x = 0.0;
    let mut previous = None;
    for c in line.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = previous {
            x += font.kern(p, id);
        }
        x += font.h_advance(id);
        previous = Some(id);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_dark_ink_inside_the_margins() {
        let layout = TextLayout { line_spacing: 1.5, margin: 10 };
        let img = render_text(&["Hello 42", "World"], 32.0, layout);
        let dark: Vec<(u32, u32)> =
            img.enumerate_pixels().filter(|(_, _, p)| p.0[0] < 128).map(|(x, y, _)| (x, y)).collect();
        assert!(dark.len() > 100, "some ink: {}", dark.len());
        assert!(dark.iter().all(|&(x, y)| x >= 9 && y >= 9 && x < img.width() - 9 && y < img.height() - 9));
        // Two lines: ink above and below the middle.
        let mid = img.height() / 2;
        assert!(dark.iter().any(|&(_, y)| y < mid) && dark.iter().any(|&(_, y)| y > mid));
        let blank = render_text(&[], 32.0, layout);
        assert_eq!((blank.width(), blank.height()), (20, 20));
    }
}
