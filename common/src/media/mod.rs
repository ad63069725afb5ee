//! Decoding binary job inputs, shared by the gateway (which checks every input before accepting
//! the job, so a corrupt or oversized file is a 4xx, never a worker crash) and the worker (which
//! decodes it again to run it, trusting nothing off the store). Images: PNG, JPEG, WebP, with
//! EXIF orientation applied, bounded in pixels from the header before any pixel is decoded
//! ([`image`]). Audio: WAV, mixed to mono f32 and resampled to the model's rate ([`audio`]).

pub mod audio;
pub mod image;

/// Why a binary input cannot be used. Each names what is wrong in words a client can act on; the
/// gateway maps them to `422 invalid_input` naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MediaError {
    /// Not a format the field takes (sniffed from the bytes, not the declared type).
    #[error("is not {expected} (the bytes look like {found})")]
    Unsupported { expected: &'static str, found: String },
    /// The image is larger than the model's `max_pixels` (read from its header, not decoded).
    #[error("is {width}×{height} pixels; at most {max} pixels are accepted")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    /// The audio is longer than the model's `max_audio_s`.
    #[error("is {seconds:.1} s long; at most {max} s are accepted")]
    TooLong { seconds: f64, max: u32 },
    /// The bytes claim a format but do not decode.
    #[error("cannot be decoded: {0}")]
    Corrupt(String),
}
