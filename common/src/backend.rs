//! The pair of broker and store a process runs on: RabbitMQ + Redis, or the embedded default.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::broker::amqp::{AmqpBroker, AmqpConfig, Topology};
use crate::broker::embedded::EmbeddedBroker;
use crate::cache::{Cache, EmbeddedCache, RedisCache};
use crate::config::BackendArgs;
use crate::inputs::redis::RedisInputs;
use crate::inputs::{EmbeddedInputs, InputStore};
use crate::outputs::redis::RedisOutputs;
use crate::outputs::{EmbeddedOutputs, FsOutputs, OutputStore};
use crate::quota::{EmbeddedLimiter, Limiter, RedisLimiter};
use crate::store::embedded::{EmbeddedStore, StoreSettings};
use crate::store::redis::{RedisConfig, RedisStore};
use crate::store::{Store, StoreError};
use crate::tenancy::KeyStore;
use crate::tenancy::file::FileKeys;
use crate::tenancy::redis::RedisKeys;
use crate::tls::{ClientTls, TlsError};

/// Why the RabbitMQ + Redis backend could not be built (nothing has connected yet).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("KILN_TLS_CA: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Backend {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    pub cache: Arc<dyn Cache>,
    /// Binary job outputs.
    pub outputs: Arc<dyn OutputStore>,
    /// Binary job inputs (images, audio) and uploaded files' records.
    pub inputs: Arc<dyn InputStore>,
    /// API keys and tenants' limits.
    pub keys: Arc<dyn KeyStore>,
    /// Request rates and compute quotas.
    pub limiter: Arc<dyn Limiter>,
}

/// Entries the embedded cache holds at most.
const EMBEDDED_CACHE_ENTRIES: usize = 100_000;
/// Bytes of outputs the embedded store holds at most; the oldest go first.
const EMBEDDED_OUTPUT_BYTES: usize = 1 << 30;
/// Bytes of inputs, and uploaded files' records, the embedded store holds at most; the oldest go
/// first.
const EMBEDDED_INPUT_BYTES: usize = 1 << 30;
const EMBEDDED_FILES: usize = 100_000;

impl Backend {
    /// In-process broker, store and cache: `kiln dev`, no RabbitMQ or Redis.
    pub fn embedded(retention: Duration) -> Self {
        Self::embedded_with_cache(retention, Duration::from_secs(3600))
    }

    pub fn embedded_with_cache(retention: Duration, cache_ttl: Duration) -> Self {
        Self::embedded_store(EmbeddedStore::new(retention), retention, cache_ttl)
    }

    /// In-process broker, store and cache with these settings (retentions, sweeping, cache TTL).
    pub fn embedded_for(args: &BackendArgs) -> Self {
        let store = EmbeddedStore::with(StoreSettings {
            retention: args.job_retention,
            finished_retention: args.result_retention.unwrap_or(args.job_retention),
            sweep_after: args.sweep_after,
        });
        let mut backend = Self::embedded_store(store, args.job_retention, args.cache_ttl);
        backend.inputs = Arc::new(EmbeddedInputs::new(job_inputs_ttl(args), EMBEDDED_INPUT_BYTES, EMBEDDED_FILES));
        backend.keys = Arc::new(FileKeys::new(args.keys_file.clone()));
        backend
    }

    fn embedded_store(store: EmbeddedStore, retention: Duration, cache_ttl: Duration) -> Self {
        Self {
            broker: Arc::new(EmbeddedBroker::default()),
            store: Arc::new(store),
            cache: Arc::new(EmbeddedCache::new(cache_ttl, EMBEDDED_CACHE_ENTRIES)),
            outputs: Arc::new(EmbeddedOutputs::new(retention, EMBEDDED_OUTPUT_BYTES)),
            inputs: Arc::new(EmbeddedInputs::new(retention, EMBEDDED_INPUT_BYTES, EMBEDDED_FILES)),
            keys: Arc::new(FileKeys::new(None)),
            limiter: Arc::new(EmbeddedLimiter::default()),
        }
    }

    /// RabbitMQ and Redis. Nothing connects yet: a process starts while they are down and
    /// reports not-ready until they come up. The CA bundle (`KILN_TLS_CA`) is read here.
    pub fn external(args: &BackendArgs) -> Result<Self, BackendError> {
        let tls = ClientTls::load(args.tls_ca.as_deref())?;
        let broker = AmqpBroker::new(AmqpConfig {
            url: args.amqp_url.clone(),
            topology: Topology::new(&args.queue_prefix),
            connect_timeout: args.connect_timeout,
            confirm_timeout: args.io_timeout,
            retry_interval: Duration::from_millis(500),
            tls: tls.clone(),
        });
        let store = RedisStore::new(RedisConfig {
            url: args.redis_url.clone(),
            key_prefix: args.key_prefix.clone(),
            retention: args.job_retention,
            finished_retention: args.result_retention.unwrap_or(args.job_retention),
            sweep_after: args.sweep_after,
            connect_timeout: args.connect_timeout,
            response_timeout: args.io_timeout,
            tls: tls.clone(),
        })?;
        let cache_url = args.cache_redis_url.as_ref().unwrap_or(&args.redis_url);
        let cache = RedisCache::new(cache_url, &tls, &args.key_prefix, args.cache_ttl, args.io_timeout)?;
        let outputs: Arc<dyn OutputStore> = match &args.output_dir {
            Some(dir) => Arc::new(FsOutputs::new(dir.clone(), args.job_retention)),
            None => Arc::new(
                RedisOutputs::new(
                    args.outputs_redis_url.as_ref().unwrap_or(&args.redis_url),
                    &tls,
                    &args.key_prefix,
                    args.job_retention,
                    args.io_timeout,
                )
                .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            ),
        };
        // Inputs are blobs like outputs: in the outputs' Redis, on a connection of their own.
        let inputs = RedisInputs::new(
            args.outputs_redis_url.as_ref().unwrap_or(&args.redis_url),
            &tls,
            &args.key_prefix,
            job_inputs_ttl(args),
            args.io_timeout,
        )
        .map_err(StoreError::Unavailable)?;
        // Keys and limits live in the job store's Redis, over its connection.
        let conn = store.connection();
        Ok(Self {
            broker: Arc::new(broker),
            store: Arc::new(store),
            cache: Arc::new(cache),
            outputs,
            inputs: Arc::new(inputs),
            keys: Arc::new(RedisKeys::new(conn.clone(), &args.key_prefix)),
            limiter: Arc::new(RedisLimiter::new(conn, &args.key_prefix)),
        })
    }
}

/// How long a job's inputs are kept: as long as its record may be (a job queued, run, or rebuilt
/// from its envelope within that still finds its bytes).
fn job_inputs_ttl(args: &BackendArgs) -> Duration {
    args.job_retention.max(args.result_retention.unwrap_or(args.job_retention))
}
