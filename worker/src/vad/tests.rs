//! silero VAD on the real model: speech made by espeak-ng with known silences, found at the same
//! boundaries whatever the input's rate; silence and noise give nothing; progress, cancellation and
//! the carried state. The segmentation rules alone on made-up probabilities.

use std::path::PathBuf;
use std::time::Instant;

use kiln_common::media::audio;
use kiln_common::testing::speech;

use super::*;
use crate::noise::Noise;

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (set by `scripts/test.sh`), else the pinned build
/// in the cache folder, fetched when missing.
fn environment() -> &'static Environment {
    let dylib = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| {
        kiln_common::assets::ensure_onnxruntime(&kiln_common::config::default_cache_dir())
            .expect("ONNX Runtime: set ORT_DYLIB_PATH or let the test fetch it")
    });
    runtime::environment(&dylib).expect("ONNX Runtime loads")
}

fn pipeline() -> VadPipeline {
    let model = kiln_common::config::default_cache_dir().join("models/silero-vad/6.2.3/silero_vad.onnx");
    assert!(model.is_file(), "{} is missing: run `kiln fetch silero-vad` (models/silero-vad)", model.display());
    let (vad, provider) =
        VadPipeline::load(&model, environment(), &[ExecutionProvider::Cpu], Threads { intra: 1, spin: false })
            .expect("silero VAD loads");
    assert_eq!(provider, ExecutionProvider::Cpu);
    // The real graph's names (inputs input, state, sr were checked at load).
    assert_eq!((vad.probability.as_str(), vad.state_out.as_str()), ("output", "stateN"));
    vad
}

const OPTS: VadOptions = VadOptions { threshold: 0.5, min_speech_s: 0.25, min_silence_s: 0.1, pad_s: 0.0 };
const TOLERANCE_S: f64 = 0.15;

/// WAV bytes → mono 16 kHz, through the same API the worker uses.
fn to_16k(wav: &[u8]) -> Vec<f32> {
    let a = audio::decode_wav(wav, 600).expect("decode");
    audio::resample(&a.samples, a.rate, RATE)
}

fn run(vad: &mut VadPipeline, samples: &[f32], opts: &VadOptions) -> Vec<SpeechSegment> {
    vad.segments(samples, opts, &mut |_, _| true).expect("runs").expect("not canceled")
}

fn assert_near(found: &[SpeechSegment], truth: &[(f64, f64)], what: &str) {
    assert_eq!(found.len(), truth.len(), "{what}: found {found:?}, truth {truth:?}");
    for (f, t) in found.iter().zip(truth) {
        assert!(
            (f.start_s - t.0).abs() <= TOLERANCE_S && (f.end_s - t.1).abs() <= TOLERANCE_S,
            "{what}: found {found:?}, truth {truth:?}"
        );
    }
}

#[test]
fn finds_the_two_sentences_at_their_true_boundaries() {
    let mut vad = pipeline();
    let (wav, truth) = speech::speech_fixture(speech::speech().audio.rate);
    let found = run(&mut vad, &to_16k(&wav), &OPTS);
    eprintln!("truth {truth:?}\nfound {found:?}");
    assert_near(&found, &truth, "espeak's rate");
}

#[test]
fn the_input_rate_does_not_move_the_boundaries() {
    let mut vad = pipeline();
    let (wav, truth) = speech::speech_fixture(16_000);
    let reference = run(&mut vad, &to_16k(&wav), &OPTS);
    assert_near(&reference, &truth, "16 kHz");
    for rate in [8_000, 44_100] {
        let (wav, _) = speech::speech_fixture(rate);
        let found = run(&mut vad, &to_16k(&wav), &OPTS);
        eprintln!("{rate} Hz: {found:?}");
        assert_near(&found, &truth, &format!("{rate} Hz against the truth"));
        let as_truth: Vec<(f64, f64)> = reference.iter().map(|s| (s.start_s, s.end_s)).collect();
        assert_near(&found, &as_truth, &format!("{rate} Hz against 16 kHz"));
    }
}

