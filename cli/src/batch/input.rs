//! The input file: one job `input` object per non-empty line, its canonical JSON, the occurrence
//! number among identical lines, and the `Idempotency-Key` derived from them. Or a set of files
//! (`--inputs 'scans/*.png'`): one job per file, in name order, its bytes the job's binary input
//! field; such an item's canonical JSON names the file's sha256, so a file's key follows its
//! bytes, not its name or place in the listing.
//!
//! The key leaves the line number out on purpose: inserting a line above others does not change
//! their keys, so the gateway still returns the jobs they already have. Identical lines stay
//! distinct jobs through the occurrence number; a retry gets a new key through the generation.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::BatchError;

/// One non-empty line of the input file.
#[derive(Debug, Clone)]
pub struct Item {
    /// 1-based line number in the file: the name of its outputs and its key in the manifest.
    pub line: usize,
    /// The parsed input and its canonical text, or why the line is not a JSON object.
    pub input: Result<Input, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub value: Value,
    pub canonical: String,
    /// How many earlier lines have the same canonical JSON.
    pub occurrence: u32,
    /// Input fields whose value is a file's bytes, uploaded (`POST /v1/files`) when the job is
    /// submitted and given as `file:<id>`.
    pub files: Vec<(String, std::path::PathBuf)>,
}

/// Reads the whole file; blank lines are not items but still count for line numbers.
pub fn read(path: &Path) -> Result<Vec<Item>, BatchError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| BatchError::Input { path: path.display().to_string(), source })?;
    Ok(parse(&text))
}

/// One item per file matching `pattern` (a glob: `*`, `?`, `[…]`, `**`), sorted by path, each
/// job's `field` the file's bytes. The files are read once here, to hash them.
pub fn from_files(pattern: &str, field: &str) -> Result<Vec<Item>, BatchError> {
    let bad = |message: String| BatchError::Input {
        path: pattern.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    };
    let mut paths = Vec::new();
    for entry in glob::glob(pattern).map_err(|e| bad(format!("not a usable pattern: {e}")))? {
        let path = entry.map_err(|e| bad(e.to_string()))?;
        if path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(bad("matches no file".into()));
    }
    paths.sort();
    let mut seen: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut items = Vec::with_capacity(paths.len());
    for (i, path) in paths.into_iter().enumerate() {
        let sha256 =
            hash_file(&path).map_err(|source| BatchError::Input { path: path.display().to_string(), source })?;
        let value = serde_json::json!({ field: format!("@{}", path.display()) });
        let canonical = canonical(&serde_json::json!({ field: { "sha256": sha256 } }));
        let n = seen.entry(canonical.clone()).or_insert(0);
        let occurrence = *n;
        *n += 1;
        let input = Input { value, canonical, occurrence, files: vec![(field.to_owned(), path)] };
        items.push(Item { line: i + 1, input: Ok(input) });
    }
    Ok(items)
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

pub fn parse(text: &str) -> Vec<Item> {
    let mut seen: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let input = match serde_json::from_str::<Value>(raw) {
            Ok(value @ Value::Object(_)) => {
                let canonical = canonical(&value);
                let n = seen.entry(canonical.clone()).or_insert(0);
                let occurrence = *n;
                *n += 1;
                Ok(Input { value, canonical, occurrence, files: Vec::new() })
            }
            Ok(other) => Err(format!("expected a JSON object, got {}", kiln_proto::json_type(&other))),
            Err(e) => Err(format!("not valid JSON: {e}")),
        };
        items.push(Item { line: i + 1, input });
    }
    items
}

/// Compact JSON with object keys sorted at every level, whatever map type `serde_json` was built
/// with: the same input written in another key order is the same job.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `kb1-` + sha256 over (model, canonical input, occurrence, generation), each length-prefixed so
/// no two different tuples hash the same text.
pub fn idempotency_key(model: &str, input: &Input, generation: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-batch/v1");
    for part in [model.as_bytes(), input.canonical.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(input.occurrence.to_be_bytes());
    h.update(generation.to_be_bytes());
    format!("kb1-{}", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Input {
        parse(text).remove(0).input.unwrap()
    }

    #[test]
    fn canonical_json_ignores_key_order_and_spacing() {
        let a = one(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "s"}}"#);
        let b = one(r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#);
        assert_eq!(a.canonical, r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#);
        assert_eq!(a, b);
        assert_eq!(idempotency_key("m", &a, 0), idempotency_key("m", &b, 0));
    }

    #[test]
    fn the_key_changes_with_model_input_occurrence_and_generation_only() {
        let items = parse("{\"text\":\"a\"}\n\n{\"text\":\"b\"}\n{\"text\": \"a\"}\n");
        let inputs: Vec<Input> = items.iter().map(|i| i.input.clone().unwrap()).collect();
        assert_eq!(items.iter().map(|i| i.line).collect::<Vec<_>>(), [1, 3, 4], "blank lines keep numbering");
        assert_eq!(inputs.iter().map(|i| i.occurrence).collect::<Vec<_>>(), [0, 0, 1]);
        let k = |m: &str, i: &Input, g| idempotency_key(m, i, g);
        let base = k("m", &inputs[0], 0);
        assert!(base.starts_with("kb1-") && base.len() == 68, "{base}");
        assert_eq!(base, k("m", &inputs[0], 0), "deterministic");
        for other in [k("n", &inputs[0], 0), k("m", &inputs[1], 0), k("m", &inputs[2], 0), k("m", &inputs[0], 1)] {
            assert_ne!(base, other);
        }
        // The line number is not part of the key: the same text moved down keeps its key.
        let moved = parse("\n\n\n{\"text\":\"a\"}").remove(0);
        assert_eq!(moved.line, 4);
        assert_eq!(k("m", moved.input.as_ref().unwrap(), 0), base);
    }

    #[test]
    fn files_are_items_keyed_by_their_bytes_in_name_order() {
        let dir = std::env::temp_dir().join(format!("kiln-batch-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in [("b.png", &b"two"[..]), ("a.png", b"one"), ("c.png", b"one"), ("x.txt", b"no")] {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let items = from_files(&format!("{}/*.png", dir.display()), "image").unwrap();
        let inputs: Vec<Input> = items.iter().map(|i| i.input.clone().unwrap()).collect();
        let names: Vec<_> = inputs.iter().map(|i| i.files[0].1.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, ["a.png", "b.png", "c.png"]);
        assert_eq!(items.iter().map(|i| i.line).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(inputs[0].canonical.contains(&hex::encode(Sha256::digest(b"one"))), "{}", inputs[0].canonical);
        // Same bytes: same canonical input, told apart by the occurrence.
        assert_eq!((inputs[0].canonical == inputs[2].canonical, inputs[2].occurrence), (true, 1));
        assert!(from_files(&format!("{}/*.gif", dir.display()), "image").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_lines_are_items_with_their_reason() {
        let items = parse("{\"text\": 1}\n{not json\n[1,2]\n");
        assert!(items[0].input.is_ok(), "schema errors are the gateway's to report");
        assert!(items[1].input.as_ref().unwrap_err().contains("not valid JSON"));
        assert!(items[2].input.as_ref().unwrap_err().contains("expected a JSON object"));
        assert_eq!(items[2].line, 3);
    }
}
