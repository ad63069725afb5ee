//! A model's lanes ([`kiln_common::broker::Lane`]) consumed as one stream of deliveries: the shared
//! lane and every tenant's lane the store names ([`kiln_common::store::Store::lanes`]), looked for
//! again every [`DISCOVER_EVERY`] (a count, unless it changed), each consumed with the model's
//! prefetch.
//!
//! This is where tenants are scheduled fairly. Each lane is a queue of its own, so a tenant's
//! backlog waits in its lane and holds at most one prefetch window of this worker; the stream
//! takes from the lanes in turn (after a delivery from one lane, the lanes after it go first), so
//! another tenant's job is taken as soon as it is ready, not after the backlog. Embedding jobs
//! meet again in the model's pool, which orders their texts fairly too ([`crate::pool`]).

use std::collections::HashSet;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kiln_common::Backend;
use kiln_common::broker::{BrokerError, Deliveries, Delivery, Lane};
use kiln_proto::ModelName;

use crate::events;

/// How often a consumer asks the store for tenants' lanes it does not consume yet: the most a
/// tenant's first job waits for its lane to be found.
pub const DISCOVER_EVERY: Duration = Duration::from_millis(200);

pub struct Lanes {
    model: ModelName,
    prefetch: u16,
    open: Vec<(Lane, Deliveries)>,
    known: HashSet<Lane>,
    /// The lane polled first next time.
    next: usize,
}

impl Lanes {
    /// Consumes the model's shared lane and the tenants' lanes the store names now.
    pub async fn open(backend: &Backend, model: &ModelName, prefetch: u16) -> Result<Self, BrokerError> {
        let shared = Lane::shared(model.clone());
        let deliveries = backend.broker.consume(&shared, prefetch).await?;
        let mut lanes = Self {
            model: model.clone(),
            prefetch,
            open: vec![(shared.clone(), deliveries)],
            known: HashSet::from([shared]),
            next: 0,
        };
        lanes.discover(backend).await?;
        Ok(lanes)
    }

    /// Consumes the tenants' lanes the store names that are not consumed yet. A store that
    /// cannot answer now changes nothing (the next call asks again); a broker that cannot
    /// consume a lane is the consumer's loss.
    pub async fn discover(&mut self, backend: &Backend) -> Result<(), BrokerError> {
        // The shared lane is not the store's.
        let known = self.known.len() - 1;
        let tenants = match backend.store.lanes(&self.model, known).await {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(()),
            Err(e) => {
                events::lanes_unknown(&self.model, &e);
                return Ok(());
            }
        };
        for tenant in tenants {
            let lane = Lane::new(self.model.clone(), Some(tenant));
            if self.known.contains(&lane) {
                continue;
            }
            let deliveries = backend.broker.consume(&lane, self.prefetch).await?;
            events::lane_consumed(&lane, self.prefetch);
            self.known.insert(lane.clone());
            self.open.push((lane, deliveries));
        }
        Ok(())
    }

    /// Whether every lane's consumer channel is still open.
    pub fn is_alive(&self) -> bool {
        self.open.iter().all(|(_, d)| d.is_alive())
    }
}

impl Stream for Lanes {
    type Item = Result<Delivery, BrokerError>;

    /// The first lane with a delivery ready, from the one after the lane that gave the last. A
    /// lane whose stream ended ends this one: the consumer is replaced as a whole.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let n = self.open.len();
        for i in 0..n {
            let k = (self.next + i) % n;
            if let Poll::Ready(item) = self.open[k].1.poll_next_unpin(cx) {
                self.next = (k + 1) % n;
                return Poll::Ready(item);
            }
        }
        Poll::Pending
    }
}
