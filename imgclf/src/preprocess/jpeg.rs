//! JPEG decoding with libjpeg-turbo's code (through mozjpeg, built from source, no system
//! library): the same integer IDCT, fancy upsampling and colour conversion as Pillow, so decoded
//! pixels match the reference implementation's exactly. Other decoders differ by a few levels.

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};

use super::ImageError;

/// 8-bit RGB of a JPEG; `None` for colour spaces libjpeg does not turn into RGB (CMYK, YCCK),
/// which the caller decodes another way.
pub(super) fn decode_rgb8(bytes: &[u8]) -> Result<Option<RgbImage>, ImageError> {
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
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".into());
            Err(ImageError::Undecodable(message))
        }
    }
}
