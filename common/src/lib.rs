//! Runtime plumbing shared by the gateway, the worker and the CLI: configuration pieces, telemetry,
//! shutdown, the broker and store abstractions with their RabbitMQ, Redis and embedded
//! implementations, the model repository, fetching of runtime assets, and the hash-chained audit
//! log of API calls.

pub mod assets;
pub mod audit;
pub mod backend;
pub mod broker;
pub mod cache;
pub mod config;
pub mod dlq;
pub mod inputs;
pub mod media;
pub mod models;
pub mod outputs;
pub mod process;
pub mod quota;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tenancy;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod webhooks;

pub use backend::Backend;
