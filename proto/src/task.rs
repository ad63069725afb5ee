//! Tasks and their input/output schemas. Validation lives here, as pure functions, so the gateway
//! (which rejects bad input with 422) and the worker (which trusts nothing off the wire) agree.

use serde::{Deserialize, Serialize};

use crate::media::{MediaKind, MediaRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Texts → unit vectors.
    Embedding,
    /// Seeded, unconditional image generation (the terrain heightmap model): PNG files.
    ImageGeneration,
    /// Prompt → image through a multi-step diffusion pipeline (Stable-Diffusion-style export).
    TextToImage,
    /// Image → lines of text with boxes (detect, classify angle, recognise).
    Ocr,
    /// Image → scores `{safe, nsfw}`.
    ImageModeration,
    /// Audio → speech segments `[{start_s, end_s}]` (voice-activity detection).
    SpeechSegments,
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
            Task::ImageGeneration => serde_json::json!({
                "type": "object",
                "required": ["difficulty"],
                "properties": {
                    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED,
                             "description": "Chosen at random (and reported) when absent."},
                    "difficulty": {"type": "integer", "minimum": 1, "maximum": 100},
                    "count": {"type": "integer", "minimum": 1, "maximum": limits.max_images, "default": 1},
                    "width": {"type": "integer", "minimum": MIN_SIDE, "maximum": limits.max_width, "default": limits.default_width},
                    "height": {"type": "integer", "minimum": MIN_SIDE, "maximum": limits.max_height, "default": limits.default_height},
                    "colormap": {"enum": ["gray", "terrain"], "default": "gray"},
                    "moderate": {"type": "boolean", "default": false,
                                 "description": "Score each image with the model's moderation model; images over its threshold are withheld."}
                },
                "additionalProperties": false
            }),
            Task::TextToImage => serde_json::json!({
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars},
                    "negative_prompt": {"type": "string", "maxLength": limits.max_text_chars, "default": ""},
                    "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps, "default": DEFAULT_STEPS},
                    "guidance_scale": {"type": "number", "minimum": 0, "maximum": MAX_GUIDANCE, "default": DEFAULT_GUIDANCE},
                    "scheduler": {"enum": ["euler", "ddim"], "default": "euler"},
                    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                    "count": {"type": "integer", "minimum": 1, "maximum": limits.max_images, "default": 1},
                    "width": {"type": "integer", "multipleOf": 8, "minimum": MIN_SIDE, "maximum": limits.max_width, "default": limits.default_width},
                    "height": {"type": "integer", "multipleOf": 8, "minimum": MIN_SIDE, "maximum": limits.max_height, "default": limits.default_height}
                },
                "additionalProperties": false
            }),
            Task::Ocr | Task::ImageModeration => serde_json::json!({
                "type": "object",
                "required": ["image"],
                "properties": {"image": media_schema(MediaKind::Image, limits)},
                "x-kiln-limits": {"max_pixels": limits.max_pixels},
                "additionalProperties": false
            }),
            Task::SpeechSegments => serde_json::json!({
                "type": "object",
                "required": ["audio"],
                "properties": {
                    "audio": media_schema(MediaKind::Audio, limits),
                    "threshold": {"type": "number", "minimum": 0.05, "maximum": 0.95, "default": VAD_THRESHOLD,
                                  "description": "Speech probability above which a chunk is speech."},
                    "min_speech_s": {"type": "number", "minimum": 0, "maximum": 10, "default": VAD_MIN_SPEECH_S},
                    "min_silence_s": {"type": "number", "minimum": 0, "maximum": 10, "default": VAD_MIN_SILENCE_S},
                    "pad_s": {"type": "number", "minimum": 0, "maximum": 1, "default": VAD_PAD_S}
                },
                "x-kiln-limits": {"max_audio_s": limits.max_audio_s},
                "additionalProperties": false
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embedding => "embedding",
            Task::ImageGeneration => "image-generation",
            Task::TextToImage => "text-to-image",
            Task::Ocr => "ocr",
            Task::ImageModeration => "image-moderation",
            Task::SpeechSegments => "speech-segments",
        }
    }

    /// Whether the task's results are files (served from the output store), not inline JSON.
    pub fn produces_files(self) -> bool {
        matches!(self, Task::ImageGeneration | Task::TextToImage)
    }

    /// The task's binary input fields: the gateway resolves each (base64, data: URL, file:ID,
    /// https URL) to a stored [`crate::MediaRef`] before the input is parsed.
    pub fn media_fields(self) -> &'static [(&'static str, MediaKind)] {
        match self {
            Task::Ocr | Task::ImageModeration => &[("image", MediaKind::Image)],
            Task::SpeechSegments => &[("audio", MediaKind::Audio)],
            Task::Embedding | Task::ImageGeneration | Task::TextToImage => &[],
        }
    }
}

