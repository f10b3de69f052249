//! A JPEG is decoded only where the resize reads it (rows skipped, columns cropped, decoding
//! stopped early). That must not change a single value of the tensor: checked against decoding
//! the whole image, for every shared photo and for re-encodings that cover the chroma
//! subsamplings, progressive scans, odd sizes and every EXIF orientation.

use imgclf::preprocess::{decode_rgb8, validate_keeping, Transform};
use imgclf_suite::{encode_cmyk_jpeg, encode_jpeg, image, reference, with_exif_orientation};

/// Every shared JPEG the reference results cover.
fn shared_jpegs() -> Vec<(String, Vec<u8>)> {
    let jpegs: Vec<(String, Vec<u8>)> = reference("efficientnet-lite0")
        .into_keys()
        .filter(|name| name.ends_with(".jpg"))
        .map(|name| (name.clone(), image(&name)))
        .collect();
    assert!(jpegs.len() >= 10, "the shared photos are there");
    jpegs
}

/// One photo, cut to an odd size and encoded with chroma `sampling` (pixels per Cb/Cr sample).
fn encoded(rgb: &image::RgbImage, sampling: (u8, u8), progressive: bool) -> Vec<u8> {
    let size = (rgb.width() as usize, rgb.height() as usize);
    encode_jpeg(rgb.as_raw(), size, 90.0, sampling, progressive)
}

fn assert_same_tensor(transform: &Transform, what: &str, bytes: &[u8]) {
    let whole = transform.tensor_from_rgb(&decode_rgb8(bytes, u64::MAX).expect("decodes"));
    let windowed = transform
        .tensor_from_bytes(bytes, u64::MAX)
        .expect("decodes");
    assert_eq!(whole.len(), windowed.len(), "{what}");
    let differing = whole.iter().zip(&windowed).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{what}: {differing} values differ");
}

#[test]
fn decoding_only_the_window_changes_no_value_on_the_shared_photos() {
    let transforms = [
        Transform::default(),
        Transform {
            resize: 320,
            crop: 300,
            ..Transform::default()
        },
    ];
    for (name, bytes) in shared_jpegs() {
        for transform in &transforms {
            assert_same_tensor(transform, &name, &bytes);
        }
    }
}

#[test]
fn decoding_only_the_window_changes_no_value_for_any_layout_or_orientation() {
    let photo = image::load_from_memory(&image("kde_coldripple_2560x1600.jpg"))
        .unwrap()
        .to_rgb8();
    let transform = Transform::default();
    for (width, height) in [(1001, 299), (333, 517), (257, 256)] {
        let cut = image::imageops::crop_imm(&photo, 777, 101, width, height).to_image();
        for sampling in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            for progressive in [false, true] {
                let jpeg = encoded(&cut, sampling, progressive);
                for orientation in 1..=8 {
                    let what = format!(
                        "{width}x{height}, sampling {sampling:?}, progressive {progressive}, \
                         orientation {orientation}"
                    );
                    assert_same_tensor(
                        &transform,
                        &what,
                        &with_exif_orientation(&jpeg, orientation),
                    );
                }
            }
        }
    }
}

/// Progressive JPEGs decoded again and again on one thread, alternating photos, their
/// coefficients in the thread's reused buffers: each decode equals what libjpeg alone gives
/// with its own memory (the `mozjpeg` crate); a buffer not cleared between images would carry
/// one photo's coefficients into the next one's first scans.
#[test]
fn a_progressive_jpeg_decodes_as_libjpeg_alone_decodes_it_image_after_image() {
    // As the binaries run: progressive coefficients in the thread's reused buffers.
    imgclf::tune_malloc();
    let photos = ["darknet_dog.jpg", "opencv_baboon.jpg"].map(|name| {
        let rgb = image::load_from_memory(&imgclf_suite::image(name)).unwrap();
        rgb.to_rgb8()
    });
    let mut jpegs = Vec::new();
    for sampling in [(2, 2), (1, 1)] {
        for photo in &photos {
            jpegs.push(encoded(photo, sampling, true));
        }
    }
    for round in 0..3 {
        for (i, jpeg) in jpegs.iter().enumerate() {
            let ours = decode_rgb8(jpeg, u64::MAX).expect("decodes");
            let mut libjpeg = mozjpeg::Decompress::new_mem(jpeg).unwrap().rgb().unwrap();
            let theirs: Vec<u8> = libjpeg.read_scanlines().unwrap();
            libjpeg.finish().unwrap();
            assert!(
                ours.as_raw() == &theirs,
                "round {round}, jpeg {i}: pixels differ"
            );
        }
    }
}

