//! Input audio: WAV probing (header only, for the gateway's checks), decoding to mono f32 (PCM 8, 16,
//! 24 and 32-bit integer or 32-bit float, any channel count, averaged) and band-limited resampling
//! to the model's rate (Kaiser-windowed sinc, polyphase).

use std::io::Cursor;

use super::MediaError;

/// What [`decode_wav`] takes: the kinds of WAV named in errors.
const EXPECTED: &str = "a WAV file (PCM 8/16/24/32-bit integer or 32-bit float)";

/// Sample rates accepted, in Hz. Below, nothing speech-like survives; above, the resampler's work
/// per output sample grows with no gain.
const MIN_RATE: u32 = 4_000;
const MAX_RATE: u32 = 384_000;

/// Mono audio, samples in -1..1.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub rate: u32,
}

impl Audio {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.rate)
    }
}

/// A WAV file's header: what it holds, without decoding a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WavInfo {
    pub rate: u32,
    pub channels: u16,
    pub duration_s: f64,
}

/// Reads a WAV file's header, refusing bytes that are not a WAV of a kind [`decode_wav`] takes, and
/// a data chunk that claims more bytes than there are (a truncated upload).
pub fn probe_wav(bytes: &[u8]) -> Result<WavInfo, MediaError> {
    header(bytes).map(|(_, info)| info)
}

/// hound reading a WAV held in memory.
type Reader<'a> = hound::WavReader<Cursor<&'a [u8]>>;

fn header(bytes: &[u8]) -> Result<(Reader<'_>, WavInfo), MediaError> {
    sniff(bytes)?;
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(wav_error)?;
    let (data_start, data_len) = data_chunk(bytes).ok_or_else(|| MediaError::Corrupt("no data chunk".into()))?;
    let available = bytes.len() as u64 - data_start;
    if data_len > available {
        return Err(MediaError::Corrupt(format!(
            "the data chunk claims {data_len} bytes but only {available} follow (truncated?)"
        )));
    }
    let spec = reader.spec();
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 8 | 16 | 24 | 32) | (hound::SampleFormat::Float, 32) => {}
        (format, bits) => {
            return Err(MediaError::Unsupported {
                expected: EXPECTED,
                found: format!("a WAV of {bits}-bit {format:?} samples"),
            });
        }
    }
    if !(MIN_RATE..=MAX_RATE).contains(&spec.sample_rate) {
        return Err(MediaError::Unsupported {
            expected: EXPECTED,
            found: format!("a WAV at {} Hz (accepted: {MIN_RATE}–{MAX_RATE} Hz)", spec.sample_rate),
        });
    }
    let info = WavInfo {
        rate: spec.sample_rate,
        channels: spec.channels,
        duration_s: f64::from(reader.duration()) / f64::from(spec.sample_rate),
    };
    Ok((reader, info))
}

/// Where the data chunk starts and how long it claims to be, walking the chunks as hound does
/// (which has parsed them already: this cannot fail where hound did not).
fn data_chunk(bytes: &[u8]) -> Option<(u64, u64)> {
    let mut at = 12usize;
    loop {
        let head = bytes.get(at..at + 8)?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if &head[..4] == b"data" {
            return Some((at as u64 + 8, u64::from(len)));
        }
        at = at.checked_add(8)?.checked_add(len as usize)?;
    }
}

/// Decodes a WAV file to mono f32 (channels averaged), refusing one longer than `max_s` seconds from
/// its header, before any sample is decoded.
pub fn decode_wav(bytes: &[u8], max_s: u32) -> Result<Audio, MediaError> {
    let (reader, info) = header(bytes)?;
    if info.duration_s > f64::from(max_s) {
        return Err(MediaError::TooLong { seconds: info.duration_s, max: max_s });
    }
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    let frames = reader.duration() as usize;
    let mut samples = Vec::with_capacity(frames);
    let mut acc = 0f32;
    let mut filled = 0;
    let mut push = |v: f32| {
        acc += v;
        filled += 1;
        if filled == channels {
            samples.push(acc / channels as f32);
            acc = 0.0;
            filled = 0;
        }
    };
    match spec.sample_format {
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            for s in reader.into_samples::<i32>() {
                push(s.map_err(wav_error)? as f32 * scale);
            }
        }
        hound::SampleFormat::Float => {
            for s in reader.into_samples::<f32>() {
                let v = s.map_err(wav_error)?;
                push(if v.is_finite() { v.clamp(-1.0, 1.0) } else { 0.0 });
            }
        }
    }
    Ok(Audio { samples, rate: spec.sample_rate })
}

fn wav_error(e: hound::Error) -> MediaError {
    match e {
        hound::Error::Unsupported => {
            MediaError::Unsupported { expected: EXPECTED, found: "a WAV of an unsupported encoding".into() }
        }
        hound::Error::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            MediaError::Corrupt("the file ends early (truncated?)".into())
        }
        other => MediaError::Corrupt(other.to_string()),
    }
}

