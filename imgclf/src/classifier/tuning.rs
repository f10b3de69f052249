//! What to run when the settings leave it open, measured at start on this machine: the batch
//! size (`IMGCLF_MAX_BATCH`) and the number of model instances (`IMGCLF_INFERENCE_THREADS`).
//! One log line gives the choice and the figures behind it.
//!
//! The batch is the smallest of [`BATCHES`] whose time per image is within 1% of the best: a
//! larger batch costs memory (the runtime's buffers grow with it) and latency for nothing. The
//! sizes are timed in turns, round after round, and each keeps its fastest round, so a drift
//! of the machine's speed while timing (other processes, frequency) touches every size alike
//! and the choice does not follow noise. Every instance known at start is timed at once, each
//! on its own thread, as they run under load: they then share the caches and the memory bus,
//! and a larger batch's buffers weigh more (EfficientNet-Lite0 on two cores of an Intel Xeon:
//! timed alone, the batch ranged from 1 to 8 from one start to the next; timed at once, it was
//! 4 or 2, at the same throughput, with a peak under load of 259–287 MiB against up to 367).
//! Wider margins threw away real gains: 5.5% on ResNet18 at batch 8 on an AMD EPYC of the Zen 5
//! class, and, with 3%, 2.8% of throughput under load on Lite0 at batch 2 on one of the Zen 4
//! class (timed 2.3% faster at start; the service's own work per batch is shared by its images
//! too).
//!
//! On the CPU there is one instance per core, and each decodes, preprocesses and classifies
//! its own images (see [`super::ClassifierHandle::spawn_preprocessing`]): every core does both
//! stages for the images it takes, so the cores split between them exactly as each image
//! needs, whatever the model, the CPU or the photos, and the split needs no re-checking while
//! running. This is the arrangement `cores / (t_pre + t_inf)` describes. The batch size chosen
//! here is then a limit, or 4 where it is smaller: under load the instances try every cap up
//! to it, one included, and keep what runs cheapest (see [`super::under_load`]).
//!
//! With an accelerator (or fewer instances than cores, as set), preprocessing runs on the
//! worker's threads beside the instances, and the instance count is the cores' share that
//! inference needs, from a typical 2 MP photo's preprocessing time, rounded up; such a pool adds
//! an instance, up to one per core, when images keep waiting for the model (see
//! [`super::ClassifierHandle::spawn_growing`]). The batch size is chosen once: it depends on
//! the model and the CPU, which do not change while the process runs. On a GPU ort pads each
//! batch to the largest size run so far, so every size is timed at the largest one's cost and
//! the largest is chosen.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{Classifier, ClassifyError};
use crate::model::ModelSpec;

/// Timed rounds behind each figure (after one untimed run): the fastest is kept.
const ROUNDS: usize = 3;

/// How much slower per image than the best a smaller batch may be and still be chosen.
pub(super) const MARGIN: f64 = 0.01;

/// Batch sizes tried at start when none is set. Not 1: the size is a cap, not a wait (an image
/// that finds nothing else waiting runs alone), and under load the images of a batch share the
/// service's work per run, which zero tensors timed here do not show. On two cores of an AMD
/// EPYC (Zen 3 class), EfficientNet-Lite0 under 16 clients ran 3–7% slower at batch 1 than at
/// 2 or 4 (12 alternating rounds), though timed here the sizes were within noise of each other
/// and batch 1 was chosen at one start in four; ResNet18 ran alike at 1 and 2. Under load the
/// instances try it again (see [`super::under_load`]).
pub const BATCHES: [usize; 3] = [2, 4, 8];

/// What [`choose`] settled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Instances of the model, each on its own thread.
    pub instances: usize,
    /// Most images per batch.
    pub max_batch: usize,
}

/// The instances to build before [`choose`] times them: the count set, else one per core for
/// instances that `preprocess` their own images (whatever the costs), else `None`, for
/// [`choose`] to measure.
pub fn known_instances(instances: Option<usize>, preprocess: bool) -> Option<usize> {
    match instances.map(|n| n.max(1)) {
        None if preprocess => Some(crate::cores()),
        other => other,
    }
}