/// Every other format and pixel layout goes from bytes to tensor through the thread's reused
/// buffers (8-bit grey, grey + alpha, RGB, RGBA) or through the whole decode (16-bit): either
/// way the tensor is the one the `image` crate's own decoding to RGB gives, image after image.
/// So is the tensor of the crop that an upload's check keeps for the model.
#[test]
fn every_format_and_layout_gives_the_tensor_of_its_decoded_image() {
    use image::{DynamicImage, ImageFormat};
    let photo = image::load_from_memory(&imgclf_suite::image("darknet_dog.jpg")).unwrap();
    let photo = photo.crop_imm(31, 17, 401, 299);
    let layouts = [
        ("grey", DynamicImage::ImageLuma8(photo.to_luma8())),
        (
            "grey + alpha",
            DynamicImage::ImageLumaA8(photo.to_luma_alpha8()),
        ),
        ("rgb", DynamicImage::ImageRgb8(photo.to_rgb8())),
        ("rgba", DynamicImage::ImageRgba8(photo.to_rgba8())),
        ("rgb, 16-bit", DynamicImage::ImageRgb16(photo.to_rgb16())),
    ];
    let mut images = Vec::new();
    for (layout, image) in &layouts {
        for format in [ImageFormat::Png, ImageFormat::Tiff, ImageFormat::Bmp] {
            let mut bytes = std::io::Cursor::new(Vec::new());
            if image.write_to(&mut bytes, format).is_ok() {
                images.push((format!("{layout} {format:?}"), bytes.into_inner()));
            }
        }
    }
    let rgb = DynamicImage::ImageRgb8(photo.to_rgb8());
    for format in [ImageFormat::WebP, ImageFormat::Gif] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        rgb.write_to(&mut bytes, format).unwrap();
        images.push((format!("{format:?}"), bytes.into_inner()));
    }
    assert!(images.len() >= 12, "{} images encoded", images.len());
    let transform = Transform::default();
    for round in 0..2 {
        for (what, bytes) in &images {
            let rgb = image::load_from_memory(bytes).expect(what).to_rgb8();
            let whole = transform.tensor_from_rgb(&rgb);
            let direct = transform.tensor_from_bytes(bytes, u64::MAX).expect(what);
            assert!(whole == direct, "round {round}, {what}: tensors differ");
            let (_, crop) = validate_keeping(bytes, u64::MAX, &transform).expect(what);
            let crop = crop.unwrap_or_else(|| panic!("{what}: its check decodes it"));
            assert_eq!(crop.byte_len(), 224 * 224 * 3, "{what}");
            let kept = transform.tensor_from_crop(&crop);
            assert!(
                whole == kept,
                "round {round}, {what}: the kept crop's tensor differs"
            );
        }
    }
}

/// A file of `tests/data`.
fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    std::fs::read(path.join(name)).unwrap()
}

/// The RGB of a reference PNG of `tests/data`.
fn fixture_rgb(name: &str) -> image::RgbImage {
    decode_rgb8(&fixture(name), u64::MAX).unwrap()
}

