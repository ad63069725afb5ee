//! The history checker of the hard-fault scenarios. It records what the clients saw — every
//! submission with its input and idempotency key, every answer (status, id, error code, or no
//! answer at all when the connection broke), every record read back — and reads what the workers
//! ran from their `kiln::worker::runs` lines; then it checks Kiln's promises against both:
//!
//! - stuck: an accepted job (a 202, or a 200 with an id) not terminal within the bound, or an
//!   idempotent request that never got a definitive answer;
//! - lost: an accepted job that ended otherwise than it must (gone, failed, canceled; a job with a
//!   deadline may also end `expired`);
//! - duplicated: a result stored twice (`stored=true` twice in the runs), a result that changed
//!   between two reads far apart, an idempotency key that made two jobs;
//! - wrong: an embedding that differs from the reference embedding of the job's own text (computed
//!   here with the real model) by more than 1e-4, an image whose bytes do not hash to the sha256 of
//!   its record or whose seed is not the job's, a job that ran after its deadline, or a refused
//!   submission (503) that ran.
//!
//! A 503 carries no id, so refusals are matched to runs by input: a run whose job id no client was
//! given is identified by its stored output (embedding → text, image → seed), and every text that
//! can be refused is unique to its submission.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_common::testing::wait_until;
use kiln_proto::JobId;
use kiln_worker::InferenceHandle;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::harness::{ChildWorker, MODEL, cache_dir, repo_dir, runs_logged};

/// Largest difference allowed between an embedding and its reference, per component.
pub const TOLERANCE: f32 = 1e-4;

/// What a submission must come to.
#[derive(Debug, Clone)]
pub enum Expect {
    /// One embedding per text, each equal to the reference embedding of that text.
    Embedding(Vec<String>),
    /// `count` terrain images of seeds `seed`, `seed + 1`, …, each file matching its sha256.
    Images { seed: u64, count: usize },
}

/// One answer to one attempt at a submission.
#[derive(Debug, Clone)]
pub enum Answer {
    Http {
        status: u16,
        id: Option<JobId>,
        code: Option<String>,
        retry_after: Option<Duration>,
        at: Duration,
    },
    /// The connection broke or was refused: the client cannot know whether the job was accepted.
    NoAnswer {
        error: String,
        at: Duration,
    },
}

impl Answer {
    /// The job id of a 2xx answer.
    pub fn accepted(&self) -> Option<JobId> {
        match self {
            Self::Http { status: 200..=299, id, .. } => *id,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            Self::NoAnswer { .. } => None,
        }
    }

    fn at(&self) -> Duration {
        match self {
            Self::Http { at, .. } | Self::NoAnswer { at, .. } => *at,
        }
    }

    /// Whether a client retries it: no answer, 503/429, or the key held by a request in flight.
    fn retryable(&self) -> bool {
        match self {
            Self::NoAnswer { .. } => true,
            Self::Http { status: 503 | 429, .. } => true,
            Self::Http { status: 409, code, .. } => code.as_deref() == Some("idempotency_key_in_flight"),
            Self::Http { .. } => false,
        }
    }
}

#[derive(Clone)]
struct Submission {
    label: String,
    body: Value,
    expect: Expect,
    key: Option<String>,
    answers: Vec<Answer>,
}

impl Submission {
    fn deadline(&self) -> bool {
        !self.body["deadline_s"].is_null()
    }

    fn ids(&self) -> BTreeSet<JobId> {
        self.answers.iter().filter_map(Answer::accepted).collect()
    }

    fn refused(&self) -> bool {
        self.ids().is_empty() && self.answers.last().and_then(Answer::status) == Some(503)
    }

    fn unanswered(&self) -> bool {
        self.answers.iter().any(|a| matches!(a, Answer::NoAnswer { .. }))
    }
}

/// Writes the store may have lost in a crash (see [`History::writes_lost`]): from `from` to `to` on
/// the history's clock, and in each worker's log (in the order `check` gets the workers) the lines
/// `lines[i]` written meanwhile.
#[derive(Debug, Clone)]
struct LossWindow {
    from: Duration,
    to: Duration,
    lines: Vec<std::ops::Range<usize>>,
}

#[derive(Default)]
struct Log {
    loss: Option<LossWindow>,
    subs: Vec<Submission>,
    /// The first terminal record read of each job, and when.
    terminal: HashMap<JobId, (Duration, Value)>,
}