/// Settles what `instances` and `max_batch` leave open (`None`), measuring `classifiers` (all
/// at once) and a photo's preprocessing on this machine; logs the choice in one line when it
/// measured. `instances` is [`known_instances`]' count, and `classifiers` are that many when
/// it is known.
pub fn choose(
    classifiers: &mut [&mut dyn Classifier],
    instances: Option<usize>,
    max_batch: Option<usize>,
    preprocess: bool,
) -> Result<Choice, ClassifyError> {
    let cores = crate::cores();
    if let Some(batch) = max_batch {
        if instances.is_some() || cores == 1 {
            return Ok(Choice {
                instances: instances.unwrap_or(1),
                max_batch: batch.max(1),
            });
        }
    }
    let timed = match max_batch {
        Some(batch) => time_batches(classifiers, &[batch.max(1)])?,
        None => time_batches(classifiers, &BATCHES)?,
    };
    let max_batch = best_batch(&timed);
    let inference = timed
        .iter()
        .find(|(batch, _)| *batch == max_batch)
        .map(|(_, t)| *t)
        .expect("the chosen batch was timed");
    let (instances, preprocess_time) = match instances {
        Some(n) => (n, None),
        None if cores == 1 => (1, None),
        None => match time_preprocessing(classifiers[0].spec()) {
            Some(preprocess) => (
                balanced_instances(cores, preprocess, inference),
                Some(preprocess),
            ),
            None => {
                tracing::warn!("classifier: could not time preprocessing; one instance per core");
                (cores, None)
            }
        },
    };
    let ms = |t: Duration| format!("{:.1}", t.as_secs_f64() * 1e3);
    let split = match (preprocess, preprocess_time) {
        (true, _) => "each decoding and preprocessing its own images".to_string(),
        (false, Some(t)) => format!("beside preprocessing of {} ms per photo", ms(t)),
        (false, None) => "beside the preprocessing threads".to_string(),
    };
    let per_batch: Vec<String> = timed
        .iter()
        .map(|(batch, t)| format!("{batch}: {}", ms(*t)))
        .collect();
    let timed_at_once = classifiers.len();
    tracing::info!(
        instances,
        max_batch,
        cores,
        inference_ms = inference.as_secs_f64() * 1e3,
        preprocess_ms = preprocess_time.map(|t| t.as_secs_f64() * 1e3),
        timed_at_once,
        "classifier: {instances} instance(s), batches of up to {max_batch}, on {cores} cores, \
         {split}: inference {} ms per image (by batch size, {timed_at_once} instance(s) at \
         once: {}) (IMGCLF_INFERENCE_THREADS and IMGCLF_MAX_BATCH set them)",
        ms(inference),
        per_batch.join(", "),
    );
    Ok(Choice {
        instances,
        max_batch,
    })
}

/// The smallest batch whose time per image is within 1% of the best of `timed`.
pub fn best_batch(timed: &[(usize, Duration)]) -> usize {
    let best = timed.iter().map(|(_, t)| *t).min().unwrap_or_default();
    timed
        .iter()
        .filter(|(_, t)| t.as_secs_f64() <= best.as_secs_f64() * (1.0 + MARGIN))
        .map(|(batch, _)| *batch)
        .min()
        .unwrap_or(1)
}

/// Instances of the model for `cores` cores, when preprocessing an image takes `preprocess`
/// and one single-threaded instance takes `inference` per image: the cores' share that
/// inference needs, `cores × inference / (preprocess + inference)`, rounded up (past a 5%
/// slack: an instance for a twentieth of a core is not worth its weights), between 1 and
/// `cores`.
pub fn balanced_instances(cores: usize, preprocess: Duration, inference: Duration) -> usize {
    let cores = cores.max(1);
    let total = (preprocess + inference).as_secs_f64();
    if total <= 0.0 {
        return 1;
    }
    let share = cores as f64 * inference.as_secs_f64() / total;
    ((share - 0.05).ceil() as usize).clamp(1, cores)
}

