//! Batch formation by measured cost: the per-model [`CostTable`] of milliseconds per batch shape
//! (texts × padded length), learned at start-up and kept current while serving, and [`plan`],
//! which picks the next batch from the texts waiting.
//!
//! Every text in a batch is padded to the batch's longest, and attention grows with the square of
//! that length, so a count of texts says little about what a batch costs. The planner groups texts
//! of one length bucket only, keeps each batch within a padded-token budget, and among all ways of
//! cutting the bucket into batches takes the one the table says finishes soonest. Batch 1 is always
//! one of the candidates, so by the table's own measurements batching never does worse than it.

/// The shape of one model run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Texts in the batch.
    pub batch: usize,
    /// Tokens per text after padding: the batch's longest.
    pub len: usize,
}

impl Shape {
    pub fn padded_tokens(self) -> usize {
        self.batch * self.len
    }
}

/// Length buckets for a model of `max_length` tokens: 8 wide up to 64, 16 up to 128, 32 up to 256,
/// 64 beyond. A batch never mixes buckets.
pub fn length_edges(max_length: usize) -> Vec<usize> {
    let mut edges = Vec::new();
    let mut edge = 0;
    while edge < max_length.max(1) {
        edge += match edge {
            0..64 => 8,
            64..128 => 16,
            128..256 => 32,
            _ => 64,
        };
        edges.push(edge.min(max_length.max(1)));
    }
    edges.dedup();
    edges
}

/// Batch-size cells of the table: exact up to 8, then two per doubling.
fn batch_edges(max_batch: usize) -> Vec<usize> {
    let mut edges: Vec<usize> = (1..=8.min(max_batch)).collect();
    let mut edge = 8;
    while edge < max_batch {
        let half = edge + edge / 2;
        edges.push(half.min(max_batch));
        edges.push((edge * 2).min(max_batch));
        edge *= 2;
    }
    edges.dedup();
    edges
}

/// The index of the first edge at or above `x` (the last cell for anything beyond).
fn cell_of(edges: &[usize], x: usize) -> usize {
    edges.partition_point(|&e| e < x).min(edges.len() - 1)
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    /// Milliseconds per padded token of the runs seen in this cell (an EWMA).
    per_token_ms: f64,
    runs: u32,
}

/// Measured cost of batch shapes for one model on this machine, with the sessions it runs on.
///
/// Cells are (length bucket × batch-size range); each keeps an exponentially weighted average of
/// milliseconds per padded token, so the newest runs count most and the table follows the
/// machine (other load, thermal limits). Shapes never run are estimated from a non-negative
/// least-squares fit `ms = c0 + c1·tokens + c2·batch·len²` over every run seen (fixed cost,
/// per-token work, attention), weighted for relative error.
#[derive(Debug, Clone)]
pub struct CostTable {
    len_edges: Vec<usize>,
    batch_edges: Vec<usize>,
    cells: Vec<Cell>,
    fit: Fit,
    alpha: f64,
}

impl CostTable {
    /// An empty table for a model taking up to `max_length` tokens, batches up to `max_batch`.
    pub fn new(max_length: usize, max_batch: usize) -> Self {
        let (len_edges, batch_edges) = (length_edges(max_length), batch_edges(max_batch.max(1)));
        let cells = vec![Cell::default(); len_edges.len() * batch_edges.len()];
        Self { len_edges, batch_edges, cells, fit: Fit::default(), alpha: 0.2 }
    }

    pub fn length_edges(&self) -> &[usize] {
        &self.len_edges
    }

    /// The length bucket of a text of `len` tokens.
    pub fn bucket(&self, len: usize) -> usize {
        cell_of(&self.len_edges, len)
    }

    fn cell(&self, shape: Shape) -> usize {
        self.bucket(shape.len) * self.batch_edges.len() + cell_of(&self.batch_edges, shape.batch)
    }

    /// Records a run of `shape` that took `ms`.
    pub fn observe(&mut self, shape: Shape, ms: f64) {
        if !(ms.is_finite() && ms > 0.0) || shape.batch == 0 || shape.len == 0 {
            return;
        }
        let per_token = ms / shape.padded_tokens() as f64;
        let alpha = self.alpha;
        let i = self.cell(shape);
        let cell = &mut self.cells[i];
        cell.per_token_ms =
            if cell.runs == 0 { per_token } else { alpha * per_token + (1.0 - alpha) * cell.per_token_ms };
        cell.runs = cell.runs.saturating_add(1);
        self.fit.add(shape, ms);
    }

    /// Estimated milliseconds for a run of `shape`.
    pub fn estimate(&self, shape: Shape) -> f64 {
        let cell = self.cells[self.cell(shape)];
        if cell.runs > 0 {
            return cell.per_token_ms * shape.padded_tokens() as f64;
        }
        self.fit.estimate(shape)
    }