/// Refuses bytes that are not a RIFF/WAVE file, naming what they look like.
fn sniff(bytes: &[u8]) -> Result<(), MediaError> {
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        return Ok(());
    }
    let found = match bytes {
        [0x89, b'P', b'N', b'G', ..] => "PNG",
        [0xFF, 0xD8, 0xFF, ..] => "JPEG",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "WebP",
        [b'G', b'I', b'F', b'8', ..] => "GIF",
        [b'f', b'L', b'a', b'C', ..] => "FLAC",
        [b'O', b'g', b'g', b'S', ..] => "Ogg",
        [b'I', b'D', b'3', ..] | [0xFF, 0xFB | 0xF3 | 0xF2, ..] => "MP3",
        [b'R', b'I', b'F', b'F', ..] => "a RIFF file that is not WAVE",
        [] => "nothing (empty)",
        _ => "an unknown format",
    };
    Err(MediaError::Unsupported { expected: EXPECTED, found: found.into() })
}

/// Zero crossings of the sinc on each side of an output sample (at the lower of the two rates):
/// with the Kaiser window below, a transition band of about 9 % of the lower rate.
const ZERO_CROSSINGS: usize = 24;
/// Kaiser β: about 70 dB of stop-band attenuation.
const KAISER_BETA: f64 = 6.8;
/// Where the pass band ends, as a fraction of the lower rate's Nyquist frequency; the transition
/// band straddles it, so what folds back lands above the pass band.
const CUTOFF: f64 = 0.955;
/// Filter phases precomputed at most; a ratio needing more uses the nearest of this many.
const MAX_PHASES: u64 = 4096;

/// Resamples `samples` from `from` Hz to `to` Hz with a band-limited (Kaiser-windowed sinc)
/// polyphase filter whose cut-off sits just below the lower rate's Nyquist frequency, so that
/// downsampling does not alias. The result has `round(len·to/from)` samples; the identity when the
/// rates are equal.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || samples.is_empty() || from == 0 || to == 0 {
        return samples.to_vec();
    }
    let g = gcd(u64::from(from), u64::from(to));
    let (up, down) = (u64::from(to) / g, u64::from(from) / g);
    let out_len = ((samples.len() as u64 * u64::from(to) + u64::from(from) / 2) / u64::from(from)) as usize;
    // The filter's cut-off in cycles per input sample ×2 (1 = the input's Nyquist frequency).
    let fc = CUTOFF * (f64::from(to) / f64::from(from)).min(1.0);
    let half = (ZERO_CROSSINGS as f64 / fc).ceil() as usize;
    let taps = 2 * half;
    let phases = up.min(MAX_PHASES) as usize;
    // Row p holds the weights for an output at input position (base + p/phases): the weight of
    // input sample base + 1 − half + k is h(p/phases + half − 1 − k).
    let mut table = vec![0f32; phases * taps];
    for (p, row) in table.chunks_exact_mut(taps).enumerate() {
        let frac = p as f64 / phases as f64;
        let mut sum = 0.0;
        let weights: Vec<f64> = (0..taps)
            .map(|k| {
                let x = frac + half as f64 - 1.0 - k as f64;
                let w = kernel(x, fc, half as f64);
                sum += w;
                w
            })
            .collect();
        // Unit gain at DC for every phase, whatever the truncation left.
        for (r, w) in row.iter_mut().zip(weights) {
            *r = (w / sum) as f32;
        }
    }
    let n = samples.len() as i64;
    let mut out = Vec::with_capacity(out_len);
    for i in 0..out_len as u64 {
        let num = i * down;
        let mut base = (num / up) as i64;
        let mut phase =
            if up <= MAX_PHASES { (num % up) as usize } else { (((num % up) * MAX_PHASES + up / 2) / up) as usize };
        if phase == phases {
            phase = 0;
            base += 1;
        }
        let row = &table[phase * taps..(phase + 1) * taps];
        let first = base + 1 - half as i64;
        let acc = if first >= 0 && first + taps as i64 <= n {
            let window = &samples[first as usize..first as usize + taps];
            window.iter().zip(row).map(|(x, w)| x * w).sum::<f32>()
        } else {
            // Near the ends: samples outside the input are zero.
            row.iter()
                .enumerate()
                .filter_map(|(k, w)| {
                    let j = first + k as i64;
                    (0..n).contains(&j).then(|| samples[j as usize] * w)
                })
                .sum::<f32>()
        };
        out.push(acc);
    }
    out
}

