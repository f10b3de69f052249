//! Runs a [`Classifier`] on dedicated OS threads and batches whatever is waiting.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::Histogram;

use tokio::sync::oneshot;

use super::under_load::{thread_cpu_time, UnderLoad, LEAST_LARGEST};
use super::{Classifier, ClassifyError};
use crate::affinity::OnFirstCore;
use crate::model::ModelSpec;
use crate::preprocess::{Crop, HelperThread, ImageError};

type Reply = oneshot::Sender<Result<Classified, ClassifyImageError>>;

struct Request {
    input: Input,
    reply: Reply,
}

/// What an instance is given: a tensor, or an image it decodes and preprocesses itself.
enum Input {
    Tensor(Vec<f32>),
    Image {
        bytes: Bytes,
        max_pixels: u64,
    },
    /// An image already decoded, resized and cropped (by the upload's check), to normalise.
    Cropped(Crop),
}

/// An image's logits, and how long its instance took to preprocess it.
#[derive(Debug)]
pub struct Classified {
    /// The model's output for the image.
    pub logits: Vec<f32>,
    /// Decoding and preprocessing, on the instance's thread (zero for a tensor).
    pub preprocess: Duration,
}

/// Why an image was not classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClassifyImageError {
    /// The image: not decodable, or over a limit.
    #[error(transparent)]
    Image(ImageError),
    /// The model.
    #[error(transparent)]
    Classify(Arc<ClassifyError>),
}

/// The async face of a classifier: one or more instances of a model, each on its own OS thread.
/// Cheap to clone; the threads stop when the last clone drops.
///
/// Batches form greedily, with no timer: a free thread takes one waiting image, then whatever
/// else is already queued up to `max_batch`. While the model runs, the next batch accumulates.
/// An image goes to the instance that went idle last: its weights and buffers are the ones
/// still in cache (taking turns, at one image at a time, ran each image on a cold instance).
///
/// A pool that preprocesses ([`Self::spawn_preprocessing`]) is given images, not tensors: each
/// instance decodes its images and runs the model on them on its own thread.
///
/// A pool that may grow ([`Self::spawn_growing`]) adds an instance, up to its limit, when
/// images keep waiting for the model: inference has become the slower stage (larger models,
/// smaller photos than measured at start), and another instance takes a share of the cores
/// that preprocessing leaves idle.
#[derive(Clone)]
pub struct ClassifierHandle {
    spec: Arc<ModelSpec>,
    backend: &'static str,
    pool: Arc<Pool>,
    /// Closes the queue when the last clone drops, which stops the threads.
    _open: Arc<Open>,
}

struct Open(Arc<Pool>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Images waiting for the model, and the instances waiting for images.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Request>,
    /// The instance that went idle last is last.
    idle: Vec<Idle>,
    closed: bool,
}

/// An instance's thread parked until an image (or the close) wakes it.
#[derive(Clone)]
struct Idle {
    thread: Thread,
    woken: Arc<AtomicBool>,
}

/// What an instance does next.
enum Next {
    Batch(Vec<Request>, usize),
    Idle,
    Closed,
}

