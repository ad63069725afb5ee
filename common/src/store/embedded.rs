//! The in-process job store of `kiln dev`: the same transitions, run fencing, leases, expiry,
//! sweeping, event logs, idempotency claims, ordered webhook outbox and job listing as the Redis
//! store (see [`super`] for what they guarantee), on maps guarded by one mutex. Its clock is the
//! process's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{EventKind, JobEvent, JobId, JobRecord, JobStatus, ModelName, UnixMillis, now_millis};
use serde_json::json;
use tokio::sync::broadcast;

use super::{
    Claim, Coalesced, Creation, Lapsed, ListCursor, ListPage, ListQuery, MAX_EXAMINED, Outcome, Run, Slot, Start,
    Store, StoreError, Stray, Transition, WebhookAttempt, WebhookDelivery, canceled_error, deadline_error, lost_error,
};

/// How long the store keeps things, and when it looks at a quiet job.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// A live job's record, counted again from each transition.
    pub retention: Duration,
    /// A finished job's record, counted from completion.
    pub finished_retention: Duration,
    /// How long a live job may go quiet before the sweeper looks at it.
    pub sweep_after: Duration,
}

pub struct EmbeddedStore {
    settings: StoreSettings,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<JobId, Entry>,
    withdrawn: HashMap<JobId, UnixMillis>,
    /// (when, job) of jobs to hand out again: leases' deadlines, orphans and strays.
    leases: BTreeSet<(UnixMillis, JobId)>,
    /// (due, job) of live jobs: by then something must have happened to them.
    active: BTreeSet<(UnixMillis, JobId)>,
    writes_since_sweep: usize,
    next_event: u64,
    subscribers: HashMap<JobId, broadcast::Sender<JobEvent>>,
    idempotency: HashMap<String, IdemClaim>,
    /// (due time, delivery id) of webhook deliveries.
    hooks_due: BTreeSet<(UnixMillis, String)>,
    hooks: HashMap<String, Hook>,
    /// Cache key → the job computing it, for in-flight coalescing.
    inflight: HashMap<String, JobId>,
    /// Model → worker → last seen.
    workers: HashMap<ModelName, HashMap<String, UnixMillis>>,
    /// Tenants with a lane of their own, per model (see [`Store::lanes`]).
    lanes: HashMap<ModelName, BTreeSet<String>>,
    /// Tenant → its jobs in flight (slots of `reserve_slot`), with when each slot was taken.
    live: HashMap<String, HashMap<JobId, UnixMillis>>,
    /// The job listing: (created_at, id) of every record, and of each tenant's.
    listing: BTreeSet<(UnixMillis, JobId)>,
    tenant_listing: HashMap<String, BTreeSet<(UnixMillis, JobId)>>,
    /// Records listed so far: each entry's `listed` is its number (the horizon of a listing).
    listed: u64,
}

/// How long a slot taken for a job that has no record yet is kept (accepting takes far less).
const RESERVATION_GRACE_MS: i64 = 60_000;

struct IdemClaim {
    job: JobId,
    fingerprint: String,
    committed: bool,
    until: UnixMillis,
    ttl: Duration,
}

struct Hook {
    job: JobId,
    event: String,
    at: UnixMillis,
    attempts: u32,
    body: Option<String>,
    due: UnixMillis,
    seq: u64,
}

struct Entry {
    record: JobRecord,
    expires: UnixMillis,
    /// Who holds the job besides its message: a worker's lease, or the reaper (`requeue`).
    lease: Option<Lease>,
    events: Vec<JobEvent>,
    /// Jobs coalesced onto this one.
    followers: Vec<JobId>,
    /// The in-flight key this job leads.
    inflight: Option<String>,
    /// The leader this job follows.
    follows: Option<JobId>,
    /// The job's message, while it is live.
    envelope: Option<String>,
    /// Its message is known to be enqueued.
    confirmed: bool,
    /// The worker of its latest run.
    worker: Option<String>,
    sweeps: u32,
    /// Its entry in `active`.
    due: Option<UnixMillis>,
    /// Its webhook events so far, and the pending ones in order: seq → delivery id.
    hook_seq: u64,
    hooks: BTreeMap<u64, String>,
    /// Its number in the job listing.
    listed: u64,
}

