//! A job, start to end: decode and start it (skipping duplicates, expired and withdrawn jobs,
//! giving up on jobs started too often), validate its input, run it, then settle it — store the
//! result, retry with backoff, or dead-letter — and only then acknowledge its message.
//!
//! An embedding job runs on its own: its texts join the model's pool, which batches them with
//! every other job's by measured cost ([`crate::pool`]) and runs a batch's texts alone if it fails,
//! so one bad job cannot fail its batch-mates. Image jobs come in batches of deliveries and run
//! one after the other.

use kiln_common::broker::Delivery;
use kiln_common::store::{Outcome, Start, StoreError, Transition};
use kiln_proto::{
    AttemptRecord, DeadLetter, ENVELOPE_VERSION, EmbeddingInput, EmbeddingOutput, Envelope, ImageGenerationInput,
    InputError, JobId, JobRecord, Task, TextToImageInput, now_millis,
};

use crate::consumer::Ctx;
use crate::errors::{Disposition, Failure, dispose};
use crate::events;
use crate::images::{self, Produced};
use crate::inference::ImageWork;
use crate::lease::guarded;
use tracing::Instrument;

pub struct Job {
    pub id: JobId,
    pub envelope: Envelope,
    /// The message as received, kept for leases.
    pub body: Vec<u8>,
    /// The broker's message, until it is acknowledged (at the end, or when a lease takes over).
    pub delivery: Option<Delivery>,
    /// Held by a lease in the store instead of by the broker.
    pub leased: bool,
    pub attempt: u32,
    /// An embedding job's texts.
    pub texts: Vec<String>,
    /// An image job's work.
    pub images: Option<ImageWork>,
    /// This run of the job, a child of the span that published it (the HTTP request).
    pub span: tracing::Span,
    /// When this run started.
    pub started: std::time::Instant,
}

/// Runs one embedding job to the end. Returns whether the store failed (the caller backs off).
///
/// Its texts go to the pool while the store starts the job, so the start's round trip overlaps
/// tokenisation and inference; a job the store says not to run (finished, canceled, expired) has
/// its texts withdrawn when their future is dropped.
pub async fn embed_one(ctx: &Ctx, delivery: Delivery) -> bool {
    let started = std::time::Instant::now();
    let Some(received) = receive(ctx, delivery).await else { return false };
    let span = received.span.clone();
    let mut ahead = EmbeddingInput::parse(&received.envelope.input, &ctx.spec.limits)
        .ok()
        .map(|input| Box::pin(ctx.infer.embed(input.texts).instrument(span.clone())));
    let start = std::pin::pin!(start_job(ctx, received));
    let (admitted, early) = match ahead.as_mut() {
        None => (start.await, None),
        Some(embed) => match futures::future::select(start, embed.as_mut()).await {
            futures::future::Either::Left((admitted, _)) => (admitted, None),
            futures::future::Either::Right((result, start)) => (start.await, Some(result)),
        },
    };
    let mut job = match admitted {
        Admitted::Run(job) => *job,
        Admitted::Settled => return false,
        Admitted::StoreDown => return true,
    };
    let texts = std::mem::take(&mut job.texts);
    let count = texts.len();
    let result = match (early, ahead) {
        (Some(result), _) => result,
        (None, Some(embed)) => {
            guarded(embed, std::slice::from_mut(&mut job), &ctx.backend, &ctx.owner, ctx.lease).await
        }
        (None, None) => {
            let run = ctx.infer.embed(texts).instrument(span.clone());
            guarded(run, std::slice::from_mut(&mut job), &ctx.backend, &ctx.owner, ctx.lease).await
        }
    };
    let result = result.map(|vectors| Produced::Output(success(vectors))).map_err(Failure::from);
    let trouble = settle(ctx, job, result).instrument(span).await;
    events::batch_done(&ctx.spec.name, 1, count, started.elapsed());
    trouble
}

