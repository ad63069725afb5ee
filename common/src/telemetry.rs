//! Process-wide telemetry from [`TelemetryArgs`]: the log subscriber, OpenTelemetry traces
//! exported over OTLP/HTTP when `KILN_OTLP_ENDPOINT` is set (nothing is built otherwise, so the
//! default costs nothing), the W3C trace context carried through AMQP headers and stored job
//! records (`traceparent`), and the Prometheus recorder behind every `/metrics`.

use std::collections::HashMap;
use std::sync::OnceLock;

use async_trait::async_trait;
use bytes::Bytes;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryArgs};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes the spans still buffered.
#[must_use = "dropping it stops trace export; call shutdown() before exiting"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter. Call it after the process drained.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Flushing is best effort: a collector that is down must not hold the exit.
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber (and, with an OTLP endpoint, the trace exporter) for the
/// process named `service` (overridden by `KILN_OTEL_SERVICE_NAME`). Must run inside the tokio
/// runtime when exporting. Later calls install nothing, which tests rely on.
pub fn init(args: &TelemetryArgs, service: &str) -> Telemetry {
    prometheus();
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info"));
    // Each layer filters for itself: quiet logs must not switch off the spans traces are made of.
    let fmt = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let provider = args.otlp_endpoint.as_ref().and_then(|endpoint| {
        let name = args.otel_service_name.clone().unwrap_or_else(|| service.to_owned());
        match tracer_provider(endpoint.expose(), &name, args.otel_sample_ratio) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{service}: trace export to {endpoint} is off: {e}");
                None
            }
        }
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer().with_tracer(p.tracer("kiln")).with_filter(EnvFilter::new("info,kiln=debug"))
    });
    let installed = tracing_subscriber::registry().with(fmt).with(otel).try_init().is_ok();
    if installed && provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Telemetry { provider: provider.filter(|_| installed) }
}

fn tracer_provider(endpoint: &str, service: &str, ratio: f64) -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| "not inside the tokio runtime".to_owned())?;
    let client =
        crate::tls::http_client().timeout(std::time::Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
    let endpoint = endpoint.trim_end_matches('/');
    let url = if endpoint.ends_with("/v1/traces") { endpoint.to_owned() } else { format!("{endpoint}/v1/traces") };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(TokioHttp { client, runtime })
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_sampler(sampler).with_resource(resource).build())
}

/// The OTLP exporter's HTTP client: our reqwest, run on the process's tokio runtime (the batch
/// exporter calls it from a thread of its own).
#[derive(Debug)]
struct TokioHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for TokioHttp {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let send = async move {
            let resp =
                client.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
            let (status, headers) = (resp.status(), resp.headers().clone());
            let body = resp.bytes().await?;
            let mut out = http::Response::new(body);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok::<_, HttpError>(out)
        };
        self.runtime.spawn(send).await?
    }
}

/// Whether this process exports traces (set once by [`init`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The W3C `traceparent` of the current span, when traces are exported; otherwise None at once,
/// so publishing pays nothing for tracing that is off.
pub fn current_traceparent() -> Option<String> {
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let cx = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span named by `traceparent` (no-op for None or garbage).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histogram buckets for durations, in seconds: 0.5 ms to 10 min.
const SECONDS: [f64; 17] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0];
/// Buckets for batch sizes.
const BATCH: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The process's Prometheus recorder, installed on first use: every `metrics::` call of the
/// gateway and worker lands in it, and `/metrics` renders it.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("batch_size".into()), &BATCH))
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder installed first (a test harness) leaves this handle rendering nothing.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
