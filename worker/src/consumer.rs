//! A model's consume loop: take deliveries within the prefetch window, gather them into a batch
//! (up to `max_batch` jobs, waiting at most `batch_wait`), mark them running, run the batch, store
//! each result with the fenced terminal write, and acknowledge only after the store has it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln_common::Backend;
use kiln_common::broker::{Deliveries, Delivery};
use kiln_common::models::ModelSpec;
use kiln_common::store::{Outcome, Transition};
use kiln_proto::{
    EmbeddingInput, EmbeddingOutput, Envelope, ErrorCode, JobError, JobId, now_millis,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::WorkerConfig;
use crate::embedding::PipelineError;
use crate::events;
use crate::inference::InferenceHandle;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub async fn consume(
    spec: ModelSpec,
    infer: InferenceHandle,
    backend: Backend,
    config: Arc<WorkerConfig>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    while !shutdown.is_cancelled() {
        let deliveries = match backend.broker.consume(&spec.name, config.prefetch).await {
            Ok(d) => {
                events::consuming(&spec.name, config.prefetch);
                backoff = BACKOFF_MIN;
                d
            }
            Err(e) => {
                events::consumer_lost(&spec.name, &e);
                if pause(backoff, &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let why = serve(&spec, &infer, &backend, &config, &shutdown, deliveries).await;
        // Dropping the deliveries closed the consumer: whatever it held goes back to the queue.
        match why {
            Stop::Shutdown => return,
            Stop::Lost(e) => events::consumer_lost(&spec.name, &e),
        }
        if pause(backoff, &shutdown).await {
            return;
        }
    }
}

enum Stop {
    Shutdown,
    Lost(String),
}

async fn serve(
    spec: &ModelSpec,
    infer: &InferenceHandle,
    backend: &Backend,
    config: &WorkerConfig,
    shutdown: &CancellationToken,
    mut deliveries: Deliveries,
) -> Stop {
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Stop::Shutdown,
            next = deliveries.next() => next,
        };
        let first = match first {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Stop::Lost(e.to_string()),
            None => return Stop::Lost("delivery stream ended".into()),
        };
        let mut batch = vec![first];
        let mut broken = None;
        let deadline = tokio::time::Instant::now() + config.batch_wait;
        while batch.len() < spec.max_batch {
            match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(Some(Ok(d))) => batch.push(d),
                Ok(Some(Err(e))) => {
                    broken = Some(e.to_string());
                    break;
                }
                Ok(None) => {
                    broken = Some("delivery stream ended".into());
                    break;
                }
                Err(_) => break,
            }
        }
        let span = tracing::info_span!("batch", model = %spec.name, jobs = batch.len());
        let store_trouble = process(spec, infer, backend, batch).instrument(span).await;
        if let Some(e) = broken {
            return Stop::Lost(e);
        }
        if store_trouble && pause(BACKOFF_MIN, shutdown).await {
            return Stop::Shutdown;
        }
    }
}

/// Waits `d` unless shutdown comes first; returns whether it did.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

struct Job {
    id: JobId,
    delivery: Delivery,
    texts: usize,
}

/// Runs one batch to the end. Returns whether the store failed (the caller backs off).
async fn process(
    spec: &ModelSpec,
    infer: &InferenceHandle,
    backend: &Backend,
    batch: Vec<Delivery>,
) -> bool {
    let started = std::time::Instant::now();
    let store = &backend.store;
    let mut store_trouble = false;
    let mut jobs = Vec::with_capacity(batch.len());
    let mut texts = Vec::new();
    for delivery in batch {
        let envelope: Envelope = match serde_json::from_slice(&delivery.body) {
            Ok(e) => e,
            Err(e) => {
                events::undecodable(&spec.name, &e);
                let _ = delivery.reject().await;
                continue;
            }
        };
        let id = envelope.id;
        match store.start(id, now_millis()).await {
            Ok(Transition::Applied) => {}
            Ok(Transition::AlreadyTerminal(status)) => {
                // A redelivery of a job whose result is stored: acknowledge, never run it again.
                events::skipped(id, "already terminal", Some(status));
                let _ = delivery.ack().await;
                continue;
            }
            Ok(Transition::Missing) => {
                events::skipped(id, "no job record (withdrawn or expired)", None);
                let _ = delivery.ack().await;
                continue;
            }
            Err(e) => {
                events::handed_back(id, &e);
                store_trouble = true;
                let _ = delivery.requeue().await;
                continue;
            }
        }
        match EmbeddingInput::parse(&envelope.input, &spec.limits) {
            Ok(input) => {
                jobs.push(Job {
                    id,
                    delivery,
                    texts: input.texts.len(),
                });
                texts.extend(input.texts);
            }
            Err(e) => {
                let outcome = Outcome::Failed(JobError {
                    code: ErrorCode::InvalidInput,
                    message: e.to_string(),
                });
                store_trouble |= settle(
                    backend,
                    Job {
                        id,
                        delivery,
                        texts: 0,
                    },
                    outcome,
                )
                .await;
            }
        }
    }
    if jobs.is_empty() {
        return store_trouble;
    }
    let text_count = texts.len();
    let outcomes = match infer.embed(texts.clone()).await {
        Ok(vectors) => split(&jobs, vectors),
        Err(e) if jobs.len() == 1 => vec![failure(&e)],
        Err(_) => {
            // One bad job must not fail its batch-mates: run each on its own to find it.
            let mut outcomes = Vec::with_capacity(jobs.len());
            let mut offset = 0;
            for job in &jobs {
                let own = texts[offset..offset + job.texts].to_vec();
                offset += job.texts;
                outcomes.push(match infer.embed(own).await {
                    Ok(v) => success(v),
                    Err(e) => failure(&e),
                });
            }
            outcomes
        }
    };
    let settled = futures::future::join_all(
        jobs.into_iter()
            .zip(outcomes)
            .map(|(job, outcome)| settle(backend, job, outcome)),
    )
    .await;
    events::batch_done(&spec.name, settled.len(), text_count, started.elapsed());
    store_trouble || settled.into_iter().any(|t| t)
}

fn split(jobs: &[Job], vectors: Vec<Vec<f32>>) -> Vec<Outcome> {
    let mut it = vectors.into_iter();
    jobs.iter()
        .map(|j| success(it.by_ref().take(j.texts).collect()))
        .collect()
}

fn success(embeddings: Vec<Vec<f32>>) -> Outcome {
    let dim = embeddings.first().map_or(0, Vec::len);
    Outcome::Succeeded(
        serde_json::to_string(&EmbeddingOutput { embeddings, dim }).expect("embeddings serialise"),
    )
}

fn failure(e: &PipelineError) -> Outcome {
    let code = match e {
        PipelineError::Input(_) => ErrorCode::InvalidInput,
        PipelineError::Inference(_) => ErrorCode::InferenceFailed,
    };
    Outcome::Failed(JobError {
        code,
        message: e.to_string(),
    })
}

/// Stores the outcome, then acknowledges. If the store cannot take it, the job goes back to the
/// queue. Returns whether the store failed.
async fn settle(backend: &Backend, job: Job, outcome: Outcome) -> bool {
    if let Outcome::Failed(e) = &outcome {
        events::job_failed(job.id, &e.message);
    }
    match backend.store.finish(job.id, &outcome, now_millis()).await {
        Ok(Transition::Applied | Transition::AlreadyTerminal(_) | Transition::Missing) => {
            let _ = job.delivery.ack().await;
            false
        }
        Err(e) => {
            events::handed_back(job.id, &e);
            let _ = job.delivery.requeue().await;
            true
        }
    }
}