/// TIFF layouts that the `image` crate alone refuses decode from their samples to what Pillow
/// shows for them (each a Pillow-made file of `darknet_dog.jpg` at 64x48 beside Pillow's
/// `convert("RGB")` of it as a PNG): 8-bit palette, plain and LZW, with and without alpha; grey
/// with alpha (Deflate); 32-bit integer and float grey, clamped and truncated as Pillow does;
/// YCbCr and CIELab within Pillow's rounding; a palette TIFF with an orientation tag turned as
/// the tag says; and some in planar, tiled and big-endian layouts. Then YCbCr with subsampled
/// chroma, which Pillow cannot write: libtiff-made files (`make_ycbcr_tiffs.py`) beside
/// libtiff's RGBA reading (which Pillow's is), exactly: every subsampling libtiff reads, in
/// strips and tiles cut at odd sizes, compressed or not, without the tag (2x2). Each gives the
/// same tensor
/// through every path (whole, windowed and the upload check's kept crop), stays under the
/// pixel limit, and a cut file fails its check exactly when it fails to decode.
#[test]
fn tiffs_the_image_crate_refuses_decode_to_their_colours() {
    use imgclf::preprocess::validate;
    let turned = image::imageops::rotate90(&fixture_rgb("palette8_rgb.png"));
    // File, the RGB it shows, the largest difference allowed to any sample.
    let cases = [
        ("palette8.tif", fixture_rgb("palette8_rgb.png"), 0),
        ("palette8_lzw.tif", fixture_rgb("palette8_rgb.png"), 0),
        (
            "palette8_alpha.tif",
            fixture_rgb("palette8_alpha_rgb.png"),
            0,
        ),
        ("greyalpha8.tif", fixture_rgb("greyalpha8_rgb.png"), 0),
        ("int32.tif", fixture_rgb("int32_rgb.png"), 0),
        ("float32.tif", fixture_rgb("float32_rgb.png"), 0),
        ("ycbcr8.tif", fixture_rgb("ycbcr8_rgb.png"), 1),
        ("lab8.tif", fixture_rgb("lab8_rgb.png"), 5),
        ("palette8_orient6.tif", turned, 0),
        // The same images in other layouts: planar, tiled, big-endian, with a predictor.
        (
            "palette8_alpha_planar.tif",
            fixture_rgb("palette8_alpha_rgb.png"),
            0,
        ),
        (
            "greyalpha8_tiled_be.tif",
            fixture_rgb("greyalpha8_rgb.png"),
            0,
        ),
        ("lab8_planar_be.tif", fixture_rgb("lab8_rgb.png"), 5),
        ("ycbcr22.tif", fixture_rgb("ycbcr22_rgb.png"), 0),
        ("ycbcr21_be.tif", fixture_rgb("ycbcr21_be_rgb.png"), 0),
        ("ycbcr41.tif", fixture_rgb("ycbcr41_rgb.png"), 0),
        ("ycbcr42_tiled.tif", fixture_rgb("ycbcr42_tiled_rgb.png"), 0),
        (
            "ycbcr44_tiled_be.tif",
            fixture_rgb("ycbcr44_tiled_be_rgb.png"),
            0,
        ),
        (
            "ycbcr_untagged.tif",
            fixture_rgb("ycbcr_untagged_rgb.png"),
            0,
        ),
    ];
    let transform = Transform::default();
    for (name, expected, tolerance) in cases {
        let bytes = fixture(name);
        assert!(
            image::load_from_memory(&bytes).is_err(),
            "{name}: `image` decodes it now"
        );
        let decoded = decode_rgb8(&bytes, u64::MAX).expect(name);
        assert_eq!(decoded.dimensions(), expected.dimensions(), "{name}");
        let largest = decoded
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(
            largest <= Some(tolerance),
            "{name}: a sample is {largest:?} off"
        );
        let tensor = transform.tensor_from_rgb(&decoded);
        let direct = transform.tensor_from_bytes(&bytes, u64::MAX).expect(name);
        assert!(direct == tensor, "{name}: tensors differ");
        let (info, crop) = validate_keeping(&bytes, u64::MAX, &transform).expect(name);
        // As stored: the orientation tag turns the image after the check.
        let (width, height) = expected.dimensions();
        let stored = (info.width, info.height);
        assert!(
            [(width, height), (height, width)].contains(&stored),
            "{name}"
        );
        let kept = transform.tensor_from_crop(&crop.expect("its check decodes it"));
        assert!(kept == tensor, "{name}: the kept crop's tensor differs");
        assert!(
            decode_rgb8(&bytes, u64::from(width * height) - 1).is_err(),
            "{name}: over the pixel limit"
        );
        for len in (0..bytes.len()).step_by(61) {
            let cut = &bytes[..len];
            let decoded = decode_rgb8(cut, u64::MAX);
            assert_eq!(
                validate(cut, u64::MAX).is_ok(),
                decoded.is_ok(),
                "{name} cut at {len}"
            );
        }
    }
}

