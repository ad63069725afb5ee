//! Jobs with images and audio in, through the whole system on both backends, with the real
//! models: OCR of text rendered in the test (PP-OCRv4), image moderation (open-nsfw) — alone and
//! screening terrain images — and speech segments of speech synthesised in the test (silero VAD);
//! every input route (inline base64, data: URL, file:ID, https URL) giving the same output for the
//! same bytes; progress and cancellation of a long speech job; and the CLI's `run -i image=@…`
//! and `batch run --inputs` over a folder of scans.

use std::time::Duration;

use kiln_common::testing::Kind;
use kiln_common::testing::media::{TextLayout, render_text};
use kiln_common::testing::speech::{speech_fixture, wav_bytes};
use kiln_proto::JobId;
use kiln_worker::WorkerConfig;
use serde_json::{Value, json};

use crate::harness::{Env, Gateway, TERRAIN, TempRepo, Worker};

kiln_common::both_backends!(
    ocr_reads_rendered_text_back_exactly_from_every_input_route,
    moderation_scores_images_and_screens_terrain_jobs_that_ask,
    speech_segments_are_found_at_every_rate_and_long_audio_reports_progress_and_cancels,
);

const OCR: &str = "ppocr-v4";
const MODERATION: &str = "open-nsfw";
const VAD: &str = "silero-vad";
const T: Duration = Duration::from_secs(180);

fn worker_of(env: &Env, models: &[&str]) -> Worker {
    env.worker_with(WorkerConfig {
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        intra_threads: Some(2),
        ..WorkerConfig::default()
    })
}

