//! `POST /v1/jobs` (validate, claim the idempotency key, record, publish with confirm, optionally
//! wait for the result), `GET /v1/jobs/{id}` (optionally long-polling), and
//! `POST /v1/jobs/{id}/cancel`.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_common::broker::Lane;
use kiln_common::cache;
use kiln_common::store::{Claim, Coalesced, Creation, Transition};
use kiln_common::webhooks;
use kiln_proto::{
    EmbeddingInput, Envelope, ImageGenerationInput, JobEvent, JobId, JobRecord, JobStatus, Task, TextToImageInput,
    WebhookState, json_type, now_millis,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use tracing::Instrument;

use crate::auth::Principal;
use crate::error::{ApiError, Limited, RateHeaders};
use crate::events;
use crate::state::AppState;

/// Largest `metadata` object accepted, serialised.
const MAX_METADATA_BYTES: usize = 4096;
/// Longest `deadline_s` accepted: a week.
pub(crate) const MAX_DEADLINE_S: f64 = 7.0 * 86_400.0;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// How long a claimed `Idempotency-Key` stays pending before its job exists: a gateway that dies
/// while accepting blocks the key this long at most. Accepting is bounded well below it (a store
/// write and a publisher confirm, each within the I/O timeout).
const IDEMPOTENCY_PENDING: Duration = Duration::from_secs(30);
/// How long an identical job waits for its in-flight twin's message to be confirmed before it
/// runs on its own (a twin whose gateway died never confirms). A confirm takes milliseconds; on a
/// loaded broker it can take hundreds, and a burst that gives up too soon runs once per request.
const COALESCE_WAIT: Duration = Duration::from_secs(1);
/// Tries at withdrawing a job whose publish failed, before the sweeper is left to find it.
const DISCARD_TRIES: u32 = 5;
const WEBHOOK_EVENTS: [&str; 3] = ["start", "progress", "completed"];

/// A submission that passed validation.
struct Submission {
    spec_name: kiln_proto::ModelName,
    input: Value,
    metadata: Option<Value>,
    deadline: Option<Duration>,
    /// Cancel it if not finished within this (see [`Extra::finish_within`]).
    finish_within: Option<Duration>,
    webhook: Option<WebhookState>,
    /// Hash of the canonical request, for idempotency.
    fingerprint: String,
    /// The result-cache key, unless the request opted out (`"cache": false`): the tenant's own,
    /// or one shared by every tenant for a model that opts in (`shared_cache = true`).
    cache_key: Option<String>,
    shared_cache: bool,
    tenant: Option<String>,
}

/// `key` in `tenant`'s namespace (idempotency keys, cache keys): another tenant's same key is
/// another key. Unchanged without a tenant (an open gateway).
fn tenant_scoped(tenant: Option<&str>, key: String) -> String {
    match tenant {
        Some(t) => format!("t:{t}:{key}"),
        None => key,
    }
}

/// Refuses a submission of a tenant that has used its compute quota for the hour.
async fn check_compute(state: &AppState, who: &Principal) -> Result<(), ApiError> {
    let (Some(tenant), Some(limit)) = (&who.tenant, who.limits.compute_s_per_hour) else { return Ok(()) };
    let use_ = state.backend.limiter.compute(tenant).await.map_err(|e| ApiError::Store(e, state.config.retry_after))?;
    let used = use_.used();
    if used < limit {
        return Ok(());
    }
    let retry_after = use_.retry_after(limit);
    Err(ApiError::QuotaExceeded(Limited {
        message: format!("tenant {tenant} used {used:.1} of its {limit} compute-seconds this hour"),
        retry_after,
        headers: RateHeaders {
            policy: format!("\"compute\";q={};w=3600", limit.ceil() as u64),
            state: format!("\"compute\";r=0;t={}", retry_after.as_secs()),
        },
    }))
}

/// Takes one of the tenant's slots of jobs in flight for `id`; answers the tenant when it did.
async fn take_slot(state: &AppState, who: &Principal, id: JobId) -> Result<Option<String>, ApiError> {
    let (Some(tenant), Some(max)) = (&who.tenant, who.limits.max_in_flight.filter(|m| *m > 0)) else {
        return Ok(None);
    };
    let retry = state.config.retry_after;
    let slot = state.backend.store.reserve_slot(tenant, id, max).await.map_err(|e| ApiError::Store(e, retry))?;
    if !slot.granted {
        return Err(ApiError::QuotaExceeded(Limited {
            message: format!("tenant {tenant} has {} jobs in flight, the most it may", slot.in_use),
            retry_after: retry,
            headers: RateHeaders {
                policy: format!("\"jobs\";q={max}"),
                state: format!("\"jobs\";r=0;t={}", retry.as_secs().max(1)),
            },
        }));
    }
    Ok(Some(tenant.clone()))
}

/// Submit a job
#[utoipa::path(post, path = "/v1/jobs", operation_id = "submit_job", tag = "jobs",
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 255,
         description = "The same key with the same body returns the same job (for KILN_IDEMPOTENCY_TTL); with another body, 409 idempotency_key_reused."),
        ("Prefer" = Option<String>, Header, example = "wait=10",
         description = "wait=N (seconds, capped by KILN_MAX_WAIT): answer 200 with the finished job if it completes in time."),
        ("Cancel-After" = Option<f64>, Header, description = "Seconds; a job not started by then ends expired (like deadline_s)."),
    ),
    request_body(content = super::openapi::JobRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Finished within Prefer: wait, or an idempotent repeat of a finished job", body = kiln_proto::JobRecord,
         headers(("Location" = String, description = "/v1/jobs/{id}"), ("Preference-Applied" = String))),
        (status = 202, description = "Accepted: durably queued", body = kiln_proto::JobRecord,
         headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 400, description = "malformed_json", body = kiln_proto::ApiErrorBody),
        (status = 404, description = "model_not_found", body = kiln_proto::ApiErrorBody),
        (status = 409, description = "idempotency_key_reused, idempotency_key_in_flight", body = kiln_proto::ApiErrorBody),
        (status = 413, description = "payload_too_large", body = kiln_proto::ApiErrorBody),
        (status = 415, description = "unsupported_media_type", body = kiln_proto::ApiErrorBody),
        (status = 422, description = "invalid_request, invalid_input: the message names the field", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "broker_unavailable, store_unavailable, overloaded", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn submit(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = checked_body(&state, &headers, body)?;
    let extra = Extra { start_within: cancel_after(&headers)?, ..Extra::default() };
    let wait = prefer_wait(&headers, state.config.max_wait_s);
    let done = submit_with(&state, &who, &headers, &body, wait, extra).await?;
    let resp = job_response(done.record);
    Ok(match done.waited {
        Some(w) => with_wait_applied(resp, w),
        None => resp,
    })
}

/// What a submission adds to its request body: what the jobs API takes from headers, and what
/// the predictions API asks of the job it maps a prediction onto.
#[derive(Debug, Default)]
pub(crate) struct Extra {
    /// Caps the start-by deadline (the jobs API's `Cancel-After: <seconds>`).
    pub start_within: Option<Duration>,
    /// A finish-by time (the predictions API's `Cancel-After`): the job is canceled if it has not
    /// finished by then, running or not. It caps the start-by deadline too, so a job still
    /// queued then expires without running.
    pub finish_within: Option<Duration>,
    /// Its webhook's deliveries send the job as this prediction.
    pub prediction: Option<kiln_proto::PredictionView>,
}

/// An accepted submission: its job, and the wait applied (`Prefer: wait`) when it waited.
pub(crate) struct Submitted {
    pub record: JobRecord,
    pub waited: Option<Duration>,
}

/// Validates and accepts a job request `body` (the `POST /v1/jobs` body, with `headers`'
/// `Idempotency-Key`), then waits for the job up to `wait`.
pub(crate) async fn submit_with(
    state: &AppState,
    who: &Principal,
    headers: &HeaderMap,
    body: &[u8],
    wait: Option<Duration>,
    extra: Extra,
) -> Result<Submitted, ApiError> {
    let mut submission = prepare(state, who, body).await?;
    for within in [extra.start_within, extra.finish_within].into_iter().flatten() {
        submission.deadline = Some(submission.deadline.map_or(within, |d| d.min(within)));
    }
    submission.finish_within = extra.finish_within;
    if let Some(w) = submission.webhook.as_mut() {
        w.prediction = extra.prediction;
    }
    // A tenant's idempotency keys are its own: another tenant's same key names another job.
    let key = idempotency_key(headers)?.map(|k| tenant_scoped(who.tenant.as_deref(), k));
    check_compute(state, who).await?;
    let Enqueued { admitted, completion } = enqueue(state, who, submission, key, wait.is_some()).await?;
    let record = match admitted {
        Admitted::Existing(record) => {
            return Ok(Submitted { record: settle(state, who, record, wait, true).await?, waited: wait });
        }
        Admitted::Cached(record) => return Ok(Submitted { record, waited: None }),
        Admitted::New(record) => record,
    };
    match (wait, completion) {
        (Some(wait), Some(mut rx)) => {
            let done = crate::waiting::completion(state, record.id, &mut rx, wait).await;
            let record = match done {
                Some(record) => record,
                None => {
                    let retry = state.config.retry_after;
                    state.backend.store.get(record.id).await.map_err(|e| ApiError::Store(e, retry))?.unwrap_or(record)
                }
            };
            Ok(Submitted { record, waited: Some(wait) })
        }
        _ => Ok(Submitted { record, waited: None }),
    }
}

/// A request body within the size limit, of a JSON content type (or none said).
pub(crate) fn checked_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    if body.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    check_content_type(headers)?;
    Ok(body)
}

