//! Long jobs. A batch still running after `lease_after` is taken over from RabbitMQ: each job's
//! envelope goes into the store under a lease held by this worker, its message is acknowledged (so
//! the broker's consumer timeout cannot fire), and a heartbeat renews the lease until the batch
//! ends. If the worker dies, the lease lapses and the reaper — running in every worker — queues
//! the job again, exactly once.

use std::future::Future;
use std::time::Duration;

use kiln_common::Backend;
use kiln_common::store::Transition;
use kiln_proto::{Envelope, now_millis};
use tokio_util::sync::CancellationToken;

use crate::batch::Job;
use crate::events;

#[derive(Clone, Copy)]
pub struct LeasePolicy {
    pub after: Duration,
    pub ttl: Duration,
}

fn until(ttl: Duration) -> i64 {
    now_millis() + ttl.as_millis() as i64
}

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
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = &mut take_over, if heartbeat.is_none() => {
                lease_all(jobs, backend, owner, policy.ttl).await;
                let mut every = tokio::time::interval(policy.ttl / 3);
                every.tick().await;
                heartbeat = Some(every);
            }
            _ = async { heartbeat.as_mut().expect("guarded by the condition").tick().await }, if heartbeat.is_some() => {
                renew_all(jobs, backend, owner, policy.ttl).await;
            }
        }
    }
}

async fn lease_all(jobs: &mut [Job], backend: &Backend, owner: &str, ttl: Duration) {
    for job in jobs.iter_mut().filter(|j| j.delivery.is_some()) {
        let envelope = String::from_utf8_lossy(&job.body).into_owned();
        match backend.store.lease(job.id, owner, until(ttl), &envelope).await {
            Ok(Transition::Applied) => {
                if let Some(d) = job.delivery.take() {
                    let _ = d.ack().await;
                }
                job.leased = true;
                events::leased(job.id);
            }
            Ok(other) => events::lease_refused(job.id, &format!("{other:?}")),
            // Keep the message: the job stays with the broker and may be redelivered if the
            // consumer timeout fires, which the fenced writes make harmless.
            Err(e) => events::lease_refused(job.id, &e),
        }
    }
}

async fn renew_all(jobs: &mut [Job], backend: &Backend, owner: &str, ttl: Duration) {
    for job in jobs.iter_mut().filter(|j| j.leased) {
        match backend.store.renew(job.id, owner, until(ttl)).await {
            Ok(Transition::Applied) => {}
            Ok(other) => {
                job.leased = false;
                events::lease_lost(job.id, &format!("{other:?}"));
            }
            Err(e) => events::lease_refused(job.id, &e),
        }
    }
}

/// Queues again the jobs whose leases lapsed, until `shutdown`.
pub async fn reap(backend: Backend, owner: String, policy: LeasePolicy, shutdown: CancellationToken) {
    let every = (policy.ttl / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let lapsed = match backend.store.reap(now_millis(), &owner, until(policy.ttl), 100).await {
            Ok(l) => l,
            Err(e) => {
                events::reaper_failed(&e);
                continue;
            }
        };
        for l in lapsed {
            let Ok(envelope) = serde_json::from_str::<Envelope>(&l.envelope) else {
                events::reaper_failed(&format!("job {}: unreadable envelope", l.id));
                continue;
            };
            // Publish first: if it fails, the claim lapses and a later round tries again.
            match backend.broker.publish(&envelope.model, l.envelope.into_bytes()).await {
                Ok(()) => {
                    let _ = backend.store.release(l.id, &owner).await;
                    events::lease_reaped(l.id);
                }
                Err(e) => events::reaper_failed(&e),
            }
        }
    }
}
