//! The pair of broker and store a process runs on: RabbitMQ + Redis, or the embedded default.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::broker::amqp::{AmqpBroker, AmqpConfig, Topology};
use crate::broker::embedded::EmbeddedBroker;
use crate::config::BackendArgs;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::{RedisConfig, RedisStore};
use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct Backend {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
}

impl Backend {
    /// In-process broker and store: `kiln dev`, no RabbitMQ or Redis.
    pub fn embedded(retention: Duration) -> Self {
        Self { broker: Arc::new(EmbeddedBroker::default()), store: Arc::new(EmbeddedStore::new(retention)) }
    }

    /// RabbitMQ and Redis. Nothing connects yet: a process starts while they are down and
    /// reports not-ready until they come up.
    pub fn external(args: &BackendArgs) -> Result<Self, StoreError> {
        let broker = AmqpBroker::new(AmqpConfig {
            url: args.amqp_url.clone(),
            topology: Topology::new(&args.queue_prefix),
            connect_timeout: args.connect_timeout,
            confirm_timeout: args.io_timeout,
            retry_interval: Duration::from_millis(500),
        });
        let store = RedisStore::new(RedisConfig {
            url: args.redis_url.clone(),
            key_prefix: args.key_prefix.clone(),
            retention: args.job_retention,
            connect_timeout: args.connect_timeout,
            response_timeout: args.io_timeout,
        })?;
        Ok(Self { broker: Arc::new(broker), store: Arc::new(store) })
    }
}
