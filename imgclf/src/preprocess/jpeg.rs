//! JPEG decoding with libjpeg-turbo's code (through mozjpeg, built from source, no system
//! library): the same integer IDCT, fancy upsampling and colour conversion as Pillow, so decoded
//! pixels match the reference implementation's exactly. Other decoders differ by a few levels.

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};

use super::ImageError;

/// Checks a JPEG as far as libjpeg can without decoding pixels: markers, tables, frame and
/// scan headers, and that the data is not cut short. `Ok(false)` for colour spaces libjpeg does
/// not turn into RGB, which the caller checks another way.
pub(super) fn check(bytes: &[u8]) -> Result<bool, ImageError> {
    if !ends_its_scan(bytes) {
        return Err(truncated());
    }
    // libjpeg reports fatal errors by unwinding out of the C code.
    let checked = std::panic::catch_unwind(|| -> std::io::Result<bool> {
        let decompress = Decompress::new_mem(bytes)?;
        if matches!(
            decompress.color_space(),
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK
        ) {
            return Ok(false);
        }
        decompress.rgb()?; // jpeg_start_decompress: the first scan's tables must be there
        Ok(true)
    });
    match checked {
        Ok(Ok(whole)) => Ok(whole),
        Ok(Err(e)) => Err(ImageError::Undecodable(e.to_string())),
        Err(panic) => Err(ImageError::Undecodable(panic_message(panic))),
    }
}

fn truncated() -> ImageError {
    ImageError::Undecodable("truncated JPEG: the image data has no end-of-image marker".into())
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "libjpeg failed".into())
}

/// 8-bit RGB of a JPEG; `None` for colour spaces libjpeg does not turn into RGB (CMYK, YCCK),
/// which the caller decodes another way.
pub(super) fn decode_rgb8(bytes: &[u8]) -> Result<Option<RgbImage>, ImageError> {
    // libjpeg only warns about missing data and fills the rest with grey; refuse instead, as
    // Pillow does.
    if !ends_its_scan(bytes) {
        return Err(truncated());
    }
    // libjpeg reports fatal errors by unwinding out of the C code.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<RgbImage>> {
        let decompress = Decompress::new_mem(bytes)?;
        if matches!(
            decompress.color_space(),
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK
        ) {
            return Ok(None);
        }
        let (width, height) = decompress.size();
        let mut started = decompress.rgb()?;
        let pixels = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(RgbImage::from_raw(width as u32, height as u32, pixels))
    });
    match decoded {
        Ok(Ok(Some(rgb))) => Ok(Some(rgb)),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(ImageError::Undecodable(e.to_string())),
        Err(panic) => Err(ImageError::Undecodable(panic_message(panic))),
    }
}

/// Whether an end-of-image marker (FF D9) follows the last start-of-scan (FF DA). An EXIF
/// thumbnail brings its own markers, but they come before the main image's scan.
fn ends_its_scan(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(scan), Some(end)) => end > scan,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::ends_its_scan;

    #[test]
    fn a_jpeg_cut_short_is_detected() {
        let whole = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3, 0xFF, 0xD9];
        assert!(ends_its_scan(&whole));
        assert!(!ends_its_scan(&whole[..6]));
        // A thumbnail's end marker before the main scan does not count.
        let thumb = [0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2];
        assert!(!ends_its_scan(&thumb));
    }
}
