//! Throughput of a classifier backend alone, and of preprocessing, on the shared photos.
//! Prints one JSON object; `scripts/bench.py` runs it beside raw onnxruntime.
//!
//! cargo run --release --example bench_classifier -- BACKEND MODEL_DIR BATCH SECONDS [THREADS]
//!
//! `IMGCLF_BENCH_PHOTOS=DIR` takes the photos from DIR instead of the shared ones; the JSON gives
//! each photo's preprocessing time (`preprocess_ms_by_photo`) as well as their mean.
//!
//! `IMGCLF_ORT_PROVIDERS` (`cuda,cpu`…) picks ort's execution providers, as in the service; the
//! log on stderr says which one the session runs on. `IMGCLF_BENCH_LOGITS=FILE` also writes each
//! photo's logits, batch by batch, as JSON `{"photo.jpg": [...]}` (scripts/gpu-check.sh compares
//! GPU against CPU with it).

use std::time::{Duration, Instant};

use imgclf::classifier::{self, ClassifierOptions};
use imgclf::ModelSpec;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Each photo's tensor and preprocessing time: the median of seven runs after one untimed
/// (as for Pillow in scripts/bench.py), in milliseconds, by photo.
struct Preprocessed {
    tensors: Vec<Vec<f32>>,
    ms: Vec<f64>,
    by_photo: serde_json::Map<String, serde_json::Value>,
}

fn time_preprocessing(
    transform: &imgclf::Transform,
    images: &[Vec<u8>],
    files: &[std::path::PathBuf],
) -> anyhow::Result<Preprocessed> {
    let mut timed = Preprocessed {
        tensors: Vec::new(),
        ms: Vec::new(),
        by_photo: serde_json::Map::new(),
    };
    for (bytes, file) in images.iter().zip(files) {
        transform.tensor_from_bytes(bytes, u64::MAX)?;
        let mut runs = Vec::new();
        for run in 0..7 {
            let started = Instant::now();
            let tensor = transform.tensor_from_bytes(bytes, u64::MAX)?;
            runs.push(started.elapsed().as_secs_f64() * 1e3);
            if run == 0 {
                timed.tensors.push(tensor);
            }
        }
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        timed.ms.push(median);
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        timed.by_photo.insert(name.into_owned(), median.into());
    }
    Ok(timed)
}

fn main() -> anyhow::Result<()> {
    // As both binaries do first thing: preprocessing is timed with the service's allocator.
    imgclf::tune_malloc();
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: bench_classifier BACKEND MODEL_DIR BATCH SECONDS [THREADS]"
    );
    let (backend, model, batch) = (&args[0], &args[1], args[2].parse::<usize>()?);
    let seconds: f64 = args[3].parse()?;
    let threads: usize = args.get(4).map_or(Ok(1), |t| t.parse())?;
    let spec = ModelSpec::load(model)?;
    imgclf::logs::init(imgclf::logs::LogFormat::Text);
    let providers: classifier::Providers = std::env::var("IMGCLF_ORT_PROVIDERS")
        .unwrap_or_default()
        .parse()?;

    // Preprocessing: every photo, decoded and transformed, timed one by one.
    let dir = std::env::var_os("IMGCLF_BENCH_PHOTOS")
        .filter(|d| !d.is_empty())
        .map_or_else(|| imgclf_suite::shared_dir().join("images"), Into::into);
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("jpg" | "jpeg" | "png" | "webp")
            )
        })
        .collect();
    files.sort();
    let images: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    // On a thread of its own, with the service's allocator settings, as the service's
    // instances preprocess.
    let Preprocessed {
        tensors,
        ms: mut preprocess_ms,
        by_photo,
    } = std::thread::scope(|scope| {
        let timed = scope.spawn(|| time_preprocessing(&spec.transform, &images, &files));
        timed.join().expect("preprocessing does not panic")
    })?;
    preprocess_ms.sort_by(f64::total_cmp);

    let options = ClassifierOptions {
        intra_threads: threads,
        ort_library: std::env::var_os("IMGCLF_ORT_LIB")
            .filter(|v| !v.is_empty())
            .map(Into::into),
        providers: providers.clone(),
        ..ClassifierOptions::default()
    };
    let mut classifier = classifier::build(backend, spec, &options)?;
    if let Some(path) = std::env::var_os("IMGCLF_BENCH_LOGITS").filter(|p| !p.is_empty()) {
        let mut logits = serde_json::Map::new();
        for (chunk, names) in tensors.chunks(batch).zip(files.chunks(batch)) {
            let rows = classifier.classify(&chunk.concat(), chunk.len())?;
            for (file, row) in names.iter().zip(rows) {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                logits.insert(name.into_owned(), row.into());
            }
        }
        std::fs::write(path, serde_json::to_vec(&logits)?)?;
    }
    let input: Vec<f32> = tensors
        .iter()
        .cycle()
        .take(batch)
        .flatten()
        .copied()
        .collect();
    classifier.classify(&input, batch)?; // warm-up (tract compiles this batch size)
    let mut batch_ms = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        let t = Instant::now();
        classifier.classify(&input, batch)?;
        batch_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total = started.elapsed().as_secs_f64();
    batch_ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "backend": backend,
            "batch": batch,
            "threads": threads,
            "providers": providers.to_string(),
            "images_per_s": (batch_ms.len() * batch) as f64 / total,
            "batch_p50_ms": percentile(&batch_ms, 0.5),
            "batch_p95_ms": percentile(&batch_ms, 0.95),
            "preprocess_mean_ms": preprocess_ms.iter().sum::<f64>() / preprocess_ms.len() as f64,
            "preprocess_p50_ms": percentile(&preprocess_ms, 0.5),
            "preprocess_ms_by_photo": by_photo,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}

/// This process's peak resident set (VmHWM). Measured here because a parent's `wait4` figure
/// starts from the parent's own size (Linux carries it over the fork).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
