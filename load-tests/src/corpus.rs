//! Benchmark inputs by mix — `short` (generated, templated, 15–29 tokens), `realistic` and
//! `long` (real prose from `load-tests/data/`, embedded in the binary) — and the walk over them
//! that gives every job of a run its own text as far as the corpus allows.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sentences;

const REALISTIC: &str = include_str!("../data/realistic.txt");
const LONG: &str = include_str!("../data/long.txt");
/// The fixed seed of the corpus order, so runs are comparable.
const SEED: u64 = 0x6b69_6c6e_2026_1201;
/// Where the `short` mix's numbering starts: clear of the numbers the other scenarios use.
const SHORT_BASE: usize = 2_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// Generated sentences of 15–29 tokens (mean ~20), distinct through an `(n)` suffix.
    Short,
    /// Real English sentences and short passages, 10–128 tokens, long-tailed (mean ~40).
    Realistic,
    /// Real English passages of 200–256 tokens.
    Long,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::Realistic => "realistic",
            Self::Long => "long",
        }
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One walk over a mix's texts: the items in a fixed shuffled order, taken in turn, so an item
/// comes back only after every other one was used. The generated `short` mix never repeats.
pub struct Corpus {
    mix: Mix,
    items: Vec<&'static str>,
    cursor: AtomicUsize,
}

/// A point in a walk, to account for what a scenario took.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize);

/// What a scenario took from a corpus.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub texts: usize,
    /// The corpus size; `None` for a generated mix (never repeats).
    pub items: Option<usize>,
    /// Where the walk stood when the scenario ended (items taken so far in the run).
    pub to: usize,
}

impl Usage {
    /// Whether the scenario itself used an item twice (it needed more texts than the corpus has).
    pub fn reused_within(&self) -> bool {
        self.items.is_some_and(|n| self.texts > n)
    }

    /// A note for the report when texts were reused; `None` when every text was new to the run.
    pub fn note(&self) -> Option<String> {
        let n = self.items?;
        if self.reused_within() {
            Some(format!(
                "{} texts from a corpus of {n}: every item used once, then reused in the same order ({:.2} passes)",
                self.texts,
                self.texts as f64 / n as f64
            ))
        } else if self.to > n {
            Some(format!(
                "{} distinct texts; the run's walk over the corpus of {n} had wrapped, so some were used by an earlier scenario",
                self.texts
            ))
        } else {
            None
        }
    }
}

impl Corpus {
    pub fn new(mix: Mix) -> Self {
        let mut items: Vec<&'static str> = match mix {
            Mix::Short => Vec::new(),
            Mix::Realistic => lines(REALISTIC),
            Mix::Long => lines(LONG),
        };
        shuffle(&mut items, SEED);
        Self { mix, items, cursor: AtomicUsize::new(0) }
    }

    pub fn mix(&self) -> Mix {
        self.mix
    }

    /// How many distinct items there are; `None` for the generated mix.
    pub fn len(&self) -> Option<usize> {
        (!self.items.is_empty()).then_some(self.items.len())
    }

    /// The next text of the walk.
    pub fn next_text(&self) -> String {
        self.text(self.cursor.fetch_add(1, Ordering::Relaxed))
    }

    /// The next `count` texts of the walk.
    pub fn take(&self, count: usize) -> Vec<String> {
        let first = self.cursor.fetch_add(count, Ordering::Relaxed);
        (first..first + count).map(|n| self.text(n)).collect()
    }

    pub fn mark(&self) -> Mark {
        Mark(self.cursor.load(Ordering::Relaxed))
    }

    pub fn usage_since(&self, mark: Mark) -> Usage {
        let to = self.cursor.load(Ordering::Relaxed);
        Usage { texts: to - mark.0, items: self.len(), to }
    }

    fn text(&self, n: usize) -> String {
        match self.mix {
            Mix::Short => sentences::numbered(SHORT_BASE + n),
            Mix::Realistic | Mix::Long => self.items[n % self.items.len()].to_owned(),
        }
    }
}

fn lines(text: &'static str) -> Vec<&'static str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// Fisher–Yates with SplitMix64: a fixed, dependency-free order.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn corpora_are_distinct_non_empty_lines() {
        for (name, text, at_least) in [("realistic", REALISTIC, 2000), ("long", LONG, 300)] {
            let all: Vec<&str> = text.lines().collect();
            assert!(all.len() >= at_least, "{name}: {} lines", all.len());
            assert!(all.iter().all(|l| !l.trim().is_empty()), "{name}: empty line");
            assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len(), "{name}: repeated line");
        }
    }

    #[test]
    fn walk_uses_every_item_before_reusing_one() {
        let c = Corpus::new(Mix::Long);
        let n = c.len().expect("a corpus");
        let mark = c.mark();
        let first: HashSet<String> = c.take(n).into_iter().collect();
        assert_eq!(first.len(), n);
        let u = c.usage_since(mark);
        assert!(!u.reused_within() && u.note().is_none());
        let again = c.next_text();
        assert!(first.contains(&again));
        assert!(c.usage_since(mark).reused_within());
    }

    #[test]
    fn order_is_fixed_and_short_never_repeats() {
        assert_eq!(Corpus::new(Mix::Realistic).take(5), Corpus::new(Mix::Realistic).take(5));
        let s = Corpus::new(Mix::Short);
        let texts: HashSet<String> = s.take(40_000).into_iter().collect();
        assert_eq!(texts.len(), 40_000);
        assert!(s.len().is_none());
    }
}
