//! `GET /v1/jobs`: the caller's jobs, newest first, a page at a time (`limit`, `cursor`), filtered
//! by `status`, `model` and `created_after`. Each record is what `GET /v1/jobs/{id}` answers for
//! it; a tenant's key lists its tenant's jobs, an admin's every tenant's (or `tenant`'s). The
//! predictions list (`routes::predictions::list`) is the same pages in Replicate's shape.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use kiln_common::store::{ListCursor, ListQuery, MAX_LIMIT};
use kiln_proto::{JobRecord, JobStatus, ModelName, UnixMillis, now_millis};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::jobs::{current, overdue, shown};
use crate::state::AppState;

/// Records on a page when `limit` is not given.
const DEFAULT_LIMIT: usize = 20;

/// The query string as given; each parameter is checked below, so a bad one is named. An empty
/// value is the same as none (`?status=&limit=10`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    #[param(value_type = Option<kiln_proto::JobStatus>)]
    status: Option<String>,
    #[param(value_type = Option<String>)]
    model: Option<String>,
    /// Jobs created strictly after this time: RFC 3339, or unix milliseconds.
    #[param(example = "2026-12-01T10:00:00Z")]
    created_after: Option<String>,
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100, default = 20)]
    limit: Option<String>,
    /// next_cursor of the previous page, as it was given.
    cursor: Option<String>,
    /// Admin keys: list only this tenant's jobs.
    tenant: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Page {
    pub data: Vec<JobRecord>,
    pub next_cursor: Option<String>,
}

/// List jobs, newest first
///
/// The caller's jobs (a tenant's key: its tenant's; an admin key: every tenant's, or tenant's),
/// newest first by created_at, a page at a time: pass next_cursor back as cursor until it is null.
/// Jobs created after the first page never show up in later pages; none is listed twice. Each
/// record is what GET /v1/jobs/{id} answers. A page looks at a bounded number of jobs, so a
/// selective filter can answer a short (even empty) page with a next_cursor. An empty parameter is
/// the same as none.
#[utoipa::path(get, path = "/v1/jobs", operation_id = "list_jobs", tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, description = "A page of jobs", body = super::openapi::JobList),
        (status = 422, description = "invalid_request: the message names the parameter (status, model, created_after, limit, cursor, tenant; query for one given twice or not UTF-8)", body = kiln_proto::ApiErrorBody),
        (status = 503, description = "store_unavailable", body = kiln_proto::ApiErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(p) = params?;
    page(&state, &who, p).await.map(Json)
}

/// One page of the jobs `who` may list, as `p` asks.
pub async fn page(state: &AppState, who: &Principal, p: ListParams) -> Result<Page, ApiError> {
    let given = |v: Option<String>| v.filter(|v| !v.is_empty());
    let requested = given(p.tenant).map(|t| check_tenant(&t).map(|()| t)).transpose()?;
    let query = ListQuery {
        tenant: who.lists(requested)?,
        status: given(p.status).map(|s| parse_status(&s)).transpose()?,
        model: given(p.model).map(|m| ModelName::new(m).map_err(|e| invalid("model", e.to_string()))).transpose()?,
        created_after: given(p.created_after).map(|t| parse_time(&t)).transpose()?,
        cursor: given(p.cursor)
            .map(|c| c.parse::<ListCursor>().map_err(|e| invalid("cursor", e.to_string())))
            .transpose()?,
        limit: given(p.limit).map_or(Ok(DEFAULT_LIMIT), |l| parse_limit(&l))?,
    };
    let retry = state.config.retry_after;
    let page = state.backend.store.list(&query).await.map_err(|e| ApiError::Store(e, retry))?;
    let now = now_millis();
    let mut data = Vec::with_capacity(page.records.len());
    for record in page.records {
        // As `GET /v1/jobs/{id}` would answer: a queued job past its deadline is expired now.
        let record = if overdue(&record, now) { current(state, record.id).await? } else { Some(record) };
        if let Some(r) = record.filter(|r| query.matches(r)).and_then(|r| shown(who, r)) {
            data.push(r);
        }
    }
    Ok(Page { data, next_cursor: page.next.map(|c| c.to_string()) })
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest { field: field.to_owned(), message: message.into() }
}

fn check_tenant(tenant: &str) -> Result<(), ApiError> {
    kiln_common::tenancy::check_tenant(tenant).map_err(|e| invalid("tenant", e.to_string()))
}

fn parse_status(s: &str) -> Result<JobStatus, ApiError> {
    JobStatus::parse(s)
        .ok_or_else(|| invalid("status", "must be one of queued, running, succeeded, failed, canceled, expired"))
}

fn parse_limit(s: &str) -> Result<usize, ApiError> {
    s.parse::<usize>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| invalid("limit", format!("must be a whole number from 1 to {MAX_LIMIT}")))
}

/// RFC 3339 (`2026-12-01T10:00:00Z`), or unix milliseconds.
fn parse_time(s: &str) -> Result<UnixMillis, ApiError> {
    let bad = || invalid("created_after", "must be an RFC 3339 time (2026-12-01T10:00:00Z) or unix milliseconds");
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<UnixMillis>().map_err(|_| bad());
    }
    let t = time::OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?;
    UnixMillis::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_unix_millis() {
        assert_eq!(parse_time("1733011200000").unwrap(), 1_733_011_200_000);
        assert_eq!(parse_time("2024-12-01T00:00:00Z").unwrap(), 1_733_011_200_000);
        assert_eq!(parse_time("2024-12-01T01:00:00.5+01:00").unwrap(), 1_733_011_200_500);
        for bad in ["yesterday", "-1", "1.5", "2024-12-01", "99999999999999999999999"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_are_one_to_a_hundred() {
        assert_eq!(parse_limit("1").unwrap(), 1);
        assert_eq!(parse_limit("100").unwrap(), 100);
        for bad in ["0", "101", "-1", "ten", "1e2"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }
}