/// A submission on behalf of another API's route (`routes::openai`): `body` is what it would
/// have sent to `POST /v1/jobs`, checked the same way (model, input, the tenant's compute quota)
/// and accepted the same way (cache, coalescing, slots, publish with confirm). Subscribed to the
/// job's completion, for the caller to wait on.
pub(crate) async fn submit_on_behalf(state: &AppState, who: &Principal, body: &Value) -> Result<Enqueued, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(format!("encoding a submission: {e}")))?;
    let submission = prepare(state, who, &bytes).await?;
    check_compute(state, who).await?;
    enqueue(state, who, submission, None, true).await
}

/// An accepted submission, and (when asked for) the subscription to its job's completion, made
/// before the job existed so that the completion cannot slip by.
pub(crate) struct Enqueued {
    pub admitted: Admitted,
    pub completion: Option<broadcast::Receiver<JobEvent>>,
}

/// Takes an admission permit and a jobs-in-flight slot, then accepts the submission.
async fn enqueue(
    state: &AppState,
    who: &Principal,
    submission: Submission,
    key: Option<String>,
    subscribe: bool,
) -> Result<Enqueued, ApiError> {
    let permit =
        state.admission.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded(state.config.retry_after))?;
    let id = JobId::random();
    let completion = if subscribe { Some(state.backend.store.subscribe(id).await) } else { None };
    let (state, who) = (state.clone(), who.clone());
    // Accepting runs to its end even when the client hangs up halfway: a claimed idempotency key
    // is always committed or released, and a recorded job is always published or withdrawn.
    let admitted = tokio::spawn(
        async move {
            let _permit = permit;
            let slot = take_slot(&state, &who, id).await?;
            let admitted = admit(&state, key, submission, id).await;
            // A slot is held by a job that is now live; the others give theirs back.
            if let Some(tenant) = slot
                && !matches!(admitted, Ok(Admitted::New(_)))
                && let Err(e) = state.backend.store.release_slot(&tenant, id).await
            {
                events::slot_not_released(id, &e);
            }
            admitted
        }
        .instrument(tracing::Span::current()),
    )
    .await
    .map_err(|e| ApiError::Internal(format!("accepting the job: {e}")))??;
    Ok(Enqueued { admitted, completion })
}

