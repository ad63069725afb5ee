//! A job, start to end: decode and start it (skipping duplicates, expired and withdrawn jobs,
//! giving up on jobs started too often), validate its input, run it, then settle it — store the
//! result, retry with backoff, or dead-letter — through [`crate::job::Job`], which alone lets go
//! of its message.
//!
//! An embedding job runs on its own: its texts join the model's pool, which batches them with
//! every other job's by measured cost ([`crate::pool`]) and runs a batch's texts alone if it fails,
//! so one bad job cannot fail its batch-mates. Image and speech jobs come in batches of deliveries
//! and run one after the other; OCR and moderation jobs come in batches that run together.

use std::time::Duration;

use kiln_common::broker::{Delivery, Lane};
use kiln_common::store::{Creation, Outcome, Start, StoreError, Transition};
use kiln_proto::{
    AttemptRecord, DeadLetter, ENVELOPE_VERSION, EmbeddingInput, EmbeddingOutput, Envelope, ImageGenerationInput,
    InputError, ModerationInput, OcrInput, SpeechSegmentsInput, Task, TextToImageInput, now_millis,
};

use crate::ctx::Ctx;
use crate::errors::{Disposition, Failure, dispose};
use crate::events;
use crate::images::{self, Produced};
use crate::inference::ImageWork;
use crate::job::{self, Job, Settled};
use crate::lease::guarded;
use crate::media::{self, MediaWork};
use tracing::Instrument;

/// How long a worker keeps trying to start (or finish) a job while the store fails, before
/// handing its message back (each hand-back counts against the queue's delivery limit).
const STORE_PATIENCE: Duration = Duration::from_secs(20);

/// Runs one embedding job to the end.
///
/// Its texts go to the pool while the store starts the job, so the start's round trip overlaps
/// tokenisation and inference; a job the store says not to run (finished, canceled, expired) has
/// its texts withdrawn when their future is dropped.
pub async fn embed_one(ctx: &Ctx, delivery: Delivery) -> Settled {
    let started = std::time::Instant::now();
    let Some(received) = receive(ctx, delivery).await else { return Settled::Done };
    let span = received.span.clone();
    let tenant = received.envelope.tenant.clone();
    let tenant = tenant.as_deref();
    let mut ahead = EmbeddingInput::parse(&received.envelope.input, &ctx.spec.limits)
        .ok()
        .map(|input| Box::pin(ctx.infer.embed(input.texts, tenant).instrument(span.clone())));
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
        Admitted::Settled(settled) => return settled,
    };
    let texts = std::mem::take(&mut job.texts);
    let count = texts.len();
    let result = match (early, ahead) {
        (Some(result), _) => result,
        (None, Some(embed)) => {
            guarded(embed, std::slice::from_mut(&mut job), &ctx.backend, &ctx.owner, ctx.lease).await
        }
        (None, None) => {
            let run = ctx.infer.embed(texts, tenant).instrument(span.clone());
            guarded(run, std::slice::from_mut(&mut job), &ctx.backend, &ctx.owner, ctx.lease).await
        }
    };
    let result = result.map(|embedded| Produced::Output(success(embedded))).map_err(Failure::from);
    let trouble = settle(ctx, job, result).instrument(span).await;
    events::batch_done(&ctx.spec.name, 1, count, started.elapsed());
    trouble
}

/// Runs a batch of long jobs (images, speech) to the end, one after the other; handed back if any
/// was.
pub async fn one_by_one(ctx: &Ctx, batch: Vec<Delivery>) -> Settled {
    let started = std::time::Instant::now();
    let mut settled = Settled::Done;
    let mut jobs = Vec::with_capacity(batch.len());
    for delivery in batch {
        match admit(ctx, delivery).await {
            Admitted::Run(job) => jobs.push(*job),
            Admitted::Settled(s) => settled = settled.or(s),
        }
    }
    let count = jobs.len();
    for mut job in jobs {
        let (id, run_token, span) = (job.id, job.run, job.span.clone());
        let tenant = job.envelope.tenant.clone();
        let (images, media) = (job.images.take(), job.media.take());
        let mut one = [job];
        let result = match (images, media) {
            (Some(work), _) => {
                let run = images::run(ctx, id, run_token, work).instrument(span.clone());
                guarded(run, &mut one, &ctx.backend, &ctx.owner, ctx.lease).await
            }
            (None, Some(MediaWork::Speech(input))) => {
                let run = media::speech(ctx, id, run_token, tenant.as_deref(), &input).instrument(span.clone());
                guarded(run, &mut one, &ctx.backend, &ctx.owner, ctx.lease).await
            }
            _ => Err(Failure::Input(format!("not a job this {} model runs", ctx.spec.task.as_str()))),
        };
        let [job] = one;
        settled = settled.or(settle(ctx, job, result).instrument(span).await);
    }
    events::batch_done(&ctx.spec.name, count, 0, started.elapsed());
    settled
}

