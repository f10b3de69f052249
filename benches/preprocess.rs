//! Decode + preprocess per image size (small, 640x480 and 2560x1600) and per kind of large
//! JPEG (progressive; a phone's portrait, stored turned with an EXIF orientation), with the
//! allocator set up as the binaries set it; and each JPEG's lower rows decoded on a second
//! thread, as an image alone on the machine is. Also the check each upload gets where it
//! arrives, on the JPEGs (headers only).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imgclf::preprocess::{decode_rgb8, validate_headers, HelperThread, Transform};
use imgclf_suite::{encode_jpeg, image, with_exif_orientation};

/// The 2560x1600 photo re-encoded as progressive JPEG, at quality 90.
fn progressive(bytes: &[u8]) -> Vec<u8> {
    let rgb = decode_rgb8(bytes, u64::MAX).unwrap();
    let size = (rgb.width() as usize, rgb.height() as usize);
    encode_jpeg(rgb.as_raw(), size, 90.0, (2, 2), true)
}

fn preprocess(c: &mut Criterion) {
    imgclf::tune_malloc();
    let transform = Transform::default();
    let helper_thread = HelperThread::spawn().unwrap();
    let mut group = c.benchmark_group("preprocess");
    let large = image("kde_coldripple_2560x1600.jpg");
    let photos = [
        "skimage_chelsea.png",
        "opencv_left01.jpg",
        "darknet_dog.jpg",
        "kde_coldripple_2560x1600.jpg",
    ]
    .map(|name| (name.to_string(), image(name)))
    .into_iter()
    .chain([
        ("progressive_2560x1600.jpg".into(), progressive(&large)),
        (
            "exif_turned_2560x1600.jpg".into(),
            with_exif_orientation(&large, 6),
        ),
    ]);
    for (name, bytes) in photos {
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("decode+transform", &name),
            &bytes,
            |b, bytes| b.iter(|| transform.tensor_from_bytes(bytes, u64::MAX).unwrap()),
        );
        if name.ends_with(".jpg") {
            group.bench_with_input(
                BenchmarkId::new("upload check", &name),
                &bytes,
                |b, bytes| b.iter(|| validate_headers(bytes, u64::MAX).unwrap().unwrap()),
            );
            group.bench_with_input(
                BenchmarkId::new("decode+transform, two threads", &name),
                &bytes,
                |b, bytes| {
                    b.iter(|| {
                        transform
                            .tensor_from_bytes_on_two_threads(bytes, u64::MAX, &helper_thread)
                            .unwrap()
                    })
                },
            );
        }
        let rgb = decode_rgb8(&bytes, u64::MAX).unwrap();
        group.bench_with_input(BenchmarkId::new("transform", name), &rgb, |b, rgb| {
            b.iter(|| transform.tensor_from_rgb(rgb))
        });
    }
    group.finish();
}

criterion_group!(benches, preprocess);
criterion_main!(benches);
