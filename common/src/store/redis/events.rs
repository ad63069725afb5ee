//! Live job events on Redis: one pub/sub subscription per process, fanned out to the subscribers
//! of each job, reconnecting with backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::{EventKind, JobEvent, JobId};
use tokio::sync::broadcast;

pub(super) fn event(id: String, kind: &str, data: &str) -> Option<JobEvent> {
    Some(JobEvent {
        id,
        kind: EventKind::parse(kind)?,
        data: serde_json::from_str(data).unwrap_or(serde_json::Value::Null),
        record: None,
    })
}

/// Fans the one pub/sub subscription of this process out to the subscribers of each job.
pub(super) struct Hub {
    jobs: Mutex<HashMap<JobId, broadcast::Sender<JobEvent>>>,
    listening: Mutex<bool>,
    /// Whether the channel subscription is active.
    pub(super) ready: tokio::sync::watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Self { jobs: Mutex::default(), listening: Mutex::new(false), ready: tokio::sync::watch::channel(false).0 }
    }
}

impl Hub {
    pub(super) fn subscribe(&self, id: JobId, start: impl FnOnce()) -> broadcast::Receiver<JobEvent> {
        {
            let mut listening = self.listening.lock().expect("hub lock");
            if !*listening {
                *listening = true;
                start();
            }
        }
        let mut jobs = self.jobs.lock().expect("hub lock");
        jobs.retain(|_, tx| tx.receiver_count() > 0);
        jobs.entry(id).or_insert_with(|| broadcast::channel(64).0).subscribe()
    }

    /// A message is `job-id event-id kind data`, and for `completed` events a newline and the
    /// job's hash as a JSON object (see the transition scripts' `emit_for`).
    fn dispatch(&self, message: &str) {
        let (message, record) = match message.split_once('\n') {
            Some((m, r)) => (m, Some(r)),
            None => (message, None),
        };
        let mut parts = message.splitn(4, ' ');
        let (Some(id), Some(eid), Some(kind), Some(data)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let Ok(id) = id.parse::<JobId>() else { return };
        // Decoded only for a job someone waits on, and outside the lock every subscriber takes.
        let Some(tx) = self.jobs.lock().expect("hub lock").get(&id).cloned() else { return };
        if let Some(mut e) = event(eid.to_owned(), kind, data) {
            // A record that does not decode is left out: the waiter reads it back instead.
            e.record = record
                .and_then(|r| serde_json::from_str::<HashMap<String, String>>(r).ok())
                .and_then(|fields| super::decode(id, &fields).ok())
                .map(Box::new);
            let _ = tx.send(e);
        }
    }
}

/// Listens on the events channel for as long as the store lives, reconnecting with backoff.
pub(super) fn spawn_listener(client: redis::Client, channel: String, hub: std::sync::Weak<Hub>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if hub.strong_count() == 0 {
                return;
            }
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub.subscribe(&channel).await.is_ok() {
                        backoff = Duration::from_millis(100);
                        if let Some(hub) = hub.upgrade() {
                            hub.ready.send_replace(true);
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let Some(hub) = hub.upgrade() else { return };
                            if let Ok(payload) = msg.get_payload::<String>() {
                                hub.dispatch(&payload);
                            }
                        }
                    }
                    if let Some(hub) = hub.upgrade() {
                        hub.ready.send_replace(false);
                    }
                    tracing::warn!(target: "kiln::store", "event subscription lost, reconnecting");
                }
                Err(e) => tracing::warn!(target: "kiln::store", error = %e, "cannot subscribe to job events yet"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}
