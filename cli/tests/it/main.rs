//! The whole system over HTTP on port 0: gateway and workers in-process (and as real processes for
//! the crash tests), on the embedded backend and on the real RabbitMQ and Redis started by
//! `scripts/test.sh`, serving the real all-MiniLM-L6-v2 model on ONNX Runtime.

mod batch;
mod behaviour;
mod cache;
mod cli_habits;
mod delivery;
mod faults;
mod hard_faults;
mod harness;
mod history;
mod images;
mod listing;
mod multimodal;
mod observability;
mod openai;
mod predictions;
mod reliability;
mod security;
mod suite;
mod tls;
mod webhooks_hard;