/// Runs a batch of OCR or moderation jobs together: each input is read and decoded on its own
/// (a bad one fails only its job), then one model request covers them all, so the model batches
/// their text lines (OCR) or images (moderation) across the jobs.
pub async fn together(ctx: &Ctx, batch: Vec<Delivery>) -> Settled {
    let started = std::time::Instant::now();
    let mut settled = Settled::Done;
    let mut jobs = Vec::with_capacity(batch.len());
    let mut works = Vec::with_capacity(batch.len());
    for delivery in batch {
        match admit(ctx, delivery).await {
            Admitted::Run(mut job) => match job.media.take() {
                Some(work @ (MediaWork::Ocr(_) | MediaWork::Moderation(_))) => {
                    works.push((job.envelope.tenant.clone(), work));
                    jobs.push(*job);
                }
                _ => {
                    let wrong = Failure::Input(format!("not a job this {} model runs", ctx.spec.task.as_str()));
                    settled = settled.or(settle(ctx, *job, Err(wrong)).await);
                }
            },
            Admitted::Settled(s) => settled = settled.or(s),
        }
    }
    if jobs.is_empty() {
        return settled;
    }
    let count = jobs.len();
    let items: Vec<media::Item<'_>> =
        works.iter().map(|(tenant, work)| media::Item { tenant: tenant.as_deref(), work }).collect();
    let results = guarded(media::analyse(ctx, &items), &mut jobs, &ctx.backend, &ctx.owner, ctx.lease).await;
    for (job, result) in jobs.into_iter().zip(results) {
        let span = job.span.clone();
        settled = settled.or(settle(ctx, job, result).instrument(span).await);
    }
    events::batch_done(&ctx.spec.name, count, 0, started.elapsed());
    settled
}

enum Admitted {
    Run(Box<Job>),
    /// Not run: skipped, failed at once, or handed back.
    Settled(Settled),
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
            job::reject(delivery).await;
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
        None => Admitted::Settled(Settled::Done),
    }
}

/// Starts the job in the store (or skips it), then reads its input. A store that fails is tried
/// again for a while with the message held, then the message is handed back.
async fn start_job(ctx: &Ctx, received: Received) -> Admitted {
    let Received { envelope, delivery, span } = received;
    let id = envelope.id;
    let start = patiently(
        || start_or_rebuild(ctx, &envelope, &delivery.body).instrument(span.clone()),
        |e| events::start_failed(id, e),
    )
    .await;
    let attempt = match start {
        Ok(Start::Started { attempt }) => attempt,
        Ok(skip @ (Start::Expired | Start::AlreadyTerminal(_) | Start::Withdrawn | Start::Missing | Start::Held)) => {
            events::skipped(id, &skip);
            let outcome = if skip == Start::Expired { "expired" } else { "skipped" };
            events::job_outcome(&ctx.spec, outcome, None);
            job::skip(delivery).await;
            return Admitted::Settled(Settled::Done);
        }
        Err(e) => {
            events::handed_back(id, &e);
            job::not_started(delivery).await;
            return Admitted::Settled(Settled::HandedBack);
        }
    };
    span.record("attempt", attempt);
    if attempt == 1 {
        events::queue_wait(&ctx.spec, envelope.created_at);
    }
    let mut job = Job::new(envelope, delivery, attempt, span);
    events::in_flight(&ctx.spec, 1.0);
    if attempt > ctx.retry.max_attempts {
        return Admitted::Settled(settle(ctx, job, Err(Failure::Abandoned { starts: attempt - 1 })).await);
    }
    match parse(ctx, &mut job) {
        Ok(()) => Admitted::Run(Box::new(job)),
        Err(e) => Admitted::Settled(settle(ctx, job, Err(Failure::Input(e.to_string()))).await),
    }
}

/// Starts the job; a job whose record is gone (expired, or lost by the store) is rebuilt from its
/// message — deadline, webhook and metadata included — and started all the same.
async fn start_or_rebuild(ctx: &Ctx, envelope: &Envelope, body: &[u8]) -> Result<Start, StoreError> {
    let store = &ctx.backend.store;
    let start = store.start(envelope.id, &ctx.owner).await?;
    if start != Start::Missing {
        return Ok(start);
    }
    let text = String::from_utf8_lossy(body);
    let how = Creation { envelope: Some(&text), idempotency_key: None };
    match store.insert(&envelope.record(), &how).await {
        Ok(()) | Err(StoreError::Conflict(_)) => {
            events::rebuilt(envelope.id);
            store.start(envelope.id, &ctx.owner).await
        }
        Err(e) => Err(e),
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
        Task::Ocr => job.media = Some(MediaWork::Ocr(OcrInput::parse(input)?)),
        Task::ImageModeration => job.media = Some(MediaWork::Moderation(ModerationInput::parse(input)?)),
        Task::SpeechSegments => job.media = Some(MediaWork::Speech(SpeechSegmentsInput::parse(input)?)),
    }
    Ok(())
}

