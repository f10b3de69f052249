//! Where the ports meet, read top to bottom: the accepting side ([`Submitter`]: check, store,
//! record, enqueue, status, admission) and the working side ([`Worker`]: fetch, preprocess,
//! batched inference, persist, notify). A distributed `imgclf-http` holds only a `Submitter`, so
//! it loads no model; an `imgclf-worker` holds a `Worker`; the embedded default ([`Pipeline`])
//! holds both over the same ports, metrics and CPU slots.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::classifier::{ClassifierHandle, ClassifyError, ClassifyImageError, Queued};
use crate::metrics::Metrics;
use crate::notify::{Notifier, NotifyError};
use crate::preprocess::{self, Crop, ImageError, Transform};
use crate::queue::{Delivery, Queue};
use crate::results::{FinalTasks, ResultStore, ResultsError};
use crate::storage::{Storage, StorageError};
use crate::task::{
    now_ms, Job, Prediction, StageTimings, TaskId, TaskRecord, TaskResult, TaskState,
    WebhookDelivery, WebhookState,
};
use crate::BoxError;

/// Most images per inference batch where none is set and none is measured (the AMQP prefetch
/// is sized from it).
pub const DEFAULT_MAX_BATCH: usize = 8;
/// Classes returned per image, by default.
pub const DEFAULT_TOP_K: usize = 5;
/// Deliveries of one job before it fails for good, by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Uploads get 429 while this many jobs wait, by default.
pub const DEFAULT_MAX_QUEUE_DEPTH: u64 = 10_000;
/// How long a stopping worker waits for the jobs it holds, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds after its last change that an unfinished task counts as stranded, by default: far
/// longer than any job runs or waits for a retry, so a live job is rarely doubled (and a double
/// is harmless).
pub const DEFAULT_REQUEUE_AFTER_SECS: u64 = 900;
/// How long a publish may take before the upload is refused, by default (a broker in flow
/// control holds publishes indefinitely).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds a final task (its record, image and dead letter) is kept, by default: a week.
pub const DEFAULT_RESULT_TTL_SECS: u64 = 7 * 24 * 3600;
/// Tasks deleted per store call while expiring: bounded writes, however much is due.
const EXPIRE_BATCH: usize = 500;

/// The backends a pipeline runs on.
#[derive(Clone)]
pub struct Ports {
    /// Where uploaded images are kept.
    pub storage: Arc<dyn Storage>,
    /// Where jobs wait for a worker.
    pub queue: Arc<dyn Queue>,
    /// The record of every accepted task.
    pub results: Arc<dyn ResultStore>,
    /// Who tells clients that their task finished.
    pub notifier: Arc<dyn Notifier>,
}

/// Limits and knobs shared by both sides.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Most decoded pixels per image.
    pub max_pixels: u64,
    /// Classes returned per image.
    pub top_k: usize,
    /// Starts of one task that ended without an answer (its worker died) before it is given
    /// up on. Attempts that met an outage are retried without limit and do not count.
    pub max_attempts: u32,
    /// First retry delay; doubles with each retry, up to 64 times this.
    pub retry_backoff: Duration,
    /// Threads decoding and preprocessing at once.
    pub preprocess_threads: usize,
    /// How long a stopping worker waits for the jobs it holds.
    pub drain_timeout: Duration,
    /// Uploads get `Busy` (429) while this many jobs wait; 0 for no limit.
    pub max_queue_depth: u64,
    /// A task still `PENDING` or `STARTED` this long after its last change has lost its job
    /// (a crash between recording and queueing, a broker that dropped it): it is queued again.
    pub requeue_after: Duration,
    /// How long a publish may take before the upload is refused with nothing kept.
    pub publish_timeout: Duration,
    /// Attempts per callback before it is given up on.
    pub callback_attempts: u32,
    /// Wait before a callback's second attempt; doubles with each, with jitter.
    pub callback_backoff: Duration,
    /// No callback attempt starts later than this after the task ended.
    pub callback_max_age: Duration,
    /// How long a claimed callback is left to its dispatcher before another may take it (a
    /// dispatcher that died mid-attempt): longer than one attempt may take.
    pub callback_lease: Duration,
    /// How long a final task is kept after it ended: then its record, its image and its dead
    /// letter are deleted (and the task answers as unknown). `None` keeps everything.
    /// Unfinished tasks never expire.
    pub result_ttl: Option<Duration>,
    /// How long a final task's image is kept after it ended, when sooner than `result_ttl`.
    pub image_ttl: Option<Duration>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_pixels: preprocess::DEFAULT_MAX_PIXELS,
            top_k: DEFAULT_TOP_K,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_backoff: Duration::from_secs(1),
            preprocess_threads: crate::cores(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            requeue_after: Duration::from_secs(DEFAULT_REQUEUE_AFTER_SECS),
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            callback_attempts: crate::notify::DEFAULT_ATTEMPTS,
            callback_backoff: Duration::from_millis(500),
            callback_max_age: Duration::from_secs(3600),
            callback_lease: Duration::from_secs(2 * crate::notify::DEFAULT_TIMEOUT_SECS + 5),
            result_ttl: Some(Duration::from_secs(DEFAULT_RESULT_TTL_SECS)),
            image_ttl: None,
        }
    }
}

/// Who waits for which task in this process: a task's end wakes its own waiters, not every
/// waiter (each of which would read the result store again).
struct Waiters {
    map: std::sync::Mutex<std::collections::HashMap<TaskId, Arc<Notify>>>,
    /// Whether every task is finished in this process (the queue is in-memory), by a worker
    /// that wakes its waiters: then they read the store again only now and then, in case a
    /// wake was missed. (Without a worker here, nothing finishes the tasks to wait for.)
    all_finish_here: bool,
    /// Whether the result store tells of every task that becomes final, wherever it ends
    /// ([`ResultStore::final_tasks`]): then, too, waiters read it again only now and then.
    told_of_final_tasks: std::sync::atomic::AtomicBool,
}

/// One waiter's registration; dropping it forgets the task once no one else waits for it.
struct Watch<'a> {
    waiters: &'a Waiters,
    id: TaskId,
    notify: Arc<Notify>,
}

impl Waiters {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<TaskId, Arc<Notify>>> {
        // Only inserts and removes happen under the lock: a panic leaves the map whole.
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn watch(&self, id: TaskId) -> Watch<'_> {
        let notify = self.map().entry(id).or_default().clone();
        Watch {
            waiters: self,
            id,
            notify,
        }
    }

    fn wake(&self, id: TaskId) {
        if let Some(notify) = self.map().get(&id) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        self.map()
            .values()
            .for_each(|notify| notify.notify_waiters());
    }

    /// Whether each waiter is woken when its task ends.
    fn woken_at_the_end(&self) -> bool {
        self.all_finish_here || self.told_of_final_tasks.load(Ordering::Relaxed)
    }

    /// Wakes the waiters of each task the result store tells of, while `waiters` lives (its
    /// end, seen within a second, drops `told` and so the store's listening connection).
    async fn wake_on_final_tasks(waiters: Weak<Self>, mut told: mpsc::Receiver<FinalTasks>) {
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let word = tokio::select! {
                word = told.recv() => word,
                _ = check.tick() => match waiters.strong_count() {
                    0 => return,
                    _ => continue,
                },
            };
            let (Some(word), Some(waiters)) = (word, waiters.upgrade()) else {
                return;
            };
            match word {
                FinalTasks::Final(id) => waiters.wake(id),
                FinalTasks::Listening | FinalTasks::NotListening => {
                    let listening = word == FinalTasks::Listening;
                    waiters
                        .told_of_final_tasks
                        .store(listening, Ordering::Relaxed);
                    // What ended untold is read now.
                    waiters.wake_all();
                }
            }
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map();
        // Clones are made and dropped under the lock: two references are the map's and ours.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.id);
        }
    }
}

/// What both sides share inside one process.
#[derive(Clone)]
struct Shared {
    ports: Ports,
    config: PipelineConfig,
    metrics: Arc<Metrics>,
    /// Decoding and preprocessing slots: one pool for upload checks and worker preprocessing.
    cpu_slots: Arc<Semaphore>,
    /// Waiters for tasks this process may finish, so that they need not poll.
    waiters: Arc<Waiters>,
    /// Where uploads start their classification early or hold their images for the worker (the
    /// embedded service only).
    head_starts: Option<Arc<HeadStarts>>,
}

