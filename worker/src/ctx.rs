//! What one model's consume loop and its jobs share.

use std::sync::Arc;

use kiln_common::Backend;
use kiln_common::models::ModelSpec;

use crate::config::WorkerConfig;
use crate::errors::RetryPolicy;
use crate::health::Health;
use crate::inference::InferenceHandle;
use crate::lease::LeasePolicy;

/// Everything one model's loop needs.
pub struct Ctx {
    pub spec: ModelSpec,
    pub infer: InferenceHandle,
    pub backend: Backend,
    pub config: Arc<WorkerConfig>,
    pub retry: RetryPolicy,
    pub lease: LeasePolicy,
    /// This worker's identity in leases.
    pub owner: String,
    pub health: Health,
}