/// Arithmetic-coded JPEGs (sequential, progressive with restart intervals, and grey) decode
/// to the pixels and tensor of their Huffman-coded twins: the same image and settings through
/// libjpeg-turbo's `cjpeg -quality 90`, with and without `-arithmetic` (`-progressive
/// -restart 2` for the second pair). Entropy coding is lossless, and the twins go through
/// imgclf's own entropy decoders, the arithmetic files through libjpeg's.
#[test]
fn arithmetic_coded_jpegs_decode_as_their_huffman_twins() {
    let transform = Transform::default();
    for kind in ["", "_progressive", "_grey"] {
        let arithmetic = fixture(&format!("arithmetic{kind}.jpg"));
        let huffman = fixture(&format!("huffman{kind}.jpg"));
        assert!(
            imgclf::preprocess::validate(&arithmetic, u64::MAX).is_ok(),
            "arithmetic{kind}: the upload check refuses it"
        );
        let expected = decode_rgb8(&huffman, u64::MAX).unwrap();
        assert!(
            decode_rgb8(&arithmetic, u64::MAX).expect(kind) == expected,
            "arithmetic{kind}: pixels differ"
        );
        let tensor = transform.tensor_from_bytes(&arithmetic, u64::MAX).unwrap();
        assert!(
            tensor == transform.tensor_from_rgb(&expected),
            "arithmetic{kind}: tensors differ"
        );
    }
}

/// CMYK JPEGs (sequential, progressive and arithmetic-coded) and a YCCK one with halved
/// chroma, as Photoshop writes them, decode to the RGB Pillow shows for them, exactly: libjpeg
/// gives the inks, and their conversion is Pillow's (`tests/data/make_cmyk_jpegs.py` made
/// the files). Wider than tall, so the model's crop leaves columns out.
#[test]
fn cmyk_jpegs_decode_to_pillows_colours() {
    use imgclf::preprocess::validate;
    let transform = Transform::default();
    for (name, expected) in [
        ("cmyk.jpg", fixture_rgb("cmyk_rgb.png")),
        ("cmyk_progressive.jpg", fixture_rgb("cmyk_rgb.png")),
        ("cmyk_arithmetic.jpg", fixture_rgb("cmyk_rgb.png")),
        ("ycck.jpg", fixture_rgb("ycck_rgb.png")),
    ] {
        let bytes = fixture(name);
        assert_eq!(validate(&bytes, u64::MAX).expect(name).width, 128, "{name}");
        let decoded = decode_rgb8(&bytes, u64::MAX).expect(name);
        assert!(decoded == expected, "{name}: pixels differ from Pillow's");
        let tensor = transform.tensor_from_bytes(&bytes, u64::MAX).expect(name);
        assert!(
            tensor == transform.tensor_from_rgb(&expected),
            "{name}: tensors differ"
        );
        // Turned by its EXIF orientation, as any JPEG.
        let turned_bytes = with_exif_orientation(&bytes, 6);
        let turned = image::imageops::rotate90(&expected);
        assert!(
            decode_rgb8(&turned_bytes, u64::MAX).expect(name) == turned,
            "{name}: turned"
        );
        let tensor = transform.tensor_from_bytes(&turned_bytes, u64::MAX);
        assert!(
            tensor.expect(name) == transform.tensor_from_rgb(&turned),
            "{name}: turned tensors differ"
        );
        assert!(
            decode_rgb8(&bytes, 128 * 48 - 1).is_err(),
            "{name}: over the limit"
        );
    }
}

/// Subsampled YCbCr TIFFs in layouts that libtiff (and so Pillow) cannot read either are
/// refused, not decoded to wrong colours: in planes, blocks of three pixels, and strips that cut
/// blocks in half.
#[test]
fn subsampled_ycbcr_tiffs_libtiff_cannot_read_are_refused() {
    let bytes = fixture("ycbcr22.tif");
    assert!(decode_rgb8(&bytes, u64::MAX).is_ok());
    let refused = [
        ("planar", 284, &[2][..]),
        ("blocks of 3x3", 530, &[3, 3]),
        ("7 rows per strip", 278, &[7]),
    ];
    for (name, tag, values) in refused {
        let bytes = with_shorts(&bytes, tag, values);
        assert!(decode_rgb8(&bytes, u64::MAX).is_err(), "{name}");
        assert!(
            imgclf::preprocess::validate(&bytes, u64::MAX).is_err(),
            "{name}"
        );
    }
}

