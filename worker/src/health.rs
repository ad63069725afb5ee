//! The worker's health, as Kubernetes probes see it: each model's consume loop reports its state
//! and beats while it makes progress; `/healthz` fails when a loop has been disconnected or stuck
//! longer than the grace period (so the pod is restarted), `/readyz` while any loop is not
//! consuming.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use kiln_proto::ModelName;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopState {
    Connecting,
    Consuming,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: LoopState,
    /// Since when the loop is in `state`.
    since: Instant,
    /// Last sign of progress: a delivery handled, or an idle check that found the channel open.
    beat: Instant,
}

#[derive(Clone)]
pub struct Health {
    loops: Arc<Mutex<BTreeMap<ModelName, Entry>>>,
    grace: Duration,
}

impl Health {
    pub fn new(grace: Duration) -> Self {
        Self { loops: Arc::default(), grace }
    }

    pub fn set(&self, model: &ModelName, state: LoopState) {
        let now = Instant::now();
        let mut loops = self.loops.lock().expect("health lock");
        let e = loops.entry(model.clone()).or_insert(Entry { state, since: now, beat: now });
        if e.state != state {
            *e = Entry { state, since: now, beat: now };
        }
    }

    pub fn beat(&self, model: &ModelName) {
        if let Some(e) = self.loops.lock().expect("health lock").get_mut(model) {
            e.beat = Instant::now();
        }
    }

    /// (live, ready, per-model detail)
    fn report(&self) -> (bool, bool, serde_json::Value) {
        let loops = self.loops.lock().expect("health lock");
        let mut live = true;
        let mut ready = !loops.is_empty();
        let mut detail = serde_json::Map::new();
        for (model, e) in loops.iter() {
            let stuck = match e.state {
                LoopState::Consuming => e.beat.elapsed() > self.grace,
                LoopState::Connecting => e.since.elapsed() > self.grace,
                LoopState::Stopped => false,
            };
            live &= !stuck;
            ready &= e.state == LoopState::Consuming && !stuck;
            detail.insert(
                model.to_string(),
                json!({
                    "state": format!("{:?}", e.state).to_lowercase(),
                    "for_s": e.since.elapsed().as_secs(),
                    "last_progress_s": e.beat.elapsed().as_secs(),
                    "stuck": stuck,
                }),
            );
        }
        (live, ready, serde_json::Value::Object(detail))
    }
}

async fn healthz(State(h): State<Health>) -> (StatusCode, Json<serde_json::Value>) {
    let (live, _, detail) = h.report();
    (
        if live { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE },
        Json(json!({ "live": live, "models": detail })),
    )
}

async fn readyz(State(h): State<Health>) -> (StatusCode, Json<serde_json::Value>) {
    let (_, ready, detail) = h.report();
    (
        if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE },
        Json(json!({ "ready": ready, "models": detail })),
    )
}

/// Serves the probes on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(target: "kiln::worker", addr = %listener.local_addr()?, "health probes listening");
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Prometheus text exposition of this process's metrics.
async fn metrics() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], kiln_common::telemetry::prometheus().render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_connecting_past_the_grace_is_not_live() {
        let h = Health::new(Duration::ZERO);
        let m = ModelName::new("m").unwrap();
        h.set(&m, LoopState::Connecting);
        let (live, ready, detail) = h.report();
        // Zero grace: any time spent connecting is too long.
        assert!(!live && !ready, "{detail}");
    }

    #[test]
    fn a_consuming_loop_is_ready() {
        let h = Health::new(Duration::from_secs(60));
        let m = ModelName::new("m").unwrap();
        h.set(&m, LoopState::Consuming);
        let (live, ready, detail) = h.report();
        assert!(live && ready, "{detail}");
        h.set(&m, LoopState::Connecting);
        assert!(!h.report().1);
    }
}
