//! Binary inputs at the gateway, on both backends: uploads (multipart and raw, sniffed, bounded,
//! tenant-scoped) and a job's image given inline, as a `data:` URL, as `file:ID` and as an
//! `https://` URL served by a local server, all resolving to the same stored reference and so the
//! same cache key; the refusals name the field (corrupt, too many pixels, too many bytes, unknown
//! or another tenant's file, a URL to a loopback address refused like a webhook's).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kiln_common::cache;
use kiln_common::models::ModelRepository;
use kiln_common::tenancy::{self, Limits, NewKey, Scope};
use kiln_common::testing::certs::TestCa;
use kiln_common::testing::inputs::{png, png_header};
use kiln_common::testing::{Kind, backend};
use kiln_gateway::config::{InputsConfig, TlsConfig};
use kiln_gateway::{AppState, AuthMode, GatewayConfig};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::call;

kiln_common::both_backends!(
    every_way_of_giving_an_image_makes_the_same_reference_and_cache_key,
    bad_images_are_refused_naming_the_field,
    files_are_sniffed_scoped_to_their_tenant_and_deletable,
);

const MODEL: &str = "open-nsfw";

fn repo() -> ModelRepository {
    ModelRepository::load(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")).unwrap()
}

fn state_on(kind: Kind, config: GatewayConfig) -> AppState {
    AppState::new(
        config,
        backend(kind, Duration::from_secs(600)),
        std::sync::Arc::new(repo()),
        CancellationToken::new(),
    )
}

fn open() -> GatewayConfig {
    GatewayConfig { auth: AuthMode::Off, ..GatewayConfig::default() }
}

fn job(image: Value, token: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/v1/jobs").header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::from(json!({"model": MODEL, "input": {"image": image}}).to_string())).unwrap()
}

fn raw_upload(bytes: &[u8], content_type: &str, token: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/v1/files").header(header::CONTENT_TYPE, content_type);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::from(bytes.to_vec())).unwrap()
}

fn multipart_upload(bytes: &[u8], filename: &str) -> Request<Body> {
    let boundary = "kiln-test-boundary-7d1c";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\njob input\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Request::post("/v1/files")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .unwrap()
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::empty()).unwrap()
}

/// An HTTPS server on 127.0.0.1 serving `/image.png`, on a certificate of `ca`.
async fn https_server(ca: &TestCa, image: Vec<u8>) -> (u16, CancellationToken) {
    let cert = ca.server("inputs-server");
    let tls = TlsConfig { tls_cert: Some(cert.cert), tls_key: Some(cert.key), ..TlsConfig::default() };
    let tls = kiln_gateway::tls::ServerTls::load(&tls).unwrap().expect("a certificate");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let listener = tls.listen(listener, stop.clone()).unwrap();
    let app = axum::Router::new().route(
        "/image.png",
        axum::routing::get(move || {
            let image = image.clone();
            async move { ([(header::CONTENT_TYPE, "image/png")], image) }
        }),
    );
    let shutdown = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await.unwrap();
    });
    (port, stop)
}