    /// Runs seen for the cell of `shape`.
    pub fn runs(&self, shape: Shape) -> u32 {
        self.cells[self.cell(shape)].runs
    }
}

/// Running weighted least squares over the features (1, tokens, batch·len²), decayed so that the
/// fit follows the machine.
#[derive(Debug, Clone, Default)]
struct Fit {
    xtx: [[f64; 3]; 3],
    xty: [f64; 3],
    yty: f64,
    coef: Option<[f64; 3]>,
}

/// Weight of the past at each new observation of the fit.
const FIT_DECAY: f64 = 0.998;

impl Fit {
    fn features(shape: Shape) -> [f64; 3] {
        let (b, l) = (shape.batch as f64, shape.len as f64);
        [1.0, b * l, b * l * l]
    }

    fn add(&mut self, shape: Shape, ms: f64) {
        let x = Self::features(shape);
        // Relative error: a 1 ms miss on a 2 ms run matters as much as 100 ms on 200 ms.
        let w = 1.0 / (ms * ms);
        for i in 0..3 {
            for j in 0..3 {
                self.xtx[i][j] = FIT_DECAY * self.xtx[i][j] + w * x[i] * x[j];
            }
            self.xty[i] = FIT_DECAY * self.xty[i] + w * x[i] * ms;
        }
        self.yty = FIT_DECAY * self.yty + w * ms * ms;
        self.coef = self.solve();
    }

    /// Non-negative least squares over three features: the best of the feature subsets whose
    /// unconstrained solution has no negative coefficient.
    fn solve(&self) -> Option<[f64; 3]> {
        let mut best: Option<([f64; 3], f64)> = None;
        for mask in 1u8..8 {
            let idx: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
            let Some(sub) = solve_subset(&self.xtx, &self.xty, &idx) else { continue };
            if sub.iter().any(|&c| c < 0.0) {
                continue;
            }
            let mut coef = [0.0; 3];
            for (k, &i) in idx.iter().enumerate() {
                coef[i] = sub[k];
            }
            // Residual: yᵀy − 2 cᵀXᵀy + cᵀXᵀXc.
            let mut sse = self.yty;
            for i in 0..3 {
                sse -= 2.0 * coef[i] * self.xty[i];
                for j in 0..3 {
                    sse += coef[i] * self.xtx[i][j] * coef[j];
                }
            }
            if best.as_ref().is_none_or(|(_, s)| sse < *s - 1e-12) {
                best = Some((coef, sse));
            }
        }
        best.map(|(c, _)| c)
    }

    fn estimate(&self, shape: Shape) -> f64 {
        let x = Self::features(shape);
        match self.coef {
            Some(c) => c[0] + c[1] * x[1] + c[2] * x[2],
            // Nothing seen yet: a guess that only orders shapes by their padded size.
            None => 0.05 + 0.01 * x[1],
        }
    }
}

/// Solves the normal equations restricted to the features `idx` (Gaussian elimination with
/// partial pivoting); `None` when they are singular.
fn solve_subset(xtx: &[[f64; 3]; 3], xty: &[f64; 3], idx: &[usize]) -> Option<Vec<f64>> {
    let n = idx.len();
    let mut a: Vec<Vec<f64>> = idx.iter().map(|&i| idx.iter().map(|&j| xtx[i][j]).chain([xty[i]]).collect()).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        let scale = a.iter().map(|row| row[col].abs()).fold(0.0, f64::max);
        if a[pivot][col].abs() <= 1e-12 * scale.max(f64::MIN_POSITIVE) {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                row.iter_mut().zip(&pivot_row).skip(col).for_each(|(x, p)| *x -= f * p);
            }
        }
    }
    let out: Vec<f64> = (0..n).map(|i| a[i][n] / a[i][i]).collect();
    out.iter().all(|c| c.is_finite()).then_some(out)
}

/// How much cheaper (as a fraction) a batch of several texts must be estimated than its texts
/// run alone, for the planner to form it.
pub const BATCH_MARGIN: f64 = 0.05;

/// Bounds on one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Texts per batch at most.
    pub max_batch: usize,
    /// Padded tokens (texts × longest) per batch at most; a single text longer than this still
    /// runs alone.
    pub max_batch_tokens: usize,
}

impl Limits {
    fn allows(&self, shape: Shape) -> bool {
        shape.batch == 1 || (shape.batch <= self.max_batch && shape.padded_tokens() <= self.max_batch_tokens)
    }
}

