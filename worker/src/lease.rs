//! Long jobs, and jobs to queue again. A run still going after `lease_after` is taken over from
//! RabbitMQ ([`crate::job::Job::take_lease`]): its envelope goes into the store under a lease held
//! by this worker, its message is acknowledged (so the broker's consumer timeout cannot fire), and
//! a heartbeat renews the lease until the run ends. If the worker dies, the lease lapses and the
//! reaper — running in every worker — queues the job again, exactly once.
//!
//! The reaper also queues orphaned followers (their leader ended without an outcome) and the
//! strays the sweeper finds: live jobs that went quiet past `KILN_SWEEP_AFTER` with no live lease
//! (a lost lease, a Redis that lost its last writes, a gateway that died between recording and
//! publishing a job). A run that outlasts `lease_after` takes a lease, so `KILN_SWEEP_AFTER` must
//! stay above `KILN_LEASE_AFTER`, or long runs without a lease yet are queued a second time. Both are safe with any number of workers: the store
//! hands each job to one caller.
//!
//! A run is also where a job's `Cancel-After` (its finish-by time, [`Envelope::cancel_at`]) is
//! enforced: [`guarded`] cancels a job still running when that time comes, and the run stops as
//! it does for any cancel. The time travels with the job's message and its record, so it holds
//! whichever gateway accepted the job and whether or not that gateway still runs; a job that has
//! not started by then expires at its start-by deadline, which the gateway sets no later.

use std::future::Future;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::broker::Lane;
use kiln_common::store::{Stray, Transition};
use kiln_proto::{Envelope, JobId, now_millis};
use tokio_util::sync::CancellationToken;

use crate::events;
use crate::job::Job;

#[derive(Clone, Copy)]
pub struct LeasePolicy {
    pub after: Duration,
    pub ttl: Duration,
}

/// How many times the sweeper queues one job again before it ends it `job_lost`.
const MAX_SWEEPS: u32 = 5;
/// How often the sweeper looks; the store's index makes a look cheap.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Jobs looked at (and handed out) per round, at most.
const ROUND: usize = 100;

/// Awaits `work`; if it outlasts the policy, moves `jobs` onto leases and heartbeats them.
pub async fn guarded<T>(
    work: impl Future<Output = T>,
    jobs: &mut [Job],
    backend: &Backend,
    owner: &str,
    policy: LeasePolicy,
) -> T {
    tokio::pin!(work);
    let take_over = tokio::time::sleep(policy.after);
    tokio::pin!(take_over);
    let mut heartbeat: Option<tokio::time::Interval> = None;
    // Finish-by times of the jobs, latest first, so the next one due is at the end.
    let mut cancels: Vec<(i64, JobId)> =
        jobs.iter().filter_map(|j| j.envelope.cancel_at.map(|at| (at, j.id))).collect();
    cancels.sort_unstable_by(|a, b| b.cmp(a));
    loop {
        let next_cancel = cancels.last().map(|(at, _)| until(*at));
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep_until(next_cancel.unwrap_or_else(tokio::time::Instant::now)), if next_cancel.is_some() => {
                let mut again = Vec::new();
                while let Some((_, id)) = cancels.pop_if(|(at, _)| *at <= now_millis()) {
                    if !cancel_overdue(backend, id).await {
                        again.push((now_millis() + 1000, id));
                    }
                }
                // A store that could not be reached is asked again in a second.
                cancels.extend(again);
                cancels.sort_unstable_by(|a, b| b.cmp(a));
            }
            _ = &mut take_over, if heartbeat.is_none() => {
                for job in jobs.iter_mut() {
                    job.take_lease(&*backend.store, owner, policy.ttl).await;
                }
                let mut every = tokio::time::interval(policy.ttl / 3);
                every.tick().await;
                heartbeat = Some(every);
            }
            _ = async { heartbeat.as_mut().expect("guarded by the condition").tick().await }, if heartbeat.is_some() => {
                for job in jobs.iter_mut() {
                    job.renew_lease(&*backend.store, policy.ttl).await;
                }
            }
        }
    }
}

/// The instant of wall-clock time `at`.
fn until(at: i64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_millis()).max(0) as u64)
}

/// Cancels a job whose `Cancel-After` passed while it ran; its run then stops as for any cancel
/// (at its next progress write, or its result is dropped). False when the store could not say.
async fn cancel_overdue(backend: &Backend, id: JobId) -> bool {
    let (outcome, decided) = match backend.store.cancel(id).await {
        Ok(Transition::Applied) => ("canceled".to_owned(), true),
        Ok(other) => (format!("{other:?}"), true),
        Err(e) => (format!("store error: {e}"), false),
    };
    events::cancel_after_reached(id, &outcome);
    decided
}

/// Queues again the jobs the store hands out (lapsed leases, orphans, strays), and sweeps for
/// strays, until `shutdown`.
pub async fn reap(backend: Backend, policy: LeasePolicy, shutdown: CancellationToken) {
    let every = (policy.ttl / 3).clamp(Duration::from_millis(200), SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        sweep(&backend).await;
        let lapsed = match backend.store.reap(ROUND).await {
            Ok(l) => l,
            Err(e) => {
                events::reaper_failed(&e);
                continue;
            }
        };
        for l in lapsed {
            let published = match serde_json::from_str::<Envelope>(&l.envelope) {
                Ok(envelope) => backend
                    .broker
                    .publish(&Lane::of(&envelope), l.envelope.into_bytes())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("unreadable envelope: {e}")),
            };
            match published {
                Ok(()) => events::lease_reaped(l.id),
                Err(e) => {
                    events::reaper_failed(&format!("job {}: {e}", l.id));
                    // Back to the store, to be handed out again shortly.
                    let _ = backend.store.requeue_later(l.id, Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// One round of the sweeper: each quiet job is checked (atomically, in the store) and handed to
/// the reaper or ended.
async fn sweep(backend: &Backend) {
    let quiet = match backend.store.sweep(ROUND).await {
        Ok(q) => q,
        Err(e) => {
            events::reaper_failed(&e);
            return;
        }
    };
    for id in quiet {
        match backend.store.stray(id, MAX_SWEEPS).await {
            Ok(found @ (Stray::Requeued | Stray::Lost)) => events::stray(id, found),
            Ok(Stray::Fine | Stray::Gone) => {}
            Err(e) => events::reaper_failed(&e),
        }
    }
}
