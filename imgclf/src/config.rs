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
    #[error("queue: {0}")]
    Queue(crate::queue::QueueError),
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
    /// Image storage: `s3://bucket`, `file:///path` or `memory://`
    /// [default: file://DATA_DIR/images].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_STORAGE"))]
    pub storage: Option<String>,
    /// Job queue: `amqp://…`, `redis://…` or `memory://` (the worker then runs inside the HTTP
    /// process) [default: memory://].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_QUEUE"))]
    pub queue: Option<String>,
    /// Name of the queue (RabbitMQ queue, Redis stream) shared by producers and workers.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_QUEUE_NAME", default_value = "imgclf")
    )]
    pub queue_name: String,
    /// Seconds a worker may hold a job before another gets it (Redis and memory queues).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_QUEUE_LEASE", default_value_t = 120)
    )]
    pub queue_lease: u64,
    /// S3 endpoint (`http(s)://host:port`) for `s3://bucket` storage; AWS when unset.
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_S3_ENDPOINT"))]
    pub s3_endpoint: Option<String>,
    /// S3 access key.
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_S3_ACCESS_KEY"))]
    pub s3_access_key: Option<String>,
    /// S3 secret key.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_SECRET_KEY", hide_env_values = true)
    )]
    pub s3_secret_key: Option<String>,
    /// S3 region.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_REGION", default_value = "us-east-1")
    )]
    pub s3_region: String,
    /// Path-style S3 requests (`endpoint/bucket/key`), as MinIO expects; false for
    /// virtual-hosted style.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)
    )]
    pub s3_path_style: bool,
    /// Result store: `postgres://…`, `sqlite://path` or `memory://`
    /// [default: sqlite://DATA_DIR/imgclf.db].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_RESULTS"))]
    pub results: Option<String>,
    /// Inference backend: `tract` (pure Rust) or `ort` (ONNX Runtime).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_CLASSIFIER", default_value = "tract")
    )]
    pub classifier: String,
    /// `libonnxruntime.so` for `IMGCLF_CLASSIFIER=ort` [default: $ORT_DYLIB_PATH].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_ORT_LIB"))]
    pub ort_lib: Option<PathBuf>,
    /// Threads one inference may use (ort).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_INTRA_THREADS", default_value_t = 1)
    )]
    pub intra_threads: usize,
    /// Instances of the model run side by side, each on its own thread [default: one per core
    /// for tract, which runs single-threaded; 1 for ort, which uses IMGCLF_INTRA_THREADS].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_INFERENCE_THREADS"))]
    pub inference_threads: Option<usize>,
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
    /// Uploads get 429 while this many jobs wait in the queue; 0 for no limit.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_QUEUE_DEPTH", default_value_t = 10_000)
    )]
    pub max_queue_depth: u64,
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
    /// Secret that signs every callback (HMAC-SHA256, see the README); unsigned when unset.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_SECRET", hide_env_values = true)
    )]
    pub webhook_secret: Option<String>,
    /// Internal networks callbacks may reach anyway, comma-separated (`10.1.0.0/16,127.0.0.1`);
    /// loopback, private, link-local, multicast and reserved addresses are refused otherwise.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_ALLOW", value_delimiter = ',')
    )]
    pub webhook_allow: Vec<crate::notify::IpNet>,
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
            queue: None,
            queue_name: "imgclf".into(),
            queue_lease: 120,
            s3_endpoint: None,
            s3_access_key: None,
            s3_secret_key: None,
            s3_region: "us-east-1".into(),
            s3_path_style: true,
            results: None,
            classifier: "tract".into(),
            model: None,
            ort_lib: None,
            intra_threads: 1,
            inference_threads: None,
            max_batch: pipeline.max_batch,
            max_pixels: pipeline.max_pixels,
            top_k: pipeline.top_k,
            max_attempts: pipeline.max_attempts,
            max_queue_depth: pipeline.max_queue_depth,
            preprocess_threads: None,
            webhook_timeout: 10,
            webhook_secret: None,
            webhook_allow: Vec::new(),
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