/// Chooses the next batch from the texts waiting, given their token lengths in arrival order
/// (`lens[0]` has waited longest). Returns the indices into `lens` of the texts to run together,
/// never empty when `lens` is not.
///
/// The batch is the one holding the longest-waiting text in the cheapest cut of its length bucket
/// into batches: within a bucket, texts sorted by length are cut into consecutive runs so that the
/// estimated time of all the runs is least, within `limits`. Other buckets wait for their turn.
///
/// A batch of several texts must be estimated at least [`BATCH_MARGIN`] cheaper than running
/// them alone: estimates are averages of noisy runs, and where batching gains little (long texts
/// on a small CPU) a coin toss between the two would sometimes lose to batch 1.
pub fn plan(table: &CostTable, lens: &[usize], limits: Limits) -> Vec<usize> {
    let Some(&oldest_len) = lens.first() else { return Vec::new() };
    let bucket = table.bucket(oldest_len);
    // The oldest text's bucket, by length (then by arrival, so ties keep their order).
    let mut members: Vec<usize> = (0..lens.len()).filter(|&i| table.bucket(lens[i]) == bucket).collect();
    members.sort_by_key(|&i| (lens[i], i));
    let n = members.len();
    // best[k]: least estimated time of the first k members; cut[k]: where its last batch starts.
    let mut best = vec![f64::INFINITY; n + 1];
    let mut cut = vec![0usize; n + 1];
    best[0] = 0.0;
    for end in 1..=n {
        let len = lens[members[end - 1]];
        for start in (0..end).rev() {
            let shape = Shape { batch: end - start, len };
            if !limits.allows(shape) {
                break;
            }
            let penalty = if shape.batch > 1 { 1.0 + BATCH_MARGIN } else { 1.0 };
            let total = best[start] + table.estimate(shape) * penalty;
            if total < best[end] {
                (best[end], cut[end]) = (total, start);
            }
        }
    }
    let oldest_at = members.iter().position(|&i| i == 0).expect("the oldest text is in its own bucket");
    let mut end = n;
    loop {
        let start = cut[end];
        if start <= oldest_at {
            let mut batch: Vec<usize> = members[start..end].to_vec();
            batch.sort_unstable();
            return batch;
        }
        end = start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine where a run costs a fixed 0.5 ms plus 0.01 ms per padded token plus attention.
    fn synthetic(shape: Shape) -> f64 {
        let (b, l) = (shape.batch as f64, shape.len as f64);
        0.5 + 0.01 * b * l + 0.000_05 * b * l * l
    }

    fn trained(cost: impl Fn(Shape) -> f64, max_length: usize, max_batch: usize) -> CostTable {
        let mut t = CostTable::new(max_length, max_batch);
        for &len in t.length_edges().to_vec().iter() {
            for batch in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64].into_iter().filter(|&b| b <= max_batch) {
                t.observe(Shape { batch, len }, cost(Shape { batch, len }));
            }
        }
        t
    }

    /// Cuts all of `lens` into batches the way the serving loop does: plan, remove, repeat.
    fn drain(table: &CostTable, lens: &[usize], limits: Limits) -> Vec<Vec<usize>> {
        let mut waiting: Vec<usize> = (0..lens.len()).collect();
        let mut batches = Vec::new();
        while !waiting.is_empty() {
            let view: Vec<usize> = waiting.iter().map(|&i| lens[i]).collect();
            let picked = plan(table, &view, limits);
            assert!(!picked.is_empty());
            batches.push(picked.iter().map(|&k| waiting[k]).collect::<Vec<_>>());
            let mut k = 0;
            waiting.retain(|_| {
                let keep = !picked.contains(&k);
                k += 1;
                keep
            });
        }
        batches
    }

    #[test]
    fn length_buckets_cover_the_model() {
        let e = length_edges(256);
        assert_eq!(&e[..9], &[8, 16, 24, 32, 40, 48, 56, 64, 80]);
        assert_eq!(*e.last().unwrap(), 256);
        assert_eq!(length_edges(100).last(), Some(&100));
        assert_eq!(batch_edges(64), vec![1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64]);
        assert_eq!(batch_edges(1), vec![1]);
    }

    #[test]
    fn batches_respect_the_token_budget_and_bucket_boundaries() {
        // A table where batching is cheap per text, so only the limits hold batches back.
        let table = trained(|s| 2.0 + 0.001 * s.padded_tokens() as f64, 256, 64);
        let limits = Limits { max_batch: 16, max_batch_tokens: 512 };
        let lens: Vec<usize> = (0..400).map(|i| 5 + (i * 37) % 250).collect();
        let batches = drain(&table, &lens, limits);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>(), "every text runs exactly once");
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() <= 16, "{} texts", b.len());
            assert!(b.len() == 1 || b.len() * longest <= 512, "{} × {longest} over the budget", b.len());
            let bucket = table.bucket(lens[b[0]]);
            assert!(b.iter().all(|&i| table.bucket(lens[i]) == bucket), "a batch mixes buckets: {b:?}");
        }
        // With cheap batching the planner does batch: far fewer runs than texts.
        assert!(batches.len() < lens.len() / 3, "{} batches", batches.len());
    }

    #[test]
    fn a_text_over_the_budget_still_runs_alone() {
        let table = trained(synthetic, 256, 8);
        let picked = plan(&table, &[250, 250], Limits { max_batch: 8, max_batch_tokens: 100 });
        assert_eq!(picked, vec![0]);
    }

    #[test]
    fn the_longest_waiting_text_is_always_in_the_next_batch() {
        let table = trained(synthetic, 256, 64);
        let lens = [90, 12, 13, 91, 14, 95, 12];
        let picked = plan(&table, &lens, Limits { max_batch: 64, max_batch_tokens: 16384 });
        assert!(picked.contains(&0), "{picked:?}");
        assert!(picked.iter().all(|&i| table.bucket(lens[i]) == table.bucket(90)), "{picked:?}");
    }

    #[test]
    fn batching_that_costs_more_than_batch_1_is_never_chosen() {
        // Per text, a batch of two costs more than two runs alone (cache-thrashing CPU).
        let table = trained(|s| 3.0 * s.padded_tokens() as f64 * (1.0 + 0.2 * (s.batch as f64 - 1.0)), 256, 64);
        let lens = vec![40; 32];
        let batches = drain(&table, &lens, Limits { max_batch: 64, max_batch_tokens: 16384 });
        assert!(batches.iter().all(|b| b.len() == 1), "{batches:?}");
    }

    #[test]
    fn a_batch_must_win_by_the_margin() {
        let measured = |gain: f64| {
            let mut t = CostTable::new(256, 8);
            for batch in 1..=8 {
                let s = Shape { batch, len: 40 };
                t.observe(s, 5.0 * batch as f64 * if batch > 1 { 1.0 - gain } else { 1.0 });
            }
            t
        };
        let limits = Limits { max_batch: 8, max_batch_tokens: 16384 };
        // Per text, batches are measured 3 % cheaper than runs alone: not enough.
        let batches = drain(&measured(0.03), &[40; 8], limits);
        assert!(batches.iter().all(|b| b.len() == 1), "{batches:?}");
        // 10 % cheaper is.
        let batches = drain(&measured(0.10), &[40; 8], limits);
        assert!(batches.iter().all(|b| b.len() > 1), "{batches:?}");
    }

    #[test]
    fn the_cheapest_cut_is_chosen() {
        // Fixed cost dominates: texts of one bucket go together up to the batch limit.
        let table = trained(|s| 10.0 + 0.001 * s.padded_tokens() as f64, 256, 4);
        let lens = vec![33, 34, 35, 36, 37, 38];
        let batches = drain(&table, &lens, Limits { max_batch: 4, max_batch_tokens: 16384 });
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 6);
        assert_eq!(batches.len(), 2, "{batches:?}");
    }

    #[test]
    fn the_cost_table_converges_on_a_synthetic_cost() {
        // Learn from noisy runs of random shapes, as serving would see them.
        let mut table = CostTable::new(256, 64);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let shape = Shape { batch: 1 + (next() % 64) as usize, len: 1 + (next() % 256) as usize };
            let noise = 0.9 + 0.2 * (next() % 1000) as f64 / 1000.0;
            table.observe(shape, synthetic(shape) * noise);
        }
        for batch in [1, 3, 8, 20, 64] {
            for len in [10, 40, 100, 250] {
                let shape = Shape { batch, len };
                let (est, truth) = (table.estimate(shape), synthetic(shape));
                assert!((est / truth - 1.0).abs() < 0.15, "{shape:?}: estimated {est:.3} ms, truth {truth:.3} ms");
            }
        }
    }

    #[test]
    fn the_fit_extrapolates_from_few_shapes() {
        // Calibration measures a few shapes; the rest come from the fit.
        let mut table = CostTable::new(256, 64);
        for (batch, len) in [(1, 16), (1, 64), (1, 256), (4, 32), (16, 64), (8, 128)] {
            let s = Shape { batch, len };
            table.observe(s, synthetic(s));
        }
        for (batch, len) in [(2, 40), (32, 96), (64, 24), (12, 200)] {
            let s = Shape { batch, len };
            assert_eq!(table.runs(s), 0);
            let (est, truth) = (table.estimate(s), synthetic(s));
            assert!((est / truth - 1.0).abs() < 0.02, "{s:?}: estimated {est:.3} ms, truth {truth:.3} ms");
        }
    }

    #[test]
    fn the_table_follows_a_slower_machine() {
        let mut table = trained(synthetic, 256, 64);
        let s = Shape { batch: 8, len: 40 };
        for _ in 0..40 {
            table.observe(s, 2.0 * synthetic(s));
        }
        assert!((table.estimate(s) / (2.0 * synthetic(s)) - 1.0).abs() < 0.01);
    }
}