impl Idle {
    fn current() -> Self {
        Idle {
            thread: std::thread::current(),
            woken: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Parks until taken off the idle list and woken (an unpark that came first returns at
    /// once).
    fn park(&self) {
        while !self.woken.load(Ordering::Acquire) {
            std::thread::park();
        }
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// What the inference threads share.
struct Pool {
    queue: Mutex<Queue>,
    max_batch: usize,
    /// The cap, at most `max_batch`, that load shows best, where the service chooses it.
    under_load: Option<UnderLoad>,
    batch_sizes: OnceLock<Histogram>,
    /// Instances started, and warmed up.
    instances: AtomicUsize,
    warmed: AtomicUsize,
    /// Instances that must be warm for the handle to be ready: those it started with.
    initial: usize,
    growth: Option<Growth>,
    /// Whether the worker sends images rather than tensors.
    preprocesses: bool,
    /// Instances between taking a batch and answering it.
    busy: AtomicUsize,
    /// An instance whose runs spread over every core, for an image that finds every other
    /// instance idle.
    wide: Option<Mutex<Box<dyn Classifier>>>,
    /// A thread that decodes part of such an image while its instance decodes the rest.
    helper_thread: Option<Mutex<HelperThread>>,
    /// The instances' threads, and those adding an instance, for [`ClassifierHandle::stop`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// How a pool adds instances: a factory, a limit, and how long images have kept waiting.
struct Growth {
    build: Factory,
    limit: usize,
    /// Batches in a row after which images were still waiting.
    backlog_streak: AtomicUsize,
    growing: std::sync::atomic::AtomicBool,
}

/// What a pool whose instances preprocess may have besides.
#[derive(Default)]
struct Preprocessing {
    /// The model for a lone image (see [`ClassifierHandle::spawn_preprocessing`]).
    wide: Option<Box<dyn Classifier>>,
    under_load: Option<UnderLoad>,
}

/// Builds one more instance of the model.
pub type Factory = Box<dyn Fn() -> Result<Box<dyn Classifier>, ClassifyError> + Send + Sync>;

/// Batches in a row that leave images waiting before the pool grows: a sustained backlog, not
/// a burst.
const GROW_AFTER: usize = 32;

impl ClassifierHandle {
    /// One model on one thread.
    pub fn spawn(classifier: Box<dyn Classifier>, max_batch: usize) -> Self {
        Self::spawn_pool(vec![classifier], max_batch)
    }

    /// Several instances of one model, each on its own thread, taking batches from one queue:
    /// for single-threaded backends, so that inference can use more than one core.
    pub fn spawn_pool(classifiers: Vec<Box<dyn Classifier>>, max_batch: usize) -> Self {
        Self::start(classifiers, max_batch, None, None)
    }

    /// Like [`Self::spawn_pool`], for instances that also decode and preprocess their images
    /// ([`Self::classify_image`]): with one single-threaded instance per core, each core takes
    /// an image from bytes to logits with no hand-off between threads, and the cores split
    /// between the two stages exactly as each image needs.
    ///
    /// An instance that holds the only image in hand, with no other instance working, has
    /// the machine to itself: on more than one core a thread kept for this shares the
    /// decoding of a JPEG (see [`crate::preprocess::HelperThread`]), and the instance runs it on
    /// `wide`, if given, one more model whose runs spread over every core. So an image under
    /// light load is preprocessed and classified in the time the cores take together rather
    /// than one core's.
    ///
    /// With `cap_under_load`, batches are capped at what runs cheapest while the service is
    /// busy, up to `max_batch` or [`LEAST_LARGEST`], whichever is larger (see
    /// [`super::under_load`]), where a thread's CPU time can be read.
    pub fn spawn_preprocessing(
        classifiers: Vec<Box<dyn Classifier>>,
        max_batch: usize,
        wide: Option<Box<dyn Classifier>>,
        cap_under_load: bool,
    ) -> Self {
        let under_load = cap_under_load
            .then(|| UnderLoad::new(max_batch.max(LEAST_LARGEST)))
            .flatten();
        // Without trials (no thread CPU time to read) the start-up choice stays the limit.
        let max_batch = if under_load.is_some() {
            max_batch.max(LEAST_LARGEST)
        } else {
            max_batch
        };
        Self::start(
            classifiers,
            max_batch,
            None,
            Some(Preprocessing { wide, under_load }),
        )
    }

    /// Like [`Self::spawn_pool`], and adds instances built by `build`, up to `limit` in all,
    /// while images keep waiting for the model.
    pub fn spawn_growing(
        classifiers: Vec<Box<dyn Classifier>>,
        max_batch: usize,
        build: Factory,
        limit: usize,
    ) -> Self {
        let growth = Growth {
            build,
            limit,
            backlog_streak: AtomicUsize::new(0),
            growing: false.into(),
        };
        Self::start(classifiers, max_batch, Some(growth), None)
    }

    /// `preprocessing`: given when the instances preprocess.
    fn start(
        classifiers: Vec<Box<dyn Classifier>>,
        max_batch: usize,
        growth: Option<Growth>,
        preprocessing: Option<Preprocessing>,
    ) -> Self {
        assert!(!classifiers.is_empty(), "at least one classifier");
        let max_batch = max_batch.max(1);
        let spec = Arc::new(classifiers[0].spec().clone());
        let backend = classifiers[0].backend();
        let preprocesses = preprocessing.is_some();
        let Preprocessing { wide, under_load } = preprocessing.unwrap_or_default();
        let pool = Arc::new(Pool {
            queue: Mutex::default(),
            max_batch,
            under_load,
            batch_sizes: OnceLock::new(),
            instances: AtomicUsize::new(classifiers.len()),
            warmed: AtomicUsize::new(0),
            initial: classifiers.len(),
            growth,
            preprocesses,
            busy: AtomicUsize::new(0),
            helper_thread: helper_thread(preprocesses),
            wide: wide.map(Mutex::new),
            threads: Mutex::default(),
        });
        for (i, classifier) in classifiers.into_iter().enumerate() {
            pool.clone().run_instance(i, classifier);
        }
        Self {
            spec,
            backend,
            _open: Arc::new(Open(pool.clone())),
            pool,
        }
    }

    /// Observes the size of every batch the model runs from now on (the first histogram given
    /// wins).
    pub fn record_batch_sizes(&self, histogram: Histogram) {
        let _ = self.pool.batch_sizes.set(histogram);
    }

    /// The model these threads run.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend running the model (`tract`, `ort`).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Instances of the model, each on its own thread (a growing pool may add more).
    pub fn instances(&self) -> usize {
        self.pool.instances.load(Ordering::Acquire)
    }

    /// Most images per batch.
    pub fn max_batch(&self) -> usize {
        self.pool.max_batch
    }

    /// True once every instance the model started with is loaded and has run one batch.
    pub fn is_ready(&self) -> bool {
        self.pool.warmed.load(Ordering::Acquire) >= self.pool.initial
    }

    /// Whether an image that finds every instance idle runs on a model that spreads over every
    /// core (see [`Self::spawn_preprocessing`]).
    pub fn spreads_lone_images(&self) -> bool {
        self.pool.wide.is_some()
    }

    /// Whether its instances decode and preprocess images themselves: then images should come
    /// through [`Self::classify_image`], not preprocessed elsewhere.
    pub fn preprocesses(&self) -> bool {
        self.pool.preprocesses
    }

    /// Classifies one preprocessed image; returns its logits.
    pub async fn logits(&self, tensor: Vec<f32>) -> Result<Vec<f32>, Arc<ClassifyError>> {
        match self.send(Input::Tensor(tensor)).await {
            Ok(classified) => Ok(classified.logits),
            Err(ClassifyImageError::Classify(error)) => Err(error),
            Err(ClassifyImageError::Image(error)) => {
                Err(Arc::new(ClassifyError::Inference(error.to_string())))
            }
        }
    }

    /// Decodes, preprocesses and classifies one image (of at most `max_pixels`) on an
    /// instance's thread.
    pub async fn classify_image(
        &self,
        bytes: Bytes,
        max_pixels: u64,
    ) -> Result<Classified, ClassifyImageError> {
        self.queue_image(bytes, max_pixels).answer().await
    }

    /// Like [`Self::classify_image`], but the image is in line (or running) once this returns;
    /// its answer is awaited later, or dropped with the [`Queued`].
    pub fn queue_image(&self, bytes: Bytes, max_pixels: u64) -> Queued {
        self.queue(Input::Image { bytes, max_pixels })
    }

    /// Like [`Self::queue_image`], for an image already cropped for this model (by
    /// [`crate::preprocess::validate_keeping`]): its instance only normalises it.
    pub fn queue_cropped(&self, crop: Crop) -> Queued {
        self.queue(Input::Cropped(crop))
    }

    /// Stops the model: every clone's images sent before are answered, later ones are refused
    /// ([`ClassifyError::Stopped`]), and this waits up to `within` for the instances' threads to
    /// end; whether they did (a warning says when not). For a process about to exit: one that
    /// exits while a model still runs (a warm-up, an instance being added) tears ONNX Runtime's
    /// library down under the running kernel, which fails and writes its error to stderr.
    pub async fn stop(&self, within: Duration) -> bool {
        let pool = self.pool.clone();
        let ended = tokio::task::spawn_blocking(move || pool.stop(within))
            .await
            .unwrap_or(false);
        if !ended {
            tracing::warn!(
                ?within,
                "classifier: still running after the stop; exiting anyway"
            );
        }
        ended
    }

    /// Whether an image sent now would start at once: an instance waits, and no image does.
    pub fn is_idle(&self) -> bool {
        let queue = self.pool.queue();
        queue.waiting.is_empty() && !queue.idle.is_empty()
    }

    async fn send(&self, input: Input) -> Result<Classified, ClassifyImageError> {
        self.queue(input).answer().await
    }

    fn queue(&self, input: Input) -> Queued {
        let (reply, answer) = oneshot::channel();
        let idle = {
            let mut queue = self.pool.queue();
            if queue.closed {
                return Queued(None);
            }
            queue.waiting.push_back(Request { input, reply });
            queue.idle.pop()
        };
        if let Some(idle) = idle {
            idle.wake();
        }
        Queued(Some(answer))
    }
}

/// An image in line for the model ([`ClassifierHandle::queue_image`]). Dropped, its answer is
/// thrown away when it comes.
pub struct Queued(Option<oneshot::Receiver<Result<Classified, ClassifyImageError>>>);

impl Queued {
    /// The image's logits, once its instance has answered.
    pub async fn answer(self) -> Result<Classified, ClassifyImageError> {
        let stopped = || ClassifyImageError::Classify(Arc::new(ClassifyError::Stopped));
        match self.0 {
            Some(answer) => answer.await.map_err(|_| stopped())?,
            None => Err(stopped()),
        }
    }
}

impl Pool {
    /// A thread that panicked holding the lock left the queue intact.
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<std::thread::JoinHandle<()>>> {
        self.threads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`ClassifierHandle::stop`], blocking.
    fn stop(&self, within: Duration) -> bool {
        self.close();
        let deadline = Instant::now() + within;
        // Popped one at a time, the lock let go before the wait: a thread adding an instance
        // pushes that instance's thread.
        loop {
            let Some(thread) = self.threads().pop() else {
                return true;
            };
            while !thread.is_finished() {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = thread.join();
        }
    }

    /// No more images: each instance answers those it was given, then its thread ends.
    fn close(&self) {
        let idle = {
            let mut queue = self.queue();
            queue.closed = true;
            std::mem::take(&mut queue.idle)
        };
        idle.iter().for_each(Idle::wake);
    }

    /// The batch cap now: `max_batch`, or what load has shown best below it.
    fn cap(&self) -> usize {
        self.under_load
            .as_ref()
            .map_or(self.max_batch, UnderLoad::cap)
    }

    /// The first `cap` images waiting, with the number left waiting; else `me` joins the
    /// idle instances (last, so first in line).
    fn next(&self, me: &Idle, cap: usize) -> Next {
        let mut queue = self.queue();
        if !queue.waiting.is_empty() {
            let n = queue.waiting.len().min(cap);
            let batch: Vec<Request> = queue.waiting.drain(..n).collect();
            self.busy.fetch_add(1, Ordering::AcqRel);
            return Next::Batch(batch, queue.waiting.len());
        }
        if queue.closed {
            return Next::Closed;
        }
        me.woken.store(false, Ordering::Relaxed);
        queue.idle.push(me.clone());
        Next::Idle
    }

    /// Starts instance `i` on a thread of its own: it warms up on the largest batch (so the
    /// first real one does not pay for compiling), then serves.
    fn run_instance(self: Arc<Self>, i: usize, mut classifier: Box<dyn Classifier>) {
        if self.queue().closed {
            return; // stopped while this instance was built
        }
        let pool = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("imgclf-infer-{i}"))
            .spawn(move || {
                crate::scheduling::model_thread();
                let (len, n) = (classifier.spec().transform.tensor_len(), pool.max_batch);
                match classifier.classify(&vec![0.0; len * n], n) {
                    Ok(_) => {
                        pool.warmed.fetch_add(1, Ordering::Release);
                    }
                    Err(error) => tracing::error!(%error, "classifier warm-up failed"),
                }
                pool.serve(classifier);
            })
            .expect("spawning an inference thread");
        self.threads().push(thread);
    }

    /// One inference thread: takes what is waiting, up to `max_batch` images, runs the batch,
    /// answers each image; until the queue is closed.
    fn serve(self: &Arc<Self>, mut classifier: Box<dyn Classifier>) {
        let (len, max_batch) = (classifier.spec().transform.tensor_len(), self.max_batch);
        let mut batch = Vec::with_capacity(len * max_batch);
        let mut replies = Vec::with_capacity(max_batch);
        let transform = classifier.spec().transform.clone();
        let mut preprocessed = Vec::with_capacity(max_batch);
        let mut answers: Vec<(Reply, Result<Classified, ClassifyImageError>)> = Vec::new();
        let me = Idle::current();
        loop {
            let cap = self.cap();
            let next = self.next(&me, cap);
            // Answered once this instance is back in line: a client that sends its next image
            // on the answer finds this instance, its cache warm, first.
            for (reply, answer) in answers.drain(..) {
                let _ = reply.send(answer);
            }
            let (requests, waiting) = match next {
                Next::Batch(requests, waiting) => (requests, waiting),
                Next::Idle => {
                    me.park();
                    continue;
                }
                Next::Closed => return,
            };
            // Whether the batch filled the cap (with others waiting, for a cap of one): only such
            // batches tell what the cap costs.
            let capped = requests.len() == cap && (waiting > 0 || cap > 1);
            // Before any pin below: a thread started from a pinned one would inherit the pin.
            self.watch_backlog(waiting);
            // The only image in hand, and no other instance working: every core is free for it.
            let alone = requests.len() == 1 && self.busy.load(Ordering::Acquire) == 1;
            // Its helpers have cores of their own: this thread keeps off them meanwhile.
            let mut on_first_core = None;
            if alone && self.helper_thread.is_some() {
                on_first_core = OnFirstCore::pin();
            }
            for request in requests {
                let started = Instant::now();
                // Each tensor is written straight into the batch, not made apart and copied.
                let start = batch.len();
                let written = match request.input {
                    Input::Tensor(tensor) => {
                        batch.extend_from_slice(&tensor);
                        Ok(())
                    }
                    Input::Cropped(crop) => {
                        transform.append_tensor_from_crop(&crop, &mut batch);
                        Ok(())
                    }
                    Input::Image { bytes, max_pixels } => {
                        let helper_thread = match &self.helper_thread {
                            Some(thread) if alone => thread.try_lock().ok(),
                            _ => None,
                        };
                        let helper_thread = helper_thread.as_deref();
                        preprocess(&transform, &bytes, max_pixels, helper_thread, &mut batch)
                            .map_err(ClassifyImageError::Image)
                    }
                };
                let written = written.and_then(|()| match batch.len() - start {
                    values if values == len => Ok(()),
                    values => {
                        let error = ClassifyError::Inference(format!(
                            "tensor of {values} values, expected {len}"
                        ));
                        Err(ClassifyImageError::Classify(Arc::new(error)))
                    }
                });
                match written {
                    Ok(()) => {
                        replies.push(request.reply);
                        preprocessed.push(started.elapsed());
                    }
                    Err(error) => {
                        batch.truncate(start);
                        answers.push((request.reply, Err(error)));
                    }
                }
            }
            let n = replies.len();
            if n == 0 {
                self.busy.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            if let Some(histogram) = self.batch_sizes.get() {
                histogram.observe(n as f64);
            }
            let _span = tracing::debug_span!("infer", n).entered();
            // Still alone (another instance may have taken images meanwhile).
            let wide = match &self.wide {
                Some(wide) if n == 1 && self.busy.load(Ordering::Acquire) == 1 => {
                    wide.try_lock().ok()
                }
                _ => None,
            };
            // What the model and the answers cost this thread, for the cap's trials.
            let cpu_before = match (&self.under_load, &wide) {
                (Some(_), None) if capped => thread_cpu_time(),
                _ => None,
            };
            let classified = match wide {
                Some(mut wide) => {
                    if on_first_core.is_none() {
                        on_first_core = OnFirstCore::pin();
                    }
                    wide.classify(&batch, n)
                }
                None => classifier.classify(&batch, n),
            };
            drop(on_first_core);
            self.busy.fetch_sub(1, Ordering::AcqRel);
            match classified {
                Ok(rows) => {
                    for ((reply, logits), preprocess) in
                        replies.drain(..).zip(rows).zip(preprocessed.drain(..))
                    {
                        answers.push((reply, Ok(Classified { logits, preprocess })));
                    }
                }
                Err(error) => {
                    let error = ClassifyImageError::Classify(Arc::new(error));
                    answers.extend(replies.drain(..).map(|reply| (reply, Err(error.clone()))));
                }
            }
            if let (Some(under_load), Some(before), Some(after)) =
                (&self.under_load, cpu_before, thread_cpu_time())
            {
                under_load.record(cap, n, after.saturating_sub(before));
            }
            batch.clear();
            preprocessed.clear();
        }
    }

    /// Adds an instance (on a thread of its own, which builds it) once images have been left
    /// waiting after [`GROW_AFTER`] batches in a row, while the pool is below its limit.
    fn watch_backlog(self: &Arc<Self>, waiting: usize) {
        let Some(growth) = &self.growth else { return };
        if waiting == 0 {
            growth.backlog_streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = growth.backlog_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let instances = self.instances.load(Ordering::Acquire);
        if streak < GROW_AFTER
            || instances >= growth.limit
            || growth.growing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let pool = self.clone();
        let thread = std::thread::spawn(move || {
            let growth = pool.growth.as_ref().expect("a growing pool");
            match (growth.build)() {
                Ok(classifier) => {
                    let i = pool.instances.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(
                        instances = i + 1,
                        waiting,
                        "classifier: images keep waiting for the model; instance {} of at most \
                         {} started",
                        i + 1,
                        growth.limit
                    );
                    pool.clone().run_instance(i, classifier);
                }
                Err(error) => tracing::warn!(%error, "classifier: adding an instance failed"),
            }
            growth.backlog_streak.store(0, Ordering::Relaxed);
            growth.growing.store(false, Ordering::Release);
        });
        self.threads().push(thread);
    }
}

/// The helper thread of a pool whose instances preprocess, on more than one core.
fn helper_thread(preprocesses: bool) -> Option<Mutex<HelperThread>> {
    if !preprocesses || crate::cores() < 2 {
        return None;
    }
    HelperThread::spawn()
        .inspect_err(|error| tracing::warn!(%error, "classifier: no helper thread"))
        .ok()
        .map(Mutex::new)
}

/// An image's tensor, made on an inference thread (helped by `helper_thread` if given) at the
/// end of `batch`: a decoder's panic (a bug, in a crate or in libjpeg) fails the image, not
/// the thread.
fn preprocess(
    transform: &crate::preprocess::Transform,
    bytes: &[u8],
    max_pixels: u64,
    helper_thread: Option<&HelperThread>,
    batch: &mut Vec<f32>,
) -> Result<(), ImageError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        transform.append_tensor_from_bytes(bytes, max_pixels, helper_thread, batch)
    }))
    .unwrap_or_else(|_| {
        Err(ImageError::Undecodable(
            "the decoder crashed on this image".into(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::under_load::{PASSES, TRIAL_IMAGES};
    use std::time::Duration;

    /// A model that takes 2 ms per batch and answers zeros.
    struct Slow(ModelSpec);

    impl Classifier for Slow {
        fn spec(&self) -> &ModelSpec {
            &self.0
        }

        fn classify(&mut self, _: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            std::thread::sleep(Duration::from_millis(2));
            Ok(vec![vec![0.0; 2]; n])
        }
    }

    fn spec() -> ModelSpec {
        let mut spec = ModelSpec::load(crate::config::default_model_dir()).expect("the model");
        spec.transform.crop = 2;
        spec
    }

    fn factory() -> Factory {
        Box::new(|| Ok(Box::new(Slow(spec())) as Box<dyn Classifier>))
    }

    /// `images` at once; returns when all are answered.
    async fn load(handle: &ClassifierHandle, images: usize) {
        let len = handle.spec().transform.tensor_len();
        let mut answers = tokio::task::JoinSet::new();
        for _ in 0..images {
            let handle = handle.clone();
            answers.spawn(async move { handle.logits(vec![0.0; len]).await });
        }
        while let Some(answer) = answers.join_next().await {
            answer.expect("joined").expect("answered");
        }
    }

    #[tokio::test]
    async fn a_pool_grows_while_images_wait_and_not_beyond_its_limit() {
        let handle = ClassifierHandle::spawn_growing(vec![Box::new(Slow(spec()))], 1, factory(), 3);
        // A trickle, one image at a time: nothing waits, nothing grows.
        for _ in 0..40 {
            load(&handle, 1).await;
        }
        assert_eq!(handle.instances(), 1, "no backlog, no growth");
        // A backlog: images wait batch after batch.
        for _ in 0..20 {
            load(&handle, 200).await;
            if handle.instances() == 3 {
                break;
            }
        }
        load(&handle, 200).await;
        assert_eq!(handle.instances(), 3, "grown to its limit, and no further");
        assert!(handle.is_ready());
    }

    /// [`Slow`], counting its drops.
    struct Dropped(ModelSpec, Arc<AtomicUsize>);

    impl Classifier for Dropped {
        fn spec(&self) -> &ModelSpec {
            &self.0
        }

        fn classify(&mut self, _: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            std::thread::sleep(Duration::from_millis(2));
            Ok(vec![vec![0.0; 2]; n])
        }
    }

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A stopped model answers the images sent before, refuses later ones, and its threads end
    /// with their models (so a process can exit with none running).
    #[tokio::test]
    async fn stopping_answers_what_was_sent_and_ends_the_threads() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let instances = (0..2)
            .map(|_| Box::new(Dropped(spec(), dropped.clone())) as Box<dyn Classifier>)
            .collect();
        let handle = ClassifierHandle::spawn_pool(instances, 1);
        let len = handle.spec().transform.tensor_len();
        let sent: Vec<Queued> = (0..6)
            .map(|_| handle.queue(Input::Tensor(vec![0.0; len])))
            .collect();
        assert!(
            handle.stop(Duration::from_secs(30)).await,
            "every thread ended"
        );
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "each model went with its thread"
        );
        for queued in sent {
            queued
                .answer()
                .await
                .expect("sent before the stop: answered");
        }
        let late = handle.logits(vec![0.0; len]).await;
        assert!(late.is_err_and(|e| e.is_temporary()), "refused as stopped");
    }

    /// Counts the images it classifies, taking 1 ms per batch.
    struct Counting(ModelSpec, Arc<AtomicUsize>);

    impl Classifier for Counting {
        fn spec(&self) -> &ModelSpec {
            &self.0
        }

        fn classify(&mut self, _: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            std::thread::sleep(Duration::from_millis(1));
            self.1.fetch_add(n, Ordering::Relaxed);
            Ok(vec![vec![0.0; 2]; n])
        }
    }

    /// Two counting instances in one pool, batches of up to two.
    fn counting_pair() -> ([Arc<AtomicUsize>; 2], ClassifierHandle) {
        let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let instances = counts
            .iter()
            .map(|count| Box::new(Counting(spec(), count.clone())) as Box<dyn Classifier>)
            .collect();
        (counts, ClassifierHandle::spawn_pool(instances, 2))
    }

    async fn until_ready(handle: &ClassifierHandle) {
        while !handle.is_ready() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn one_image_at_a_time_stays_on_the_instance_that_is_warm() {
        let (counts, handle) = counting_pair();
        until_ready(&handle).await;
        let served = || counts.each_ref().map(|c| c.load(Ordering::Relaxed));
        let warm_ups = served();
        for _ in 0..50 {
            load(&handle, 1).await;
        }
        let mut one_by_one = [0, 1].map(|i| served()[i] - warm_ups[i]);
        one_by_one.sort();
        assert_eq!(one_by_one, [0, 50], "every image on the instance idle last");
        // Both serve when images come together.
        let before = served();
        load(&handle, 200).await;
        assert!((0..2).all(|i| served()[i] > before[i]), "{:?}", served());
    }

    #[tokio::test]
    async fn a_lone_image_runs_on_the_wide_model_and_a_crowd_on_the_instances() {
        let counts = [0, 1, 2].map(|_| Arc::new(AtomicUsize::new(0)));
        let counting =
            |i: usize| Box::new(Counting(spec(), counts[i].clone())) as Box<dyn Classifier>;
        let handle = ClassifierHandle::spawn_preprocessing(
            vec![counting(0), counting(1)],
            2,
            Some(counting(2)),
            false,
        );
        until_ready(&handle).await;
        let served = || counts.each_ref().map(|c| c.load(Ordering::Relaxed));
        let warm_ups = served();
        for _ in 0..20 {
            load(&handle, 1).await;
        }
        assert_eq!(
            served(),
            [warm_ups[0], warm_ups[1], 20],
            "each lone image on the wide model"
        );
        let before = served();
        load(&handle, 200).await;
        let on_instances = served()[0] + served()[1] - before[0] - before[1];
        assert!(
            on_instances >= 100,
            "a crowd keeps the instances busy: {:?}",
            served()
        );
    }

    #[tokio::test]
    async fn the_threads_stop_when_the_last_handle_drops() {
        let (counts, handle) = counting_pair();
        let clone = handle.clone();
        drop(handle);
        load(&clone, 3).await;
        drop(clone);
        // A stopped thread drops its classifier, and with it its count's clone.
        for _ in 0..1000 {
            if counts.iter().all(|count| Arc::strong_count(count) == 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the inference threads still run");
    }

    /// Answers each image's tensor as its logits.
    struct Echo(ModelSpec);

    impl Classifier for Echo {
        fn spec(&self) -> &ModelSpec {
            &self.0
        }

        fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            Ok(batch.chunks(batch.len() / n).map(<[f32]>::to_vec).collect())
        }
    }

    #[tokio::test]
    async fn an_instance_that_preprocesses_gives_the_tensor_a_worker_would_make() {
        let handle =
            ClassifierHandle::spawn_preprocessing(vec![Box::new(Echo(spec()))], 4, None, false);
        assert!(handle.preprocesses());
        let mut png = Vec::new();
        image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 77]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encoded");
        let expected = spec()
            .transform
            .tensor_from_bytes(&png, 10_000)
            .expect("a tensor");
        let classified = handle
            .classify_image(png.clone().into(), 10_000)
            .await
            .expect("classified");
        assert_eq!(classified.logits, expected);
        // A broken image fails alone; the instance goes on.
        let broken = handle
            .classify_image(png[..60].to_vec().into(), 10_000)
            .await;
        assert!(
            matches!(broken, Err(ClassifyImageError::Image(_))),
            "{broken:?}"
        );
        let over = handle.classify_image(png.clone().into(), 100).await;
        assert!(
            matches!(
                over,
                Err(ClassifyImageError::Image(ImageError::TooManyPixels { .. }))
            ),
            "{over:?}"
        );
        assert!(handle.classify_image(png.into(), 10_000).await.is_ok());
    }

    #[tokio::test]
    async fn a_fixed_pool_does_not_grow() {
        let handle = ClassifierHandle::spawn_pool(vec![Box::new(Slow(spec()))], 1);
        load(&handle, 500).await;
        assert_eq!(handle.instances(), 1);
    }

    /// A model whose CPU time per image depends on the batch's size: least at the size given.
    struct Costly(ModelSpec, usize);

    impl Classifier for Costly {
        fn spec(&self) -> &ModelSpec {
            &self.0
        }

        fn classify(&mut self, _: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            let per_image = Duration::from_micros(if n == self.1 { 100 } else { 200 });
            let start = thread_cpu_time().expect("a thread's CPU time");
            while thread_cpu_time().unwrap() - start < per_image * n as u32 {
                std::hint::spin_loop();
            }
            Ok(vec![vec![0.0; 2]; n])
        }
    }

    #[tokio::test]
    async fn under_load_the_batch_cap_becomes_the_cheapest_per_image() {
        let costly = || Box::new(Costly(spec(), 2)) as Box<dyn Classifier>;
        let handle = ClassifierHandle::spawn_preprocessing(vec![costly(), costly()], 4, None, true);
        until_ready(&handle).await;
        assert_eq!(handle.pool.cap(), 1, "the first trial");
        // Enough waiting images for every trial (1, 2, then 4) to fill its batches.
        for _ in 0..4 {
            load(&handle, TRIAL_IMAGES * PASSES * 2).await;
        }
        assert_eq!(handle.pool.cap(), 2);
        assert_eq!(handle.max_batch(), 4, "the start-up choice stays the limit");
        // Where the cap is set, it stays.
        let fixed = ClassifierHandle::spawn_preprocessing(vec![costly()], 2, None, false);
        load(&fixed, TRIAL_IMAGES * 4).await;
        assert_eq!(fixed.pool.cap(), 2);
        assert_eq!(fixed.max_batch(), 2);
    }

    #[tokio::test]
    async fn under_load_caps_above_a_smaller_start_up_choice_are_tried_too() {
        // Four is cheapest per image, above the two the start chose.
        let cheaper = || Box::new(Costly(spec(), 4)) as Box<dyn Classifier>;
        let handle =
            ClassifierHandle::spawn_preprocessing(vec![cheaper(), cheaper()], 2, None, true);
        until_ready(&handle).await;
        assert_eq!(handle.max_batch(), LEAST_LARGEST);
        for _ in 0..4 {
            load(&handle, TRIAL_IMAGES * PASSES * 2).await;
        }
        assert_eq!(handle.pool.cap(), 4);
    }
}