async fn every_way_of_giving_an_image_makes_the_same_reference_and_cache_key(kind: Kind) {
    let ca = TestCa::new("kiln test CA (inputs)");
    let image = png(40, 30);
    let (port, stop) = https_server(&ca, image.clone()).await;
    let inputs = InputsConfig {
        fetch_allowed_hosts: vec!["127.0.0.1".into()],
        fetch_ca: Some(ca.ca_file()),
        ..InputsConfig::default()
    };
    let s = state_on(kind, GatewayConfig { inputs, ..open() });
    s.backend.broker.declare(&s.models.names()).await.unwrap();
    let sha = hex::encode(Sha256::digest(&image));
    let reference = json!({"sha256": sha, "content_type": "image/png", "size": image.len()});
    // A result cached under the key of the canonical input: every submission that resolves to
    // the same reference is answered from it.
    let spec = s.models.get(MODEL).unwrap();
    let key = cache::key(MODEL, &spec.version, &json!({"image": reference}));
    let seeded = json!({"scores": {"safe": 0.99, "nsfw": 0.01}, "seeded": true});
    s.backend.cache.put(&key, &seeded.to_string()).await.unwrap();

    let (status, _, file) = call(&s, raw_upload(&image, "image/png", None)).await;
    assert_eq!(status, StatusCode::CREATED, "{file}");
    let b64 = B64.encode(&image);
    for (how, given) in [
        ("base64", json!(b64)),
        ("data: URL", json!(format!("data:image/png;base64,{b64}"))),
        ("file:ID", json!(format!("file:{}", file["id"].as_str().unwrap()))),
        ("https URL", json!(format!("https://127.0.0.1:{port}/image.png"))),
        ("stored reference", reference.clone()),
    ] {
        let (status, _, body) = call(&s, job(given, None)).await;
        assert_eq!(status, StatusCode::OK, "{how}: {body}");
        assert_eq!((body["cached"].as_bool(), &body["output"]), (Some(true), &seeded), "{how}: {body}");
    }
    // The bytes are stored for the job, under the open gateway's scope.
    let stored = s.backend.inputs.head("-", &sha).await.unwrap().expect("stored");
    assert_eq!(serde_json::to_value(stored).unwrap(), reference);
    // Other bytes are another key: the job is queued.
    let (status, _, body) = call(&s, job(json!(B64.encode(png(41, 30))), None)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // Without the allowance, the loopback URL is refused as a webhook to it is.
    let strict = state_on(kind, open());
    let (status, _, refused) = call(&strict, job(json!(format!("https://127.0.0.1:{port}/image.png")), None)).await;
    let webhook = Request::post("/v1/jobs").header(header::CONTENT_TYPE, "application/json").body(Body::from(
        json!({"model": "all-minilm-l6-v2", "input": {"text": "x"}, "webhook": format!("https://127.0.0.1:{port}/hook")})
            .to_string(),
    ));
    let hooked = GatewayConfig {
        webhooks: kiln_common::webhooks::WebhookConfig {
            webhook_secret: Some(kiln_common::webhooks::generate_secret()),
            ..Default::default()
        },
        ..open()
    };
    let (hook_status, _, hook_refused) = call(&state_on(kind, hooked), webhook.unwrap()).await;
    assert_eq!(hook_status, StatusCode::UNPROCESSABLE_ENTITY, "{hook_refused}");
    assert_eq!((status, &refused["error"]["code"]), (hook_status, &hook_refused["error"]["code"]), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().starts_with("input.image: "), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("internal address"), "{refused}");
    stop.cancel();
}

async fn bad_images_are_refused_naming_the_field(kind: Kind) {
    // A model bound of 4 KiB, and files up to 64 KiB, so an upload can be over the model's bound.
    let dir = std::env::temp_dir().join(format!("kiln-models-{}", kiln_common::testing::unique_prefix()));
    std::fs::create_dir_all(dir.join("small-nsfw")).unwrap();
    let toml = include_str!("../../../models/open-nsfw/kiln.toml")
        .replace("max_input_bytes = 16777216", "max_input_bytes = 4096");
    std::fs::write(dir.join("small-nsfw/kiln.toml"), toml).unwrap();
    let small = ModelRepository::load(&dir).unwrap();
    let inputs = InputsConfig { max_file_bytes: Some(64 << 10), ..InputsConfig::default() };
    let s = AppState::new(
        GatewayConfig { inputs, ..open() },
        backend(kind, Duration::from_secs(600)),
        std::sync::Arc::new(small),
        CancellationToken::new(),
    );
    let submit = |image: Value| {
        Request::post("/v1/jobs")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"model": "small-nsfw", "input": {"image": image}}).to_string()))
            .unwrap()
    };
    let refused = |status: StatusCode, code: &str, body: &Value, what: &str| {
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().starts_with("input.image: "), "{what}: {body}");
        assert!(status.is_client_error(), "{what}");
    };
    let good = png(16, 16);
    let corrupt = &good[..good.len() / 2];
    let (status, _, body) = call(&s, submit(json!(B64.encode(corrupt)))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    refused(status, "invalid_input", &body, "corrupt");
    assert!(body["error"]["message"].as_str().unwrap().contains("decoded"), "{body}");

    let started = Instant::now();
    let (status, _, body) = call(&s, submit(json!(B64.encode(png_header(10_000, 10_000))))).await;
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    refused(status, "invalid_input", &body, "10,000 × 10,000");
    assert!(body["error"]["message"].as_str().unwrap().contains("10000×10000"), "{body}");

    // Over the model's bound, inline or as a file.
    let mut big = good.clone();
    big.resize(8 << 10, 0);
    let (status, _, body) = call(&s, submit(json!(B64.encode(&big)))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    refused(status, "payload_too_large", &body, "inline over max_input_bytes");
    let (status, _, file) = call(&s, raw_upload(&big, "image/png", None)).await;
    assert_eq!(status, StatusCode::CREATED, "{file}");
    let (status, _, body) = call(&s, submit(json!(format!("file:{}", file["id"].as_str().unwrap())))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    refused(status, "payload_too_large", &body, "file over max_input_bytes");
    // An upload over the file bound.
    let (status, _, body) = call(&s, raw_upload(&vec![0x89; 65 << 10], "image/png", None)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));

    let (status, _, body) = call(&s, submit(json!("file:file_doesnotexist000000000000"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    refused(status, "invalid_input", &body, "unknown file");
    let (status, _, body) = call(&s, submit(json!(B64.encode(b"GIF89a not an image we take")))).await;
    refused(status, "invalid_input", &body, "a GIF");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn files_are_sniffed_scoped_to_their_tenant_and_deletable(kind: Kind) {
    let s = state_on(kind, GatewayConfig { auth: AuthMode::Keys, ..GatewayConfig::default() });
    let mut tokens = Vec::new();
    for tenant in ["tenant-a", "tenant-b"] {
        let new = NewKey {
            tenant: tenant.into(),
            scopes: [Scope::JobsSubmit, Scope::JobsRead].into_iter().collect::<BTreeSet<_>>(),
            expires_at: None,
            limits: Limits::default(),
        };
        tokens.push(tenancy::issue(s.backend.keys.as_ref(), new, kiln_proto::now_millis()).await.unwrap().token);
    }
    let (a, b) = (Some(tokens[0].as_str()), Some(tokens[1].as_str()));
    let image = png(20, 10);
    let mut multipart = multipart_upload(&image, "scan.png");
    multipart.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {}", tokens[0]).parse().unwrap());
    let (status, headers, from_form) = call(&s, multipart).await;
    assert_eq!(status, StatusCode::CREATED, "{from_form}");
    let id = from_form["id"].as_str().unwrap().to_owned();
    assert_eq!(headers[header::LOCATION], format!("/v1/files/{id}"));
    assert_eq!(from_form["filename"], "scan.png");
    assert_eq!(from_form["content_type"], "image/png");
    assert_eq!(from_form["size"], image.len());
    // The raw body (declared as something else: the bytes decide) is the same content.
    let (status, _, raw) = call(&s, raw_upload(&image, "application/octet-stream", a)).await;
    assert_eq!(status, StatusCode::CREATED, "{raw}");
    assert_eq!(raw["sha256"], from_form["sha256"]);
    assert_eq!(from_form["sha256"], hex::encode(Sha256::digest(&image)));
    assert_ne!(raw["id"], from_form["id"]);

    let (status, _, record) = call(&s, get(&format!("/v1/files/{id}"), a)).await;
    assert_eq!((status, &record), (StatusCode::OK, &from_form));
    let resp = tower::ServiceExt::oneshot(kiln_gateway::router(s.clone()), get(&format!("/v1/files/{id}/content"), a));
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::ETAG], format!("\"{}\"", from_form["sha256"].as_str().unwrap()));
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "image/png");
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(&bytes[..], &image[..]);

    // Another tenant: not found, and not usable in its jobs.
    let (status, _, body) = call(&s, get(&format!("/v1/files/{id}"), b)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("file_not_found")));
    let (status, _, body) = call(&s, get(&format!("/v1/files/{id}/content"), b)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = call(&s, job(json!(format!("file:{id}")), b)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input")));
    assert!(body["error"]["message"].as_str().unwrap().starts_with("input.image: "), "{body}");
    // Its owner's job takes it.
    let (status, _, body) = call(&s, job(json!(format!("file:{id}")), a)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // Not an image or WAV: 415, whatever it says it is.
    let (status, _, body) = call(&s, raw_upload(b"%PDF-1.7 not an image", "image/png", a)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"))
    );
    // A file needs a key.
    let (status, _, _) = call(&s, raw_upload(&image, "image/png", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let delete = |token: &str| {
        Request::delete(format!("/v1/files/{id}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(call(&s, delete(&tokens[1])).await.0, StatusCode::NOT_FOUND, "another tenant deleted it");
    assert_eq!(call(&s, delete(&tokens[0])).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, get(&format!("/v1/files/{id}"), a)).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&s, delete(&tokens[0])).await.0, StatusCode::NOT_FOUND);
}
