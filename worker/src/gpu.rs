//! GPU utilisation and memory per device as metrics, read through NVML every few seconds. NVML
//! is loaded at run time: on a machine without an NVIDIA driver there is simply no such series.

use std::time::Duration;

use nvml_wrapper::Nvml;
use tokio_util::sync::CancellationToken;

const EVERY: Duration = Duration::from_secs(5);

/// Reports until `stop`; returns at once where NVML cannot be loaded.
pub async fn report(stop: CancellationToken) {
    let nvml = match tokio::task::spawn_blocking(Nvml::init).await {
        Ok(Ok(nvml)) => nvml,
        Ok(Err(e)) => {
            tracing::debug!(target: "kiln::worker", error = %e, "no NVML here: no GPU metrics");
            return;
        }
        Err(_) => return,
    };
    let nvml = std::sync::Arc::new(nvml);
    let mut every = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let nvml = nvml.clone();
        let _ = tokio::task::spawn_blocking(move || sample(&nvml)).await;
    }
}

fn sample(nvml: &Nvml) {
    let Ok(count) = nvml.device_count() else { return };
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else { continue };
        let label = index.to_string();
        if let Ok(u) = device.utilization_rates() {
            metrics::gauge!("kiln_worker_gpu_utilization_ratio", "device" => label.clone())
                .set(f64::from(u.gpu) / 100.0);
        }
        if let Ok(m) = device.memory_info() {
            metrics::gauge!("kiln_worker_gpu_memory_used_bytes", "device" => label.clone()).set(m.used as f64);
            metrics::gauge!("kiln_worker_gpu_memory_total_bytes", "device" => label).set(m.total as f64);
        }
    }
}
