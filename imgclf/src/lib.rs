//! # imgclf
//!
//! Asynchronous ImageNet image classification. Clients submit images and get a task id at once;
//! workers classify them in batches with a real CNN, store the result and call a webhook.
//!
//! Five small ports, each an object-safe trait used as `Arc<dyn …>`:
//! [`Storage`] (image bytes), [`Queue`] (jobs), [`Classifier`] (the model, synchronous, on its own
//! thread behind a [`ClassifierHandle`]), [`ResultStore`] (task records and their guarded state
//! machine) and [`Notifier`] (callbacks). [`Pipeline`] is the one place where they meet.
//! Backends are chosen at run time from URLs ([`Settings`]); cargo features decide only which
//! are compiled in.
//!
//! The whole pipeline in-process, on the shipped model:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use imgclf::{Settings, Upload, TaskState};
//!
//! let settings = Settings {
//!     storage: Some("memory://".into()),
//!     results: Some("memory://".into()),
//!     ..Settings::default()
//! };
//! let pipeline = Arc::new(settings.build_pipeline().await?);
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let worker = tokio::spawn(pipeline.clone().run_worker(stopped));
//!
//! let bytes = std::fs::read("cat.jpg")?;
//! let id = pipeline.submit(Upload { bytes: bytes.into(), ..Upload::default() }).await?;
//! loop {
//!     let record = pipeline.status(id).await?.expect("accepted tasks are recorded");
//!     if record.state == TaskState::Success {
//!         println!("{:?}", record.result.unwrap().classification[0]);
//!         break;
//!     }
//!     tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//! }
//! stop.send(true)?;
//! worker.await?;
//! # Ok(()) }
//! ```

pub mod classifier;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod preprocess;
pub mod queue;
pub mod results;
pub mod storage;
pub mod task;

pub use classifier::{Classifier, ClassifierHandle, ClassifyError};
pub use config::{ConfigError, Settings};
pub use metrics::Metrics;
pub use model::{ModelError, ModelSpec};
pub use notify::{Notifier, NotifyError};
pub use pipeline::{
    shutdown_signal, ClassifyNowError, Pipeline, PipelineConfig, Ports, SubmitError, Upload,
};
pub use preprocess::{ImageError, Transform};
pub use queue::{Delivery, Queue, QueueError};
pub use results::{ResultStore, ResultsError};
pub use storage::{Storage, StorageError};
pub use task::{
    Job, Prediction, StageTimings, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery,
    WebhookState,
};