/// A little-endian TIFF with the SHORTs that the entry of `tag` holds in place set to `values`.
fn with_shorts(bytes: &[u8], tag: u16, values: &[u16]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let directory = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let entries = usize::from(u16::from_le_bytes([bytes[directory], bytes[directory + 1]]));
    let at = (0..entries)
        .map(|i| directory + 2 + 12 * i)
        .find(|&at| bytes[at..at + 2] == tag.to_le_bytes())
        .expect("the file has the tag");
    for (i, value) in values.iter().enumerate() {
        bytes[at + 8 + 2 * i..][..2].copy_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// An image alone on the machine is decoded on two threads (a progressive JPEG resized on the
/// second while the first decodes it): the same tensor as on one thread, for large photos of
/// every chroma subsampling, progressive or not, every EXIF orientation, and grey; a decode
/// that fails fails the same way, and the second thread goes on with the next image.
#[test]
fn decoding_on_two_threads_changes_no_value_and_no_error() {
    use imgclf::preprocess::HelperThread;
    let photo = image::load_from_memory(&image("kde_coldripple_2560x1600.jpg")).unwrap();
    let rgb = photo.to_rgb8();
    let mut jpegs = Vec::new();
    for sampling in [(1, 1), (2, 1), (1, 2), (2, 2)] {
        for progressive in [false, true] {
            let what = format!("sampling {sampling:?}, progressive {progressive}");
            jpegs.push((what, encoded(&rgb, sampling, progressive)));
        }
    }
    for progressive in [false, true] {
        let jpeg = encoded(&rgb, (2, 2), progressive);
        for orientation in 2..=8 {
            let what = format!("progressive {progressive}, orientation {orientation}");
            jpegs.push((what, with_exif_orientation(&jpeg, orientation)));
        }
    }
    let mut grey = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut grey, 90)
        .encode_image(&photo.to_luma8())
        .unwrap();
    jpegs.push(("grey".into(), grey));
    for progressive in [false, true] {
        let cmyk = encode_cmyk_jpeg(rgb.as_raw(), (2560, 1600), progressive);
        jpegs.push((format!("CMYK, progressive {progressive}"), cmyk));
    }
    let transform = Transform::default();
    let thread = HelperThread::spawn().unwrap();
    let two = |bytes: &[u8]| transform.tensor_from_bytes_on_two_threads(bytes, u64::MAX, &thread);
    for (what, jpeg) in &jpegs {
        let one = transform.tensor_from_bytes(jpeg, u64::MAX).expect(what);
        assert!(two(jpeg).expect(what) == one, "{what}: tensors differ");
        if what.starts_with("CMYK") {
            let decoded = decode_rgb8(jpeg, u64::MAX).unwrap();
            assert!(
                transform.tensor_from_rgb(&decoded) == one,
                "{what}: the window's tensor differs from the whole image's"
            );
        }
    }
    // The last scan names a Huffman table that was never defined: libjpeg stops once decoding
    // has started, before the first row, on both threads.
    for (what, jpeg) in &jpegs[..2] {
        let mut broken = jpeg.clone();
        let scan = broken.windows(2).rposition(|m| m == [0xFF, 0xDA]).unwrap();
        broken[scan + 6] = 0x33; // first component's DC and AC tables: 3, undefined
        let one = transform.tensor_from_bytes(&broken, u64::MAX).unwrap_err();
        assert!(
            matches!(&one, imgclf::ImageError::Undecodable(m) if m.contains("Huffman")),
            "{what}: {one}"
        );
        assert_eq!(two(&broken).unwrap_err(), one, "{what}");
    }
    let (what, jpeg) = &jpegs[0];
    assert!(two(jpeg).expect(what) == transform.tensor_from_bytes(jpeg, u64::MAX).unwrap());
}