impl Shared {
    fn new(ports: Ports, config: PipelineConfig) -> Self {
        let waiters = Arc::new(Waiters {
            map: Default::default(),
            all_finish_here: ports.queue.is_local(),
            told_of_final_tasks: Default::default(),
        });
        Self {
            cpu_slots: Arc::new(Semaphore::new(config.preprocess_threads.max(1))),
            ports,
            config,
            metrics: Arc::new(Metrics::new()),
            waiters,
            head_starts: None,
        }
    }

    /// An image's logits, and how long preprocessing and inference took (ms), from an instance
    /// that preprocesses its images; `queued` at `started`.
    async fn answer(&self, queued: Queued, started: Instant) -> Classification {
        let classified = queued.answer().await?;
        let (total, preprocess) = (started.elapsed(), classified.preprocess);
        let infer = total.saturating_sub(preprocess);
        let stages = &self.metrics.stage_seconds;
        for (stage, time) in [("preprocess", preprocess), ("infer", infer)] {
            stages
                .with_label_values(&[stage])
                .observe(time.as_secs_f64());
        }
        let ms = |t: Duration| t.as_secs_f64() * 1e3;
        Ok((classified.logits, ms(preprocess), ms(infer)))
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

    /// Runs CPU-heavy work on the blocking pool once a slot is free, never on a runtime worker.
    /// The slot travels with the work: a caller that goes away (a dropped request) leaves the
    /// work to finish in its slot, so abandoned decodes can never pile up beyond the pool.
    async fn on_cpu<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
    ) -> Result<T, ImageError> {
        let slot = self
            .cpu_slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
        .unwrap_or_else(|e| Err(ImageError::Undecodable(format!("decoder crashed: {e}"))))
    }

    async fn render_metrics(&self) -> String {
        match self.ports.queue.depth().await {
            Ok(depth) => {
                let depth = depth.try_into().unwrap_or(i64::MAX);
                self.metrics.queue_depth.set(depth);
                self.metrics.celery_queue_depth.set(depth);
            }
            Err(error) => tracing::warn!(%error, "queue depth unavailable"),
        }
        self.metrics.render()
    }
}

// ---------------------------------------------------------------------------------------------
// The accepting side.

/// One image as uploaded.
#[derive(Clone, Debug, Default)]
pub struct Upload {
    /// The file as sent.
    pub bytes: Bytes,
    /// The client's name for it, kept in the metadata.
    pub filename: Option<String>,
    /// The client's metadata (a JSON object), returned with the result.
    pub metadata: Map<String, Value>,
    /// Where to POST the task status when it ends.
    pub callback_url: Option<String>,
    /// A client's key for retrying an upload safely: the same key and bytes give the same task.
    pub idempotency_key: Option<String>,
    /// Classes to return for this image [default: the configured `top_k`].
    pub top_k: Option<usize>,
    /// The request that carried it (`x-request-id`), passed to the worker with the job.
    pub request_id: Option<String>,
}

/// Why an upload was not accepted. Nothing of it was kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// Not an image this service reads, or one over the limits.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The callback URL is refused.
    #[error(transparent)]
    Callback(#[from] NotifyError),
    /// The queue is deeper than the configured limit: try again later.
    #[error("the service is busy ({depth} tasks waiting); retry later")]
    Busy {
        /// Jobs waiting.
        depth: u64,
        /// When to try again.
        retry_after: Duration,
    },
    /// A backend could not take the task.
    #[error("the service cannot accept tasks right now: {what} failed: {source}")]
    Unavailable {
        /// The step that failed.
        what: &'static str,
        /// Why (for the log: it may name hosts, paths or SQL).
        source: BoxError,
    },
}

impl SubmitError {
    fn unavailable(what: &'static str) -> impl FnOnce(BoxError) -> Self {
        move |source| Self::Unavailable { what, source }
    }
}

