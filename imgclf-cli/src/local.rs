//! `--local`: the imgclf library embedded in this process, as any program would embed it.
//!
//! The whole pipeline runs in memory: images in memory storage, jobs on the memory queue, task
//! records in memory results. A [`imgclf::Submitter`] accepts each image (checking it as a
//! server would), the [`imgclf::Worker`] classifies them in batches on every core, and
//! [`imgclf::Submitter::wait`] hands back each record as soon as it is final.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use imgclf::{Settings, Submitter, TaskId, Upload};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::run::{Fatal, Verdict};

/// Which model runs in-process, and on what.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// With --local: the model directory (with model.json) [default: the shipped
    /// EfficientNet-Lite0].
    #[arg(long, env = "IMGCLF_MODEL")]
    model: Option<PathBuf>,
    /// With --local: the inference backend, `auto` (ONNX Runtime when its library is found,
    /// else tract), `tract` (pure Rust) or `ort` (ONNX Runtime).
    #[arg(long, env = "IMGCLF_CLASSIFIER", default_value = imgclf::classifier::DEFAULT_BACKEND)]
    classifier: String,
    /// With --local: the `libonnxruntime.so` for `ort` and `auto` [default: ORT_DYLIB_PATH,
    /// beside the binary, or the `onnxruntime` Python package's].
    #[arg(long, env = "IMGCLF_ORT_LIB")]
    ort_lib: Option<PathBuf>,
    /// With --local: instances of the model run side by side [default: measured at start so
    /// that inference and preprocessing share the cores by their costs].
    #[arg(long, env = "IMGCLF_INFERENCE_THREADS")]
    inference_threads: Option<usize>,
}

/// The pipeline, running in this process.
pub struct Local {
    submitter: Arc<Submitter>,
    top_k: usize,
    stop: watch::Sender<bool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Local {
    /// Loads the model and starts the worker.
    pub async fn start(args: &ModelArgs, top_k: usize) -> anyhow::Result<Self> {
        let settings = Settings {
            storage: Some("memory://".into()),
            queue: Some("memory://".into()),
            results: Some("memory://".into()),
            model: args.model.clone(),
            classifier: args.classifier.clone(),
            ort_lib: args.ort_lib.clone(),
            inference_threads: args.inference_threads,
            top_k,
            // The run bounds the images in flight itself.
            max_queue_depth: 0,
            // Nobody to call back.
            webhook_attempts: 0,
            ..Settings::default()
        };
        let pipeline = settings
            .build_pipeline()
            .await
            .with_context(|| format!("loading the model ({})", args.classifier))?;
        let (stop, stopped) = watch::channel(false);
        let worker = tokio::spawn(pipeline.worker().clone().run(stopped));
        Ok(Self {
            submitter: pipeline.submitter().clone(),
            top_k,
            stop,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Submits one image; returns its task id, or why it was refused.
    pub async fn submit(
        &self,
        name: &str,
        bytes: Bytes,
        key: &str,
    ) -> Result<Result<String, String>, Fatal> {
        let upload = Upload {
            bytes,
            filename: Some(name.to_string()),
            // Identical files in one run become one task, classified once.
            idempotency_key: Some(key.to_string()),
            top_k: Some(self.top_k),
            ..Upload::default()
        };
        Ok(match self.submitter.submit(upload).await {
            Ok(id) => Ok(id.to_string()),
            Err(error) => Err(format!("not accepted: {error}")),
        })
    }

    /// Waits for the task's record to be final, or `timeout`.
    pub async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Verdict, Fatal> {
        let id: TaskId = task_id
            .parse()
            .map_err(|_| Fatal(format!("not a task id: {task_id}")))?;
        let record = match self.submitter.wait(id, timeout).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return Ok(Verdict::error(
                    Some(task_id.into()),
                    "the task vanished".into(),
                ))
            }
            Err(error) => return Err(Fatal(format!("the in-memory result store failed: {error}"))),
        };
        if !record.state.is_final() {
            return Ok(Verdict::from_record(&record).timed_out(timeout));
        }
        // Memory storage would otherwise keep every image of the run until it ends.
        let _ = self
            .submitter
            .ports()
            .storage
            .delete(&record.object_key)
            .await;
        Ok(Verdict::from_record(&record))
    }

    /// Stops the worker, once every result is in.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let worker = self.worker.lock().expect("not poisoned").take();
        if let Some(worker) = worker {
            let _ = worker.await;
        }
    }
}