/// What accepting a submission came to.
pub(crate) enum Admitted {
    /// The idempotency key already named this job.
    Existing(JobRecord),
    /// Answered from the result cache.
    Cached(JobRecord),
    /// Recorded and durably queued (or following an identical job in flight).
    New(JobRecord),
}

/// Claims the idempotency key, answers from the cache or records and publishes the job, and on
/// failure releases the key. The key's committed state follows from its job: it is committed by
/// the job's confirmation, and a claim whose job exists with its message enqueued reads as
/// committed, so a lost commit never turns an accepted job into an error.
async fn admit(state: &AppState, key: Option<String>, submission: Submission, id: JobId) -> Result<Admitted, ApiError> {
    let retry = state.config.retry_after;
    let store = &state.backend.store;
    if let Some(key) = &key
        && let Some(existing) = claim(state, key, &submission.fingerprint, id).await?
    {
        let record = store.get(existing).await.map_err(|e| ApiError::Store(e, retry))?;
        return record.map(Admitted::Existing).ok_or_else(|| ApiError::JobNotFound(existing.to_string()));
    }
    let outcome = match cached(state, id, &submission, key.as_deref()).await {
        Ok(Some(record)) => Ok(Admitted::Cached(record)),
        Ok(None) => accept(state, id, submission, key.as_deref()).await.map(Admitted::New),
        Err(e) => Err(e),
    };
    if let (Some(key), Err(_)) = (&key, &outcome) {
        store.release_idempotency(key, id).await.map_err(|e| ApiError::Store(e, retry))?;
    }
    outcome
}

