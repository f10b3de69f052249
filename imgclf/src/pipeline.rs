//! Where the ports meet: `submit` accepts an image, `run_worker` turns queued jobs into results.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::classifier::{ClassifierHandle, ClassifyError};
use crate::metrics::Metrics;
use crate::notify::{Notifier, NotifyError};
use crate::preprocess::{self, ImageError};
use crate::queue::{Delivery, Queue};
use crate::results::ResultStore;
use crate::storage::Storage;
use crate::task::{
    now_ms, Prediction, StageTimings, TaskId, TaskRecord, TaskResult, WebhookDelivery, WebhookState,
};

/// The backends a pipeline runs on.
#[derive(Clone)]
pub struct Ports {
    pub storage: Arc<dyn Storage>,
    pub queue: Arc<dyn Queue>,
    pub results: Arc<dyn ResultStore>,
    pub notifier: Arc<dyn Notifier>,
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Most images per inference batch.
    pub max_batch: usize,
    /// Most decoded pixels per image.
    pub max_pixels: u64,
    /// Classes returned per image.
    pub top_k: usize,
    /// Deliveries of one job before it is given up on.
    pub max_attempts: u32,
    /// First retry delay; doubles with each attempt.
    pub retry_backoff: Duration,
    /// Threads decoding and preprocessing at once.
    pub preprocess_threads: usize,
    /// How long a stopping worker waits for the jobs it holds.
    pub drain_timeout: Duration,
    /// Uploads get `Busy` (429) while this many jobs wait; 0 for no limit.
    pub max_queue_depth: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_pixels: preprocess::DEFAULT_MAX_PIXELS,
            top_k: 5,
            max_attempts: 5,
            retry_backoff: Duration::from_secs(1),
            preprocess_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            drain_timeout: Duration::from_secs(30),
            max_queue_depth: 10_000,
        }
    }
}

/// One image as uploaded.
#[derive(Clone, Debug, Default)]
pub struct Upload {
    pub bytes: Bytes,
    pub filename: Option<String>,
    pub metadata: Map<String, Value>,
    pub callback_url: Option<String>,
    /// A client's key for retrying an upload safely: the same key and bytes give the same task.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Callback(#[from] NotifyError),
    /// The queue is deeper than the configured limit: try again later.
    #[error("the service is busy ({depth} tasks waiting); retry later")]
    Busy { depth: u64, retry_after: Duration },
    /// A backend could not take the task; nothing was kept.
    #[error("the service cannot accept tasks right now: {0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifyNowError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Classify(#[from] Arc<ClassifyError>),
}

/// Why a job did not produce a result this time.
enum Failure {
    /// Trying again cannot help (the image is broken): fail the task now.
    Permanent(String),
    /// A backend hiccup: retry later, up to `max_attempts`.
    Temporary(String),
}