fn png(image: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("PNG encodes");
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Submits and waits; insists the job succeeded.
async fn run_ok(gw: &Gateway, model: &str, input: Value) -> Value {
    let r = gw.submit(&json!({ "model": model, "input": input, "cache": false })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let job = gw.finished(id, T).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

/// Uploads `bytes` raw to `POST /v1/files`; the file id.
async fn upload(gw: &Gateway, bytes: Vec<u8>, content_type: &str) -> String {
    let r = gw.post_raw("/v1/files", Some(content_type), bytes).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

fn texts(job: &Value) -> Vec<String> {
    job["output"]["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap().to_owned()).collect()
}

async fn ocr_reads_rendered_text_back_exactly_from_every_input_route(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = worker_of(&env, &[OCR]);
    // GET /v1/models says which input fields are files.
    let models = gw.get("/v1/models").await.body;
    let ocr = models["data"].as_array().unwrap().iter().find(|m| m["name"] == OCR).expect("ppocr-v4 listed").clone();
    assert_eq!(
        (ocr["task"].as_str(), ocr["input_schema"]["properties"]["image"]["x-kiln-file"].as_str()),
        (Some("ocr"), Some("image")),
        "{ocr}"
    );
    let lines = ["Hello ONNX Runtime 2026", "Kiln reads 42 lines"];
    let scan = png(&render_text(&lines, 40.0, TextLayout::default()));

    let inline = run_ok(&gw, OCR, json!({ "image": b64(&scan) })).await;
    assert_eq!(texts(&inline), lines, "{inline}");
    assert_eq!(inline["output"]["text"], lines.join("\n"));
    let (first, second) = (&inline["output"]["lines"][0]["box"], &inline["output"]["lines"][1]["box"]);
    assert!(first[0][1].as_f64() < second[0][1].as_f64(), "the first line is above the second: {inline}");

    let id = upload(&gw, scan.clone(), "image/png").await;
    let routes = [json!(format!("data:image/png;base64,{}", b64(&scan))), json!(format!("file:{id}"))];
    for image in routes {
        let job = run_ok(&gw, OCR, json!({ "image": image })).await;
        assert_eq!(job["output"], inline["output"], "same bytes, same output ({image:.40})");
    }

    // Upside down: the angle classifier turns the lines back.
    let flipped = png(&image::imageops::rotate180(&render_text(&lines, 40.0, TextLayout::default())));
    let job = run_ok(&gw, OCR, json!({ "image": b64(&flipped) })).await;
    let mut read = texts(&job);
    read.sort();
    let mut want: Vec<String> = lines.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(read, want, "{job}");

    // A blank page has no lines.
    let blank = png(&image::RgbImage::from_pixel(400, 200, image::Rgb([255, 255, 255])));
    let job = run_ok(&gw, OCR, json!({ "image": b64(&blank) })).await;
    assert_eq!((job["output"]["lines"].as_array().map(Vec::len), job["output"]["text"].as_str()), (Some(0), Some("")));
    worker.stop().await;
    gw.stop().await;
}

async fn moderation_scores_images_and_screens_terrain_jobs_that_ask(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = worker_of(&env, &[MODERATION, TERRAIN]);
    let photo = png(&image::RgbImage::from_fn(320, 240, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])));
    let job = run_ok(&gw, MODERATION, json!({ "image": b64(&photo) })).await;
    let scores = &job["output"]["scores"];
    let (safe, nsfw) = (scores["safe"].as_f64().unwrap(), scores["nsfw"].as_f64().unwrap());
    assert!((safe + nsfw - 1.0).abs() < 1e-3 && nsfw < 0.8, "{job}");
    assert_eq!((job["output"]["width"].as_u64(), job["output"]["height"].as_u64()), (Some(320), Some(240)));

    // A terrain job that asks for moderation carries each image's scores.
    let input = json!({ "difficulty": 30, "seed": 5, "count": 2, "colormap": "terrain", "moderate": true });
    let job = run_ok(&gw, TERRAIN, input).await;
    let images = job["output"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{job}");
    for image in images {
        let nsfw = image["moderation"]["nsfw"].as_f64().expect("scores on every image");
        assert!(nsfw < 0.8, "benign terrain scores under the threshold: {job}");
    }
    assert!(job["output"].get("withheld").is_none(), "{job}");
    // One that does not ask has no scores.
    let job = run_ok(&gw, TERRAIN, json!({ "difficulty": 30, "seed": 5 })).await;
    assert!(job["output"]["images"][0].get("moderation").is_none(), "{job}");
    worker.stop().await;
    gw.stop().await;

    // With a threshold every image passes, each is withheld with its scores and why.
    let strict = TempRepo::new(|t| t.replace("threshold = 0.8", "threshold = 0.0"));
    let env = Env::new(kind).with_models(&strict);
    let gw = env.gateway().await;
    let worker = worker_of(&env, &[TERRAIN]);
    let job = run_ok(&gw, TERRAIN, json!({ "difficulty": 30, "seed": 5, "count": 2, "moderate": true })).await;
    assert_eq!(job["output"]["images"], json!([]), "{job}");
    let withheld = job["output"]["withheld"].as_array().unwrap();
    assert_eq!(withheld.iter().map(|w| w["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1], "{job}");
    assert!(withheld[0]["reason"].as_str().unwrap().contains("threshold"), "{job}");
    assert!(withheld[0]["moderation"]["nsfw"].as_f64().is_some(), "{job}");
    worker.stop().await;
    gw.stop().await;
}

fn close(found: &Value, want: &[(f64, f64)]) -> bool {
    let found: Vec<(f64, f64)> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start_s"].as_f64().unwrap(), s["end_s"].as_f64().unwrap()))
        .collect();
    found.len() == want.len()
        && found.iter().zip(want).all(|(f, w)| (f.0 - w.0).abs() <= 0.15 && (f.1 - w.1).abs() <= 0.15)
}

async fn speech_segments_are_found_at_every_rate_and_long_audio_reports_progress_and_cancels(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = worker_of(&env, &[VAD]);
    for rate in [8_000, 16_000, 44_100] {
        let (wav, truth) = speech_fixture(rate);
        let job = run_ok(&gw, VAD, json!({ "audio": b64(&wav), "pad_s": 0 })).await;
        assert!(close(&job["output"]["segments"], &truth), "at {rate} Hz, want {truth:?}: {job}");
        assert_eq!(job["output"]["sample_rate"], rate);
    }
    let silence = wav_bytes(&vec![0.0; 16_000 * 3], 16_000);
    let job = run_ok(&gw, VAD, json!({ "audio": b64(&silence) })).await;
    assert_eq!(job["output"]["segments"], json!([]), "{job}");

    // Long audio (10 min of low noise) reports progress in seconds and stops when canceled.
    let noise: Vec<f32> = (0..16_000u64 * 600).map(|i| ((i * 7919 % 200) as f32 - 100.0) / 20_000.0).collect();
    let id = upload(&gw, wav_bytes(&noise, 16_000), "audio/wav").await;
    let r = gw.submit(&json!({ "model": VAD, "input": { "audio": format!("file:{id}") } })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let seen = kiln_common::testing::wait_until("progress on the long speech job", T, || async {
        let record = gw.job(job).await;
        match record["progress"]["step"].as_u64() {
            Some(step) if step > 0 => Ok(record),
            _ => Err(record),
        }
    })
    .await;
    assert_eq!(seen["progress"]["total"], 600, "{seen}");
    let cancel = gw.http.post(gw.url(&format!("/v1/jobs/{job}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), 200);
    let done = gw.finished(job, T).await;
    assert_eq!(done["status"], "canceled", "{done}");
    let step = done["progress"]["step"].as_u64().unwrap();
    assert!(step < 600, "stopped before the end: {done}");
    worker.stop().await;
    gw.stop().await;
}