/// The JSON Schema of a binary input field, as `GET /v1/models` shows it.
fn media_schema(kind: MediaKind, limits: &InputLimits) -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "x-kiln-file": kind,
        "contentMediaType": kind.accepted().join(", "),
        "maxBytes": limits.max_input_bytes,
        "description": "The bytes as base64 or a data: URL, a file uploaded with POST /v1/files as \"file:<id>\", \
                        or an https:// URL the gateway fetches.",
    })
}

/// Bounds on one job's input, set per model (`[limits]` in `kiln.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputLimits {
    /// Most texts in one embedding job.
    pub max_texts: usize,
    /// Most characters in one text (or prompt).
    pub max_text_chars: usize,
    /// Most images in one image job.
    pub max_images: u32,
    /// Largest image width and height accepted.
    pub max_width: u32,
    pub max_height: u32,
    /// Image size when the input gives none (the model's native size).
    pub default_width: u32,
    pub default_height: u32,
    /// Most denoising steps of a text-to-image job.
    pub max_steps: u32,
    /// Most bytes of one binary input (image or audio file, as sent; base64 decoded).
    pub max_input_bytes: usize,
    /// Most pixels (width × height) of one input image, checked from its header before decoding.
    pub max_pixels: u64,
    /// Most seconds of one audio input.
    pub max_audio_s: u32,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_texts: 256,
            max_text_chars: 20_000,
            max_images: 64,
            max_width: 1024,
            max_height: 1024,
            default_width: 512,
            default_height: 512,
            max_steps: 150,
            max_input_bytes: 16 << 20,
            max_pixels: 25_000_000,
            max_audio_s: 3600,
        }
    }
}

/// Largest seed: the largest integer every JSON client represents exactly (2^53 − 1).
pub const MAX_SEED: u64 = (1 << 53) - 1;
/// Smallest image side accepted.
const MIN_SIDE: u32 = 16;
const DEFAULT_STEPS: u32 = 25;
const DEFAULT_GUIDANCE: f64 = 7.5;
const MAX_GUIDANCE: f64 = 30.0;
const VAD_THRESHOLD: f64 = 0.5;
const VAD_MIN_SPEECH_S: f64 = 0.25;
const VAD_MIN_SILENCE_S: f64 = 0.1;
const VAD_PAD_S: f64 = 0.03;

/// An input that does not fit the task's schema, naming the field at fault (`input.text`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    pub field: String,
    pub message: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
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

/// How heights become pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colormap {
    /// 16-bit grayscale, stretched from the lowest to the highest point of the image.
    Gray,
    /// 8-bit RGB through a terrain colour ramp (sea, lowland, hills, rock, snow).
    Terrain,
}

/// The canonical `image-generation` input: every field filled in, the seed included, so a
/// retried or redelivered job draws exactly the same images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageGenerationInput {
    pub seed: u64,
    pub difficulty: u32,
    pub count: u32,
    pub width: u32,
    pub height: u32,
    pub colormap: Colormap,
    /// Score each image with the model's moderation model before it is stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moderate: bool,
}

impl ImageGenerationInput {
    /// Validates `input`; a missing seed is drawn from `random_seed`.
    pub fn parse(
        input: &serde_json::Value,
        limits: &InputLimits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<Self, InputError> {
        let obj = Fields::new(input, &["seed", "difficulty", "count", "width", "height", "colormap", "moderate"])?;
        let difficulty = obj
            .int("difficulty", 1, 100)?
            .ok_or_else(|| InputError::new("input.difficulty", "missing; give an integer from 1 to 100"))?;
        Ok(Self {
            seed: obj.int("seed", 0, MAX_SEED)?.unwrap_or_else(random_seed),
            difficulty: difficulty as u32,
            count: obj.int("count", 1, u64::from(limits.max_images))?.unwrap_or(1) as u32,
            width: obj
                .int("width", u64::from(MIN_SIDE), u64::from(limits.max_width))?
                .unwrap_or(u64::from(limits.default_width)) as u32,
            height: obj
                .int("height", u64::from(MIN_SIDE), u64::from(limits.max_height))?
                .unwrap_or(u64::from(limits.default_height)) as u32,
            colormap: match obj.string("colormap")? {
                None | Some("gray") => Colormap::Gray,
                Some("terrain") => Colormap::Terrain,
                Some(other) => {
                    return Err(InputError::new(
                        "input.colormap",
                        format!("must be \"gray\" or \"terrain\", got {other:?}"),
                    ));
                }
            },
            moderate: obj.bool("moderate")?.unwrap_or(false),
        })
    }
}

/// Denoising schedulers of the text-to-image pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Euler,
    Ddim,
}

