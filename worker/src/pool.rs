//! An embedding model's serving pool: its ONNX Runtime sessions, each on a thread of its own, the
//! queue of tokenised texts waiting for them, and the rule that decides which texts run together
//! on which session ([`crate::planner`]).
//!
//! Texts are tokenised by the caller, as they arrive and in parallel, so the queue knows every
//! text's length. Whenever a session is free, it plans a batch from the queue with its cost table
//! and runs it, then records the run's time in the table. On a CPU the pool may hold two kinds of
//! sessions: one *wide* session that uses every core, for a lone request (lowest latency), and
//! several *narrow* ones of fewer threads each, which together give the most throughput under
//! load. They never run at once: a wide run starts only when nothing else runs, and narrow runs
//! only while the wide one is idle, so the cores are never oversubscribed.
//!
//! The queue is kept in fair order among tenants ([`Fair`]), so the oldest text a batch is planned
//! around is the one whose tenant has had the least of the sessions' time lately, not simply the
//! one that came first: one tenant's burst of texts does not hold another tenant's text behind it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::Span;

use crate::embedding::{Embedded, Encoder, PipelineError, TextEncoder};
use crate::events;
use crate::planner::{self, CostTable, Limits, Shape};

/// Texts the planner looks at, from the longest-waiting, when it forms a batch.
const PLAN_WINDOW: usize = 2048;
/// Above this many characters a request is tokenised off the async runtime.
const INLINE_TOKENIZE_CHARS: usize = 4096;

/// Sessions of one kind, all with the same threads.
pub struct SessionClass {
    pub encoders: Vec<Encoder>,
    /// Intra-op threads of each session.
    pub threads: usize,
}

/// How a pool runs its sessions.
pub struct PoolSpec {
    pub model: kiln_proto::ModelName,
    /// Calibrated tables are shared by pools of the same key in one process (tests start many).
    pub calibration_key: String,
    pub limits: Limits,
    /// The sessions used under load (or the only ones).
    pub narrow: SessionClass,
    /// A session on every core for requests that come alone, when the machine has cores to spare.
    pub wide: Option<SessionClass>,
    /// Threads the narrow sessions may use at once (the cores), when a wide session exists.
    pub cores: usize,
}

struct Item {
    ids: Vec<u32>,
    /// Where it stands in the fair order ([`Fair::tag`]).
    tag: u64,
    reply: oneshot::Sender<Result<Vec<f32>, PipelineError>>,
    span: Span,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Narrow,
    Wide,
}

