//! The `kiln` command's library side: running the gateway and worker together in one process
//! (`kiln dev`, and the system tests), and the HTTP client behind `kiln submit/get/wait`.

pub mod client;
pub mod system;