impl Entry {
    fn new(record: JobRecord, expires: UnixMillis) -> Self {
        Self {
            record,
            expires,
            lease: None,
            events: Vec::new(),
            followers: Vec::new(),
            inflight: None,
            follows: None,
            envelope: None,
            confirmed: false,
            worker: None,
            sweeps: 0,
            due: None,
            hook_seq: 0,
            hooks: BTreeMap::new(),
            listed: 0,
        }
    }
}

/// Most events kept per job, like the Redis stream's cap.
const MAX_EVENTS: usize = 1000;
/// Most followers one job carries, like the Redis store.
const MAX_FOLLOWERS: usize = super::redis::MAX_FOLLOWERS;
/// The lease owner of a job waiting for the reaper.
const REQUEUE: &str = "requeue";

struct Lease {
    owner: String,
    until: UnixMillis,
}

/// Expired records are dropped on access, and swept in full every this many writes.
const SWEEP_EVERY: usize = 1024;

fn millis(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl Inner {
    fn live(&mut self, id: JobId) -> Option<&mut Entry> {
        if self.records.get(&id).is_some_and(|e| e.expires <= now_millis()) {
            self.drop_entry(id);
        }
        self.records.get_mut(&id)
    }

    fn drop_entry(&mut self, id: JobId) {
        if let Some(e) = self.records.remove(&id) {
            let at = (e.record.created_at, id);
            self.listing.remove(&at);
            if let Some(t) = &e.record.tenant
                && let Some(set) = self.tenant_listing.get_mut(t)
            {
                set.remove(&at);
                if set.is_empty() {
                    self.tenant_listing.remove(t);
                }
            }
            if let Some(l) = e.lease {
                self.leases.remove(&(l.until, id));
            }
            if let Some(d) = e.due {
                self.active.remove(&(d, id));
            }
        }
    }

    /// Records a new entry, in the job listing too.
    fn add(&mut self, mut entry: Entry) {
        self.listed += 1;
        entry.listed = self.listed;
        let at = (entry.record.created_at, entry.record.id);
        self.listing.insert(at);
        if let Some(t) = &entry.record.tenant {
            self.tenant_listing.entry(t.clone()).or_default().insert(at);
        }
        self.records.insert(entry.record.id, entry);
    }

    fn clear_lease(&mut self, id: JobId) {
        if let Some(l) = self.records.get_mut(&id).and_then(|e| e.lease.take()) {
            self.leases.remove(&(l.until, id));
        }
    }

    fn set_lease(&mut self, id: JobId, owner: &str, until: UnixMillis) {
        self.clear_lease(id);
        if let Some(e) = self.records.get_mut(&id) {
            e.lease = Some(Lease { owner: owner.to_owned(), until });
            self.leases.insert((until, id));
        }
    }

    /// A live job's retention starts again, and it has `after` to show activity again.
    fn touch(&mut self, id: JobId, s: &StoreSettings, after: i64) {
        let now = now_millis();
        let Some(e) = self.records.get_mut(&id) else { return };
        e.expires = now + millis(s.retention);
        if let Some(old) = e.due.replace(now + after) {
            self.active.remove(&(old, id));
        }
        self.active.insert((now + after, id));
    }

    /// A job became terminal: no lease, no envelope, nothing to watch.
    fn ended(&mut self, id: JobId, s: &StoreSettings) {
        self.clear_lease(id);
        let Some(e) = self.records.get_mut(&id) else { return };
        if let Some(slots) = e.record.tenant.as_ref().and_then(|t| self.live.get_mut(t)) {
            slots.remove(&id);
        }
        e.envelope = None;
        e.expires = now_millis() + millis(s.finished_retention);
        if let Some(old) = e.due.take() {
            self.active.remove(&(old, id));
        }
    }

    /// Ends a live job without an outcome (`expired`, `canceled`, or `failed` as lost) with
    /// `error`; its followers go to the reaper to run on their own.
    fn end_without_outcome(&mut self, id: JobId, status: JobStatus, error: kiln_proto::JobError, s: &StoreSettings) {
        if let Some(e) = self.records.get_mut(&id) {
            e.record.status = status;
            e.record.completed_at = Some(now_millis());
            e.record.error = Some(error);
        }
        self.ended(id, s);
        self.emit(id, EventKind::Completed, json!({ "status": status }));
        self.settle_followers(id, None, s);
    }

    /// Hands a live job to the reaper, which queues its envelope again.
    fn requeue(&mut self, id: JobId, s: &StoreSettings, at: UnixMillis) {
        if let Some(e) = self.records.get_mut(&id) {
            e.record.status = JobStatus::Queued;
        }
        self.set_lease(id, REQUEUE, at);
        self.touch(id, s, millis(s.sweep_after));
    }

    /// Appends an event to the job's log, tells its subscribers, and queues its webhook delivery.
    fn emit(&mut self, id: JobId, kind: EventKind, data: serde_json::Value) {
        let now = now_millis();
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
        entry.hook_seq += 1;
        let seq = entry.hook_seq;
        entry.hooks.retain(|_, d| *d != did);
        entry.hooks.insert(seq, did.clone());
        if let Some(old) = self.hooks.get(&did) {
            self.hooks_due.remove(&(old.due, did.clone()));
        }
        self.hooks_due.insert((now, did.clone()));
        self.hooks
            .insert(did, Hook { job: id, event: name.to_owned(), at: now, attempts: 0, body: None, due: now, seq });
    }

    /// Completes the followers of `id` with its outcome, or — `None` — hands them to the reaper
    /// to be queued on their own.
    fn settle_followers(&mut self, id: JobId, outcome: Option<&Outcome>, s: &StoreSettings) {
        let Some(entry) = self.records.get_mut(&id) else { return };
        let followers = std::mem::take(&mut entry.followers);
        if let Some(key) = entry.inflight.take()
            && self.inflight.get(&key) == Some(&id)
        {
            self.inflight.remove(&key);
        }
        let now = now_millis();
        for fid in followers {
            let Some(f) = self.live(fid) else { continue };
            if f.record.status.is_terminal() {
                continue;
            }
            match outcome {
                Some(outcome) => {
                    f.record.status = outcome.status();
                    f.record.completed_at = Some(now);
                    match outcome {
                        Outcome::Succeeded(out) => f.record.output = serde_json::from_str(out).ok(),
                        Outcome::Failed(err) => f.record.error = Some(err.clone()),
                    }
                    self.ended(fid, s);
                    self.emit(fid, EventKind::Completed, json!({"status": outcome.status()}));
                }
                None => {
                    f.follows = None;
                    self.requeue(fid, s, 0);
                }
            }
        }
    }

    /// Notes the tenant's lane of a job that is to be published.
    fn lane(&mut self, record: &JobRecord) {
        if let Some(t) = &record.tenant {
            self.lanes.entry(record.model.clone()).or_default().insert(t.clone());
        }
    }

    fn note_write(&mut self) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY {
            self.writes_since_sweep = 0;
            let now = now_millis();
            let expired: Vec<JobId> =
                self.records.iter().filter(|(_, e)| e.expires <= now).map(|(id, _)| *id).collect();
            for id in expired {
                self.drop_entry(id);
            }
            self.withdrawn.retain(|_, until| *until > now);
            self.idempotency.retain(|_, c| c.until > now);
        }
    }

    fn is_live(&mut self, id: JobId) -> bool {
        self.live(id).is_some_and(|e| !e.record.status.is_terminal())
    }
}

