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
//! The settings are the service's own (`Settings`): its flags and `IMGCLF_*` variables, read
//! and checked as the service reads them (`--help` lists them).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use imgclf::classifier::{ClassifierHandle, Queued};
use imgclf::Settings;
use serde_json::json;

#[derive(Parser)]
#[command(about = "The model's instances alone, as the embedded service runs them")]
struct Args {
    /// Photos to classify, after a warm-up round of twice the photos given.
    images: usize,
    /// The photos, taken in turn.
    #[arg(required = true)]
    photos: Vec<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

/// Photos waiting for the instances at any time: as under the benchmark's 16 clients, more than
/// the largest batch.
const IN_FLIGHT: usize = 32;

fn main() -> anyhow::Result<()> {
    imgclf::tune_malloc();
    let Args {
        images,
        photos,
        settings,
    } = Args::parse();
    let photos: Vec<Bytes> = photos
        .iter()
        .map(|path| {
            std::fs::read(path)
                .map(Bytes::from)
                .context(path.display().to_string())
        })
        .collect::<Result<_, _>>()?;
    imgclf::logs::init(imgclf::logs::LogFormat::Text);
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