/// Inference time per image of one instance, on batches of `max_batch` zero tensors.
pub fn time_inference(
    classifier: &mut dyn Classifier,
    max_batch: usize,
) -> Result<Duration, ClassifyError> {
    Ok(time_batches(&mut [classifier], &[max_batch.max(1)])?[0].1)
}

/// Inference time per image at each of `batches`, on zero tensors, every one of `classifiers`
/// running at once on its own thread: one untimed run of each size (which may compile its
/// plan), then three rounds that run every size in turn, all instances starting each size
/// together. A size's time in a round is the instances' mean; each size keeps its fastest round.
pub fn time_batches(
    classifiers: &mut [&mut dyn Classifier],
    batches: &[usize],
) -> Result<Vec<(usize, Duration)>, ClassifyError> {
    let batches: Vec<usize> = batches.iter().map(|&b| b.max(1)).collect();
    // Every size untimed, then the timed rounds.
    let schedule: Vec<usize> = batches.repeat(ROUNDS + 1);
    let start = std::sync::Barrier::new(classifiers.len());
    let run_all = |classifier: &mut dyn Classifier| {
        let image_len = classifier.spec().transform.tensor_len();
        let largest = batches.iter().copied().max().unwrap_or(1);
        let zeros = vec![0.0; image_len * largest];
        let mut failed = None;
        let mut times = Vec::with_capacity(schedule.len());
        for &batch in &schedule {
            // A failed (or panicked) instance still meets the others at each start, so none
            // waits forever.
            start.wait();
            if failed.is_none() {
                let started = Instant::now();
                let run = || classifier.classify(&zeros[..image_len * batch], batch);
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(Ok(_)) => times.push(started.elapsed() / batch as u32),
                    Ok(Err(error)) => failed = Some(error),
                    Err(_) => failed = Some(ClassifyError::Inference("the model panicked".into())),
                }
            }
        }
        failed.map_or(Ok(times), Err)
    };
    let run_all = &run_all;
    let per_instance: Vec<Result<Vec<Duration>, ClassifyError>> = match classifiers {
        [one] => vec![run_all(&mut **one)],
        many => std::thread::scope(|scope| {
            let threads: Vec<_> = many
                .iter_mut()
                .map(|classifier| scope.spawn(move || run_all(&mut **classifier)))
                .collect();
            threads
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))
                })
                .collect()
        }),
    };
    let per_instance = per_instance.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut fastest: Vec<(usize, Duration)> = batches.iter().map(|&b| (b, Duration::MAX)).collect();
    for round in 1..=ROUNDS {
        for (slot, (_, best)) in fastest.iter_mut().enumerate() {
            let step = round * batches.len() + slot;
            let total: Duration = per_instance.iter().map(|times| times[step]).sum();
            *best = (*best).min(total / per_instance.len().max(1) as u32);
        }
    }
    Ok(fastest)
}

/// Decoding and preprocessing time of a photo-sized JPEG (1600 × 1200) for `spec`'s
/// transform, or `None` if it fails (it should not: the photo is made here).
pub fn time_preprocessing(spec: &ModelSpec) -> Option<Duration> {
    let photo = sample_photo()?;
    spec.transform.tensor_from_bytes(photo, u64::MAX).ok()?;
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            spec.transform.tensor_from_bytes(photo, u64::MAX).ok()?;
            Some(started.elapsed())
        })
        .min()
        .flatten()
}

/// A 2 MP JPEG made once per process: smooth gradients with fine texture, so that it costs
/// about what a camera photo of that size costs to decode (a flat image decodes faster).
fn sample_photo() -> Option<&'static [u8]> {
    static PHOTO: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    PHOTO
        .get_or_init(|| {
            let (width, height) = (1600u32, 1200u32);
            let image = image::RgbImage::from_fn(width, height, |x, y| {
                // A cheap hash for texture: deterministic, no random-number crate needed.
                let noise = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 12;
                let channel = |base: u32| (base + noise).min(255) as u8;
                image::Rgb([
                    channel(x * 200 / width),
                    channel(y * 200 / height),
                    channel((x + y) * 100 / (width + height) + 50),
                ])
            });
            let mut bytes = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
                .encode_image(&image)
                .ok()?;
            Some(bytes)
        })
        .as_deref()
}

