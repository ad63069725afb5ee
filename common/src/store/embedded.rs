//! The in-process job store of `kiln dev`: the same transitions, fencing, leases, expiry, event
//! logs, idempotency claims and webhook outbox as the Redis store, on maps guarded by one mutex.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{EventKind, JobEvent, JobId, JobRecord, JobStatus, ModelName, UnixMillis};
use serde_json::json;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    Claim, Coalesced, Lapsed, Outcome, Start, Store, StoreError, Transition, WebhookAttempt, WebhookDelivery,
    canceled_error, deadline_error,
};

pub struct EmbeddedStore {
    retention: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<JobId, Entry>,
    withdrawn: HashMap<JobId, Instant>,
    /// (lease deadline, job) of long jobs held by leases.
    leases: BTreeSet<(UnixMillis, JobId)>,
    writes_since_sweep: usize,
    next_event: u64,
    subscribers: HashMap<JobId, broadcast::Sender<JobEvent>>,
    idempotency: HashMap<String, (JobId, String, bool, Instant)>,
    /// (due time, delivery id) of webhook deliveries.
    hooks_due: BTreeSet<(UnixMillis, String)>,
    hooks: HashMap<String, Hook>,
    /// Cache key → the job computing it, for in-flight coalescing.
    inflight: HashMap<String, JobId>,
    /// Model → worker → last seen.
    workers: HashMap<ModelName, HashMap<String, UnixMillis>>,
}

struct Hook {
    job: JobId,
    event: String,
    at: UnixMillis,
    attempts: u32,
    body: Option<String>,
    due: UnixMillis,
}

struct Entry {
    record: JobRecord,
    expires: Instant,
    lease: Option<Lease>,
    events: Vec<JobEvent>,
    /// Jobs coalesced onto this one.
    followers: Vec<JobId>,
    /// The in-flight key this job leads.
    inflight: Option<String>,
    /// A follower's envelope, to queue it on its own if its leader ends without an outcome.
    envelope: Option<String>,
}

impl Entry {
    fn new(record: JobRecord, expires: Instant) -> Self {
        Self { record, expires, lease: None, events: Vec::new(), followers: Vec::new(), inflight: None, envelope: None }
    }
}

/// Most events kept per job, like the Redis stream's cap.
const MAX_EVENTS: usize = 1000;

struct Lease {
    owner: String,
    until: UnixMillis,
    envelope: String,
}

/// Expired records are dropped on access, and swept in full every this many writes.
const SWEEP_EVERY: usize = 1024;

impl Inner {
    fn live(&mut self, id: JobId) -> Option<&mut Entry> {
        let now = Instant::now();
        if self.records.get(&id).is_some_and(|e| e.expires <= now) {
            self.drop_entry(id);
        }
        self.records.get_mut(&id)
    }

    fn drop_entry(&mut self, id: JobId) {
        if let Some(Entry { lease: Some(l), .. }) = self.records.remove(&id) {
            self.leases.remove(&(l.until, id));
        }
    }

    fn release(&mut self, id: JobId) {
        if let Some(l) = self.records.get_mut(&id).and_then(|e| e.lease.take()) {
            self.leases.remove(&(l.until, id));
        }
    }

    /// Appends an event to the job's log, tells its subscribers, and queues its webhook delivery.
    fn emit(&mut self, id: JobId, kind: EventKind, data: serde_json::Value, now: UnixMillis) {
        self.next_event += 1;
        let event = JobEvent { id: self.next_event.to_string(), kind, data, record: None };
        let Some(entry) = self.records.get_mut(&id) else { return };
        if entry.events.len() >= MAX_EVENTS {
            entry.events.remove(0);
        }
        entry.events.push(event.clone());
        if let Some(tx) = self.subscribers.get(&id) {
            let mut live = event.clone();
            if kind == EventKind::Completed {
                let mut r = entry.record.clone();
                r.derive_metrics();
                live.record = Some(Box::new(r));
            }
            let _ = tx.send(live);
        }
        let Some(hook) = &entry.record.webhook else { return };
        let wants = |e: &str| hook.events.iter().any(|w| w == e);
        let running = event.data["status"] == "running";
        let (name, did) = match kind {
            EventKind::Completed => ("job.completed", format!("{id}:completed:{}", event.id)),
            EventKind::Progress if wants("progress") => ("job.progress", format!("{id}:progress")),
            EventKind::Status if running && wants("start") => ("job.started", format!("{id}:started:{}", event.id)),
            _ => return,
        };
        if let Some(old) = self.hooks.get(&did) {
            self.hooks_due.remove(&(old.due, did.clone()));
        }
        self.hooks_due.insert((now, did.clone()));
        self.hooks.insert(did, Hook { job: id, event: name.to_owned(), at: now, attempts: 0, body: None, due: now });
    }

