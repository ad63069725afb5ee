//! The official `openai` Python client against a keyed gateway and a worker, on both backends:
//! `client.embeddings.create` with float and with base64 (the client's default, decoded with
//! numpy), a string and a list input, each vector within cosine 0.9999 of the reference embedding
//! computed here, `usage` equal to the tokenizer's counts (a cached answer's too), token-id input
//! refused with the client's exception for 422, and `client.models.list()`.
//!
//! The client runs from the venv scripts/clients/install.sh makes (scripts/test.sh runs it before
//! the tests); without it this test fails, saying how to make it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use kiln_common::tenancy::{self, Limits, NewKey, Scope};
use kiln_common::testing::Kind;
use kiln_gateway::{AuthMode, GatewayConfig};
use kiln_proto::now_millis;
use serde_json::Value;

use crate::harness::{Env, MODEL, cache_dir, cosine};

kiln_common::both_backends!(the_openai_client_embeds_through_the_fleet);

/// How long the client script may take, model warm-up included.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// The python of the clients' venv (`KILN_CLIENTS_PYTHON` overrides it).
fn clients_python() -> PathBuf {
    let python = std::env::var_os("KILN_CLIENTS_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/deploy-tools/clients-venv/bin/python")
    });
    assert!(
        python.is_file(),
        "no {}: the pinned openai client is missing; run scripts/clients/install.sh (scripts/test.sh does)",
        python.display()
    );
    python
}

/// The tokens of each text as the model sees them, from the model's own tokenizer file (special
/// tokens included, no padding, truncated at the model's limit).
fn token_counts(env: &Env, texts: &[String]) -> Vec<usize> {
    let spec = env.repo.get(MODEL).expect("the embedding model");
    let max_length = spec.embedding.as_ref().expect("embedding section").max_length;
    let path = spec.file(&cache_dir(), "tokenizer").expect("a tokenizer file");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path).expect("load the tokenizer");
    tokenizer.with_padding(None);
    texts
        .iter()
        .map(|t| tokenizer.encode(t.as_str(), true).expect("tokenise").get_ids().len().min(max_length))
        .collect()
}

async fn the_openai_client_embeds_through_the_fleet(kind: Kind) {
    let python = clients_python();
    let env = Env::new(kind);
    let gw = env.gateway_with(GatewayConfig { auth: AuthMode::Keys, ..GatewayConfig::default() }).await;
    let worker = env.worker();
    let new = NewKey {
        tenant: "openai".into(),
        scopes: BTreeSet::from([Scope::JobsSubmit, Scope::JobsRead]),
        expires_at: None,
        limits: Limits::default(),
    };
    let token = tenancy::issue(env.backend.keys.as_ref(), new, now_millis()).await.expect("issue a key").token;
    let texts: Vec<String> = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar on stage.",
        "The stock market fell sharply today, dragging tech shares down with it.",
    ]
    .map(str::to_owned)
    .to_vec();
    let run = tokio::process::Command::new(&python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/clients/openai_embeddings.py"))
        .args([gw.url("/v1"), token.clone(), MODEL.to_owned(), serde_json::to_string(&texts).unwrap()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, run).await.expect("the client script finished in time").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client script failed ({}):\n{stderr}", out.status);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("script output ({e}): {stderr}"));

    let refs = crate::history::references(&texts).await;
    let tokens = token_counts(&env, &texts);
    let all: usize = tokens.iter().sum();
    for (call, given, want_tokens) in [
        ("base64_list", &texts[..], all),
        ("float_list", &texts[..], all),
        ("base64_string", &texts[..1], tokens[0]),
        ("float_string", &texts[..1], tokens[0]),
    ] {
        let r = &got[call];
        assert_eq!(r["object"], "list", "{call}: {r}");
        assert_eq!(r["model"], MODEL, "{call}");
        assert_eq!(r["indices"], serde_json::json!((0..given.len()).collect::<Vec<_>>()), "{call}");
        let vectors: Vec<Vec<f32>> = serde_json::from_value(r["vectors"].clone()).expect("vectors");
        assert_eq!(vectors.len(), given.len(), "{call}");
        for (v, text) in vectors.iter().zip(given) {
            assert_eq!(v.len(), 384, "{call}");
            let c = cosine(v, &refs[text]);
            assert!(c >= 0.9999, "{call}: {text:?} has cosine {c} with its reference");
        }
        assert_eq!(r["usage"]["prompt_tokens"], want_tokens, "{call}: the tokenizer counts {tokens:?}");
        assert_eq!(r["usage"]["total_tokens"], want_tokens, "{call}");
    }
    // The float list repeated the base64 list's texts: its answer came from the cache, and its
    // usage (checked above) with it.
    let job: kiln_proto::JobId = got["float_list"]["job"].as_str().expect("Kiln-Job-Id").parse().unwrap();
    let read = gw.http.get(gw.url(&format!("/v1/jobs/{job}"))).bearer_auth(&token).send().await.expect("GET job");
    let record: Value = read.json().await.expect("a job record");
    assert_eq!(record["cached"], true, "{record}");
    assert_eq!(got["wire"], serde_json::json!({ "asked": "base64", "came_as": "str" }), "the client's default");
    for call in ["token_ids", "token_id_lists"] {
        let r = &got[call];
        assert_eq!(r["exception"], "UnprocessableEntityError", "{call}: {r}");
        assert_eq!(r["status"], 422, "{call}");
        assert_eq!(r["body"]["param"], "input", "{call}: {r}");
        assert_eq!(r["body"]["type"], "invalid_request_error", "{call}: {r}");
        assert!(r["body"]["message"].as_str().is_some_and(|m| m.contains("token ids")), "{call}: {r}");
    }
    assert!(got["models"].as_array().is_some_and(|m| m.iter().any(|id| id == MODEL)), "{}", got["models"]);
    worker.stop().await;
    gw.stop().await;
}
