//! What a model is: an ONNX file, its labels and its input transform, described by a manifest.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::preprocess::Transform;
use crate::task::Prediction;

/// The ImageNet-1k class names (torchvision's order), used when a manifest names no labels file.
pub const IMAGENET_LABELS: &str = include_str!("../imagenet_classes.txt");

/// The manifest's file name inside a model directory.
pub const MANIFEST: &str = "model.json";

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file of the model cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `model.json` is not a valid manifest.
    #[error("invalid model manifest {path}: {source}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The ONNX file is not the one the manifest names.
    #[error("checksum mismatch for {path}: expected sha256 {expected}, found {found}")]
    Checksum {
        /// The ONNX file.
        path: PathBuf,
        /// The manifest's sha256.
        expected: String,
        /// The file's.
        found: String,
    },
    /// The model cannot be used as it is.
    #[error("model {name}: {message}")]
    Invalid {
        /// The model.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The manifest as written in `model.json`; paths are relative to the manifest's directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The model's name, reported with every result.
    pub name: String,
    /// The ONNX file [default: `model.onnx`].
    #[serde(default = "default_file")]
    pub file: String,
    /// Hex sha256 of the ONNX file, checked at load when given.
    pub sha256: Option<String>,
    /// A file with one class name a line; the ImageNet-1k names when absent.
    pub labels: Option<String>,
    /// The input transform [default: ImageNet's].
    #[serde(default)]
    pub transform: Transform,
}

fn default_file() -> String {
    "model.onnx".into()
}

/// A model ready to hand to a classifier backend: its bytes are checked, its labels read.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// The model's name, reported with every result.
    pub name: String,
    /// The ONNX file.
    pub onnx_path: PathBuf,
    /// Class names, by class index.
    pub labels: Vec<String>,
    /// How images become its input.
    pub transform: Transform,
}

impl ModelSpec {
    /// Loads a model from a directory (with `model.json`, or just `model.onnx` and ImageNet
    /// defaults) or from a manifest file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let manifest_path = if path.is_dir() {
            path.join(MANIFEST)
        } else {
            path.to_path_buf()
        };
        let dir = manifest_path
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        // The ImageNet defaults stand in for a manifest only in a directory: a mistyped path
        // is an error, not the ONNX file that happens to lie beside it.
        let manifest = if manifest_path.is_file() || !path.is_dir() {
            let text = read(&manifest_path)?;
            serde_json::from_slice(&text).map_err(|source| ModelError::Manifest {
                path: manifest_path.clone(),
                source,
            })?
        } else {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            Manifest {
                name: name.unwrap_or_else(|| "model".into()),
                file: default_file(),
                sha256: None,
                labels: None,
                transform: Transform::default(),
            }
        };
        let onnx_path = dir.join(&manifest.file);
        if let Some(expected) = &manifest.sha256 {
            let found = hex::encode(Sha256::digest(read(&onnx_path)?));
            if !found.eq_ignore_ascii_case(expected) {
                return Err(ModelError::Checksum {
                    path: onnx_path,
                    expected: expected.clone(),
                    found,
                });
            }
        } else if !onnx_path.is_file() {
            return Err(ModelError::Io {
                path: onnx_path,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let labels = match &manifest.labels {
            Some(file) => {
                let path = dir.join(file);
                let bytes = read(&path)?;
                parse_labels(&String::from_utf8_lossy(&bytes))
            }
            None => parse_labels(IMAGENET_LABELS),
        };
        let spec = Self {
            name: manifest.name,
            onnx_path,
            labels,
            transform: manifest.transform,
        };
        if spec.transform.crop == 0 || spec.transform.resize < spec.transform.crop {
            return Err(spec.invalid("transform needs 0 < crop <= resize"));
        }
        if spec.labels.is_empty() {
            return Err(spec.invalid("no labels"));
        }
        Ok(spec)
    }

    /// Softmax over the logits, then the `k` most probable classes, most probable first.
    pub fn top_k(&self, logits: &[f32], k: usize) -> Vec<Prediction> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        // Most probable first, ties to the lower class id.
        let by_probability = |a: &usize, b: &usize| exp[*b].total_cmp(&exp[*a]).then(a.cmp(b));
        let mut order: Vec<usize> = (0..exp.len()).collect();
        // The k most probable are picked out first, so that the other classes (995 of
        // ImageNet's 1,000 for the default 5) are not sorted for every image.
        if let Some(last) = k.checked_sub(1).filter(|&last| last + 1 < order.len()) {
            order.select_nth_unstable_by(last, by_probability);
        }
        order.truncate(k);
        order.sort_unstable_by(by_probability);
        order
            .into_iter()
            .map(|class_id| Prediction {
                label: self
                    .labels
                    .get(class_id)
                    .cloned()
                    .unwrap_or_else(|| class_id.to_string()),
                class_id,
                probability: exp[class_id] / sum,
            })
            .collect()
    }

    pub(crate) fn invalid(&self, message: impl Into<String>) -> ModelError {
        ModelError::Invalid {
            name: self.name.clone(),
            message: message.into(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_labels(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_labels_are_complete() {
        let labels = parse_labels(IMAGENET_LABELS);
        assert_eq!(labels.len(), 1000);
        assert_eq!(labels[134], "crane bird");
        assert_eq!(labels[639], "maillot tank suit");
    }

    #[test]
    fn top_k_is_a_sorted_softmax() {
        let spec = ModelSpec {
            name: "t".into(),
            onnx_path: PathBuf::new(),
            labels: vec!["a".into(), "b".into(), "c".into()],
            transform: Transform::default(),
        };
        let top = spec.top_k(&[1.0, 3.0, 2.0], 2);
        assert_eq!(
            top.iter().map(|p| p.class_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let total: f32 = spec
            .top_k(&[1.0, 3.0, 2.0], 3)
            .iter()
            .map(|p| p.probability)
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((top[0].probability - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn top_k_is_the_head_of_every_class_sorted() {
        let spec = ModelSpec {
            name: "t".into(),
            onnx_path: PathBuf::new(),
            labels: (0..1000).map(|i| i.to_string()).collect(),
            transform: Transform::default(),
        };
        // Scattered logits with many ties (a tie goes to the lower class id).
        let logits: Vec<f32> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as f32 / 16.0)
            .collect();
        let all = spec.top_k(&logits, logits.len());
        for pair in all.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let ordered = a.probability > b.probability
                || (a.probability == b.probability && a.class_id < b.class_id);
            assert!(ordered, "{} before {}", a.class_id, b.class_id);
        }
        for k in [0, 1, 5, 17, 999, 1000, 1001] {
            let top = spec.top_k(&logits, k);
            assert_eq!(top, all[..k.min(all.len())], "k = {k}");
        }
    }

    #[test]
    fn a_wrong_checksum_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"not a model").unwrap();
        std::fs::write(
            dir.path().join(MANIFEST),
            r#"{"name": "x", "sha256": "00"}"#,
        )
        .unwrap();
        assert!(matches!(
            ModelSpec::load(dir.path()),
            Err(ModelError::Checksum { .. })
        ));
    }

    #[test]
    fn a_mistyped_path_is_an_error_not_the_model_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"not a model").unwrap();
        for wrong in [
            dir.path().join("typo.json"),
            dir.path().join("nothing/here"),
        ] {
            assert!(
                matches!(ModelSpec::load(&wrong), Err(ModelError::Io { ref path, .. }) if *path == wrong),
                "{wrong:?}"
            );
        }
    }
}
