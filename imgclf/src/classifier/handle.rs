//! Runs a [`Classifier`] on dedicated OS threads and batches whatever is waiting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::Histogram;

use tokio::sync::{mpsc, oneshot};

use super::{Classifier, ClassifyError};
use crate::model::ModelSpec;

type Reply = oneshot::Sender<Result<Vec<f32>, Arc<ClassifyError>>>;

struct Request {
    tensor: Vec<f32>,
    reply: Reply,
}

/// The async face of a classifier: one or more instances of a model, each on its own OS thread.
/// Cheap to clone; the threads stop when the last clone drops.
///
/// Batches form greedily, with no timer: a free thread takes one waiting image, then whatever
/// else is already queued up to `max_batch`. While the model runs, the next batch accumulates.
#[derive(Clone)]
pub struct ClassifierHandle {
    tx: mpsc::UnboundedSender<Request>,
    spec: Arc<ModelSpec>,
    backend: &'static str,
    /// Instances warmed up; ready when all of them are.
    warmed: Arc<AtomicUsize>,
    instances: usize,
    batch_sizes: Arc<OnceLock<Histogram>>,
}

impl ClassifierHandle {
    /// One model on one thread.
    pub fn spawn(classifier: Box<dyn Classifier>, max_batch: usize) -> Self {
        Self::spawn_pool(vec![classifier], max_batch)
    }

    /// Several instances of one model, each on its own thread, taking batches from one queue:
    /// for single-threaded backends (tract), so that inference can use more than one core.
    pub fn spawn_pool(classifiers: Vec<Box<dyn Classifier>>, max_batch: usize) -> Self {
        assert!(!classifiers.is_empty(), "at least one classifier");
        let max_batch = max_batch.max(1);
        let spec = Arc::new(classifiers[0].spec().clone());
        let backend = classifiers[0].backend();
        let warmed = Arc::new(AtomicUsize::new(0));
        let instances = classifiers.len();
        let (tx, rx) = mpsc::unbounded_channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let batch_sizes = Arc::new(OnceLock::<Histogram>::new());
        for (i, mut classifier) in classifiers.into_iter().enumerate() {
            let rx = rx.clone();
            let (warmed, batch_sizes) = (warmed.clone(), batch_sizes.clone());
            std::thread::Builder::new()
                .name(format!("imgclf-infer-{i}"))
                .spawn(move || {
                    // Warm up on the largest batch so the first real one does not pay for
                    // compiling; ready once every instance has.
                    let len = classifier.spec().transform.tensor_len();
                    match classifier.classify(&vec![0.0; len * max_batch], max_batch) {
                        Ok(_) => {
                            warmed.fetch_add(1, Ordering::Release);
                        }
                        Err(error) => tracing::error!(%error, "classifier warm-up failed"),
                    }
                    serve(classifier, &rx, max_batch, &batch_sizes);
                })
                .expect("spawning an inference thread");
        }
        Self {
            tx,
            spec,
            backend,
            warmed,
            instances,
            batch_sizes,
        }
    }

    /// Observes the size of every batch the model runs from now on (the first histogram given
    /// wins).
    pub fn record_batch_sizes(&self, histogram: Histogram) {
        let _ = self.batch_sizes.set(histogram);
    }

    /// The model these threads run.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend running the model (`tract`, `ort`).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Instances of the model, each on its own thread.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// True once every instance of the model is loaded and has run one batch.
    pub fn is_ready(&self) -> bool {
        self.warmed.load(Ordering::Acquire) == self.instances
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

/// One inference thread: takes one waiting image, then whatever else is queued up to
/// `max_batch` (holding the queue only while it collects), runs the batch, answers each image.
fn serve(
    mut classifier: Box<dyn Classifier>,
    rx: &Mutex<mpsc::UnboundedReceiver<Request>>,
    max_batch: usize,
    batch_sizes: &OnceLock<Histogram>,
) {
    let len = classifier.spec().transform.tensor_len();
    let mut batch = Vec::with_capacity(len * max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    loop {
        {
            // A thread that panicked holding the lock left the receiver intact.
            let mut rx = rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(first) = rx.blocking_recv() else {
                return;
            };
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
        }
        if replies.is_empty() {
            continue;
        }
        let n = replies.len();
        if let Some(histogram) = batch_sizes.get() {
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
}