/// A cache hit answered at once, as a finished job, without touching the broker.
async fn cached(
    state: &AppState,
    id: JobId,
    s: &Submission,
    idempotency_key: Option<&str>,
) -> Result<Option<JobRecord>, ApiError> {
    let Some(key) = &s.cache_key else { return Ok(None) };
    let output = match state.backend.cache.get(key).await {
        Ok(Some(output)) => output,
        Ok(None) => {
            events::cache_lookup(&s.spec_name, "miss");
            return Ok(None);
        }
        Err(e) => {
            // The cache is an optimisation: when it is down, jobs simply run.
            events::cache_unavailable(&e);
            return Ok(None);
        }
    };
    let Ok(output) = serde_json::from_str::<Value>(&output) else { return Ok(None) };
    let now = now_millis();
    let mut record = JobRecord::queued(id, s.spec_name.clone(), now, s.metadata.clone());
    record.status = JobStatus::Succeeded;
    record.started_at = Some(now);
    record.completed_at = Some(now);
    record.output = Some(output);
    // A hit in a cache shared across tenants may be another tenant's result: it is not said.
    record.cached = !s.shared_cache;
    record.webhook = s.webhook.clone();
    record.tenant = s.tenant.clone();
    let how = Creation { envelope: None, idempotency_key };
    state.backend.store.insert(&record, &how).await.map_err(|e| ApiError::Store(e, state.config.retry_after))?;
    events::cache_hit(id, &s.spec_name);
    record.derive_metrics();
    Ok(Some(record))
}

/// Records and publishes the job — or attaches it to an identical job in flight, which then
/// completes both. Only a job the broker confirmed (or that follows one whose message the broker
/// confirmed) gets an id out.
async fn accept(state: &AppState, id: JobId, s: Submission, key: Option<&str>) -> Result<JobRecord, ApiError> {
    let began = std::time::Instant::now();
    let retry = state.config.retry_after;
    let store = &state.backend.store;
    let created_at = now_millis();
    let deadline = s.deadline.map(|d| created_at + d.as_millis() as i64);
    let cancel_at = s.finish_within.map(|d| created_at + d.as_millis() as i64);
    let mut record = JobRecord::queued(id, s.spec_name.clone(), created_at, s.metadata.clone());
    record.deadline_at = deadline;
    record.cancel_at = cancel_at;
    record.webhook = s.webhook.clone();
    record.traceparent = kiln_common::telemetry::current_traceparent();
    record.tenant = s.tenant.clone();
    let mut envelope = Envelope::new(id, s.spec_name.clone(), s.input, created_at, deadline);
    envelope.cache_key = s.cache_key.clone();
    envelope.cancel_at = cancel_at;
    // What a rebuilt record needs, should the store lose this one.
    envelope.metadata = s.metadata;
    envelope.webhook =
        s.webhook.map(|w| kiln_proto::EnvelopeWebhook { url: w.url, events: w.events, prediction: w.prediction });
    envelope.traceparent = record.traceparent.clone();
    envelope.tenant = s.tenant;
    let text = serde_json::to_string(&envelope).map_err(|e| ApiError::Internal(format!("encoding envelope: {e}")))?;
    let lane = Lane::of(&envelope);
    let how = Creation { envelope: Some(&text), idempotency_key: key };
    match &s.cache_key {
        // A deadline is the job's own: such jobs neither lead nor follow.
        Some(cache_key) if deadline.is_none() => {
            // A twin whose message is a moment from being confirmed is worth a short wait: a
            // burst of identical requests then runs once. Past the wait, this job leads.
            let hold_off_until = tokio::time::Instant::now() + COALESCE_WAIT;
            let mut pause = Duration::from_millis(1);
            let role = loop {
                let hold_off = tokio::time::Instant::now() < hold_off_until;
                match store.create_coalesced(&record, cache_key, &how, hold_off).await {
                    Ok(Coalesced::Pending(_)) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                    other => break other.map_err(|e| ApiError::Store(e, retry))?,
                }
            };
            if let Coalesced::Follower(leader) = role {
                events::coalesced(id, leader);
                events::cache_lookup(&s.spec_name, "coalesced");
                confirmed(state, id, key).await;
                return Ok(record);
            }
        }
        _ => store.insert(&record, &how).await.map_err(|e| ApiError::Store(e, retry))?,
    }
    if let Err(e) = state.backend.broker.publish(&lane, text.into_bytes()).await {
        withdraw(state, id).await;
        return Err(ApiError::Broker(e, retry));
    }
    confirmed(state, id, key).await;
    events::job_accepted(id, &s.spec_name, began.elapsed());
    Ok(record)
}

