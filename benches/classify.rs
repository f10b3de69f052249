//! Classification per model and batch size, the answer from the logits, and the in-memory
//! pipeline's throughput.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imgclf::classifier::{self, ClassifierOptions};
use imgclf::{ModelSpec, Settings, TaskState, Upload};
use imgclf_suite::{default_model_dir, image, resnet18_dir};

/// tract always; ort too when `IMGCLF_ORT_LIB` (or `ORT_DYLIB_PATH`) names ONNX Runtime.
fn classify(c: &mut Criterion) {
    let ort_library =
        std::env::var_os("IMGCLF_ORT_LIB").or_else(|| std::env::var_os("ORT_DYLIB_PATH"));
    let mut backends = vec!["tract"];
    if ort_library.is_some() {
        backends.push("ort");
    }
    let options = ClassifierOptions {
        intra_threads: 1,
        ort_library: ort_library.map(Into::into),
        ..ClassifierOptions::default()
    };
    for backend in backends {
        let mut group = c.benchmark_group(format!("classify/{backend}"));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(10));
        for (model, dir) in [
            ("efficientnet-lite0", default_model_dir()),
            ("resnet18", resnet18_dir()),
        ] {
            let spec = ModelSpec::load(dir).unwrap();
            let tensor = spec
                .transform
                .tensor_from_bytes(&image("darknet_dog.jpg"), u64::MAX)
                .unwrap();
            let mut classifier = classifier::build(backend, spec, &options).unwrap();
            for batch in [1usize, 4, 8, 16] {
                let input = tensor.repeat(batch);
                classifier.classify(&input, batch).unwrap(); // compile outside the measurement
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(BenchmarkId::new(model, batch), &input, |b, input| {
                    b.iter(|| classifier.classify(input, batch).unwrap())
                });
            }
        }
        group.finish();
    }
}

/// Upload to SUCCESS through the whole in-memory pipeline, 32 images at a time.
fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let settings = Settings {
        storage: Some("memory://".into()),
        results: Some("memory://".into()),
        ..Settings::default()
    };
    let pipeline = Arc::new(runtime.block_on(settings.build_pipeline()).unwrap());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    runtime.spawn(pipeline.clone().run_worker(stopped));
    let bytes: bytes::Bytes = image("darknet_dog.jpg").into();
    let mut group = c.benchmark_group("pipeline/memory");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(32));
    group.bench_function("upload-to-success/32", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut ids = Vec::new();
                for _ in 0..32 {
                    let upload = Upload {
                        bytes: bytes.clone(),
                        ..Upload::default()
                    };
                    ids.push(pipeline.submit(upload).await.unwrap());
                }
                for id in ids {
                    while pipeline.status(id).await.unwrap().unwrap().state != TaskState::Success {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            })
        })
    });
    group.finish();
}

/// A model's 1,000 logits to the answer (softmax and the 5 most probable), once per image.
fn answer(c: &mut Criterion) {
    let spec = ModelSpec::load(default_model_dir()).unwrap();
    let logits: Vec<f32> = (0..spec.labels.len() as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 8) as f32 * 1e-6)
        .collect();
    c.bench_function("answer/top-5-of-1000", |b| {
        b.iter(|| spec.top_k(std::hint::black_box(&logits), 5))
    });
}

// The answer first: tract's kernels leave the vector registers' upper halves in use, and after
// them the same thread's SSE code (this) runs many times slower.
criterion_group!(benches, answer, classify, pipeline);
criterion_main!(benches);
