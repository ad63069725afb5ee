//! Test support (feature `testing`): the RabbitMQ and Redis started by `scripts/test.sh`, unique
//! names per test, and waiting for a condition with a deadline that reports what it last saw.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

pub mod certs;
pub mod inputs;
pub mod media;
pub mod onnx;
pub mod servers;
pub mod speech;

use crate::Backend;
use crate::config::{BackendArgs, Secret};

/// The URLs `scripts/test.sh` exports. Panics with the fix when they are missing: a test that
/// needs the real servers must not pass without them.
pub fn service_urls() -> (String, String) {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run the suite with scripts/test.sh, which starts RabbitMQ and Redis")
        })
    };
    (get("KILN_TEST_AMQP_URL"), get("KILN_TEST_REDIS_URL"))
}

/// A fresh prefix, so tests sharing one RabbitMQ and one Redis never see each other's queues or keys.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Backend settings for the test servers, under a fresh prefix.
pub fn backend_args(retention: Duration) -> BackendArgs {
    let (amqp, redis) = service_urls();
    let prefix = unique_prefix();
    BackendArgs {
        amqp_url: Secret::new(amqp),
        redis_url: Secret::new(redis),
        queue_prefix: prefix.clone(),
        key_prefix: format!("{prefix}:"),
        job_retention: retention,
        result_retention: None,
        sweep_after: Duration::from_secs(600),
        cache_redis_url: None,
        cache_ttl: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(1),
        io_timeout: Duration::from_secs(5),
        outputs_redis_url: None,
        output_dir: None,
        keys_file: None,
        tls_ca: None,
    }
}

/// Which backend a behaviour test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedded,
    External,
}

pub fn backend(kind: Kind, retention: Duration) -> Backend {
    backend_with(kind, &backend_args(retention))
}

/// A backend of `kind` with these settings (the embedded one takes the retentions, the sweep
/// setting and the cache TTL).
pub fn backend_with(kind: Kind, args: &BackendArgs) -> Backend {
    match kind {
        Kind::Embedded => Backend::embedded_for(args),
        Kind::External => Backend::external(args).expect("backend for the test servers"),
    }
}

/// Polls `probe` every 20 ms until it returns `Ok`, and returns that value. After `timeout` it
/// panics with `what` and the last `Err` the probe returned.
pub async fn wait_until<T, E, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: still not true after {timeout:?}; last seen: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Generates one `#[tokio::test]` per backend (modules `embedded` and `external`) from each
/// `async fn scenario(kind: Kind)` named, so every behaviour runs on both.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::testing::Kind::Embedded).await })*
        }
        mod external {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::testing::Kind::External).await })*
        }
    };
}
