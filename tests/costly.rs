//! Uploads that are small on the wire and expensive to decode. Each is refused as `TooCostly`
//! (a 422 at upload), at the upload check and in the worker's decode alike, within the CPU
//! budget of one decode, whatever its size up to the upload cap.
//!
//! `IMGCLF_WRITE_SEEDS=1` also writes small versions of them into `fuzz/seeds/decode`.

use std::time::Duration;

use cpu_time::ThreadTime;
use imgclf::preprocess::{self, Transform, DECODE_CPU_BUDGET};
use imgclf::ImageError;

/// A progressive JPEG of a flat colour whose last refinement scan is repeated `repeats` times:
/// each copy is a few bytes on the wire and a full pass over the image in the decoder.
fn many_scan_jpeg(side: usize, repeats: usize) -> Vec<u8> {
    let rgb = vec![90u8; side * side * 3];
    let jpeg = imgclf_suite::encode_jpeg(&rgb, (side, side), 80.0, (2, 2), true);
    let last_scan = jpeg
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .expect("a scan");
    let end = jpeg.len() - 2;
    assert_eq!(&jpeg[end..], [0xFF, 0xD9], "ends with EOI");
    let mut out = jpeg[..end].to_vec();
    for _ in 0..repeats {
        out.extend_from_slice(&jpeg[last_scan..end]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// A GIF whose logical screen is `screen` pixels square and whose one frame is `frame` square.
fn oversized_frame_gif(screen: u16, frame: u16) -> Vec<u8> {
    let pixels = vec![0u8; usize::from(frame) * usize::from(frame)];
    let mut out = Vec::new();
    {
        let mut encoder =
            gif::Encoder::new(&mut out, screen, screen, &[0, 0, 0, 255, 255, 255]).unwrap();
        let mut image = gif::Frame::from_indexed_pixels(frame, frame, pixels, None);
        image.left = 0;
        image.top = 0;
        encoder.write_frame(&image).unwrap();
    }
    out
}

/// Runs `decode` on this thread; returns its result and the CPU time it took.
fn timed<T>(decode: impl FnOnce() -> T) -> (T, Duration) {
    let started = ThreadTime::now();
    let result = decode();
    (result, started.elapsed())
}

/// Both decodes refuse `bytes` as too costly, each within the budget (plus a margin for the
/// last step before the check).
fn refused_in_budget(what: &str, bytes: &[u8], max_pixels: u64) {
    let limit = DECODE_CPU_BUDGET + Duration::from_millis(500);
    let (checked, took) = timed(|| preprocess::validate(bytes, max_pixels));
    eprintln!("{what}: upload check {took:?}: {checked:?}");
    assert!(
        matches!(checked, Err(ImageError::TooCostly(_))),
        "{what}: upload check gave {checked:?}"
    );
    assert!(took < limit, "{what}: the upload check took {took:?}");
    let (decoded, took) = timed(|| Transform::default().tensor_from_bytes(bytes, max_pixels));
    eprintln!("{what}: worker decode {took:?}");
    assert!(
        matches!(decoded, Err(ImageError::TooCostly(_))),
        "{what}: worker decode gave {:?}",
        decoded.map(|t| t.len())
    );
    assert!(took < limit, "{what}: the worker's decode took {took:?}");
}

#[test]
fn a_progressive_jpeg_with_thousands_of_scans_is_refused_within_budget() {
    let bytes = many_scan_jpeg(5000, 20_000);
    eprintln!("many-scan JPEG: {} bytes", bytes.len());
    assert!(bytes.len() < 2 << 20, "small on the wire");
    refused_in_budget("5000x5000, 20,000 scans", &bytes, 50_000_000);
    // An honest progressive JPEG of the same size still decodes.
    let honest = many_scan_jpeg(5000, 0);
    assert!(preprocess::validate(&honest, 50_000_000).is_ok());
    assert!(Transform::default()
        .tensor_from_bytes(&honest, 50_000_000)
        .is_ok());
    write_seed("many-scans.jpg", &many_scan_jpeg(600, 2_000));
}

#[test]
fn a_gif_frame_larger_than_its_screen_is_held_to_the_pixel_cap() {
    // The screen (100x100) is well inside a cap of one megapixel; the frame (3000x3000) is not.
    let bytes = oversized_frame_gif(100, 3000);
    eprintln!("oversized-frame GIF: {} bytes", bytes.len());
    let (checked, _) = timed(|| preprocess::validate(&bytes, 1_000_000));
    assert!(
        matches!(
            checked,
            Err(ImageError::TooCostly(_) | ImageError::TooManyPixels { .. })
        ),
        "{checked:?}"
    );
    let decoded = Transform::default().tensor_from_bytes(&bytes, 1_000_000);
    assert!(decoded.is_err(), "the worker refuses it too");
    write_seed("oversized-frame.gif", &oversized_frame_gif(8, 600));
}

/// With `IMGCLF_WRITE_SEEDS=1`, keeps a small version of a costly input for the fuzzer.
fn write_seed(name: &str, bytes: &[u8]) {
    if std::env::var("IMGCLF_WRITE_SEEDS").as_deref() == Ok("1") {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/decode/").to_string() + name;
        std::fs::write(&path, bytes).unwrap();
    }
}

/// A flat CIELab TIFF `side` pixels square, Deflate-compressed: an RGB one with its photometric
/// tag changed (the `tiff` crate writes no CIELab). Its colour conversion, after the last
/// byte is read, costs more than its decompression.
fn flat_lab_tiff(side: u32) -> Vec<u8> {
    use tiff::encoder::{colortype::RGB8, Compression, DeflateLevel, TiffEncoder};
    let samples = vec![120u8; side as usize * side as usize * 3];
    let mut bytes = std::io::Cursor::new(Vec::new());
    TiffEncoder::new(&mut bytes)
        .unwrap()
        .with_compression(Compression::Deflate(DeflateLevel::Fast))
        .write_image::<RGB8>(side, side, &samples)
        .unwrap();
    let mut bytes = bytes.into_inner();
    // PhotometricInterpretation (262), one SHORT: RGB (2) becomes CIELab (8).
    let entry = [6, 1, 3, 0, 1, 0, 0, 0, 2, 0];
    let at = bytes
        .windows(entry.len())
        .position(|w| w == entry)
        .expect("a little-endian photometric entry");
    bytes[at + 8] = 8;
    bytes
}

/// Flat images of many pixels in the formats that compress them to almost nothing: each is
/// decoded, or refused as too costly, within the budget, at upload and in the worker.
#[test]
fn flat_images_near_the_pixel_cap_cost_at_most_the_budget() {
    let limit = DECODE_CPU_BUDGET + Duration::from_millis(500);
    let side = 6000u32; // 36 megapixels, under the default cap of 50
    let grey = image::GrayImage::from_pixel(side, side, image::Luma([77]));
    let mut images = vec![(image::ImageFormat::Tiff, flat_lab_tiff(side))];
    for format in [image::ImageFormat::Png, image::ImageFormat::WebP] {
        let mut bytes = Vec::new();
        image::DynamicImage::ImageLuma8(grey.clone())
            .to_rgb8()
            .write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        images.push((format, bytes));
    }
    for (format, bytes) in images {
        eprintln!("{format:?} {side}x{side}: {} bytes", bytes.len());
        let (checked, took) = timed(|| preprocess::validate(&bytes, 50_000_000));
        eprintln!(
            "{format:?}: upload check {took:?}: {:?}",
            checked.as_ref().err()
        );
        assert!(
            matches!(checked, Ok(_) | Err(ImageError::TooCostly(_))),
            "{format:?}: {checked:?}"
        );
        assert!(took < limit, "{format:?}: the upload check took {took:?}");
        let (decoded, took) = timed(|| Transform::default().tensor_from_bytes(&bytes, 50_000_000));
        assert!(
            matches!(decoded, Ok(_) | Err(ImageError::TooCostly(_))),
            "{format:?}: {:?}",
            decoded.err()
        );
        assert!(
            took < limit,
            "{format:?}: the worker's decode took {took:?}"
        );
    }
}
