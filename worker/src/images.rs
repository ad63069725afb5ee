//! Driving one image job: start it on the model's thread, store each image in the output store as
//! it arrives, record progress (`{step, total}`) in the job store — which also tells whether the
//! job was canceled or superseded meanwhile — and answer the thread go on or stop. A retried job
//! resumes at its first missing image: images are deterministic per seed, so those an earlier run
//! stored are kept. Each run stores its files under its own names (`r{attempt}-image-{i}.png`);
//! the finished record lists which run made each, so a late duplicate run can never overwrite a
//! file whose sha256 the record holds.

use std::time::{Duration, Instant};

use kiln_common::store::Run;
use kiln_proto::{ImageOutput, JobId, OutputFile, WithheldImage, stored_output_name};

use tracing::Instrument;

use crate::ctx::Ctx;
use crate::errors::Failure;
use crate::events;
use crate::inference::{ImageWork, Update};

/// How often a denoising step is written as progress at most; every image always is.
const STEP_PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// How an image job's run ended.
pub enum Produced {
    /// The output JSON listing the files.
    Output(String),
    /// Canceled (or otherwise finished) while running: its record is already terminal.
    Stopped,
}

fn file_name(index: u32) -> String {
    format!("image-{index}.png")
}

/// Runs `work` for job `id` to the end.
pub async fn run(ctx: &Ctx, id: JobId, run: Run, work: ImageWork) -> Result<Produced, Failure> {
    let (seed, count, steps, size) = work.shape();
    let outputs = &ctx.backend.outputs;
    let mut files = Vec::with_capacity(count as usize);
    // Images an earlier run already stored (the latest run that made each).
    'images: for index in 0..count {
        for attempt in (1..run).rev() {
            let stored = stored_output_name(&file_name(index), attempt);
            let meta = outputs.head(id, &stored).await.map_err(|e| Failure::Outputs(e.to_string()))?;
            if let Some(meta) = meta {
                files.push(output_file(id, index, attempt, work.image_seed(index), size, meta));
                continue 'images;
            }
        }
        break;
    }
    let first = files.len() as u32;
    if first == count {
        return finish(seed, files, Vec::new());
    }
    if first > 0 {
        events::images_resumed(id, first, count);
    }
    let inference = tracing::info_span!("inference", model = %ctx.spec.name, images = count - first);
    let token = run;
    let mut run = ctx.infer.images(work, first).instrument(inference).await?;
    let total = count * steps;
    let mut last_step_write = Instant::now();
    // The last progress step written: an image's own progress is skipped when its last
    // denoising step already said the same.
    let mut written = 0;
    let mut stopped = false;
    let mut withheld = Vec::new();
    loop {
        let Some(update) = run.updates.recv().await else {
            return Err(Failure::Inference("inference thread stopped".into()));
        };
        let image = match update {
            Update::Step { done, total } => {
                let due = done == total || last_step_write.elapsed() >= STEP_PROGRESS_EVERY;
                let go_on = !due || {
                    last_step_write = Instant::now();
                    written = done;
                    still_running(ctx, id, token, done, total).await
                };
                stopped |= !go_on;
                run.proceed(go_on);
                continue;
            }
            Update::Withheld { index, seed, moderation, threshold } => {
                events::image_withheld(id, index, moderation.nsfw, threshold);
                withheld.push(WithheldImage {
                    index,
                    seed,
                    moderation,
                    reason: format!("nsfw score {:.3} is over the moderation threshold {threshold}", moderation.nsfw),
                });
                index
            }
            Update::Segments(_) => return Err(Failure::Inference("an image job got speech segments".into())),
            Update::Image { index, seed, width, height, png, moderation } => {
                let stored = stored_output_name(&file_name(index), token);
                let meta = match outputs.put(id, &stored, "image/png", png.into()).await {
                    Ok(meta) => meta,
                    Err(e) => {
                        run.proceed(false);
                        drain(&mut run.updates).await;
                        return Err(Failure::Outputs(e.to_string()));
                    }
                };
                let mut file = output_file(id, index, token, seed, (width, height), meta);
                file.moderation = moderation;
                files.push(file);
                index
            }
            Update::Finished(Err(e)) => return Err(e.into()),
            Update::Finished(Ok(())) if stopped => {
                events::images_stopped(id, files.len() as u32, count);
                return Ok(Produced::Stopped);
            }
            Update::Finished(Ok(())) => return finish(seed, files, withheld),
        };
        // Image `image` is stored or withheld: its progress, unless its last step said the same.
        let step = (image + 1) * steps;
        let go_on = step == written || {
            written = step;
            still_running(ctx, id, token, step, total).await
        };
        stopped |= !go_on;
        run.proceed(go_on);
    }
}

fn output_file(
    id: JobId,
    index: u32,
    attempt: u32,
    seed: u64,
    (width, height): (u32, u32),
    meta: kiln_common::outputs::FileMeta,
) -> OutputFile {
    let name = file_name(index);
    OutputFile {
        url: format!("/v1/jobs/{id}/outputs/{name}"),
        name,
        content_type: meta.content_type,
        size: meta.size,
        sha256: meta.sha256,
        seed: Some(seed),
        width: Some(width),
        height: Some(height),
        attempt: Some(attempt),
        moderation: None,
    }
}

fn finish(seed: u64, files: Vec<OutputFile>, withheld: Vec<WithheldImage>) -> Result<Produced, Failure> {
    let output = ImageOutput { images: files, seed, withheld };
    Ok(Produced::Output(serde_json::to_string(&output).expect("image output serialises")))
}

/// Records progress; false when the job is no longer running (canceled, or finished elsewhere).
/// A store that cannot be reached does not stop the job: progress is informative.
pub(crate) async fn still_running(ctx: &Ctx, id: JobId, run: Run, step: u32, total: u32) -> bool {
    let progress = serde_json::json!({ "step": step, "total": total });
    match ctx.backend.store.progress(id, run, &progress).await {
        Ok(kiln_common::store::Transition::Applied) => true,
        Ok(other) => {
            events::progress_refused(id, &format!("{other:?}"));
            false
        }
        Err(e) => {
            events::progress_unavailable(id, &e);
            true
        }
    }
}

pub(crate) async fn drain(updates: &mut tokio::sync::mpsc::Receiver<Update>) {
    while let Some(u) = updates.recv().await {
        if matches!(u, Update::Finished(_)) {
            break;
        }
    }
}
