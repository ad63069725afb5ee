//! Binary inputs (images, audio): how a client gives one, and how it travels once the gateway has
//! it. A client names the bytes in one of four ways ([`MediaSource`]); the gateway resolves every
//! one of them to bytes, checks them, stores them in the input store under their sha256 and puts
//! a [`MediaRef`] in the job's canonical input. So large inputs never ride inside an AMQP message,
//! the same bytes given any way make the same canonical input (and the same cache key), and a
//! worker reads the bytes back by reference.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::task::{InputError, json_type};

/// What kind of bytes a media field takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    /// PNG, JPEG or WebP.
    Image,
    /// WAV (PCM 8/16/24/32-bit integer or 32-bit float, any rate, any channels).
    Audio,
}

impl MediaKind {
    /// The content types accepted, for schemas and error messages.
    pub fn accepted(self) -> &'static [&'static str] {
        match self {
            Self::Image => &["image/png", "image/jpeg", "image/webp"],
            Self::Audio => &["audio/wav"],
        }
    }
}

/// A stored binary input, as it travels in a job's canonical input: `{"sha256", "content_type",
/// "size"}`. The bytes are in the input store under (the job's tenant, `sha256`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MediaRef {
    /// Lower-case hex sha256 of the bytes.
    pub sha256: String,
    /// The sniffed content type (`image/png`, `image/jpeg`, `image/webp`, `audio/wav`).
    pub content_type: String,
    pub size: u64,
}

impl MediaRef {
    /// Reads a canonical reference at `field`; anything else is refused, naming the field.
    pub fn parse(v: &serde_json::Value, field: &str) -> Result<Self, InputError> {
        let parsed: Result<Self, _> = serde_json::from_value(v.clone());
        match parsed {
            Ok(r) if r.sha256.len() == 64 && r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(r),
            _ => Err(InputError::new(
                field,
                "must be a stored input reference {sha256, content_type, size}; the gateway makes it from base64, \
                 a data: URL, file:ID or an https:// URL",
            )),
        }
    }
}

/// How a client gave a binary input, before the gateway resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaSource {
    /// The bytes themselves: base64 (standard or URL-safe, padded or not), or a `data:` URL's
    /// payload with its declared content type.
    Inline { bytes: Vec<u8>, declared: Option<String> },
    /// `file:ID`: a file uploaded with `POST /v1/files`.
    File(String),
    /// An `https://` URL for the gateway to fetch.
    Url(String),
    /// Already resolved (a canonical input sent again, or a job redriven from its envelope).
    Stored(MediaRef),
}

impl MediaSource {
    /// Reads the source given at `field` (`input.image`): a string in one of the four forms, or a
    /// canonical [`MediaRef`] object. `max_bytes` bounds inline bytes before they are decoded.
    pub fn parse(v: &serde_json::Value, field: &str, max_bytes: usize) -> Result<Self, InputError> {
        let s = match v {
            serde_json::Value::String(s) => s.as_str(),
            serde_json::Value::Object(_) => return MediaRef::parse(v, field).map(Self::Stored),
            other => {
                return Err(InputError::new(
                    field,
                    format!(
                        "must be a string (base64, a data: URL, file:ID or an https:// URL), got {}",
                        json_type(other)
                    ),
                ));
            }
        };
        if let Some(id) = s.strip_prefix("file:") {
            if !valid_file_id(id) {
                return Err(InputError::new(field, format!("{s:?} is not a file id from POST /v1/files")));
            }
            return Ok(Self::File(id.to_owned()));
        }
        if s.starts_with("https://") {
            return Ok(Self::Url(s.to_owned()));
        }
        if s.starts_with("http://") {
            return Err(InputError::new(field, "URLs must be https://"));
        }
        let (declared, payload) = match s.strip_prefix("data:") {
            Some(rest) => {
                let (meta, payload) = rest
                    .split_once(',')
                    .ok_or_else(|| InputError::new(field, "a data: URL needs a comma before its payload"))?;
                let Some(mime) = meta.strip_suffix(";base64") else {
                    return Err(InputError::new(field, "a data: URL must be base64 (data:<type>;base64,<payload>)"));
                };
                (Some(mime.to_ascii_lowercase()).filter(|m| !m.is_empty()), payload)
            }
            None => (None, s),
        };
        // Base64 holds 3 bytes in 4 characters: refuse before decoding what cannot fit.
        if payload.len() / 4 * 3 > max_bytes + 3 {
            return Err(InputError::new(field, format!("is larger than {max_bytes} bytes")));
        }
        let bytes = decode_base64(payload.trim())
            .ok_or_else(|| InputError::new(field, "is not valid base64, a data: URL, file:ID or an https:// URL"))?;
        if bytes.is_empty() {
            return Err(InputError::new(field, "is empty"));
        }
        Ok(Self::Inline { bytes, declared })
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|e| e.decode(s).ok())
}

/// Whether `id` can be a file id: `file_` then 1–64 characters of `[A-Za-z0-9]`.
pub fn valid_file_id(id: &str) -> bool {
    id.strip_prefix("file_")
        .is_some_and(|rest| (1..=64).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// An uploaded file, as `POST /v1/files` and `GET /v1/files/{id}` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileObject {
    /// `file_…`; give it as `"file:<id>"` in a job's input.
    pub id: String,
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
    /// The name the client gave (multipart `filename`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: after this the file is gone (jobs made from it keep their own copy's lifetime).
    pub expires_at: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: serde_json::Value) -> Result<MediaSource, InputError> {
        MediaSource::parse(&v, "input.image", 1000)
    }

    #[test]
    fn reads_each_form() {
        assert_eq!(parse(json!("aGk=")).unwrap(), MediaSource::Inline { bytes: b"hi".to_vec(), declared: None });
        assert_eq!(parse(json!("aGk")).unwrap(), MediaSource::Inline { bytes: b"hi".to_vec(), declared: None });
        assert_eq!(
            parse(json!("data:image/PNG;base64,aGk=")).unwrap(),
            MediaSource::Inline { bytes: b"hi".to_vec(), declared: Some("image/png".into()) }
        );
        assert_eq!(parse(json!("file:file_abc123")).unwrap(), MediaSource::File("file_abc123".into()));
        assert_eq!(
            parse(json!("https://example.com/a.png")).unwrap(),
            MediaSource::Url("https://example.com/a.png".into())
        );
        let stored = json!({"sha256": "a".repeat(64), "content_type": "image/png", "size": 3});
        assert!(matches!(parse(stored).unwrap(), MediaSource::Stored(_)));
    }

    #[test]
    fn refuses_with_the_field() {
        for bad in [
            json!(3),
            json!("http://x/a.png"),
            json!("file:../etc"),
            json!("data:image/png,aGk="),
            json!("!!!"),
            json!(""),
            json!({"sha256": "x", "content_type": "image/png", "size": 3}),
        ] {
            assert_eq!(parse(bad.clone()).unwrap_err().field, "input.image", "{bad}");
        }
        let big = "A".repeat(2000);
        assert!(parse(json!(big)).unwrap_err().message.contains("1000 bytes"));
    }
}
