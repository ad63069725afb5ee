//! The in-process job store of `kiln dev`: the same transitions, fencing, leases and expiry as the
//! Redis store, on maps guarded by one mutex.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{JobId, JobRecord, JobStatus, UnixMillis};
use tokio::time::Instant;

use super::{Lapsed, Outcome, Start, Store, StoreError, Transition, deadline_error};

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
}

struct Entry {
    record: JobRecord,
    expires: Instant,
    lease: Option<Lease>,
}

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
        let entry = Entry { record: record.clone(), expires: Instant::now() + self.retention, lease: None };
        inner.records.insert(record.id, entry);
        inner.note_write();
        Ok(())
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
            return Ok(Start::Expired);
        }
        r.status = JobStatus::Running;
        r.started_at = Some(at);
        r.attempts += 1;
        let attempt = r.attempts;
        inner.release(id);
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
            Transition::Applied
        }))
    }

    async fn retry(&self, id: JobId) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, _| {
            inner.release(id);
            Self::record(inner, id).status = JobStatus::Queued;
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
            Transition::Applied
        }))
    }

    async fn progress(&self, id: JobId, progress: &serde_json::Value) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |inner, _| {
            Self::record(inner, id).progress = Some(progress.clone());
            Transition::Applied
        }))
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        let mut inner = self.lock();
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
        Ok(Transition::Applied)
    }

    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}