/// The accepting side: checks, stores, records and queues images and answers for their state.
/// Holds no model.
pub struct Submitter {
    shared: Shared,
    /// The last queue depth read, and when.
    depth: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl Submitter {
    /// An accepting side on `ports`.
    pub fn new(ports: Ports, config: PipelineConfig) -> Self {
        Self::with(Shared::new(ports, config))
    }

    fn with(shared: Shared) -> Self {
        let waiters = &shared.waiters;
        if !waiters.all_finish_here {
            if let Some(told) = shared.ports.results.final_tasks() {
                let waiters = Arc::downgrade(waiters);
                tokio::spawn(Waiters::wake_on_final_tasks(waiters, told));
            }
        }
        Self {
            shared,
            depth: std::sync::Mutex::new(None),
        }
    }

    /// The backends.
    pub fn ports(&self) -> &Ports {
        &self.shared.ports
    }

    /// The limits in force.
    pub fn config(&self) -> &PipelineConfig {
        &self.shared.config
    }

    /// This process's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The Prometheus text of every metric, with the queue depth read now.
    pub async fn render_metrics(&self) -> String {
        self.shared.render_metrics().await
    }

    /// Whether this server would call `url` back: its address policy, and callbacks on.
    pub async fn check_callback(&self, url: &str) -> Result<(), SubmitError> {
        let notifier = &self.shared.ports.notifier;
        notifier.check_url(url).await?;
        if !notifier.enabled() {
            let why = "callbacks are turned off on this server".to_string();
            return Err(NotifyError::Refused(why).into());
        }
        Ok(())
    }

    /// Checks, stores, records and queues an image; returns its task id. On any failure nothing
    /// is left behind, but for an upload with an idempotency key that was refused at queueing:
    /// its task is kept and queued later, for a retry with the key may have been told of it.
    ///
    /// The cheap refusals come first (a known idempotency key, a full queue), then the decode.
    /// Not cancel-safe: dropped half-way it can leave an image or a record behind, so a server
    /// runs it to completion on a task of its own once the bytes are in.
    pub async fn submit(&self, upload: Upload) -> Result<TaskId, SubmitError> {
        let Ports {
            storage, results, ..
        } = &self.shared.ports;
        // The same key and bytes name the same task, so a retried upload finds the first one.
        let task_id = match &upload.idempotency_key {
            Some(key) => TaskId::derived(key, &upload.bytes),
            None => TaskId::new(),
        };
        if upload.idempotency_key.is_some() {
            let found = results
                .get(task_id)
                .await
                .map_err(|e| SubmitError::unavailable("recording the task")(e.into()))?;
            if let Some(record) = found {
                self.requeue_if_stranded(&record).await?;
                return Ok(task_id);
            }
        }
        self.admit().await?;
        let (info, crop) = self.validate(upload.bytes.clone()).await?;
        if let Some(url) = &upload.callback_url {
            self.check_callback(url).await?;
        }
        let key = format!("images/{task_id}.{}", info.extension());
        let mut metadata = upload.metadata;
        if let Some(filename) = upload.filename {
            metadata.insert("filename".into(), filename.into());
        }
        metadata.insert("object_name".into(), key.clone().into());
        let record = TaskRecord::pending(task_id, key.clone(), metadata, upload.callback_url);
        // With the model idle here, classifying starts now, beside the writes below; the
        // worker takes the answer (or else the bytes) with the job. Any return before the job
        // is queued cancels it.
        let head_start =
            (self.shared.head_starts.as_ref()).and_then(|s| s.start(task_id, &upload.bytes, crop));

        // Both writes at once: each waits on its own disk flush. Nothing is queued until both
        // hold, so no worker sees a record without its image.
        let (stored, created) =
            tokio::join!(storage.put(&key, upload.bytes), results.create(&record));
        match (stored, created) {
            (Ok(()), Ok(())) => {}
            // A concurrent upload with the same idempotency key won; its task is this one (and
            // the image under its key holds the same bytes).
            (_, Err(ResultsError::Conflict(_))) if upload.idempotency_key.is_some() => {
                return Ok(task_id)
            }
            (Err(e), created) => {
                if created.is_ok() {
                    let _ = results.delete(task_id).await;
                }
                return Err(SubmitError::unavailable("storing the image")(e.into()));
            }
            (Ok(()), Err(e)) => {
                let _ = storage.delete(&key).await;
                return Err(SubmitError::unavailable("recording the task")(e.into()));
            }
        }
        let mut job = record.job();
        job.top_k = upload.top_k;
        job.request_id = upload.request_id;
        if let Err(e) = self.shared.publish(&job).await {
            if upload.idempotency_key.is_some() {
                // A retry with the same key may have found this record and been answered 202
                // already: the task is kept and queued once the broker takes it.
                self.shared.publish_later(job);
            } else {
                // A publish that went through after its timeout finds no task and is dropped.
                let _ = results.delete(task_id).await;
                let _ = storage.delete(&key).await;
            }
            return Err(SubmitError::unavailable("queueing the task")(e));
        }
        if let Some(head_start) = head_start {
            head_start.keep();
        }
        tracing::debug!(%task_id, %key, "task accepted");
        Ok(task_id)
    }

    /// A retried upload that finds its task still `PENDING` long after it was accepted (its
    /// first try died between recording and queueing) queues it again, if the queue is empty.
    /// While jobs wait, the task's may be among them (a backlog older than
    /// `requeue_after`): the workers' sweepers, which know how far the queue has got, queue it
    /// again once the queue has passed it. A second job for a task that still has one is
    /// harmless all the same (transitions are guarded, completion idempotent): where the
    /// depth cannot be read, it is queued.
    async fn requeue_if_stranded(&self, record: &TaskRecord) -> Result<(), SubmitError> {
        let stranded_after = self.shared.config.requeue_after.as_millis() as i64;
        if record.state != TaskState::Pending || now_ms() - record.updated_at_ms <= stranded_after {
            return Ok(());
        }
        if let Ok(waiting @ 1..) = self.shared.queue_depth().await {
            tracing::debug!(task_id = %record.task_id, waiting, "stale task left to the sweepers");
            return Ok(());
        }
        tracing::info!(task_id = %record.task_id, "stranded task queued again");
        self.shared
            .publish(&record.job())
            .await
            .map_err(SubmitError::unavailable("queueing the task"))
    }

    /// Refuses new work while the queue is deeper than `max_queue_depth`. The depth is read at
    /// most once a second: a broker round trip per upload would cost more than it tells.
    async fn admit(&self) -> Result<(), SubmitError> {
        let limit = self.shared.config.max_queue_depth;
        if limit == 0 {
            return Ok(());
        }
        let cached = *self.depth.lock().unwrap();
        let depth = match cached {
            Some((at, depth)) if at.elapsed() < Duration::from_secs(1) => depth,
            _ => {
                let depth = (self.shared.queue_depth().await)
                    .map_err(SubmitError::unavailable("reading the queue depth"))?;
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

    /// The task's record, `None` for an unknown id.
    pub async fn status(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        self.shared.ports.results.get(id).await
    }

    /// The task's record as soon as it is final, or as it stands when `timeout` ends; `None`
    /// for an unknown id. A worker in this process, or the result store's word that the task
    /// ended ([`ResultStore::final_tasks`]), wakes the wait at once, and the store is read
    /// again each second in case a wake was missed. Without either (a store that cannot tell,
    /// tasks finished elsewhere), the store is read at short intervals (growing to 50 ms, so an
    /// answer comes within 50 ms of the task's end).
    pub async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, ResultsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(20);
        loop {
            // Registered before the read, so a completion between the two is not missed.
            let watch = self.shared.waiters.watch(id);
            let finished = watch.notify.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let record = self.status(id).await?;
            match &record {
                Some(r) if !r.state.is_final() && tokio::time::Instant::now() < deadline => {}
                _ => return Ok(record),
            }
            let next_read = match self.shared.waiters.woken_at_the_end() {
                true => Duration::from_secs(1),
                false => interval,
            };
            tokio::select! {
                _ = finished => {}
                _ = tokio::time::sleep(next_read) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            interval = (interval * 2).min(Duration::from_millis(50));
        }
    }

    /// Refuses what is not a whole, decodable image of acceptable size before anything is
    /// stored: the headers first, here (cheap, stops decompression bombs, and all that an RGB
    /// JPEG needs), then a full decode on the bounded pool, so a truncated or corrupt file is
    /// a 4xx now rather than a FAILURE later. Where this process's model takes the upload
    /// (embedded), an image that had to be decoded to be checked is kept for it, cropped.
    async fn validate(
        &self,
        bytes: Bytes,
    ) -> Result<(preprocess::ImageInfo, Option<Crop>), ImageError> {
        let max_pixels = self.shared.config.max_pixels;
        // A progressive JPEG's scans are counted in its bytes: past this size, on the pool.
        const INLINE_BYTES: usize = 4 << 20;
        if bytes.len() <= INLINE_BYTES {
            if let Some(info) = preprocess::validate_headers(&bytes, max_pixels)? {
                return Ok((info, None)); // no pool hop
            }
        } else {
            preprocess::inspect(&bytes, max_pixels)?; // the cheap refusals before a pool slot
        }
        let keep_for = (self.shared.head_starts.as_ref()).and_then(|s| s.takes_crops());
        self.shared
            .on_cpu(move || match keep_for {
                Some(transform) => preprocess::validate_keeping(&bytes, max_pixels, &transform),
                None => preprocess::validate(&bytes, max_pixels).map(|info| (info, None)),
            })
            .await
    }

    /// Re-enqueues every task that is not final: after a restart of the embedded service, whose
    /// in-memory queue died with the process, the result store is the record of what was
    /// accepted. Do not use with a durable queue, which still holds those jobs.
    pub async fn requeue_unfinished(&self) -> Result<usize, SubmitError> {
        let open = self
            .shared
            .ports
            .results
            .unfinished(usize::MAX)
            .await
            .map_err(|e| SubmitError::unavailable("listing unfinished tasks")(e.into()))?;
        for record in &open {
            self.shared
                .publish(&record.job())
                .await
                .map_err(SubmitError::unavailable("queueing the task"))?;
        }
        Ok(open.len())
    }
}

impl Shared {
    /// Queues a kept task's job in the background, backing off as retries do, until the broker
    /// takes it; after `requeue_after` the sweeper queues the task instead.
    fn publish_later(&self, job: Job) {
        let (queue, config) = (self.ports.queue.clone(), self.config.clone());
        tokio::spawn(async move {
            let (started, mut wait) = (Instant::now(), config.retry_backoff);
            while started.elapsed() < config.requeue_after {
                tokio::time::sleep(wait).await;
                if within(config.publish_timeout, queue.enqueue(&job))
                    .await
                    .is_ok()
                {
                    tracing::info!(task_id = %job.task_id, "a kept task queued");
                    return;
                }
                wait = (wait * 2).min(config.retry_backoff * 64);
            }
        });
    }

    /// Enqueues within `publish_timeout`.
    async fn publish(&self, job: &Job) -> Result<(), BoxError> {
        within(self.config.publish_timeout, self.ports.queue.enqueue(job)).await
    }

    /// The jobs waiting in the queue, read within `publish_timeout`.
    async fn queue_depth(&self) -> Result<u64, BoxError> {
        within(self.config.publish_timeout, self.ports.queue.depth()).await
    }
}

/// A call to the broker that must answer within `limit`: one that drops packets would hold
/// its caller for the system's TCP timeout.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, crate::queue::QueueError>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(limit, call).await {
        Ok(answered) => answered.map_err(Into::into),
        Err(_) => Err(format!("the broker did not answer within {limit:?}").into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The working side.

/// Why a job produced no result this time. Its text goes to the log; clients see only
/// [`JobError::public`] and an error id.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("starting the task: {0}")]
    Start(#[source] ResultsError),
    #[error("fetching the image: {0}")]
    Fetch(#[source] StorageError),
    #[error("decoding the image: {0}")]
    Image(#[source] ImageError),
    #[error("classifying: {0}")]
    Classify(#[source] Arc<ClassifyError>),
    #[error("storing the result: {0}")]
    Persist(#[source] ResultsError),
    #[error("gave up after {0} attempts (the worker stopped while processing it)")]
    Exhausted(u32),
}

impl From<ClassifyImageError> for JobError {
    fn from(error: ClassifyImageError) -> Self {
        match error {
            ClassifyImageError::Image(e) => Self::Image(e),
            ClassifyImageError::Classify(e) => Self::Classify(e),
        }
    }
}

impl From<ClassifyImageError> for ClassifyNowError {
    fn from(error: ClassifyImageError) -> Self {
        match error {
            ClassifyImageError::Image(e) => Self::Image(e),
            ClassifyImageError::Classify(e) => Self::Classify(e),
        }
    }
}

impl JobError {
    /// Whether another attempt may succeed: the one question retry decisions ask.
    fn is_temporary(&self) -> bool {
        match self {
            Self::Start(e) | Self::Persist(e) => e.is_temporary(),
            Self::Fetch(e) => e.is_temporary(),
            Self::Classify(e) => e.is_temporary(),
            Self::Image(_) | Self::Exhausted(_) => false,
        }
    }

    /// Whether the task's start was counted before this error.
    fn after_start(&self) -> bool {
        !matches!(self, Self::Start(_))
    }

    /// What a client may read: no paths, hosts, URIs or SQL.
    fn public(&self) -> String {
        match self {
            Self::Start(_) | Self::Persist(_) => "the task could not be recorded".into(),
            Self::Fetch(_) => "the image could not be read from storage".into(),
            Self::Image(_) => "the image could not be decoded".into(),
            Self::Classify(_) => "the model could not classify the image".into(),
            Self::Exhausted(n) => {
                format!("gave up after {n} attempts: the worker stopped while processing it")
            }
        }
    }
}

/// Why [`Worker::classify_now`] gave no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClassifyNowError {
    /// Not an image this service reads, or one over the limits.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The model failed.
    #[error(transparent)]
    Classify(#[from] Arc<ClassifyError>),
    /// As many synchronous classifications as the model can queue are already waiting.
    #[error("the model is busy with other synchronous classifications; retry later")]
    Busy,
}

/// The working side: takes jobs from the queue, classifies them in batches with the model it
/// owns, stores the results and sends the callbacks.
pub struct Worker {
    shared: Shared,
    classifier: ClassifierHandle,
    /// Synchronous classifications in flight: bounded, or `/api/classify` could queue without
    /// end in front of the model.
    classify_slots: Semaphore,
    /// Wakes the callback dispatcher when a task of this worker made a callback due.
    callbacks_due: Notify,
    /// When the newest task this worker has started was accepted (ms since the Unix epoch; 0
    /// before the first): how far the queue has got through a backlog, for the sweeper.
    queue_head_ms: AtomicI64,
}

impl Worker {
    /// A working side on `ports` with its model.
    pub fn new(ports: Ports, classifier: ClassifierHandle, config: PipelineConfig) -> Self {
        Self::with(Shared::new(ports, config), classifier)
    }

    fn with(shared: Shared, classifier: ClassifierHandle) -> Self {
        classifier.record_batch_sizes(shared.metrics.batch_size.clone());
        let classify_slots = Semaphore::new(4 * classifier.max_batch() * classifier.instances());
        Self {
            shared,
            classifier,
            classify_slots,
            callbacks_due: Notify::new(),
            queue_head_ms: AtomicI64::new(0),
        }
    }

    /// The backends.
    pub fn ports(&self) -> &Ports {
        &self.shared.ports
    }

    /// The model.
    pub fn classifier(&self) -> &ClassifierHandle {
        &self.classifier
    }

    /// The limits in force.
    pub fn config(&self) -> &PipelineConfig {
        &self.shared.config
    }

    /// This process's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The Prometheus text of every metric, with the queue depth read now.
    pub async fn render_metrics(&self) -> String {
        self.shared.render_metrics().await
    }

    /// Classifies an image now, without a task: the synchronous API where the model is local.
    pub async fn classify_now(
        &self,
        bytes: Bytes,
        top_k: usize,
    ) -> Result<Vec<Prediction>, ClassifyNowError> {
        let _slot = self
            .classify_slots
            .try_acquire()
            .map_err(|_| ClassifyNowError::Busy)?;
        let (logits, _, _) = self.classify(bytes).await?;
        Ok(self.classifier.spec().top_k(&logits, top_k))
    }

    /// Takes jobs from the queue until `shutdown` turns true or its sender is dropped, then
    /// waits up to `drain_timeout` for the jobs in hand. Jobs still unfinished then are dropped
    /// unacknowledged, so the queue delivers them again.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Jobs in hand for a batch per core (as many instances as the pool may grow to) and
        // every preprocessing thread, twice over: one set in the model, the next being fetched,
        // preprocessed and stored; at least two default batches, so that waits on storage and
        // the result store never starve the cores.
        let (classifier, config) = (&self.classifier, &self.shared.config);
        let max_batch = classifier.max_batch();
        let cores = crate::cores();
        let in_hand =
            2 * (cores * max_batch + config.preprocess_threads.max(1)).max(DEFAULT_MAX_BATCH);
        let slots = Arc::new(Semaphore::new(in_hand));
        let mut running = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        let sweeper = tokio::spawn(self.clone().sweep());
        let expirer = tokio::spawn(self.clone().expire());
        let dispatcher = tokio::spawn(self.clone().dispatch_callbacks(shutdown.clone()));
        // Resolves once a stop is asked for, or can never be (the sender is gone).
        let stop = |shutdown: &mut watch::Receiver<bool>| {
            let mut shutdown = shutdown.clone();
            async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            }
        };
        while !*shutdown.borrow_and_update() && shutdown.has_changed().is_ok() {
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                _ = stop(&mut shutdown) => break,
            };
            let max = (1 + slots.available_permits()).min(max_batch.max(DEFAULT_MAX_BATCH));
            let received = tokio::select! {
                received = self.shared.ports.queue.receive(max, Duration::from_secs(1)) => received,
                _ = stop(&mut shutdown) => break,
            };
            let deliveries = match received {
                Ok(deliveries) => {
                    backoff = Duration::from_millis(100);
                    deliveries
                }
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "receiving from the queue failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop(&mut shutdown) => break,
                    }
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
                let worker = self.clone();
                let job = delivery.job();
                let span = tracing::info_span!(
                    "task",
                    task_id = %job.task_id,
                    request_id = job.request_id.as_deref(),
                    attempt = delivery.attempt()
                );
                running.spawn(
                    async move {
                        worker.process(delivery).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            while running.try_join_next().is_some() {}
        }
        sweeper.abort();
        expirer.abort();
        tracing::info!(
            jobs = running.len(),
            "worker stopping; draining jobs in hand"
        );
        let drained = tokio::time::timeout(self.shared.config.drain_timeout, async {
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
        // The callbacks of the jobs just finished go out too, within the drain timeout.
        let _ = dispatcher.await;
    }

    /// Every worker sweeps, a few times per `requeue_after`: several at once split the work.
    async fn sweep(self: Arc<Self>) {
        let period = (self.shared.config.requeue_after / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(%error, "sweeping for stranded tasks failed");
            }
        }
    }

    /// Queues again the tasks left `PENDING` or `STARTED` for longer than `requeue_after`
    /// (a crash between recording and queueing, a job a broker lost); returns how many.
    /// While the queue holds jobs, a `PENDING` task accepted after the newest one this worker
    /// has started may only be waiting its turn (the queue delivers in order): it is left for
    /// a later sweep, so that a backlog older than `requeue_after` is not queued twice over.
    pub async fn sweep_once(&self) -> Result<usize, BoxError> {
        let Shared { ports, config, .. } = &self.shared;
        let before = now_ms() - config.requeue_after.as_millis() as i64;
        let pending_created_before = match self.shared.queue_depth().await? {
            0 => i64::MAX,
            _ => self.queue_head_ms.load(Ordering::Relaxed),
        };
        let stale = (ports.results)
            .claim_stale(before, pending_created_before, 100)
            .await?;
        for record in &stale {
            self.shared.publish(&record.job()).await?;
        }
        if !stale.is_empty() {
            tracing::info!(tasks = stale.len(), "stranded tasks queued again");
        }
        Ok(stale.len())
    }

    /// Every worker expires what outlived its TTL, at least once per TTL (and per minute):
    /// several at once split the work.
    async fn expire(self: Arc<Self>) {
        let config = &self.shared.config;
        let Some(shortest) = [config.result_ttl, config.image_ttl]
            .into_iter()
            .flatten()
            .min()
        else {
            return;
        };
        let period = (shortest / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.expire_once().await {
                tracing::warn!(%error, "expiring old tasks failed");
            }
        }
    }

    /// Deletes the final tasks older than `result_ttl` with their images, the images of final
    /// tasks older than `image_ttl`, and the dead letters older than `result_ttl`, in batches
    /// until none is left.
    pub async fn expire_once(&self) -> Result<Expired, BoxError> {
        let Shared {
            ports,
            config,
            metrics,
            ..
        } = &self.shared;
        let mut expired = Expired::default();
        let now = now_ms();
        let cutoff =
            |ttl: Duration| now.saturating_sub(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        // Images alone only when they go sooner than their tasks.
        if let Some(image_ttl) = config
            .image_ttl
            .filter(|image| config.result_ttl.is_none_or(|result| *image < result))
        {
            loop {
                let due = ports
                    .results
                    .claim_expired_images(cutoff(image_ttl), EXPIRE_BATCH)
                    .await?;
                expired.images += self.delete_images(&due).await;
                if due.len() < EXPIRE_BATCH {
                    break;
                }
            }
        }
        if let Some(result_ttl) = config.result_ttl {
            loop {
                let gone = ports
                    .results
                    .delete_expired(cutoff(result_ttl), EXPIRE_BATCH)
                    .await?;
                expired.tasks += gone.len() as u64;
                metrics.expired_tasks.inc_by(gone.len() as u64);
                expired.images += self.delete_images(&gone).await;
                if gone.len() < EXPIRE_BATCH {
                    break;
                }
            }
            expired.dead_letters = ports.queue.expire_dead_letters(cutoff(result_ttl)).await?;
            metrics.expired_dead_letters.inc_by(expired.dead_letters);
        }
        if expired != Expired::default() {
            tracing::info!(
                tasks = expired.tasks,
                images = expired.images,
                dead_letters = expired.dead_letters,
                "expired"
            );
        }
        Ok(expired)
    }

    /// Deletes the images of `records`; returns how many. A failure is logged and skipped:
    /// the record is already gone or marked, so only the object is left behind.
    async fn delete_images(&self, records: &[TaskRecord]) -> u64 {
        let mut deleted = 0;
        for record in records {
            match self.shared.ports.storage.delete(&record.object_key).await {
                Ok(()) => deleted += 1,
                Err(error) => tracing::warn!(
                    task_id = %record.task_id,
                    key = %record.object_key,
                    %error,
                    "deleting an expired image failed; the object is left behind"
                ),
            }
        }
        self.shared.metrics.expired_images.inc_by(deleted);
        deleted
    }

    /// One delivery, from fetch to ack. Every path settles the delivery.
    async fn process(&self, delivery: Box<dyn Delivery>) {
        let task_id = delivery.job().task_id;
        let attempt = delivery.attempt();
        let config = &self.shared.config;
        // A job whose workers kept dying on it is given up on by the count its record keeps
        // (see `try_process`), not by the queue's, which also counts the retries below.
        let outcome = self.try_process(delivery.as_ref()).await;
        let settled = match outcome {
            Ok(Some(record)) => {
                let settled = delivery.ack().await;
                self.shared.metrics.task_success.inc();
                self.finished(record);
                settled
            }
            Ok(None) => delivery.ack().await,
            // An outage (a store or the model unreachable, not the image) is waited out however
            // long it lasts, and the attempt is taken back: otherwise every job that met a
            // database restart of half a minute would end in FAILURE.
            Err(error) if error.is_temporary() => {
                if error.after_start() {
                    if let Err(e) = self.shared.ports.results.uncount_attempt(task_id).await {
                        tracing::debug!(%task_id, error = %e, "the attempt stays counted");
                    }
                }
                let after = config.retry_backoff * 2u32.saturating_pow(attempt - 1).min(64);
                tracing::warn!(%task_id, attempt, %error, ?after, "task will be retried");
                delivery.retry(after).await
            }
            Err(error) => {
                let error_id = crate::error_id();
                tracing::warn!(%task_id, attempt, %error, %error_id, "task failed");
                let stored = format!("{} (error id {error_id})", error.public());
                match self.shared.ports.results.fail(task_id, &stored).await {
                    Ok(wrote) => {
                        let settled = delivery.dead_letter(&error.to_string()).await;
                        if wrote {
                            self.shared.metrics.task_failure.inc();
                            if let Ok(Some(record)) = self.shared.ports.results.get(task_id).await {
                                self.finished(record);
                            }
                        }
                        settled
                    }
                    Err(e) => {
                        tracing::error!(%task_id, error = %e, "cannot record the failure; retrying");
                        delivery.retry(config.retry_backoff).await
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
    async fn try_process(&self, delivery: &dyn Delivery) -> Result<Option<TaskRecord>, JobError> {
        let job = delivery.job();
        let Ports {
            storage, results, ..
        } = &self.shared.ports;
        // The image is fetched while the start is recorded: both wait on I/O. (A duplicate
        // delivery of a final task fetches it for nothing; that is rare.) An image whose upload
        // started its classification here, or held its bytes, needs no fetch.
        let head_start = (self.shared.head_starts.as_ref()).and_then(|s| s.take(job.task_id));
        let image = async {
            match head_start {
                Some(HeadStarted::Classifying(queued, started)) => {
                    return Image::Queued(queued, started)
                }
                Some(HeadStarted::Held(bytes)) => return Image::Fetched(Ok(bytes), 0.0),
                Some(HeadStarted::Cropped(crop)) => {
                    return Image::Queued(self.classifier.queue_cropped(crop), Instant::now())
                }
                None => {}
            }
            let started = Instant::now();
            let bytes = storage.get(&job.object_key).await;
            Image::Fetched(bytes, self.shared.observe("fetch", started))
        };
        let (record, image) = tokio::join!(results.start(job.task_id), image);
        let record = match record.map_err(JobError::Start)? {
            Some(record) if record.state.is_final() => return Ok(None),
            Some(record) => {
                (self.queue_head_ms).fetch_max(record.created_at_ms, Ordering::Relaxed);
                record
            }
            None => {
                tracing::warn!(task_id = %job.task_id, "job for an unknown task dropped");
                return Ok(None);
            }
        };
        // The record counts starts durably, whatever the queue counts (an in-memory queue
        // forgets its counts when the process restarts): an image that kills its worker
        // every time is given up on all the same.
        let max_attempts = self.shared.config.max_attempts;
        if record.attempts > max_attempts {
            return Err(JobError::Exhausted(max_attempts));
        }
        let mut timings = StageTimings::default();
        if record.attempts == 1 {
            timings.queue_wait_ms = (now_ms() - record.created_at_ms).max(0) as f64;
            self.shared
                .metrics
                .stage_seconds
                .with_label_values(&["queue_wait"])
                .observe(timings.queue_wait_ms / 1000.0);
        }

        let (logits, preprocess_ms, infer_ms) = match image {
            Image::Queued(queued, started) => self.shared.answer(queued, started).await?,
            Image::Fetched(bytes, fetch_ms) => {
                timings.fetch_ms = fetch_ms;
                self.classify(bytes.map_err(JobError::Fetch)?).await?
            }
        };
        timings.preprocess_ms = preprocess_ms;
        timings.infer_ms = infer_ms;

        let spec = self.classifier.spec();
        let top_k = job.top_k.unwrap_or(self.shared.config.top_k);
        let result = TaskResult {
            task_id: job.task_id,
            metadata: record.metadata.clone(),
            classification: spec.top_k(&logits, top_k),
            model: spec.name.clone(),
            timings,
        };
        let started = Instant::now();
        let wrote = results
            .complete(job.task_id, &result)
            .await
            .map_err(JobError::Persist)?;
        self.shared.observe("persist", started);
        if !wrote {
            return Ok(None);
        }
        let mut record = record;
        record.state = TaskState::Success;
        record.result = Some(result);
        Ok(Some(record))
    }

    /// The image's logits, and how long preprocessing and inference took (ms): on one of the
    /// model's instances where they preprocess their own images, else preprocessed on the
    /// bounded blocking pool first.
    async fn classify(&self, bytes: Bytes) -> Classification {
        let started = Instant::now();
        if self.classifier.preprocesses() {
            let queued = (self.classifier).queue_image(bytes, self.shared.config.max_pixels);
            return self.shared.answer(queued, started).await;
        }
        let tensor = self
            .tensor(bytes)
            .await
            .map_err(ClassifyImageError::Image)?;
        let preprocess_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let logits = self
            .classifier
            .logits(tensor)
            .await
            .map_err(ClassifyImageError::Classify)?;
        Ok((logits, preprocess_ms, self.shared.observe("infer", started)))
    }

    /// Decodes and preprocesses on the bounded blocking pool.
    async fn tensor(&self, bytes: Bytes) -> Result<Vec<f32>, ImageError> {
        let transform = self.classifier.spec().transform.clone();
        let max_pixels = self.shared.config.max_pixels;
        let started = Instant::now();
        let tensor = self
            .shared
            .on_cpu(move || transform.tensor_from_bytes(&bytes, max_pixels))
            .await;
        self.shared.observe("preprocess", started);
        tensor
    }

    /// Records the latency of a final task and wakes its waiters and the callback dispatcher.
    /// (The callback itself was made due with the final state, in the same write.)
    fn finished(&self, record: TaskRecord) {
        let latency = (now_ms() - record.created_at_ms).max(0) as f64 / 1000.0;
        tracing::info!(state = %record.state, latency_ms = latency * 1000.0, "task finished");
        self.shared.metrics.task_latency.observe(latency);
        self.shared.waiters.wake(record.task_id);
        if record.callback_url.is_some() {
            self.callbacks_due.notify_one();
        }
    }

    /// Delivers due callbacks from the result store's outbox until `shutdown`, a few at a
    /// time, each attempt recorded with the next one's time; then waits up to `drain_timeout`
    /// for the deliveries in flight. Whatever a crash interrupts is claimed again after its
    /// lease, by this worker after a restart or by any other.
    async fn dispatch_callbacks(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if !self.shared.ports.notifier.enabled() {
            return;
        }
        let slots = Arc::new(Semaphore::new(CALLBACKS_IN_FLIGHT));
        let mut delivering = JoinSet::new();
        while !*shutdown.borrow_and_update() && shutdown.has_changed().is_ok() {
            let free = slots.available_permits();
            let due = if free == 0 {
                Vec::new()
            } else {
                let lease = self.shared.config.callback_lease.as_millis() as i64;
                let claimed = self
                    .shared
                    .ports
                    .results
                    .claim_callbacks(now_ms(), lease, free);
                claimed.await.unwrap_or_else(|error| {
                    tracing::warn!(%error, "reading the callback outbox failed");
                    Vec::new()
                })
            };
            let busy = due.len() == free && free > 0;
            for record in due {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                let worker = self.clone();
                delivering.spawn(async move {
                    worker.deliver_callback(record).await;
                    drop(slot);
                });
            }
            while delivering.try_join_next().is_some() {}
            if busy {
                continue;
            }
            tokio::select! {
                _ = self.callbacks_due.notified() => {}
                _ = tokio::time::sleep(CALLBACK_POLL) => {}
                _ = shutdown.changed() => {}
            }
        }
        let drained = tokio::time::timeout(self.shared.config.drain_timeout, async {
            while delivering.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                callbacks = delivering.len(),
                "drain timed out; callbacks in flight are due again after their lease"
            );
        }
    }

    /// One attempt at a claimed callback, and where it leaves the callback: delivered, due
    /// again later, or failed for good.
    async fn deliver_callback(&self, record: TaskRecord) {
        let (Some(url), Some(webhook)) = (&record.callback_url, &record.webhook) else {
            return;
        };
        let Shared {
            ports,
            metrics,
            config,
            ..
        } = &self.shared;
        let task_id = record.task_id;
        let attempts = webhook.attempts + 1;
        // The claim's lease: what is recorded below holds only if it has not run out.
        let claimed_until_ms = webhook.next_attempt_at_ms;
        // One id for every attempt of this notification, across restarts: receivers
        // deduplicate on it.
        let delivery_id = task_id.to_string();
        let outcome = ports
            .notifier
            .deliver(url, &record.status(), &delivery_id)
            .await;
        let now = now_ms();
        let age = Duration::from_millis((now - record.updated_at_ms).max(0) as u64);
        let next = match outcome {
            Ok(()) => {
                metrics.webhook_success.inc();
                metrics.webhook_latency.observe(age.as_secs_f64());
                (WebhookState::Delivered, None, 0)
            }
            Err(error) => {
                let error_id = crate::error_id();
                tracing::warn!(%task_id, attempts, %error, %error_id, "callback attempt failed");
                // The receiver's HTTP status is the client's own business; anything else
                // (addresses, TLS details) stays in the log.
                let (last_status, retryable) = match &error {
                    NotifyError::Attempt {
                        status: Some(status),
                        retryable,
                        ..
                    } => (format!("HTTP {status}"), *retryable),
                    NotifyError::Attempt { retryable, .. } => {
                        (format!("no answer (error id {error_id})"), *retryable)
                    }
                    NotifyError::Refused(why) => (format!("refused: {why}"), false),
                };
                let wait = callback_backoff(config.callback_backoff, attempts);
                if retryable
                    && attempts < config.callback_attempts
                    && age + wait < config.callback_max_age
                {
                    (
                        WebhookState::Pending,
                        Some(last_status),
                        now + wait.as_millis() as i64,
                    )
                } else {
                    metrics.webhook_failure.inc();
                    metrics.webhook_latency.observe(age.as_secs_f64());
                    (WebhookState::Failed, Some(last_status), 0)
                }
            }
        };
        let (state, last_status, next_attempt_at_ms) = next;
        let recorded = WebhookDelivery {
            state,
            attempts,
            last_status,
            updated_at_ms: now,
            next_attempt_at_ms,
        };
        match ports
            .results
            .record_webhook(task_id, claimed_until_ms, &recorded)
            .await
        {
            Ok(true) => {}
            // Another dispatcher claimed it after the lease ran out: its attempt is the
            // one recorded, and receivers deduplicate on the delivery id.
            Ok(false) => tracing::warn!(
                %task_id,
                "the callback's lease ran out during this attempt; its outcome is not recorded"
            ),
            // Still pending in the store: due again after its lease.
            Err(error) => tracing::warn!(%task_id, %error, "cannot record the callback's state"),
        }
    }
}

/// What one [`Worker::expire_once`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Task records (each with its image).
    pub tasks: u64,
    /// Images deleted (those of expired tasks included).
    pub images: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

/// Callbacks delivered at once by one worker.
const CALLBACKS_IN_FLIGHT: usize = 16;
/// How often the outbox is read when nothing wakes the dispatcher (callbacks made due by other
/// processes, retries coming due).
const CALLBACK_POLL: Duration = Duration::from_millis(500);

/// Exponential backoff with jitter (between half and one and a half times the step).
fn callback_backoff(first: Duration, attempts: u32) -> Duration {
    let step = first
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(16)))
        .min(Duration::from_secs(600));
    let jitter = f64::from(uuid::Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX);
    step.mul_f64(0.5 + jitter)
}

// ---------------------------------------------------------------------------------------------
// Both, in one process.

/// The embedded service: a [`Submitter`] and a [`Worker`] over the same ports, metrics and CPU
/// slots, so a finished task wakes its waiters at once.
pub struct Pipeline {
    submitter: Arc<Submitter>,
    worker: Arc<Worker>,
}

impl Pipeline {
    /// Both sides on `ports`, the worker with its model.
    pub fn new(ports: Ports, classifier: ClassifierHandle, config: PipelineConfig) -> Self {
        let mut shared = Shared::new(ports, config);
        // Every job of an in-memory queue is this process's worker's to take.
        if shared.ports.queue.is_local() {
            let max_pixels = shared.config.max_pixels;
            shared.head_starts = Some(Arc::new(HeadStarts::new(classifier.clone(), max_pixels)));
        }
        Self {
            submitter: Arc::new(Submitter::with(shared.clone())),
            worker: Arc::new(Worker::with(shared, classifier)),
        }
    }

    /// The accepting side.
    pub fn submitter(&self) -> &Arc<Submitter> {
        &self.submitter
    }

    /// The working side.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// See [`Submitter::submit`].
    pub async fn submit(&self, upload: Upload) -> Result<TaskId, SubmitError> {
        self.submitter.submit(upload).await
    }

    /// See [`Submitter::status`].
    pub async fn status(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        self.submitter.status(id).await
    }

    /// See [`Worker::run`].
    pub async fn run_worker(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        self.worker.clone().run(shutdown).await
    }
}

/// An image's logits, and how long preprocessing and inference took (ms).
type Classification = Result<(Vec<f32>, f64, f64), ClassifyImageError>;

/// Where a worker's image comes from: storage, or the model already (a head start).
enum Image {
    Fetched(Result<Bytes, StorageError>, f64),
    Queued(Queued, Instant),
}

/// The most image bytes uploads hold in memory for their worker at once; beyond it (a backlog
/// of a hundred photos or so), workers read the images back from storage. Peak memory grows
/// by at most this much.
const MAX_HELD_BYTES: usize = 32 << 20;

/// What an embedded upload hands its worker in memory, beside the job: the worker takes it
/// rather than reading back the image that the upload has just written. An upload that finds
/// an instance of the model idle queues its image at once, beside the disk flushes that make it
/// durable, and the worker takes the answer with the job: under light load, an image's latency
/// loses those flushes. Under load no instance is idle, and the upload holds its bytes instead,
/// sparing the worker a file read and the buffer it fills, or the crop of the image decoded by
/// its check (a PNG, say), sparing the model a second decode. Only the worker writes the
/// result, after it has recorded the start, so every guarantee holds as without it.
struct HeadStarts {
    classifier: ClassifierHandle,
    max_pixels: u64,
    early: std::sync::Mutex<Early>,
}

/// Uploads' head starts by task, and what they hold.
#[derive(Default)]
struct Early {
    tasks: std::collections::HashMap<TaskId, HeadStarted>,
    /// Classifications queued early: at most one per instance, so they never make a queue.
    started: usize,
    held_bytes: usize,
}

/// One upload's head start.
enum HeadStarted {
    /// Its classification, queued on an idle instance at `Instant`.
    Classifying(Queued, Instant),
    /// Its image's bytes.
    Held(Bytes),
    /// Its image, decoded by the upload's check, resized and cropped for the model.
    Cropped(Crop),
}

/// A head start for an upload not yet accepted: cancelled when dropped before [`Self::keep`].
struct HeadStart {
    starts: Arc<HeadStarts>,
    task_id: TaskId,
    kept: bool,
}

impl HeadStarts {
    fn new(classifier: ClassifierHandle, max_pixels: u64) -> Self {
        Self {
            classifier,
            max_pixels,
            early: Default::default(),
        }
    }

    fn early(&self) -> std::sync::MutexGuard<'_, Early> {
        self.early
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The transform of the model, if it takes images cropped by the uploads' checks.
    fn takes_crops(&self) -> Option<Transform> {
        (self.classifier.preprocesses()).then(|| self.classifier.spec().transform.clone())
    }

    /// Queues the image for the model if an instance is idle (its `crop` by the upload's check,
    /// else its `bytes`), else holds it if there is room (and the task has no head start yet).
    /// Held bytes spare a file read, a crop a decode: bytes take at most half the room.
    fn start(
        self: &Arc<Self>,
        task_id: TaskId,
        bytes: &Bytes,
        crop: Option<Crop>,
    ) -> Option<HeadStart> {
        let mut early = self.early();
        if early.tasks.contains_key(&task_id) {
            return None;
        }
        let (held, room) = match &crop {
            Some(crop) => (crop.byte_len(), MAX_HELD_BYTES),
            None => (bytes.len(), MAX_HELD_BYTES / 2),
        };
        let head_start = if self.classifier.preprocesses()
            && early.started < self.classifier.instances()
            && self.classifier.is_idle()
        {
            early.started += 1;
            let queued = match crop {
                Some(crop) => self.classifier.queue_cropped(crop),
                None => self.classifier.queue_image(bytes.clone(), self.max_pixels),
            };
            HeadStarted::Classifying(queued, Instant::now())
        } else if early.held_bytes + held <= room {
            early.held_bytes += held;
            match crop {
                Some(crop) => HeadStarted::Cropped(crop),
                None => HeadStarted::Held(bytes.clone()),
            }
        } else {
            return None;
        };
        early.tasks.insert(task_id, head_start);
        Some(HeadStart {
            starts: self.clone(),
            task_id,
            kept: false,
        })
    }

    /// The task's head start, if it has one: taken once.
    fn take(&self, task_id: TaskId) -> Option<HeadStarted> {
        let mut early = self.early();
        let taken = early.tasks.remove(&task_id)?;
        match &taken {
            HeadStarted::Classifying(..) => early.started -= 1,
            HeadStarted::Held(bytes) => early.held_bytes -= bytes.len(),
            HeadStarted::Cropped(crop) => early.held_bytes -= crop.byte_len(),
        }
        Some(taken)
    }
}

impl HeadStart {
    /// The upload was accepted: its job will take the head start.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for HeadStart {
    fn drop(&mut self) {
        if !self.kept {
            self.starts.take(self.task_id);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::NoopNotifier;
    use crate::queue::MemoryQueue;
    use crate::results::MemoryResults;
    use crate::storage::MemoryStorage;

    fn ports() -> Ports {
        Ports {
            storage: Arc::new(MemoryStorage::new()),
            queue: Arc::new(MemoryQueue::new(Duration::from_secs(60))),
            results: Arc::new(MemoryResults::new()),
            notifier: Arc::new(NoopNotifier),
        }
    }

    /// The store's word wakes the waiters it names, and whether it listens sets how often
    /// waits read the store: each second while it does, at short intervals while it does not.
    #[tokio::test]
    async fn waiters_follow_the_word_of_final_tasks() {
        let waiters = Arc::new(Waiters {
            map: Default::default(),
            all_finish_here: false,
            told_of_final_tasks: Default::default(),
        });
        let (tell, told) = mpsc::channel(8);
        tokio::spawn(Waiters::wake_on_final_tasks(Arc::downgrade(&waiters), told));
        let (ended, running) = (TaskId::new(), TaskId::new());
        let (ended_watch, running_watch) = (waiters.watch(ended), waiters.watch(running));
        let woken = |watch: &Watch<'_>| {
            let notify = watch.notify.clone();
            tokio::spawn(async move { notify.notified().await })
        };
        let within = |task| tokio::time::timeout(Duration::from_secs(5), task);
        assert!(
            !waiters.woken_at_the_end(),
            "short reads until the store listens"
        );

        // Listening: every waiter reads again (what ended untold), then waits long.
        let (a, b) = (woken(&ended_watch), woken(&running_watch));
        tokio::task::yield_now().await;
        tell.send(FinalTasks::Listening).await.unwrap();
        within(a).await.expect("woken").unwrap();
        within(b).await.expect("woken").unwrap();
        assert!(waiters.woken_at_the_end());

        // A final task wakes its own waiters only.
        let (a, b) = (woken(&ended_watch), woken(&running_watch));
        tokio::task::yield_now().await;
        tell.send(FinalTasks::Final(ended)).await.unwrap();
        within(a).await.expect("woken").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!b.is_finished(), "a task still running wakes no one");

        // Not listening: every waiter reads again, then at short intervals.
        tell.send(FinalTasks::NotListening).await.unwrap();
        within(b).await.expect("woken").unwrap();
        assert!(!waiters.woken_at_the_end());

        // Gone (the submitter dropped): the store is let go, though it tells nothing more.
        drop(ended_watch);
        drop(running_watch);
        drop(waiters);
        let let_go = tokio::time::timeout(Duration::from_secs(5), tell.closed()).await;
        let_go.expect("let go within a second");
    }

    /// A worker whose stop sender is dropped stops (and does not spin on the closed channel).
    #[cfg(feature = "tract")]
    #[tokio::test]
    async fn worker_stops_when_its_stop_sender_is_dropped() {
        let spec = crate::ModelSpec::load(crate::config::default_model_dir()).unwrap();
        let model = crate::classifier::TractClassifier::new(spec).unwrap();
        let classifier = ClassifierHandle::spawn(Box::new(model), 1);
        let worker = Arc::new(Worker::new(ports(), classifier, PipelineConfig::default()));
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(worker.run(stopped));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the worker stops within 5 s of its stop sender being dropped")
            .unwrap();
    }

    /// The tract model, preprocessing on one instance, once it is ready.
    #[cfg(feature = "tract")]
    async fn ready_classifier() -> ClassifierHandle {
        let spec = crate::ModelSpec::load(crate::config::default_model_dir()).unwrap();
        let model = crate::classifier::TractClassifier::new(spec).unwrap();
        let classifier =
            ClassifierHandle::spawn_preprocessing(vec![Box::new(model)], 1, None, false);
        while !classifier.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        classifier
    }

    fn photo() -> Bytes {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/seeds/decode/opencv_butterfly.jpg"
        );
        std::fs::read(path).unwrap().into()
    }

    fn upload(bytes: &Bytes) -> Upload {
        Upload {
            bytes: bytes.clone(),
            ..Upload::default()
        }
    }

    fn head_starts(pipeline: &Pipeline) -> std::sync::MutexGuard<'_, Early> {
        pipeline.worker.shared.head_starts.as_ref().unwrap().early()
    }

    fn head_started(pipeline: &Pipeline, id: TaskId) -> bool {
        let early = head_starts(pipeline);
        matches!(early.tasks.get(&id), Some(HeadStarted::Classifying(..)))
    }

    fn held(pipeline: &Pipeline, id: TaskId) -> bool {
        let early = head_starts(pipeline);
        matches!(early.tasks.get(&id), Some(HeadStarted::Held(..)))
    }

    /// An upload that finds the model idle is classified from the upload on; its worker takes
    /// that answer, which is the one it would have computed. One that finds it busy is not: it
    /// holds its image for the worker.
    #[cfg(feature = "tract")]
    #[tokio::test]
    async fn an_upload_to_an_idle_model_starts_classifying_at_once() {
        let classifier = ready_classifier().await;
        let pipeline = Arc::new(Pipeline::new(
            ports(),
            classifier.clone(),
            PipelineConfig::default(),
        ));
        let bytes = photo();
        let early = pipeline.submit(upload(&bytes)).await.unwrap();
        assert!(
            head_started(&pipeline, early),
            "the idle model took the image at upload"
        );

        // Busy: images wait for the one instance.
        let waiting: Vec<Queued> = (0..3)
            .map(|_| classifier.queue_image(bytes.clone(), u64::MAX))
            .collect();
        let late = pipeline.submit(upload(&bytes)).await.unwrap();
        assert!(
            !head_started(&pipeline, late),
            "nothing starts early beside waiting images"
        );
        assert!(held(&pipeline, late), "the image waits in memory instead");
        drop(waiting);

        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(pipeline.clone().run_worker(stopped));
        let wait = Duration::from_secs(60);
        let early = pipeline.submitter.wait(early, wait).await.unwrap().unwrap();
        let late = pipeline.submitter.wait(late, wait).await.unwrap().unwrap();
        {
            let early = head_starts(&pipeline);
            assert!(early.tasks.is_empty(), "each taken by its job");
            assert_eq!((early.started, early.held_bytes), (0, 0));
        }
        assert_eq!(early.state, TaskState::Success);
        let classes = |record: &TaskRecord| record.result.clone().unwrap().classification;
        assert_eq!(
            classes(&early),
            classes(&late),
            "the same answer either way"
        );
        assert_eq!(classes(&early)[0].label, "monarch");
    }

    /// Behind a backlog older than `requeue_after`, the sweeper leaves the tasks still waiting
    /// in the queue alone and queues again only the one the queue has passed (its job lost).
    #[cfg(feature = "tract")]
    #[tokio::test]
    async fn the_sweeper_leaves_a_backlog_s_waiting_tasks_alone() {
        let config = PipelineConfig {
            requeue_after: Duration::from_millis(500),
            ..PipelineConfig::default()
        };
        let ports = ports();
        let queue = ports.queue.clone();
        let pipeline = Arc::new(Pipeline::new(ports, ready_classifier().await, config));
        let bytes = photo();
        let stranded = pipeline.submit(upload(&bytes)).await.unwrap();
        // Its job is lost, as in a crash between recording and queueing.
        for lost in queue.receive(1, Duration::ZERO).await.unwrap() {
            lost.ack().await.unwrap();
        }
        let mut waiting = Vec::new();
        for _ in 0..3 {
            // Accepted one after another, in distinct milliseconds.
            tokio::time::sleep(Duration::from_millis(5)).await;
            waiting.push(pipeline.submit(upload(&bytes)).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let worker = pipeline.worker();
        assert_eq!(
            worker.sweep_once().await.unwrap(),
            0,
            "with jobs waiting and none taken yet, every pending task may be among them"
        );
        // The worker takes the first waiting task: the queue is past the stranded one.
        let first = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
        assert_eq!(first.job().task_id, waiting[0]);
        worker.process(first).await;
        assert_eq!(worker.sweep_once().await.unwrap(), 1, "the stranded task");
        assert_eq!(
            queue.depth().await.unwrap(),
            3,
            "the two still waiting, and the stranded one once more"
        );
        assert_eq!(worker.sweep_once().await.unwrap(), 0, "claimed once");

        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(pipeline.clone().run_worker(stopped));
        for id in std::iter::once(stranded).chain(waiting) {
            let wait = Duration::from_secs(60);
            let record = pipeline.submitter.wait(id, wait).await.unwrap().unwrap();
            assert_eq!(record.state, TaskState::Success, "{record:?}");
        }
    }

    /// An upload refused after its head start (here, its image cannot be stored) leaves none
    /// behind.
    #[cfg(feature = "tract")]
    #[tokio::test]
    async fn a_refused_upload_leaves_no_head_start() {
        struct Full;
        #[async_trait::async_trait]
        impl Storage for Full {
            async fn put(&self, _: &str, _: Bytes) -> Result<(), StorageError> {
                Err(StorageError::temporary("no space left on device"))
            }
            async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
                Err(StorageError::NotFound(key.into()))
            }
            async fn delete(&self, _: &str) -> Result<(), StorageError> {
                Ok(())
            }
            async fn check(&self) -> Result<(), StorageError> {
                Ok(())
            }
        }
        let ports = Ports {
            storage: Arc::new(Full),
            ..ports()
        };
        let pipeline = Pipeline::new(ports, ready_classifier().await, PipelineConfig::default());
        let refused = pipeline.submit(upload(&photo())).await;
        assert!(
            matches!(refused, Err(SubmitError::Unavailable { .. })),
            "{refused:?}"
        );
        let early = head_starts(&pipeline);
        assert!(early.tasks.is_empty());
        assert_eq!((early.started, early.held_bytes), (0, 0));
    }

    /// A worker classifies an image its upload held without reading it back: here storage
    /// cannot give it back, and the tasks succeed all the same. A PNG, decoded by the upload's
    /// check, is held as the model's crop and classified as from its bytes; a JPEG is held as
    /// it came, while bytes fill less than half the room.
    #[cfg(feature = "tract")]
    #[tokio::test]
    async fn a_held_image_is_not_read_back() {
        struct WriteOnly(MemoryStorage);
        #[async_trait::async_trait]
        impl Storage for WriteOnly {
            async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
                self.0.put(key, bytes).await
            }
            async fn get(&self, _: &str) -> Result<Bytes, StorageError> {
                Err(StorageError::temporary("not readable"))
            }
            async fn delete(&self, key: &str) -> Result<(), StorageError> {
                self.0.delete(key).await
            }
            async fn check(&self) -> Result<(), StorageError> {
                Ok(())
            }
        }
        let ports = Ports {
            storage: Arc::new(WriteOnly(MemoryStorage::new())),
            ..ports()
        };
        let classifier = ready_classifier().await;
        let pipeline = Arc::new(Pipeline::new(
            ports,
            classifier.clone(),
            PipelineConfig::default(),
        ));
        let jpeg = photo();
        let png: Bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/seeds/decode/skimage_horse.png"
        ))
        .unwrap()
        .into();
        let busy = classifier.queue_image(jpeg.clone(), u64::MAX);
        let jpeg_id = pipeline.submit(upload(&jpeg)).await.unwrap();
        let png_id = pipeline.submit(upload(&png)).await.unwrap();
        assert!(held(&pipeline, jpeg_id), "a JPEG is held as it came");
        assert!(
            matches!(
                head_starts(&pipeline).tasks.get(&png_id),
                Some(HeadStarted::Cropped(..))
            ),
            "a PNG is held cropped"
        );
        let crop_len = 224 * 224 * 3;
        assert_eq!(head_starts(&pipeline).held_bytes, jpeg.len() + crop_len);
        // Past half the room, a crop is still held (it spares a decode), bytes are not.
        let starts = pipeline.worker.shared.head_starts.clone().unwrap();
        head_starts(&pipeline).held_bytes += MAX_HELD_BYTES / 2;
        let crop =
            (classifier.spec().transform).crop(&preprocess::decode_rgb8(&png, u64::MAX).unwrap());
        assert!(starts.start(TaskId::new(), &jpeg, None).is_none());
        let cropped = starts.start(TaskId::new(), &png, Some(crop));
        assert!(cropped.is_some());
        drop(cropped); // not accepted: it lets go of its crop
        head_starts(&pipeline).held_bytes -= MAX_HELD_BYTES / 2;
        assert_eq!(head_starts(&pipeline).held_bytes, jpeg.len() + crop_len);
        drop(busy);

        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(pipeline.clone().run_worker(stopped));
        let wait = Duration::from_secs(60);
        let mut results = vec![];
        for id in [jpeg_id, png_id] {
            let record = pipeline.submitter.wait(id, wait).await.unwrap().unwrap();
            assert_eq!(record.state, TaskState::Success, "{record:?}");
            results.push(record.result.unwrap().classification);
        }
        assert_eq!(results[0][0].label, "monarch");
        let from_bytes = classifier.classify_image(png, u64::MAX).await.unwrap();
        let expected = classifier
            .spec()
            .top_k(&from_bytes.logits, results[1].len());
        // The same answer as from the PNG's bytes (batched alike or not).
        for (held, expected) in results[1].iter().zip(&expected) {
            assert_eq!(held.label, expected.label);
            let close = (held.probability - expected.probability).abs() < 1e-4;
            assert!(close, "{held:?} against {expected:?}");
        }
        assert_eq!(head_starts(&pipeline).held_bytes, 0);
    }

    /// Errors decide retries by what they are, never by their text.
    #[test]
    fn job_errors_say_whether_they_are_temporary() {
        let temporary = JobError::Fetch(StorageError::temporary("connection reset"));
        let permanent = JobError::Persist(ResultsError::Codec("bad row".into()));
        assert!(temporary.is_temporary());
        assert!(!permanent.is_temporary(), "a codec error is not retried");
        assert!(JobError::Classify(Arc::new(ClassifyError::Stopped)).is_temporary());
        assert!(!JobError::Image(ImageError::Empty).is_temporary());
        // What clients read names no backend detail.
        let leaky = JobError::Fetch(StorageError::temporary("s3://secret-bucket/images/x.jpg"));
        assert!(!leaky.public().contains("secret-bucket"));
    }
}
