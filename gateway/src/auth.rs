//! Who is calling and whether they may: the `guard` middleware authenticates the API key
//! (through a cache of at most `KEY_CACHE_TTL`, so a revocation reaches every gateway within a
//! second), checks the route's scope, takes one request from the tenant's rate, and hands the
//! handlers a `Principal`. The `audit` middleware around it records every call, allowed or not,
//! with what `guard` learnt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_common::audit::{Decision, NewEntry};
use kiln_common::tenancy::{self, ApiKey, Limits, Scope};
use kiln_proto::now_millis;

use crate::config::{AuthMode, MetricsAuth};
use crate::error::{ApiError, Limited, RateHeaders, Unauthorized};
use crate::state::AppState;

/// How long a key (or its absence) is trusted before it is read again.
const KEY_CACHE_TTL: Duration = Duration::from_millis(500);
/// Keys cached at most; past it the cache starts over.
const KEY_CACHE_ENTRIES: usize = 10_000;

/// The caller of a request, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// None on an open gateway (`KILN_AUTH=off`).
    pub tenant: Option<String>,
    admin: bool,
    /// The limits that apply: the key's, over its tenant's, over the defaults.
    pub limits: Limits,
}

impl Principal {
    /// Everyone, on an open gateway: every scope, no tenant, no limits.
    fn open() -> Self {
        Self { tenant: None, admin: true, limits: Limits::default() }
    }

    /// Whether a job of `tenant` exists for this caller at all (others get 404).
    pub fn sees(&self, tenant: Option<&str>) -> bool {
        self.admin || self.tenant.as_deref() == tenant
    }

    /// Whose jobs this caller's listing shows, given the `tenant` it asked for: `None` for every
    /// tenant's. An admin (everyone, on an open gateway) lists every tenant's or the one asked
    /// for; anyone else lists their own tenant's, and asking for another's is forbidden.
    pub fn lists(&self, tenant: Option<String>) -> Result<Option<String>, ApiError> {
        if self.admin {
            return Ok(tenant);
        }
        match (&self.tenant, tenant) {
            (Some(own), None) => Ok(Some(own.clone())),
            (Some(own), Some(asked)) if *own == asked => Ok(Some(asked)),
            (Some(_) | None, _) => Err(ApiError::Forbidden(Scope::Admin)),
        }
    }

    /// Whether a job of `tenant` is this caller's own (an admin sees others' jobs, not their
    /// webhook URLs).
    pub fn owns(&self, tenant: Option<&str>) -> bool {
        self.tenant.as_deref() == tenant
    }
}

/// What `guard` decided, left on the response for `audit`.
#[derive(Debug, Clone, Default)]
struct Verdict {
    key_id: Option<String>,
    tenant: Option<String>,
    route: Option<String>,
    reason: Option<&'static str>,
}

/// A key and its tenant's limits, as read from the key store.
type Found = Option<(ApiKey, Limits)>;

/// Keys as last read (and when), per public id.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (Instant, Found)>>,
}

impl KeyCache {
    /// The key with this id and its tenant's limits, at most `KEY_CACHE_TTL` old.
    async fn lookup(&self, state: &AppState, id: &str) -> Result<Found, ApiError> {
        let cached = self.lock().get(id).filter(|(at, _)| at.elapsed() < KEY_CACHE_TTL).map(|(_, hit)| hit.clone());
        if let Some(hit) = cached {
            return Ok(hit);
        }
        let keys = &state.backend.keys;
        let retry = state.config.retry_after;
        let found = match keys.get(id).await.map_err(|e| ApiError::Keys(e, retry))? {
            Some(key) => {
                let limits = keys.tenant_limits(&key.tenant).await.map_err(|e| ApiError::Keys(e, retry))?;
                Some((key, limits))
            }
            None => None,
        };
        let mut entries = self.lock();
        if entries.len() >= KEY_CACHE_ENTRIES {
            entries.clear();
        }
        entries.insert(id.to_owned(), (Instant::now(), found.clone()));
        Ok(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Found)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The scope a route needs; none for the open ones.
fn required(state: &AppState, method: &Method, route: &str) -> Option<Scope> {
    match route {
        "/healthz" | "/readyz" | "/openapi.json" => None,
        "/metrics" => (state.config.metrics_auth == MetricsAuth::Admin).then_some(Scope::Admin),
        // The unversioned aliases need what their `/v1` routes need.
        "/v1/jobs"
        | "/v1/jobs/{id}/cancel"
        | "/jobs"
        | "/jobs/{id}/cancel"
        | "/v1/embeddings"
        | "/v1/predictions"
        | "/v1/predictions/{id}/cancel"
        | "/v1/models/{owner}/{name}/predictions"
            if method == Method::POST =>
        {
            Some(Scope::JobsSubmit)
        }
        // Files are inputs of jobs: reading and deleting them takes what submitting does.
        "/v1/files" | "/v1/files/{id}" | "/v1/files/{id}/content" => Some(Scope::JobsSubmit),
        _ => Some(Scope::JobsRead),
    }
}

/// Authenticates, authorises and rate-limits a routed request.
pub async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let mut verdict = Verdict { route: route.clone(), ..Verdict::default() };
    let decided = match required(&state, req.method(), route.as_deref().unwrap_or("")) {
        None => Ok((Principal::open(), None)),
        Some(_) if state.config.auth == AuthMode::Off => Ok((Principal::open(), None)),
        Some(scope) => admit(&state, req.headers(), scope, &mut verdict).await,
    };
    let mut resp = match decided {
        Ok((principal, headers)) => {
            req.extensions_mut().insert(principal);
            let mut resp = next.run(req).await;
            // A handler's own limit (a quota it refused on) speaks for itself.
            if let Some(h) = headers.filter(|_| !resp.headers().contains_key("ratelimit-policy")) {
                h.apply(resp.headers_mut());
            }
            resp
        }
        Err(e) => {
            verdict.reason.get_or_insert(reason_of(&e));
            e.into_response()
        }
    };
    resp.extensions_mut().insert(verdict);
    resp
}

fn reason_of(e: &ApiError) -> &'static str {
    match e {
        ApiError::Unauthorized(_) => "unauthorized",
        ApiError::Forbidden(_) => "forbidden",
        ApiError::RateLimited(_) => "rate_limited",
        ApiError::QuotaExceeded(_) => "quota_exceeded",
        _ => "unavailable",
    }
}

