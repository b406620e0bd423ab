//! The model directory's manifest (`rsclip.json`, written by tools/export_model.py) and its
//! validation: every file present, checksums right, settings within what rsclip supports.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "rsclip.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GraphSpec {
    pub file: String,
    pub input: String,
    pub output: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FileSpec {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub model_id: String,
    pub revision: String,
    pub embedding_dim: usize,
    pub image_size: usize,
    pub resample: String,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub max_text_length: usize,
    pub pad_token_id: i64,
    pub logit_scale: f64,
    pub logit_bias: f64,
    pub opset: u32,
    pub precision: String,
    pub vision: GraphSpec,
    pub text: GraphSpec,
    pub files: BTreeMap<String, FileSpec>,
}

/// What went wrong loading a model directory; each names the file involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// A file (or the directory) does not exist.
    Missing(PathBuf),
    /// A file exists but cannot be read.
    Unreadable(PathBuf, String),
    Invalid(PathBuf, String),
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Missing(p) => write!(f, "model file \"{}\" does not exist", p.display()),
            ManifestError::Unreadable(p, e) => {
                write!(f, "could not read model file \"{}\": {e}", p.display())
            }
            ManifestError::Invalid(p, e) => {
                write!(f, "invalid model file \"{}\": {e}", p.display())
            }
            ManifestError::Checksum {
                path,
                expected,
                actual,
            } => write!(
                f,
                "model file \"{}\" has sha256 {actual}, but the manifest says {expected}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ManifestError {}

fn read(path: &Path) -> Result<Vec<u8>, ManifestError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ManifestError::Missing(path.to_path_buf()),
        _ => ManifestError::Unreadable(path.to_path_buf(), e.to_string()),
    })
}

/// A model directory whose manifest has been read and checked (but whose graphs are not loaded).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ModelDir {
    /// Reads and validates `dir/rsclip.json`. File checksums are verified by [`ModelDir::read_verified`]
    /// when each file is loaded, so a text query never hashes the vision graph.
    pub fn open(dir: &Path) -> Result<ModelDir, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = read(&path)?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ManifestError::Invalid(path.clone(), e.to_string()))?;
        let invalid = |msg: String| Err(ManifestError::Invalid(path.clone(), msg));
        if manifest.format != FORMAT_VERSION {
            return invalid(format!(
                "format {} is not supported (expected {FORMAT_VERSION})",
                manifest.format
            ));
        }
        if !matches!(manifest.precision.as_str(), "fp32" | "fp16") {
            return invalid(format!(
                "precision {} is not supported (fp32 or fp16)",
                manifest.precision
            ));
        }
        if manifest.resample != "bicubic" {
            return invalid(format!(
                "resample {} is not supported (bicubic only)",
                manifest.resample
            ));
        }
        if !(1..=rsclip_core::MAX_DIMS).contains(&manifest.embedding_dim) {
            return invalid(format!(
                "embedding_dim {} out of range",
                manifest.embedding_dim
            ));
        }
        if !(1..=4096).contains(&manifest.image_size)
            || !(1..=4096).contains(&manifest.max_text_length)
        {
            return invalid("image_size or max_text_length out of range".into());
        }
        if manifest.image_std.contains(&0.0) || !manifest.rescale_factor.is_finite() {
            return invalid("image_std must be non-zero and rescale_factor finite".into());
        }
        for name in [
            &manifest.vision.file,
            &manifest.text.file,
            &"tokenizer.json".to_string(),
        ] {
            if !manifest.files.contains_key(name.as_str()) {
                return invalid(format!("no checksum for {name}"));
            }
            if name.contains('/') || name.contains("..") {
                return invalid(format!(
                    "file name {name} must be a plain name inside the model directory"
                ));
            }
        }
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Reads a file listed in the manifest and verifies its sha256.
    pub fn read_verified(&self, name: &str) -> Result<Vec<u8>, ManifestError> {
        let path = self.dir.join(name);
        let spec = self.manifest.files.get(name).ok_or_else(|| {
            ManifestError::Invalid(self.dir.join(MANIFEST_FILE), format!("no entry for {name}"))
        })?;
        let bytes = read(&path)?;
        let actual = hex(&Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&spec.sha256) {
            return Err(ManifestError::Checksum {
                path,
                expected: spec.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Identifies the model for cache keys: changes whenever any graph, the tokenizer or the
    /// preprocessing changes.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (name, spec) in &self.manifest.files {
            h.update(name.as_bytes());
            h.update(spec.sha256.as_bytes());
        }
        h.update(format!(
            "{}|{}|{:?}|{:?}|{}",
            self.manifest.image_size,
            self.manifest.rescale_factor,
            self.manifest.image_mean,
            self.manifest.image_std,
            self.manifest.max_text_length
        ));
        hex(&h.finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
