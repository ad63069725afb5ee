//! Image generation with the real terrain model, on both backends: outputs served with their
//! content type, length and ETag, determinism by seed (image i of seed s is image 0 of seed s+i),
//! PNGs that decode at the requested size, per-image progress over SSE, cancellation between
//! images, and input errors naming their field; and a Stable-Diffusion-style export (generated
//! tiny graphs with the real signatures) dropped into a model folder serving text-to-image jobs
//! with per-step progress and cancellation.

use std::time::Duration;

use kiln_common::testing::Kind;
use kiln_proto::JobId;
use kiln_worker::WorkerConfig;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{Env, Gateway, SseClient, TERRAIN, Worker};

kiln_common::both_backends!(
    terrain_images_are_served_with_etags_and_reproducible_by_seed,
    progress_streams_per_image_and_cancel_stops_before_the_next_image,
    bad_image_inputs_name_their_field,
    text_to_image_runs_a_dropped_in_diffusion_export,
    image_progress_reaches_webhooks,
    a_superseded_run_cannot_overwrite_the_images_a_record_lists,
);

const T: Duration = Duration::from_secs(180);

fn image_worker(env: &Env) -> Worker {
    env.worker_with(WorkerConfig { models: vec![TERRAIN.into()], intra_threads: Some(2), ..WorkerConfig::default() })
}

/// Submits, waits for the job to finish and insists it succeeded.
async fn generate(gw: &Gateway, input: Value) -> Value {
    generate_with(gw, TERRAIN, input).await
}

/// Downloads a listed file, checking headers against the listing; returns the bytes.
async fn download(gw: &Gateway, file: &Value) -> Vec<u8> {
    let resp = gw.http.get(gw.url(file["url"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{file}");
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-length"].to_str().unwrap(), file["size"].to_string());
    assert_eq!(h["etag"].to_str().unwrap(), format!("\"{}\"", file["sha256"].as_str().unwrap()));
    let bytes = resp.bytes().await.unwrap().to_vec();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), file["sha256"].as_str().unwrap(), "body matches its sha256");
    bytes
}

/// Regression (issue 12.4): every run wrote `image-{i}.png`, so a late duplicate run could
/// overwrite a file whose sha256 the finished record already held.
async fn a_superseded_run_cannot_overwrite_the_images_a_record_lists(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let r = gw
        .submit(&json!({ "model": TERRAIN, "input": { "difficulty": 20, "seed": 3, "width": 64, "height": 48 } }))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    // A first run starts it and goes quiet (a worker stalled past its consumer timeout, say): the
    // message is delivered again and the worker's run supersedes it.
    assert_eq!(
        env.backend.store.start(id, "stalled-worker").await.unwrap(),
        kiln_common::store::Start::Started { attempt: 1 }
    );
    let worker = image_worker(&env);
    let job = gw.finished(id, T).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("succeeded"), Some(2)), "{job}");
    let file = job["output"]["images"][0].clone();
    // The stalled run wakes up and stores its image, under any name it could use.
    let bogus = axum::body::Bytes::from_static(b"\x89PNG not the image the record lists");
    for name in ["image-0.png", "r1-image-0.png"] {
        env.backend.outputs.put(id, name, "image/png", bogus.clone()).await.unwrap();
    }
    download(&gw, &file).await;
    worker.stop().await;
    gw.stop().await;
}

fn decode(bytes: &[u8]) -> png::OutputInfo {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).expect("PNG data")
}

async fn terrain_images_are_served_with_etags_and_reproducible_by_seed(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = image_worker(&env);
    let job = generate(
        &gw,
        json!({ "difficulty": 30, "seed": 11, "count": 2, "width": 96, "height": 64, "colormap": "terrain" }),
    )
    .await;
    let files = job["output"]["images"].as_array().unwrap().clone();
    assert_eq!(files.len(), 2, "{job}");
    assert_eq!((job["output"]["seed"].as_u64(), files[1]["seed"].as_u64()), (Some(11), Some(12)));
    assert_eq!(job["progress"], json!({ "step": 2, "total": 2 }));
    for file in &files {
        let info = decode(&download(&gw, file).await);
        assert_eq!((info.width, info.height, info.color_type), (96, 64, png::ColorType::Rgb));
    }
    assert_ne!(files[0]["sha256"], files[1]["sha256"], "different seeds, different images");

    // Conditional GET, unknown names and jobs.
    let url = gw.url(files[0]["url"].as_str().unwrap());
    let etag = format!("\"{}\"", files[0]["sha256"].as_str().unwrap());
    let not_modified = gw.http.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);
    let id = job["id"].as_str().unwrap();
    let missing = gw.get(&format!("/v1/jobs/{id}/outputs/image-9.png")).await;
    assert_eq!((missing.status, missing.body["error"]["code"].as_str()), (404, Some("output_not_found")));
    let unsafe_name = gw.get(&format!("/v1/jobs/{id}/outputs/..%2Fx")).await;
    assert_eq!(unsafe_name.status, 404);
    let no_job = gw.get(&format!("/v1/jobs/{}/outputs/image-0.png", JobId::random())).await;
    assert_eq!(no_job.status, 404);

    // The same seed and parameters: byte-identical images; image 1 of seed 11 is image 0 of seed 12.
    let again = generate(
        &gw,
        json!({ "difficulty": 30, "seed": 11, "count": 2, "width": 96, "height": 64, "colormap": "terrain" }),
    )
    .await;
    let shas =
        |j: &Value| j["output"]["images"].as_array().unwrap().iter().map(|f| f["sha256"].clone()).collect::<Vec<_>>();
    assert_eq!(shas(&again), shas(&job));
    let alone =
        generate(&gw, json!({ "difficulty": 30, "seed": 12, "width": 96, "height": 64, "colormap": "terrain" })).await;
    assert_eq!(shas(&alone), [files[1]["sha256"].clone()]);
    // Without a seed, one is drawn and reported; gray is a 16-bit heightmap at the native size.
    let drawn = generate(&gw, json!({ "difficulty": 70 })).await;
    assert!(drawn["output"]["seed"].is_u64(), "{drawn}");
    let file = &drawn["output"]["images"][0];
    let info = decode(&download(&gw, file).await);
    assert_eq!((info.width, info.height, info.bit_depth), (128, 128, png::BitDepth::Sixteen));
    worker.stop().await;
    gw.stop().await;
}

