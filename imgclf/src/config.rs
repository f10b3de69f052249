//! Run-time configuration: which backend serves each port, chosen by URL. Cargo features only
//! decide which backends are compiled in.

use std::path::PathBuf;
use std::time::Duration;

use crate::classifier::{self, ClassifierHandle, ClassifierOptions, ClassifyError};
use crate::model::ModelSpec;
use crate::notify::{self, NotifierOptions};
use crate::pipeline::{self, Pipeline, PipelineConfig, Ports, Submitter, Worker};
use crate::queue::{self, QueueError, QueueOptions};
use crate::results::{self, ResultsError};
use crate::storage::{self, S3Config, StorageError};

/// Why the service could not be built from its settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A URL of a kind no backend serves.
    #[error("{port}: unsupported URL {url:?} ({hint})")]
    Unsupported {
        /// The port the URL is for.
        port: &'static str,
        /// The URL, its password hidden.
        url: String,
        /// What would work.
        hint: &'static str,
    },
    /// A backend this build does not have.
    #[error("{port}: {url:?} needs the cargo feature {feature:?}, not compiled into this build")]
    NotCompiled {
        /// The port the URL is for.
        port: &'static str,
        /// The URL, its password hidden.
        url: String,
        /// The feature that brings the backend.
        feature: &'static str,
    },
    /// A `<NAME>_FILE` setting whose file cannot be read.
    #[error("{name}: cannot read {path}: {source}")]
    SecretFile {
        /// The variable that named the file.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The storage backend failed to start.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The result store failed to start.
    #[error("results: {0}")]
    Results(#[from] ResultsError),
    /// The queue failed to start.
    #[error("queue: {0}")]
    Queue(#[source] QueueError),
    /// The model failed to load.
    #[error("classifier: {0}")]
    Classifier(#[from] ClassifyError),
    /// The notifier failed to start.
    #[error("notifier: {0}")]
    Notifier(#[from] crate::notify::NotifyError),
}

impl ConfigError {
    pub(crate) fn unsupported(port: &'static str, url: &str, hint: &'static str) -> Self {
        Self::Unsupported {
            port,
            url: redact(url),
            hint,
        }
    }

    #[allow(dead_code)] // unused when every backend is compiled in
    pub(crate) fn not_compiled(port: &'static str, url: &str, feature: &'static str) -> Self {
        Self::NotCompiled {
            port,
            url: redact(url),
            feature,
        }
    }
}

/// The value of environment variable `name`, or else the contents of the file that
/// `<name>_FILE` names (one trailing newline dropped). `None` when neither is set.
pub fn env_or_file(name: &str) -> Result<Option<String>, ConfigError> {
    if let Some(value) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
        return Ok(Some(value));
    }
    let file_var = format!("{name}_FILE");
    let Some(path) = std::env::var_os(&file_var).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretFile {
        name: file_var,
        path: path.clone(),
        source,
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(Some(text.strip_suffix('\r').unwrap_or(text).to_string()))
}

/// Settings shared by `imgclf-http` and `imgclf-worker`. With the `cli` feature they are clap
/// arguments, each also read from its `IMGCLF_*` environment variable. The settings that can
/// hold a credential (the queue and result-store URLs, the S3 keys, the webhook secret) are
/// never shown by `Debug` or `--help`, and [`Settings::apply_env`] also reads each from the
/// file its `<NAME>_FILE` names, as Docker and Kubernetes mount secrets.
#[derive(Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Settings {
    /// Directory for the embedded default's images and database.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_DATA_DIR", default_value = DEFAULT_DATA_DIR)
    )]
    pub data_dir: PathBuf,
    /// Image storage: `s3://bucket`, `file:///path` or `memory://`
    /// [default: file://DATA_DIR/images].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_STORAGE"))]
    pub storage: Option<String>,
    /// Job queue: `amqp://…`, `redis://…` or `memory://` (the worker then runs inside the HTTP
    /// process) [default: memory://]. Also read from the file IMGCLF_QUEUE_FILE names.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_QUEUE", hide_env_values = true)
    )]
    pub queue: Option<String>,
    /// Name of the queue (RabbitMQ queue, Redis stream) shared by producers and workers.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_QUEUE_NAME", default_value = queue::DEFAULT_NAME)
    )]
    pub queue_name: String,
    /// Seconds a worker may hold a job before another gets it (Redis and memory queues).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_QUEUE_LEASE", default_value_t = queue::DEFAULT_LEASE_SECS, value_parser = clap::value_parser!(u64).range(1..=MOST_SECS))
    )]
    pub queue_lease: u64,
    /// S3 endpoint (`http(s)://host:port`) for `s3://bucket` storage; AWS when unset.
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_S3_ENDPOINT"))]
    pub s3_endpoint: Option<String>,
    /// S3 access key (or the file IMGCLF_S3_ACCESS_KEY_FILE names).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_ACCESS_KEY", hide_env_values = true)
    )]
    pub s3_access_key: Option<String>,
    /// S3 secret key (or the file IMGCLF_S3_SECRET_KEY_FILE names).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_SECRET_KEY", hide_env_values = true)
    )]
    pub s3_secret_key: Option<String>,
    /// S3 region.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_REGION", default_value = storage::DEFAULT_S3_REGION)
    )]
    pub s3_region: String,
    /// Path-style S3 requests (`endpoint/bucket/key`), as MinIO expects; false for
    /// virtual-hosted style.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())
    )]
    pub s3_path_style: bool,
    /// Result store: `postgres://…`, `sqlite://path` or `memory://`
    /// [default: sqlite://DATA_DIR/imgclf.db]. Also read from the file IMGCLF_RESULTS_FILE names.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_RESULTS", hide_env_values = true)
    )]
    pub results: Option<String>,
    /// Inference backend: `auto` (ONNX Runtime when its library is found, else tract), `tract`
    /// (pure Rust) or `ort` (ONNX Runtime).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_CLASSIFIER", default_value = classifier::DEFAULT_BACKEND)
    )]
    pub classifier: String,
    /// `libonnxruntime.so` for `ort` (and `auto`) [default: $ORT_DYLIB_PATH, beside the
    /// binary, or the `onnxruntime` Python package's].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_ORT_LIB"))]
    pub ort_lib: Option<PathBuf>,
    /// Threads one inference may use (ort).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_INTRA_THREADS", default_value_t = classifier::DEFAULT_INTRA_THREADS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))
    )]
    pub intra_threads: usize,
    /// Instances of the model run side by side, each on its own thread, single-threaded
    /// [default: on the CPU one per core, each decoding its own images; with a GPU provider
    /// measured at start so that inference and preprocessing share the cores by what each
    /// costs per image; 1 for ort when IMGCLF_INTRA_THREADS is above 1].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_INFERENCE_THREADS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024)))]
    pub inference_threads: Option<usize>,
    /// ONNX Runtime execution providers for ort, comma-separated in order of preference:
    /// `cpu`, `cuda`, `tensorrt`. One the library lacks is skipped with a warning; CPU is always
    /// the last fallback.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_ORT_PROVIDERS", default_value = "cpu")
    )]
    pub ort_providers: classifier::Providers,
    /// Model directory (with model.json) or manifest [default: the shipped EfficientNet-Lite0].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_MODEL"))]
    pub model: Option<PathBuf>,
    /// Most images per inference batch [default: measured at start: the smallest of 2, 4 and 8
    /// whose time per image is within 1% of the best; a lone image still runs alone].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_MAX_BATCH", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024)))]
    pub max_batch: Option<usize>,
    /// Run the service's own threads (HTTP, storage, records) under Linux's batch policy, so
    /// that their wake-ups wait for a model thread's turn instead of interrupting it; false
    /// for the normal policy everywhere.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_BATCH_SCHEDULING", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())
    )]
    pub batch_scheduling: bool,
    /// Most decoded pixels per image (stops decompression bombs).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_PIXELS", default_value_t = crate::preprocess::DEFAULT_MAX_PIXELS, value_parser = clap::value_parser!(u64).range(1..))
    )]
    pub max_pixels: u64,
    /// Classes returned per image.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_TOP_K", default_value_t = pipeline::DEFAULT_TOP_K, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))
    )]
    pub top_k: usize,
    /// Uploads get 429 while this many jobs wait in the queue; 0 for no limit.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_QUEUE_DEPTH", default_value_t = pipeline::DEFAULT_MAX_QUEUE_DEPTH)
    )]
    pub max_queue_depth: u64,
    /// Attempts at a task that ended without an answer (its worker died) before it fails for
    /// good; retries after an outage (a store unreachable) do not count.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_MAX_ATTEMPTS", default_value_t = pipeline::DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=1000))
    )]
    pub max_attempts: u32,
    /// Seconds after its last change that a task still unfinished counts as stranded (its job
    /// lost to a crash) and is queued again by the workers' sweeper.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_REQUEUE_AFTER", default_value_t = pipeline::DEFAULT_REQUEUE_AFTER_SECS, value_parser = clap::value_parser!(u64).range(1..=MOST_SECS))
    )]
    pub requeue_after: u64,
    /// Seconds a task is kept after it ended (SUCCESS or FAILURE): then the workers delete its
    /// record, its image and its dead letter, and its status answers 404. 0 keeps them forever.
    /// Unfinished tasks never expire.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_RESULT_TTL", default_value_t = pipeline::DEFAULT_RESULT_TTL_SECS, value_parser = clap::value_parser!(u64).range(0..=MOST_SECS))
    )]
    pub result_ttl: u64,
    /// Seconds a task's image is kept after the task ended, when sooner than IMGCLF_RESULT_TTL
    /// (the record stays) [default: as long as its task].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_IMAGE_TTL", value_parser = clap::value_parser!(u64).range(0..=MOST_SECS)))]
    pub image_ttl: Option<u64>,
    /// Threads decoding and preprocessing at once [default: one per core].
    #[cfg_attr(feature = "cli", arg(long, env = "IMGCLF_PREPROCESS_THREADS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024)))]
    pub preprocess_threads: Option<usize>,
    /// Seconds a callback attempt may take.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_TIMEOUT", default_value_t = notify::DEFAULT_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))
    )]
    pub webhook_timeout: u64,
    /// Secret that signs every callback (HMAC-SHA256, see the README); when unset, callbacks
    /// are refused unless IMGCLF_WEBHOOK_UNSIGNED is true. Also read from the file
    /// IMGCLF_WEBHOOK_SECRET_FILE names.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_SECRET", hide_env_values = true)
    )]
    pub webhook_secret: Option<String>,
    /// Sends callbacks unsigned when IMGCLF_WEBHOOK_SECRET is unset; otherwise uploads with a
    /// callback are refused then.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "IMGCLF_WEBHOOK_UNSIGNED", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())
    )]
    pub webhook_unsigned: bool,
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
        arg(long, env = "IMGCLF_WEBHOOK_ATTEMPTS", default_value_t = notify::DEFAULT_ATTEMPTS, value_parser = clap::value_parser!(u32).range(0..=100))
    )]
    pub webhook_attempts: u32,
}

