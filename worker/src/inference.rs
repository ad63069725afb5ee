//! Inference off the async runtime: each model's pipeline lives on a thread of its own, fed by a
//! bounded channel; every request carries its reply channel and its tracing span.

use kiln_common::models::{ExecutionProvider, ModelSpec};
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use crate::embedding::{EmbeddingPipeline, PipelineError};

struct Request {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, PipelineError>>,
    span: Span,
}

/// The async side of a model's inference thread. The thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct InferenceHandle {
    tx: mpsc::Sender<Request>,
    pub provider: ExecutionProvider,
}

impl InferenceHandle {
    /// Moves `pipeline` onto a new thread. `max_batch` splits large requests into model-sized runs.
    pub fn spawn(
        spec: &ModelSpec,
        mut pipeline: EmbeddingPipeline,
        provider: ExecutionProvider,
    ) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        let max_batch = spec.max_batch;
        std::thread::Builder::new().name(format!("infer-{}", spec.name)).spawn(move || {
            while let Some(req) = rx.blocking_recv() {
                let _enter = req.span.enter();
                let _ = req.reply.send(run_bucketed(&mut pipeline, req.texts, max_batch));
            }
        })?;
        Ok(Self { tx, provider })
    }

    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, PipelineError> {
        let (reply, rx) = oneshot::channel();
        let gone = || PipelineError::Inference("inference thread stopped".into());
        self.tx.send(Request { texts, reply, span: Span::current() }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Runs `texts` in model-sized chunks of similar length (so short texts are not padded to the
/// longest of the request), and returns the vectors in the original order.
fn run_bucketed(
    pipeline: &mut EmbeddingPipeline,
    texts: Vec<String>,
    max_batch: usize,
) -> Result<Vec<Vec<f32>>, PipelineError> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
    for chunk in order.chunks(max_batch) {
        let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
        for (&i, v) in chunk.iter().zip(pipeline.embed(&batch)?) {
            out[i] = v;
        }
    }
    Ok(out)
}
