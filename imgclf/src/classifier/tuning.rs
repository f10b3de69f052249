//! How many instances of the model to run when `IMGCLF_INFERENCE_THREADS` is unset: enough for
//! inference and preprocessing to share the cores in proportion to what each costs per image,
//! both measured at start on this machine.
//!
//! A choice made once at warm-up is enough: both costs depend on the model and the machine,
//! which do not change while the process runs, and how cores are shared between two thread
//! pools cannot be changed cheaply later anyway (an instance is a copy of the weights, built in
//! seconds). What does vary is the photos: preprocessing grows with their pixels, so the
//! measure uses a typical 2 MP photo. The count is rounded up: with fewer instances than
//! inference's share, inference caps the throughput and part of a core idles, while one
//! instance more only time-shares the cores with preprocessing. The memory of each extra
//! instance (one more copy of the weights) is why the count is never above the cores.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{Classifier, ClassifyError};
use crate::model::ModelSpec;

/// Timed runs behind each figure (after one untimed run): the median is kept.
const RUNS: usize = 3;

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

/// Inference time per image of one instance, on batches of `max_batch` zero tensors (the
/// first run, which may compile the batch's plan, untimed).
pub fn time_inference(
    classifier: &mut dyn Classifier,
    max_batch: usize,
) -> Result<Duration, ClassifyError> {
    let max_batch = max_batch.max(1);
    let batch = vec![0.0; classifier.spec().transform.tensor_len() * max_batch];
    classifier.classify(&batch, max_batch)?;
    let runs = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            classifier.classify(&batch, max_batch)?;
            Ok(started.elapsed() / max_batch as u32)
        })
        .collect::<Result<Vec<_>, ClassifyError>>()?;
    Ok(median(runs))
}

/// Decoding and preprocessing time of a photo-sized JPEG (1600 × 1200) for `spec`'s
/// transform, or `None` if it fails (it should not: the photo is made here).
pub fn time_preprocessing(spec: &ModelSpec) -> Option<Duration> {
    let photo = sample_photo()?;
    spec.transform.tensor_from_bytes(photo, u64::MAX).ok()?;
    let runs = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            spec.transform.tensor_from_bytes(photo, u64::MAX).ok()?;
            Some(started.elapsed())
        })
        .collect::<Option<Vec<_>>>()?;
    Some(median(runs))
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
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
    use super::balanced_instances;
    use std::time::Duration;

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