/// The canonical `text-to-image` input, every field filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextToImageInput {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    pub guidance_scale: f32,
    pub scheduler: Scheduler,
    pub seed: u64,
    pub count: u32,
    pub width: u32,
    pub height: u32,
}

impl TextToImageInput {
    pub fn parse(
        input: &serde_json::Value,
        limits: &InputLimits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<Self, InputError> {
        let obj = Fields::new(
            input,
            &["prompt", "negative_prompt", "steps", "guidance_scale", "scheduler", "seed", "count", "width", "height"],
        )?;
        let text = |name: &str| -> Result<Option<String>, InputError> {
            let Some(s) = obj.string(name)? else { return Ok(None) };
            let chars = s.chars().count();
            if chars > limits.max_text_chars {
                return Err(InputError::new(
                    format!("input.{name}"),
                    format!("is {chars} characters long; at most {} are allowed", limits.max_text_chars),
                ));
            }
            Ok(Some(s.to_owned()))
        };
        let prompt = text("prompt")?
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| InputError::new("input.prompt", "missing or empty; describe the image to generate"))?;
        let side = |name: &str, max: u32, default: u32| -> Result<u32, InputError> {
            let v = obj.int(name, u64::from(MIN_SIDE), u64::from(max))?.unwrap_or(u64::from(default)) as u32;
            if !v.is_multiple_of(8) {
                return Err(InputError::new(format!("input.{name}"), format!("must be a multiple of 8, got {v}")));
            }
            Ok(v)
        };
        let guidance_scale = match obj.get("guidance_scale") {
            None => DEFAULT_GUIDANCE,
            Some(v) => match v.as_f64() {
                Some(g) if (0.0..=MAX_GUIDANCE).contains(&g) => g,
                _ => {
                    return Err(InputError::new(
                        "input.guidance_scale",
                        format!("must be a number from 0 to {MAX_GUIDANCE}, got {v}"),
                    ));
                }
            },
        };
        Ok(Self {
            prompt,
            negative_prompt: text("negative_prompt")?.unwrap_or_default(),
            steps: obj.int("steps", 1, u64::from(limits.max_steps))?.unwrap_or(u64::from(DEFAULT_STEPS)) as u32,
            guidance_scale: guidance_scale as f32,
            scheduler: match obj.string("scheduler")? {
                None | Some("euler") => Scheduler::Euler,
                Some("ddim") => Scheduler::Ddim,
                Some(other) => {
                    return Err(InputError::new(
                        "input.scheduler",
                        format!("must be \"euler\" or \"ddim\", got {other:?}"),
                    ));
                }
            },
            seed: obj.int("seed", 0, MAX_SEED)?.unwrap_or_else(random_seed),
            count: obj.int("count", 1, u64::from(limits.max_images))?.unwrap_or(1) as u32,
            width: side("width", limits.max_width, limits.default_width)?,
            height: side("height", limits.max_height, limits.default_height)?,
        })
    }
}

/// An input object whose fields are read one by one, with errors naming `input.<field>`.
struct Fields<'a> {
    obj: &'a serde_json::Map<String, serde_json::Value>,
}

