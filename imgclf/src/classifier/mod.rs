//! The `Classifier` port: a synchronous model owned by one thread, and the async handle that
//! feeds it batches.

mod handle;
#[cfg(feature = "ort")]
mod ort;
#[cfg(feature = "tract")]
mod tract;

#[cfg(feature = "ort")]
pub use self::ort::OrtClassifier;
pub use handle::ClassifierHandle;
#[cfg(feature = "tract")]
pub use tract::TractClassifier;

use crate::model::{ModelError, ModelSpec};

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("unknown classifier {0:?}: this build has {AVAILABLE:?}")]
    Unknown(String),
    #[error("the classifier thread has stopped")]
    Stopped,
}

/// Names of the classifier backends compiled into this build.
pub const AVAILABLE: &[&str] = &[
    #[cfg(feature = "tract")]
    "tract",
    #[cfg(feature = "ort")]
    "ort",
];

/// How to run a backend.
#[derive(Clone, Debug, Default)]
pub struct ClassifierOptions {
    /// Threads one inference may use (ort; tract runs on one).
    pub intra_threads: usize,
    /// `libonnxruntime.so` for the ort backend; `ORT_DYLIB_PATH` when unset.
    pub ort_library: Option<std::path::PathBuf>,
}

/// A model that classifies a batch of preprocessed images.
///
/// Synchronous on purpose: inference is CPU-bound, so the backend lives on its own OS thread
/// (see [`ClassifierHandle`]) and never blocks the async runtime.
pub trait Classifier: Send + 'static {
    fn spec(&self) -> &ModelSpec;

    /// `batch` holds `n` CHW tensors back to back; the answer holds `n` rows of logits.
    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError>;
}

/// Splits a batch's output into one row of logits per image.
#[cfg(any(feature = "tract", feature = "ort"))]
fn split_rows(logits: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
    if n == 0 || !logits.len().is_multiple_of(n) {
        let message = format!("{} logits for {n} images", logits.len());
        return Err(ClassifyError::Inference(message));
    }
    Ok(logits
        .chunks(logits.len() / n)
        .map(<[f32]>::to_vec)
        .collect())
}

/// Builds the named backend for a model.
pub fn build(
    name: &str,
    spec: ModelSpec,
    options: &ClassifierOptions,
) -> Result<Box<dyn Classifier>, ClassifyError> {
    match name {
        #[cfg(feature = "tract")]
        "tract" => Ok(Box::new(TractClassifier::new(spec)?)),
        #[cfg(feature = "ort")]
        "ort" => {
            let library = options
                .ort_library
                .clone()
                .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(Into::into))
                .ok_or_else(|| {
                    spec.invalid(
                        "the ort classifier needs ONNX Runtime: set IMGCLF_ORT_LIB (or \
                         ORT_DYLIB_PATH) to a libonnxruntime.so; scripts/setup-ort.sh extracts one \
                         from the onnxruntime wheel on PyPI",
                    )
                })?;
            Ok(Box::new(OrtClassifier::new(
                spec,
                &library,
                options.intra_threads,
            )?))
        }
        other => {
            let _ = (spec, options);
            Err(ClassifyError::Unknown(other.to_string()))
        }
    }
}