struct State {
    /// In fair order: by tag, then by arrival.
    items: VecDeque<Item>,
    fair: Fair,
    narrow: CostTable,
    wide: Option<CostTable>,
    busy_threads: usize,
    wide_busy: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    limits: Limits,
    cores: usize,
    model: kiln_proto::ModelName,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The async side of the pool; the session threads end when it is dropped.
pub struct EmbeddingPool {
    shared: Arc<Shared>,
    text: Arc<TextEncoder>,
}

impl Drop for EmbeddingPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

impl EmbeddingPool {
    /// Calibrates the sessions' cost tables (once per process and key) and starts their threads.
    pub fn start(spec: PoolSpec, text: TextEncoder) -> std::io::Result<Self> {
        let max_length = text.max_length();
        let mut narrow_classes = spec.narrow;
        let mut wide_class = spec.wide;
        let (narrow, wide) = calibrated(&spec.calibration_key, || {
            let narrow = calibrate(&mut narrow_classes.encoders, max_length, spec.limits, &[1, 4, 16]);
            let wide = wide_class.as_mut().map(|w| calibrate(&mut w.encoders, max_length, spec.limits, &[1, 2, 4]));
            (narrow, wide)
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                items: VecDeque::new(),
                fair: Fair::default(),
                narrow,
                wide,
                busy_threads: 0,
                wide_busy: false,
                closed: false,
            }),
            changed: Condvar::new(),
            limits: spec.limits,
            cores: spec.cores,
            model: spec.model.clone(),
        });
        let classes = [(Kind::Narrow, Some(narrow_classes)), (Kind::Wide, wide_class)];
        for (kind, class) in classes {
            let Some(class) = class else { continue };
            for (n, encoder) in class.encoders.into_iter().enumerate() {
                let shared = shared.clone();
                let name = format!("infer-{}-{}{n}", spec.model, if kind == Kind::Wide { "w" } else { "n" });
                let threads = class.threads;
                std::thread::Builder::new().name(name).spawn(move || serve(&shared, encoder, kind, threads))?;
            }
        }
        Ok(Self { shared, text: Arc::new(text) })
    }

    /// Embeds `texts` of `tenant` (none: the shared lane's jobs, one tenant together), each
    /// batched with whatever else is waiting; vectors (and token counts) in the order given.
    pub async fn embed(&self, texts: Vec<String>, tenant: Option<&str>) -> Result<Embedded, PipelineError> {
        let chars: usize = texts.iter().map(String::len).sum();
        let ids = if chars > INLINE_TOKENIZE_CHARS {
            let text = self.text.clone();
            tokio::task::spawn_blocking(move || tokenize(&text, &texts))
                .await
                .map_err(|e| PipelineError::Inference(format!("tokeniser task: {e}")))??
        } else {
            tokenize(&self.text, &texts)?
        };
        let tokens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let span = Span::current();
        let mut replies = Vec::with_capacity(ids.len());
        {
            let mut state = self.shared.lock();
            for ids in ids {
                let (reply, rx) = oneshot::channel();
                let tag = state.fair.tag(tenant.unwrap_or(""), ids.len());
                let at = state.items.partition_point(|i| i.tag <= tag);
                state.items.insert(at, Item { ids, tag, reply, span: span.clone() });
                replies.push(rx);
            }
        }
        self.shared.changed.notify_all();
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            out.push(rx.await.map_err(|_| PipelineError::Inference("inference threads stopped".into()))??);
        }
        Ok(Embedded { vectors: out, tokens })
    }
}

/// Start-time fair queueing of texts among tenants (Goyal, Vin and Cheng, 1996), with a text's
/// tokens as its cost. A text is tagged with its tenant's virtual start: the later of the pool's
/// virtual time and the end of the tenant's previous text (that text's start plus its tokens).
/// The queue runs in tag order. A tenant
/// that sends many texts tags them ever later, so another tenant's text, tagged at the virtual
/// time, goes ahead of most of them; a tenant alone (or the shared lane alone) keeps arrival
/// order, because its tags only grow. The virtual time is the smallest tag of the batch started
/// last (the text it was planned around), not its largest: a batch gathers texts by length from
/// far down the queue, and a newcomer must not be tagged behind the texts it skipped.
#[derive(Default)]
struct Fair {
    now: u64,
    /// Each tenant's virtual end, for tenants whose end is still ahead of `now` (the others
    /// start at `now`, as a tenant never seen does).
    ends: HashMap<String, u64>,
}

impl Fair {
    fn tag(&mut self, tenant: &str, tokens: usize) -> u64 {
        let cost = tokens.max(1) as u64;
        // The tenant's name is copied only when it has no end yet, not for every text.
        if let Some(end) = self.ends.get_mut(tenant) {
            let start = (*end).max(self.now);
            *end = start + cost;
            return start;
        }
        self.ends.insert(tenant.to_owned(), self.now + cost);
        self.now
    }

    /// A batch started around the text tagged `tag`.
    fn started(&mut self, tag: u64) {
        if tag > self.now {
            self.now = tag;
            let now = self.now;
            self.ends.retain(|_, end| *end > now);
        }
    }
}

fn tokenize(text: &TextEncoder, texts: &[String]) -> Result<Vec<Vec<u32>>, PipelineError> {
    texts.iter().map(|t| text.encode(t)).collect()
}