/// Tells the store the job's message is enqueued. Best effort: the job runs either way, and its
/// first start marks it confirmed too.
async fn confirmed(state: &AppState, id: JobId, key: Option<&str>) {
    if let Err(e) = state.backend.store.confirm(id, key).await {
        events::confirm_not_recorded(id, &e);
    }
}

/// Withdraws a job whose publish failed, so it never runs after its client was told 503. A store
/// that fails too is tried again a few times; past that, the record stays unconfirmed and the
/// sweeper finds it.
async fn withdraw(state: &AppState, id: JobId) {
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=DISCARD_TRIES {
        if state.backend.store.discard(id).await.is_ok() {
            events::enqueue_rolled_back(id, true);
            return;
        }
        if attempt < DISCARD_TRIES {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    events::enqueue_rolled_back(id, false);
}

/// Claims the idempotency key for `id`. Returns the job that already holds it, if any; waits a
/// little for a concurrent request with the same key to finish accepting its job.
async fn claim(state: &AppState, key: &str, fingerprint: &str, id: JobId) -> Result<Option<JobId>, ApiError> {
    let retry = state.config.retry_after;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut pause = Duration::from_millis(5);
    loop {
        let claim = state
            .backend
            .store
            .claim_idempotency(key, fingerprint, id, IDEMPOTENCY_PENDING, state.config.idempotency_ttl)
            .await
            .map_err(|e| ApiError::Store(e, retry))?;
        match claim {
            Claim::Claimed => return Ok(None),
            Claim::Held { fingerprint: fp, .. } if fp != fingerprint => {
                return Err(ApiError::IdempotencyKeyReused(key.to_owned()));
            }
            Claim::Held { job, committed: true, .. } => return Ok(Some(job)),
            Claim::Held { .. } if tokio::time::Instant::now() >= deadline => {
                return Err(ApiError::IdempotencyKeyInFlight(key.to_owned(), retry));
            }
            // The holder is still publishing: it will commit, or release so this one can claim.
            Claim::Held { .. } => tokio::time::sleep(pause).await,
        }
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[derive(serde::Deserialize)]
pub struct GetParams {
    wait: Option<u64>,
}

/// A job's record
#[utoipa::path(get, path = "/v1/jobs/{id}", operation_id = "get_job", tag = "jobs",
    params(
        ("id" = kiln_proto::JobId, Path, description = "The job's id."),
        ("wait" = Option<u64>, Query, description = "Long-poll: return as soon as the job finishes, or after this many seconds."),
    ),
    responses(
        (status = 200, description = "The record", body = kiln_proto::JobRecord),
        (status = 404, description = "job_not_found; not_found for a path parameter that is not UTF-8", body = kiln_proto::ApiErrorBody),
        (status = 422, description = "invalid_request: a malformed query parameter (wait not a whole number of seconds, or given twice)", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable, or overloaded: the gateway's long-polls are all taken (KILN_MAX_WAITERS)", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<GetParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (Path(id), Query(params)) = (id?, params?);
    let job_id: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let wait = params.wait.map(|w| Duration::from_secs(w.min(state.config.max_wait_s)));
    let record = visible(&state, &who, job_id).await?.ok_or(ApiError::JobNotFound(id))?;
    respond(&state, &who, record, wait, false).await
}

/// Answers with `record`, after waiting for it to finish when asked to.
async fn respond(
    state: &AppState,
    who: &Principal,
    record: JobRecord,
    wait: Option<Duration>,
    as_submit: bool,
) -> Result<Response, ApiError> {
    let record = settle(state, who, record, wait, as_submit).await?;
    let resp = if as_submit { job_response(record) } else { Json(record).into_response() };
    Ok(match wait {
        Some(w) if as_submit => with_wait_applied(resp, w),
        _ => resp,
    })
}

/// `record` as `who` may see it, once it finished or `wait` passed (when asked to wait). A
/// long-poll (`as_submit` false) that finds every slot taken is refused; a submit is not.
pub(crate) async fn settle(
    state: &AppState,
    who: &Principal,
    record: JobRecord,
    wait: Option<Duration>,
    as_submit: bool,
) -> Result<JobRecord, ApiError> {
    let id = record.id;
    let record = match wait {
        Some(wait) if !record.status.is_terminal() => {
            // A long-poll takes a slot of the gateway's bound, or is answered 503 at once; a
            // submit that found its job already there answers with the job as it is.
            let slot = match crate::waiting::waiter(state) {
                Ok(slot) => Some(slot),
                Err(full) if !as_submit => return Err(full),
                Err(_) => None,
            };
            let mut rx = state.backend.store.subscribe(id).await;
            // Re-read after subscribing, so a completion in between is not missed.
            let now = current(state, id).await?.unwrap_or(record);
            match slot {
                _ if now.status.is_terminal() => now,
                None => now,
                Some(slot) => match slot.completion(state, id, &mut rx, wait).await {
                    Some(r) => r,
                    None => current(state, id).await?.unwrap_or(now),
                },
            }
        }
        _ => record,
    };
    shown(who, record).ok_or_else(|| ApiError::JobNotFound(id.to_string()))
}

/// The record of job `id` as `who` may see it: none for another tenant's job (which then answers
/// 404 like a job that does not exist), and without the webhook URL unless it is `who`'s own.
pub async fn visible(state: &AppState, who: &Principal, id: JobId) -> Result<Option<JobRecord>, ApiError> {
    Ok(current(state, id).await?.and_then(|r| shown(who, r)))
}

/// `record` as `who` may see it (see [`visible`]).
pub fn shown(who: &Principal, mut record: JobRecord) -> Option<JobRecord> {
    if !who.sees(record.tenant.as_deref()) {
        return None;
    }
    if !who.owns(record.tenant.as_deref())
        && let Some(w) = record.webhook.as_mut()
    {
        w.url = "(another tenant's)".into();
    }
    Some(record)
}

/// The record, with a queued job whose deadline passed before it ever started reported (and
/// stored) as expired.
pub async fn current(state: &AppState, id: JobId) -> Result<Option<JobRecord>, ApiError> {
    let retry = state.config.retry_after;
    let store = &state.backend.store;
    let Some(record) = store.get(id).await.map_err(|e| ApiError::Store(e, retry))? else { return Ok(None) };
    if overdue(&record, now_millis()) {
        store.expire_if_due(id).await.map_err(|e| ApiError::Store(e, retry))?;
        return store.get(id).await.map_err(|e| ApiError::Store(e, retry));
    }
    Ok(Some(record))
}

/// A queued job whose deadline passed before it ever started: it is expired, once stored so.
pub fn overdue(record: &JobRecord, now: kiln_proto::UnixMillis) -> bool {
    record.status == JobStatus::Queued && record.attempts == 0 && record.deadline_at.is_some_and(|d| d < now)
}

/// Cancel a queued or running job
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", operation_id = "cancel_job", tag = "jobs",
    params(
        ("id" = kiln_proto::JobId, Path, description = "The job's id."),
    ),
    responses(
        (status = 200, description = "Canceled", body = kiln_proto::JobRecord),
        (status = 404, description = "job_not_found; not_found for a path parameter that is not UTF-8", body = kiln_proto::ApiErrorBody),
        (status = 409, description = "job_finished: the job is already terminal", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let job_id: JobId = id.parse().map_err(|_| ApiError::JobNotFound(id.clone()))?;
    let retry = state.config.retry_after;
    // Another tenant's job is not there to cancel.
    visible(&state, &who, job_id).await?.ok_or_else(|| ApiError::JobNotFound(id.clone()))?;
    match state.backend.store.cancel(job_id).await.map_err(|e| ApiError::Store(e, retry))? {
        Transition::Applied => {
            events::job_canceled(job_id);
            let record = visible(&state, &who, job_id).await?.ok_or(ApiError::JobNotFound(id))?;
            Ok(Json(record).into_response())
        }
        Transition::AlreadyTerminal(status) | Transition::NotApplicable(status) => {
            Err(ApiError::JobFinished(id, status.as_str()))
        }
        Transition::Missing | Transition::Superseded => Err(ApiError::JobNotFound(id)),
    }
}

/// `202` + `Location` for a job still on its way, `200` for a finished one.
fn job_response(record: JobRecord) -> Response {
    let status = if record.status.is_terminal() { StatusCode::OK } else { StatusCode::ACCEPTED };
    let location = format!("/v1/jobs/{}", record.id);
    (status, [(header::LOCATION, location)], Json(record)).into_response()
}

fn with_wait_applied(mut resp: Response, wait: Duration) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("wait={}", wait.as_secs())) {
        resp.headers_mut().insert("preference-applied", v);
    }
    resp
}

/// `Prefer: wait=N` (RFC 7240), capped.
pub(crate) fn prefer_wait(headers: &HeaderMap, max_s: u64) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            (k.trim().eq_ignore_ascii_case("wait")).then(|| v.trim().trim_matches('"').parse::<u64>().ok()).flatten()
        })
        .map(|s| Duration::from_secs(s.min(max_s)))
}

/// `Cancel-After: <seconds>`: a deadline given as a header.
fn cancel_after(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get("cancel-after") else { return Ok(None) };
    let secs = v.to_str().ok().and_then(|s| s.trim().parse::<f64>().ok()).filter(|s| *s > 0.0 && *s <= MAX_DEADLINE_S);
    secs.map(|s| Some(Duration::from_secs_f64(s)))
        .ok_or_else(|| invalid("Cancel-After", format!("must be a number of seconds in (0, {MAX_DEADLINE_S}]")))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let key = v.to_str().map_err(|_| invalid("Idempotency-Key", "must be printable ASCII"))?.trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(invalid("Idempotency-Key", format!("must be 1 to {MAX_IDEMPOTENCY_KEY} characters")));
    }
    Ok(Some(key.to_owned()))
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(ct.to_owned()))
    }
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest { field: field.to_owned(), message: message.into() }
}

