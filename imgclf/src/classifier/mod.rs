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

/// Why a model could not be built or could not classify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClassifyError {
    /// The model files are missing or invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The backend failed on a batch.
    #[error("inference failed: {0}")]
    Inference(String),
    /// No backend of that name is compiled in.
    #[error("unknown classifier {0:?}: this build has {AVAILABLE:?}")]
    Unknown(String),
    /// The inference threads are gone (the process is stopping).
    #[error("the classifier thread has stopped")]
    Stopped,
}

impl ClassifyError {
    /// Whether trying again (on another worker, later) may help: only when the model was not
    /// there to ask; an image the model fails on fails again.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Stopped)
    }
}

/// Names of the classifier backends compiled into this build.
pub const AVAILABLE: &[&str] = &[
    #[cfg(feature = "tract")]
    "tract",
    #[cfg(feature = "ort")]
    "ort",
];

/// The backend used when none is named.
pub const DEFAULT_BACKEND: &str = "tract";
/// Threads one inference may use, by default.
pub const DEFAULT_INTRA_THREADS: usize = 1;

/// How to run a backend.
#[derive(Clone, Debug)]
pub struct ClassifierOptions {
    /// Threads one inference may use (ort; tract runs on one).
    pub intra_threads: usize,
    /// `libonnxruntime.so` for the ort backend; `ORT_DYLIB_PATH` when unset.
    pub ort_library: Option<std::path::PathBuf>,
    /// Instances of the model side by side, each on its own thread [default: one per core for
    /// tract, which runs single-threaded; 1 for ort, which uses `intra_threads`].
    pub instances: Option<usize>,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        Self {
            intra_threads: DEFAULT_INTRA_THREADS,
            ort_library: None,
            instances: None,
        }
    }
}

/// Loads `spec` into the named backend, as many instances as `options` say, each on its own
/// inference thread feeding batches of up to `max_batch`. Blocking: compiles the model.
pub fn spawn(
    name: &str,
    spec: ModelSpec,
    options: &ClassifierOptions,
    max_batch: usize,
) -> Result<ClassifierHandle, ClassifyError> {
    let instances = options.instances.unwrap_or(match name {
        "tract" => crate::cores(),
        _ => 1,
    });
    let classifiers = (0..instances.max(1))
        .map(|_| build(name, spec.clone(), options))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ClassifierHandle::spawn_pool(classifiers, max_batch))
}

/// A model that classifies a batch of preprocessed images.
///
/// Synchronous on purpose: inference is CPU-bound, so the backend lives on its own OS thread
/// (see [`ClassifierHandle`]) and never blocks the async runtime.
pub trait Classifier: Send + 'static {
    /// The model it runs.
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
