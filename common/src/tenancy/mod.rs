//! Who may do what: API keys (`kiln_<id>_<secret>`, kept only as SHA-256 hashes), the tenant and
//! scopes each key grants, and the limits set per key or per tenant. `KeyStore` is where keys
//! live: Redis for a fleet (every gateway sees a revocation on its next lookup), a JSON file for
//! the embedded backend. Enforcing the limits is `quota`'s; checking a request is the gateway's.

pub mod file;
pub mod redis;

use std::collections::BTreeSet;
use std::fmt;

use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use kiln_proto::UnixMillis;

/// Every key starts with this, so a leaked one is easy to recognise (and to scan for).
pub const TOKEN_PREFIX: &str = "kiln_";
/// UUIDs whose bytes make a key's secret part: 244 random bits.
const SECRET_UUIDS: usize = 2;
/// Longest tenant name accepted.
const MAX_TENANT: usize = 64;

/// What a key may do. `admin` implies the others and sees every tenant's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "jobs:submit")]
    JobsSubmit,
    #[serde(rename = "jobs:read")]
    JobsRead,
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::JobsSubmit, Scope::JobsRead, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobsSubmit => "jobs:submit",
            Self::JobsRead => "jobs:read",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits of a tenant (or of one key). A field left out falls back to the next level: key, then
/// tenant, then the gateway's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per second, sustained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Requests allowed at once above the sustained rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Jobs accepted and not yet finished, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Seconds of worker run time per hour (a sliding hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_s_per_hour: Option<f64>,
}

impl Limits {
    /// These limits, with what they leave out taken from `fallback`.
    pub fn or(self, fallback: Limits) -> Limits {
        Limits {
            rate: self.rate.or(fallback.rate),
            burst: self.burst.or(fallback.burst),
            max_in_flight: self.max_in_flight.or(fallback.max_in_flight),
            compute_s_per_hour: self.compute_s_per_hour.or(fallback.compute_s_per_hour),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// A key as stored: everything but its secret, which is kept only as a hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public id: the part of the token after `kiln_` and before the secret. Safe to log.
    pub id: String,
    pub tenant: String,
    pub scopes: BTreeSet<Scope>,
    pub created_at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<UnixMillis>,
    /// Limits of this key alone, over its tenant's.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Hex SHA-256 of the whole token.
    pub hash: String,
}

impl ApiKey {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// Usable now: not revoked, not expired.
    pub fn live(&self, now: UnixMillis) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }

    /// The key, as `kiln keys list` prints it (no hash).
    pub fn listing(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("keys serialise");
        if let Some(o) = v.as_object_mut() {
            o.remove("hash");
        }
        v
    }
}

/// A new key and its token, which is shown once and never stored.
pub struct Issued {
    pub key: ApiKey,
    pub token: String,
}

/// What a new key is for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub tenant: String,
    pub scopes: BTreeSet<Scope>,
    pub expires_at: Option<UnixMillis>,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no key {0:?}")]
    NotFound(String),
    #[error("the key store holds something unreadable: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a key (its hash only).
    async fn put(&self, key: &ApiKey) -> Result<(), KeyError>;
    /// The key with this public id, revoked or not.
    async fn get(&self, id: &str) -> Result<Option<ApiKey>, KeyError>;
    /// Every key, oldest first.
    async fn list(&self) -> Result<Vec<ApiKey>, KeyError>;
    /// Marks the key revoked; it answers 401 from then on, on every gateway.
    async fn revoke(&self, id: &str, at: UnixMillis) -> Result<ApiKey, KeyError>;
    /// The tenant's own limits (none set: empty).
    async fn tenant_limits(&self, tenant: &str) -> Result<Limits, KeyError>;
    async fn set_tenant_limits(&self, tenant: &str, limits: &Limits) -> Result<(), KeyError>;
}

/// Creates a key: a fresh id and secret, stored as a hash; the token is returned once.
pub async fn issue(store: &dyn KeyStore, new: NewKey, now: UnixMillis) -> Result<Issued, KeyError> {
    check_tenant(&new.tenant)?;
    if new.scopes.is_empty() {
        return Err(KeyError::Invalid("a key needs at least one scope".into()));
    }
    // Version-4 UUIDs come from the operating system's CSPRNG (122 random bits each).
    let secret: Vec<u8> = (0..SECRET_UUIDS).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect();
    let id = hex::encode(&uuid::Uuid::new_v4().as_bytes()[..6]);
    let token = format!("{TOKEN_PREFIX}{id}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let key = ApiKey {
        id,
        tenant: new.tenant,
        scopes: new.scopes,
        created_at: now,
        expires_at: new.expires_at,
        revoked_at: None,
        limits: new.limits,
        hash: hash_token(&token),
    };
    store.put(&key).await?;
    Ok(Issued { key, token })
}

/// Tenant names: short, and of characters that are safe in a Redis key and a log line.
pub fn check_tenant(tenant: &str) -> Result<(), KeyError> {
    let ok = !tenant.is_empty()
        && tenant.len() <= MAX_TENANT
        && tenant.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "tenant {tenant:?}: 1 to {MAX_TENANT} characters of letters, digits, '-', '_' and '.'"
        )))
    }
}

/// The public id in a token, if it has the shape of one (`kiln_<12 hex>_<secret>`).
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty()).then_some(id)
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` is the one `key` was issued as; compares in time independent of where the
/// hashes differ.
pub fn matches(key: &ApiKey, token: &str) -> bool {
    let given = hash_token(token);
    given.len() == key.hash.len() && given.bytes().zip(key.hash.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_recognised_and_malformed_tokens_are_not() {
        assert_eq!(token_id("kiln_0123456789ab_secret"), Some("0123456789ab"));
        for bad in
            ["", "kiln_", "kiln_0123456789ab", "kiln_0123456789ab_", "kiln_xyz_secret", "bearer", "kiln_0123456789zz_s"]
        {
            assert_eq!(token_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn limits_fall_back_field_by_field() {
        let key = Limits { rate: Some(5.0), ..Limits::default() };
        let tenant = Limits { rate: Some(1.0), burst: Some(3), ..Limits::default() };
        assert_eq!(key.or(tenant), Limits { rate: Some(5.0), burst: Some(3), ..Limits::default() });
    }

    #[test]
    fn tenant_names_are_checked() {
        assert!(check_tenant("acme-1.prod_x").is_ok());
        for bad in ["", "a b", "a:b", "a/b", &"x".repeat(65)] {
            assert!(check_tenant(bad).is_err(), "{bad:?}");
        }
    }
}
