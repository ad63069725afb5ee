//! `-i key=value` pairs (`kiln run`, `kiln submit`) into a job's input object.
//!
//! A value is JSON when it parses as JSON (`steps=30`, `fast=true`, `texts=["a","b"]`,
//! `name="42"` for a string of digits), else the text as it is (`prompt=a red fox`). `key=@path`
//! reads a file and `key=@-` standard input: text that is UTF-8 becomes a string, anything else a
//! `data:` URL (`data:image/png;base64,…`, the type from the file's first bytes or its extension),
//! which is how image and audio inputs travel in a JSON body. A value that starts with `@` is
//! written as a JSON string: `handle="@kiln"`. Binary files over [`INLINE_MAX_BYTES`] are not
//! inlined: [`Built::upload`] sends them to `POST /v1/files` first and gives `file:<id>` instead,
//! so big images and audio travel by reference, outside the JSON body and its size limit.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

/// Files (and standard input) read into an input, at most: a job body bigger than this would be
/// refused by the gateway anyway, and reading it all first would only cost memory.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Binary files up to this size travel inline as `data:` URLs (one request); larger ones are
/// uploaded to `POST /v1/files` first.
pub const INLINE_MAX_BYTES: usize = 256 * 1024;

/// The input object `-i` pairs make, and the binary files too large to inline in it.
#[derive(Debug, Default)]
pub struct Built {
    /// The input; each key of `uploads` holds `null` until [`Built::upload`] fills it in.
    pub input: Map<String, Value>,
    pub uploads: Vec<Upload>,
}

/// A binary file over [`INLINE_MAX_BYTES`], to be sent to `POST /v1/files`.
#[derive(Debug)]
pub struct Upload {
    pub key: String,
    pub bytes: Vec<u8>,
    pub mime: &'static str,
}

impl Built {
    /// Uploads each large file with `client` and gives its key `file:<id>`: the finished input.
    pub async fn upload(mut self, client: &crate::client::Client) -> anyhow::Result<Map<String, Value>> {
        use anyhow::Context as _;
        for Upload { key, bytes, mime } in self.uploads {
            let file = client.upload(bytes, mime).await.with_context(|| format!("uploading input {key}"))?;
            let id = file["id"].as_str().with_context(|| format!("POST /v1/files answered without an id: {file}"))?;
            self.input.insert(key, Value::String(format!("file:{id}")));
        }
        Ok(self.input)
    }
}

/// One `-i` pair, parsed but not yet read.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub key: String,
    pub value: PairValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PairValue {
    /// `key=text`: JSON if it parses, else the text.
    Literal(String),
    /// `key=@path`.
    File(PathBuf),
    /// `key=@-`.
    Stdin,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input {0:?} is given twice")]
    Duplicate(String),
    #[error("only one input can read standard input (`{0}=@-`)")]
    StdinTwice(String),
    #[error("input {key}: cannot read {path}: {source}")]
    Read {
        key: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("input {key}: {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { key: String, path: String },
}

/// The clap value parser of `-i`: `key=value`, the key non-empty.
pub fn parse_pair(s: &str) -> Result<Pair, String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value (e.g. -i prompt=hello)"))?;
    if key.is_empty() {
        return Err(format!("{s:?} has no key before `=` (e.g. -i prompt=hello)"));
    }
    let value = match value.strip_prefix('@') {
        Some("-") => PairValue::Stdin,
        Some("") => return Err(format!("{s:?}: `@` needs a file name, or `@-` for standard input")),
        Some(path) => PairValue::File(PathBuf::from(path)),
        None => PairValue::Literal(value.to_owned()),
    };
    Ok(Pair { key: key.to_owned(), value })
}

/// The input object of `pairs`, in the order given; `stdin` is read for an `@-` value.
pub fn build(pairs: &[Pair], stdin: impl Read) -> Result<Built, InputError> {
    let mut stdin = Some(stdin);
    let mut built = Built::default();
    for Pair { key, value } in pairs {
        if built.input.contains_key(key) {
            return Err(InputError::Duplicate(key.clone()));
        }
        let content = match value {
            PairValue::Literal(text) => Content::Inline(literal(text)),
            PairValue::File(path) => {
                let file = std::fs::File::open(path).map_err(|source| read_error(key, path, source))?;
                content(read_bounded(key, &path.display().to_string(), file)?, Some(path))
            }
            PairValue::Stdin => {
                let stdin = stdin.take().ok_or_else(|| InputError::StdinTwice(key.clone()))?;
                content(read_bounded(key, "standard input", stdin)?, None)
            }
        };
        let value = match content {
            Content::Inline(value) => value,
            Content::Upload { bytes, mime } => {
                built.uploads.push(Upload { key: key.clone(), bytes, mime });
                Value::Null
            }
        };
        built.input.insert(key.clone(), value);
    }
    Ok(built)
}

/// JSON when it parses, else the text as a string.
pub fn literal(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// What a file's bytes become in an input.
pub enum Content {
    Inline(Value),
    /// Binary and over [`INLINE_MAX_BYTES`]: sent to `POST /v1/files`.
    Upload {
        bytes: Vec<u8>,
        mime: &'static str,
    },
}

/// A file's bytes as an input value: UTF-8 text as a string, anything else as a `data:` URL, or
/// for upload when it is over [`INLINE_MAX_BYTES`].
pub fn content(bytes: Vec<u8>, path: Option<&Path>) -> Content {
    match String::from_utf8(bytes) {
        Ok(text) => Content::Inline(Value::String(text)),
        Err(e) => {
            let bytes = e.into_bytes();
            let mime = media_type(&bytes, path);
            if bytes.len() > INLINE_MAX_BYTES {
                return Content::Upload { bytes, mime };
            }
            let url = format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
            Content::Inline(Value::String(url))
        }
    }
}

/// The media type of binary content: from its first bytes, else its file extension.
pub(crate) fn media_type(bytes: &[u8], path: Option<&Path>) -> &'static str {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF8", "image/gif"),
        (b"%PDF-", "application/pdf"),
        (b"fLaC", "audio/flac"),
        (b"OggS", "audio/ogg"),
        (b"ID3", "audio/mpeg"),
    ];
    if let Some((_, mime)) = MAGIC.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return mime;
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" {
        match &bytes[8..12] {
            b"WAVE" => return "audio/wav",
            b"WEBP" => return "image/webp",
            _ => {}
        }
    }
    let ext = path.and_then(Path::extension).and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("flac") => "audio/flac",
        Some("ogg") => "audio/ogg",
        Some("pdf") => "application/pdf",
        _ => "application/octet-stream",
    }
}

