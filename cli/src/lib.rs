//! The `kiln` command's library side: running the gateway and worker together in one process
//! (`kiln dev`, and the system tests), the HTTP client behind `kiln submit/get/wait`,
//! `kiln batch`, `kiln audit` and `kiln keys`.

pub mod audit;
pub mod batch;
pub mod client;
pub mod keys;
pub mod system;