    /// Completes the followers of `id` with its outcome, or — `None` — hands them to the lease
    /// reaper to be queued on their own.
    fn settle_followers(&mut self, id: JobId, outcome: Option<&Outcome>, now: UnixMillis, expires: Instant) {
        let Some(entry) = self.records.get_mut(&id) else { return };
        let followers = std::mem::take(&mut entry.followers);
        if let Some(key) = entry.inflight.take()
            && self.inflight.get(&key) == Some(&id)
        {
            self.inflight.remove(&key);
        }
        for fid in followers {
            let Some(f) = self.live(fid) else { continue };
            if f.record.status.is_terminal() {
                continue;
            }
            match outcome {
                Some(outcome) => {
                    f.record.status = outcome.status();
                    f.record.completed_at = Some(now);
                    f.expires = expires;
                    f.envelope = None;
                    match outcome {
                        Outcome::Succeeded(out) => f.record.output = serde_json::from_str(out).ok(),
                        Outcome::Failed(err) => f.record.error = Some(err.clone()),
                    }
                    self.emit(fid, EventKind::Completed, json!({"status": outcome.status()}), now);
                }
                None => {
                    let envelope = f.envelope.take().unwrap_or_default();
                    f.record.status = JobStatus::Running;
                    f.lease = Some(Lease { owner: "orphan".into(), until: 0, envelope });
                    self.leases.insert((0, fid));
                }
            }
        }
    }

    fn note_write(&mut self) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY {
            self.writes_since_sweep = 0;
            let now = Instant::now();
            let expired: Vec<JobId> =
                self.records.iter().filter(|(_, e)| e.expires <= now).map(|(id, _)| *id).collect();
            for id in expired {
                self.drop_entry(id);
            }
            self.withdrawn.retain(|_, until| *until > now);
        }
    }
}