#[cfg(test)]
mod tests {
    use super::{balanced_instances, best_batch, time_batches, ROUNDS};
    use crate::classifier::{Classifier, ClassifyError};
    use crate::model::ModelSpec;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Sleeps 1 ms per image, except for one slow run of each batch size (the machine busy
    /// elsewhere), and records the sizes it was run at.
    struct Disturbed {
        spec: ModelSpec,
        runs: Vec<usize>,
    }

    impl Classifier for Disturbed {
        fn spec(&self) -> &ModelSpec {
            &self.spec
        }

        fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            assert_eq!(batch.len(), self.spec.transform.tensor_len() * n);
            self.runs.push(n);
            let disturbed = self.runs.iter().filter(|&&r| r == n).count() == 3;
            let per_image = if disturbed { 5 } else { 1 };
            std::thread::sleep(Duration::from_millis(per_image) * n as u32);
            Ok(vec![vec![0.0; 2]; n])
        }
    }

    #[test]
    fn batch_sizes_are_timed_in_turns_and_keep_their_fastest_round() {
        let mut spec = ModelSpec::load(crate::config::default_model_dir()).expect("the model");
        spec.transform.crop = 2;
        let mut classifier = Disturbed { spec, runs: vec![] };
        let timed = time_batches(&mut [&mut classifier], &[1, 4]).expect("runs");
        // One untimed run of each, then rounds that take every size in turn.
        let expected: Vec<usize> = std::iter::repeat_n([1, 4], ROUNDS + 1).flatten().collect();
        assert_eq!(classifier.runs, expected);
        assert_eq!(timed.iter().map(|(b, _)| *b).collect::<Vec<_>>(), [1, 4]);
        for (batch, per_image) in timed {
            // The disturbed round (5 ms per image) is not the one kept.
            assert!(
                per_image >= ms(1.0) && per_image < ms(3.0),
                "batch {batch}: {per_image:?}"
            );
        }
    }

    /// Sleeps 10 ms per run (long enough to overlap on a busy machine) and counts the instances
    /// inside `classify` at once; fails on its `fail_on`-th run and panics on its `panic_on`-th.
    struct Counted {
        spec: ModelSpec,
        inside: Arc<AtomicUsize>,
        most_at_once: Arc<AtomicUsize>,
        runs: usize,
        fail_on: Option<usize>,
        panic_on: Option<usize>,
    }

    impl Classifier for Counted {
        fn spec(&self) -> &ModelSpec {
            &self.spec
        }

