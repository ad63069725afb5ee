//! Input images: sniffing (by magic bytes, never by a declared type), header probing and decoding
//! (PNG, JPEG, WebP). [`probe_image`] reads the dimensions from the header alone and refuses an
//! image over the pixel bound before any pixel is decoded; [`decode_image`] probes first, decodes
//! under `image::Limits` fitted to that header, applies the EXIF orientation and flattens to
//! RGB8 (alpha composited on white). Bad bytes are a [`MediaError`], never a panic.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use super::MediaError;

/// What the header of an accepted image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// The content type of `bytes` by their magic bytes: `image/png`, `image/jpeg`, `image/webp` or
/// `audio/wav`; `None` for anything else.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    let riff = |form: &[u8]| bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == form;
    if bytes.starts_with(PNG) {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if riff(b"WEBP") {
        Some("image/webp")
    } else if riff(b"WAVE") {
        Some("audio/wav")
    } else {
        None
    }
}

const EXPECTED: &str = "a PNG, JPEG or WebP image";

fn format_of(bytes: &[u8]) -> Result<(&'static str, ImageFormat), MediaError> {
    match sniff(bytes) {
        Some(ct @ "image/png") => Ok((ct, ImageFormat::Png)),
        Some(ct @ "image/jpeg") => Ok((ct, ImageFormat::Jpeg)),
        Some(ct @ "image/webp") => Ok((ct, ImageFormat::WebP)),
        Some(other) => Err(MediaError::Unsupported { expected: EXPECTED, found: other.to_owned() }),
        None => Err(MediaError::Unsupported { expected: EXPECTED, found: "no known format".to_owned() }),
    }
}

fn corrupt(e: image::ImageError) -> MediaError {
    MediaError::Corrupt(e.to_string())
}