fn success(embedded: crate::embedding::Embedded) -> String {
    let dim = embedded.vectors.first().map_or(0, Vec::len);
    let output = EmbeddingOutput { embeddings: embedded.vectors, dim, tokens: embedded.tokens };
    serde_json::to_string(&output).expect("embeddings serialise")
}

/// Settles one job: its outcome to the store, then its message (through [`Job`]).
async fn settle(ctx: &Ctx, mut job: Job, result: Result<Produced, Failure>) -> Settled {
    events::in_flight(&ctx.spec, -1.0);
    let id = job.id;
    let ok = result.is_ok();
    let outcome = match result {
        Ok(Produced::Output(output)) => Outcome::Succeeded(output),
        // Canceled (or superseded) while running: the record has its state; the message is done.
        Ok(Produced::Stopped) => {
            events::job_outcome(&ctx.spec, "canceled", Some(run_of(&job)));
            return job.done().await;
        }
        Err(failure) => match dispose(failure, id, job.run, &ctx.retry) {
            Disposition::Fail(error) => {
                events::job_failed(id, &error.message);
                Outcome::Failed(error)
            }
            Disposition::Retry { after, error } => {
                job.envelope.history.push(AttemptRecord { attempt: job.run, at: now_millis(), error });
                let body = serde_json::to_vec(&job.envelope).expect("envelopes serialise");
                // Publish the retry first: until it is confirmed, the job stays with this message
                // (or lease), so a failure here loses nothing.
                if let Err(e) = ctx.backend.broker.publish_delayed(&Lane::of(&job.envelope), body, after).await {
                    return job.hand_back(&e).await;
                }
                let _ = ctx.backend.store.retry(id, job.run, kiln_common::broker::delay_step(after)).await;
                events::retry_scheduled(&ctx.spec, id, job.run, after);
                return job.done().await;
            }
            Disposition::DeadLetter(error) => {
                let letter = DeadLetter {
                    v: ENVELOPE_VERSION,
                    envelope: job.envelope.clone(),
                    reason: error.clone(),
                    attempts: job.run,
                    dead_at: now_millis(),
                };
                let body = serde_json::to_vec(&letter).expect("dead letters serialise");
                if let Err(e) = ctx.backend.broker.dead_letter(body).await {
                    return job.hand_back(&e).await;
                }
                events::dead_lettered(&ctx.spec, id, &error.message);
                Outcome::Failed(error)
            }
        },
    };
    let finished = finish(ctx, &job, &outcome).await;
    charge(ctx, &job).await;
    match finished {
        Ok(Transition::Applied) => {
            events::run_completed(id, job.run, ok, true);
            events::job_outcome(&ctx.spec, if ok { "succeeded" } else { "failed" }, Some(run_of(&job)));
            if let (Outcome::Succeeded(output), Some(key)) = (&outcome, &job.envelope.cache_key)
                && let Err(e) = ctx.backend.cache.put(key, output).await
            {
                events::cache_unavailable(&e);
            }
            job.done().await
        }
        Ok(other) => {
            // Another run of this job completed first, or superseded this one: its result is
            // not this run's to write.
            events::run_completed(id, job.run, ok, false);
            events::duplicate_finish(id, &format!("{other:?}"));
            job.done().await
        }
        Err(e) => job.hand_back(&e).await,
    }
}

/// Stores the outcome; a store that fails is tried again for a while with the message held, since
/// handing the job back would throw its finished work away.
async fn finish(ctx: &Ctx, job: &Job, outcome: &Outcome) -> Result<Transition, StoreError> {
    patiently(|| ctx.backend.store.finish(job.id, job.run, outcome), |e| events::finish_failed(job.id, e)).await
}

/// Runs a store call until it answers or [`STORE_PATIENCE`] runs out, backing off between tries
/// and reporting each failure; the last error is returned.
async fn patiently<T, F: Future<Output = Result<T, StoreError>>>(
    mut call: impl FnMut() -> F,
    failed: impl Fn(&StoreError),
) -> Result<T, StoreError> {
    let patience = tokio::time::Instant::now() + STORE_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Err(e) if tokio::time::Instant::now() + pause < patience => {
                failed(&e);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Charges this run's time to its tenant's compute quota (best effort: a store that fails only
/// makes the quota lenient). Every run that got this far counts, stored or not: it used a worker.
async fn charge(ctx: &Ctx, job: &Job) {
    let Some(tenant) = &job.envelope.tenant else { return };
    let seconds = job.started.elapsed().as_secs_f64();
    if let Err(e) = ctx.backend.limiter.charge(tenant, seconds).await {
        events::charge_failed(job.id, &e);
    }
}

fn run_of(job: &Job) -> events::RunTiming {
    events::RunTiming { started: job.started, created_at: job.envelope.created_at }
}
