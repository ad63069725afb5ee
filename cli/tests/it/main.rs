//! The whole system over HTTP on port 0: gateway and workers in-process (and as real processes for
//! the crash tests), on the embedded backend and on the real RabbitMQ and Redis started by
//! `scripts/test.sh`, serving the real all-MiniLM-L6-v2 model on ONNX Runtime.

mod behaviour;
mod cache;
mod delivery;
mod faults;
mod harness;
mod reliability;
mod suite;

/// Generates one test per backend from an `async fn scenario(kind: Kind)`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(kiln_common::testing::Kind::Embedded).await })*
        }
        mod external {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(kiln_common::testing::Kind::External).await })*
        }
    };
}
pub(crate) use both_backends;
