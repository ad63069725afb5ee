//! Contract tests of the broker and store implementations: each scenario runs against the embedded
//! backend and against the real RabbitMQ and Redis started by `scripts/test.sh`.

mod broker;
mod store;

/// Generates one test per backend from an `async fn scenario(kind: Kind)`.
#[macro_export]
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
