//! The in-process job store of `kiln dev`: the same transitions and fencing as the Redis store, on a
//! map guarded by a mutex, with records expiring after the retention TTL.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{JobId, JobRecord, JobStatus, UnixMillis};
use tokio::time::Instant;

use super::{Outcome, Store, StoreError, Transition};

pub struct EmbeddedStore {
    retention: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<JobId, (JobRecord, Instant)>,
    writes_since_sweep: usize,
}

/// Expired records are dropped on access, and swept in full every this many writes.
const SWEEP_EVERY: usize = 1024;

impl EmbeddedStore {
    pub fn new(retention: Duration) -> Self {
        Self {
            retention,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with_live<T>(&self, id: JobId, f: impl FnOnce(Option<&mut JobRecord>) -> T) -> T {
        let mut inner = self.inner.lock().expect("store lock");
        let now = Instant::now();
        if inner.records.get(&id).is_some_and(|(_, exp)| *exp <= now) {
            inner.records.remove(&id);
        }
        f(inner.records.get_mut(&id).map(|(r, _)| r))
    }

    fn note_write(&self, inner: &mut Inner) {
        inner.writes_since_sweep += 1;
        if inner.writes_since_sweep >= SWEEP_EVERY {
            inner.writes_since_sweep = 0;
            let now = Instant::now();
            inner.records.retain(|_, (_, exp)| *exp > now);
        }
    }

    fn transition(&self, id: JobId, apply: impl FnOnce(&mut JobRecord)) -> Transition {
        let t = self.with_live(id, |r| match r {
            None => Transition::Missing,
            Some(r) if r.status.is_terminal() => Transition::AlreadyTerminal(r.status),
            Some(r) => {
                apply(r);
                Transition::Applied
            }
        });
        let mut inner = self.inner.lock().expect("store lock");
        self.note_write(&mut inner);
        t
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create(&self, record: &JobRecord) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("store lock");
        let now = Instant::now();
        if inner
            .records
            .get(&record.id)
            .is_some_and(|(_, exp)| *exp > now)
        {
            return Err(StoreError::Conflict(record.id));
        }
        inner
            .records
            .insert(record.id, (record.clone(), now + self.retention));
        self.note_write(&mut inner);
        Ok(())
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.with_live(id, |r| {
            r.map(|r| {
                let mut r = r.clone();
                r.derive_metrics();
                r
            })
        }))
    }

    async fn start(&self, id: JobId, at: UnixMillis) -> Result<Transition, StoreError> {
        Ok(self.transition(id, |r| {
            r.status = JobStatus::Running;
            r.started_at = Some(at);
            r.attempts += 1;
        }))
    }

    async fn finish(
        &self,
        id: JobId,
        outcome: &Outcome,
        at: UnixMillis,
    ) -> Result<Transition, StoreError> {
        let retention = self.retention;
        let t = self.transition(id, |r| {
            r.status = outcome.status();
            r.completed_at = Some(at);
            match outcome {
                Outcome::Succeeded(out) => r.output = serde_json::from_str(out).ok(),
                Outcome::Failed(err) => r.error = Some(err.clone()),
            }
        });
        if t == Transition::Applied {
            let mut inner = self.inner.lock().expect("store lock");
            if let Some((_, exp)) = inner.records.get_mut(&id) {
                *exp = Instant::now() + retention;
            }
        }
        Ok(t)
    }

    async fn discard(&self, id: JobId) -> Result<(), StoreError> {
        self.inner.lock().expect("store lock").records.remove(&id);
        Ok(())
    }

    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}
