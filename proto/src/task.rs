//! Tasks and their input/output schemas. Validation lives here, as pure functions, so the gateway
//! (which rejects bad input with 422) and the worker (which trusts nothing off the wire) agree.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Embedding,
}

impl Task {
    /// JSON Schema of the task's `input`, published in `GET /v1/models`.
    pub fn input_schema(self, limits: &InputLimits) -> serde_json::Value {
        match self {
            Task::Embedding => serde_json::json!({
                "type": "object",
                "oneOf": [
                    {"required": ["text"], "properties": {"text": {"type": "string", "maxLength": limits.max_text_chars}}},
                    {"required": ["texts"], "properties": {"texts": {
                        "type": "array", "minItems": 1, "maxItems": limits.max_texts,
                        "items": {"type": "string", "maxLength": limits.max_text_chars}}}}
                ],
                "additionalProperties": false
            }),
        }
    }
}

/// Bounds on one job's input, set per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputLimits {
    /// Most texts in one embedding job.
    pub max_texts: usize,
    /// Most characters in one text.
    pub max_text_chars: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self { max_texts: 256, max_text_chars: 20_000 }
    }
}

/// An input that does not fit the task's schema, naming the field at fault (`input.text`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    pub field: String,
    pub message: String,
}

impl InputError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// The canonical embedding input: always a list of texts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingInput {
    pub texts: Vec<String>,
}

impl EmbeddingInput {
    /// Accepts `{"text": "..."}` or `{"texts": ["...", ...]}` and nothing else.
    pub fn parse(input: &serde_json::Value, limits: &InputLimits) -> Result<Self, InputError> {
        let obj = input
            .as_object()
            .ok_or_else(|| InputError::new("input", format!("must be an object, got {}", json_type(input))))?;
        if let Some(unknown) = obj.keys().find(|k| *k != "text" && *k != "texts") {
            return Err(InputError::new(format!("input.{unknown}"), "unknown field; expected `text` or `texts`"));
        }
        let texts = match (obj.get("text"), obj.get("texts")) {
            (Some(_), Some(_)) => {
                return Err(InputError::new("input", "give either `text` or `texts`, not both"));
            }
            (None, None) => {
                return Err(InputError::new(
                    "input.text",
                    "missing; give `text` (a string) or `texts` (an array of strings)",
                ));
            }
            (Some(text), None) => vec![string_field(text, "input.text", limits)?],
            (None, Some(texts)) => {
                let arr = texts.as_array().ok_or_else(|| {
                    InputError::new("input.texts", format!("must be an array of strings, got {}", json_type(texts)))
                })?;
                if arr.is_empty() {
                    return Err(InputError::new("input.texts", "must hold at least one text"));
                }
                if arr.len() > limits.max_texts {
                    return Err(InputError::new(
                        "input.texts",
                        format!("holds {} texts; at most {} are allowed", arr.len(), limits.max_texts),
                    ));
                }
                arr.iter()
                    .enumerate()
                    .map(|(i, t)| string_field(t, &format!("input.texts[{i}]"), limits))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(Self { texts })
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({ "texts": self.texts })
    }
}

fn string_field(v: &serde_json::Value, field: &str, limits: &InputLimits) -> Result<String, InputError> {
    let s = v.as_str().ok_or_else(|| InputError::new(field, format!("must be a string, got {}", json_type(v))))?;
    let chars = s.chars().count();
    if chars > limits.max_text_chars {
        return Err(InputError::new(
            field,
            format!("is {chars} characters long; at most {} are allowed", limits.max_text_chars),
        ));
    }
    Ok(s.to_owned())
}

/// The JSON type name of a value, for error messages.
pub fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingOutput {
    pub embeddings: Vec<Vec<f32>>,
    pub dim: usize,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: serde_json::Value) -> Result<EmbeddingInput, InputError> {
        EmbeddingInput::parse(&v, &InputLimits { max_texts: 3, max_text_chars: 5 })
    }

    #[test]
    fn accepts_text_and_texts() {
        assert_eq!(parse(json!({"text": "hi"})).unwrap().texts, ["hi"]);
        assert_eq!(parse(json!({"texts": ["a", "b"]})).unwrap().texts, ["a", "b"]);
    }

    #[test]
    fn names_the_field_at_fault() {
        let field = |v| parse(v).unwrap_err().field;
        assert_eq!(field(json!({})), "input.text");
        assert_eq!(field(json!({"text": 3})), "input.text");
        assert_eq!(field(json!({"text": "toolong"})), "input.text");
        assert_eq!(field(json!({"texts": "x"})), "input.texts");
        assert_eq!(field(json!({"texts": []})), "input.texts");
        assert_eq!(field(json!({"texts": ["a", "b", "c", "d"]})), "input.texts");
        assert_eq!(field(json!({"texts": ["a", null]})), "input.texts[1]");
        assert_eq!(field(json!({"text": "a", "texts": ["a"]})), "input");
        assert_eq!(field(json!({"txt": "a"})), "input.txt");
        assert_eq!(field(json!("a")), "input");
    }
}
