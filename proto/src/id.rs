//! Identifier newtypes: job ids (random, unguessable) and validated model names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A job id: a random UUID v4 (122 random bits), so ids cannot be guessed or enumerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = uuid::Uuid))]
#[serde(transparent)]
pub struct JobId(uuid::Uuid);

impl JobId {
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::try_parse(s).map(Self)
    }
}

/// A model name: 1–64 characters of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or digit.
/// The same string names the model's folder, its queue and its routing key, so it is kept strict.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9._-]{0,63}$"))]
#[serde(transparent)]
pub struct ModelName(String);

#[derive(Debug, thiserror::Error)]
#[error("model name {0:?} must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
pub struct ModelNameError(pub String);

impl ModelName {
    pub fn new(name: impl Into<String>) -> Result<Self, ModelNameError> {
        let name = name.into();
        let ok = (1..=64).contains(&name.len())
            && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
        if ok { Ok(Self(name)) } else { Err(ModelNameError(name)) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ModelName::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_strict() {
        assert!(ModelName::new("all-minilm-l6-v2").is_ok());
        assert!(ModelName::new("a").is_ok());
        for bad in ["", "-x", "Upper", "a/b", "a b", &"x".repeat(65)] {
            assert!(ModelName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn job_ids_round_trip_and_differ() {
        let a = JobId::random();
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
        assert_ne!(a, JobId::random());
        assert!("not-a-uuid".parse::<JobId>().is_err());
    }
}
