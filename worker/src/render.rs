//! From a model's raw field to PNG bytes: bicubic resampling to the requested size, the grayscale
//! and terrain colour renderings, and RGB images from the diffusion pipeline. Pure functions,
//! deterministic: the same field gives the same bytes.

use kiln_proto::Colormap;

/// A single-channel field, row-major.
pub struct Field {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl Field {
    /// Resamples to `width × height` with Catmull-Rom bicubic interpolation (edges clamped);
    /// the identity when the size already matches.
    pub fn resample(self, width: usize, height: usize) -> Field {
        if (width, height) == (self.width, self.height) {
            return self;
        }
        let sx = self.width as f64 / width as f64;
        let sy = self.height as f64 / height as f64;
        let at = |x: isize, y: isize| {
            let x = x.clamp(0, self.width as isize - 1) as usize;
            let y = y.clamp(0, self.height as isize - 1) as usize;
            f64::from(self.values[y * self.width + x])
        };
        let mut values = Vec::with_capacity(width * height);
        for j in 0..height {
            let fy = (j as f64 + 0.5) * sy - 0.5;
            let (y0, ty) = (fy.floor() as isize, fy - fy.floor());
            let wy = catmull_rom(ty);
            for i in 0..width {
                let fx = (i as f64 + 0.5) * sx - 0.5;
                let (x0, tx) = (fx.floor() as isize, fx - fx.floor());
                let wx = catmull_rom(tx);
                let mut v = 0.0;
                for (dy, wyk) in wy.iter().enumerate() {
                    let row: f64 = wx
                        .iter()
                        .enumerate()
                        .map(|(dx, wxk)| wxk * at(x0 + dx as isize - 1, y0 + dy as isize - 1))
                        .sum();
                    v += wyk * row;
                }
                values.push(v as f32);
            }
        }
        Field { width, height, values }
    }

    fn range(&self) -> (f32, f32) {
        self.values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    }

    /// Values stretched to 0..1 (all 0 for a flat field).
    fn normalised(&self) -> impl Iterator<Item = f64> + '_ {
        let (lo, hi) = self.range();
        let span = f64::from(hi - lo);
        self.values.iter().map(move |&v| if span > 0.0 { f64::from(v - lo) / span } else { 0.0 })
    }

    /// The field as a PNG in `colormap`.
    pub fn png(&self, colormap: Colormap) -> Vec<u8> {
        match colormap {
            Colormap::Gray => {
                let data: Vec<u8> = self
                    .normalised()
                    .flat_map(|u| ((u * 65535.0).round().clamp(0.0, 65535.0) as u16).to_be_bytes())
                    .collect();
                encode(self.width, self.height, png::ColorType::Grayscale, png::BitDepth::Sixteen, &data)
            }
            Colormap::Terrain => {
                let data: Vec<u8> = self.normalised().flat_map(terrain_colour).collect();
                rgb_png(self.width, self.height, &data)
            }
        }
    }
}

/// Catmull-Rom weights of the four taps around a sample at fraction `t`.
fn catmull_rom(t: f64) -> [f64; 4] {
    let (t2, t3) = (t * t, t * t * t);
    [0.5 * (-t3 + 2.0 * t2 - t), 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0), 0.5 * (-3.0 * t3 + 4.0 * t2 + t), 0.5 * (t3 - t2)]
}

/// A terrain ramp — deep water, shallows, lowland, highland, rock, snow — the stops of the classic
/// "terrain" colour map.
const TERRAIN: [(f64, [f64; 3]); 6] = [
    (0.00, [0.2, 0.2, 0.6]),
    (0.15, [0.0, 0.6, 1.0]),
    (0.25, [0.0, 0.8, 0.4]),
    (0.50, [1.0, 1.0, 0.6]),
    (0.75, [0.5, 0.36, 0.33]),
    (1.00, [1.0, 1.0, 1.0]),
];

fn terrain_colour(u: f64) -> [u8; 3] {
    let u = u.clamp(0.0, 1.0);
    let k = TERRAIN.windows(2).position(|w| u <= w[1].0).unwrap_or(TERRAIN.len() - 2);
    let ((u0, c0), (u1, c1)) = (TERRAIN[k], TERRAIN[k + 1]);
    let t = (u - u0) / (u1 - u0);
    std::array::from_fn(|i| ((c0[i] + t * (c1[i] - c0[i])) * 255.0).round() as u8)
}

/// An 8-bit RGB PNG of `pixels` (row-major, 3 bytes per pixel).
pub fn rgb_png(width: usize, height: usize, pixels: &[u8]) -> Vec<u8> {
    encode(width, height, png::ColorType::Rgb, png::BitDepth::Eight, pixels)
}

fn encode(width: usize, height: usize, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(color);
    encoder.set_depth(depth);
    encoder.set_compression(png::Compression::Balanced);
    // Writing into memory only fails on a data length that does not match the header: a bug.
    let mut writer = encoder.write_header().expect("PNG header into memory");
    writer.write_image_data(data).expect("PNG data matches its header");
    writer.finish().expect("PNG into memory");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn ramp(w: usize, h: usize) -> Field {
        Field { width: w, height: h, values: (0..w * h).map(|i| (i % w) as f32).collect() }
    }

    #[test]
    fn gray_is_16_bit_stretched_to_the_full_range() {
        let (info, data) = decode(&ramp(4, 2).png(Colormap::Gray));
        assert_eq!((info.width, info.height, info.bit_depth), (4, 2, png::BitDepth::Sixteen));
        let first_row: Vec<u16> = data[..8].chunks(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect();
        assert_eq!(first_row, [0, 21845, 43690, 65535]);
    }

    #[test]
    fn terrain_colours_hit_the_stops() {
        assert_eq!(terrain_colour(0.0), [51, 51, 153]);
        assert_eq!(terrain_colour(0.5), [255, 255, 153]);
        assert_eq!(terrain_colour(1.0), [255, 255, 255]);
        let (info, data) = decode(&ramp(3, 3).png(Colormap::Terrain));
        assert_eq!((info.width, info.color_type, data.len()), (3, png::ColorType::Rgb, 27));
    }

    #[test]
    fn resampling_keeps_linear_ramps_and_sizes() {
        let up = ramp(8, 8).resample(16, 12);
        assert_eq!((up.width, up.height, up.values.len()), (16, 12, 192));
        // Catmull-Rom reproduces a linear function away from the clamped edges.
        let x = 7; // output column 7 samples input x = (7.5)·0.5 − 0.5 = 3.25
        assert!((up.values[x] - 3.25).abs() < 1e-5, "{}", up.values[x]);
        let same = ramp(5, 5).resample(5, 5);
        assert_eq!(same.values, ramp(5, 5).values);
    }

    #[test]
    fn flat_fields_do_not_divide_by_zero() {
        let flat = Field { width: 2, height: 2, values: vec![3.0; 4] };
        let (_, data) = decode(&flat.png(Colormap::Gray));
        assert!(data.iter().all(|&b| b == 0));
    }
}