/// Runs a batch of image jobs to the end, one after the other. Returns whether the store failed
/// (the caller backs off).
pub async fn images(ctx: &Ctx, batch: Vec<Delivery>) -> bool {
    let started = std::time::Instant::now();
    let mut store_trouble = false;
    let mut jobs = Vec::with_capacity(batch.len());
    for delivery in batch {
        match admit(ctx, delivery).await {
            Admitted::Run(job) => jobs.push(*job),
            Admitted::Settled => {}
            Admitted::StoreDown => store_trouble = true,
        }
    }
    let count = jobs.len();
    for mut job in jobs {
        let Some(work) = job.images.take() else {
            store_trouble |= settle(ctx, job, Err(Failure::Input("not an image job".into()))).await;
            continue;
        };
        let (id, span) = (job.id, job.span.clone());
        let mut one = [job];
        let run = images::run(ctx, id, work).instrument(span.clone());
        let result = guarded(run, &mut one, &ctx.backend, &ctx.owner, ctx.lease).await;
        let [job] = one;
        store_trouble |= settle(ctx, job, result).instrument(span).await;
    }
    events::batch_done(&ctx.spec.name, count, 0, started.elapsed());
    store_trouble
}

enum Admitted {
    Run(Box<Job>),
    Settled,
    StoreDown,
}

/// A delivery whose envelope decoded, with the span of this run of its job.
struct Received {
    envelope: Envelope,
    delivery: Delivery,
    span: tracing::Span,
}

/// Decodes a delivery's envelope; an undecodable message is rejected (it can never run).
async fn receive(ctx: &Ctx, delivery: Delivery) -> Option<Received> {
    let envelope: Envelope = match serde_json::from_slice(&delivery.body) {
        Ok(e) => e,
        Err(e) => {
            events::undecodable(&ctx.spec.name, &e);
            let _ = delivery.reject().await;
            return None;
        }
    };
    let span =
        tracing::info_span!("job", job_id = %envelope.id, model = %envelope.model, attempt = tracing::field::Empty);
    kiln_common::telemetry::set_parent(&span, delivery.traceparent.as_deref());
    Some(Received { envelope, delivery, span })
}

async fn admit(ctx: &Ctx, delivery: Delivery) -> Admitted {
    match receive(ctx, delivery).await {
        Some(received) => start_job(ctx, received).await,
        None => Admitted::Settled,
    }
}

/// Starts the job in the store (or skips it), then reads its input.
async fn start_job(ctx: &Ctx, received: Received) -> Admitted {
    let store = &ctx.backend.store;
    let Received { envelope, delivery, span } = received;
    let id = envelope.id;
    let mut start = store.start(id, now_millis()).instrument(span.clone()).await;
    if let Ok(Start::Missing) = start {
        // Accepted, but its record is gone (expired, or lost by the store): run it all the same.
        let record = JobRecord::queued(id, envelope.model.clone(), envelope.created_at, None);
        match store.create(&record).await {
            Ok(()) | Err(StoreError::Conflict(_)) => start = store.start(id, now_millis()).await,
            Err(e) => start = Err(e),
        }
    }
    let attempt = match start {
        Ok(Start::Started { attempt }) => attempt,
        Ok(skip @ (Start::Expired | Start::AlreadyTerminal(_) | Start::Withdrawn | Start::Missing)) => {
            events::skipped(id, &skip);
            let outcome = if skip == Start::Expired { "expired" } else { "skipped" };
            events::job_outcome(&ctx.spec, outcome, None);
            let _ = delivery.ack().await;
            return Admitted::Settled;
        }
        Err(e) => {
            events::handed_back(id, &e);
            let _ = delivery.requeue().await;
            return Admitted::StoreDown;
        }
    };
    span.record("attempt", attempt);
    if attempt == 1 {
        events::queue_wait(&ctx.spec, envelope.created_at);
    }
    let body = delivery.body.clone();
    let mut job = Job {
        id,
        envelope,
        body,
        delivery: Some(delivery),
        leased: false,
        attempt,
        texts: Vec::new(),
        images: None,
        span,
        started: std::time::Instant::now(),
    };
    events::in_flight(&ctx.spec, 1.0);
    if attempt > ctx.retry.max_attempts {
        let trouble = settle(ctx, job, Err(Failure::Abandoned { starts: attempt - 1 })).await;
        return if trouble { Admitted::StoreDown } else { Admitted::Settled };
    }
    match parse(ctx, &mut job) {
        Ok(()) => Admitted::Run(Box::new(job)),
        Err(e) => {
            let trouble = settle(ctx, job, Err(Failure::Input(e.to_string()))).await;
            if trouble { Admitted::StoreDown } else { Admitted::Settled }
        }
    }
}