pub struct Pipeline {
    ports: Ports,
    classifier: ClassifierHandle,
    metrics: Arc<Metrics>,
    config: PipelineConfig,
    preprocess_slots: Arc<Semaphore>,
    /// The last queue depth read, and when.
    depth: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl Pipeline {
    pub fn new(ports: Ports, classifier: ClassifierHandle, config: PipelineConfig) -> Self {
        let preprocess_slots = Arc::new(Semaphore::new(config.preprocess_threads.max(1)));
        let metrics = Arc::new(Metrics::new());
        classifier.record_batch_sizes(metrics.batch_size.clone());
        Self {
            ports,
            classifier,
            metrics,
            config,
            preprocess_slots,
            depth: std::sync::Mutex::new(None),
        }
    }

    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    pub fn classifier(&self) -> &ClassifierHandle {
        &self.classifier
    }

    /// The Prometheus text of every metric, with the queue depth read now.
    pub async fn render_metrics(&self) -> String {
        match self.ports.queue.depth().await {
            Ok(depth) => self
                .metrics
                .queue_depth
                .set(depth.try_into().unwrap_or(i64::MAX)),
            Err(error) => tracing::warn!(%error, "queue depth unavailable"),
        }
        self.metrics.render()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Checks, stores, records and queues an image; returns its task id. On any failure nothing
    /// is left behind.
    pub async fn submit(&self, upload: Upload) -> Result<TaskId, SubmitError> {
        let info = self.validate(upload.bytes.clone()).await?;
        if let Some(url) = &upload.callback_url {
            self.ports.notifier.check_url(url).await?;
        }
        // The same key and bytes name the same task, so a retried upload finds the first one.
        let task_id = match &upload.idempotency_key {
            Some(key) => TaskId::derived(key, &upload.bytes),
            None => TaskId::new(),
        };
        if upload.idempotency_key.is_some() {
            match self.ports.results.get(task_id).await {
                Ok(Some(_)) => return Ok(task_id),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%task_id, error = %e, "idempotency lookup failed");
                    return Err(SubmitError::Unavailable("recording the task failed".into()));
                }
            }
        }
        self.admit().await?;
        let key = format!("images/{task_id}.{}", info.extension());
        let mut metadata = upload.metadata;
        if let Some(filename) = upload.filename {
            metadata.insert("filename".into(), filename.into());
        }
        metadata.insert("object_name".into(), key.clone().into());
        let record = TaskRecord::pending(task_id, key.clone(), metadata, upload.callback_url);

        let Ports {
            storage,
            queue,
            results,
            ..
        } = &self.ports;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(%task_id, error = %e, "{what} failed; upload refused");
            SubmitError::Unavailable(format!("{what} failed"))
        };
        storage
            .put(&key, upload.bytes)
            .await
            .map_err(|e| unavailable("storing the image", &e))?;
        match results.create(&record).await {
            Ok(()) => {}
            // A concurrent upload with the same idempotency key won; its task is this one.
            Err(crate::ResultsError::Conflict(_)) if upload.idempotency_key.is_some() => {
                return Ok(task_id)
            }
            Err(e) => {
                let _ = storage.delete(&key).await;
                return Err(unavailable("recording the task", &e));
            }
        }
        if let Err(e) = queue.enqueue(&record.job()).await {
            let _ = results.delete(task_id).await;
            let _ = storage.delete(&key).await;
            return Err(unavailable("queueing the task", &e));
        }
        tracing::debug!(%task_id, %key, "task accepted");
        Ok(task_id)
    }

    /// Refuses new work while the queue is deeper than `max_queue_depth`. The depth is read at
    /// most once a second: a broker round trip per upload would cost more than it tells.
    async fn admit(&self) -> Result<(), SubmitError> {
        let limit = self.config.max_queue_depth;
        if limit == 0 {
            return Ok(());
        }
        let cached = *self.depth.lock().unwrap();
        let depth = match cached {
            Some((at, depth)) if at.elapsed() < Duration::from_secs(1) => depth,
            _ => {
                let depth = self.ports.queue.depth().await.map_err(|e| {
                    tracing::error!(error = %e, "queue depth unavailable; upload refused");
                    SubmitError::Unavailable("the queue is unreachable".into())
                })?;
                *self.depth.lock().unwrap() = Some((Instant::now(), depth));
                depth
            }
        };
        if depth >= limit {
            return Err(SubmitError::Busy {
                depth,
                retry_after: Duration::from_secs(5),
            });
        }
        Ok(())
    }

    pub async fn status(&self, id: TaskId) -> Result<Option<TaskRecord>, crate::ResultsError> {
        self.ports.results.get(id).await
    }

    /// Classifies an image now, without a task: the synchronous API.
    pub async fn classify_now(
        &self,
        bytes: Bytes,
        top_k: usize,
    ) -> Result<Vec<Prediction>, ClassifyNowError> {
        let tensor = self.tensor(bytes).await?;
        let logits = self.classifier.logits(tensor).await?;
        Ok(self.classifier.spec().top_k(&logits, top_k))
    }

    /// Refuses what is not a whole, decodable image of acceptable size before anything is
    /// stored: the header first (cheap, stops decompression bombs), then a full decode on the
    /// bounded pool, so a truncated or corrupt file is a 4xx now rather than a FAILURE later.
    async fn validate(&self, bytes: Bytes) -> Result<preprocess::ImageInfo, ImageError> {
        let max_pixels = self.config.max_pixels;
        let info = preprocess::inspect(&bytes, max_pixels)?;
        let _slot = self.preprocess_slots.acquire().await.expect("never closed");
        tokio::task::spawn_blocking(move || preprocess::validate(&bytes, max_pixels).map(|_| info))
            .await
            .unwrap_or_else(|e| Err(ImageError::Undecodable(format!("decoder crashed: {e}"))))
    }

    /// Decodes and preprocesses on the bounded blocking pool, never on a runtime worker.
    async fn tensor(&self, bytes: Bytes) -> Result<Vec<f32>, ImageError> {
        let _slot = self.preprocess_slots.acquire().await.expect("never closed");
        let transform = self.classifier.spec().transform.clone();
        let max_pixels = self.config.max_pixels;
        let started = Instant::now();
        let tensor =
            tokio::task::spawn_blocking(move || transform.tensor_from_bytes(&bytes, max_pixels))
                .await
                .unwrap_or_else(|e| Err(ImageError::Undecodable(format!("decoder crashed: {e}"))));
        self.observe("preprocess", started);
        tensor
    }

    /// Re-enqueues every task that is not final: after a restart of the embedded service, whose
    /// in-memory queue died with the process, the result store is the record of what was
    /// accepted. Do not use with a durable queue, which still holds those jobs.
    pub async fn requeue_unfinished(&self) -> Result<usize, String> {
        let open = self
            .ports
            .results
            .unfinished(usize::MAX)
            .await
            .map_err(|e| e.to_string())?;
        for record in &open {
            self.ports
                .queue
                .enqueue(&record.job())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(open.len())
    }

    /// Takes jobs from the queue until `shutdown` turns true (or its sender drops), then waits
    /// up to `drain_timeout` for the jobs in hand. Jobs still unfinished then are dropped
    /// unacknowledged, so the queue delivers them again.
    pub async fn run_worker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Two batches in flight: one in the model, the next being fetched and preprocessed.
        let slots = Arc::new(Semaphore::new(2 * self.config.max_batch.max(1)));
        let mut running = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                _ = shutdown.changed() => continue,
            };
            let max = (1 + slots.available_permits()).min(self.config.max_batch.max(1));
            let received = tokio::select! {
                received = self.ports.queue.receive(max, Duration::from_secs(1)) => received,
                _ = shutdown.changed() => continue,
            };
            let deliveries = match received {
                Ok(deliveries) => {
                    backoff = Duration::from_millis(100);
                    deliveries
                }
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "receiving from the queue failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let mut first = Some(first);
            for delivery in deliveries {
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => slots.clone().acquire_owned().await.expect("never closed"),
                };
                let pipeline = self.clone();
                let span = tracing::info_span!(
                    "task",
                    task_id = %delivery.job().task_id,
                    attempt = delivery.attempt()
                );
                running.spawn(
                    async move {
                        pipeline.process(delivery).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            while running.try_join_next().is_some() {}
        }
        tracing::info!(
            jobs = running.len(),
            "worker stopping; draining jobs in hand"
        );
        let drained = tokio::time::timeout(self.config.drain_timeout, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                jobs = running.len(),
                "drain timed out; unfinished jobs return to the queue"
            );
            running.shutdown().await;
        }
    }

    /// One delivery, from fetch to ack. Every path settles the delivery.
    async fn process(&self, delivery: Box<dyn Delivery>) {
        let task_id = delivery.job().task_id;
        let attempt = delivery.attempt();
        // A job that already used every attempt (its workers kept dying on it) is not run
        // again: one poisonous image must not take down every worker in turn.
        let outcome = if attempt > self.config.max_attempts {
            Err(Failure::Permanent(format!(
                "gave up after {} attempts (the worker stopped while processing it)",
                self.config.max_attempts
            )))
        } else {
            self.try_process(delivery.as_ref()).await
        };
        let settled = match outcome {
            Ok(Some(record)) => {
                let settled = delivery.ack().await;
                self.metrics.task_success.inc();
                self.finished(record);
                settled
            }
            Ok(None) => delivery.ack().await,
            Err(Failure::Temporary(error)) if attempt < self.config.max_attempts => {
                let after = self.config.retry_backoff * 2u32.saturating_pow(attempt - 1).min(64);
                tracing::warn!(%task_id, attempt, %error, ?after, "task will be retried");
                delivery.retry(after).await
            }
            Err(Failure::Temporary(error) | Failure::Permanent(error)) => {
                tracing::warn!(%task_id, attempt, %error, "task failed");
                match self.ports.results.fail(task_id, &error).await {
                    Ok(wrote) => {
                        let settled = delivery.dead_letter(&error).await;
                        if wrote {
                            self.metrics.task_failure.inc();
                            if let Ok(Some(record)) = self.ports.results.get(task_id).await {
                                self.finished(record);
                            }
                        }
                        settled
                    }
                    Err(e) => {
                        tracing::error!(%task_id, error = %e, "cannot record the failure; retrying");
                        delivery.retry(self.config.retry_backoff).await
                    }
                }
            }
        };
        if let Err(error) = settled {
            // The queue will deliver it again; the result store keeps that harmless.
            tracing::warn!(%task_id, %error, "settling the delivery failed");
        }
    }

    /// Returns the finished record if this delivery produced the result, `None` if there is
    /// nothing to do (the task is already final or unknown).
    async fn try_process(&self, delivery: &dyn Delivery) -> Result<Option<TaskRecord>, Failure> {
        let job = delivery.job();
        let results = &self.ports.results;
        let temporary =
            |what: &str, e: &dyn std::fmt::Display| Failure::Temporary(format!("{what}: {e}"));
        let record = match results.start(job.task_id).await {
            Ok(Some(record)) if record.state.is_final() => return Ok(None),
            Ok(Some(record)) => record,
            Ok(None) => {
                tracing::warn!(task_id = %job.task_id, "job for an unknown task dropped");
                return Ok(None);
            }
            Err(e) => return Err(temporary("starting the task", &e)),
        };
        let mut timings = StageTimings::default();
        if record.attempts == 1 {
            timings.queue_wait_ms = (now_ms() - record.created_at_ms).max(0) as f64;
            self.metrics
                .stage_seconds
                .with_label_values(&["queue_wait"])
                .observe(timings.queue_wait_ms / 1000.0);
        }

        let started = Instant::now();
        let bytes = match self.ports.storage.get(&job.object_key).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_temporary() => return Err(temporary("fetching the image", &e)),
            Err(e) => return Err(Failure::Permanent(format!("fetching the image: {e}"))),
        };
        timings.fetch_ms = self.observe("fetch", started);

        let started = Instant::now();
        let tensor = self
            .tensor(bytes)
            .await
            .map_err(|e| Failure::Permanent(e.to_string()))?;
        timings.preprocess_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let logits = self.classifier.logits(tensor).await.map_err(|e| match *e {
            ClassifyError::Stopped => temporary("classifying", &e),
            _ => Failure::Permanent(format!("classifying: {e}")),
        })?;
        timings.infer_ms = self.observe("infer", started);

        let spec = self.classifier.spec();
        let result = TaskResult {
            task_id: job.task_id,
            metadata: record.metadata.clone(),
            classification: spec.top_k(&logits, self.config.top_k),
            model: spec.name.clone(),
            timings,
        };
        let started = Instant::now();
        let wrote = results
            .complete(job.task_id, &result)
            .await
            .map_err(|e| temporary("storing the result", &e))?;
        self.observe("persist", started);
        if !wrote {
            return Ok(None);
        }
        let mut record = record;
        record.state = crate::TaskState::Success;
        record.result = Some(result);
        Ok(Some(record))
    }

    /// Records the latency of a final task and sends its callback, without holding up the worker.
    fn finished(&self, record: TaskRecord) {
        let latency = (now_ms() - record.created_at_ms).max(0) as f64 / 1000.0;
        self.metrics.task_latency.observe(latency);
        let Some(url) = record.callback_url.clone() else {
            return;
        };
        if !self.ports.notifier.enabled() {
            return;
        }
        let (notifier, results) = (self.ports.notifier.clone(), self.ports.results.clone());
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let task_id = record.task_id;
            let delivery = |state, attempts, last_status| WebhookDelivery {
                state,
                attempts,
                last_status,
                updated_at_ms: now_ms(),
            };
            let pending = delivery(WebhookState::Pending, 0, None);
            if let Err(error) = results.record_webhook(task_id, &pending).await {
                tracing::warn!(%task_id, %error, "cannot record the callback's state");
            }
            let outcome = match notifier.notify(&url, &record.status()).await {
                Ok(attempts) => {
                    metrics.webhook_success.inc();
                    delivery(WebhookState::Delivered, attempts, None)
                }
                Err(error) => {
                    metrics.webhook_failure.inc();
                    tracing::warn!(%task_id, %error, "callback not delivered");
                    let attempts = match &error {
                        NotifyError::Failed { attempts, .. } => *attempts,
                        NotifyError::Refused(_) => 0,
                    };
                    delivery(WebhookState::Failed, attempts, Some(error.to_string()))
                }
            };
            metrics
                .webhook_latency
                .observe(started.elapsed().as_secs_f64());
            if let Err(error) = results.record_webhook(task_id, &outcome).await {
                tracing::warn!(%task_id, %error, "cannot record the callback's state");
            }
        });
    }

    /// Histograms the time since `started` under `stage`; returns it in milliseconds.
    fn observe(&self, stage: &str, started: Instant) -> f64 {
        let seconds = started.elapsed().as_secs_f64();
        self.metrics
            .stage_seconds
            .with_label_values(&[stage])
            .observe(seconds);
        seconds * 1e3
    }
}

/// Resolves on ctrl-c or SIGTERM: what both binaries stop on.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