const FIELDS: [&str; 7] = ["model", "input", "metadata", "deadline_s", "webhook", "webhook_events", "cache"];

/// Reads a job request: parsed, its binary inputs resolved to stored references (the one step
/// that does I/O: fetching, the input store, decoding), then validated.
async fn prepare(state: &AppState, who: &Principal, body: &[u8]) -> Result<Submission, ApiError> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    // serde_json's maps are ordered, so this text is canonical: the same request, the same hash.
    // It is the request as sent, so an idempotent repeat names its inputs the way it did first.
    let fingerprint = hex::encode(Sha256::digest(value.to_string().as_bytes()));
    crate::inputs::resolve(state, who, &mut value).await?;
    validate(state, value, fingerprint, who.tenant.as_deref())
}

fn validate(state: &AppState, value: Value, fingerprint: String, tenant: Option<&str>) -> Result<Submission, ApiError> {
    let Value::Object(mut obj) = value else {
        return Err(invalid("body", format!("must be a JSON object, got {}", json_type(&value))));
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(unknown, format!("unknown field; accepted fields are {}", FIELDS.join(", "))));
    }
    let model = match obj.remove("model") {
        Some(Value::String(m)) => m,
        Some(other) => return Err(invalid("model", format!("must be a string, got {}", json_type(&other)))),
        None => return Err(invalid("model", "missing; name a model from GET /v1/models")),
    };
    let spec = state.models.get(&model).ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    let input = obj.remove("input").ok_or_else(|| invalid("input", "missing"))?;
    // The canonical input goes on the queue: defaults filled in, and for images the seed drawn
    // here, so every attempt of the job draws the same images.
    let input = match spec.task {
        Task::Embedding => EmbeddingInput::parse(&input, &spec.limits).map_err(ApiError::InvalidInput)?.to_value(),
        Task::ImageGeneration => {
            let parsed =
                ImageGenerationInput::parse(&input, &spec.limits, random_seed).map_err(ApiError::InvalidInput)?;
            if parsed.moderate && spec.moderation.is_none() {
                return Err(ApiError::InvalidInput(kiln_proto::InputError::new(
                    "input.moderate",
                    format!("model {} has no moderation model ([moderation] in its kiln.toml)", spec.name),
                )));
            }
            canonical(Ok(parsed))?
        }
        Task::TextToImage => canonical(TextToImageInput::parse(&input, &spec.limits, random_seed))?,
        Task::Ocr => canonical(kiln_proto::OcrInput::parse(&input))?,
        Task::ImageModeration => canonical(kiln_proto::ModerationInput::parse(&input))?,
        Task::SpeechSegments => canonical(kiln_proto::SpeechSegmentsInput::parse(&input))?,
    };
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) => {
            if m.to_string().len() > MAX_METADATA_BYTES {
                return Err(invalid("metadata", format!("is larger than {MAX_METADATA_BYTES} bytes")));
            }
            Some(m)
        }
        Some(other) => return Err(invalid("metadata", format!("must be an object, got {}", json_type(&other)))),
    };
    let deadline = match obj.remove("deadline_s") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(secs) if secs > 0.0 && secs <= MAX_DEADLINE_S => Some(Duration::from_secs_f64(secs)),
            _ => {
                return Err(invalid(
                    "deadline_s",
                    format!("must be a number of seconds in (0, {MAX_DEADLINE_S}], got {n}"),
                ));
            }
        },
        Some(other) => {
            return Err(invalid("deadline_s", format!("must be a number of seconds, got {}", json_type(&other))));
        }
    };
    let webhook = webhook(state, obj.remove("webhook"), obj.remove("webhook_events"))?;
    let use_cache = match obj.remove("cache") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(invalid("cache", format!("must be a boolean, got {}", json_type(&other)))),
    };
    // Outputs that are files belong to their job (their URLs name it), so such jobs always run;
    // their seeds make them reproducible instead.
    // Cached results (and coalescing onto an identical job in flight) stay within a tenant,
    // unless the model shares its cache.
    let shared_cache = spec.shared_cache;
    let cache_key = (use_cache && state.backend.cache.enabled() && !spec.task.produces_files()).then(|| {
        let key = cache::key(spec.name.as_str(), &spec.version, &input);
        tenant_scoped(tenant.filter(|_| !shared_cache), key)
    });
    Ok(Submission {
        spec_name: spec.name.clone(),
        input,
        metadata,
        deadline,
        finish_within: None,
        webhook,
        fingerprint,
        cache_key,
        shared_cache,
        tenant: tenant.map(str::to_owned),
    })
}

