//! The job listing's query, page and cursor ([`super::Store::list`]): newest first by
//! `(created_at, id)`, each page read from where the last one stopped.
//!
//! A cursor is a position and a horizon. The position makes pages follow each other with no
//! duplicate and no gap; the horizon (the store's count of jobs ever listed, when the first page
//! was read) keeps jobs created after the listing began out of its later pages, even one whose
//! `created_at` sorts below the position (a gateway with a slower clock, or a submission that took
//! a while between stamping its time and writing its record). A page examines at most
//! [`MAX_EXAMINED`] entries, however selective its filters: past that it ends early, with a cursor
//! to go on from.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln_proto::{JobId, JobRecord, JobStatus, ModelName, UnixMillis};

/// Most records one page returns.
pub const MAX_LIMIT: usize = 100;
/// Most listing entries one page looks at (records read, filtered out, or found gone).
pub const MAX_EXAMINED: usize = 500;

/// What to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// One tenant's jobs; `None`: every job, of any tenant or none.
    pub tenant: Option<String>,
    pub status: Option<JobStatus>,
    pub model: Option<ModelName>,
    /// Only jobs created strictly after this time.
    pub created_after: Option<UnixMillis>,
    /// Where the previous page stopped; `None` for the first page.
    pub cursor: Option<ListCursor>,
    /// Most records on the page, 1 to [`MAX_LIMIT`] (clamped).
    pub limit: usize,
}

/// One page, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub records: Vec<JobRecord>,
    /// Where the next page starts; `None` when the listing is complete.
    pub next: Option<ListCursor>,
}

/// Where a listing stopped: the last entry it examined, and the horizon of its first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: UnixMillis,
    pub id: JobId,
    /// Jobs listed after this many were (by the store's count) are not part of the listing.
    pub horizon: u64,
}

/// A cursor that is not one of ours (or was altered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor of this listing (pass back next_cursor exactly as it was given)")]
pub struct BadCursor;

/// The version tag inside every cursor, so a later format can be told apart.
const CURSOR_TAG: &str = "c1";

impl fmt::Display for ListCursor {
    /// The opaque text a client passes back: base64url of `c1.<created_at>.<id>.<horizon>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = format!("{CURSOR_TAG}.{}.{}.{}", self.created_at, self.id, self.horizon);
        f.write_str(&URL_SAFE_NO_PAD.encode(text))
    }
}

impl FromStr for ListCursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).map_err(|_| BadCursor)?;
        let text = String::from_utf8(bytes).map_err(|_| BadCursor)?;
        let mut parts = text.split('.');
        let (Some(CURSOR_TAG), Some(created_at), Some(id), Some(horizon), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadCursor);
        };
        let created_at: UnixMillis = created_at.parse().map_err(|_| BadCursor)?;
        if created_at < 0 {
            return Err(BadCursor);
        }
        Ok(Self {
            created_at,
            id: id.parse().map_err(|_| BadCursor)?,
            horizon: horizon.parse().map_err(|_| BadCursor)?,
        })
    }
}

impl ListQuery {
    /// The page size actually used.
    pub fn page_size(&self) -> usize {
        self.limit.clamp(1, MAX_LIMIT)
    }

    /// Whether a record passes the status and model filters.
    pub fn matches(&self, record: &JobRecord) -> bool {
        self.status.is_none_or(|s| s == record.status) && self.model.as_ref().is_none_or(|m| *m == record.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let c = ListCursor { created_at: 1_733_000_000_123, id: JobId::random(), horizon: 42 };
        assert_eq!(c.to_string().parse::<ListCursor>(), Ok(c));
        assert!(!c.to_string().contains(['+', '/', '=']), "URL-safe");
        let forged = |t: &str| URL_SAFE_NO_PAD.encode(t);
        for bad in [
            String::new(),
            "!!".into(),
            "abc".into(),
            forged("c1.1.not-a-uuid.3"),
            forged(&format!("c2.1.{}.3", c.id)),
            forged(&format!("c1.-5.{}.3", c.id)),
            forged(&format!("c1.1.{}.x", c.id)),
            forged(&format!("c1.1.{}.3.4", c.id)),
        ] {
            assert_eq!(bad.parse::<ListCursor>(), Err(BadCursor), "{bad:?}");
        }
    }
}