impl EmbeddedStore {
    /// A store keeping finished jobs as long as live ones, sweeping after ten minutes.
    pub fn new(retention: Duration) -> Self {
        Self::with(StoreSettings { retention, finished_retention: retention, sweep_after: Duration::from_secs(600) })
    }

    pub fn with(settings: StoreSettings) -> Self {
        Self { settings, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock")
    }

    fn idle(&self) -> i64 {
        millis(self.settings.sweep_after)
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

    /// [`Self::transition`] for a write of run `run`, which must be the job's latest.
    fn run_transition(&self, id: JobId, run: Run, f: impl FnOnce(&mut Inner) -> Transition) -> Transition {
        self.transition(id, |inner, status| {
            let entry = inner.records.get(&id).expect("checked live");
            if status != JobStatus::Running {
                return Transition::NotApplicable(status);
            }
            if entry.record.attempts != run {
                return Transition::Superseded;
            }
            f(inner)
        })
    }

    fn record(inner: &mut Inner, id: JobId) -> &mut JobRecord {
        &mut inner.records.get_mut(&id).expect("checked live").record
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn insert(&self, record: &JobRecord, how: &Creation<'_>) -> Result<(), StoreError> {
        let s = self.settings;
        let mut inner = self.lock();
        if inner.live(record.id).is_some() {
            return Err(StoreError::Conflict(record.id));
        }
        let mut entry = Entry::new(record.clone(), now_millis() + millis(s.retention));
        entry.envelope = how.envelope.map(str::to_owned);
        inner.add(entry);
        if record.status.is_terminal() {
            inner.ended(record.id, &s);
            inner.emit(record.id, EventKind::Completed, json!({"status": record.status}));
        } else {
            inner.lane(record);
            inner.touch(record.id, &s, self.idle());
            inner.emit(record.id, EventKind::Status, json!({"status": "queued"}));
        }
        if let Some(key) = how.idempotency_key
            && let Some(claim) = inner.idempotency.get_mut(key).filter(|c| c.job == record.id)
        {
            claim.until = now_millis() + millis(claim.ttl);
        }
        inner.note_write();
        Ok(())
    }

    async fn create_coalesced(
        &self,
        record: &JobRecord,
        inflight: &str,
        how: &Creation<'_>,
        hold_off: bool,
    ) -> Result<Coalesced, StoreError> {
        let s = self.settings;
        let mut inner = self.lock();
        if inner.live(record.id).is_some() {
            return Err(StoreError::Conflict(record.id));
        }
        let leader = inner.inflight.get(inflight).copied();
        let unconfirmed =
            leader.filter(|l| inner.live(*l).is_some_and(|e| e.record.status == JobStatus::Queued && !e.confirmed));
        if let Some(leader) = unconfirmed.filter(|_| hold_off) {
            return Ok(Coalesced::Pending(leader));
        }
        let followable = leader.filter(|l| {
            inner.live(*l).is_some_and(|e| {
                let confirmed =
                    e.record.status == JobStatus::Running || (e.record.status == JobStatus::Queued && e.confirmed);
                confirmed && e.followers.len() < MAX_FOLLOWERS
            })
        });
        let mut entry = Entry::new(record.clone(), now_millis() + millis(s.retention));
        entry.envelope = how.envelope.map(str::to_owned);
        let result = match followable {
            Some(leader) => {
                entry.follows = Some(leader);
                entry.confirmed = true;
                inner.records.get_mut(&leader).expect("live").followers.push(record.id);
                Coalesced::Follower(leader)
            }
            None => {
                entry.inflight = Some(inflight.to_owned());
                inner.inflight.insert(inflight.to_owned(), record.id);
                inner.lane(record);
                Coalesced::Leader
            }
        };
        inner.add(entry);
        inner.touch(record.id, &s, self.idle());
        inner.emit(record.id, EventKind::Status, json!({"status": "queued"}));
        inner.note_write();
        Ok(result)
    }

    async fn confirm(&self, id: JobId, key: Option<&str>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(e) = inner.live(id).filter(|e| !e.record.status.is_terminal()) {
            e.confirmed = true;
        }
        if let Some(key) = key
            && let Some(claim) = inner.idempotency.get_mut(key).filter(|c| c.job == id)
        {
            claim.committed = true;
            claim.until = now_millis() + millis(claim.ttl);
        }
        Ok(())
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.lock().live(id).map(|e| {
            let mut r = e.record.clone();
            r.derive_metrics();
            r
        }))
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage, StoreError> {
        let mut inner = self.lock();
        let now = now_millis();
        let horizon = q.cursor.map_or(inner.listed, |c| c.horizon);
        let upper = q.cursor.map_or(Bound::Unbounded, |c| Bound::Excluded((c.created_at, c.id)));
        let set = match &q.tenant {
            None => Some(&inner.listing),
            Some(t) => inner.tenant_listing.get(t),
        };
        // One more than is examined, to know whether anything is left after them.
        let entries: Vec<(UnixMillis, JobId)> = set
            .into_iter()
            .flat_map(|set| set.range((Bound::Unbounded, upper)).rev())
            .take_while(|(at, _)| q.created_after.is_none_or(|after| *at > after))
            .take(MAX_EXAMINED + 1)
            .copied()
            .collect();
        let (limit, mut records, mut gone, mut examined) = (q.page_size(), Vec::new(), Vec::new(), 0);
        for (_, id) in entries.iter().take(MAX_EXAMINED) {
            examined += 1;
            match inner.records.get(id) {
                Some(e) if e.expires > now => {
                    if e.listed <= horizon && q.matches(&e.record) {
                        let mut r = e.record.clone();
                        r.derive_metrics();
                        records.push(r);
                    }
                }
                _ => gone.push(*id),
            }
            if records.len() == limit {
                break;
            }
        }
        for id in gone {
            inner.drop_entry(id);
        }
        let next = (examined < entries.len()).then(|| entries[examined - 1]).map(|(created_at, id)| ListCursor {
            created_at,
            id,
            horizon,
        });
        Ok(ListPage { records, next })
    }

    async fn start(&self, id: JobId, worker: &str) -> Result<Start, StoreError> {
        let s = self.settings;
        let mut inner = self.lock();
        inner.note_write();
        let now = now_millis();
        let Some(entry) = inner.live(id) else {
            let withdrawn = inner.withdrawn.get(&id).is_some_and(|until| *until > now);
            return Ok(if withdrawn { Start::Withdrawn } else { Start::Missing });
        };
        let r = &mut entry.record;
        if r.status.is_terminal() {
            return Ok(Start::AlreadyTerminal(r.status));
        }
        if r.status == JobStatus::Queued && r.attempts == 0 && r.deadline_at.is_some_and(|d| d < now) {
            inner.end_without_outcome(id, JobStatus::Expired, deadline_error(), &s);
            return Ok(Start::Expired);
        }
        let held = entry.lease.as_ref().is_some_and(|l| l.owner != REQUEUE && l.until > now);
        if r.status == JobStatus::Running && held {
            return Ok(Start::Held);
        }
        r.status = JobStatus::Running;
        r.started_at = Some(now);
        r.attempts += 1;
        let attempt = r.attempts;
        entry.worker = Some(worker.to_owned());
        entry.confirmed = true;
        inner.clear_lease(id);
        inner.touch(id, &s, self.idle());
        inner.emit(id, EventKind::Status, json!({"status": "running", "attempt": attempt}));
        Ok(Start::Started { attempt })
    }

    async fn finish(&self, id: JobId, run: Run, outcome: &Outcome) -> Result<Transition, StoreError> {
        let s = self.settings;
        Ok(self.run_transition(id, run, |inner| {
            let r = Self::record(inner, id);
            r.status = outcome.status();
            r.completed_at = Some(now_millis());
            match outcome {
                Outcome::Succeeded(out) => r.output = serde_json::from_str(out).ok(),
                Outcome::Failed(err) => r.error = Some(err.clone()),
            }
            inner.ended(id, &s);
            inner.settle_followers(id, Some(outcome), &s);
            inner.emit(id, EventKind::Completed, json!({"status": outcome.status()}));
            Transition::Applied
        }))
    }

    async fn retry(&self, id: JobId, run: Run, delay: Duration) -> Result<Transition, StoreError> {
        let s = self.settings;
        let idle = self.idle();
        Ok(self.run_transition(id, run, |inner| {
            inner.clear_lease(id);
            Self::record(inner, id).status = JobStatus::Queued;
            inner.touch(id, &s, idle + millis(delay));
            inner.emit(id, EventKind::Status, json!({"status": "queued"}));
            Transition::Applied
        }))
    }

    async fn expire_if_due(&self, id: JobId) -> Result<Transition, StoreError> {
        let s = self.settings;
        Ok(self.transition(id, |inner, status| {
            let now = now_millis();
            let r = Self::record(inner, id);
            if status != JobStatus::Queued || r.attempts > 0 || r.deadline_at.is_none_or(|d| d >= now) {
                return Transition::NotApplicable(status);
            }
            inner.end_without_outcome(id, JobStatus::Expired, deadline_error(), &s);
            Transition::Applied
        }))
    }

    async fn progress(&self, id: JobId, run: Run, progress: &serde_json::Value) -> Result<Transition, StoreError> {
        let s = self.settings;
        let idle = self.idle();
        Ok(self.run_transition(id, run, |inner| {
            Self::record(inner, id).progress = Some(progress.clone());
            inner.touch(id, &s, idle);
            inner.emit(id, EventKind::Progress, progress.clone());
            Transition::Applied
        }))
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        let s = self.settings;
        let mut inner = self.lock();
        inner.settle_followers(id, None, &s);
        inner.drop_entry(id);
        inner.withdrawn.insert(id, now_millis() + millis(s.retention));
        Ok(())
    }

    async fn lease(
        &self,
        id: JobId,
        run: Run,
        owner: &str,
        ttl: Duration,
        envelope: &str,
    ) -> Result<Transition, StoreError> {
        let s = self.settings;
        let idle = self.idle();
        Ok(self.run_transition(id, run, |inner| {
            inner.set_lease(id, owner, now_millis() + millis(ttl));
            inner.records.get_mut(&id).expect("checked live").envelope = Some(envelope.to_owned());
            inner.touch(id, &s, idle + millis(ttl));
            Transition::Applied
        }))
    }

    async fn renew(&self, id: JobId, owner: &str, ttl: Duration) -> Result<Transition, StoreError> {
        let s = self.settings;
        let idle = self.idle();
        Ok(self.transition(id, |inner, status| {
            let entry = inner.records.get(&id).expect("checked live");
            if status != JobStatus::Running || entry.lease.as_ref().is_none_or(|l| l.owner != owner) {
                return Transition::NotApplicable(status);
            }
            inner.set_lease(id, owner, now_millis() + millis(ttl));
            inner.touch(id, &s, idle + millis(ttl));
            Transition::Applied
        }))
    }

    async fn reap(&self, limit: usize) -> Result<Vec<Lapsed>, StoreError> {
        let s = self.settings;
        let mut inner = self.lock();
        let now = now_millis();
        let due: Vec<(UnixMillis, JobId)> =
            inner.leases.iter().take_while(|(until, _)| *until <= now).take(limit).copied().collect();
        let mut out = Vec::new();
        for key @ (_, id) in due {
            inner.leases.remove(&key);
            let Some(entry) = inner.live(id) else { continue };
            entry.lease = None;
            let live = !entry.record.status.is_terminal();
            let Some(envelope) = entry.envelope.clone().filter(|_| live) else { continue };
            entry.record.status = JobStatus::Queued;
            entry.follows = None;
            // Strays requeued again and again (their queue is not consumed) are looked at less often.
            let backoff = 1 << entry.sweeps.min(6);
            inner.touch(id, &s, millis(s.sweep_after) * backoff);
            inner.emit(id, EventKind::Status, json!({"status": "queued"}));
            out.push(Lapsed { id, envelope });
        }
        Ok(out)
    }

    async fn requeue_later(&self, id: JobId, delay: Duration) -> Result<Transition, StoreError> {
        let s = self.settings;
        Ok(self.transition(id, |inner, _| {
            inner.requeue(id, &s, now_millis() + millis(delay));
            Transition::Applied
        }))
    }

    async fn sweep(&self, limit: usize) -> Result<Vec<JobId>, StoreError> {
        let inner = self.lock();
        let now = now_millis();
        Ok(inner.active.iter().take_while(|(due, _)| *due <= now).take(limit).map(|(_, id)| *id).collect())
    }

    async fn stray(&self, id: JobId, max_sweeps: u32) -> Result<Stray, StoreError> {
        let s = self.settings;
        let idle = self.idle();
        let mut inner = self.lock();
        let now = now_millis();
        let Some(entry) = inner.live(id) else { return Ok(Stray::Gone) };
        if entry.record.status.is_terminal() {
            if let Some(d) = entry.due.take() {
                inner.active.remove(&(d, id));
            }
            return Ok(Stray::Gone);
        }
        if entry.due.is_some_and(|d| d > now) {
            return Ok(Stray::Fine);
        }
        if let Some(until) = entry.lease.as_ref().map(|l| l.until).filter(|u| *u > now) {
            inner.touch(id, &s, until - now + idle);
            return Ok(Stray::Fine);
        }
        if entry.follows.is_some_and(|l| inner.is_live(l)) {
            inner.touch(id, &s, idle);
            return Ok(Stray::Fine);
        }
        let entry = inner.records.get_mut(&id).expect("live");
        entry.sweeps += 1;
        if entry.sweeps > max_sweeps || entry.envelope.is_none() {
            inner.end_without_outcome(id, JobStatus::Failed, lost_error(), &s);
            return Ok(Stray::Lost);
        }
        entry.follows = None;
        inner.requeue(id, &s, 0);
        inner.emit(id, EventKind::Status, json!({"status": "queued"}));
        Ok(Stray::Requeued)
    }

    async fn redrive(&self, id: JobId) -> Result<Transition, StoreError> {
        let s = self.settings;
        let mut inner = self.lock();
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
        entry.sweeps = 0;
        inner.touch(id, &s, millis(s.sweep_after));
        inner.emit(id, EventKind::Status, json!({"status": "queued"}));
        Ok(Transition::Applied)
    }

    async fn cancel(&self, id: JobId) -> Result<Transition, StoreError> {
        let s = self.settings;
        Ok(self.transition(id, |inner, _| {
            inner.end_without_outcome(id, JobStatus::Canceled, canceled_error(), &s);
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
        pending: Duration,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let mut inner = self.lock();
        let now = now_millis();
        if inner.idempotency.get(key).is_some_and(|c| c.until <= now) {
            inner.idempotency.remove(key);
        }
        let stale = inner.idempotency.get(key).map(|c| (c.job, c.committed)).is_some_and(|(held, committed)| {
            !committed && inner.live(held).is_none() && inner.withdrawn.get(&held).is_some_and(|u| *u > now)
        });
        if stale {
            inner.idempotency.remove(key);
        }
        if let Some(held) = inner.idempotency.get(key).map(|c| c.job) {
            // A pending claim whose job exists with its message enqueued reads as committed.
            let confirmed = inner.live(held).is_some_and(|e| e.confirmed || e.record.status.is_terminal());
            let claim = inner.idempotency.get_mut(key).expect("present");
            if !claim.committed && confirmed {
                claim.committed = true;
                claim.until = now + millis(claim.ttl);
            }
            return Ok(Claim::Held {
                job: claim.job,
                fingerprint: claim.fingerprint.clone(),
                committed: claim.committed,
            });
        }
        let claim =
            IdemClaim { job, fingerprint: fingerprint.to_owned(), committed: false, until: now + millis(pending), ttl };
        inner.idempotency.insert(key.to_owned(), claim);
        Ok(Claim::Claimed)
    }

    async fn release_idempotency(&self, key: &str, job: JobId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.idempotency.get(key).is_some_and(|c| c.job == job) {
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
            let Some(job) = inner.hooks.get(&key.1).map(|h| h.job) else { continue };
            // A job's deliveries go out in order: one behind an earlier pending one waits.
            let first = inner.records.get(&job).and_then(|e| e.hooks.values().next().cloned());
            let until = if first.as_ref().is_none_or(|f| *f == key.1) { claim_until } else { now + 1000 };
            let hook = inner.hooks.get_mut(&key.1).expect("present");
            hook.due = until;
            if until == claim_until {
                out.push(WebhookDelivery {
                    id: key.1.clone(),
                    job: hook.job,
                    event: hook.event.clone(),
                    at: hook.at,
                    attempts: hook.attempts,
                    body: hook.body.clone(),
                    seq: hook.seq,
                });
            }
            inner.hooks_due.insert((until, key.1));
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
                if let Some(e) = inner.records.get_mut(&d.job) {
                    e.hooks.retain(|_, did| *did != d.id);
                }
            }
        }
        Ok(())
    }

    async fn reserve_slot(&self, tenant: &str, id: JobId, max: u32) -> Result<Slot, StoreError> {
        let mut inner = self.lock();
        let Inner { live, records, .. } = &mut *inner;
        let slots = live.entry(tenant.to_owned()).or_default();
        // A slot whose job is gone (withdrawn, or forgotten after its retention) is free; one
        // just taken for a job being recorded is not.
        let now = now_millis();
        slots.retain(|j, at| match records.get(j) {
            Some(e) => !e.record.status.is_terminal(),
            None => now - *at < RESERVATION_GRACE_MS,
        });
        let in_use = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        if in_use >= max && !slots.contains_key(&id) {
            return Ok(Slot { granted: false, in_use });
        }
        slots.insert(id, now);
        let in_use = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        Ok(Slot { granted: true, in_use })
    }

    async fn release_slot(&self, tenant: &str, id: JobId) -> Result<(), StoreError> {
        if let Some(slots) = self.lock().live.get_mut(tenant) {
            slots.remove(&id);
        }
        Ok(())
    }

    async fn worker_seen(&self, model: &ModelName, worker: &str) -> Result<(), StoreError> {
        self.lock().workers.entry(model.clone()).or_default().insert(worker.to_owned(), now_millis());
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

    async fn lanes(&self, model: &ModelName, known: usize) -> Result<Option<Vec<String>>, StoreError> {
        let inner = self.lock();
        let lanes = inner.lanes.get(model);
        if lanes.map_or(0, BTreeSet::len) == known {
            return Ok(None);
        }
        Ok(Some(lanes.map(|t| t.iter().cloned().collect()).unwrap_or_default()))
    }

    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}
