//! Gateway and worker in one process over one backend: `kiln dev` on the embedded default, and the
//! whole system under test on port 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use kiln_common::Backend;
use kiln_common::models::ModelRepository;
use kiln_gateway::GatewayConfig;
use kiln_worker::{WorkerConfig, WorkerError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct SystemConfig {
    pub gateway: GatewayConfig,
    pub worker: WorkerConfig,
    pub backend: Backend,
    pub models: ModelRepository,
    pub cache_dir: PathBuf,
}

/// A running gateway + worker. Cancel [`Running::shutdown`] (or call [`Running::stop`]) to drain.
pub struct Running {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    gateway: JoinHandle<std::io::Result<()>>,
    worker: JoinHandle<Result<(), WorkerError>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Drains both roles and reports the first failure.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Waits for both roles to end (after a signal, or a worker failure).
    pub async fn join(self) -> anyhow::Result<()> {
        let worker = self.worker.await?;
        self.shutdown.cancel();
        let gateway = self.gateway.await?;
        worker?;
        gateway?;
        Ok(())
    }
}

/// Starts both roles on `listener`. The gateway answers at once; the worker begins consuming once
/// its models are loaded (jobs submitted before then wait in the queue).
pub fn start(config: SystemConfig, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let gateway = tokio::spawn(kiln_gateway::run(
        config.gateway,
        config.backend.clone(),
        config.models.clone(),
        listener,
        shutdown.clone(),
    ));
    let worker_shutdown = shutdown.clone();
    let worker = tokio::spawn(async move {
        let result =
            kiln_worker::run(config.worker, config.backend, config.models, config.cache_dir, worker_shutdown.clone())
                .await;
        if result.is_err() {
            // A worker that cannot load its models leaves nothing to serve jobs: stop the gateway too.
            worker_shutdown.cancel();
        }
        result
    });
    Ok(Running { addr, shutdown, gateway, worker })
}