/// The longest a setting in seconds may be: ten years, beyond any use and far from where
/// arithmetic in milliseconds overflows.
#[cfg(feature = "cli")]
const MOST_SECS: u64 = 10 * 365 * 24 * 3600;

/// Where the embedded default keeps its files.
pub const DEFAULT_DATA_DIR: &str = "./data";

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: DEFAULT_DATA_DIR.into(),
            storage: None,
            queue: None,
            queue_name: queue::DEFAULT_NAME.into(),
            queue_lease: queue::DEFAULT_LEASE_SECS,
            s3_endpoint: None,
            s3_access_key: None,
            s3_secret_key: None,
            s3_region: storage::DEFAULT_S3_REGION.into(),
            s3_path_style: true,
            results: None,
            classifier: classifier::DEFAULT_BACKEND.into(),
            model: None,
            ort_lib: None,
            intra_threads: classifier::DEFAULT_INTRA_THREADS,
            inference_threads: None,
            ort_providers: classifier::Providers::default(),
            max_batch: None,
            batch_scheduling: true,
            max_pixels: crate::preprocess::DEFAULT_MAX_PIXELS,
            top_k: pipeline::DEFAULT_TOP_K,
            max_attempts: pipeline::DEFAULT_MAX_ATTEMPTS,
            max_queue_depth: pipeline::DEFAULT_MAX_QUEUE_DEPTH,
            requeue_after: pipeline::DEFAULT_REQUEUE_AFTER_SECS,
            result_ttl: pipeline::DEFAULT_RESULT_TTL_SECS,
            image_ttl: None,
            preprocess_threads: None,
            webhook_timeout: notify::DEFAULT_TIMEOUT_SECS,
            webhook_secret: None,
            webhook_unsigned: false,
            webhook_allow: Vec::new(),
            webhook_attempts: notify::DEFAULT_ATTEMPTS,
        }
    }
}

