//! Test speech: sentences spoken by the `espeak-ng` program (run as a separate process), composed
//! with known silences between them, so voice-activity tests compare against boundaries measured
//! on the fixture itself; and WAV encoding of samples.

use std::io::Cursor;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::media::audio::{self, Audio};

/// The two sentences of [`speech`].
pub const SENTENCES: [&str; 2] =
    ["The quick brown fox jumps over the lazy dog.", "Kiln finds the speech in audio files."];

/// Silence before the first sentence, between the two and after the second, in seconds.
pub const GAPS_S: [f64; 3] = [1.5, 1.0, 1.0];

/// A 10 ms frame whose RMS is above this is sound (espeak's silences are digital zero).
const SOUND_RMS: f64 = 0.003;

/// Mono speech at espeak's own rate with the true stretches of speech, in seconds.
#[derive(Debug, Clone)]
pub struct Speech {
    pub audio: Audio,
    pub segments: Vec<(f64, f64)>,
}

/// `text` spoken by espeak-ng, at its own rate (22 050 Hz). Panics with the fix if the program is
/// missing.
pub fn espeak(text: &str) -> Audio {
    let path: PathBuf = std::env::temp_dir().join(format!("kiln-espeak-{}.wav", uuid::Uuid::new_v4().simple()));
    let status = Command::new("espeak-ng").arg("-w").arg(&path).arg(text).status().unwrap_or_else(|e| {
        panic!("cannot run espeak-ng ({e}): install it (Debian package espeak-ng; scripts/services.sh does)")
    });
    assert!(status.success(), "espeak-ng failed: {status}");
    let bytes = std::fs::read(&path).expect("espeak-ng's WAV");
    let _ = std::fs::remove_file(&path);
    audio::decode_wav(&bytes, 60).expect("espeak-ng writes a WAV we decode")
}

/// The sample range of `samples` from the first to the last 10 ms frame with sound in it.
pub fn sound_span(samples: &[f32], rate: u32) -> std::ops::Range<usize> {
    let frame = (rate / 100) as usize;
    let loud: Vec<bool> = samples
        .chunks(frame)
        .map(|f| (f.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / f.len() as f64).sqrt() > SOUND_RMS)
        .collect();
    let first = loud.iter().position(|&l| l).expect("espeak-ng produced sound");
    let last = loud.iter().rposition(|&l| l).expect("espeak-ng produced sound");
    first * frame..((last + 1) * frame).min(samples.len())
}

/// [`SENTENCES`] with espeak's own leading and trailing near-silence trimmed, between the silences
/// of [`GAPS_S`], at espeak's rate; made once per process.
pub fn speech() -> &'static Speech {
    static SPEECH: OnceLock<Speech> = OnceLock::new();
    SPEECH.get_or_init(|| {
        let spoken: Vec<Audio> = SENTENCES.iter().map(|s| espeak(s)).collect();
        let rate = spoken[0].rate;
        let silence = |s: f64| vec![0f32; (s * f64::from(rate)).round() as usize];
        let mut samples = silence(GAPS_S[0]);
        let mut segments = Vec::new();
        for (i, a) in spoken.iter().enumerate() {
            assert_eq!(a.rate, rate, "espeak-ng speaks every sentence at one rate");
            let span = sound_span(&a.samples, rate);
            let start = samples.len();
            samples.extend_from_slice(&a.samples[span]);
            segments.push((start as f64 / f64::from(rate), samples.len() as f64 / f64::from(rate)));
            samples.extend(silence(GAPS_S[i + 1]));
        }
        Speech { audio: Audio { samples, rate }, segments }
    })
}

/// [`speech`] as a 16-bit WAV at `rate` (resampled when that is not espeak's), with its true
/// segments in seconds.
pub fn speech_fixture(rate: u32) -> (Vec<u8>, Vec<(f64, f64)>) {
    let s = speech();
    let samples = audio::resample(&s.audio.samples, s.audio.rate, rate);
    (wav_bytes(&samples, rate), s.segments.clone())
}

/// Mono 16-bit PCM WAV bytes of `samples` (clamped to -1..1).
pub fn wav_bytes(samples: &[f32], rate: u32) -> Vec<u8> {
    let spec =
        hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut out = Cursor::new(Vec::new());
    let mut writer = hound::WavWriter::new(&mut out, spec).expect("WAV header");
    for &s in samples {
        writer.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).expect("WAV sample");
    }
    writer.finalize().expect("WAV end");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_has_two_sentences_at_the_stated_gaps() {
        let s = speech();
        assert_eq!(s.segments.len(), 2);
        let (a, b) = (s.segments[0], s.segments[1]);
        assert!((a.0 - GAPS_S[0]).abs() < 1e-9 && (b.0 - a.1 - GAPS_S[1]).abs() < 1e-3, "{:?}", s.segments);
        assert!(a.1 - a.0 > 1.0 && b.1 - b.0 > 1.0, "each sentence lasts over a second: {:?}", s.segments);
        assert!((s.audio.duration_s() - b.1 - GAPS_S[2]).abs() < 1e-3);
        let (wav, segments) = speech_fixture(8_000);
        let decoded = audio::decode_wav(&wav, 60).expect("decode");
        assert_eq!(decoded.rate, 8_000);
        assert!((decoded.duration_s() - s.audio.duration_s()).abs() < 1e-3);
        assert_eq!(segments, s.segments);
    }
}
