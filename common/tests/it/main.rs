//! Contract tests of the broker and store implementations: each scenario runs against the embedded
//! backend and against the real RabbitMQ and Redis started by `scripts/test.sh`; and both over TLS.

mod broker;
mod dead_letters;
mod store;
mod tls;