impl<'a> Fields<'a> {
    fn new(input: &'a serde_json::Value, known: &[&str]) -> Result<Self, InputError> {
        let obj = input
            .as_object()
            .ok_or_else(|| InputError::new("input", format!("must be an object, got {}", json_type(input))))?;
        if let Some(unknown) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(InputError::new(
                format!("input.{unknown}"),
                format!("unknown field; accepted fields are {}", known.join(", ")),
            ));
        }
        Ok(Self { obj })
    }

    /// A field given as `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a serde_json::Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn int(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, InputError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(InputError::new(
                format!("input.{name}"),
                match v {
                    serde_json::Value::Number(_) => format!("must be an integer from {min} to {max}, got {v}"),
                    _ => format!("must be an integer from {min} to {max}, got {}", json_type(v)),
                },
            )),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, InputError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| InputError::new(format!("input.{name}"), format!("must be a boolean, got {}", json_type(v))))
    }

    fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, InputError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        match v.as_f64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => {
                Err(InputError::new(format!("input.{name}"), format!("must be a number from {min} to {max}, got {v}")))
            }
        }
    }

    fn media(&self, name: &str) -> Result<MediaRef, InputError> {
        let field = format!("input.{name}");
        let v = self.get(name).ok_or_else(|| InputError::new(&field, "missing"))?;
        MediaRef::parse(v, &field)
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, InputError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        v.as_str()
            .map(Some)
            .ok_or_else(|| InputError::new(format!("input.{name}"), format!("must be a string, got {}", json_type(v))))
    }
}

/// The canonical `ocr` input: one stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcrInput {
    pub image: MediaRef,
}

impl OcrInput {
    pub fn parse(input: &serde_json::Value) -> Result<Self, InputError> {
        let obj = Fields::new(input, &["image"])?;
        Ok(Self { image: obj.media("image")? })
    }
}

/// The canonical `image-moderation` input: one stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerationInput {
    pub image: MediaRef,
}

impl ModerationInput {
    pub fn parse(input: &serde_json::Value) -> Result<Self, InputError> {
        let obj = Fields::new(input, &["image"])?;
        Ok(Self { image: obj.media("image")? })
    }
}

/// The canonical `speech-segments` input: one stored WAV file and the segmenter's settings, every
/// one filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeechSegmentsInput {
    pub audio: MediaRef,
    /// Speech probability above which a chunk is speech (speech ends below `threshold − 0.15`).
    pub threshold: f32,
    /// Speech shorter than this is dropped.
    pub min_speech_s: f32,
    /// Silence shorter than this does not end a segment.
    pub min_silence_s: f32,
    /// Each segment is widened by this much on both sides (within the audio).
    pub pad_s: f32,
}

impl SpeechSegmentsInput {
    pub fn parse(input: &serde_json::Value) -> Result<Self, InputError> {
        let obj = Fields::new(input, &["audio", "threshold", "min_speech_s", "min_silence_s", "pad_s"])?;
        Ok(Self {
            audio: obj.media("audio")?,
            threshold: obj.number("threshold", 0.05, 0.95)?.unwrap_or(VAD_THRESHOLD) as f32,
            min_speech_s: obj.number("min_speech_s", 0.0, 10.0)?.unwrap_or(VAD_MIN_SPEECH_S) as f32,
            min_silence_s: obj.number("min_silence_s", 0.0, 10.0)?.unwrap_or(VAD_MIN_SILENCE_S) as f32,
            pad_s: obj.number("pad_s", 0.0, 1.0)?.unwrap_or(VAD_PAD_S) as f32,
        })
    }
}

/// One line of text an OCR job read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OcrLine {
    pub text: String,
    /// Mean probability of the line's characters, 0–1.
    pub confidence: f32,
    /// The line's box in the input image's pixels (after EXIF orientation): four corners
    /// `[x, y]`, clockwise from the top left of the text as read.
    #[serde(rename = "box")]
    pub bbox: [[f32; 2]; 4],
}

/// The output of an `ocr` job: its lines in reading order (top to bottom, then left to right),
/// and their text joined by newlines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OcrOutput {
    pub lines: Vec<OcrLine>,
    pub text: String,
    /// The image's size as read (after EXIF orientation).
    pub width: u32,
    pub height: u32,
}

/// Moderation scores of one image; they sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModerationScores {
    pub safe: f32,
    pub nsfw: f32,
}

/// The output of an `image-moderation` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModerationOutput {
    pub scores: ModerationScores,
    pub width: u32,
    pub height: u32,
}

/// One stretch of speech, in seconds from the start of the audio.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpeechSegment {
    pub start_s: f64,
    pub end_s: f64,
}

/// The output of a `speech-segments` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpeechSegmentsOutput {
    pub segments: Vec<SpeechSegment>,
    /// Length of the audio, and its sample rate as sent (the model hears it at 16 kHz).
    pub duration_s: f64,
    pub sample_rate: u32,
}

/// An image an image job made but did not store: its moderation scores passed the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithheldImage {
    pub index: u32,
    pub seed: u64,
    pub moderation: ModerationScores,
    pub reason: String,
}

