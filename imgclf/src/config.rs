//! Run-time configuration: which backend serves each port, chosen by URL. Cargo features only
//! decide which backends are compiled in.

use std::path::PathBuf;
use std::sync::Arc;
#[cfg(feature = "webhook")]
use std::time::Duration;

use crate::classifier::{self, ClassifierHandle, ClassifyError};
use crate::model::ModelSpec;
use crate::notify::{NoopNotifier, Notifier};
use crate::pipeline::{Pipeline, PipelineConfig, Ports};
use crate::queue::{MemoryQueue, Queue};
use crate::results::{MemoryResults, ResultStore, ResultsError};
use crate::storage::{LocalStorage, MemoryStorage, Storage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{port}: unsupported URL {url:?} ({hint})")]
    Unsupported {
        port: &'static str,
        url: String,
        hint: &'static str,
    },
    #[error("{port}: {url:?} needs the cargo feature {feature:?}, not compiled into this build")]
    NotCompiled {
        port: &'static str,
        url: String,
        feature: &'static str,
    },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("results: {0}")]
    Results(#[from] ResultsError),
    #[error("classifier: {0}")]
    Classifier(#[from] ClassifyError),
    #[error("notifier: {0}")]
    Notifier(#[from] crate::notify::NotifyError),
}

/// Settings shared by `imgclf-http` and `imgclf-worker`. With the `cli` feature they are clap
/// arguments, each also read from its `IMGCLF_*` environment variable.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Settings {
    /// Directory for the embedded default's images and database.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_DATA_DIR", default_value = "./data")
    )]
    pub data_dir: PathBuf,
    /// Image storage: `file:///path` or `memory://` [default: file://DATA_DIR/images].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_STORAGE"))]
    pub storage: Option<String>,
    /// Job queue: `memory://` runs the worker inside the HTTP process.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_QUEUE", default_value = "memory://")
    )]
    pub queue: String,
    /// Result store: `sqlite://path` or `memory://` [default: sqlite://DATA_DIR/imgclf.db].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_RESULTS"))]
    pub results: Option<String>,
    /// Inference backend.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_CLASSIFIER", default_value = "tract")
    )]
    pub classifier: String,
    /// Model directory (with model.json) or manifest [default: the shipped EfficientNet-Lite0].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_MODEL"))]
    pub model: Option<PathBuf>,
    /// Most images per inference batch.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_BATCH", default_value_t = 8)
    )]
    pub max_batch: usize,
    /// Most decoded pixels per image (stops decompression bombs).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_PIXELS", default_value_t = crate::preprocess::DEFAULT_MAX_PIXELS)
    )]
    pub max_pixels: u64,
    /// Classes returned per image.
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_TOP_K", default_value_t = 5))]
    pub top_k: usize,
    /// Deliveries of a job before it fails for good.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_ATTEMPTS", default_value_t = 5)
    )]
    pub max_attempts: u32,
    /// Threads decoding and preprocessing at once [default: one per core].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_PREPROCESS_THREADS"))]
    pub preprocess_threads: Option<usize>,
    /// Seconds a callback attempt may take.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_TIMEOUT", default_value_t = 10)
    )]
    pub webhook_timeout: u64,
    /// Attempts per callback before giving up; 0 turns callbacks off.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_ATTEMPTS", default_value_t = 5)
    )]
    pub webhook_attempts: u32,
}

impl Default for Settings {
    fn default() -> Self {
        let pipeline = PipelineConfig::default();
        Self {
            data_dir: "./data".into(),
            storage: None,
            queue: "memory://".into(),
            results: None,
            classifier: "tract".into(),
            model: None,
            max_batch: pipeline.max_batch,
            max_pixels: pipeline.max_pixels,
            top_k: pipeline.top_k,
            max_attempts: pipeline.max_attempts,
            preprocess_threads: None,
            webhook_timeout: 10,
            webhook_attempts: 5,
        }
    }
}

/// The model shipped with imgclf: `./models/efficientnet-lite0`, or the one in the source tree.
pub fn default_model_dir() -> PathBuf {
    let local = PathBuf::from("models/efficientnet-lite0");
    if local.join("model.json").is_file() {
        local
    } else {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/efficientnet-lite0"
        ))
    }
}

