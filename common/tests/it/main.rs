//! Contract tests of the broker and store implementations: each scenario runs against the embedded
//! backend and against the real RabbitMQ and Redis started by `scripts/test.sh`; both over TLS;
//! and the audit log (its file, and its mirror on that Redis).

mod audit;
mod broker;
mod dead_letters;
mod inputs;
mod store;
mod tls;
