//! The pure-Rust backend on tract.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{split_rows, Classifier, ClassifyError};
use crate::model::ModelSpec;

/// tract runs several times faster on a concrete input shape than on a symbolic batch
/// dimension, and on these CNNs a batch-1 plan run once per image beats every batched plan we
/// measured (EfficientNet-Lite0: 18 images/s at batch 1, 12 at batches 4 to 16; see
/// BENCHMARKS.md). So the model is compiled once, for one image, and a batch runs image by image.
pub struct TractClassifier {
    spec: ModelSpec,
    plan: Arc<TypedRunnableModel>,
}

impl TractClassifier {
    /// Compiles the model for one image of its input size.
    pub fn new(spec: ModelSpec) -> Result<Self, ClassifyError> {
        let side = spec.transform.crop as usize;
        let plan = tract_onnx::onnx()
            .model_for_path(&spec.onnx_path)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, 3, side, side]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| {
                spec.invalid(format!(
                    "tract cannot load {}: {e}",
                    spec.onnx_path.display()
                ))
            })?;
        Ok(Self { spec, plan })
    }
}

impl Classifier for TractClassifier {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn backend(&self) -> &'static str {
        "tract"
    }

    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let inference = |e: TractError| ClassifyError::Inference(e.to_string());
        let side = self.spec.transform.crop as usize;
        let len = 3 * side * side;
        if batch.len() != n * len {
            let message = format!("{} values for {n} images of {len}", batch.len());
            return Err(ClassifyError::Inference(message));
        }
        let mut logits = Vec::new();
        for image in batch.chunks_exact(len) {
            let input = Tensor::from_shape(&[1, 3, side, side], image).map_err(inference)?;
            let outputs = self.plan.run(tvec!(input.into())).map_err(inference)?;
            let view = outputs[0].try_as_plain_ram().map_err(inference)?;
            logits.extend_from_slice(view.as_slice::<f32>().map_err(inference)?);
        }
        split_rows(&logits, n)
    }
}