/// Hides the password of a URL such as `amqp://user:secret@host`, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Settings {
    pub fn storage_url(&self) -> String {
        self.storage
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("images").display()))
    }

    pub fn results_url(&self) -> String {
        self.results
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("imgclf.db").display()))
    }

    /// The queue lives in this process: the HTTP service then runs the worker too.
    pub fn embedded_queue(&self) -> bool {
        self.queue.starts_with("memory:")
    }

    pub fn pipeline_config(&self) -> PipelineConfig {
        let defaults = PipelineConfig::default();
        PipelineConfig {
            max_batch: self.max_batch.max(1),
            max_pixels: self.max_pixels,
            top_k: self.top_k.max(1),
            max_attempts: self.max_attempts.max(1),
            preprocess_threads: self
                .preprocess_threads
                .unwrap_or(defaults.preprocess_threads),
            ..defaults
        }
    }

    pub async fn build_storage(&self) -> Result<Arc<dyn Storage>, ConfigError> {
        let url = self.storage_url();
        if url.starts_with("memory:") {
            return Ok(Arc::new(MemoryStorage::new()));
        }
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(Arc::new(LocalStorage::new(path)?));
        }
        Err(ConfigError::Unsupported {
            port: "storage",
            url: redact(&url),
            hint: "use file:///path or memory://",
        })
    }

    pub async fn build_queue(&self) -> Result<Arc<dyn Queue>, ConfigError> {
        if self.embedded_queue() {
            return Ok(Arc::new(MemoryQueue::default()));
        }
        Err(ConfigError::Unsupported {
            port: "queue",
            url: redact(&self.queue),
            hint: "use memory://",
        })
    }

    pub async fn build_results(&self) -> Result<Arc<dyn ResultStore>, ConfigError> {
        let url = self.results_url();
        if url.starts_with("memory:") {
            return Ok(Arc::new(MemoryResults::new()));
        }
        if url.starts_with("sqlite:") {
            #[cfg(feature = "sqlite")]
            return Ok(Arc::new(
                crate::results::SqliteResults::connect(&url).await?,
            ));
            #[cfg(not(feature = "sqlite"))]
            return Err(ConfigError::NotCompiled {
                port: "results",
                url,
                feature: "sqlite",
            });
        }
        Err(ConfigError::Unsupported {
            port: "results",
            url: redact(&url),
            hint: "use sqlite://path or memory://",
        })
    }

    /// Webhooks, unless `webhook_attempts` is 0 or the `webhook` feature is off.
    pub fn build_notifier(&self) -> Result<Arc<dyn Notifier>, ConfigError> {
        #[cfg(feature = "webhook")]
        if self.webhook_attempts > 0 {
            return Ok(Arc::new(crate::notify::WebhookNotifier::new(
                Duration::from_secs(self.webhook_timeout.max(1)),
                self.webhook_attempts,
                Duration::from_millis(500),
            )?));
        }
        Ok(Arc::new(NoopNotifier))
    }

    pub fn model_spec(&self) -> Result<ModelSpec, ConfigError> {
        let dir = self.model.clone().unwrap_or_else(default_model_dir);
        Ok(ModelSpec::load(dir).map_err(ClassifyError::from)?)
    }

    /// Loads the model and starts its inference thread (blocking: compiles the model).
    pub fn build_classifier(&self) -> Result<ClassifierHandle, ConfigError> {
        let classifier = classifier::build(&self.classifier, self.model_spec()?)?;
        Ok(ClassifierHandle::spawn(classifier, self.max_batch))
    }

    /// Every port from configuration, and the pipeline over them.
    pub async fn build_pipeline(&self) -> Result<Pipeline, ConfigError> {
        let ports = Ports {
            storage: self.build_storage().await?,
            queue: self.build_queue().await?,
            results: self.build_results().await?,
            notifier: self.build_notifier()?,
        };
        let settings = self.clone();
        let classifier = tokio::task::spawn_blocking(move || settings.build_classifier())
            .await
            .map_err(|e| ClassifyError::Inference(format!("loading the model panicked: {e}")))??;
        Ok(Pipeline::new(ports, classifier, self.pipeline_config()))
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:guest@localhost:5672/"),
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(redact("memory://"), "memory://");
    }
}