async fn progress_streams_per_image_and_cancel_stops_before_the_next_image(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = image_worker(&env);
    let r = gw.submit(&json!({ "model": TERRAIN, "input": { "difficulty": 50, "seed": 5, "count": 64 } })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let mut sse = SseClient::open(&gw, id, None).await;
    let mut steps = Vec::new();
    while steps.len() < 2 {
        let e = sse.next().await.expect("events until the second image");
        if e.event == "progress" {
            assert_eq!(e.data["total"], 64, "{e:?}");
            steps.push(e.data["step"].as_u64().unwrap());
        }
    }
    assert_eq!(steps, [1, 2], "one progress event per image, in order");
    let canceled = gw.http.post(gw.url(&format!("/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(canceled.status(), 200);
    let at_cancel: Value = canceled.json().await.unwrap();
    let done = at_cancel["progress"]["step"].as_u64().unwrap();
    let rest = sse.rest().await;
    assert_eq!(rest.last().map(|e| e.data["status"].clone()), Some(json!("canceled")), "{rest:?}");
    // The worker finishes the image in hand and takes the next job only once it stopped: when
    // this one-image job is done, the canceled job's run is over.
    generate(&gw, json!({ "difficulty": 50, "seed": 6 })).await;
    let stored = |i: u64| {
        let gw = &gw;
        async move { gw.get(&format!("/v1/jobs/{id}/outputs/image-{i}.png")).await.status }
    };
    assert_eq!(stored(done - 1).await, 200, "image {} was stored before the cancel", done - 1);
    // Image `done` may have been in the model when the cancel landed; the one after never starts.
    assert_eq!(stored(done + 1).await, 404, "an image after the cancel was made (cancel at step {done})");
    let job = gw.job(id).await;
    assert_eq!((job["status"].as_str(), job["error"]["code"].as_str()), (Some("canceled"), Some("canceled")), "{job}");
    worker.stop().await;
    gw.stop().await;
}

async fn bad_image_inputs_name_their_field(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    for (input, field) in [
        (json!({ "difficulty": 0 }), "input.difficulty"),
        (json!({ "difficulty": "high" }), "input.difficulty"),
        (json!({ "seed": 3 }), "input.difficulty"),
        (json!({ "difficulty": 5, "count": 65 }), "input.count"),
        (json!({ "difficulty": 5, "width": 8 }), "input.width"),
        (json!({ "difficulty": 5, "colormap": "viridis" }), "input.colormap"),
        (json!({ "difficulty": 5, "prompt": "a hill" }), "input.prompt"),
    ] {
        let r = gw.submit(&json!({ "model": TERRAIN, "input": input })).await;
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (422, Some("invalid_input")), "{input}: {}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{input}: {message}");
    }
    // The models listing publishes the schema the errors come from.
    let models = gw.get("/v1/models").await;
    let terrain = models.body["data"].as_array().and_then(|m| m.iter().find(|m| m["name"] == TERRAIN)).cloned();
    let terrain = terrain.unwrap_or_else(|| panic!("{TERRAIN} listed: {}", models.body));
    assert_eq!(terrain["task"], "image-generation");
    assert_eq!(terrain["input_schema"]["properties"]["difficulty"]["maximum"], 100);
    gw.stop().await;
}

/// A model repository holding one tiny Stable-Diffusion-style export, `tiny-sd`.
struct DiffusionRepo(std::path::PathBuf);

impl DiffusionRepo {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-sd-{}", kiln_common::testing::unique_prefix()));
        let model = dir.join("tiny-sd");
        kiln_common::testing::onnx::write_tiny_stable_diffusion(&model, &Default::default()).unwrap();
        let toml = "task = \"text-to-image\"\nversion = \"1\"\nmax_batch = 1\nexecution_providers = [\"cpu\"]\n\
                    [files]\n[limits]\ndefault_width = 64\ndefault_height = 64\n";
        std::fs::write(model.join("kiln.toml"), toml).unwrap();
        Self(dir)
    }
}

impl Drop for DiffusionRepo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn text_to_image_runs_a_dropped_in_diffusion_export(kind: Kind) {
    let repo = DiffusionRepo::new();
    let mut env = Env::new(kind);
    env.repo = kiln_common::models::ModelRepository::load(&repo.0).unwrap();
    let gw = env.gateway().await;
    let worker = env.worker_with(WorkerConfig {
        models: vec!["tiny-sd".into()],
        intra_threads: Some(1),
        ..WorkerConfig::default()
    });
    let input = json!({ "prompt": "a small red kiln", "steps": 4, "count": 2, "width": 64, "height": 48, "scheduler": "ddim", "seed": 3 });
    let r = gw.submit(&json!({ "model": "tiny-sd", "input": input })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let events = SseClient::open(&gw, id, None).await.rest().await;
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| (e.data["step"].as_u64().unwrap(), e.data["total"].as_u64().unwrap()))
        .collect();
    assert!(progress.iter().all(|&(_, total)| total == 8), "steps count over both images: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0].0 < w[1].0), "progress only moves forward: {progress:?}");
    assert_eq!(progress.last(), Some(&(8, 8)), "{progress:?}");
    let job = gw.job(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let files = job["output"]["images"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    for file in files {
        let info = decode(&download(&gw, file).await);
        assert_eq!((info.width, info.height, info.color_type), (64, 48, png::ColorType::Rgb));
    }
    assert_ne!(files[0]["sha256"], files[1]["sha256"], "seeds 3 and 4 differ");
    let again = generate_with(
        &gw,
        "tiny-sd",
        json!({ "prompt": "a small red kiln", "steps": 4, "width": 64, "height": 48, "scheduler": "ddim", "seed": 4 }),
    )
    .await;
    assert_eq!(again["output"]["images"][0]["sha256"], files[1]["sha256"], "image 1 of seed 3 is image 0 of seed 4");
    let bad = gw.submit(&json!({ "model": "tiny-sd", "input": { "prompt": "x", "width": 60 } })).await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert!(bad.body["error"]["message"].as_str().unwrap().starts_with("input.width"), "{}", bad.body);

    // Cancel between steps: a long job stops soon after the cancel, short of its images.
    let long = json!({ "prompt": "many steps", "steps": 150, "count": 64, "width": 256, "height": 256 });
    let r = gw.submit(&json!({ "model": "tiny-sd", "input": long })).await;
    let id: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let mut sse = SseClient::open(&gw, id, None).await;
    while sse.next().await.expect("a progress event").event != "progress" {}
    let canceled = gw.http.post(gw.url(&format!("/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(canceled.status(), 200);
    sse.rest().await;
    generate_with(&gw, "tiny-sd", json!({ "prompt": "after", "steps": 1 })).await;
    let last = gw.get(&format!("/v1/jobs/{id}/outputs/image-63.png")).await;
    assert_eq!(last.status, 404, "the canceled job ran to its end");
    assert_eq!(gw.job(id).await["status"], "canceled");
    worker.stop().await;
    gw.stop().await;
}

async fn generate_with(gw: &Gateway, model: &str, input: Value) -> Value {
    let r = gw.submit(&json!({ "model": model, "input": input })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id: JobId = r.body["id"].as_str().unwrap().parse().unwrap();
    let job = gw.finished(id, T).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

async fn image_progress_reaches_webhooks(kind: Kind) {
    let receiver = crate::delivery::Receiver::start(0, 200).await;
    let env = Env::new(kind);
    let config = crate::delivery::webhook_gateway(Duration::from_millis(50), Duration::from_secs(3600));
    let gw = env.gateway_with(config).await;
    let worker = image_worker(&env);
    let body = json!({
        "model": TERRAIN, "input": { "difficulty": 60, "seed": 21, "count": 3 },
        "webhook": receiver.url(), "webhook_events": ["progress"],
    });
    let r = gw.submit(&body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let payloads = kiln_common::testing::wait_until("the completed webhook arrives", T, || async {
        let got: Vec<Value> = receiver.requests().iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect();
        if got.iter().any(|p| p["type"] == "job.completed") { Ok(got) } else { Err(got) }
    })
    .await;
    // Progress events may be coalesced to the latest pending one, never invented or reordered.
    let steps: Vec<u64> = payloads
        .iter()
        .filter(|p| p["type"] == "job.progress")
        .map(|p| {
            assert_eq!(p["data"]["progress"]["total"], 3, "{p}");
            p["data"]["progress"]["step"].as_u64().unwrap()
        })
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]) && steps.iter().all(|s| (1..=3).contains(s)),
        "{steps:?}"
    );
    let done = payloads.iter().find(|p| p["type"] == "job.completed").unwrap();
    assert_eq!(done["data"]["output"]["images"].as_array().map(Vec::len), Some(3), "{done}");
    worker.stop().await;
    gw.stop().await;
}