impl std::fmt::Debug for Settings {
    /// Every setting, with credentials hidden: URLs lose their password, keys their value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |secret: &Option<String>| secret.as_ref().map(|_| "***");
        let url = |url: &Option<String>| url.as_deref().map(redact);
        f.debug_struct("Settings")
            .field("data_dir", &self.data_dir)
            .field("storage", &url(&self.storage))
            .field("queue", &url(&self.queue))
            .field("queue_name", &self.queue_name)
            .field("queue_lease", &self.queue_lease)
            .field("s3_endpoint", &url(&self.s3_endpoint))
            .field("s3_access_key", &hidden(&self.s3_access_key))
            .field("s3_secret_key", &hidden(&self.s3_secret_key))
            .field("s3_region", &self.s3_region)
            .field("s3_path_style", &self.s3_path_style)
            .field("results", &url(&self.results))
            .field("classifier", &self.classifier)
            .field("ort_lib", &self.ort_lib)
            .field("intra_threads", &self.intra_threads)
            .field("inference_threads", &self.inference_threads)
            .field("ort_providers", &self.ort_providers)
            .field("model", &self.model)
            .field("max_batch", &self.max_batch)
            .field("batch_scheduling", &self.batch_scheduling)
            .field("max_pixels", &self.max_pixels)
            .field("top_k", &self.top_k)
            .field("max_queue_depth", &self.max_queue_depth)
            .field("max_attempts", &self.max_attempts)
            .field("requeue_after", &self.requeue_after)
            .field("result_ttl", &self.result_ttl)
            .field("image_ttl", &self.image_ttl)
            .field("preprocess_threads", &self.preprocess_threads)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("webhook_secret", &hidden(&self.webhook_secret))
            .field("webhook_unsigned", &self.webhook_unsigned)
            .field("webhook_allow", &self.webhook_allow)
            .field("webhook_attempts", &self.webhook_attempts)
            .finish()
    }
}

