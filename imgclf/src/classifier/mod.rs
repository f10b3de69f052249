//! The `Classifier` port: a synchronous model owned by one thread, and the async handle that
//! feeds it batches.

mod handle;
#[cfg(feature = "tract")]
mod tract;

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
];

/// A model that classifies a batch of preprocessed images.
///
/// Synchronous on purpose: inference is CPU-bound, so the backend lives on its own OS thread
/// (see [`ClassifierHandle`]) and never blocks the async runtime.
pub trait Classifier: Send + 'static {
    fn spec(&self) -> &ModelSpec;

    /// `batch` holds `n` CHW tensors back to back; the answer holds `n` rows of logits.
    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError>;
}

/// Builds the named backend for a model.
pub fn build(name: &str, spec: ModelSpec) -> Result<Box<dyn Classifier>, ClassifyError> {
    match name {
        #[cfg(feature = "tract")]
        "tract" => Ok(Box::new(TractClassifier::new(spec)?)),
        other => {
            drop(spec);
            Err(ClassifyError::Unknown(other.to_string()))
        }
    }
}
