//! Mutation fuzzing of decode + preprocess on stable Rust: thousands of damaged variants of real
//! images (bit flips, overwritten runs, truncations, insertions) must each give a tensor or a
//! clean error — never a panic, never a hang. A deterministic generator keeps failures
//! reproducible; `IMGCLF_MUTATIONS` sets how many variants per image (CI runs the default).

use std::time::{Duration, Instant};

use imgclf::preprocess::{self, ImageError, Transform};
use imgclf_suite::image;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            1 => {
                let start = rng.below(bytes.len());
                let end = (start + 1 + rng.below(64)).min(bytes.len());
                let value = rng.next() as u8;
                bytes[start..end].iter_mut().for_each(|b| *b = value);
            }
            2 => bytes.truncate(rng.below(bytes.len()).max(1)),
            3 => {
                let at = rng.below(bytes.len());
                let junk: Vec<u8> = (0..1 + rng.below(32)).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, junk);
            }
            _ => {
                // Damage the header area, where the parsers' bookkeeping lives.
                let i = rng.below(bytes.len().min(512));
                bytes[i] = rng.next() as u8;
            }
        }
    }
    bytes
}

/// Variants per original: `IMGCLF_MUTATIONS`, 1000 by default (what CI runs).
fn mutations_per_image() -> usize {
    std::env::var("IMGCLF_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

/// The header check that runs where an upload arrives gives the full check's answer wherever
/// it settles one: whole RGB JPEGs pass on their headers alone, other formats are left to the
/// full check, and a damaged file it passes is one the full check passes too.
#[test]
fn the_header_check_agrees_with_the_full_check() {
    let per_image = mutations_per_image();
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut settled, mut refused) = (0, 0);
    for (name, settles) in [
        ("opencv_butterfly.jpg", true),
        ("opencv_left01.jpg", true),
        ("skimage_horse.png", false),
    ] {
        let original = image(name);
        let full = preprocess::validate(&original, 50_000_000).expect(name);
        let headers = preprocess::validate_headers(&original, 50_000_000).expect(name);
        assert_eq!(headers, settles.then_some(full), "{name}");
        for _ in 0..per_image {
            let damaged = mutate(&mut rng, &original);
            let full = preprocess::validate(&damaged, 50_000_000);
            match preprocess::validate_headers(&damaged, 50_000_000) {
                Ok(Some(info)) => {
                    assert_eq!(full.ok(), Some(info), "{name}: passed on its headers");
                    settled += 1;
                }
                Ok(None) => {}
                Err(error) => {
                    assert!(full.is_err(), "{name}: refused on its headers ({error})");
                    refused += 1;
                }
            }
        }
    }
    assert!(
        settled > 0 && refused > 0,
        "{settled} settled, {refused} refused"
    );
}

#[test]
fn damaged_images_never_panic_or_hang() {
    let per_image = mutations_per_image();
    let transform = Transform::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut accepted, mut refused) = (0, 0);
    // Small originals keep each decode cheap: a JPEG, a greyscale JPEG, an RGBA PNG, a GIF.
    let gif = {
        let mut out = Vec::new();
        let small = image::imageops::thumbnail(
            &image::load_from_memory(&image("skimage_chelsea.png")).unwrap(),
            64,
            48,
        );
        image::DynamicImage::ImageRgba8(small)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Gif)
            .unwrap();
        out
    };
    let originals = [
        image("opencv_butterfly.jpg"),
        image("opencv_left01.jpg"),
        image("skimage_horse.png"),
        gif,
    ];
    for original in &originals {
        for _ in 0..per_image {
            let damaged = mutate(&mut rng, original);
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(|| {
                preprocess::validate(&damaged, 50_000_000)?;
                transform.tensor_from_bytes(&damaged, 50_000_000)
            });
            let elapsed = started.elapsed();
            assert!(
                elapsed < Duration::from_secs(5),
                "a damaged image took {elapsed:?}"
            );
            match outcome {
                Ok(Ok(tensor)) => {
                    assert_eq!(tensor.len(), transform.tensor_len());
                    assert!(
                        tensor.iter().all(|v| v.is_finite()),
                        "a tensor of finite values"
                    );
                    accepted += 1;
                }
                Ok(Err(error)) => {
                    assert!(!error.to_string().is_empty());
                    assert!(
                        !matches!(error, ImageError::Empty),
                        "mutations never empty the file"
                    );
                    refused += 1;
                }
                Err(_) => {
                    let path = std::env::temp_dir().join("imgclf-panicking-image");
                    std::fs::write(&path, &damaged).unwrap();
                    panic!(
                        "decoding panicked; the input is saved at {}",
                        path.display()
                    );
                }
            }
        }
    }
    eprintln!("{accepted} damaged images still decoded, {refused} refused with a clear error");
    assert!(
        refused > 0 && accepted > 0,
        "the mutations exercise both paths"
    );
}