/// The model shipped with imgclf, found as a dependent crate would find it: `IMGCLF_MODEL`
/// aside, `./models/efficientnet-lite0` under the working directory, else the copy in the
/// imgclf source repository this crate was built from (absent in a crate from a registry).
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

/// A backend's connection error for `url`, safe to show: the URL quoted in it has its password
/// hidden, and one that does not quote it is prefixed with it, so that "connection refused"
/// says where.
pub(crate) fn connection_error(url: &str, error: &dyn std::fmt::Display) -> String {
    let (text, shown) = (error.to_string(), redact(url));
    match text.contains(url) {
        true => text.replace(url, &shown),
        false => format!("{shown}: {text}"),
    }
}

/// Hides the credentials of a URL, for logs and errors: the password of `amqp://user:secret@host`
/// (also when the URL is mistyped, `amqp//…` or no scheme at all), and query parameters that
/// name a password, secret, token or key (`postgres://db/x?password=…`).
pub fn redact(url: &str) -> String {
    // The credentials end at the last `@`, whatever comes before it: a password may hold a `?`.
    let (mut out, rest) = match url.rfind('@') {
        Some(at) => {
            let start = url[..at].find("//").map_or(0, |i| i + 2);
            let user = url[start..at].split(':').next().unwrap_or("");
            (format!("{}{user}:***", &url[..start]), &url[at..])
        }
        None => (String::new(), url),
    };
    let (head, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    out.push_str(head);
    if let Some(query) = query {
        let secret = |name: &str| {
            let name = name.to_ascii_lowercase();
            ["pass", "secret", "token", "key"]
                .iter()
                .any(|s| name.contains(s))
        };
        let pairs: Vec<String> = (query.split('&'))
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if secret(name) => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{out}?{}", pairs.join("&"));
    }
    out
}

impl Settings {
    /// Where images go.
    pub fn storage_url(&self) -> String {
        self.storage
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("images").display()))
    }

    /// Where task records go.
    pub fn results_url(&self) -> String {
        self.results
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("imgclf.db").display()))
    }

    /// Where jobs wait.
    pub fn queue_url(&self) -> String {
        self.queue.clone().unwrap_or_else(|| "memory://".into())
    }

    /// The queue lives in this process: the HTTP service then runs the worker too.
    pub fn embedded_queue(&self) -> bool {
        queue::is_embedded(&self.queue_url())
    }

    /// Completes the settings from the environment beyond clap: secrets from `<NAME>_FILE`,
    /// then the replaced service's variables (`MINIO_*`, `PG_*`, `CELERY_BROKER_URL`, each also
    /// as `<NAME>_FILE`) for what is still unset, so its deployment files keep working.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        for (value, name) in [
            (&mut self.queue, "IMGCLF_QUEUE"),
            (&mut self.results, "IMGCLF_RESULTS"),
            (&mut self.s3_access_key, "IMGCLF_S3_ACCESS_KEY"),
            (&mut self.s3_secret_key, "IMGCLF_S3_SECRET_KEY"),
            (&mut self.webhook_secret, "IMGCLF_WEBHOOK_SECRET"),
        ] {
            // A variable set to nothing (as compose files unset one) is unset: its `_FILE`
            // counts, and no empty secret signs anything.
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
            if value.is_none() {
                *value = env_or_file(name)?;
            }
        }
        let mut legacy = std::collections::HashMap::new();
        for name in LEGACY_VARIABLES {
            if let Some(value) = env_or_file(name)? {
                legacy.insert(*name, value);
            }
        }
        self.apply_legacy(|name| legacy.get(name).cloned());
        Ok(())
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

    /// The limits both sides run with.
    pub fn pipeline_config(&self) -> PipelineConfig {
        let defaults = PipelineConfig::default();
        PipelineConfig {
            max_pixels: self.max_pixels,
            top_k: self.top_k.max(1),
            max_attempts: self.max_attempts.max(1),
            preprocess_threads: self
                .preprocess_threads
                .unwrap_or(defaults.preprocess_threads),
            max_queue_depth: self.max_queue_depth,
            requeue_after: Duration::from_secs(self.requeue_after.max(1)),
            callback_attempts: self.webhook_attempts,
            callback_lease: Duration::from_secs(2 * self.webhook_timeout.max(1) + 5),
            result_ttl: (self.result_ttl > 0).then(|| Duration::from_secs(self.result_ttl)),
            image_ttl: self.image_ttl.map(Duration::from_secs),
            ..defaults
        }
    }

    /// How the S3 backend reaches its bucket.
    pub fn s3_config(&self) -> S3Config {
        S3Config {
            bucket: String::new(),
            endpoint: self.s3_endpoint.clone(),
            access_key: self.s3_access_key.clone(),
            secret_key: self.s3_secret_key.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
        }
    }

    /// How the queue is used.
    pub fn queue_options(&self) -> QueueOptions {
        QueueOptions {
            name: self.queue_name.clone(),
            lease: Duration::from_secs(self.queue_lease.max(1)),
            // As many jobs as a worker keeps in hand: a batch per core (as many instances as
            // its pool may grow to) and one per preprocessing thread, twice over.
            prefetch: u16::try_from(
                2 * (crate::cores() * self.max_batch.unwrap_or(pipeline::DEFAULT_MAX_BATCH).max(1)
                    + self.preprocess_threads.unwrap_or_else(crate::cores).max(1)),
            )
            .unwrap_or(u16::MAX),
        }
    }

    /// How callbacks are sent.
    pub fn notifier_options(&self) -> NotifierOptions {
        NotifierOptions {
            attempts: self.webhook_attempts,
            timeout: Duration::from_secs(self.webhook_timeout),
            secret: self.webhook_secret.clone(),
            allow: self.webhook_allow.clone(),
            unsigned: self.webhook_unsigned,
        }
    }

    /// The model's description (no weights loaded yet).
    pub fn model_spec(&self) -> Result<ModelSpec, ConfigError> {
        let dir = self.model.clone().unwrap_or_else(default_model_dir);
        Ok(ModelSpec::load(dir).map_err(ClassifyError::from)?)
    }

    /// Every port, connected.
    pub async fn ports(&self) -> Result<Ports, ConfigError> {
        Ok(Ports {
            storage: storage::from_url(&self.storage_url(), &self.s3_config()).await?,
            queue: queue::from_url(&self.queue_url(), &self.queue_options()).await?,
            results: results::from_url(&self.results_url()).await?,
            notifier: notify::build(&self.notifier_options())?,
        })
    }

    /// Loads the model and starts its inference threads, off the async runtime (compiling a
    /// model takes seconds).
    pub async fn spawn_classifier(&self) -> Result<ClassifierHandle, ConfigError> {
        let spec = self.model_spec()?;
        let (name, max_batch) = (self.classifier.clone(), self.max_batch);
        let options = ClassifierOptions {
            intra_threads: self.intra_threads,
            ort_library: self.ort_lib.clone(),
            instances: self.inference_threads,
            providers: self.ort_providers.clone(),
        };
        let handle = tokio::task::spawn_blocking(move || {
            classifier::spawn(&name, spec, &options, max_batch)
        })
        .await
        .map_err(|e| ClassifyError::Inference(format!("loading the model panicked: {e}")))??;
        Ok(handle)
    }

    /// The accepting side alone: no model is loaded.
    pub async fn build_submitter(&self) -> Result<Submitter, ConfigError> {
        Ok(Submitter::new(self.ports().await?, self.pipeline_config()))
    }

    /// The working side alone.
    pub async fn build_worker(&self) -> Result<Worker, ConfigError> {
        let ports = self.ports().await?;
        Ok(Worker::new(
            ports,
            self.spawn_classifier().await?,
            self.pipeline_config(),
        ))
    }

    /// Both sides in one process, as the embedded default runs them.
    pub async fn build_pipeline(&self) -> Result<Pipeline, ConfigError> {
        let ports = self.ports().await?;
        Ok(Pipeline::new(
            ports,
            self.spawn_classifier().await?,
            self.pipeline_config(),
        ))
    }
}