/// Which waiting texts a free session of `kind` should run now, if any.
fn choose(shared: &Shared, state: &State, kind: Kind, threads: usize) -> Option<Vec<usize>> {
    if state.items.is_empty() {
        return None;
    }
    let lens: Vec<usize> = state.items.iter().take(PLAN_WINDOW).map(|i| i.ids.len()).collect();
    let Some(wide) = &state.wide else {
        return Some(planner::plan(&state.narrow, &lens, shared.limits));
    };
    // A lone request (everything waiting fits one batch) on an idle machine goes to the wide
    // session; anything more to the narrow ones.
    let alone = || state.busy_threads == 0 && planner::plan(wide, &lens, shared.limits).len() == state.items.len();
    match kind {
        Kind::Wide => alone().then(|| (0..state.items.len()).collect()),
        Kind::Narrow => {
            if state.wide_busy || state.busy_threads + threads > shared.cores || alone() {
                return None;
            }
            Some(planner::plan(&state.narrow, &lens, shared.limits))
        }
    }
}

/// A session's thread: take a planned batch, run it, record its cost, answer its texts.
fn serve(shared: &Shared, mut encoder: Encoder, kind: Kind, threads: usize) {
    loop {
        let (batch, shape, estimate) = {
            let mut state = shared.lock();
            let picked = loop {
                if state.closed {
                    return;
                }
                // Texts of a job that stopped waiting (canceled by a lease's loss, or shutdown)
                // are not worth running.
                state.items.retain(|i| !i.reply.is_closed());
                if let Some(picked) = choose(shared, &state, kind, threads) {
                    break picked;
                }
                state = shared.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            };
            state.busy_threads += threads;
            state.wide_busy |= kind == Kind::Wide;
            let batch = take(&mut state.items, &picked);
            state.fair.started(batch.iter().map(|i| i.tag).min().unwrap_or(0));
            let shape = Shape { batch: batch.len(), len: batch.iter().map(|i| i.ids.len()).max().unwrap_or(1) };
            let estimate = table(&state, kind).estimate(shape);
            (batch, shape, estimate)
        };
        let span = tracing::info_span!(parent: &batch[0].span, "inference", model = %shared.model, texts = shape.batch, seq_len = shape.len);
        for item in &batch[1..] {
            span.follows_from(&item.span);
        }
        let started = Instant::now();
        let result = {
            let _enter = span.enter();
            let rows: Vec<&[u32]> = batch.iter().map(|i| i.ids.as_slice()).collect();
            encoder.run(&rows)
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        {
            let mut state = shared.lock();
            state.busy_threads -= threads;
            if kind == Kind::Wide {
                state.wide_busy = false;
            }
            if result.is_ok() {
                table_mut(&mut state, kind).observe(shape, ms);
            }
        }
        shared.changed.notify_all();
        let real_tokens: usize = batch.iter().map(|i| i.ids.len()).sum();
        events::batch_run(&shared.model, kind == Kind::Wide, shape, real_tokens, estimate, ms);
        match result {
            Ok(vectors) => {
                for (item, v) in batch.into_iter().zip(vectors) {
                    let _ = item.reply.send(Ok(v));
                }
            }
            // One text may have failed the batch: run each alone, so only it fails.
            Err(_) if batch.len() > 1 => {
                for item in batch {
                    let one = encoder
                        .run(&[item.ids.as_slice()])
                        .and_then(|mut v| v.pop().ok_or_else(|| PipelineError::Inference("no vector returned".into())));
                    let _ = item.reply.send(one);
                }
            }
            Err(e) => {
                for item in batch {
                    let _ = item.reply.send(Err(PipelineError::Inference(e.to_string())));
                }
            }
        }
    }
}

fn table(state: &State, kind: Kind) -> &CostTable {
    match (kind, &state.wide) {
        (Kind::Wide, Some(w)) => w,
        _ => &state.narrow,
    }
}

fn table_mut(state: &mut State, kind: Kind) -> &mut CostTable {
    match (kind, &mut state.wide) {
        (Kind::Wide, Some(w)) => w,
        _ => &mut state.narrow,
    }
}

/// Removes the items at `picked` (ascending indices) from the queue, keeping the others' order.
fn take(items: &mut VecDeque<Item>, picked: &[usize]) -> Vec<Item> {
    let mut taken = Vec::with_capacity(picked.len());
    let mut kept = VecDeque::with_capacity(items.len() - picked.len().min(items.len()));
    let mut next = picked.iter().peekable();
    for (i, item) in items.drain(..).enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            taken.push(item);
        } else {
            kept.push_back(item);
        }
    }
    *items = kept;
    taken
}