/// The windowed sinc at `x` input samples from the output position: `fc·sinc(fc·x)` under a Kaiser
/// window reaching zero at ±`half`.
fn kernel(x: f64, fc: f64, half: f64) -> f64 {
    let r = x / half;
    if r.abs() >= 1.0 {
        return 0.0;
    }
    let t = std::f64::consts::PI * fc * x;
    let sinc = if t.abs() < 1e-12 { 1.0 } else { t.sin() / t };
    fc * sinc * bessel_i0(KAISER_BETA * (1.0 - r * r).sqrt()) / bessel_i0(KAISER_BETA)
}

/// The modified Bessel function of the first kind, order 0 (its power series; β ≤ 10 here).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term) = (1.0, 1.0);
    let q = x * x / 4.0;
    for k in 1..50 {
        term *= q / (k * k) as f64;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f64, rate: u32, seconds: f64, amplitude: f64) -> Vec<f32> {
        let n = (seconds * f64::from(rate)).round() as usize;
        (0..n).map(|i| (amplitude * (std::f64::consts::TAU * freq * i as f64 / f64::from(rate)).sin()) as f32).collect()
    }

    /// The middle half, away from the zero-padded ends.
    fn middle(x: &[f32]) -> &[f32] {
        &x[x.len() / 4..3 * x.len() / 4]
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len() as f64).sqrt()
    }

    /// Frequency from the rising zero crossings (interpolated between samples).
    fn zero_crossing_freq(x: &[f32], rate: u32) -> f64 {
        let crossings: Vec<f64> = x
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] < 0.0 && w[1] >= 0.0)
            .map(|(i, w)| i as f64 + f64::from(w[0]) / f64::from(w[0] - w[1]))
            .collect();
        let (first, last) = (crossings[0], crossings[crossings.len() - 1]);
        (crossings.len() - 1) as f64 * f64::from(rate) / (last - first)
    }

    /// The frequency (1 Hz steps in `lo..=hi`) where a Hann-windowed DFT of `x` peaks.
    fn dft_peak(x: &[f32], rate: u32, lo: u32, hi: u32) -> u32 {
        let n = x.len() as f64;
        let power = |f: u32| {
            let (mut re, mut im) = (0.0, 0.0);
            for (i, &v) in x.iter().enumerate() {
                let w = 0.5 - 0.5 * (std::f64::consts::TAU * i as f64 / n).cos();
                let a = std::f64::consts::TAU * f64::from(f) * i as f64 / f64::from(rate);
                re += w * f64::from(v) * a.cos();
                im -= w * f64::from(v) * a.sin();
            }
            re * re + im * im
        };
        (lo..=hi).max_by(|&a, &b| power(a).total_cmp(&power(b))).expect("a range")
    }

    fn wav(samples: &[f32], rate: u32, channels: u16, bits: u16, format: hound::SampleFormat) -> Vec<u8> {
        let spec = hound::WavSpec { channels, sample_rate: rate, bits_per_sample: bits, sample_format: format };
        let mut out = Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut out, spec).expect("writer");
        for &s in samples {
            match (format, bits) {
                (hound::SampleFormat::Float, _) => w.write_sample(s).expect("write"),
                (hound::SampleFormat::Int, 8) => w.write_sample((s * 127.0).round() as i8).expect("write"),
                (hound::SampleFormat::Int, 16) => w.write_sample((s * 32767.0).round() as i16).expect("write"),
                (hound::SampleFormat::Int, b) => {
                    w.write_sample((f64::from(s) * ((1i64 << (b - 1)) - 1) as f64).round() as i32).expect("write")
                }
            }
        }
        w.finalize().expect("finalize");
        out.into_inner()
    }

    #[test]
    fn a_1khz_tone_keeps_its_frequency_and_amplitude_to_16k() {
        for from in [44_100, 8_000, 22_050, 48_000] {
            let x = sine(1000.0, from, 1.0, 0.5);
            let y = resample(&x, from, 16_000);
            assert_eq!(y.len(), (x.len() as f64 * 16_000.0 / f64::from(from)).round() as usize, "from {from}");
            let m = middle(&y);
            let f = zero_crossing_freq(m, 16_000);
            assert!((f - 1000.0).abs() < 1.0, "from {from}: {f} Hz");
            assert_eq!(dft_peak(m, 16_000, 900, 1100), 1000, "from {from}");
            let amplitude = rms(m) * std::f64::consts::SQRT_2;
            assert!((amplitude - 0.5).abs() < 0.5 * 0.02, "from {from}: amplitude {amplitude}");
        }
    }

    #[test]
    fn downsampling_keeps_the_pass_band_and_removes_what_would_alias() {
        let x7 = sine(7000.0, 44_100, 1.0, 0.5);
        let y7 = resample(&x7, 44_100, 16_000);
        let a7 = rms(middle(&y7)) * std::f64::consts::SQRT_2;
        assert!((a7 - 0.5).abs() < 0.5 * 0.05, "7 kHz amplitude {a7}");
        assert_eq!(dft_peak(middle(&y7), 16_000, 6800, 7200), 7000);
        // 10 kHz is above the new Nyquist frequency: without filtering it would fold to 6 kHz.
        let x10 = sine(10_000.0, 44_100, 1.0, 0.5);
        let a10 = rms(middle(&resample(&x10, 44_100, 16_000))) * std::f64::consts::SQRT_2;
        eprintln!("7 kHz kept at {:.4} of its amplitude, 10 kHz at {:.6}", a7 / 0.5, a10 / 0.5);
        assert!(a10 < 0.5 * 0.003, "10 kHz amplitude {a10} (at least 50 dB down)");
    }

    #[test]
    fn resampling_is_the_identity_at_equal_rates_and_sizes_round() {
        let x = sine(440.0, 16_000, 0.1, 0.3);
        assert_eq!(resample(&x, 16_000, 16_000), x);
        assert_eq!(resample(&[0.1; 1001], 44_100, 16_000).len(), 363);
        assert_eq!(resample(&[0.1; 3], 8_000, 16_000).len(), 6);
        assert!(resample(&[], 8_000, 16_000).is_empty());
    }

    #[test]
    fn stereo_is_averaged_to_mono() {
        // Left 0.5, right −0.25, interleaved.
        let frames: Vec<f32> = (0..100).flat_map(|_| [0.5, -0.25]).collect();
        let audio = decode_wav(&wav(&frames, 16_000, 2, 16, hound::SampleFormat::Int), 10).expect("decode");
        assert_eq!(audio.rate, 16_000);
        assert_eq!(audio.samples.len(), 100);
        assert!(audio.samples.iter().all(|&s| (s - 0.125).abs() < 1e-4), "{:?}", &audio.samples[..4]);
        let info = probe_wav(&wav(&frames, 16_000, 2, 16, hound::SampleFormat::Int)).expect("probe");
        assert_eq!(info, WavInfo { rate: 16_000, channels: 2, duration_s: 100.0 / 16_000.0 });
    }

    #[test]
    fn every_sample_format_decodes_to_the_same_signal() {
        let x = sine(300.0, 8_000, 0.05, 0.8);
        for (bits, format, tolerance) in [
            (8, hound::SampleFormat::Int, 1.0 / 100.0),
            (16, hound::SampleFormat::Int, 1e-4),
            (24, hound::SampleFormat::Int, 1e-6),
            (32, hound::SampleFormat::Int, 1e-6),
            (32, hound::SampleFormat::Float, 1e-7),
        ] {
            let audio = decode_wav(&wav(&x, 8_000, 1, bits, format), 10).expect("decode");
            assert_eq!(audio.samples.len(), x.len());
            let worst = audio.samples.iter().zip(&x).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < tolerance, "{bits}-bit {format:?}: off by {worst}");
        }
    }

    #[test]
    fn too_long_is_refused_from_the_header() {
        let bytes = wav(&vec![0.0; 16_000 * 3], 16_000, 1, 16, hound::SampleFormat::Int);
        assert_eq!(decode_wav(&bytes, 2), Err(MediaError::TooLong { seconds: 3.0, max: 2 }));
        // A header claiming an hour with none of it there is a truncated file, refused as such by
        // the header check alone.
        let mut claims_an_hour = bytes[..44].to_vec();
        let data_len = 16_000u32 * 2 * 3600;
        claims_an_hour[40..44].copy_from_slice(&data_len.to_le_bytes());
        assert!(matches!(probe_wav(&claims_an_hour), Err(MediaError::Corrupt(_))));
        assert_eq!(decode_wav(&bytes, 3).map(|a| a.samples.len()), Ok(48_000));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_refused() {
        let bytes = wav(&vec![0.1; 1000], 16_000, 1, 16, hound::SampleFormat::Int);
        for cut in [bytes.len() - 1, bytes.len() - 500, 30, 12] {
            assert!(matches!(decode_wav(&bytes[..cut], 10), Err(MediaError::Corrupt(_))), "cut at {cut}");
            assert!(matches!(probe_wav(&bytes[..cut]), Err(MediaError::Corrupt(_))), "cut at {cut}");
        }
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, b'I', b'H', b'D', b'R'];
        match decode_wav(&png, 10) {
            Err(MediaError::Unsupported { found, .. }) => assert_eq!(found, "PNG"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(probe_wav(b""), Err(MediaError::Unsupported { .. })));
        let mut webp = b"RIFF\0\0\0\0WEBPVP8 ".to_vec();
        webp.extend([0; 16]);
        assert!(matches!(probe_wav(&webp), Err(MediaError::Unsupported { .. })));
    }
}
