//! Decode + preprocess per image size: small, 640x480 and 2560x1600.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imgclf::preprocess::{decode_rgb8, Transform};
use imgclf_suite::image;

fn preprocess(c: &mut Criterion) {
    let transform = Transform::default();
    let mut group = c.benchmark_group("preprocess");
    for name in [
        "skimage_chelsea.png",
        "opencv_left01.jpg",
        "darknet_dog.jpg",
        "kde_coldripple_2560x1600.jpg",
    ] {
        let bytes = image(name);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("decode+transform", name),
            &bytes,
            |b, bytes| b.iter(|| transform.tensor_from_bytes(bytes, u64::MAX).unwrap()),
        );
        let rgb = decode_rgb8(&bytes, u64::MAX).unwrap();
        group.bench_with_input(BenchmarkId::new("transform", name), &rgb, |b, rgb| {
            b.iter(|| transform.tensor_from_rgb(rgb))
        });
    }
    group.finish();
}

criterion_group!(benches, preprocess);
criterion_main!(benches);
