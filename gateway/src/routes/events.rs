//! `GET /v1/jobs/{id}/events`: server-sent events. Without `Last-Event-ID` the stream starts with
//! the job's current state; with it, the events after that id are replayed from the job's log.
//! Then live `status`, `progress` and `completed` events follow, each with its id, and the stream
//! ends after `completed`. Any gateway replica serves any job: events come through the store.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use futures::channel::mpsc;
use kiln_proto::{EventKind, JobEvent, JobId};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::routes::jobs::current;
use crate::state::AppState;

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often the stream re-reads the log, in case a pushed event was missed.
const RESYNC: Duration = Duration::from_secs(5);

type Tx = mpsc::Sender<Result<Event, Infallible>>;

pub async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job_id: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let rx = state.backend.store.subscribe(job_id).await;
    // Fails with 404 before the stream starts, while an error can still be a status code.
    current(&state, job_id).await?.ok_or(ApiError::JobNotFound(id))?;
    let (tx, body) = mpsc::channel(16);
    tokio::spawn(async move {
        let _ = feed(&state, job_id, last_event_id, rx, tx).await;
    });
    Ok(Sse::new(body).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// Orders event ids: `ms-seq` from Redis streams, plain sequence numbers from the embedded store.
fn order(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// Writes the stream until the job completes or the client goes away (a send fails).
async fn feed(
    state: &AppState,
    id: JobId,
    last_event_id: Option<String>,
    mut rx: broadcast::Receiver<JobEvent>,
    mut tx: Tx,
) -> Result<(), ApiError> {
    let store = &state.backend.store;
    let mut last = match last_event_id {
        Some(last) => last,
        None => {
            // The current state first, under the id of the latest event it reflects.
            let log = store.events(id, None).await.map_err(|e| ApiError::Store(e, state.config.retry_after))?;
            let latest = log.last().map(|e| e.id.clone()).unwrap_or_default();
            let Some(record) = current(state, id).await? else { return Ok(()) };
            let kind = if record.status.is_terminal() { EventKind::Completed } else { EventKind::Status };
            send(&mut tx, kind, &latest, serde_json::to_value(&record).unwrap_or_default()).await?;
            if kind == EventKind::Completed {
                return Ok(());
            }
            latest
        }
    };
    loop {
        // Replay whatever the log holds after the last event sent.
        let missed = store
            .events(id, Some(&last).filter(|l| !l.is_empty()).map(String::as_str))
            .await
            .map_err(|e| ApiError::Store(e, state.config.retry_after))?;
        for event in missed {
            if forward(state, id, &mut tx, &mut last, event).await? {
                return Ok(());
            }
        }
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return Ok(()),
                _ = &mut resync => break,
                event = rx.recv() => match event {
                    Ok(event) => {
                        if forward(state, id, &mut tx, &mut last, event).await? {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
}

/// Sends `event` unless it was sent already. Returns whether the stream is over.
async fn forward(
    state: &AppState,
    id: JobId,
    tx: &mut Tx,
    last: &mut String,
    event: JobEvent,
) -> Result<bool, ApiError> {
    if !last.is_empty() && order(&event.id) <= order(last) {
        return Ok(false);
    }
    let data = match event.kind {
        // Completion carries the whole record, output included.
        EventKind::Completed => match &event.record {
            Some(record) => serde_json::to_value(record).unwrap_or_default(),
            None => serde_json::to_value(current(state, id).await?).unwrap_or_default(),
        },
        EventKind::Status | EventKind::Progress => event.data.clone(),
    };
    send(tx, event.kind, &event.id, data).await?;
    *last = event.id;
    Ok(event.kind == EventKind::Completed)
}

async fn send(tx: &mut Tx, kind: EventKind, id: &str, data: serde_json::Value) -> Result<(), ApiError> {
    let mut event = Event::default().event(kind.as_str()).data(data.to_string());
    if !id.is_empty() {
        event = event.id(id);
    }
    tx.send(Ok(event)).await.map_err(|_| ApiError::Internal("client went away".into()))
}