fn canonical<T: serde::Serialize>(parsed: Result<T, kiln_proto::InputError>) -> Result<Value, ApiError> {
    let parsed = parsed.map_err(ApiError::InvalidInput)?;
    serde_json::to_value(parsed).map_err(|e| ApiError::Internal(format!("encoding input: {e}")))
}

/// A seed for a job that gave none: 32 bits, so it is easy to read back and type.
fn random_seed() -> u64 {
    u64::from(rand::random::<u32>())
}

fn webhook(state: &AppState, url: Option<Value>, events: Option<Value>) -> Result<Option<WebhookState>, ApiError> {
    let url = match url {
        None | Some(Value::Null) => {
            if events.is_some_and(|e| !e.is_null()) {
                return Err(invalid("webhook_events", "given without a webhook"));
            }
            return Ok(None);
        }
        Some(Value::String(u)) => u,
        Some(other) => return Err(invalid("webhook", format!("must be a URL string, got {}", json_type(&other)))),
    };
    if state.config.webhooks.webhook_secret.is_none() {
        return Err(invalid("webhook", "webhooks are not configured on this server (KILN_WEBHOOK_SECRET is unset)"));
    }
    let url =
        webhooks::check_url(&url, &state.config.webhooks.webhook_allowed_hosts).map_err(|e| invalid("webhook", e.0))?;
    let mut wanted = vec!["completed".to_owned()];
    match events {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, e) in list.iter().enumerate() {
                match e.as_str() {
                    Some(name) if WEBHOOK_EVENTS.contains(&name) => {
                        if !wanted.iter().any(|w| w == name) {
                            wanted.push(name.to_owned());
                        }
                    }
                    _ => {
                        return Err(invalid(
                            &format!("webhook_events[{i}]"),
                            format!("must be one of {}, got {e}", WEBHOOK_EVENTS.join(", ")),
                        ));
                    }
                }
            }
        }
        Some(other) => return Err(invalid("webhook_events", format!("must be an array, got {}", json_type(&other)))),
    }
    Ok(Some(WebhookState { url: url.to_string(), events: wanted, ..Default::default() }))
}
