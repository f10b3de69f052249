//! ONNX Runtime through the `ort` crate, loaded at run time from a `libonnxruntime.so` (no
//! download at build time; `scripts/setup-ort.sh` extracts one from the `onnxruntime` wheel).

use std::path::Path;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use super::{split_rows, Classifier, ClassifyError};
use crate::model::ModelSpec;

/// The runtime is loaded once per process; later sessions share it.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            let builder = ort::init_from(library)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?;
            builder
                .with_name("imgclf")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A model on ONNX Runtime: the whole batch runs as one tensor.
pub struct OrtClassifier {
    spec: ModelSpec,
    session: Session,
}

impl OrtClassifier {
    /// `library`: the `libonnxruntime.so` to load; `intra_threads`: threads per inference.
    pub fn new(
        spec: ModelSpec,
        library: &Path,
        intra_threads: usize,
    ) -> Result<Self, ClassifyError> {
        let environment = environment(library).map_err(|e| spec.invalid(e))?;
        let session = Session::builder(environment)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::Level3)
                    .map_err(|e| e.to_string())
            })
            .and_then(|b| {
                b.with_intra_threads(intra_threads.max(1))
                    .map_err(|e| e.to_string())
            })
            .and_then(|mut b| {
                b.commit_from_file(&spec.onnx_path)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| {
                spec.invalid(format!(
                    "ONNX Runtime cannot load {}: {e}",
                    spec.onnx_path.display()
                ))
            })?;
        Ok(Self { spec, session })
    }
}

impl Classifier for OrtClassifier {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn backend(&self) -> &'static str {
        "ort"
    }

    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let inference = |e: ort::Error| ClassifyError::Inference(e.to_string());
        let side = self.spec.transform.crop as usize;
        let input = TensorRef::from_array_view(([n, 3, side, side], batch)).map_err(inference)?;
        let outputs = self.session.run(ort::inputs![input]).map_err(inference)?;
        let (_, logits) = outputs[0].try_extract_tensor::<f32>().map_err(inference)?;
        split_rows(logits, n)
    }
}
