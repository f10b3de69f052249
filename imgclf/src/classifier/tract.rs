//! The pure-Rust backend on tract.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{split_rows, Classifier, ClassifyError};
use crate::model::ModelSpec;

type Plan = Arc<TypedRunnableModel>;

/// tract runs several times faster on a concrete shape than on a symbolic batch dimension, so
/// one optimised plan is compiled per batch size, on first use.
pub struct TractClassifier {
    spec: ModelSpec,
    graph: InferenceModel,
    plans: HashMap<usize, Plan>,
}

impl TractClassifier {
    pub fn new(spec: ModelSpec) -> Result<Self, ClassifyError> {
        let graph = tract_onnx::onnx()
            .model_for_path(&spec.onnx_path)
            .map_err(|e| spec.invalid(format!("cannot load {}: {e}", spec.onnx_path.display())))?;
        let mut classifier = Self {
            spec,
            graph,
            plans: HashMap::new(),
        };
        classifier.plan(1)?;
        Ok(classifier)
    }

    fn plan(&mut self, n: usize) -> Result<Plan, ClassifyError> {
        if let Some(plan) = self.plans.get(&n) {
            return Ok(plan.clone());
        }
        let side = self.spec.transform.crop as usize;
        let plan = self
            .graph
            .clone()
            .with_input_fact(0, f32::fact([n, 3, side, side]).into())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| {
                self.spec
                    .invalid(format!("cannot compile for batch {n}: {e}"))
            })?;
        self.plans.insert(n, plan.clone());
        Ok(plan)
    }
}

impl Classifier for TractClassifier {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let side = self.spec.transform.crop as usize;
        let plan = self.plan(n)?;
        let input = Tensor::from_shape(&[n, 3, side, side], batch)
            .map_err(|e| ClassifyError::Inference(e.to_string()))?;
        let outputs = plan
            .run(tvec!(input.into()))
            .map_err(|e| ClassifyError::Inference(e.to_string()))?;
        let inference = |e: TractError| ClassifyError::Inference(e.to_string());
        let view = outputs[0].try_as_plain_ram().map_err(inference)?;
        let logits = view.as_slice::<f32>().map_err(inference)?;
        split_rows(logits, n)
    }
}