#[test]
fn padding_widens_within_the_audio() {
    let mut vad = pipeline();
    let (wav, _) = speech::speech_fixture(16_000);
    let samples = to_16k(&wav);
    let plain = run(&mut vad, &samples, &OPTS);
    let padded = run(&mut vad, &samples, &VadOptions { pad_s: 0.2, ..OPTS });
    assert_eq!(plain.len(), padded.len());
    for (p, q) in plain.iter().zip(&padded) {
        assert!(
            (p.start_s - q.start_s - 0.2).abs() < 1e-9 && (q.end_s - p.end_s - 0.2).abs() < 1e-9,
            "{plain:?} → {padded:?}"
        );
    }
}

#[test]
fn silence_and_low_noise_are_not_speech() {
    let mut vad = pipeline();
    let silence = vec![0f32; 5 * RATE as usize];
    assert_eq!(run(&mut vad, &silence, &OPTS), vec![]);
    let noise = Noise::new(7).fill(5 * RATE as usize, 0.01);
    assert_eq!(run(&mut vad, &noise, &OPTS), vec![]);
    let mut stream = VadStream::default();
    let worst = noise.chunks(CHUNK).map(|c| vad.probability(&mut stream, c).expect("runs")).fold(0f32, f32::max);
    eprintln!("highest speech probability in white noise at 0.01: {worst:.4}");
}

#[test]
fn progress_is_reported_about_every_second_and_cancel_stops_at_once() {
    let mut vad = pipeline();
    let (wav, _) = speech::speech_fixture(16_000);
    let samples = to_16k(&wav);
    let mut reports = Vec::new();
    run_with(&mut vad, &samples, &mut |done, total| {
        reports.push((done, total));
        true
    });
    assert_eq!(reports.last(), Some(&(samples.len(), samples.len())), "{reports:?}");
    assert!(reports.windows(2).all(|w| w[1].0 > w[0].0 && w[1].0 - w[0].0 <= CHUNKS_PER_REPORT * CHUNK), "{reports:?}");
    assert_eq!(reports.len(), samples.len().div_ceil(CHUNK).div_ceil(CHUNKS_PER_REPORT));

    let mut calls = Vec::new();
    let out = vad
        .segments(&samples, &OPTS, &mut |done, total| {
            calls.push((done, total));
            false
        })
        .expect("runs");
    assert_eq!(out, None);
    assert_eq!(calls, vec![(CHUNKS_PER_REPORT * CHUNK, samples.len())], "stopped at the first report");
}

fn run_with(vad: &mut VadPipeline, samples: &[f32], on_chunk: &mut dyn FnMut(usize, usize) -> bool) {
    vad.segments(samples, &OPTS, on_chunk).expect("runs").expect("not canceled");
}

