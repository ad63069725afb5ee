//! Input audio: WAV decoding to mono f32 and resampling.

// MINIMAL STAND-IN written by the `inputs` helper so the gateway can check audio inputs before
// the audio helper's module lands: only `probe_wav` and `WavInfo`, with the signature agreed in
// the brief. On merge, keep the audio helper's version of this file.

use super::MediaError;

/// What a WAV header says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WavInfo {
    pub rate: u32,
    pub channels: u16,
    pub duration_s: f64,
}

/// The rate, channels and duration of a WAV file, from its header.
pub fn probe_wav(bytes: &[u8]) -> Result<WavInfo, MediaError> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).map_err(|e| MediaError::Corrupt(e.to_string()))?;
    let spec = reader.spec();
    if spec.sample_rate == 0 || spec.channels == 0 {
        return Err(MediaError::Corrupt("the header says 0 Hz or 0 channels".into()));
    }
    let frames = reader.duration();
    Ok(WavInfo {
        rate: spec.sample_rate,
        channels: spec.channels,
        duration_s: f64::from(frames) / f64::from(spec.sample_rate),
    })
}