impl EmbeddedStore {
    pub fn new(retention: Duration) -> Self {
        Self { retention, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock")
    }

    /// Applies `f` to a live, non-terminal record; the common guard of the transitions.
    fn transition(&self, id: JobId, f: impl FnOnce(&mut Inner, JobStatus) -> Transition) -> Transition {
        let mut inner = self.lock();
        inner.note_write();
        let status = match inner.live(id) {
            None => return Transition::Missing,
            Some(e) => e.record.status,
        };
        if status.is_terminal() {
            return Transition::AlreadyTerminal(status);
        }
        f(&mut inner, status)
    }

    fn record(inner: &mut Inner, id: JobId) -> &mut JobRecord {
        &mut inner.records.get_mut(&id).expect("checked live").record
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create(&self, record: &JobRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.live(record.id).is_some() {
            return Err(StoreError::Conflict(record.id));
        }
        inner.records.insert(record.id, Entry::new(record.clone(), Instant::now() + self.retention));
        let (kind, data) = if record.status.is_terminal() {
            (EventKind::Completed, json!({"status": record.status}))
        } else {
            (EventKind::Status, json!({"status": "queued"}))
        };
        inner.emit(record.id, kind, data, record.created_at);
        inner.note_write();
        Ok(())
    }

    async fn create_coalesced(
        &self,
        record: &JobRecord,
        inflight: &str,
        envelope: &str,
    ) -> Result<Coalesced, StoreError> {
        let mut inner = self.lock();
        if inner.live(record.id).is_some() {
            return Err(StoreError::Conflict(record.id));
        }
        let expires = Instant::now() + self.retention;
        let leader = inner.inflight.get(inflight).copied();
        let active = leader.and_then(|l| inner.live(l).filter(|e| !e.record.status.is_terminal()).map(|_| l));
        let mut entry = Entry::new(record.clone(), expires);
        let result = match active {
            Some(leader) => {
                entry.envelope = Some(envelope.to_owned());
                inner.records.get_mut(&leader).expect("live").followers.push(record.id);
                Coalesced::Follower(leader)
            }
            None => {
                entry.inflight = Some(inflight.to_owned());
                inner.inflight.insert(inflight.to_owned(), record.id);
                Coalesced::Leader
            }
        };
        inner.records.insert(record.id, entry);
        inner.emit(record.id, EventKind::Status, json!({"status": "queued"}), record.created_at);
        inner.note_write();
        Ok(result)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.lock().live(id).map(|e| {
            let mut r = e.record.clone();
            r.derive_metrics();
            r
        }))
    }

    async fn start(&self, id: JobId, at: UnixMillis) -> Result<Start, StoreError> {
        let mut inner = self.lock();
        inner.note_write();
        let retention = self.retention;
        let Some(entry) = inner.live(id) else {
            let withdrawn = inner.withdrawn.get(&id).is_some_and(|until| *until > Instant::now());
            return Ok(if withdrawn { Start::Withdrawn } else { Start::Missing });
        };
        let r = &mut entry.record;
        if r.status.is_terminal() {
            return Ok(Start::AlreadyTerminal(r.status));
        }
        if r.status == JobStatus::Queued && r.deadline_at.is_some_and(|d| d < at) {
            r.status = JobStatus::Expired;
            r.completed_at = Some(at);
            r.error = Some(deadline_error());
            entry.expires = Instant::now() + retention;
            inner.emit(id, EventKind::Completed, json!({"status": "expired"}), at);
            inner.settle_followers(id, None, at, Instant::now() + retention);
            return Ok(Start::Expired);
        }
        r.status = JobStatus::Running;
        r.started_at = Some(at);
        r.attempts += 1;
        let attempt = r.attempts;
        inner.release(id);
        inner.emit(id, EventKind::Status, json!({"status": "running", "attempt": attempt}), at);
        Ok(Start::Started { attempt })
    }

    async fn finish(&self, id: JobId, outcome: &Outcome, at: UnixMillis) -> Result<Transition, StoreError> {
        let expires = Instant::now() + self.retention;
        Ok(self.transition(id, |inner, _| {
            inner.release(id);
            let entry = inner.records.get_mut(&id).expect("checked live");
            entry.expires = expires;
            let r = &mut entry.record;
            r.status = outcome.status();
            r.completed_at = Some(at);
            match outcome {
                Outcome::Succeeded(out) => r.output = serde_json::from_str(out).ok(),
                Outcome::Failed(err) => r.error = Some(err.clone()),
            }
            inner.emit(id, EventKind::Completed, json!({"status": outcome.status()}), at);
            inner.settle_followers(id, Some(outcome), at, expires);
            Transition::Applied
        }))
    }

    async fn retry(&self, id: JobId) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, _| {
            inner.release(id);
            Self::record(inner, id).status = JobStatus::Queued;
            inner.emit(id, EventKind::Status, json!({"status": "queued"}), kiln_proto::now_millis());
            Transition::Applied
        }))
    }

    async fn expire_if_due(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        let expires = Instant::now() + self.retention;
        Ok(self.transition(id, |inner, status| {
            let entry = inner.records.get_mut(&id).expect("checked live");
            let r = &mut entry.record;
            if status != JobStatus::Queued || r.deadline_at.is_none_or(|d| d >= at) {
                return Transition::NotApplicable(status);
            }
            r.status = JobStatus::Expired;
            r.completed_at = Some(at);
            r.error = Some(deadline_error());
            entry.expires = expires;
            inner.emit(id, EventKind::Completed, json!({"status": "expired"}), at);
            inner.settle_followers(id, None, at, expires);
            Transition::Applied
        }))
    }

    async fn progress(&self, id: JobId, progress: &serde_json::Value) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, _| {
            Self::record(inner, id).progress = Some(progress.clone());
            inner.emit(id, EventKind::Progress, progress.clone(), kiln_proto::now_millis());
            Transition::Applied
        }))
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.settle_followers(id, None, kiln_proto::now_millis(), Instant::now() + self.retention);
        inner.drop_entry(id);
        inner.withdrawn.insert(id, Instant::now() + self.retention);
        Ok(())
    }

    async fn lease(&self, id: JobId, owner: &str, until: UnixMillis, envelope: &str) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, status| {
            if status != JobStatus::Running {
                return Transition::NotApplicable(status);
            }
            inner.release(id);
            inner.leases.insert((until, id));
            let lease = Lease { owner: owner.to_owned(), until, envelope: envelope.to_owned() };
            inner.records.get_mut(&id).expect("checked live").lease = Some(lease);
            Transition::Applied
        }))
    }

    async fn renew(&self, id: JobId, owner: &str, until: UnixMillis) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, status| {
            let entry = inner.records.get_mut(&id).expect("checked live");
            let Some(lease) = entry.lease.as_mut().filter(|l| l.owner == owner && status == JobStatus::Running) else {
                return Transition::NotApplicable(status);
            };
            let old = std::mem::replace(&mut lease.until, until);
            inner.leases.remove(&(old, id));
            inner.leases.insert((until, id));
            Transition::Applied
        }))
    }

    async fn reap(
        &self,
        now: UnixMillis,
        owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Lapsed>, StoreError> {
        let mut inner = self.lock();
        let due: Vec<(UnixMillis, JobId)> =
            inner.leases.iter().take_while(|(until, _)| *until <= now).take(limit).copied().collect();
        let mut out = Vec::new();
        for key @ (_, id) in due {
            inner.leases.remove(&key);
            let Some(entry) = inner.live(id) else { continue };
            let running = entry.record.status == JobStatus::Running;
            match entry.lease.as_mut() {
                Some(lease) if running => {
                    lease.owner = owner.to_owned();
                    lease.until = claim_until;
                    out.push(Lapsed { id, envelope: lease.envelope.clone() });
                    inner.leases.insert((claim_until, id));
                }
                _ => entry.lease = None,
            }
        }
        Ok(out)
    }

    async fn release(&self, id: JobId, owner: &str) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, status| {
            let entry = inner.records.get_mut(&id).expect("checked live");
            if status != JobStatus::Running || entry.lease.as_ref().is_none_or(|l| l.owner != owner) {
                return Transition::NotApplicable(status);
            }
            entry.record.status = JobStatus::Queued;
            inner.release(id);
            inner.emit(id, EventKind::Status, json!({"status": "queued"}), kiln_proto::now_millis());
            Transition::Applied
        }))
    }

    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError> {
        let mut inner = self.lock();
        let expires = Instant::now() + self.retention;
        let Some(entry) = inner.live(id) else { return Ok(Transition::Missing) };
        let r = &mut entry.record;
        if r.status != JobStatus::Failed {
            return Ok(Transition::NotApplicable(r.status));
        }
        r.status = JobStatus::Queued;
        r.attempts = 0;
        r.error = None;
        r.completed_at = None;
        r.started_at = None;
        r.progress = None;
        entry.expires = expires;
        inner.emit(id, EventKind::Status, json!({"status": "queued"}), kiln_proto::now_millis());
        Ok(Transition::Applied)
    }

    async fn cancel(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        let expires = Instant::now() + self.retention;
        Ok(self.transition(id, |inner, _| {
            inner.release(id);
            let entry = inner.records.get_mut(&id).expect("checked live");
            entry.expires = expires;
            entry.record.status = JobStatus::Canceled;
            entry.record.completed_at = Some(at);
            entry.record.error = Some(canceled_error());
            inner.emit(id, EventKind::Completed, json!({"status": "canceled"}), at);
            inner.settle_followers(id, None, at, expires);
            Transition::Applied
        }))
    }

    async fn events(&self, id: JobId, after: Option<&str>) -> Result<Vec<JobEvent>, StoreError> {
        let after: u64 = after.and_then(|a| a.parse().ok()).unwrap_or(0);
        let mut inner = self.lock();
        Ok(inner
            .live(id)
            .map(|e| e.events.iter().filter(|ev| ev.id.parse::<u64>().unwrap_or(0) > after).cloned().collect())
            .unwrap_or_default())
    }

    async fn subscribe(&self, id: JobId) -> broadcast::Receiver<JobEvent> {
        let mut inner = self.lock();
        inner.subscribers.retain(|_, tx| tx.receiver_count() > 0);
        inner.subscribers.entry(id).or_insert_with(|| broadcast::channel(64).0).subscribe()
    }

    async fn claim_idempotency(
        &self,
        key: &str,
        fingerprint: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.idempotency.retain(|_, (_, _, _, until)| *until > now);
        if let Some((held, fp, committed, _)) = inner.idempotency.get(key) {
            return Ok(Claim::Held { job: *held, fingerprint: fp.clone(), committed: *committed });
        }
        inner.idempotency.insert(key.to_owned(), (job, fingerprint.to_owned(), false, now + ttl));
        Ok(Claim::Claimed)
    }

    async fn commit_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError> {
        if let Some(claim) = self.lock().idempotency.get_mut(key).filter(|c| c.0 == job) {
            claim.2 = true;
        }
        Ok(())
    }

    async fn release_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.idempotency.get(key).is_some_and(|c| c.0 == job) {
            inner.idempotency.remove(key);
        }
        Ok(())
    }

    async fn due_webhooks(
        &self,
        now: UnixMillis,
        _owner: &str,
        claim_until: UnixMillis,
        limit: usize,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        let mut inner = self.lock();
        let due: Vec<(UnixMillis, String)> =
            inner.hooks_due.iter().take_while(|(t, _)| *t <= now).take(limit).cloned().collect();
        let mut out = Vec::new();
        for key in due {
            inner.hooks_due.remove(&key);
            let Some(hook) = inner.hooks.get_mut(&key.1) else { continue };
            hook.due = claim_until;
            out.push(WebhookDelivery {
                id: key.1.clone(),
                job: hook.job,
                event: hook.event.clone(),
                at: hook.at,
                attempts: hook.attempts,
                body: hook.body.clone(),
            });
            inner.hooks_due.insert((claim_until, key.1));
        }
        Ok(out)
    }

    async fn webhook_attempted(&self, d: &WebhookDelivery, a: &WebhookAttempt) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(state) = inner.live(d.job).and_then(|e| e.record.webhook.as_mut()) {
            state.attempts += 1;
            state.last_status = a.status;
            if a.ok {
                state.delivered_at = Some(a.at);
            } else if a.retry_at.is_none() {
                state.gave_up_at = Some(a.at);
            }
        }
        let Some(hook) = inner.hooks.get_mut(&d.id) else { return Ok(()) };
        hook.attempts += 1;
        hook.body = Some(a.body.clone());
        let old = hook.due;
        inner.hooks_due.remove(&(old, d.id.clone()));
        match a.retry_at {
            Some(at) if !a.ok => {
                inner.hooks.get_mut(&d.id).expect("present").due = at;
                inner.hooks_due.insert((at, d.id.clone()));
            }
            _ => {
                inner.hooks.remove(&d.id);
            }
        }
        Ok(())
    }

    async fn worker_seen(&self, model: &ModelName, worker: &str, at: UnixMillis) -> Result<(), StoreError> {
        self.lock().workers.entry(model.clone()).or_default().insert(worker.to_owned(), at);
        Ok(())
    }

    async fn workers(&self, model: &ModelName, since: UnixMillis) -> Result<Vec<String>, StoreError> {
        let mut inner = self.lock();
        let Some(seen) = inner.workers.get_mut(model) else { return Ok(Vec::new()) };
        seen.retain(|_, at| *at >= since);
        let mut names: Vec<String> = seen.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}