        fn classify(&mut self, _: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
            self.runs += 1;
            if self.fail_on == Some(self.runs) {
                return Err(ClassifyError::Inference("out of memory".into()));
            }
            if self.panic_on == Some(self.runs) {
                panic!("a bug in the backend");
            }
            let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(10));
            self.inside.fetch_sub(1, Ordering::SeqCst);
            Ok(vec![vec![0.0; 2]; n])
        }
    }

    fn counted(n: usize) -> (Vec<Counted>, Arc<AtomicUsize>) {
        let mut spec = ModelSpec::load(crate::config::default_model_dir()).expect("the model");
        spec.transform.crop = 2;
        let inside = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let instances = (0..n)
            .map(|_| Counted {
                spec: spec.clone(),
                inside: inside.clone(),
                most_at_once: most_at_once.clone(),
                runs: 0,
                fail_on: None,
                panic_on: None,
            })
            .collect();
        (instances, most_at_once)
    }

    #[test]
    fn instances_are_timed_at_once() {
        let (mut instances, most_at_once) = counted(3);
        let mut timed: Vec<&mut dyn Classifier> = instances
            .iter_mut()
            .map(|c| c as &mut dyn Classifier)
            .collect();
        let timed = time_batches(&mut timed, &[1, 2]).expect("runs");
        assert_eq!(timed.iter().map(|(b, _)| *b).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            most_at_once.load(Ordering::SeqCst),
            3,
            "all three ran together"
        );
        for instance in &instances {
            assert_eq!(instance.runs, 2 * (ROUNDS + 1), "every size, every round");
        }
    }

    #[test]
    fn an_instance_that_fails_or_panics_fails_the_timing_without_stalling_the_others() {
        for panics in [false, true] {
            let (mut instances, _) = counted(3);
            match panics {
                false => instances[1].fail_on = Some(3),
                true => instances[1].panic_on = Some(3),
            }
            let mut timed: Vec<&mut dyn Classifier> = instances
                .iter_mut()
                .map(|c| c as &mut dyn Classifier)
                .collect();
            let error = time_batches(&mut timed, &[1, 2]).unwrap_err();
            let expected = if panics { "panicked" } else { "out of memory" };
            assert!(error.to_string().contains(expected), "{error}");
            // The others ran the whole schedule: the failure did not leave them waiting.
            assert_eq!(instances[0].runs, 2 * (ROUNDS + 1));
            assert_eq!(instances[1].runs, 3, "no run after its failure");
        }
    }

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1e3)
    }

    #[test]
    fn instances_follow_the_share_of_inference() {
        // ort, EfficientNet-Lite0, 2 cores: inference a bit over half of the work (1.09 cores'
        // share): one instance would cap it, two share the cores.
        assert_eq!(balanced_instances(2, ms(6.2), ms(7.4)), 2);
        // Within the slack: one.
        assert_eq!(balanced_instances(2, ms(7.0), ms(7.4)), 1);
        // tract, ResNet18: inference most of the work, both cores.
        assert_eq!(balanced_instances(2, ms(6.2), ms(22.0)), 2);
        assert_eq!(balanced_instances(1, ms(6.2), ms(22.0)), 1);
        // 16 cores: 16 × 7.4 / 13.6 = 8.7.
        assert_eq!(balanced_instances(16, ms(6.2), ms(7.4)), 9);
        assert_eq!(balanced_instances(16, ms(6.2), ms(22.0)), 13);
    }

    #[test]
    fn the_batch_is_the_smallest_near_the_best() {
        // Batching barely helps: batch 1.
        let flat = [(1, ms(7.59)), (2, ms(7.61)), (4, ms(7.55)), (8, ms(7.8))];
        assert_eq!(best_batch(&flat), 1);
        // Batch 2 saves 2.3% (ort, EfficientNet-Lite0, AMD EPYC of the Zen 4 class): 2.
        let zen4 = [(1, ms(8.8)), (2, ms(8.6)), (4, ms(9.0)), (8, ms(9.0))];
        assert_eq!(best_batch(&zen4), 2);
        // It helps up to 4.
        let helps = [(1, ms(12.0)), (2, ms(10.5)), (4, ms(8.9)), (8, ms(8.85))];
        assert_eq!(best_batch(&helps), 4);
        // ResNet18 on an AMD EPYC (Zen 5): batch 8 by 2.5%.
        let zen5 = [
            (1, ms(16.35)),
            (2, ms(16.1)),
            (4, ms(15.84)),
            (8, ms(15.45)),
        ];
        assert_eq!(best_batch(&zen5), 8);
        // Within the margin of the best: the smaller.
        let near = [(4, ms(15.55)), (8, ms(15.45))];
        assert_eq!(best_batch(&near), 4);
        // Still helping past 4 by more than the margin: 8.
        let more = [(1, ms(12.0)), (2, ms(10.5)), (4, ms(9.0)), (8, ms(8.7))];
        assert_eq!(best_batch(&more), 8);
        assert_eq!(best_batch(&[(8, ms(5.0))]), 8, "one size timed: that one");
        assert_eq!(best_batch(&[]), 1);
    }

    #[test]
    fn instances_stay_between_one_and_the_cores() {
        assert_eq!(balanced_instances(8, ms(50.0), ms(0.1)), 1, "never none");
        assert_eq!(
            balanced_instances(8, ms(0.0), ms(30.0)),
            8,
            "never above the cores"
        );
        assert_eq!(balanced_instances(4, Duration::ZERO, Duration::ZERO), 1);
        assert_eq!(
            balanced_instances(0, ms(1.0), ms(1.0)),
            1,
            "no cores reported"
        );
    }
}
