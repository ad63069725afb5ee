//! The `short` mix's generator: varied, ordinary, templated English sentences (15–29 tokens), all
//! distinct, for benchmark inputs: no two jobs of a scenario share an input unless the scenario
//! is the cache.

const SUBJECTS: [&str; 16] = [
    "The old fisherman",
    "A young engineer",
    "My grandmother",
    "The city council",
    "A stray cat",
    "The night nurse",
    "Our history teacher",
    "A tired commuter",
    "The orchestra's first violinist",
    "A group of hikers",
    "The startup founder",
    "A retired judge",
    "The baker down the street",
    "A curious child",
    "The ship's captain",
    "An exhausted student",
];
const VERBS: [&str; 16] = [
    "carefully repaired",
    "quietly read",
    "argued about",
    "photographed",
    "forgot about",
    "celebrated",
    "painted",
    "sold",
    "discovered",
    "studied",
    "complained about",
    "wrote a letter about",
    "dreamed of",
    "measured",
    "cleaned",
    "laughed at",
];
const OBJECTS: [&str; 16] = [
    "the broken clock in the hallway",
    "a map of the northern harbour",
    "the winter vegetable garden",
    "an unfinished novel from the attic",
    "the new suspension bridge",
    "a bowl of steaming tomato soup",
    "the results of the local election",
    "a rare beetle found near the river",
    "the stars above the desert",
    "an old violin with a cracked neck",
    "the price of fresh bread",
    "a strange noise from the basement",
    "the rules of an ancient board game",
    "the train timetable for Sunday",
    "a pile of unanswered emails",
    "the colour of the autumn leaves",
];
const TAILS: [&str; 8] = [
    "before sunrise.",
    "during the long storm.",
    "while everyone else was asleep.",
    "for the third time this week.",
    "after a very strange phone call.",
    "without telling anyone.",
    "on a quiet Sunday afternoon.",
    "as the market closed.",
];

/// The `n`-th sentence; distinct for every `n` below 32768, varied in length.
pub fn sentence(n: usize) -> String {
    let s = SUBJECTS[n % 16];
    let v = VERBS[(n / 16) % 16];
    let o = OBJECTS[(n / 256) % 16];
    let t = TAILS[(n / 4096) % 8];
    if n.is_multiple_of(3) { format!("{s} {v} {o} {t}") } else { format!("{s} {v} {o}.") }
}

/// The `n`-th input of the `short` mix: a sentence made distinct for every `n` by its number.
pub fn numbered(n: usize) -> String {
    format!("{} ({n})", sentence(n % 32768))
}

/// Distinct sentences from `start`, so scenarios never repeat one another's inputs.
pub fn batch(start: usize, count: usize) -> Vec<String> {
    (start..start + count).map(numbered).collect()
}