/// CRC-32 as PNG chunks carry it (bitwise: only tests use it).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Recomputes every chunk's CRC, so that damage reaches the inflate and filter stages instead
/// of stopping at the first checksum. Stops at the first chunk that does not fit.
fn with_valid_crcs(mut png: Vec<u8>) -> Vec<u8> {
    let mut at = 8;
    while at + 12 <= png.len() {
        let length = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let end = at + 8 + length;
        if end + 4 > png.len() {
            break;
        }
        let crc = crc32(&png[at + 4..end]);
        png[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
    png
}

/// The PNG upload check reads the rows without building the image: it must accept exactly what
/// decoding accepts, for every layout (1- to 16-bit, grey, palette with transparency, alpha,
/// interlaced) and any damage, including damage behind valid checksums.
#[test]
fn the_png_check_accepts_exactly_what_decoding_accepts() {
    let per_image = mutations_per_image();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut originals: Vec<(String, Vec<u8>)> = [
        "grey1.png",
        "rgba16.png",
        "interlaced_rgb8.png",
        "interlaced_palette4_trns.png",
        "interlaced_greyalpha16.png",
    ]
    .iter()
    .map(|name| (name.to_string(), std::fs::read(data.join(name)).unwrap()))
    .collect();
    originals.push(("skimage_horse.png".into(), image("skimage_horse.png")));
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut accepted, mut refused) = (0, 0);
    for (name, original) in &originals {
        assert!(preprocess::validate(original, 50_000_000).is_ok(), "{name}");
        assert!(
            preprocess::decode_rgb8(original, 50_000_000).is_ok(),
            "{name}"
        );
        for i in 0..per_image {
            let mut damaged = mutate(&mut rng, original);
            if i % 2 == 0 {
                damaged = with_valid_crcs(damaged);
            }
            let checked = preprocess::validate(&damaged, 50_000_000);
            let decoded = preprocess::decode_rgb8(&damaged, 50_000_000);
            if checked.is_ok() != decoded.is_ok() {
                let path = std::env::temp_dir().join("imgclf-png-check-disagrees.png");
                std::fs::write(&path, &damaged).unwrap();
                panic!(
                    "{name}: the check says {:?}, decoding {:?}; the input is saved at {}",
                    checked.err(),
                    decoded.err(),
                    path.display()
                );
            }
            if checked.is_ok() {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
    }
    eprintln!("{accepted} damaged PNGs accepted by both, {refused} refused by both");
    assert!(refused > 0 && accepted > 0, "both outcomes are exercised");
}

/// Damaged progressive JPEGs, whose scans imgclf entropy-decodes itself where it is certain
/// of the file and leaves to libjpeg otherwise: whatever both decode has exactly the pixels
/// that libjpeg alone (the `mozjpeg` crate) gives.
#[test]
fn a_damaged_progressive_jpeg_decodes_as_libjpeg_alone_decodes_it() {
    damaged_jpegs_decode_as_libjpeg_alone_decodes_them(true);
}

/// Damaged baseline JPEGs, whose MCUs imgclf entropy-decodes itself as libjpeg decodes them,
/// damage included: the same pixels as libjpeg alone.
#[test]
fn a_damaged_baseline_jpeg_decodes_as_libjpeg_alone_decodes_it() {
    damaged_jpegs_decode_as_libjpeg_alone_decodes_them(false);
}

fn damaged_jpegs_decode_as_libjpeg_alone_decodes_them(progressive: bool) {
    let kind = if progressive {
        "progressive"
    } else {
        "baseline"
    };
    let photo = image::load_from_memory(&image("opencv_butterfly.jpg")).unwrap();
    let photo = image::imageops::thumbnail(&photo.to_rgb8(), 160, 120);
    let original = imgclf_suite::encode_jpeg(photo.as_raw(), (160, 120), 90.0, (2, 2), progressive);
    let libjpeg_alone = |bytes: &[u8]| {
        std::panic::catch_unwind(|| {
            let mut decoder = mozjpeg::Decompress::new_mem(bytes).ok()?.rgb().ok()?;
            // Its pixels; not `finish`, which also wants the markers after the image whole.
            decoder.read_scanlines::<u8>().ok()
        })
        .ok()
        .flatten()
    };
    assert_eq!(
        preprocess::decode_rgb8(&original, 50_000_000)
            .unwrap()
            .into_raw(),
        libjpeg_alone(&original).unwrap()
    );
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut same, mut refused, mut unread) = (0, 0, 0);
    for i in 0..mutations_per_image() {
        let damaged = mutate(&mut rng, &original);
        let ours = preprocess::decode_rgb8(&damaged, 50_000_000);
        let saved = || {
            let path = std::env::temp_dir().join(format!("imgclf-{kind}-variant.jpg"));
            std::fs::write(&path, &damaged).unwrap();
            path.display().to_string()
        };
        match (ours, libjpeg_alone(&damaged)) {
            (Ok(ours), Some(theirs)) => {
                assert!(
                    ours.as_raw() == &theirs,
                    "variant {i}: pixels differ ({})",
                    saved()
                );
                same += 1;
            }
            // The `mozjpeg` crate's reader fails where its bytes run out; libjpeg's memory
            // source, which imgclf reads through, reads an end of image there.
            (Ok(_), None) => unread += 1,
            // Refused before decoding (a file cut short, say), where libjpeg fills in grey.
            (Err(_), _) => refused += 1,
        }
    }
    eprintln!(
        "{same} damaged {kind} JPEGs decoded as libjpeg does, {refused} refused, \
         {unread} beyond the crate's reader"
    );
    assert!(same > 0 && refused > 0, "the mutations exercise both paths");
}