/// Keeps a URL's password out of an error message that may quote the URL.
#[cfg(any(feature = "amqp", feature = "redis"))]
fn redact_error(url: &str, error: crate::queue::QueueError) -> crate::queue::QueueError {
    match error {
        crate::queue::QueueError::Backend { message, temporary } => {
            crate::queue::QueueError::Backend {
                message: message.replace(url, &redact(url)),
                temporary,
            }
        }
        other => other,
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

    pub fn queue_url(&self) -> String {
        self.queue.clone().unwrap_or_else(|| "memory://".into())
    }

    /// The queue lives in this process: the HTTP service then runs the worker too.
    pub fn embedded_queue(&self) -> bool {
        self.queue_url().starts_with("memory:")
    }

    /// Fills unset settings from the replaced service's environment variables (`MINIO_*`,
    /// `PG_*`, `CELERY_BROKER_URL`), so its deployment files keep working.
    pub fn apply_legacy_env(&mut self) {
        self.apply_legacy(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    }

    fn apply_legacy(&mut self, var: impl Fn(&str) -> Option<String>) {
        if self.storage.is_none() {
            if let Some(bucket) = var("MINIO_BUCKET") {
                self.storage = Some(format!("s3://{bucket}"));
            }
        }
        if self.s3_endpoint.is_none() {
            self.s3_endpoint = var("MINIO_ENDPOINT").map(|e| {
                if e.contains("://") {
                    e
                } else {
                    let secure =
                        var("MINIO_SECURE").is_some_and(|s| s.eq_ignore_ascii_case("true"));
                    format!("{}://{e}", if secure { "https" } else { "http" })
                }
            });
        }
        self.s3_access_key = self
            .s3_access_key
            .take()
            .or_else(|| var("MINIO_ACCESS_KEY"));
        self.s3_secret_key = self
            .s3_secret_key
            .take()
            .or_else(|| var("MINIO_SECRET_KEY"));
        if self.queue.is_none() {
            self.queue = var("CELERY_BROKER_URL");
        }
        if self.results.is_none() {
            if let Some(host) = var("PG_HOST") {
                let user = var("PG_USER").unwrap_or_else(|| "postgres".into());
                let password = var("PG_PASSWORD")
                    .map(|p| format!(":{p}"))
                    .unwrap_or_default();
                let port = var("PG_PORT").unwrap_or_else(|| "5432".into());
                let db = var("PG_DB").unwrap_or_else(|| "postgres".into());
                self.results = Some(format!("postgres://{user}{password}@{host}:{port}/{db}"));
            }
        }
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
            max_queue_depth: self.max_queue_depth,
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
        if let Some(bucket) = url.strip_prefix("s3://") {
            #[cfg(feature = "s3")]
            return Ok(Arc::new(
                crate::storage::S3Storage::connect(crate::storage::S3Config {
                    bucket: bucket.trim_end_matches('/').to_string(),
                    endpoint: self.s3_endpoint.clone(),
                    access_key: self.s3_access_key.clone(),
                    secret_key: self.s3_secret_key.clone(),
                    region: self.s3_region.clone(),
                    path_style: self.s3_path_style,
                })
                .await?,
            ));
            #[cfg(not(feature = "s3"))]
            return Err(ConfigError::NotCompiled {
                port: "storage",
                url: bucket.into(),
                feature: "s3",
            });
        }
        Err(ConfigError::Unsupported {
            port: "storage",
            url: redact(&url),
            hint: "use s3://bucket, file:///path or memory://",
        })
    }

    pub async fn build_queue(&self) -> Result<Arc<dyn Queue>, ConfigError> {
        let url = self.queue_url();
        let lease = std::time::Duration::from_secs(self.queue_lease.max(1));
        if self.embedded_queue() {
            return Ok(Arc::new(MemoryQueue::new(lease)));
        }
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            #[cfg(feature = "amqp")]
            {
                // Room for one batch in the model and the next being prepared.
                let prefetch = u16::try_from(2 * self.max_batch.max(1)).unwrap_or(u16::MAX);
                let queue =
                    crate::queue::AmqpQueue::connect(&url, &self.queue_name, prefetch).await;
                return Ok(Arc::new(
                    queue.map_err(|e| ConfigError::Queue(redact_error(&url, e)))?,
                ));
            }
            #[cfg(not(feature = "amqp"))]
            return Err(ConfigError::NotCompiled {
                port: "queue",
                url: redact(&url),
                feature: "amqp",
            });
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            #[cfg(feature = "redis")]
            {
                let queue = crate::queue::RedisQueue::connect(&url, &self.queue_name, lease).await;
                return Ok(Arc::new(
                    queue.map_err(|e| ConfigError::Queue(redact_error(&url, e)))?,
                ));
            }
            #[cfg(not(feature = "redis"))]
            return Err(ConfigError::NotCompiled {
                port: "queue",
                url: redact(&url),
                feature: "redis",
            });
        }
        Err(ConfigError::Unsupported {
            port: "queue",
            url: redact(&url),
            hint: "use amqp://…, redis://… or memory://",
        })
    }

    pub async fn build_results(&self) -> Result<Arc<dyn ResultStore>, ConfigError> {
        let url = self.results_url();
        if url.starts_with("memory:") {
            return Ok(Arc::new(MemoryResults::new()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            return Ok(Arc::new(
                crate::results::PostgresResults::connect(&url)
                    .await
                    .map_err(|e| {
                        ConfigError::Results(ResultsError::Backend {
                            message: e.to_string().replace(&url, &redact(&url)),
                            temporary: e.is_temporary(),
                        })
                    })?,
            ));
            #[cfg(not(feature = "postgres"))]
            return Err(ConfigError::NotCompiled {
                port: "results",
                url: redact(&url),
                feature: "postgres",
            });
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
            hint: "use postgres://…, sqlite://path or memory://",
        })
    }

    /// Webhooks, unless `webhook_attempts` is 0 or the `webhook` feature is off.
    pub fn build_notifier(&self) -> Result<Arc<dyn Notifier>, ConfigError> {
        #[cfg(feature = "webhook")]
        if self.webhook_attempts > 0 {
            if self.webhook_secret.is_none() {
                tracing::warn!("IMGCLF_WEBHOOK_SECRET is unset: callbacks go out unsigned");
            }
            return Ok(Arc::new(crate::notify::WebhookNotifier::new(
                crate::notify::WebhookConfig {
                    timeout: Duration::from_secs(self.webhook_timeout.max(1)),
                    attempts: self.webhook_attempts,
                    secret: self.webhook_secret.clone(),
                    policy: crate::notify::CallbackPolicy::new(self.webhook_allow.clone()),
                    ..crate::notify::WebhookConfig::default()
                },
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
        let options = classifier::ClassifierOptions {
            intra_threads: self.intra_threads,
            ort_library: self.ort_lib.clone(),
        };
        let instances = self
            .inference_threads
            .unwrap_or(match self.classifier.as_str() {
                "tract" => std::thread::available_parallelism().map_or(1, |n| n.get()),
                _ => 1,
            });
        let spec = self.model_spec()?;
        let classifiers = (0..instances.max(1))
            .map(|_| classifier::build(&self.classifier, spec.clone(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClassifierHandle::spawn_pool(classifiers, self.max_batch))
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
    use super::{redact, Settings};

    #[test]
    fn legacy_variables_fill_unset_settings() {
        let env = [
            ("MINIO_ENDPOINT", "minio:9000"),
            ("MINIO_BUCKET", "images"),
            ("MINIO_ACCESS_KEY", "ak"),
            ("MINIO_SECRET_KEY", "sk"),
            ("PG_HOST", "db"),
            ("PG_USER", "app"),
            ("PG_PASSWORD", "pw"),
            ("PG_DB", "results"),
            ("CELERY_BROKER_URL", "amqp://guest:guest@rabbit:5672//"),
        ];
        let mut settings = Settings::default();
        settings.apply_legacy(|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(settings.storage.as_deref(), Some("s3://images"));
        assert_eq!(settings.s3_endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(settings.s3_access_key.as_deref(), Some("ak"));
        assert_eq!(
            settings.results.as_deref(),
            Some("postgres://app:pw@db:5432/results")
        );
        assert_eq!(
            settings.queue.as_deref(),
            Some("amqp://guest:guest@rabbit:5672//")
        );

        let mut explicit = Settings {
            queue: Some("redis://r".into()),
            ..Settings::default()
        };
        explicit.apply_legacy(|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(
            explicit.queue.as_deref(),
            Some("redis://r"),
            "explicit settings win"
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:guest@localhost:5672/"),
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(redact("memory://"), "memory://");
    }
}