/// The clients' side of a scenario: all requests to the gateway at `base` go through it.
pub struct History {
    base: String,
    http: reqwest::Client,
    started: Instant,
    log: Mutex<Log>,
}

/// Submissions so far, by how they were answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub submitted: usize,
    pub answered: usize,
    /// Answered with an HTTP status (not only broken off).
    pub responded: usize,
    pub accepted: usize,
    pub refused: usize,
    pub unanswered: usize,
}

fn is_terminal(record: &Value) -> bool {
    matches!(record["status"].as_str(), Some("succeeded" | "failed" | "canceled" | "expired"))
}

impl History {
    pub fn new(base: &str) -> Arc<Self> {
        let http = kiln_common::tls::http_client().timeout(Duration::from_secs(30)).build().unwrap();
        Arc::new(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            started: Instant::now(),
            log: Mutex::default(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Registers a submission (not sent yet); returns its number.
    pub fn add(&self, label: impl Into<String>, body: Value, expect: Expect, key: Option<String>) -> usize {
        let mut log = self.log.lock().unwrap();
        log.subs.push(Submission { label: label.into(), body, expect, key, answers: Vec::new() });
        log.subs.len() - 1
    }

    /// One `POST /v1/jobs` of submission `n`, recorded.
    pub async fn attempt(&self, n: usize) -> Answer {
        let (body, key) = {
            let log = self.log.lock().unwrap();
            (log.subs[n].body.clone(), log.subs[n].key.clone())
        };
        let mut req = self.http.post(self.url("/v1/jobs")).json(&body);
        if let Some(key) = &key {
            req = req.header("idempotency-key", key);
        }
        let answer = match req.send().await {
            Err(e) => Answer::NoAnswer { error: e.to_string(), at: self.started.elapsed() },
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map(Duration::from_secs);
                match resp.json::<Value>().await {
                    Ok(v) => Answer::Http {
                        status,
                        id: v["id"].as_str().and_then(|s| s.parse().ok()),
                        code: v["error"]["code"].as_str().map(str::to_owned),
                        retry_after,
                        at: self.started.elapsed(),
                    },
                    // The head came but the body broke off: the answer is as unknown as none.
                    Err(e) => Answer::NoAnswer { error: format!("{status}, then {e}"), at: self.started.elapsed() },
                }
            }
        };
        self.log.lock().unwrap().subs[n].answers.push(answer.clone());
        answer
    }

    /// Sends submission `n` as a client with an idempotency key does: again after no answer, a
    /// 503 or a key still in flight, after `Retry-After` (or a doubling pause), until it gets
    /// another answer or `bound` has passed. The pauses are the client's backoff, part of the load.
    pub async fn submit_retrying(&self, n: usize, bound: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + bound;
        let mut pause = Duration::from_millis(100);
        loop {
            let answer = self.attempt(n).await;
            let wait = match &answer {
                a if !a.retryable() => return answer,
                Answer::Http { retry_after: Some(after), .. } => *after,
                _ => pause,
            };
            if tokio::time::Instant::now() + wait > deadline {
                return answer;
            }
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Declares that the store lost its writes made between `from` and `to` (history clock), which
    /// the workers logged as lines `lines[i]` of their logs (the workers in the order `check` gets
    /// them). What the README allows then — and only for a job whose first result was stored or
    /// read in that window: the job runs again, and its result is replaced by an equal one.
    pub fn writes_lost(&self, from: Duration, to: Duration, lines: Vec<std::ops::Range<usize>>) {
        self.log.lock().unwrap().loss = Some(LossWindow { from, to, lines });
    }

    /// Time since the history began, for the scenario's own messages.
    pub fn clock(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn counts(&self) -> Counts {
        let log = self.log.lock().unwrap();
        let mut c = Counts { submitted: log.subs.len(), ..Counts::default() };
        for s in &log.subs {
            if !s.answers.is_empty() {
                c.answered += 1;
            }
            if s.answers.iter().any(|a| a.status().is_some()) {
                c.responded += 1;
            }
            if !s.ids().is_empty() {
                c.accepted += 1;
            } else if s.refused() {
                c.refused += 1;
            }
            if s.unanswered() {
                c.unanswered += 1;
            }
        }
        c
    }

    /// The accepted job ids, in submission order, each once.
    pub fn accepted(&self) -> Vec<JobId> {
        let log = self.log.lock().unwrap();
        let mut seen = BTreeSet::new();
        log.subs.iter().flat_map(|s| s.ids()).filter(|id| seen.insert(*id)).collect()
    }

    /// The job that accepted submission `n`, if one did.
    pub fn id_of(&self, n: usize) -> Option<JobId> {
        self.log.lock().unwrap().subs[n].ids().into_iter().next()
    }

    /// `GET /v1/jobs/{id}` (long-polling up to `wait` seconds): the record, `Ok(None)` on 404,
    /// `Err` when the gateway did not answer.
    pub async fn read(&self, id: JobId, wait: Option<u64>) -> Result<Option<Value>, String> {
        let path = match wait {
            Some(w) => format!("/v1/jobs/{id}?wait={w}"),
            None => format!("/v1/jobs/{id}"),
        };
        let resp = self.http.get(self.url(&path)).send().await.map_err(|e| e.to_string())?;
        match resp.status().as_u16() {
            200 => {
                let record: Value = resp.json().await.map_err(|e| e.to_string())?;
                if is_terminal(&record) {
                    let at = self.started.elapsed();
                    self.log.lock().unwrap().terminal.entry(id).or_insert((at, record.clone()));
                }
                Ok(Some(record))
            }
            404 => Ok(None),
            other => Err(format!("GET {path} answered {other}")),
        }
    }

    /// Reads every accepted job once, keeping the terminal records as the first of two reads.
    pub async fn observe(&self) {
        let ids = self.accepted();
        futures::stream::iter(ids.into_iter().map(|id| self.read(id, None)))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
    }

    /// Waits (long-polling 32 jobs at a time, oldest first, then round again) until every accepted
    /// job is terminal or `bound` has passed; returns the ones still not terminal then.
    pub async fn settle(&self, bound: Duration) -> Vec<JobId> {
        let pending = Mutex::new((self.accepted(), 0usize));
        let probe = || async {
            let batch: Vec<JobId> = {
                let (left, cursor) = &mut *pending.lock().unwrap();
                if *cursor >= left.len() {
                    *cursor = 0;
                }
                let batch = left.iter().skip(*cursor).take(32).copied().collect();
                *cursor += 32;
                batch
            };
            let done: Vec<JobId> = futures::stream::iter(batch.into_iter().map(|id| async move {
                match self.read(id, Some(2)).await {
                    Ok(Some(r)) => is_terminal(&r).then_some(id),
                    // Gone with the writes a crash lost: nothing more will come of it.
                    Ok(None) => self.accepted_in_loss(id).then_some(id),
                    Err(_) => None,
                }
            }))
            .buffer_unordered(32)
            .filter_map(|d| async move { d })
            .collect()
            .await;
            let (left, cursor) = &mut *pending.lock().unwrap();
            let before = left.len();
            left.retain(|id| !done.contains(id));
            *cursor -= (before - left.len()).min(*cursor);
            if left.is_empty() { Ok(()) } else { Err(format!("{} not terminal, e.g. {:?}", left.len(), left.first())) }
        };
        let waited = tokio::time::timeout(bound, wait_until("every accepted job is terminal", bound * 2, probe)).await;
        match waited {
            Ok(()) => Vec::new(),
            Err(_) => pending.into_inner().unwrap().0,
        }
    }

    /// Whether job `id` was accepted while the store was losing its writes (see
    /// [`History::writes_lost`]), so that it may be gone with them.
    fn accepted_in_loss(&self, id: JobId) -> bool {
        let log = self.log.lock().unwrap();
        let Some(l) = &log.loss else { return false };
        let at = log.subs.iter().flat_map(|s| &s.answers).find(|a| a.accepted() == Some(id)).map(Answer::at);
        at.is_some_and(|at| (l.from..=l.to + Duration::from_secs(1)).contains(&at))
    }

    /// Checks the history against the promises (see the module comment). `logs` are the gateways'
    /// log lines, quoted as evidence next to the workers' for the jobs that went wrong.
    pub async fn check(&self, name: &str, workers: &[&ChildWorker], logs: &[Value]) -> Verdict {
        let all: Vec<Submission> = self.log.lock().unwrap().subs.clone();
        let counts = self.counts();
        let mut v = Verdict { name: name.to_owned(), accepted: 0, refused: counts.refused, ..Verdict::default() };
        let mut lines: Vec<Value> = logs.to_vec();
        for w in workers {
            lines.extend(w.lines());
        }

        // Which submission each accepted id answers; more than one id for one submission is one
        // idempotency key (or request) that made two jobs.
        let mut owner: BTreeMap<JobId, usize> = BTreeMap::new();
        for (i, s) in all.iter().enumerate() {
            let ids = s.ids();
            if ids.len() > 1 {
                v.duplicated.push(format!(
                    "{} (key {:?}) was answered with {} different job ids: {ids:?}",
                    s.label,
                    s.key,
                    ids.len()
                ));
            }
            for id in ids {
                owner.entry(id).or_insert(i);
            }
        }
        v.accepted = owner.len();

        // What the workers ran.
        let runs = runs_logged(workers);
        let loss = self.log.lock().unwrap().loss.clone();
        // Per job: how often its result was stored, and how many of those stores fell in the
        // writes the store lost (each of which allows one more run).
        let mut stored: HashMap<String, (usize, usize)> = HashMap::new();
        let mut ran: BTreeSet<String> = BTreeSet::new();
        for (wi, w) in workers.iter().enumerate() {
            for (li, line) in w.lines().iter().enumerate() {
                if line["target"] != "kiln::worker::runs" {
                    continue;
                }
                let id = line["job_id"].as_str().unwrap_or_default().to_owned();
                ran.insert(id.clone());
                if line["stored"] == true {
                    let lost = loss.as_ref().is_some_and(|l| l.lines.get(wi).is_some_and(|r| r.contains(&li)));
                    let entry = stored.entry(id).or_insert((0, 0));
                    entry.0 += 1;
                    entry.1 += usize::from(lost);
                }
            }
        }
        for (id, (n, lost)) in &stored {
            match (*n > 1, n - lost <= 1) {
                (false, _) => {}
                (true, true) => v.notes.push(format!("job {id}: stored {n} times, {lost} of them lost in the crash")),
                (true, false) => v.duplicated.push(format!(
                    "job {id}: its result was stored {n} times (stored=true in the runs log){}",
                    id.parse().map(|id| evidence(&lines, id)).unwrap_or_default()
                )),
            }
        }

        // Ghosts: jobs that ran although no client was given their id.
        let ghosts: Vec<String> =
            ran.iter().filter(|id| id.parse::<JobId>().map_or(true, |j| !owner.contains_key(&j))).cloned().collect();
        let mut ghost_records: Vec<(String, Option<Value>)> = Vec::new();
        for g in &ghosts {
            let record = match g.parse::<JobId>() {
                Ok(id) => self.read(id, None).await.ok().flatten(),
                Err(_) => None,
            };
            ghost_records.push((g.clone(), record));
        }

        // References: every text of an accepted embedding job, and when ghosts need matching, every
        // text of a submission that was not accepted.
        let owned: BTreeSet<usize> = owner.values().copied().collect();
        let mut texts: BTreeSet<String> = BTreeSet::new();
        for (i, s) in all.iter().enumerate() {
            if let Expect::Embedding(t) = &s.expect
                && (owned.contains(&i) || !ghosts.is_empty())
            {
                texts.extend(t.iter().cloned());
            }
        }
        let refs = references(&texts.into_iter().collect::<Vec<_>>()).await;

        // The second read of every accepted job, well after the first (the references
        // took a while).
        let ids: Vec<JobId> = owner.keys().copied().collect();
        let finals: HashMap<JobId, Result<Option<Value>, String>> =
            futures::stream::iter(ids.iter().map(|&id| async move {
                let mut last = Err(String::new());
                for _ in 0..3 {
                    last = self.read(id, None).await;
                    if last.is_ok() {
                        break;
                    }
                }
                (id, last)
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        let firsts = self.log.lock().unwrap().terminal.clone();

        for (id, i) in &owner {
            let s = &all[*i];
            let what = format!("job {id} ({})", s.label);
            let record = match finals.get(id) {
                Some(Ok(Some(r))) => r.clone(),
                Some(Ok(None)) => {
                    // Accepted after the last fsync and gone with the lost writes: the README says
                    // so (a job whose whole life fell in the lost writes disappears). Anything else
                    // that is gone was lost.
                    if self.accepted_in_loss(*id) {
                        v.notes.push(format!("{what}: accepted in the lost writes and gone with them (404)"));
                    } else {
                        v.lost.push(format!("{what}: 404, its record is gone{}", evidence(&lines, *id)));
                    }
                    continue;
                }
                Some(Err(e)) => {
                    v.stuck.push(format!("{what}: unreadable at the end: {e}"));
                    continue;
                }
                None => unreachable!("every accepted job was read"),
            };
            if !is_terminal(&record) {
                v.stuck.push(format!(
                    "{what}: still {} (attempts {}) at the end{}{}",
                    record["status"],
                    record["attempts"],
                    evidence(&lines, *id),
                    self.leader_evidence(&lines, *id).await
                ));
                continue;
            }
            let read_in_loss = |at: &Duration| loss.as_ref().is_some_and(|l| (l.from..=l.to).contains(at));
            let replaced_in_loss = |at: &Duration, first: &Value| {
                read_in_loss(at)
                    && first["status"] == record["status"]
                    && equal_results(&first["output"], &record["output"])
            };
            // No result the workers stored for it survived (each fell in the lost writes, or the
            // store refused it because it had forgotten the run's start): the store believes the
            // job never started, so a deadline job past its deadline ends expired (README, "What
            // cannot be promised"). Only in a scenario that lost writes; a stored result that
            // survived does not qualify.
            let run_forgotten = loss.is_some()
                && s.deadline()
                && record["status"] == "expired"
                && stored.get(&id.to_string()).is_none_or(|(n, lost)| n == lost);
            if let Some((at, first)) = firsts.get(id)
                && (first["status"] != record["status"]
                    || first["output"] != record["output"]
                    || first["error"] != record["error"])
            {
                if replaced_in_loss(at, first) {
                    v.notes.push(format!(
                        "{what}: read at {at:?}, its result lost in the crash and replaced by an equal one"
                    ));
                } else if run_forgotten && read_in_loss(at) {
                    v.notes.push(format!(
                        "{what}: read {} at {at:?}; its whole run fell in the lost writes, and it expired on recovery",
                        first["status"]
                    ));
                } else {
                    v.duplicated.push(format!(
                        "{what}: changed after it was read terminal at {at:?}: first {} {}, now {} {}",
                        first["status"],
                        short(&first["output"]),
                        record["status"],
                        short(&record["output"])
                    ));
                }
            }
            let status = record["status"].as_str().unwrap_or_default();
            let ran_it = ran.contains(&id.to_string());
            match (status, s.deadline()) {
                ("succeeded", _) => {}
                ("expired", true) => {
                    if record["error"]["code"] != "deadline_exceeded" {
                        v.lost.push(format!("{what}: expired with {}", record["error"]));
                    }
                    if ran_it && !run_forgotten {
                        v.wrong.push(format!("{what}: expired, yet a worker ran it{}", evidence(&lines, *id)));
                    } else if ran_it {
                        v.notes.push(format!("{what}: ran, its start lost in the crash, and expired on recovery"));
                    }
                    continue;
                }
                _ => {
                    v.lost.push(format!("{what}: ended {status}: {}{}", record["error"], evidence(&lines, *id)));
                    continue;
                }
            }
            // Compared as times, not as text (a time on a whole second is written without millis).
            let times = serde_json::from_value::<kiln_proto::JobRecord>(record.clone()).ok();
            if s.deadline()
                && record["attempts"] == 1
                && let Some((Some(started), Some(deadline))) = times.map(|r| (r.started_at, r.deadline_at))
                && started > deadline
            {
                let (started, deadline) = (&record["started_at"], &record["deadline_at"]);
                v.wrong.push(format!("{what}: started at {started}, after its deadline {deadline}"));
            }
            match &s.expect {
                Expect::Embedding(t) => {
                    if let Some(problem) = embedding_problem(&record["output"], t, &refs) {
                        v.wrong.push(format!("{what}: {problem}"));
                    }
                }
                Expect::Images { seed, count } => {
                    if let Some(problem) = self.image_problem(*id, &record["output"], *seed, *count).await {
                        v.wrong.push(format!("{what}: {problem}"));
                    }
                }
            }
        }

        // A ghost is legitimate only as a submission whose outcome its client could not know.
        let anyone_unanswered = all.iter().any(Submission::unanswered);
        let mut ran_for: HashMap<usize, Vec<String>> = HashMap::new();
        for (g, record) in &ghost_records {
            let matched: Vec<usize> = match record {
                Some(r) if r["status"] == "succeeded" => {
                    let vectors: Option<Vec<Vec<f32>>> = serde_json::from_value(r["output"]["embeddings"].clone()).ok();
                    let seed = r["output"]["seed"].as_u64();
                    let matches = |expect: &Expect| match (expect, &vectors) {
                        (Expect::Embedding(texts), Some(vectors)) => vectors_problem(vectors, texts, &refs).is_none(),
                        (Expect::Images { seed: s, .. }, _) => seed == Some(*s),
                        (Expect::Embedding(_), None) => false,
                    };
                    all.iter().enumerate().filter(|(_, s)| matches(&s.expect)).map(|(i, _)| i).collect()
                }
                _ => Vec::new(),
            };
            if matched.is_empty() {
                let seen = record
                    .as_ref()
                    .map_or("no record".to_owned(), |r| format!("{} {}", r["status"], short(&r["output"])));
                if anyone_unanswered {
                    v.notes.push(format!(
                        "job {g} ran without a client holding its id ({seen}); some requests got no answer"
                    ));
                } else {
                    v.wrong.push(format!(
                        "job {g} ran, but no client was given its id and every request was answered ({seen})"
                    ));
                }
                continue;
            }
            for i in &matched {
                ran_for.entry(*i).or_default().push(g.clone());
            }
            let keyed: Vec<&Submission> =
                matched.iter().map(|i| &all[*i]).filter(|s| s.key.is_some() && !s.ids().is_empty()).collect();
            if !keyed.is_empty() {
                for s in keyed {
                    v.duplicated.push(format!(
                        "{}: idempotency key {:?} was answered with job {:?}, and job {g} ran for it too",
                        s.label,
                        s.key,
                        s.ids().first()
                    ));
                }
            } else if let Some(s) = matched.iter().map(|i| &all[*i]).find(|s| !s.ids().is_empty() || s.unanswered()) {
                // An identical submission that was accepted, or one whose client got no answer.
                v.notes.push(format!("job {g} ran for {} (or its twin), whose client holds no id for it", s.label));
            } else {
                let s = &all[matched[0]];
                v.wrong.push(format!(
                    "{} was refused ({:?}), yet job {g} ran it{}",
                    s.label,
                    s.answers.iter().map(Answer::status).collect::<Vec<_>>(),
                    g.parse().map(|id| evidence(&lines, id)).unwrap_or_default()
                ));
            }
        }

        let mut tally: BTreeMap<String, usize> = BTreeMap::new();
        for (id, i) in &owner {
            let kind = match &all[*i].expect {
                Expect::Embedding(_) if all[*i].deadline() => "deadline",
                Expect::Embedding(_) => "embedding",
                Expect::Images { .. } => "images",
            };
            let end = match finals.get(id) {
                Some(Ok(Some(r))) if r["cached"] == true => "cached".to_owned(),
                Some(Ok(Some(r))) => r["status"].as_str().unwrap_or("?").to_owned(),
                Some(Ok(None)) => "gone".to_owned(),
                _ => "unreadable".to_owned(),
            };
            *tally.entry(format!("{kind}/{end}")).or_insert(0) += 1;
        }
        let unanswered = all.iter().filter(|s| s.ids().is_empty() && s.unanswered()).count();
        let sample = all.iter().flat_map(|s| &s.answers).find_map(|a| match a {
            Answer::NoAnswer { error, .. } => Some(error.clone()),
            Answer::Http { .. } => None,
        });
        v.detail = format!(
            "{tally:?}; runs logged {}, jobs run without a client holding their id {}; submissions never accepted and not always answered {unanswered}{}",
            runs.len(),
            ghosts.len(),
            sample.map(|e| format!(" (e.g. {e})")).unwrap_or_default()
        );

        // Idempotent requests that never got a definitive answer.
        for (i, s) in all.iter().enumerate() {
            if s.key.is_some() && s.ids().is_empty() && s.answers.last().is_some_and(Answer::retryable) {
                let last = s.answers.last().unwrap();
                let ran = match ran_for.get(&i) {
                    Some(jobs) => format!(
                        "; job {jobs:?} ran for it{}",
                        jobs[0].parse().map(|id| evidence(&lines, id)).unwrap_or_default()
                    ),
                    None => "; no job ran for it".to_owned(),
                };
                v.stuck.push(format!(
                    "{} (key {:?}): no definitive answer after {} attempts over {:?}: {:?}; last {last:?}{ran}",
                    s.label,
                    s.key,
                    s.answers.len(),
                    last.at() - s.answers[0].at(),
                    s.answers
                        .iter()
                        .map(|a| a.status().map_or("none".to_owned(), |c| c.to_string()))
                        .collect::<Vec<_>>()
                ));
            }
        }
        v
    }

    /// For a coalesced follower: the state of the leader it was attached to, and its log lines.
    async fn leader_evidence(&self, lines: &[Value], id: JobId) -> String {
        let id = id.to_string();
        let leader = lines
            .iter()
            .find(|l| l["job_id"] == id.as_str() && l["leader"].is_string())
            .and_then(|l| l["leader"].as_str()?.parse::<JobId>().ok());
        let Some(leader) = leader else { return String::new() };
        let record = match self.read(leader, None).await {
            Ok(Some(r)) => format!("{} (attempts {})", r["status"], r["attempts"]),
            Ok(None) => "gone (404)".to_owned(),
            Err(e) => format!("unreadable: {e}"),
        };
        format!("; its leader {leader} is {record}{}", evidence(lines, leader))
    }

    /// Downloads every image of a job and checks it against its record and the job's seeds.
    async fn image_problem(&self, id: JobId, output: &Value, seed: u64, count: usize) -> Option<String> {
        let images = output["images"].as_array()?;
        if images.len() != count {
            return Some(format!("{} images instead of {count}", images.len()));
        }
        for (i, file) in images.iter().enumerate() {
            if file["seed"].as_u64() != Some(seed + i as u64) {
                return Some(format!("image {i} has seed {}, not {}", file["seed"], seed + i as u64));
            }
            let url = file["url"].as_str().unwrap_or_default();
            let resp = match self.http.get(self.url(url)).send().await {
                Ok(r) if r.status() == 200 => r,
                Ok(r) => return Some(format!("image {i} ({url}) answered {}", r.status())),
                Err(e) => return Some(format!("image {i} ({url}): {e}")),
            };
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => return Some(format!("image {i} ({url}): {e}")),
            };
            let sha = hex::encode(Sha256::digest(&bytes));
            if file["sha256"].as_str() != Some(sha.as_str()) {
                return Some(format!("image {i} ({url}) hashes to {sha}, its record says {}", file["sha256"]));
            }
        }
        let _ = id;
        None
    }
}

/// Whether two results are the same up to what a second run may change: embeddings within the
/// tolerance, images with the same bytes (their file names name the run).
fn equal_results(a: &Value, b: &Value) -> bool {
    let vectors = |v: &Value| serde_json::from_value::<Vec<Vec<f32>>>(v["embeddings"].clone()).ok();
    let shas = |v: &Value| v["images"].as_array().map(|i| i.iter().map(|f| f["sha256"].clone()).collect::<Vec<_>>());
    match (vectors(a), vectors(b)) {
        (Some(x), Some(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(&y)
                    .all(|(p, q)| p.len() == q.len() && p.iter().zip(q).all(|(u, w)| (u - w).abs() <= TOLERANCE))
        }
        _ => shas(a).is_some() && shas(a) == shas(b),
    }
}

fn embedding_problem(output: &Value, texts: &[String], refs: &HashMap<String, Vec<f32>>) -> Option<String> {
    match serde_json::from_value::<Vec<Vec<f32>>>(output["embeddings"].clone()) {
        Ok(got) => vectors_problem(&got, texts, refs),
        Err(e) => Some(format!("no embeddings in the output ({e}): {}", short(output))),
    }
}

/// How `got` differs from the reference embeddings of `texts`, if it does.
fn vectors_problem(got: &[Vec<f32>], texts: &[String], refs: &HashMap<String, Vec<f32>>) -> Option<String> {
    if got.len() != texts.len() {
        return Some(format!("{} embeddings for {} texts", got.len(), texts.len()));
    }
    for (i, (vector, text)) in got.iter().zip(texts).enumerate() {
        let Some(reference) = refs.get(text) else { return Some(format!("no reference for {text:?}")) };
        if vector.len() != reference.len() {
            return Some(format!("embedding {i} has {} dimensions, the reference {}", vector.len(), reference.len()));
        }
        let diff = vector.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        if diff > TOLERANCE {
            return Some(format!("embedding {i} differs from the reference of {text:?} by {diff:e}"));
        }
    }
    None
}

/// A long JSON value cut short for a message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 { format!("{}…", &s[..s.char_indices().nth(120).map_or(s.len(), |(i, _)| i)]) } else { s }
}

/// The log lines (gateways' and workers') that mention `id`, as evidence.
fn evidence(lines: &[Value], id: JobId) -> String {
    let id = id.to_string();
    let found: Vec<String> = lines
        .iter()
        .filter(|l| l.as_object().is_some_and(|o| o.values().any(|v| v.as_str().is_some_and(|s| s.contains(&id)))))
        .map(|l| {
            let mut l = l.clone();
            if let Some(o) = l.as_object_mut() {
                o.remove("spans");
                o.remove("span");
            }
            l.to_string()
        })
        .collect();
    if found.is_empty() {
        "; no log line mentions it".to_owned()
    } else {
        format!("; its log lines: {}", found.join(" | "))
    }
}

/// What one scenario came to.
#[derive(Debug, Default)]
pub struct Verdict {
    pub name: String,
    pub accepted: usize,
    pub refused: usize,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub wrong: Vec<String>,
    pub stuck: Vec<String>,
    /// Facts worth printing that break no promise.
    pub notes: Vec<String>,
    /// How the accepted jobs ended, by kind.
    pub detail: String,
}

impl Verdict {
    /// Prints the scenario line (also to the suite's summary file) and the problems, then asserts
    /// there were none.
    pub fn finish(self) {
        let line = format!(
            "scenario={} accepted={} refused={} lost={} duplicated={} wrong={} stuck={}",
            self.name,
            self.accepted,
            self.refused,
            self.lost.len(),
            self.duplicated.len(),
            self.wrong.len(),
            self.stuck.len()
        );
        println!("{line}");
        println!("  {}: {}", self.name, self.detail);
        for (kind, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("wrong", &self.wrong),
            ("stuck", &self.stuck),
            ("note", &self.notes),
        ] {
            for item in list.iter().take(8) {
                println!("  {kind}: {item}");
            }
            if list.len() > 8 {
                println!("  {kind}: … and {} more", list.len() - 8);
            }
        }
        // Collected for the test command's summary (cargo captures the output of passing tests).
        let summary = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-suite.txt");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(summary).unwrap();
        std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes()).unwrap();
        let clean =
            self.lost.is_empty() && self.duplicated.is_empty() && self.wrong.is_empty() && self.stuck.is_empty();
        assert!(clean, "{}: promises broken: {line}", self.name);
    }
}

/// The served embedding model, loaded once in this process the way a worker loads it.
static REFERENCE: tokio::sync::OnceCell<InferenceHandle> = tokio::sync::OnceCell::const_new();

/// The reference embedding of each text, computed here with the real model (each text once).
pub async fn references(texts: &[String]) -> HashMap<String, Vec<f32>> {
    if texts.is_empty() {
        return HashMap::new();
    }
    let model = REFERENCE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let repo = kiln_common::models::ModelRepository::load(&repo_dir()).expect("model repository");
                let spec = repo.get(MODEL).expect("the embedding model").clone();
                let cache = cache_dir();
                let dylib = kiln_worker::resolve_onnxruntime(&kiln_worker::WorkerConfig::default(), &cache)
                    .expect("ONNX Runtime (set ORT_DYLIB_PATH, as scripts/test.sh does)");
                kiln_worker::load_model(&spec, &dylib, &cache, kiln_worker::Threads { intra: 2, spin: false })
                    .expect("load the reference model")
            })
            .await
            .expect("loading task")
        })
        .await;
    let chunks: Vec<Vec<String>> = texts.chunks(16).map(<[String]>::to_vec).collect();
    let vectors: Vec<(Vec<String>, Vec<Vec<f32>>)> =
        futures::stream::iter(chunks.into_iter().map(|chunk| async move {
            let v = model.embed(chunk.clone(), None).await.expect("reference embeddings").vectors;
            (chunk, v)
        }))
        .buffer_unordered(4)
        .collect()
        .await;
    vectors.into_iter().flat_map(|(t, v)| t.into_iter().zip(v)).collect()
}