fn read_bounded(key: &str, what: &str, reader: impl Read) -> Result<Vec<u8>, InputError> {
    let mut bytes = Vec::new();
    reader.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|source| InputError::Read {
        key: key.to_owned(),
        path: what.to_owned(),
        source,
    })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(InputError::TooLarge { key: key.to_owned(), path: what.to_owned() });
    }
    Ok(bytes)
}

fn read_error(key: &str, path: &Path, source: std::io::Error) -> InputError {
    InputError::Read { key: key.to_owned(), path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pairs(args: &[&str]) -> Vec<Pair> {
        args.iter().map(|a| parse_pair(a).unwrap()).collect()
    }

    fn built(args: &[&str]) -> Value {
        let built = build(&pairs(args), std::io::empty()).unwrap();
        assert!(built.uploads.is_empty(), "{:?}", built.uploads);
        Value::Object(built.input)
    }

    #[test]
    fn values_are_json_when_they_parse_and_text_otherwise() {
        let input = built(&[
            "steps=30",
            "scale=7.5",
            "fast=true",
            "none=null",
            "texts=[\"a\", \"b\"]",
            "opts={\"k\": 1}",
            "prompt=a red fox",
            "digits=\"42\"",
            "empty=",
            "eq=a=b",
            "handle=\"@kiln\"",
        ]);
        assert_eq!(
            input,
            json!({
                "steps": 30, "scale": 7.5, "fast": true, "none": null, "texts": ["a", "b"],
                "opts": {"k": 1}, "prompt": "a red fox", "digits": "42", "empty": "", "eq": "a=b",
                "handle": "@kiln",
            })
        );
    }

    #[test]
    fn files_are_text_when_utf8_and_data_urls_otherwise() {
        let dir = std::env::temp_dir().join(format!("kiln-inputs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("prompt.txt");
        std::fs::write(&text, "héllo\n").unwrap();
        let png = dir.join("tile.bin");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n\x00\x01").unwrap();
        let raw = dir.join("clip.wav");
        std::fs::write(&raw, [0xffu8, 0xfe, 0x00]).unwrap();
        let input = built(&[
            &format!("prompt=@{}", text.display()),
            &format!("image=@{}", png.display()),
            &format!("audio=@{}", raw.display()),
        ]);
        assert_eq!(input["prompt"], "héllo\n");
        assert_eq!(input["image"], "data:image/png;base64,iVBORw0KGgoAAQ==");
        assert_eq!(input["audio"], "data:audio/wav;base64,//4A");
        // Over the inline bound: left for upload, its key held by null, the bytes as read.
        let big = dir.join("big.png");
        let bytes: Vec<u8> =
            b"\x89PNG\r\n\x1a\n".iter().copied().chain(std::iter::repeat_n(0xff, INLINE_MAX_BYTES)).collect();
        std::fs::write(&big, &bytes).unwrap();
        let built = build(&pairs(&[&format!("image=@{}", big.display()), "n=1"]), std::io::empty()).unwrap();
        assert_eq!(Value::Object(built.input), json!({"image": null, "n": 1}));
        let [Upload { key, bytes: read, mime }] = &built.uploads[..] else { panic!("{:?}", built.uploads) };
        assert_eq!((key.as_str(), *mime, read == &bytes), ("image", "image/png", true));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_is_read_once() {
        let ps = pairs(&["text=@-"]);
        let input = build(&ps, &b"from a pipe"[..]).unwrap().input;
        assert_eq!(input["text"], "from a pipe");
        let twice = build(&pairs(&["a=@-", "b=@-"]), &b"x"[..]).unwrap_err();
        assert!(matches!(twice, InputError::StdinTwice(ref k) if k == "b"), "{twice}");
    }

    #[test]
    fn bad_pairs_say_what_is_wrong() {
        let no_eq = parse_pair("prompt").unwrap_err();
        assert!(no_eq.contains("is not key=value"), "{no_eq}");
        let no_key = parse_pair("=hello").unwrap_err();
        assert!(no_key.contains("no key"), "{no_key}");
        let no_file = parse_pair("image=@").unwrap_err();
        assert!(no_file.contains("needs a file name"), "{no_file}");
        let dup = build(&pairs(&["a=1", "a=2"]), std::io::empty()).unwrap_err();
        assert_eq!(dup.to_string(), "input \"a\" is given twice");
        let missing = build(&pairs(&["image=@/nonexistent/kiln.png"]), std::io::empty()).unwrap_err();
        assert!(missing.to_string().starts_with("input image: cannot read /nonexistent/kiln.png"), "{missing}");
    }
}