#[test]
fn the_state_is_carried_from_chunk_to_chunk() {
    let mut vad = pipeline();
    let (wav, _) = speech::speech_fixture(16_000);
    let samples = to_16k(&wav);
    let chunks: Vec<&[f32]> = samples.chunks(CHUNK).collect();
    let mut one = VadStream::default();
    let whole: Vec<f32> = chunks.iter().map(|c| vad.probability(&mut one, c).expect("runs")).collect();

    // The same stream driven in two halves gives the same probabilities and segments as segments().
    let half = chunks.len() / 2;
    let mut two = VadStream::default();
    let mut halves: Vec<f32> = chunks[..half].iter().map(|c| vad.probability(&mut two, c).expect("runs")).collect();
    halves.extend(chunks[half..].iter().map(|c| vad.probability(&mut two, c).expect("runs")));
    assert_eq!(whole, halves);
    let mut segmenter = Segmenter::new(&OPTS);
    for (i, &p) in halves.iter().enumerate() {
        segmenter.push(i * CHUNK, p);
    }
    assert_eq!(segmenter.finish(samples.len()), run(&mut vad, &samples, &OPTS));

    // A fresh state in the middle of the first sentence changes what follows: the state matters.
    let (a_start, a_end) = speech::speech().segments[0];
    let mid = ((a_start + a_end) / 2.0 * f64::from(RATE)) as usize / CHUNK;
    let mut reset = VadStream::default();
    let fresh: Vec<f32> = chunks[mid..mid + 10].iter().map(|c| vad.probability(&mut reset, c).expect("runs")).collect();
    let differs = whole[mid..mid + 10].iter().zip(&fresh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("carried {:?}\nfresh   {fresh:?}", &whole[mid..mid + 10]);
    assert!(differs > 0.05, "a reset state gives the same probabilities (max difference {differs})");
}

#[test]
fn real_time_factor_on_ten_seconds() {
    let mut vad = pipeline();
    let (wav, _) = speech::speech_fixture(16_000);
    let mut samples = to_16k(&wav);
    samples.resize(10 * RATE as usize, 0.0);
    let started = Instant::now();
    run(&mut vad, &samples, &OPTS);
    let took = started.elapsed().as_secs_f64();
    eprintln!("10 s of audio in {:.1} ms: real-time factor {:.4} (1 intra-op thread)", took * 1e3, took / 10.0);
}

// The segmentation rules on made-up probabilities, one per chunk of 512 samples (32 ms).

fn segments_of(probs: &[f32], opts: &VadOptions) -> Vec<(f64, f64)> {
    let mut s = Segmenter::new(opts);
    for (i, &p) in probs.iter().enumerate() {
        s.push(i * CHUNK, p);
    }
    s.finish(probs.len() * CHUNK).into_iter().map(|s| (s.start_s, s.end_s)).collect()
}

fn at(chunk: usize) -> f64 {
    (chunk * CHUNK) as f64 / f64::from(RATE)
}

#[test]
fn speech_ends_only_below_the_lower_threshold_after_the_minimum_silence() {
    let opts = VadOptions { threshold: 0.5, min_speech_s: 0.1, min_silence_s: 0.1, pad_s: 0.0 };
    // 10 chunks speech, 5 at 0.4 (between the thresholds: still speech), 10 speech, then silence.
    let mut p = vec![0.0; 5];
    p.extend([0.9; 10]);
    p.extend([0.4; 5]);
    p.extend([0.9; 10]);
    p.extend([0.0; 10]);
    assert_eq!(segments_of(&p, &opts), vec![(at(5), at(30))]);
    // Two chunks (64 ms) under the lower threshold are shorter than the minimum silence.
    let mut p = vec![0.9; 10];
    p.extend([0.1; 2]);
    p.extend([0.9; 10]);
    assert_eq!(segments_of(&p, &opts), vec![(0.0, at(22))]);
    // As in silero, the silence is timed from the start of its first chunk to the start of the
    // latest: four chunks reach 96 ms (speech goes on), five 128 ms (it ended at the first).
    let mut p = vec![0.9; 10];
    p.extend([0.1; 4]);
    p.extend([0.9; 10]);
    assert_eq!(segments_of(&p, &opts), vec![(0.0, at(24))]);
    let mut p = vec![0.9; 10];
    p.extend([0.1; 5]);
    p.extend([0.9; 10]);
    assert_eq!(segments_of(&p, &opts), vec![(0.0, at(10)), (at(15), at(25))]);
}

#[test]
fn short_speech_is_dropped_and_padding_stops_at_neighbours_and_ends() {
    let opts = VadOptions { threshold: 0.5, min_speech_s: 0.25, min_silence_s: 0.1, pad_s: 0.0 };
    // 5 chunks = 160 ms of speech: dropped.
    let mut p = vec![0.0; 10];
    p.extend([0.9; 5]);
    p.extend([0.0; 10]);
    assert_eq!(segments_of(&p, &opts), vec![]);
    // Padding 0.1 s: the first starts at 0 (not before), a 6-chunk gap (192 ms < 2 × pad) is split
    // halfway, and the last ends at the end of the audio.
    let opts = VadOptions { pad_s: 0.1, ..opts };
    let mut p = vec![0.0; 1];
    p.extend([0.9; 10]);
    p.extend([0.0; 6]);
    p.extend([0.9; 10]);
    p.extend([0.0; 1]);
    let found = segments_of(&p, &opts);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0, 0.0);
    assert!((found[0].1 - at(14)).abs() < 1e-9 && (found[1].0 - at(14)).abs() < 1e-9, "{found:?}");
    assert_eq!(found[1].1, at(28));
}
