//! The `kiln` command's library side: running the gateway and worker together in one process
//! (`kiln dev`, and the system tests), the HTTP client behind `kiln submit/get/wait`,
//! `kiln batch`, and `kiln audit`.

pub mod audit;
pub mod batch;
pub mod client;
pub mod system;