/// One output file of a job, as listed in its output and served at `url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    pub name: String,
    /// Path of `GET /v1/jobs/{id}/outputs/{name}`, relative to the API's base URL.
    pub url: String,
    pub content_type: String,
    pub size: u64,
    /// Lower-case hex; also the file's `ETag`.
    pub sha256: String,
    /// For images: the seed that reproduces this image alone, and its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// The run (attempt) that made the file: its bytes are stored under that run's own name, so a
    /// late run can never overwrite a file this record lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// For images of a job that asked for moderation: their scores (under the threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<ModerationScores>,
}

/// Where the output store keeps file `name` as made by run `attempt`.
pub fn stored_output_name(name: &str, attempt: u32) -> String {
    format!("r{attempt}-{name}")
}

/// The output of an image job: its images, in order, and the job's seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageOutput {
    pub images: Vec<OutputFile>,
    pub seed: u64,
    /// Images withheld by moderation, with their scores and why (a job that asked for it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withheld: Vec<WithheldImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingOutput {
    pub embeddings: Vec<Vec<f32>>,
    pub dim: usize,
    /// Tokens of each text as the model saw them (special tokens included, after truncation),
    /// in the order of `embeddings`. Empty in outputs of workers from before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: serde_json::Value) -> Result<EmbeddingInput, InputError> {
        EmbeddingInput::parse(&v, &InputLimits { max_texts: 3, max_text_chars: 5, ..Default::default() })
    }

    #[test]
    fn accepts_text_and_texts() {
        assert_eq!(parse(json!({"text": "hi"})).unwrap().texts, ["hi"]);
        assert_eq!(parse(json!({"texts": ["a", "b"]})).unwrap().texts, ["a", "b"]);
    }

    #[test]
    fn image_input_fills_defaults_and_names_bad_fields() {
        let limits = InputLimits { default_width: 128, default_height: 128, ..Default::default() };
        let parse = |v: serde_json::Value| ImageGenerationInput::parse(&v, &limits, || 7);
        let ok = parse(json!({"difficulty": 40})).unwrap();
        assert_eq!((ok.seed, ok.count, ok.width, ok.height, ok.colormap), (7, 1, 128, 128, Colormap::Gray));
        assert_eq!(parse(json!({"difficulty": 1, "seed": 3, "colormap": "terrain"})).unwrap().seed, 3);
        let field = |v| parse(v).unwrap_err().field;
        assert_eq!(field(json!({})), "input.difficulty");
        assert_eq!(field(json!({"difficulty": 0})), "input.difficulty");
        assert_eq!(field(json!({"difficulty": 101})), "input.difficulty");
        assert_eq!(field(json!({"difficulty": "high"})), "input.difficulty");
        assert_eq!(field(json!({"difficulty": 5.5})), "input.difficulty");
        assert_eq!(field(json!({"difficulty": 5, "count": 65})), "input.count");
        assert_eq!(field(json!({"difficulty": 5, "colormap": "viridis"})), "input.colormap");
        assert_eq!(field(json!({"difficulty": 5, "seed": -1})), "input.seed");
        assert_eq!(field(json!({"difficulty": 5, "width": 4096})), "input.width");
        assert_eq!(field(json!({"difficulty": 5, "size": 5})), "input.size");
        let msg = parse(json!({"difficulty": 0})).unwrap_err().message;
        assert!(msg.contains("1 to 100") && msg.contains("got 0"), "{msg}");
    }

    #[test]
    fn text_to_image_input_fills_defaults_and_names_bad_fields() {
        let limits = InputLimits::default();
        let parse = |v: serde_json::Value| TextToImageInput::parse(&v, &limits, || 9);
        let ok = parse(json!({"prompt": "a red fox"})).unwrap();
        assert_eq!((ok.steps, ok.scheduler, ok.seed, ok.width), (25, Scheduler::Euler, 9, 512));
        assert_eq!(ok.guidance_scale, 7.5);
        let field = |v| parse(v).unwrap_err().field;
        assert_eq!(field(json!({"prompt": " "})), "input.prompt");
        assert_eq!(field(json!({"prompt": "x", "width": 100})), "input.width");
        assert_eq!(field(json!({"prompt": "x", "steps": 0})), "input.steps");
        assert_eq!(field(json!({"prompt": "x", "scheduler": "pndm"})), "input.scheduler");
        assert_eq!(field(json!({"prompt": "x", "guidance_scale": 31})), "input.guidance_scale");
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
