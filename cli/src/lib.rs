//! The `kiln` command's library side: the command line ([`app`]), running the gateway and worker
//! together in one process (`kiln dev`, and the system tests), the HTTP client and the client
//! commands (`kiln submit/run/get/wait/cancel/jobs/models/events`) with their `-i` inputs, event
//! stream and exit codes, `kiln batch`, `kiln audit` and `kiln keys`.

pub mod app;
pub mod audit;
pub mod batch;
pub mod client;
pub mod commands;
pub mod inputs;
pub mod keys;
pub mod outcome;
pub mod sse;
pub mod system;
