//! `GET /v1/jobs/{id}/events`: server-sent events. Without `Last-Event-ID` the stream starts with
//! the job's current state; with it, the events after that id are replayed from the job's log.
//! Then live `status`, `progress` and `completed` events follow, each with its id, and the stream
//! ends after `completed`, or as soon as the job is over and nothing is left to send. A resume of
//! a finished job whose `completed` the client already has is answered `204 No Content`, which
//! tells an `EventSource` to stop reconnecting. Streams are bounded per gateway
//! (`KILN_MAX_EVENT_STREAMS`, then `503` with `Retry-After`); a stream's task ends when its
//! client goes away. Any gateway replica serves any job: events come through the store.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kiln_proto::{EventKind, JobEvent, JobId};
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::jobs::{current, visible};
use crate::state::AppState;

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often the stream re-reads the log, in case a pushed event was missed.
const RESYNC: Duration = Duration::from_secs(5);

type Tx = mpsc::Sender<Result<Event, Infallible>>;

/// Server-sent events of a job
///
/// Events status, progress and completed, each with an id; the stream ends after completed (or
/// once the job is over and nothing is left to send). Without Last-Event-ID it starts with the
/// current state.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", operation_id = "job_events", tag = "jobs",
    params(
        ("id" = kiln_proto::JobId, Path, description = "The job's id."),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event."),
    ),
    responses(
        (status = 200, description = "text/event-stream", content_type = "text/event-stream", body = String,
         example = "id: 1700000000000-0\nevent: status\ndata: {\"status\":\"running\",\"attempt\":1}\n\n"),
        (status = 204, description = "A resume (Last-Event-ID) of a finished job whose completed event the client has: nothing left to send; an EventSource stops reconnecting"),
        (status = 404, description = "job_not_found; not_found for a path parameter that is not UTF-8", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable, or overloaded: the gateway's event streams are all open (KILN_MAX_EVENT_STREAMS)", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn stream(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let job_id: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let slot = state
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyOpen("event streams", state.config.retry_after))?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let rx = state.backend.store.subscribe(job_id).await;
    // Fails with 404 before the stream starts, while an error can still be a status code.
    let record = visible(&state, &who, job_id).await?.ok_or(ApiError::JobNotFound(id))?;
    if let Some(last) = &last_event_id
        && record.status.is_terminal()
        && has_everything(&state, job_id, last).await?
    {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, mut body) = mpsc::channel(16);
    tokio::spawn(async move {
        let _ = feed(&state, job_id, last_event_id, rx, tx, slot).await;
    });
    let body = futures::stream::poll_fn(move |cx| body.poll_recv(cx));
    Ok(Sse::new(body).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// Whether a client that saw `last` has every event of a finished job: nothing after it in the
/// log, and the `completed` event at or before it.
async fn has_everything(state: &AppState, id: JobId, last: &str) -> Result<bool, ApiError> {
    let log = state.backend.store.events(id, None).await.map_err(|e| ApiError::Store(e, state.config.retry_after))?;
    let seen = |e: &JobEvent| order(&e.id) <= order(last);
    Ok(log.iter().all(seen) && log.iter().any(|e| e.kind == EventKind::Completed && seen(e)))
}

/// Orders event ids: `ms-seq` from Redis streams, plain sequence numbers from the embedded store.
fn order(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// Writes the stream until the job is over or the client goes away.
async fn feed(
    state: &AppState,
    id: JobId,
    last_event_id: Option<String>,
    mut rx: broadcast::Receiver<JobEvent>,
    tx: Tx,
    _slot: OwnedSemaphorePermit,
) -> Result<(), ApiError> {
    let store = &state.backend.store;
    let retry = state.config.retry_after;
    let mut last = match last_event_id {
        Some(last) => last,
        None => {
            // The current state first, under the id of the latest event it reflects.
            let log = store.events(id, None).await.map_err(|e| ApiError::Store(e, retry))?;
            let latest = log.last().map(|e| e.id.clone()).unwrap_or_default();
            let Some(record) = current(state, id).await? else { return Ok(()) };
            let kind = if record.status.is_terminal() { EventKind::Completed } else { EventKind::Status };
            send(&tx, kind, &latest, serde_json::to_value(&record).unwrap_or_default()).await?;
            if kind == EventKind::Completed {
                return Ok(());
            }
            latest
        }
    };
    loop {
        // Read before the log: a job over by now has its last event in the log already (a
        // transition and its event are written together), so once the replay is sent nothing
        // more can come.
        let now = current(state, id).await?;
        let over = now.as_ref().is_none_or(|r| r.status.is_terminal());
        // Replay whatever the log holds after the last event sent.
        let missed = store
            .events(id, Some(&last).filter(|l| !l.is_empty()).map(String::as_str))
            .await
            .map_err(|e| ApiError::Store(e, retry))?;
        for event in missed {
            if forward(state, id, &tx, &mut last, event).await? {
                return Ok(());
            }
        }
        if over {
            // Over without a `completed` in the log after `last` (the handler answered 204 when
            // the client has it): end with the final state, so no client waits for it forever.
            if let Some(record) = now {
                send(&tx, EventKind::Completed, &last, serde_json::to_value(&record).unwrap_or_default()).await?;
            }
            return Ok(());
        }
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return Ok(()),
                // The client went away: give its slot back now, not at the job's next event.
                _ = tx.closed() => return Ok(()),
                _ = &mut resync => break,
                event = rx.recv() => match event {
                    Ok(event) => {
                        if forward(state, id, &tx, &mut last, event).await? {
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
async fn forward(state: &AppState, id: JobId, tx: &Tx, last: &mut String, event: JobEvent) -> Result<bool, ApiError> {
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

async fn send(tx: &Tx, kind: EventKind, id: &str, data: serde_json::Value) -> Result<(), ApiError> {
    let mut event = Event::default().event(kind.as_str()).data(data.to_string());
    if !id.is_empty() {
        event = event.id(id);
    }
    tx.send(Ok(event)).await.map_err(|_| ApiError::Internal("client went away".into()))
}
