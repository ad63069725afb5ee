//! What an operator sees: a `kiln dev --external` process (its own metrics recorder and trace
//! exporter) against the test RabbitMQ and Redis, exporting traces to an OTLP/HTTP receiver in
//! this test and serving `/metrics`. One job's trace must span the HTTP request, the worker's
//! inference and the webhook delivery; the metrics must count the jobs that ran.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use kiln_common::testing::{self, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::{Value, json};

use crate::harness::{MODEL, cache_dir, repo_dir};

const T: Duration = Duration::from_secs(120);

/// Spans received: (trace id hex, span name, attributes as strings).
type Spans = Arc<Mutex<Vec<(String, String, HashMap<String, String>)>>>;

async fn otlp_receiver() -> (std::net::SocketAddr, Spans) {
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut sink = sink.lock().unwrap();
                for span in req.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
                    let attrs = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = kv.value.as_ref().and_then(|v| v.value.as_ref()).map(|v| format!("{v:?}"));
                            (kv.key.clone(), v.unwrap_or_default())
                        })
                        .collect();
                    sink.push((hex::encode(&span.trace_id), span.name.clone(), attrs));
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans)
}

async fn hook_receiver() -> std::net::SocketAddr {
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { axum::http::StatusCode::OK }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The value of the series `name{labels...}` in a Prometheus text exposition (labels in any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        let wanted = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        (metric == name && wanted).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_request_inference_and_webhook_and_metrics_count_the_jobs() {
    let args = testing::backend_args(Duration::from_secs(3600));
    let (otlp, spans) = otlp_receiver().await;
    let hook = hook_receiver().await;
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["dev", "--external", "--port", &port.to_string()])
        .env("KILN_AMQP_URL", args.amqp_url.expose())
        .env("KILN_REDIS_URL", args.redis_url.expose())
        .env("KILN_QUEUE_PREFIX", &args.queue_prefix)
        .env("KILN_KEY_PREFIX", &args.key_prefix)
        .env("KILN_MODELS_DIR", repo_dir())
        .env("KILN_CACHE_DIR", cache_dir())
        .env("KILN_WORKER_MODELS", MODEL)
        .env("KILN_INTRA_THREADS", "1")
        .env("KILN_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("KILN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kiln dev");
    let http = kiln_common::tls::http_client().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let jobs = 5;
    let mut ids = Vec::new();
    for i in 0..jobs {
        let mut body = json!({ "model": MODEL, "input": { "text": format!("observed job {i}") }, "cache": false });
        if i == 0 {
            body["webhook"] = json!(format!("http://{hook}/hook"));
        }
        let resp = wait_until("kiln dev answers the submit", T, || async {
            let r = http.post(format!("{base}/v1/jobs")).header("prefer", "wait=60").json(&body).send().await;
            match r {
                Ok(r) if r.status() == 200 => Ok(r.json::<Value>().await.unwrap()),
                Ok(r) => Err(format!("{}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        assert_eq!(resp["status"], "succeeded", "{resp}");
        ids.push(resp["id"].as_str().unwrap().to_owned());
    }

    // Metrics: the jobs counted where they happened.
    let text = wait_until("metrics count every job", T, || async {
        let text = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        let done = sample(&text, "kiln_worker_jobs_total", &[("model", MODEL), ("outcome", "succeeded")]);
        let delivered = sample(&text, "kiln_gateway_webhook_deliveries_total", &[("outcome", "delivered")]);
        if done == Some(jobs as f64) && delivered == Some(1.0) { Ok(text) } else { Err((done, delivered)) }
    })
    .await;
    let n = jobs as f64;
    assert_eq!(sample(&text, "kiln_gateway_jobs_submitted_total", &[("model", MODEL)]), Some(n), "{text}");
    assert_eq!(
        sample(&text, "kiln_gateway_requests_total", &[("route", "/v1/jobs"), ("method", "POST"), ("status", "200")]),
        Some(n)
    );
    for (histogram, labels) in [
        ("kiln_gateway_submit_duration_seconds_count", vec![("model", MODEL)]),
        ("kiln_worker_end_to_end_seconds_count", vec![("model", MODEL), ("task", "embedding")]),
        ("kiln_worker_run_duration_seconds_count", vec![("model", MODEL)]),
        ("kiln_worker_queue_wait_seconds_count", vec![("model", MODEL)]),
    ] {
        assert_eq!(sample(&text, histogram, &labels), Some(n), "{histogram}: {text}");
    }
    let batches = sample(&text, "kiln_worker_batch_size_sum", &[("model", MODEL)]).expect("batch sizes");
    assert_eq!(batches, n, "every job was in one batch");
    assert_eq!(sample(&text, "kiln_worker_in_flight_jobs", &[("model", MODEL)]), Some(0.0));
    assert_eq!(sample(&text, "kiln_gateway_cache_lookups_total", &[("result", "hit")]), None, "cache was off");
    assert!(text.contains("kiln_gateway_request_duration_seconds_bucket"), "{text}");

    // Traces: the webhook job's delivery, its inference and its HTTP request share one trace id.
    let job = &ids[0];
    let seen = wait_until("the job's spans arrive", T, || async {
        let spans = spans.lock().unwrap().clone();
        let hook = spans.iter().find(|(_, name, a)| {
            name == "webhook.deliver" && a.get("job_id").is_some_and(|v| v.contains(job.as_str()))
        });
        let Some((trace, ..)) = hook else { return Err(format!("{} spans, no webhook span yet", spans.len())) };
        let names: Vec<String> = spans.iter().filter(|(t, ..)| t == trace).map(|(_, n, _)| n.clone()).collect();
        if ["http", "job", "inference", "webhook.deliver"].iter().all(|n| names.iter().any(|m| m == n)) {
            Ok(names)
        } else {
            Err(format!("trace {trace} has {names:?}"))
        }
    })
    .await;
    assert!(seen.len() >= 4, "{seen:?}");
    child.start_kill().unwrap();
}