/// The replaced service's variables that [`Settings::apply_env`] reads.
const LEGACY_VARIABLES: &[&str] = &[
    "MINIO_BUCKET",
    "MINIO_ENDPOINT",
    "MINIO_SECURE",
    "MINIO_ACCESS_KEY",
    "MINIO_SECRET_KEY",
    "CELERY_BROKER_URL",
    "PG_HOST",
    "PG_USER",
    "PG_PASSWORD",
    "PG_PORT",
    "PG_DB",
];

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
    fn debug_hides_every_credential() {
        let settings = Settings {
            queue: Some("amqp://guest:s3cret-q@rabbit:5672/".into()),
            results: Some("postgres://app:s3cret-pg@db/results".into()),
            s3_access_key: Some("AKIA-s3cret".into()),
            s3_secret_key: Some("s3cret-key".into()),
            webhook_secret: Some("s3cret-hook".into()),
            ..Settings::default()
        };
        let shown = format!("{settings:?} {:?}", settings.s3_config());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("rabbit:5672"),
            "the rest stays readable: {shown}"
        );
    }

    #[test]
    fn secrets_are_read_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-a-file\n").unwrap();
        // A name no other test sets: the process environment is shared.
        std::env::set_var("IMGCLF_TEST_SECRET_FILE", &path);
        assert_eq!(
            super::env_or_file("IMGCLF_TEST_SECRET").unwrap().as_deref(),
            Some("from-a-file"),
            "the file's contents, without the trailing newline"
        );
        std::env::set_var("IMGCLF_TEST_SECRET", "direct");
        assert_eq!(
            super::env_or_file("IMGCLF_TEST_SECRET").unwrap().as_deref(),
            Some("direct"),
            "the variable itself wins"
        );
        std::env::remove_var("IMGCLF_TEST_SECRET");
        std::env::set_var("IMGCLF_TEST_SECRET_FILE", dir.path().join("missing"));
        let error = super::env_or_file("IMGCLF_TEST_SECRET").unwrap_err();
        assert!(
            error.to_string().contains("IMGCLF_TEST_SECRET_FILE"),
            "{error}"
        );
        std::env::remove_var("IMGCLF_TEST_SECRET_FILE");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:guest@localhost:5672/"),
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(redact("memory://"), "memory://");
        for (given, shown) in [
            ("amqp://u:p/w@rabbit/", "amqp://u:***@rabbit/"),
            ("amqps//user:s3cret@host/", "amqps//user:***@host/"),
            ("user:s3cret@rabbit:5672", "user:***@rabbit:5672"),
            (
                "postgres://db/x?sslmode=require&password=s3cret",
                "postgres://db/x?sslmode=require&password=***",
            ),
            ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
            ("amqp://user:pa?ss@rabbit/", "amqp://user:***@rabbit/"),
            (
                "postgres://db:5432/x?sslmode=require",
                "postgres://db:5432/x?sslmode=require",
            ),
        ] {
            assert_eq!(redact(given), shown);
        }
    }

    #[test]
    fn a_setting_set_to_nothing_is_unset() {
        let mut settings = Settings {
            webhook_secret: Some(String::new()),
            queue: Some(" ".into()),
            ..Settings::default()
        };
        settings.apply_env().unwrap();
        assert_eq!(settings.webhook_secret, None);
        assert_eq!(settings.queue_url(), "memory://");
        // Read again from the environment, blanks are nothing too.
        std::env::set_var("IMGCLF_TEST_BLANK", " ");
        assert!(super::env_or_file("IMGCLF_TEST_BLANK").unwrap().is_none());
        std::env::remove_var("IMGCLF_TEST_BLANK");
    }
}