type Tables = (CostTable, Option<CostTable>);

/// The tables calibrated under `key` in this process, calibrating them with `make` the first time.
fn calibrated(key: &str, make: impl FnOnce() -> Tables) -> Tables {
    static DONE: OnceLock<Mutex<HashMap<String, Tables>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    if let Some(t) = done.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
        return t.clone();
    }
    let made = make();
    done.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), made.clone());
    made
}

/// Measures a spread of shapes on `encoders`, all running at once as they will under load (each
/// takes every n-th shape), and returns the table they fill. Each shape runs twice; the faster
/// run counts (the first run of a shape also pays for its allocations). Small and medium shapes
/// only, to keep start-up short: the fit extrapolates to the rest, and serving measures whatever
/// the planner then chooses.
fn calibrate(encoders: &mut [Encoder], max_length: usize, limits: Limits, batches: &[usize]) -> CostTable {
    let table = Mutex::new(CostTable::new(max_length, limits.max_batch));
    let mut lens: Vec<usize> = [16, 48, 128, 256].into_iter().filter(|&l| l <= max_length).collect();
    if lens.is_empty() {
        lens.push(max_length.max(1));
    }
    let mut shapes = Vec::new();
    for len in lens {
        for &batch in batches.iter().filter(|&&b| b <= limits.max_batch) {
            let shape = Shape { batch, len };
            if batch == 1 || (shape.padded_tokens() <= 1024 && shape.padded_tokens() <= limits.max_batch_tokens) {
                shapes.push(shape);
            }
        }
    }
    let started = Instant::now();
    let sessions = encoders.len();
    std::thread::scope(|scope| {
        for (k, encoder) in encoders.iter_mut().enumerate() {
            let (table, shapes) = (&table, &shapes);
            scope.spawn(move || {
                for &shape in shapes.iter().skip(k).step_by(sessions) {
                    let ids = vec![1000u32; shape.len];
                    let rows: Vec<&[u32]> = (0..shape.batch).map(|_| ids.as_slice()).collect();
                    let mut best = f64::INFINITY;
                    for _ in 0..2 {
                        let t = Instant::now();
                        if encoder.run(&rows).is_err() {
                            return;
                        }
                        best = best.min(t.elapsed().as_secs_f64() * 1e3);
                    }
                    table.lock().unwrap_or_else(|p| p.into_inner()).observe(shape, best);
                }
            });
        }
    });
    events::calibrated(encoders.len(), shapes.len(), started.elapsed());
    table.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kiln_common::models::{ExecutionProvider, ModelRepository, ModelSpec};

    use super::*;
    use crate::runtime::{self, Threads};

    fn item(len: usize) -> Item {
        let (reply, _rx) = oneshot::channel();
        Item { ids: vec![0; len], tag: 0, reply, span: Span::none() }
    }

    /// A text queued through [`Fair`] as [`EmbeddingPool::embed`] queues it.
    fn queue_fairly(fair: &mut Fair, q: &mut VecDeque<Item>, tenant: &str, len: usize) {
        let mut it = item(len);
        it.tag = fair.tag(tenant, len);
        let at = q.partition_point(|i| i.tag <= it.tag);
        q.insert(at, it);
    }

    /// Where texts of `len` tokens stand in the queue.
    fn places(q: &VecDeque<Item>, len: usize) -> Vec<usize> {
        q.iter().enumerate().filter(|(_, i)| i.ids.len() == len).map(|(at, _)| at).collect()
    }

    #[test]
    fn a_tenants_lone_text_goes_ahead_of_another_tenants_backlog() {
        // Tenant "a"'s texts are 12 tokens long, tenant "b"'s 7.
        let (mut fair, mut q) = (Fair::default(), VecDeque::new());
        for _ in 0..100 {
            queue_fairly(&mut fair, &mut q, "a", 12);
        }
        queue_fairly(&mut fair, &mut q, "b", 7);
        assert_eq!(places(&q, 7), vec![1], "behind a's first text only");

        // A batch starts from the front; "a" keeps sending, then "b" sends again.
        let batch = take(&mut q, &(0..16).collect::<Vec<_>>());
        fair.started(batch.iter().map(|i| i.tag).min().unwrap());
        for _ in 0..50 {
            queue_fairly(&mut fair, &mut q, "a", 12);
        }
        queue_fairly(&mut fair, &mut q, "b", 7);
        assert_eq!(places(&q, 7), vec![0], "ahead of a's backlog of {}", q.len() - 1);

        // Once the virtual time passes a tenant's end, it starts afresh, like a new tenant.
        fair.started(10_000);
        assert!(fair.ends.is_empty(), "{:?}", fair.ends);
    }

    #[test]
    fn texts_of_one_tenant_keep_their_arrival_order() {
        let (mut fair, mut q) = (Fair::default(), VecDeque::new());
        for len in [5, 1, 9, 3, 3, 7] {
            queue_fairly(&mut fair, &mut q, "", len);
        }
        assert_eq!(q.iter().map(|i| i.ids.len()).collect::<Vec<_>>(), vec![5, 1, 9, 3, 3, 7]);
    }

    #[test]
    fn take_keeps_the_order_of_what_stays() {
        let mut q: VecDeque<Item> = (1..=6).map(item).collect();
        let taken = take(&mut q, &[0, 2, 5]);
        assert_eq!(taken.iter().map(|i| i.ids.len()).collect::<Vec<_>>(), vec![1, 3, 6]);
        assert_eq!(q.iter().map(|i| i.ids.len()).collect::<Vec<_>>(), vec![2, 4, 5]);
    }

    /// The real all-MiniLM-L6-v2, fetched (and verified) into the cache folder when missing.
    fn minilm() -> (ModelSpec, PathBuf, PathBuf) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo = ModelRepository::load(&root.join("models")).expect("model repository");
        let spec = repo.get("all-minilm-l6-v2").expect("the embedding model").clone();
        let cache = kiln_common::config::default_cache_dir();
        if let Some(source) = &spec.source {
            kiln_common::assets::ensure(source, &spec.dir(&cache)).expect("model files");
        }
        let dylib = std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| kiln_common::assets::ensure_onnxruntime(&cache).expect("ONNX Runtime"));
        (spec, dylib, cache)
    }

    /// The three input mixes of the benchmark: short templated sentences, real sentences of
    /// 10–128 tokens, and real passages of 200–256 tokens; `n` texts spread over each file.
    fn mixes(n: usize) -> Vec<(&'static str, Vec<String>)> {
        let spread = |text: &str| {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            (0..n).map(|i| lines[i * lines.len() / n].to_owned()).collect::<Vec<_>>()
        };
        let short = (0..n)
            .map(|i| {
                let who = ["The old fisherman", "A young engineer", "My grandmother", "A stray cat"][i % 4];
                let what = ["repaired the clock", "read a letter", "painted the fence", "sold the boat"][(i / 4) % 4];
                format!("{who} {what} before sunrise ({i}).")
            })
            .collect();
        vec![
            ("short", short),
            ("realistic", spread(include_str!("../../load-tests/data/realistic.txt"))),
            ("long", spread(include_str!("../../load-tests/data/long.txt"))),
        ]
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn batched_vectors_equal_batch_1_vectors_on_every_mix_in_any_order() {
        let (spec, dylib, cache) = minilm();
        let env = runtime::environment(&dylib).expect("ONNX Runtime");
        let emb = spec.embedding.clone().expect("embedding section");
        let text = TextEncoder::new(&spec.file(&cache, "tokenizer").expect("tokenizer"), &emb).expect("tokenizer");
        let model = spec.file(&cache, "model").expect("model");
        let session = runtime::load_session(env, &model, &[ExecutionProvider::Cpu], Threads { intra: 2, spin: false })
            .expect("session");
        let mut encoder = Encoder::new(session.session, emb, text.pad_id()).expect("encoder");
        for (mix, texts) in mixes(24) {
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| text.encode(t).expect("tokenise")).collect();
            let alone: Vec<Vec<f32>> =
                ids.iter().map(|i| encoder.run(&[i.as_slice()]).expect("batch 1").remove(0)).collect();
            let n = ids.len();
            // Arrival orders: as listed, reversed, and interleaved (short and long texts mixed, so
            // every batch pads most of its texts).
            let orders: [Vec<usize>; 3] =
                [(0..n).collect(), (0..n).rev().collect(), (0..n).map(|i| (i * 7) % n).collect()];
            for order in orders {
                for size in [3, 8, 24] {
                    for chunk in order.chunks(size) {
                        let rows: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
                        let batched = encoder.run(&rows).expect("batch");
                        for (&i, v) in chunk.iter().zip(&batched) {
                            let d = max_diff(v, &alone[i]);
                            assert!(d < 1e-4, "{mix}: text {i} in a batch of {size} differs by {d} from batch 1");
                        }
                    }
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_answers_each_text_with_its_own_vector_under_concurrency() {
        let (spec, dylib, cache) = minilm();
        let layout = crate::Layout { max_batch: Some(16), ..crate::Layout::default() };
        let (spec2, dylib2, cache2) = (spec.clone(), dylib.clone(), cache.clone());
        let (spec_tokens, cache_tokens) = (spec.clone(), cache.clone());
        let infer = tokio::task::spawn_blocking(move || crate::load_model_with(&spec2, &dylib2, &cache2, layout))
            .await
            .expect("load task")
            .expect("load the pool");
        let alone = tokio::task::spawn_blocking(move || {
            crate::load_model(&spec, &dylib, &cache, Threads { intra: 1, spin: false })
        })
        .await
        .expect("load task")
        .expect("load a single session");
        let emb = spec_tokens.embedding.clone().expect("embedding section");
        let tokenizer = TextEncoder::new(&spec_tokens.file(&cache_tokens, "tokenizer").expect("tokenizer"), &emb)
            .expect("tokenizer");
        for (mix, texts) in mixes(36) {
            let mut expected = Vec::new();
            for t in &texts {
                expected.push(alone.embed(vec![t.clone()], None).await.expect("batch 1").vectors.remove(0));
            }
            // Requests of one to three texts, all at once, in a scrambled order.
            let n = texts.len();
            let order: Vec<usize> = (0..n).map(|i| (i * 11) % n).collect();
            let requests: Vec<Vec<usize>> = order.chunks(3).flat_map(|c| [c[..1].to_vec(), c[1..].to_vec()]).collect();
            let answers = futures::future::join_all(requests.iter().map(|r| {
                let infer = infer.clone();
                let batch: Vec<String> = r.iter().map(|&i| texts[i].clone()).collect();
                async move { infer.embed(batch, None).await }
            }))
            .await;
            for (request, answer) in requests.iter().zip(answers) {
                let embedded = answer.expect("embedded");
                assert_eq!(embedded.vectors.len(), request.len());
                assert_eq!(embedded.tokens.len(), request.len());
                for ((&i, v), &tokens) in request.iter().zip(&embedded.vectors).zip(&embedded.tokens) {
                    let d = max_diff(v, &expected[i]);
                    assert!(d < 1e-4, "{mix}: text {i} came back {d} away from its batch-1 vector");
                    // Each text's count is its own, whatever it was batched with.
                    let want = tokenizer.encode(&texts[i]).expect("tokenise").len();
                    assert_eq!(tokens, want, "{mix}: text {i} reported {tokens} tokens, the tokenizer gives {want}");
                }
            }
        }
    }
}
