//! The model repository: one folder per model, each with a `kiln.toml` saying which task it serves,
//! where its files are (or which registry package they are fetched from), its batch size and its
//! execution providers in order of preference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_proto::{InputLimits, ModelInfo, ModelName, Task};
use serde::Deserialize;

use crate::assets::WheelSource;

/// The built-in repository, served when the configured folder does not exist (an installed `kiln`
/// run outside a checkout).
const BUILTIN: &[(&str, &str)] = &[
    ("all-minilm-l6-v2", include_str!("../../models/all-minilm-l6-v2/kiln.toml")),
    ("terrain-diffusion", include_str!("../../models/terrain-diffusion/kiln.toml")),
    ("ppocr-v4", include_str!("../../models/ppocr-v4/kiln.toml")),
    ("open-nsfw", include_str!("../../models/open-nsfw/kiln.toml")),
    ("silero-vad", include_str!("../../models/silero-vad/kiln.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum ModelConfigError {
    #[error("cannot read model repository {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("model repository {0} holds no model (no <name>/kiln.toml)")]
    Empty(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cuda,
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// Tokens per text; longer texts are truncated.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Whether a prefix of the model's vector is an embedding too (a Matryoshka-trained model):
    /// only then does `POST /v1/embeddings` accept OpenAI's `dimensions` (the vector is cut to
    /// that many components and normalised again). Default false: `dimensions` is refused.
    #[serde(default)]
    pub matryoshka: bool,
}

fn default_max_length() -> usize {
    256
}
fn default_pooling() -> Pooling {
    Pooling::Mean
}
fn yes() -> bool {
    true
}

/// Settings of a one-step consistency image model (`[consistency]`; the defaults are the terrain
/// model's): the model takes pure noise at `sigma` and returns the denoised field in about −1..1,
/// which becomes heights through `h = scale·sinh(u·asinh(max_height/scale))`, `u = (v+1)/2`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsistencySpec {
    pub sigma: f32,
    pub height_scale: f64,
    pub max_height: f64,
    /// The model's native output size; other requested sizes are resampled.
    pub native_size: u32,
}

impl Default for ConsistencySpec {
    fn default() -> Self {
        Self { sigma: 80.0, height_scale: 0.1, max_height: 22.168_640_136_718_75, native_size: 128 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    task: Task,
    version: String,
    max_batch: usize,
    #[serde(default = "default_eps")]
    execution_providers: Vec<ExecutionProvider>,
    files: BTreeMap<String, String>,
    source: Option<WheelSource>,
    embedding: Option<EmbeddingSpec>,
    consistency: Option<ConsistencySpec>,
    #[serde(default)]
    limits: InputLimits,
    /// Deliveries a worker holds for this model; default: the worker's `KILN_PREFETCH` for
    /// embeddings, 2 for image tasks (one running, one ready: long jobs are not hoarded).
    prefetch: Option<u16>,
    /// One result cache for every tenant (off: each tenant has its own). Only for models whose
    /// inputs are not secrets: a shared hit answers at once, which tells its caller that
    /// someone sent the same input before (the record still says `cached: false`).
    #[serde(default)]
    shared_cache: bool,
    moderation: Option<ModerationSpec>,
}

/// How an image-generating model screens its images (`[moderation]`): each image is scored by the
/// named `image-moderation` model of the same repository before it is stored, when a job asks
/// for it (`"moderate": true`); images whose `nsfw` score passes `threshold` are withheld.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerationSpec {
    pub model: String,
    #[serde(default = "default_moderation_threshold")]
    pub threshold: f32,
}

fn default_moderation_threshold() -> f32 {
    0.8
}

fn default_eps() -> Vec<ExecutionProvider> {
    vec![ExecutionProvider::Cpu]
}

/// One model, resolved.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: ModelName,
    pub version: String,
    pub task: Task,
    pub max_batch: usize,
    pub execution_providers: Vec<ExecutionProvider>,
    /// Logical file name (`model`, `tokenizer`) → file name inside [`ModelSpec::dir`].
    pub files: BTreeMap<String, String>,
    /// Where the files come from when they are not in the model's folder.
    pub source: Option<WheelSource>,
    pub embedding: Option<EmbeddingSpec>,
    pub consistency: ConsistencySpec,
    pub limits: InputLimits,
    /// Deliveries a worker holds for this model, when the model sets it.
    pub prefetch: Option<u16>,
    /// The model's folder in the repository (None for a built-in model).
    pub folder: Option<PathBuf>,
    /// Whether every tenant shares one result cache for this model.
    pub shared_cache: bool,
    /// For image-generating models: the moderation model that screens images on request.
    pub moderation: Option<ModerationSpec>,
}

impl ModelSpec {
    fn parse(name: &str, text: &str, path: &Path, folder: Option<PathBuf>) -> Result<Self, ModelConfigError> {
        let invalid = |message: String| ModelConfigError::Invalid { path: path.to_owned(), message };
        let raw: RawSpec = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let name = ModelName::new(name).map_err(|e| invalid(e.to_string()))?;
        if !(1..=1024).contains(&raw.max_batch) {
            return Err(invalid(format!("max_batch must be 1..=1024, got {}", raw.max_batch)));
        }
        if raw.execution_providers.is_empty() {
            return Err(invalid("execution_providers must name at least one provider".into()));
        }
        let needs: &[&str] = match raw.task {
            Task::Embedding => &["model", "tokenizer"],
            Task::ImageGeneration => &["model"],
            // The export's own folder layout (text_encoder/, unet/, vae_decoder/, tokenizer/).
            Task::TextToImage => &[],
            Task::Ocr => &["det", "cls", "rec"],
            Task::ImageModeration | Task::SpeechSegments => &["model"],
        };
        for f in needs {
            if !raw.files.contains_key(*f) {
                return Err(invalid(format!("a {} model needs files.{f}", raw.task.as_str())));
            }
        }
        if raw.prefetch == Some(0) {
            return Err(invalid("prefetch must be at least 1".into()));
        }
        if let Some(m) = &raw.moderation {
            if !raw.task.produces_files() {
                return Err(invalid("[moderation] is for image-generating models".into()));
            }
            if !(0.0..=1.0).contains(&m.threshold) {
                return Err(invalid(format!("moderation.threshold must be 0..=1, got {}", m.threshold)));
            }
        }
        let prefetch = raw.prefetch.or(match raw.task {
            Task::Embedding => None,
            Task::ImageGeneration | Task::TextToImage | Task::SpeechSegments => Some(2),
            // Short jobs batched across jobs: two batches' worth, one running and one gathering.
            Task::Ocr | Task::ImageModeration => Some((raw.max_batch * 2).min(256) as u16),
        });
        Ok(Self {
            name,
            version: raw.version,
            task: raw.task,
            max_batch: raw.max_batch,
            execution_providers: raw.execution_providers,
            files: raw.files,
            source: raw.source,
            embedding: raw.embedding,
            consistency: raw.consistency.unwrap_or_default(),
            limits: raw.limits,
            prefetch,
            folder,
            shared_cache: raw.shared_cache,
            moderation: raw.moderation,
        })
    }

    /// The folder holding the model's files: the fetched-assets cache when the model comes from a
    /// package, else its repository folder.
    pub fn dir(&self, cache_dir: &Path) -> PathBuf {
        match (&self.source, &self.folder) {
            (Some(_), _) | (None, None) => cache_dir.join("models").join(self.name.as_str()).join(&self.version),
            (None, Some(folder)) => folder.clone(),
        }
    }

    pub fn file(&self, cache_dir: &Path, logical: &str) -> Option<PathBuf> {
        self.files.get(logical).map(|f| self.dir(cache_dir).join(f))
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            task: self.task,
            max_batch: self.max_batch,
            input_schema: self.task.input_schema(&self.limits),
            workers: Vec::new(),
        }
    }
}

/// All models of a repository, by name.
#[derive(Debug, Clone, Default)]
pub struct ModelRepository {
    models: BTreeMap<ModelName, ModelSpec>,
}

impl ModelRepository {
    /// Loads `dir/*/kiln.toml`, or the built-in repository when `dir` does not exist.
    pub fn load(dir: &Path) -> Result<Self, ModelConfigError> {
        if !dir.exists() {
            return Self::builtin();
        }
        let io = |source| ModelConfigError::Io { path: dir.to_owned(), source };
        let mut models = BTreeMap::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path().join("kiln.toml");
            if !path.is_file() {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|source| ModelConfigError::Io { path: path.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let spec = ModelSpec::parse(&name, &text, &path, Some(entry.path()))?;
            models.insert(spec.name.clone(), spec);
        }
        if models.is_empty() {
            return Err(ModelConfigError::Empty(dir.to_owned()));
        }
        Ok(Self { models })
    }

    pub fn builtin() -> Result<Self, ModelConfigError> {
        let mut models = BTreeMap::new();
        for (name, text) in BUILTIN {
            let spec = ModelSpec::parse(name, text, Path::new(&format!("<built-in>/{name}/kiln.toml")), None)?;
            models.insert(spec.name.clone(), spec);
        }
        Ok(Self { models })
    }

    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        ModelName::new(name).ok().and_then(|n| self.models.get(&n))
    }

    pub fn names(&self) -> Vec<ModelName> {
        self.models.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelSpec> {
        self.models.values()
    }

    /// Keeps only the named models; an unknown name is an error.
    pub fn select(mut self, names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            return Ok(self);
        }
        let mut kept = BTreeMap::new();
        for n in names {
            let spec = self.get(n).cloned().ok_or_else(|| format!("model {n:?} is not in the repository"))?;
            kept.insert(spec.name.clone(), spec);
        }
        self.models = kept;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_repository_serves_minilm() {
        let repo = ModelRepository::builtin().unwrap();
        let m = repo.get("all-minilm-l6-v2").unwrap();
        assert_eq!(m.task, Task::Embedding);
        assert!(m.source.is_some());
        assert_eq!(m.embedding.as_ref().unwrap().max_length, 256);
    }

    #[test]
    fn builtin_repository_serves_terrain() {
        let repo = ModelRepository::builtin().unwrap();
        let m = repo.get("terrain-diffusion").unwrap();
        assert_eq!(m.task, Task::ImageGeneration);
        assert_eq!((m.prefetch, m.max_batch, m.limits.default_width), (Some(2), 1, 128));
        assert_eq!(m.consistency.sigma, 80.0);
    }

    #[test]
    fn rejects_bad_specs_with_the_path() {
        let t2i = "task = \"text-to-image\"\nversion = \"1\"\nmax_batch = 1\n[files]\n";
        assert_eq!(ModelSpec::parse("m", t2i, Path::new("k"), None).unwrap().prefetch, Some(2));
        let bad = "task = \"embedding\"\nversion = \"1\"\nmax_batch = 0\n[files]\nmodel=\"m\"\ntokenizer=\"t\"\n";
        let err = ModelSpec::parse("m", bad, Path::new("x/kiln.toml"), None).unwrap_err().to_string();
        assert!(err.contains("x/kiln.toml") && err.contains("max_batch"), "{err}");
        let missing = "task = \"embedding\"\nversion = \"1\"\nmax_batch = 4\n[files]\nmodel=\"m\"\n";
        assert!(
            ModelSpec::parse("m", missing, Path::new("k"), None).unwrap_err().to_string().contains("files.tokenizer")
        );
    }
}
