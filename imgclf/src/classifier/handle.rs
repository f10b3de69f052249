//! Runs a [`Classifier`] on a dedicated OS thread and batches whatever is waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::Histogram;

use tokio::sync::{mpsc, oneshot};

use super::{Classifier, ClassifyError};
use crate::model::ModelSpec;

type Reply = oneshot::Sender<Result<Vec<f32>, Arc<ClassifyError>>>;

struct Request {
    tensor: Vec<f32>,
    reply: Reply,
}

/// The async face of a classifier. Cheap to clone; the thread stops when the last clone drops.
///
/// Batches form greedily, with no timer: the thread takes one waiting image, then whatever else
/// is already queued up to `max_batch`. While the model runs, the next batch accumulates.
#[derive(Clone)]
pub struct ClassifierHandle {
    tx: mpsc::UnboundedSender<Request>,
    spec: Arc<ModelSpec>,
    ready: Arc<AtomicBool>,
    batch_sizes: Arc<OnceLock<Histogram>>,
}

impl ClassifierHandle {
    pub fn spawn(mut classifier: Box<dyn Classifier>, max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        let spec = Arc::new(classifier.spec().clone());
        let ready = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let thread_ready = ready.clone();
        let batch_sizes = Arc::new(OnceLock::<Histogram>::new());
        let thread_batch_sizes = batch_sizes.clone();
        std::thread::Builder::new()
            .name("imgclf-infer".into())
            .spawn(move || {
                let len = classifier.spec().transform.tensor_len();
                // Warm up on the largest batch so the first real one does not pay for compiling.
                let warm = classifier.classify(&vec![0.0; len * max_batch], max_batch);
                if let Err(error) = &warm {
                    tracing::error!(%error, "classifier warm-up failed");
                }
                thread_ready.store(warm.is_ok(), Ordering::Release);
                let mut batch = Vec::with_capacity(len * max_batch);
                let mut replies = Vec::with_capacity(max_batch);
                while let Some(first) = rx.blocking_recv() {
                    let mut next = Some(first);
                    while let Some(request) = next.take() {
                        if request.tensor.len() == len {
                            batch.extend_from_slice(&request.tensor);
                            replies.push(request.reply);
                        } else {
                            let error = ClassifyError::Inference(format!(
                                "tensor of {} values, expected {len}",
                                request.tensor.len()
                            ));
                            let _ = request.reply.send(Err(Arc::new(error)));
                        }
                        if replies.len() < max_batch {
                            next = rx.try_recv().ok();
                        }
                    }
                    if replies.is_empty() {
                        continue;
                    }
                    let n = replies.len();
                    if let Some(histogram) = thread_batch_sizes.get() {
                        histogram.observe(n as f64);
                    }
                    let _span = tracing::debug_span!("infer", n).entered();
                    match classifier.classify(&batch, n) {
                        Ok(rows) => {
                            for (reply, row) in replies.drain(..).zip(rows) {
                                let _ = reply.send(Ok(row));
                            }
                        }
                        Err(error) => {
                            let error = Arc::new(error);
                            for reply in replies.drain(..) {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                    }
                    batch.clear();
                }
            })
            .expect("spawning the inference thread");
        Self {
            tx,
            spec,
            ready,
            batch_sizes,
        }
    }

    /// Observes the size of every batch the model runs from now on (the first histogram given
    /// wins).
    pub fn record_batch_sizes(&self, histogram: Histogram) {
        let _ = self.batch_sizes.set(histogram);
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// True once the model is loaded and has run one batch.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Classifies one preprocessed image; returns its logits.
    pub async fn logits(&self, tensor: Vec<f32>) -> Result<Vec<f32>, Arc<ClassifyError>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { tensor, reply })
            .map_err(|_| Arc::new(ClassifyError::Stopped))?;
        answer.await.map_err(|_| Arc::new(ClassifyError::Stopped))?
    }
}
