//! A model's consume loop: (re)connect with backoff, take deliveries from the model's lanes in turn
//! ([`crate::lanes`]), within each lane's prefetch window, and hand them to [`crate::batch`]: each embedding job on its own as it arrives (the model's
//! pool batches their texts), image jobs gathered into batches (up to `max_batch` jobs, waiting
//! at most `batch_wait`). An idle tick checks that the consumer's channels are still open, so a
//! consumer that stopped silently is replaced, and reports progress to the health probes; a
//! faster one consumes the tenants' lanes that appeared since.

use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kiln_proto::Task;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ctx::Ctx;
use crate::events;
use crate::health::LoopState;
use crate::job::Settled;
use crate::lanes::{self, Lanes};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a consumer checks its channel, reports progress and announces itself.
const IDLE_TICK: Duration = Duration::from_secs(5);

pub async fn consume(ctx: Ctx, shutdown: CancellationToken) {
    let name = ctx.spec.name.clone();
    let mut backoff = BACKOFF_MIN;
    while !shutdown.is_cancelled() {
        ctx.health.set(&name, LoopState::Connecting);
        let prefetch = ctx.spec.prefetch.unwrap_or(ctx.config.prefetch);
        let deliveries = match Lanes::open(&ctx.backend, &name, prefetch).await {
            Ok(d) => {
                events::consuming(&name, prefetch);
                ctx.health.set(&name, LoopState::Consuming);
                announce(&ctx).await;
                backoff = BACKOFF_MIN;
                d
            }
            Err(e) => {
                events::consumer_lost(&name, &e);
                if pause(backoff, &shutdown).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        // Dropping the deliveries closes the consumer: whatever it held goes back to the queue.
        match serve(&ctx, &shutdown, deliveries).await {
            Stop::Shutdown => break,
            Stop::Lost(e) => events::consumer_lost(&name, &e),
        }
        if pause(backoff, &shutdown).await {
            break;
        }
    }
    ctx.health.set(&name, LoopState::Stopped);
}

enum Stop {
    Shutdown,
    Lost(String),
}

/// Work in flight at once. Embedding jobs: every delivery the prefetch window lets in, each
/// admitted, run and settled on its own, so the pool always sees every text waiting and never
/// waits on the store. Every other task runs one batch at a time (images and speech for seconds to
/// minutes, OCR and moderation batches together), so a job only shows `running` while it runs.
fn pipeline_depth(ctx: &Ctx) -> usize {
    if ctx.spec.task == Task::Embedding { usize::MAX } else { 1 }
}

async fn serve(ctx: &Ctx, shutdown: &CancellationToken, mut deliveries: Lanes) -> Stop {
    let mut tick = tokio::time::interval(IDLE_TICK);
    let mut discover = tokio::time::interval(lanes::DISCOVER_EVERY);
    discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = FuturesUnordered::new();
    // When the store fails, the loop takes no new delivery for BACKOFF_MIN — once per episode:
    // the many jobs in flight that fail together (a full prefetch window) back off together.
    let mut trouble = Backoff::default();
    let stop = loop {
        if trouble.due() && pause(BACKOFF_MIN, shutdown).await {
            break Stop::Shutdown;
        }
        while in_flight.len() >= pipeline_depth(ctx) {
            trouble.saw(in_flight.next().await.unwrap_or(Settled::Done));
            ctx.health.beat(&ctx.spec.name);
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Stop::Shutdown,
            Some(failed) = in_flight.next(), if !in_flight.is_empty() => {
                trouble.saw(failed);
                ctx.health.beat(&ctx.spec.name);
                continue;
            }
            _ = discover.tick() => {
                if let Err(e) = deliveries.discover(&ctx.backend).await {
                    break Stop::Lost(e.to_string());
                }
                continue;
            }
            _ = tick.tick() => {
                if !deliveries.is_alive() {
                    break Stop::Lost("a consumer's channel closed".into());
                }
                ctx.health.beat(&ctx.spec.name);
                announce(ctx).await;
                continue;
            }
            next = deliveries.next() => next,
        };
        let first = match first {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Stop::Lost(e.to_string()),
            None => break Stop::Lost("delivery stream ended".into()),
        };
        if ctx.spec.task == Task::Embedding {
            in_flight.push(crate::batch::embed_one(ctx, first).boxed());
            continue;
        }
        let mut batch = vec![first];
        let mut broken = None;
        let deadline = tokio::time::Instant::now() + ctx.config.batch_wait;
        while batch.len() < ctx.spec.max_batch {
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
        events::batch_gathered(&ctx.spec.name, batch.len());
        let span = tracing::info_span!("batch", model = %ctx.spec.name, jobs = batch.len());
        let run = match ctx.spec.task {
            Task::Ocr | Task::ImageModeration => crate::batch::together(ctx, batch).boxed(),
            Task::Embedding | Task::ImageGeneration | Task::TextToImage | Task::SpeechSegments => {
                crate::batch::one_by_one(ctx, batch).boxed()
            }
        };
        in_flight.push(run.instrument(span).boxed());
        if let Some(e) = broken {
            break Stop::Lost(e);
        }
    };
    // Batches in hand finish before the consumer closes (which hands back the rest).
    while in_flight.next().await.is_some() {}
    stop
}

/// Store trouble reported by finished work, turned into at most one pause per `BACKOFF_MIN`.
#[derive(Default)]
struct Backoff {
    /// Trouble seen since the last pause.
    pending: bool,
    /// Trouble reported before this instant belongs to the pause already taken.
    quiet_until: Option<tokio::time::Instant>,
}

impl Backoff {
    fn saw(&mut self, settled: Settled) {
        let covered = self.quiet_until.is_some_and(|t| tokio::time::Instant::now() < t);
        self.pending |= settled == Settled::HandedBack && !covered;
    }

    /// Whether to pause now; a pause covers the trouble that comes in during it.
    fn due(&mut self) -> bool {
        if !std::mem::take(&mut self.pending) {
            return false;
        }
        self.quiet_until = Some(tokio::time::Instant::now() + BACKOFF_MIN);
        true
    }
}

/// Tells the store this worker serves the model, for `GET /v1/models`; best effort.
async fn announce(ctx: &Ctx) {
    let _ = ctx.backend.store.worker_seen(&ctx.spec.name, &ctx.owner).await;
}

/// Waits `d` unless shutdown comes first; returns whether it did.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
