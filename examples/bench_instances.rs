//! The model's instances alone, as the embedded service runs them, with nothing else on the
//! cores: no HTTP, no stored images, no records. They start as the service starts them (the
//! same settings and variables, so tuned alike: instances, batch cap and its re-check under
//! load), and `IN_FLIGHT` photos from memory wait for them at all times, each decoded and
//! preprocessed on an instance's thread. Prints one JSON object. `scripts/bench.py` runs it
//! beside the bound: the most the embedded service could reach on this machine if its own work
//! cost nothing.
//!
//! The bound counts decoding and inference at the speed each has alone, run over and over. An
//! instance runs them in turns on one core, where each finds the core's caches holding the
//! other's data: on an Intel Xeon (model 167), EfficientNet-Lite0's inference took 7.3–7.5 ms
//! per image in a long row and 7.7–8.3 right after a decode, the decode 2.8 and 3.2–3.4.
//!
//! cargo run --release --example bench_instances -- IMAGES PHOTO...
//!
//! The model's settings are read from the service's variables (`IMGCLF_CLASSIFIER`,
//! `IMGCLF_MODEL`, `IMGCLF_ORT_LIB`, `IMGCLF_ORT_PROVIDERS`, `IMGCLF_INTRA_THREADS`,
//! `IMGCLF_INFERENCE_THREADS`, `IMGCLF_MAX_BATCH`, `IMGCLF_MAX_PIXELS`); unset, they take the
//! service's defaults.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use imgclf::classifier::{ClassifierHandle, Queued};
use imgclf::Settings;
use serde_json::json;

/// Photos waiting for the instances at any time: as under the benchmark's 16 clients, more than
/// the largest batch.
const IN_FLIGHT: usize = 32;

fn main() -> anyhow::Result<()> {
    imgclf::tune_malloc();
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(args.len() >= 2, "usage: bench_instances IMAGES PHOTO...");
    let images: usize = args[0].parse()?;
    let photos: Vec<Bytes> = args[1..]
        .iter()
        .map(|path| std::fs::read(path).map(Bytes::from).context(path.clone()))
        .collect::<Result<_, _>>()?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let settings = settings_from_env()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let handle = settings.spawn_classifier().await?;
        // A warm-up round, as the pipelines' (the first runs fill the runtime's buffers).
        feed(&handle, &photos, 2 * photos.len(), settings.max_pixels).await?;
        let cpu = cpu_time::ProcessTime::now();
        let started = Instant::now();
        feed(&handle, &photos, images, settings.max_pixels).await?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu_ms = cpu.elapsed().as_secs_f64() * 1e3;
        println!(
            "{}",
            json!({
                "backend": handle.backend(),
                "images": images,
                "images_per_s": images as f64 / seconds,
                "cpu_ms_per_image": cpu_ms / images as f64,
                "instances": handle.instances(),
                "max_batch": handle.max_batch(),
            })
        );
        // Stopped before the process exits, which would tear the runtime down under a run.
        handle.stop(Duration::from_secs(10)).await;
        anyhow::Ok(())
    })
}

/// `images` photos in turn, `IN_FLIGHT` waiting at a time; each answer awaited oldest first.
async fn feed(
    handle: &ClassifierHandle,
    photos: &[Bytes],
    images: usize,
    max_pixels: u64,
) -> anyhow::Result<()> {
    let mut waiting: VecDeque<Queued> = VecDeque::with_capacity(IN_FLIGHT);
    for photo in photos.iter().cycle().take(images) {
        if waiting.len() == IN_FLIGHT {
            let oldest = waiting.pop_front().expect("IN_FLIGHT waiting");
            oldest.answer().await?;
        }
        waiting.push_back(handle.queue_image(photo.clone(), max_pixels));
    }
    for queued in waiting {
        queued.answer().await?;
    }
    Ok(())
}

/// The model's settings from the service's variables, their defaults where unset; a value that
/// does not parse is an error.
fn settings_from_env() -> anyhow::Result<Settings> {
    fn parsed<T>(name: &str) -> anyhow::Result<Option<T>>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => value
                .parse()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{name}={value}: {e}")),
            _ => Ok(None),
        }
    }
    let defaults = Settings::default();
    Ok(Settings {
        classifier: parsed("IMGCLF_CLASSIFIER")?.unwrap_or(defaults.classifier.clone()),
        model: parsed("IMGCLF_MODEL")?,
        ort_lib: parsed("IMGCLF_ORT_LIB")?,
        ort_providers: parsed("IMGCLF_ORT_PROVIDERS")?.unwrap_or(defaults.ort_providers.clone()),
        intra_threads: parsed("IMGCLF_INTRA_THREADS")?.unwrap_or(defaults.intra_threads),
        inference_threads: parsed("IMGCLF_INFERENCE_THREADS")?,
        max_batch: parsed("IMGCLF_MAX_BATCH")?,
        max_pixels: parsed("IMGCLF_MAX_PIXELS")?.unwrap_or(defaults.max_pixels),
        ..defaults
    })
}