/// The type and size of an image, read from its header only; refused with
/// [`MediaError::TooManyPixels`] when width × height is over `max_pixels`, before any pixel is
/// decoded or allocated.
pub fn probe_image(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, MediaError> {
    let (content_type, format) = format_of(bytes)?;
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(corrupt)?;
    if width == 0 || height == 0 {
        return Err(MediaError::Corrupt(format!("the header says {width}×{height} pixels")));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(MediaError::TooManyPixels { width, height, max: max_pixels });
    }
    Ok(ImageInfo { content_type, width, height })
}

/// Bytes per pixel of the widest colour type a decoder may produce (RGBA of 32-bit floats).
const WIDEST_PIXEL: u64 = 16;

/// Decodes an image (probed first, see [`probe_image`]) to upright RGB8: the EXIF orientation
/// applied, alpha composited on white.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, MediaError> {
    let info = probe_image(bytes, max_pixels)?;
    let (_, format) = format_of(bytes)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The decoder may allocate what this header needs and no more, whatever the file says later.
    let mut limits = Limits::default();
    limits.max_image_width = Some(info.width);
    limits.max_image_height = Some(info.height);
    limits.max_alloc = Some((u64::from(info.width) * u64::from(info.height)).saturating_mul(WIDEST_PIXEL) + (1 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // Unreadable EXIF is no reason to refuse the pixels: they are shown as stored.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    Ok(flatten(img))
}

/// RGB8, with any alpha composited on white (a transparent background reads as paper).
fn flatten(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = src.0;
        let a = u16::from(a);
        let over = |c: u8| ((u16::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        dst.0 = [over(r), over(g), over(b)];
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use image::{ImageEncoder, Rgb, Rgba, RgbaImage};

    use super::*;

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    /// Left half red, right half blue, `w`×`h`.
    fn halves(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| if x < w / 2 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) })
    }

    fn near(p: Rgb<u8>, want: [u8; 3]) -> bool {
        p.0.iter().zip(want).all(|(a, b)| a.abs_diff(b) < 40)
    }

    #[test]
    fn sniffs_by_magic_bytes() {
        let img = DynamicImage::ImageRgb8(halves(4, 4));
        assert_eq!(sniff(&encode(&img, ImageFormat::Png)), Some("image/png"));
        assert_eq!(sniff(&encode(&img, ImageFormat::Jpeg)), Some("image/jpeg"));
        assert_eq!(sniff(&encode(&img, ImageFormat::WebP)), Some("image/webp"));
        assert_eq!(sniff(b"RIFF\x24\0\0\0WAVEfmt "), Some("audio/wav"));
        for other in [&b""[..], b"GIF89a", b"RIFF", b"%PDF-1.7", b"\x89PN"] {
            assert_eq!(sniff(other), None, "{other:?}");
        }
    }

    #[test]
    fn png_jpeg_and_webp_round_trip() {
        let img = DynamicImage::ImageRgb8(halves(32, 16));
        for (format, ct, exact) in [
            (ImageFormat::Png, "image/png", true),
            (ImageFormat::Jpeg, "image/jpeg", false),
            (ImageFormat::WebP, "image/webp", true),
        ] {
            let bytes = encode(&img, format);
            assert_eq!(probe_image(&bytes, 1_000).unwrap(), ImageInfo { content_type: ct, width: 32, height: 16 });
            let back = decode_image(&bytes, 1_000).unwrap();
            assert_eq!(back.dimensions(), (32, 16), "{ct}");
            if exact {
                assert_eq!(back, halves(32, 16), "{ct}");
            } else {
                assert!(near(*back.get_pixel(4, 8), [255, 0, 0]) && near(*back.get_pixel(28, 8), [0, 0, 255]), "{ct}");
            }
        }
    }

    #[test]
    fn alpha_is_composited_on_white() {
        let img = RgbaImage::from_fn(2, 1, |x, _| if x == 0 { Rgba([0, 0, 0, 0]) } else { Rgba([0, 0, 0, 255]) });
        let bytes = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
        let back = decode_image(&bytes, 10).unwrap();
        assert_eq!((back.get_pixel(0, 0).0, back.get_pixel(1, 0).0), ([255, 255, 255], [0, 0, 0]));
    }

    /// An APP1 segment with EXIF (big-endian TIFF) holding only `Orientation = value`.
    fn exif_app1(value: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // one value
        tiff.extend_from_slice(&value.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]); // the value field's padding
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut payload = b"Exif\0\0".to_vec();
        payload.extend_from_slice(&tiff);
        let mut seg = vec![0xff, 0xe1];
        seg.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        seg.extend_from_slice(&payload);
        seg
    }

    /// A JPEG of `img` with an EXIF orientation, its APP1 written right after SOI.
    fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
        let mut plain = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 95)
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(&plain[..2], &[0xff, 0xd8]);
        let mut out = plain[..2].to_vec();
        out.extend_from_slice(&exif_app1(orientation));
        out.extend_from_slice(&plain[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 6: the camera was turned a quarter clockwise; shown upright, the stored left half (red)
        // is on top and the image is tall.
        let rotated = decode_image(&jpeg_with_orientation(&halves(32, 16), 6), 10_000).unwrap();
        assert_eq!(rotated.dimensions(), (16, 32));
        assert!(near(*rotated.get_pixel(8, 4), [255, 0, 0]), "{:?}", rotated.get_pixel(8, 4));
        assert!(near(*rotated.get_pixel(8, 28), [0, 0, 255]), "{:?}", rotated.get_pixel(8, 28));
        // 3: upside down; the red half ends up on the right.
        let turned = decode_image(&jpeg_with_orientation(&halves(32, 16), 3), 10_000).unwrap();
        assert_eq!(turned.dimensions(), (32, 16));
        assert!(near(*turned.get_pixel(28, 8), [255, 0, 0]) && near(*turned.get_pixel(4, 8), [0, 0, 255]));
        // The probe reports the stored size (what bounds the decoding).
        let info = probe_image(&jpeg_with_orientation(&halves(32, 16), 6), 10_000).unwrap();
        assert_eq!((info.width, info.height), (32, 16));
    }

    #[test]
    fn truncated_or_garbage_bytes_are_corrupt() {
        let img = DynamicImage::ImageRgb8(halves(64, 64));
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let bytes = encode(&img, format);
            for cut in [bytes.len() / 2, 20, 13] {
                let got = decode_image(&bytes[..cut], 100_000);
                assert!(matches!(got, Err(MediaError::Corrupt(_))), "{format:?} cut at {cut}: {got:?}");
            }
        }
        let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
        garbage.extend(std::iter::repeat_n(0xab, 200));
        assert!(matches!(decode_image(&garbage, 100), Err(MediaError::Corrupt(_))));
        assert!(matches!(
            decode_image(b"RIFF\x24\0\0\0WAVEfmt ", 100),
            Err(MediaError::Unsupported { found, .. }) if found == "audio/wav"
        ));
        assert!(matches!(probe_image(b"GIF89a....", 100), Err(MediaError::Unsupported { .. })));
    }

    #[test]
    fn a_huge_image_is_refused_from_its_header_at_once() {
        let bytes = crate::testing::inputs::png_header(10_000, 10_000);
        let started = Instant::now();
        let refused = decode_image(&bytes, 25_000_000);
        assert_eq!(refused, Err(MediaError::TooManyPixels { width: 10_000, height: 10_000, max: 25_000_000 }));
        assert!(started.elapsed() < Duration::from_millis(200), "took {:?}", started.elapsed());
        assert!(matches!(probe_image(&bytes, 25_000_000), Err(MediaError::TooManyPixels { .. })));
    }
}
