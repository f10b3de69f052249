//! # imgclf
//!
//! Asynchronous ImageNet image classification. Clients submit images and get a task id at once;
//! workers classify them in batches with a real CNN, store the result and call a webhook.
//!
//! Five small ports, each an object-safe trait used as `Arc<dyn …>`:
//! [`Storage`] (image bytes), [`Queue`] (jobs), [`Classifier`] (the model, synchronous, on its own
//! thread behind a [`ClassifierHandle`]), [`ResultStore`] (task records and their guarded state
//! machine) and [`Notifier`] (callbacks). They meet in two places: a [`Submitter`] accepts
//! images and holds no model; a [`Worker`] owns the model and turns queued jobs into results;
//! [`Pipeline`] runs both in one process. `Settings::build_submitter`, `build_worker` and
//! `build_pipeline` build either side or both.
//! Backends are chosen at run time from URLs ([`Settings`]); cargo features decide only which
//! are compiled in.
//!
//! The whole pipeline in-process, on the shipped model:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use imgclf::{Settings, Upload, TaskState};
//!
//! let settings = Settings {
//!     storage: Some("memory://".into()),
//!     results: Some("memory://".into()),
//!     ..Settings::default()
//! };
//! let pipeline = settings.build_pipeline().await?;
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let worker = tokio::spawn(pipeline.worker().clone().run(stopped));
//!
//! let bytes = std::fs::read("cat.jpg")?;
//! let submitter = pipeline.submitter();
//! let id = submitter.submit(Upload { bytes: bytes.into(), ..Upload::default() }).await?;
//! let record = submitter.wait(id, Duration::from_secs(30)).await?.expect("accepted tasks are recorded");
//! assert_eq!(record.state, TaskState::Success);
//! println!("{:?}", record.result.unwrap().classification[0]);
//! stop.send(true)?;
//! worker.await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod affinity;
pub mod classifier;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod health;
#[cfg(feature = "cli")]
pub mod logs;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod preprocess;
pub mod queue;
pub mod results;
pub mod scheduling;
pub mod storage;
pub mod task;

pub use classifier::{Classifier, ClassifierHandle, ClassifyError};
pub use config::{ConfigError, Settings};
pub use metrics::Metrics;
pub use model::{ModelError, ModelSpec};
pub use notify::{Notifier, NotifyError};
pub use pipeline::{
    shutdown_signal, ClassifyNowError, Pipeline, PipelineConfig, Ports, SubmitError, Submitter,
    Upload, Worker,
};
pub use preprocess::{ImageError, Transform};
pub use queue::{Delivery, Queue, QueueError};
pub use results::{FinalTasks, ResultStore, ResultsError, StateCounts, TaskQuery};
pub use storage::{Storage, StorageError};
pub use task::{
    Job, Prediction, StageTimings, TaskId, TaskRecord, TaskResult, TaskState, TaskStatus,
    WebhookDelivery, WebhookState,
};

/// The source of a backend error, kept so the log can say what really failed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its causes on one line, as a binary reports why it stopped: a cause is left
/// out where the message before it already quotes it (this crate's errors quote their sources).
pub fn error_line<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut line = String::new();
    for error in chain {
        let text = error.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// A fresh id that ties what a client is told ("error id …") to the log line with the details.
pub fn error_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Caps glibc's malloc arenas at the number of cores (at least two), unless `MALLOC_ARENA_MAX`
/// is set. By default glibc keeps up to eight per core, one for each thread that allocated
/// under contention, and decoded photos' buffers freed in them stay resident: on the embedded
/// service under 16 clients (AMD EPYC, 2 cores) peak RSS went from 363 to 294 MiB with the cap,
/// throughput unchanged.
///
/// It also fixes the size from which an allocation gets its own mapping at 1 MiB, unless
/// `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` is set. glibc raises that size to each large
/// block freed (up to 32 MiB), so the model's load-time copies and a large photo's buffers
/// end up in the heap and stay resident after they are freed: ResNet18 embedded under 16
/// clients (AMD EPYC Zen 4, 2 cores) peaked at 408–412 MiB without it and 271 with it, as
/// fast (EfficientNet-Lite0: the same within noise).
///
/// Fixing that size also fixes, at 128 KiB, how much free memory at the top of a heap makes
/// glibc hand it back to the kernel, so each upload's body and tensor (a few hundred KiB) would
/// fault its pages in afresh: it keeps up to 4 MiB there instead, unless
/// `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES` is set.
///
/// For binaries, first thing in `main`. Off glibc it does nothing.
#[allow(unsafe_code)]
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |name: &str| std::env::var_os(name).is_none();
        if unset("MALLOC_ARENA_MAX") {
            let arenas = libc::c_int::try_from(cores().max(2)).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt sets one of glibc's allocator parameters; every value is valid.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        }
        if unset("MALLOC_MMAP_THRESHOLD_") && unset("GLIBC_TUNABLES") {
            // SAFETY: as above; 1 MiB is within glibc's bounds for this parameter.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
        }
        if unset("GLIBC_TUNABLES") {
            // Fixed, from here or from the variable: large decode buffers are kept instead.
            preprocess::REUSE_COEFFICIENT_MEMORY.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if unset("MALLOC_TRIM_THRESHOLD_") && unset("GLIBC_TUNABLES") {
            // SAFETY: as above; any size is valid for this parameter.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20) };
        }
    }
}

/// Cores this process may use.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
