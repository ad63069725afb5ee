//! Input store semantics on both backends: blobs by (scope, sha256), written once per content with
//! a lifetime extended and never shortened, scopes kept apart, file records that expire and can be
//! deleted, and the size bound.

use std::time::Duration;

use bytes::Bytes;
use kiln_common::inputs::{InputStoreError, MAX_INPUT_BYTES, new_file_id};
use kiln_common::testing::{Kind, backend, wait_until};
use kiln_proto::FileObject;
use sha2::{Digest, Sha256};

kiln_common::both_backends!(
    the_same_bytes_are_one_blob_per_scope,
    a_blobs_lifetime_is_extended_never_shortened,
    file_records_expire_and_can_be_deleted,
    oversized_blobs_are_refused,
);

const LONG: Duration = Duration::from_secs(600);

async fn the_same_bytes_are_one_blob_per_scope(kind: Kind) {
    let inputs = backend(kind, Duration::from_secs(60)).inputs;
    let data = Bytes::from_static(b"\x89PNG\r\n\x1a\nnot really");
    let first = inputs.put("acme", "image/png", data.clone(), LONG).await.unwrap();
    assert_eq!(first.sha256, hex::encode(Sha256::digest(&data)));
    assert_eq!((first.size, first.content_type.as_str()), (data.len() as u64, "image/png"));
    let again = inputs.put("acme", "image/png", data.clone(), LONG).await.unwrap();
    assert_eq!(again, first);
    let (got, bytes) = inputs.get("acme", &first.sha256).await.unwrap().expect("stored");
    assert_eq!((got, bytes), (first.clone(), data.clone()));
    assert_eq!(inputs.head("acme", &first.sha256).await.unwrap(), Some(first.clone()));
    // Another scope has its own blobs: the same sha256 is not there until it writes it.
    assert_eq!(inputs.head("other", &first.sha256).await.unwrap(), None);
    assert_eq!(inputs.head("-", &first.sha256).await.unwrap(), None);
    assert_eq!(inputs.get("acme", &"0".repeat(64)).await.unwrap(), None);
    assert_eq!(inputs.get("acme", "../../etc").await.unwrap(), None);
    assert_eq!(inputs.job_ttl(), Duration::from_secs(60));
}

async fn a_blobs_lifetime_is_extended_never_shortened(kind: Kind) {
    let inputs = backend(kind, Duration::from_secs(60)).inputs;
    let data = Bytes::from(format!("bytes {}", uuid::Uuid::new_v4()));
    // Each control blob is written with the lifetime under test, just after it: once the control
    // is gone, that lifetime has passed for the blob too.
    let control = |ttl| {
        let inputs = inputs.clone();
        async move {
            let bytes = Bytes::from(format!("control {}", uuid::Uuid::new_v4()));
            inputs.put("-", "image/png", bytes, ttl).await.unwrap()
        }
    };
    let short = inputs.put("-", "image/png", data.clone(), Duration::from_millis(300)).await.unwrap();
    // Written again with a long lifetime: it outlives the first one's.
    inputs.put("-", "image/png", data.clone(), LONG).await.unwrap();
    gone(&inputs, &control(Duration::from_millis(300)).await.sha256).await;
    assert!(inputs.head("-", &short.sha256).await.unwrap().is_some(), "the longer lifetime was not taken");
    // And a later short write does not cut it down.
    inputs.put("-", "image/png", data, Duration::from_millis(100)).await.unwrap();
    gone(&inputs, &control(Duration::from_millis(100)).await.sha256).await;
    assert!(inputs.head("-", &short.sha256).await.unwrap().is_some(), "a shorter write shortened it");
    // A short-lived blob does go.
    let brief = inputs.put("-", "image/png", Bytes::from_static(b"brief"), Duration::from_millis(100)).await.unwrap();
    gone(&inputs, &brief.sha256).await;
}

/// Waits until the blob `sha256` of the open scope has expired.
async fn gone(inputs: &std::sync::Arc<dyn kiln_common::inputs::InputStore>, sha256: &str) {
    wait_until("a blob past its lifetime is gone", Duration::from_secs(10), || async move {
        if inputs.head("-", sha256).await.unwrap().is_none() { Ok(()) } else { Err("still there") }
    })
    .await;
}

fn file(sha256: &str) -> FileObject {
    FileObject {
        id: new_file_id(),
        sha256: sha256.to_owned(),
        size: 5,
        content_type: "image/png".into(),
        filename: Some("scan.png".into()),
        created_at: "2026-01-01T00:00:00Z".into(),
        expires_at: "2026-01-02T00:00:00Z".into(),
    }
}

async fn file_records_expire_and_can_be_deleted(kind: Kind) {
    let inputs = backend(kind, Duration::from_secs(60)).inputs;
    let r = inputs.put("acme", "image/png", Bytes::from_static(b"hello"), LONG).await.unwrap();
    let f = file(&r.sha256);
    inputs.create_file("acme", &f, LONG).await.unwrap();
    assert_eq!(inputs.file("acme", &f.id).await.unwrap(), Some(f.clone()));
    assert_eq!(inputs.file("other", &f.id).await.unwrap(), None, "another scope's file");
    assert!(!inputs.delete_file("other", &f.id).await.unwrap());
    assert!(inputs.delete_file("acme", &f.id).await.unwrap());
    assert_eq!(inputs.file("acme", &f.id).await.unwrap(), None);
    assert!(!inputs.delete_file("acme", &f.id).await.unwrap());
    // The blob stays for the jobs made from the file.
    assert!(inputs.head("acme", &r.sha256).await.unwrap().is_some());
    let brief = file(&r.sha256);
    inputs.create_file("acme", &brief, Duration::from_millis(100)).await.unwrap();
    wait_until("a file record past its lifetime is gone", Duration::from_secs(10), || {
        let (inputs, id) = (inputs.clone(), brief.id.clone());
        async move { if inputs.file("acme", &id).await.unwrap().is_none() { Ok(()) } else { Err("still there") } }
    })
    .await;
    let bad = FileObject { id: "nope".into(), ..file(&r.sha256) };
    assert!(matches!(inputs.create_file("acme", &bad, LONG).await, Err(InputStoreError::Invalid(_))));
}

async fn oversized_blobs_are_refused(kind: Kind) {
    let inputs = backend(kind, Duration::from_secs(60)).inputs;
    let big = Bytes::from(vec![0u8; MAX_INPUT_BYTES + 1]);
    assert!(matches!(inputs.put("-", "image/png", big, LONG).await, Err(InputStoreError::Invalid(_))));
}