/// Reads the job's input for the model's task. The gateway already validated it; this trusts
/// nothing off the wire all the same.
fn parse(ctx: &Ctx, job: &mut Job) -> Result<(), InputError> {
    let (input, limits) = (&job.envelope.input, &ctx.spec.limits);
    // The gateway always fills in the seed; a message without one (hand-made) gets one fixed by
    // its id, so its retries still draw the same images.
    let id_seed = || {
        let id = job.id.to_string();
        id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
            & kiln_proto::MAX_SEED
    };
    match ctx.spec.task {
        Task::Embedding => job.texts = EmbeddingInput::parse(input, limits)?.texts,
        Task::ImageGeneration => {
            job.images = Some(ImageWork::Terrain(ImageGenerationInput::parse(input, limits, id_seed)?));
        }
        Task::TextToImage => {
            job.images = Some(ImageWork::TextToImage(TextToImageInput::parse(input, limits, id_seed)?));
        }
    }
    Ok(())
}

fn success(embeddings: Vec<Vec<f32>>) -> String {
    let dim = embeddings.first().map_or(0, Vec::len);
    serde_json::to_string(&EmbeddingOutput { embeddings, dim }).expect("embeddings serialise")
}

/// Settles one job and then its message. Returns whether the store or broker failed, in which
/// case the job is handed back (its message requeued, or its lease left to lapse).
async fn settle(ctx: &Ctx, mut job: Job, result: Result<Produced, Failure>) -> bool {
    events::in_flight(&ctx.spec, -1.0);
    let id = job.id;
    let ok = result.is_ok();
    let outcome = match result {
        Ok(Produced::Output(output)) => Outcome::Succeeded(output),
        // Canceled while running: the record is terminal already; the message is done with.
        Ok(Produced::Stopped) => {
            events::job_outcome(&ctx.spec, "canceled", Some(&job));
            return ack(job).await;
        }
        Err(failure) => match dispose(failure, id, job.attempt, &ctx.retry) {
            Disposition::Fail(error) => {
                events::job_failed(id, &error.message);
                Outcome::Failed(error)
            }
            Disposition::Retry { after, error } => {
                job.envelope.history.push(AttemptRecord { attempt: job.attempt, at: now_millis(), error });
                let body = serde_json::to_vec(&job.envelope).expect("envelopes serialise");
                // Publish the retry first: until it is confirmed, the job stays with this message
                // (or lease), so a failure here loses nothing.
                if let Err(e) = ctx.backend.broker.publish_delayed(&ctx.spec.name, body, after).await {
                    return hand_back(job, &e).await;
                }
                let _ = ctx.backend.store.retry(id).await;
                events::retry_scheduled(&ctx.spec, id, job.attempt, after);
                return ack(job).await;
            }
            Disposition::DeadLetter(error) => {
                let letter = DeadLetter {
                    v: ENVELOPE_VERSION,
                    envelope: job.envelope.clone(),
                    reason: error.clone(),
                    attempts: job.attempt,
                    dead_at: now_millis(),
                };
                let body = serde_json::to_vec(&letter).expect("dead letters serialise");
                if let Err(e) = ctx.backend.broker.dead_letter(body).await {
                    return hand_back(job, &e).await;
                }
                events::dead_lettered(&ctx.spec, id, &error.message);
                Outcome::Failed(error)
            }
        },
    };
    match ctx.backend.store.finish(id, &outcome, now_millis()).await {
        Ok(Transition::Applied) => {
            events::run_completed(id, job.attempt, ok, true);
            events::job_outcome(&ctx.spec, if ok { "succeeded" } else { "failed" }, Some(&job));
            if let (Outcome::Succeeded(output), Some(key)) = (&outcome, &job.envelope.cache_key)
                && let Err(e) = ctx.backend.cache.put(key, output).await
            {
                events::cache_unavailable(&e);
            }
            ack(job).await
        }
        Ok(other) => {
            // Another run of this job completed first; this one ran to completion all the same.
            events::run_completed(id, job.attempt, ok, false);
            events::duplicate_finish(id, &format!("{other:?}"));
            ack(job).await
        }
        Err(e) => hand_back(job, &e).await,
    }
}

async fn ack(job: Job) -> bool {
    if let Some(d) = job.delivery {
        let _ = d.ack().await;
    }
    false
}

async fn hand_back(job: Job, error: &(dyn std::fmt::Display + Sync)) -> bool {
    events::handed_back(job.id, error);
    if let Some(d) = job.delivery {
        let _ = d.requeue().await;
    }
    true
}