/// The key's principal, and the rate headers to answer with; or why not.
async fn admit(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    scope: Scope,
    verdict: &mut Verdict,
) -> Result<(Principal, Option<RateHeaders>), ApiError> {
    let header = headers.get(header::AUTHORIZATION).ok_or(ApiError::Unauthorized(Unauthorized::Missing))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized(Unauthorized::Malformed))?;
    let id = tenancy::token_id(token).ok_or(ApiError::Unauthorized(Unauthorized::Malformed))?;
    verdict.key_id = Some(id.to_owned());
    let (key, tenant_limits) = state
        .keys
        .lookup(state, id)
        .await?
        .filter(|(key, _)| tenancy::matches(key, token) && key.live(now_millis()))
        .ok_or(ApiError::Unauthorized(Unauthorized::Invalid))?;
    verdict.tenant = Some(key.tenant.clone());
    if !key.allows(scope) {
        return Err(ApiError::Forbidden(scope));
    }
    let limits = key.limits.or(tenant_limits).or(state.config.limits.as_limits());
    let headers = match limits.rate {
        Some(rate) => {
            // A key with a rate of its own has its own bucket; the others share their tenant's.
            let bucket =
                if key.limits.rate.is_some() { format!("key:{}", key.id) } else { format!("tenant:{}", key.tenant) };
            let burst = limits.burst.unwrap_or(1).max(1);
            let d = state
                .backend
                .limiter
                .rate(&bucket, rate, burst)
                .await
                .map_err(|e| ApiError::Store(e, state.config.retry_after))?;
            let window = (f64::from(burst) / rate).ceil().max(1.0) as u64;
            let headers = RateHeaders {
                policy: format!("\"requests\";q={burst};w={window}"),
                state: format!("\"requests\";r={};t={}", d.remaining, d.reset.as_millis().div_ceil(1000)),
            };
            if !d.allowed {
                return Err(ApiError::RateLimited(Limited {
                    message: format!("tenant {} is over its rate of {rate} requests/s (burst {burst})", key.tenant),
                    retry_after: d.retry_after,
                    headers,
                }));
            }
            Some(headers)
        }
        None => None,
    };
    let principal = Principal { tenant: Some(key.tenant.clone()), admin: key.allows(Scope::Admin), limits };
    Ok((principal, headers))
}

/// Records every call in the audit log: who, what, the body's SHA-256 (never the body), the
/// decision and the status. A no-op when the log is off.
pub async fn audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.audit.is_enabled() {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let (parts, body) = req.into_parts();
    // Hashing needs the whole body: read no more of it than the route accepts (an upload's bound
    // on the upload route, the JSON bodies' everywhere else, so no JSON route buffers an upload's
    // worth of bytes before refusing it).
    let limit = if path == "/v1/files" {
        state.config.max_body_bytes.max(state.max_file_bytes.saturating_add(crate::routes::UPLOAD_FRAMING))
    } else {
        state.config.max_body_bytes
    };
    let (resp, digest) = match axum::body::to_bytes(body, limit.saturating_add(1)).await {
        Ok(bytes) => {
            let digest = (!bytes.is_empty()).then(|| kiln_common::audit::body_sha256(&bytes));
            (next.run(Request::from_parts(parts, Body::from(bytes))).await, digest)
        }
        Err(_) => {
            let mut resp = ApiError::PayloadTooLarge { limit }.into_response();
            resp.extensions_mut().insert(Verdict { reason: Some("payload_too_large"), ..Verdict::default() });
            (resp, None)
        }
    };
    let verdict = resp.extensions().get::<Verdict>().cloned().unwrap_or_default();
    let job_id = job_in_path(&path)
        .or_else(|| resp.headers().get(header::LOCATION).and_then(|l| l.to_str().ok()).and_then(job_in_path));
    let status = resp.status();
    // A handler's own refusal over a quota (jobs in flight, compute) is a denial too.
    let reason = verdict.reason.or((status == axum::http::StatusCode::TOO_MANY_REQUESTS).then_some("quota_exceeded"));
    state.audit.record(NewEntry {
        key_id: verdict.key_id,
        tenant: verdict.tenant,
        method,
        // The route pattern; the path itself when the router never matched one.
        route: verdict.route.unwrap_or(path),
        job_id,
        body_sha256: digest,
        decision: if reason.is_some() { Decision::Denied } else { Decision::Allowed },
        reason: reason.map(str::to_owned),
        status: status.as_u16(),
    });
    resp
}

/// The job id in `/v1/jobs/{id}…`, its alias `/jobs/{id}…`, or `/v1/predictions/{id}…` (a
/// prediction is a job), or in such an absolute URL.
fn job_in_path(path: &str) -> Option<String> {
    let at = |p: &str| path.find(p).map(|i| &path[i + p.len()..]);
    let rest = at("/v1/jobs/").or_else(|| at("/v1/predictions/")).or_else(|| path.strip_prefix("/jobs/"))?;
    let id = rest.split('/').next()?;
    id.parse::<kiln_proto::JobId>().ok().map(|_| id.to_owned())
}
