//! Decoding and preprocessing: bytes in, a normalised NCHW tensor out.
//!
//! The transform is torchvision's ImageNet evaluation transform (what the reference results use):
//! RGB, antialiased bilinear resize of the shorter side (Pillow's convolution, reproduced
//! to the bit in `resample.rs`), centre crop, scale to [0, 1], normalise per channel.
//! Everything here is pure and synchronous; callers run it on a bounded blocking pool.

use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use budget::{Budget, BudgetReader};
use helper_thread::{SPLIT_PIXELS, UPPER_PERCENT};
use resample::Plan;
use scratch::Scratch;

mod baseline;
mod budget;
mod helper_thread;
mod huffman;
mod jpeg;
mod progressive;
mod resample;
mod scratch;
mod tiff_samples;

pub use budget::{DECODE_CPU_BUDGET, MAX_ALLOC_PER_PIXEL, MAX_JPEG_SCANS};
pub use helper_thread::HelperThread;
pub(crate) use jpeg::REUSE_COEFFICIENT_MEMORY;

/// Formats accepted at upload; everything else is refused before it is stored.
pub const ACCEPTED_FORMATS: [ImageFormat; 6] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

/// Default cap on decoded pixels: stops decompression bombs before any pixel is allocated.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

/// Why bytes are not an image this service reads. The messages are meant for the client.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// No bytes at all.
    #[error("the upload is empty")]
    Empty,
    /// Magic bytes of no accepted format.
    #[error("unsupported image format: accepted are JPEG, PNG, WebP, GIF, BMP and TIFF")]
    UnsupportedFormat,
    /// An accepted format, but broken (the decoder's words).
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
    /// Small on the wire, expensive to decode: too many scans, a frame beyond the pixel cap,
    /// or more CPU time than a decode may take.
    #[error("the image costs too much to decode: {0}")]
    TooCostly(String),
    /// More pixels than the limit, read from the header before any is decoded.
    #[error("the image is {width}x{height} pixels, more than the limit of {max} pixels")]
    TooManyPixels {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The limit.
        max: u64,
    },
}

/// What a header read tells about an upload, without decoding the pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format its magic bytes name.
    pub format: ImageFormat,
    /// Width in pixels, as stored.
    pub width: u32,
    /// Height in pixels, as stored.
    pub height: u32,
}

impl ImageInfo {
    /// The format's MIME type.
    pub fn mime_type(&self) -> &'static str {
        self.format.to_mime_type()
    }

    /// The format's usual file extension.
    pub fn extension(&self) -> &'static str {
        self.format
            .extensions_str()
            .first()
            .copied()
            .unwrap_or("bin")
    }
}

/// A rectangle of pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rect {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

impl Rect {
    /// The rectangle of the stored image that `orientation` turns into `self`, for a stored
    /// image of `width` x `height` (before orientation).
    fn stored(self, orientation: Orientation, width: usize, height: usize) -> Rect {
        use Orientation::*;
        let (x0, y0) = (self.left, self.top);
        let (x1, y1) = (x0 + self.width - 1, y0 + self.height - 1);
        // Where a displayed pixel (x, y) is stored.
        let stored = |x: usize, y: usize| match orientation {
            NoTransforms => (x, y),
            Rotate90 => (y, height - 1 - x),
            Rotate180 => (width - 1 - x, height - 1 - y),
            Rotate270 => (width - 1 - y, x),
            FlipHorizontal => (width - 1 - x, y),
            FlipVertical => (x, height - 1 - y),
            Rotate90FlipH => (y, x),
            Rotate270FlipH => (width - 1 - y, height - 1 - x),
        };
        let (a, b) = (stored(x0, y0), stored(x1, y1));
        Rect {
            left: a.0.min(b.0),
            top: a.1.min(b.1),
            width: a.0.abs_diff(b.0) + 1,
            height: a.1.abs_diff(b.1) + 1,
        }
    }
}

/// Whether `orientation` swaps width and height.
fn turns(orientation: Orientation) -> bool {
    use Orientation::*;
    matches!(
        orientation,
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH
    )
}

/// The `rows` of `region` (packed RGB8 rows of the stored `rect`) as `orientation` shows it,
/// top to bottom: the pixels [`Rect::stored`] maps, without building the turned image.
fn shown_rows(
    region: &[u8],
    rect: Rect,
    orientation: Orientation,
    rows: std::ops::Range<usize>,
    mut each_row: impl FnMut(&[u8]),
) {
    use Orientation::*;
    let (w, h) = (rect.width as isize, rect.height as isize);
    // Shown pixel (x, y) is stored pixel `start + x * across + y * down`.
    let (start, across, down) = match orientation {
        NoTransforms => (0, 1, w),
        Rotate90 => ((h - 1) * w, -w, 1),
        Rotate180 => (h * w - 1, -1, -w),
        Rotate270 => (w - 1, w, -1),
        FlipHorizontal => (w - 1, -1, w),
        FlipVertical => ((h - 1) * w, 1, -w),
        Rotate90FlipH => (0, w, 1),
        Rotate270FlipH => (h * w - 1, -w, -1),
    };
    let shown_w = if turns(orientation) { h } else { w };
    let mut row = Scratch::zeroed(shown_w as usize * 3);
    for y in rows {
        let mut at = start + y as isize * down;
        for pixel in row.chunks_exact_mut(3) {
            pixel.copy_from_slice(&region[at as usize * 3..][..3]);
            at += across;
        }
        each_row(&row);
    }
}

/// Checks the magic bytes and reads the header: cheap enough for every upload.
pub fn inspect(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, ImageError> {
    inspect_within(bytes, max_pixels, &Budget::start())
}

fn inspect_within(bytes: &[u8], max_pixels: u64, budget: &Budget) -> Result<ImageInfo, ImageError> {
    let format = format_of(bytes)?;
    let (width, height) = match format {
        // libjpeg reads the header where it lies; `image`'s decoder would copy the whole file.
        ImageFormat::Jpeg => jpeg::size(bytes, budget)?,
        _ => open_as(format, bytes, max_pixels, budget)?.dimensions(),
    };
    check_pixels(width, height, max_pixels)?;
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// [`inspect_within`], and whether the headers settle that the upload is whole: a JPEG,
/// checked by libjpeg in one read of its header.
fn inspect_settling(
    bytes: &[u8],
    max_pixels: u64,
    budget: &Budget,
) -> Result<(ImageInfo, bool), ImageError> {
    let format = format_of(bytes)?;
    if format != ImageFormat::Jpeg {
        return Ok((inspect_within(bytes, max_pixels, budget)?, false));
    }
    let (width, height) = jpeg::check(bytes, max_pixels, budget)?;
    let info = ImageInfo {
        format,
        width,
        height,
    };
    Ok((info, true))
}

/// Whether an upload is a whole image worth storing. JPEGs get libjpeg's header and
/// start-of-scan checks plus the end-of-image check, which find what a full decode would (libjpeg
/// only warns about damaged entropy-coded data) at a fraction of its cost, so the pixels are
/// decoded once, by the worker. PNGs are read row by row as decoding reads them (every chunk's
/// CRC, the inflated data, each row's filter), without building the image. Other formats are
/// decoded fully.
pub fn validate(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, ImageError> {
    check(bytes, max_pixels, false).map(|(info, _)| info)
}

/// [`validate`], keeping the image resized and cropped for `transform` where checking it means
/// decoding it (every format but JPEG, whose check reads only its headers): a caller
/// that classifies it next in the same process need not decode it again.
pub fn validate_keeping(
    bytes: &[u8],
    max_pixels: u64,
    transform: &Transform,
) -> Result<(ImageInfo, Option<Crop>), ImageError> {
    let (info, rgb) = check(bytes, max_pixels, true)?;
    Ok((info, rgb.map(|rgb| transform.crop(&rgb))))
}

/// An image resized and cropped for a model's input, only its normalisation left to do: a
/// fraction of the decoded image's memory (150 KB for a 224-pixel crop), so more of them can
/// wait for the model.
#[derive(Debug, Clone)]
pub struct Crop {
    /// Packed RGB8 rows.
    pixels: Vec<u8>,
    width: usize,
}

impl Crop {
    /// The memory its pixels take.
    pub fn byte_len(&self) -> usize {
        self.pixels.len()
    }
}

/// The part of [`validate`] that decodes nothing, cheap enough to run where the upload
/// arrived: `Some` when it settles that the upload is whole (a JPEG, whose headers are all
/// its check reads), `None` when only [`validate`] can tell.
pub fn validate_headers(bytes: &[u8], max_pixels: u64) -> Result<Option<ImageInfo>, ImageError> {
    let (info, settled) = inspect_settling(bytes, max_pixels, &Budget::start())?;
    Ok(settled.then_some(info))
}

/// A PNG not to be kept is checked without building its RGB image.
fn check(
    bytes: &[u8],
    max_pixels: u64,
    keep: bool,
) -> Result<(ImageInfo, Option<RgbImage>), ImageError> {
    let budget = Budget::start();
    let (info, settled) = inspect_settling(bytes, max_pixels, &budget)?;
    if settled {
        return Ok((info, None));
    }
    match info.format {
        ImageFormat::Png if !keep => {
            return check_png(bytes, max_pixels, &budget).map(|()| (info, None))
        }
        _ => {}
    }
    let rgb = decode_rgb8_within(bytes, max_pixels, &budget)?;
    Ok((info, keep.then_some(rgb)))
}

/// Reads every row of a PNG's image with the png crate, set up as `image` sets it up to decode
/// (the same limits, chunks and transformations), so it fails exactly where decoding would;
/// the image-sized buffer and the conversion to RGB that a decode adds are left to the worker.
fn check_png(bytes: &[u8], max_pixels: u64, budget: &Budget) -> Result<(), ImageError> {
    let broken = |e: png::DecodingError| match e {
        _ if budget.exceeded() => budget.error(),
        png::DecodingError::LimitsExceeded => {
            ImageError::TooCostly("decoding needs more memory than the pixel limit allows".into())
        }
        other => ImageError::Undecodable(other.to_string()),
    };
    let limits = png::Limits {
        bytes: usize::try_from(max_alloc(ImageFormat::Png, max_pixels)).unwrap_or(usize::MAX),
    };
    let mut decoder = png::Decoder::new_with_limits(BudgetReader::new(bytes, budget), limits);
    decoder.set_ignore_text_chunk(false);
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(broken)?;
    while reader.next_row().map_err(broken)?.is_some() {}
    Ok(())
}

/// Fully decodes an image, applies its EXIF orientation and returns 8-bit RGB
/// (alpha dropped, grey replicated, 16-bit scaled down, first frame of an animation), within
/// [`DECODE_CPU_BUDGET`].
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, ImageError> {
    decode_rgb8_within(bytes, max_pixels, &Budget::start())
}

fn decode_rgb8_within(
    bytes: &[u8],
    max_pixels: u64,
    budget: &Budget,
) -> Result<image::RgbImage, ImageError> {
    let format = format_of(bytes)?;
    // A JPEG's header and pixels come from libjpeg, which also reads what the `image` crate's
    // decoder refuses (arithmetic coding) and decodes CMYK as Pillow does.
    let (mut image, orientation) = match format {
        ImageFormat::Jpeg => jpeg::with_decoder(bytes, budget, |decoder| {
            let header = decoder.header();
            check_pixels(header.width, header.height, max_pixels)?;
            let whole = Rect {
                left: 0,
                top: 0,
                width: header.width as usize,
                height: header.height as usize,
            };
            let rgb = rgb_image(whole, decoder.read_rect_pixels(whole));
            Ok::<_, ImageError>((DynamicImage::ImageRgb8(rgb), Some(header.orientation)))
        })??,
        _ => {
            let mut decoder = open_as(format, bytes, max_pixels, budget)?;
            let (width, height) = decoder.dimensions();
            check_pixels(width, height, max_pixels)?;
            let orientation = decoder.orientation().ok();
            let image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(e, budget))?;
            (image, orientation)
        }
    };
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        // The common 8-bit layouts directly: `to_rgb8` goes through a colour-space cast
        // that rounds every sample as a float, several times slower, to the same bytes.
        DynamicImage::ImageLuma8(grey) => to_rgb(grey.dimensions(), grey.as_raw(), 1),
        DynamicImage::ImageLumaA8(grey) => to_rgb(grey.dimensions(), grey.as_raw(), 2),
        DynamicImage::ImageRgba8(rgba) => to_rgb(rgba.dimensions(), rgba.as_raw(), 4),
        other => other.to_rgb8(),
    })
}

/// 8-bit grey, grey + alpha or RGBA (`channels` of 1, 2 or 4) to RGB: grey replicated, alpha
/// dropped, as Pillow's `convert("RGB")` does.
fn to_rgb((width, height): (u32, u32), raw: &[u8], channels: usize) -> RgbImage {
    let mut pixels = vec![0; raw.len() / channels * 3];
    rgb_into(raw, channels, &mut pixels);
    RgbImage::from_raw(width, height, pixels).expect("three bytes per pixel")
}

/// [`to_rgb`] into `rgb`, which holds three bytes for each pixel of `raw`.
fn rgb_into(raw: &[u8], channels: usize, rgb: &mut [u8]) {
    for (px, out) in raw.chunks_exact(channels).zip(rgb.chunks_exact_mut(3)) {
        match channels {
            1 | 2 => out.fill(px[0]),
            _ => out.copy_from_slice(&px[..3]),
        }
    }
}

fn rgb_image(rect: Rect, pixels: Vec<u8>) -> RgbImage {
    RgbImage::from_raw(rect.width as u32, rect.height as u32, pixels)
        .expect("the decoder returns the whole rectangle")
}

/// A decoder of `bytes` that allocates no more than the pixel cap needs (a GIF frame larger
/// than its screen, a TIFF strip table, a PNG chunk: each asks the allocation limit) and stops
/// reading once `budget` is spent.
fn open<'a>(
    bytes: &'a [u8],
    max_pixels: u64,
    budget: &'a Budget,
) -> Result<(ImageFormat, Box<dyn ImageDecoder + 'a>), ImageError> {
    let format = format_of(bytes)?;
    Ok((format, open_as(format, bytes, max_pixels, budget)?))
}

/// The format its magic bytes name, if it is one accepted.
fn format_of(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnsupportedFormat)?;
    if !ACCEPTED_FORMATS.contains(&format) {
        return Err(ImageError::UnsupportedFormat);
    }
    Ok(format)
}

/// [`open`] of bytes known to be in `format`.
fn open_as<'a>(
    format: ImageFormat,
    bytes: &'a [u8],
    max_pixels: u64,
    budget: &'a Budget,
) -> Result<Box<dyn ImageDecoder + 'a>, ImageError> {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_alloc(format, max_pixels));
    let mut reader = ImageReader::with_format(BudgetReader::new(bytes, budget), format);
    reader.limits(limits.clone());
    match reader.into_decoder() {
        Ok(decoder) => Ok(Box::new(decoder)),
        Err(error) if format == ImageFormat::Tiff => {
            match tiff_samples::open(bytes, &limits, budget) {
                Some(decoder) => Ok(Box::new(decoder)),
                None => Err(decode_error(error, budget)),
            }
        }
        Err(error) => Err(decode_error(error, budget)),
    }
}

/// Bytes a decoder of `format` may allocate under a cap of `max_pixels`. GIF decodes to RGBA8
/// only, so its frames get no more than 4 bytes per pixel of the cap.
fn max_alloc(format: ImageFormat, max_pixels: u64) -> u64 {
    let per_pixel = match format {
        ImageFormat::Gif => 4,
        _ => MAX_ALLOC_PER_PIXEL,
    };
    max_pixels.saturating_mul(per_pixel).max(1 << 20)
}

/// A decoder's error, told apart: over budget, over the allocation limit, or broken.
fn decode_error(error: image::ImageError, budget: &Budget) -> ImageError {
    match error {
        _ if budget.exceeded() => budget.error(),
        image::ImageError::Limits(limit) => ImageError::TooCostly(format!(
            "decoding needs more memory than the pixel limit allows ({limit})"
        )),
        other => undecodable(other),
    }
}

fn check_pixels(width: u32, height: u32, max: u64) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Undecodable(format!(
            "the image has no pixels ({width}x{height})"
        )));
    }
    if u64::from(width) * u64::from(height) > max {
        return Err(ImageError::TooManyPixels { width, height, max });
    }
    Ok(())
}

fn undecodable(error: image::ImageError) -> ImageError {
    ImageError::Undecodable(error.to_string())
}

/// A model's input transform, read from its manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transform {
    /// The shorter side is resized to this many pixels.
    pub resize: u32,
    /// Then a centred square of this size is cut out.
    pub crop: u32,
    /// Per-channel mean subtracted (RGB, on values scaled to 0..1).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Default for Transform {
    /// torchvision's ImageNet evaluation transform.
    fn default() -> Self {
        Self {
            resize: 256,
            crop: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl Transform {
    /// Number of f32 values in one image's tensor (3 x crop x crop).
    pub fn tensor_len(&self) -> usize {
        3 * self.crop as usize * self.crop as usize
    }

    /// Decodes and transforms one image into a CHW tensor. A JPEG is decoded only where the
    /// resize reads it; the tensor is the same as from the whole image.
    pub fn tensor_from_bytes(&self, bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>, ImageError> {
        let mut tensor = Vec::new();
        self.append_tensor_from_bytes(bytes, max_pixels, None, &mut tensor)?;
        Ok(tensor)
    }

    /// [`Self::tensor_from_bytes`], the same tensor, with a JPEG of at least a quarter of a
    /// megapixel decoded on this thread and `helper`'s at once (see [`HelperThread`]): for an
    /// image that has the machine to itself.
    pub fn tensor_from_bytes_on_two_threads(
        &self,
        bytes: &[u8],
        max_pixels: u64,
        helper: &HelperThread,
    ) -> Result<Vec<f32>, ImageError> {
        let mut tensor = Vec::new();
        self.append_tensor_from_bytes(bytes, max_pixels, Some(helper), &mut tensor)?;
        Ok(tensor)
    }

    /// [`Self::tensor_from_bytes`] (on two threads with `helper`) written at the end of `out`,
    /// a batch being put together, so the tensor is not made apart and copied in. The tensor
    /// is written last, once the image is decoded: on an error `out` is as it was.
    pub(crate) fn append_tensor_from_bytes(
        &self,
        bytes: &[u8],
        max_pixels: u64,
        helper: Option<&HelperThread>,
        out: &mut Vec<f32>,
    ) -> Result<(), ImageError> {
        let budget = Budget::start();
        if image::guess_format(bytes).ok() == Some(ImageFormat::Jpeg) {
            // One libjpeg decoder reads the header and then only the rows the resize needs.
            return jpeg::with_decoder(bytes, &budget, |decoder| {
                let header = decoder.header();
                let (width, height, orientation) =
                    (header.width, header.height, header.orientation);
                check_pixels(width, height, max_pixels)?;
                let (shown_w, shown_h) = if turns(orientation) {
                    (height, width)
                } else {
                    (width, height)
                };
                let plan = self.plan(shown_w, shown_h);
                let stored = plan
                    .source()
                    .stored(orientation, width as usize, height as usize);
                // Two parts at once where it pays, but not a progressive JPEG: each thread
                // would decode all its scans first. Its rows are resized on the helper instead.
                let helper = helper.filter(|_| stored.width * stored.height >= SPLIT_PIXELS);
                let parts = helper
                    .filter(|_| !header.multiple_scans)
                    .map(|helper| (helper, stored.height * UPPER_PERCENT / 100));
                let upper = |split| Rect {
                    height: split,
                    ..stored
                };
                // The lower rows, by a decoder of its own on the helper's thread.
                let lower = |split| {
                    let rect = Rect {
                        top: stored.top + split,
                        height: stored.height - split,
                        ..stored
                    };
                    move |push: &mut dyn FnMut(&[u8])| {
                        jpeg::with_decoder(bytes, &Budget::start(), |lower| {
                            lower.read_rect(rect, push)
                        })
                    }
                };
                let upright = orientation == Orientation::NoTransforms;
                let window = match (parts, helper) {
                    (Some((helper, split)), _) if upright => plan.run_in_two(
                        helper,
                        split,
                        |push| {
                            decoder.read_rect(upper(split), push);
                            Ok(())
                        },
                        lower(split),
                    )?,
                    // A progressive JPEG's rows resized on the helper as they are decoded.
                    (None, Some(helper)) if upright => plan.run_pipelined(helper, |push| {
                        decoder.read_rect(stored, push);
                        Ok::<_, ImageError>(())
                    })?,
                    // Rows go through the horizontal pass as they are decoded.
                    (None, None) if upright => {
                        let mut resize = plan.start();
                        decoder.read_rect(stored, |row| resize.push_row(row));
                        resize.finish()
                    }
                    _ => {
                        // The rows as stored, in a reused buffer; then each row as shown.
                        let row_len = stored.width * 3;
                        let mut region = Scratch::zeroed(row_len * stored.height);
                        match parts {
                            Some((helper, split)) => helper.fill_in_two(
                                &mut region,
                                row_len,
                                split,
                                &|row, out| out.copy_from_slice(row),
                                |push| {
                                    decoder.read_rect(upper(split), push);
                                    Ok(())
                                },
                                lower(split),
                            )?,
                            None => {
                                let mut rows = region.chunks_exact_mut(row_len);
                                decoder.read_rect(stored, |row| {
                                    rows.next().expect("a row").copy_from_slice(row)
                                });
                            }
                        }
                        // Shown rows read across every stored row: two parts once all are in.
                        let shown = |rows| {
                            let region = &region;
                            move |push: &mut dyn FnMut(&[u8])| {
                                shown_rows(region, stored, orientation, rows, push);
                                Ok::<_, ImageError>(())
                            }
                        };
                        let height = plan.source().height;
                        match helper {
                            Some(helper) => plan.run_in_two(
                                helper,
                                height / 2,
                                shown(0..height / 2),
                                shown(height / 2..height),
                            )?,
                            None => {
                                let mut resize = plan.start();
                                shown(0..height)(&mut |row| resize.push_row(row))?;
                                resize.finish()
                            }
                        }
                    }
                };
                self.normalise(plan.window().width, &window, out);
                Ok(())
            })?;
        }
        self.tensor_from_decoded(bytes, max_pixels, &budget, out)
    }

    /// Any format but JPEG: 8-bit grey, grey + alpha, RGB or RGBA shown as stored (the
    /// common layouts) is decoded into this thread's reused buffers, anything else through
    /// [`decode_rgb8`]; the same pixels either way.
    fn tensor_from_decoded(
        &self,
        bytes: &[u8],
        max_pixels: u64,
        budget: &Budget,
        out: &mut Vec<f32>,
    ) -> Result<(), ImageError> {
        let (_, mut decoder) = open(bytes, max_pixels, budget)?;
        let (width, height) = decoder.dimensions();
        check_pixels(width, height, max_pixels)?;
        let channels = match decoder.color_type() {
            ColorType::L8 => 1,
            ColorType::La8 => 2,
            ColorType::Rgb8 => 3,
            ColorType::Rgba8 => 4,
            _ => 0,
        };
        let upright = matches!(
            decoder.orientation(),
            Ok(Orientation::NoTransforms) | Err(_)
        );
        if channels == 0 || !upright {
            let rgb = decode_rgb8_within(bytes, max_pixels, budget)?;
            let (width, height) = rgb.dimensions();
            self.tensor_from_packed(rgb.as_raw(), width, height, out);
            return Ok(());
        }
        let len = usize::try_from(decoder.total_bytes()).map_err(|_| {
            ImageError::TooCostly("the image is larger than this machine can address".into())
        })?;
        let mut raw = Scratch::zeroed(len);
        decoder
            .read_image(&mut raw)
            .map_err(|e| decode_error(e, budget))?;
        if channels == 3 {
            self.tensor_from_packed(&raw, width, height, out);
            return Ok(());
        }
        let mut rgb = Scratch::zeroed(width as usize * height as usize * 3);
        rgb_into(&raw, channels, &mut rgb);
        self.tensor_from_packed(&rgb, width, height, out);
        Ok(())
    }

    /// Resizes, crops and normalises an RGB image into a CHW tensor.
    pub fn tensor_from_rgb(&self, rgb: &RgbImage) -> Vec<f32> {
        let (width, height) = rgb.dimensions();
        let mut tensor = Vec::new();
        self.tensor_from_packed(rgb.as_raw(), width, height, &mut tensor);
        tensor
    }

    /// The first half of [`Self::tensor_from_rgb`]: the image resized and cropped.
    pub fn crop(&self, rgb: &RgbImage) -> Crop {
        let (width, height) = rgb.dimensions();
        let (plan, pixels) = self.resized(rgb.as_raw(), width, height);
        Crop {
            pixels: pixels.to_vec(),
            width: plan.window().width,
        }
    }

    /// The second half of [`Self::tensor_from_rgb`]: the same tensor, bit for bit.
    pub fn tensor_from_crop(&self, crop: &Crop) -> Vec<f32> {
        let mut tensor = Vec::new();
        self.append_tensor_from_crop(crop, &mut tensor);
        tensor
    }

    /// [`Self::tensor_from_crop`] written at the end of `out`, a batch being put together.
    pub(crate) fn append_tensor_from_crop(&self, crop: &Crop, out: &mut Vec<f32>) {
        self.normalise(crop.width, &crop.pixels, out);
    }

    /// [`Self::tensor_from_rgb`] of packed RGB8 rows, written at the end of `out`.
    fn tensor_from_packed(&self, rgb: &[u8], width: u32, height: u32, out: &mut Vec<f32>) {
        let (plan, pixels) = self.resized(rgb, width, height);
        self.normalise(plan.window().width, &pixels, out);
    }

    /// Packed RGB8 rows resized and cropped, and the plan that did it.
    fn resized(&self, rgb: &[u8], width: u32, height: u32) -> (Plan, Scratch) {
        let plan = self.plan(width, height);
        let source = plan.source();
        let pitch = width as usize * 3;
        let first = &rgb[source.top * pitch + source.left * 3..];
        let pixels = plan.run(first, pitch);
        (plan, pixels)
    }

    /// torchvision's resize of the shorter side, then its centre crop.
    fn plan(&self, width: u32, height: u32) -> Plan {
        let (new_w, new_h) = resized_size(width, height, self.resize);
        // torchvision pads when the image is smaller than the crop; with resize >= crop it never is.
        let (crop_w, crop_h) = (self.crop.min(new_w), self.crop.min(new_h));
        let window = Rect {
            left: centre_offset(new_w, crop_w) as usize,
            top: centre_offset(new_h, crop_h) as usize,
            width: crop_w as usize,
            height: crop_h as usize,
        };
        Plan::new(width, height, new_w, new_h, window)
    }

    /// Packed RGB8 rows of the crop, `width` pixels each, to a normalised CHW tensor written at
    /// the end of `out`.
    fn normalise(&self, width: usize, pixels: &[u8], out: &mut Vec<f32>) {
        let luts: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c])
        });
        let side = self.crop as usize;
        let plane = side * side;
        if width == side && pixels.len() == 3 * plane {
            // A whole crop: each plane written in order, with no pass that zeroes it first.
            out.reserve(3 * plane);
            for (c, lut) in luts.iter().enumerate() {
                out.extend(pixels.chunks_exact(3).map(|px| lut[px[c] as usize]));
            }
            return;
        }
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let (r, rest) = out[start..].split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (y, row) in pixels.chunks_exact(width * 3).enumerate() {
            let at = y * side;
            for (x, px) in row.chunks_exact(3).enumerate() {
                r[at + x] = luts[0][px[0] as usize];
                g[at + x] = luts[1][px[1] as usize];
                b[at + x] = luts[2][px[2] as usize];
            }
        }
    }
}

/// torchvision's `Resize(size)` for an int size: shorter side to `size`, longer side truncated
/// (and held at `u32::MAX`, for sides more than about 16 million to one).
pub fn resized_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long =
        ((u64::from(size) * u64::from(long)) / u64::from(short)).min(u64::from(u32::MAX)) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's centre-crop offset: `int(round((size - crop) / 2))`, where Python rounds
/// halves to even.
pub fn centre_offset(size: u32, crop: u32) -> u32 {
    let diff = size.saturating_sub(crop);
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn resize_keeps_torchvision_rounding() {
        assert_eq!(resized_size(768, 576, 256), (341, 256));
        assert_eq!(resized_size(300, 451, 256), (256, 384));
        assert_eq!(resized_size(256, 256, 256), (256, 256));
        assert_eq!(resized_size(1 << 24, 1, 256), (u32::MAX, 256));
    }

    #[test]
    fn centre_offset_rounds_half_to_even() {
        assert_eq!(centre_offset(256, 224), 16);
        assert_eq!(centre_offset(293, 224), 34); // 34.5 -> 34
        assert_eq!(centre_offset(295, 224), 36); // 35.5 -> 36
        assert_eq!(centre_offset(224, 224), 0);
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        assert_eq!(inspect(b"", 100), Err(ImageError::Empty));
        assert_eq!(
            inspect(b"hello, world", 100),
            Err(ImageError::UnsupportedFormat)
        );
        // PNG magic bytes with nothing behind them.
        assert!(matches!(
            inspect(b"\x89PNG\r\n\x1a\n", 100),
            Err(ImageError::Undecodable(_))
        ));
    }

    #[test]
    fn caps_pixels_before_decoding() {
        let mut png = Vec::new();
        image::RgbImage::new(100, 100)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(inspect(&png, 10_000).is_ok());
        assert_eq!(
            inspect(&png, 9_999),
            Err(ImageError::TooManyPixels {
                width: 100,
                height: 100,
                max: 9_999
            })
        );
    }

    #[test]
    fn tensor_has_model_shape_and_normalised_values() {
        let white = image::RgbImage::from_pixel(300, 500, image::Rgb([255, 255, 255]));
        let t = Transform::default();
        let tensor = t.tensor_from_rgb(&white);
        assert_eq!(tensor.len(), 3 * 224 * 224);
        let expected_r = (1.0 - 0.485) / 0.229;
        assert!((tensor[0] - expected_r).abs() < 1e-5);
        let expected_b = (1.0 - 0.406) / 0.225;
        assert!((tensor[3 * 224 * 224 - 1] - expected_b).abs() < 1e-5);
    }

    #[test]
    fn a_batch_gets_each_tensor_after_the_last_and_loses_nothing_to_a_failure() {
        let photo = |format, width, height| {
            let rgb = image::RgbImage::from_fn(width, height, |x, y| {
                image::Rgb([
                    (x * 7 % 256) as u8,
                    (y * 5 % 256) as u8,
                    ((x + y) % 256) as u8,
                ])
            });
            let mut bytes = Vec::new();
            rgb.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
            bytes
        };
        let (jpeg, png) = (
            photo(ImageFormat::Jpeg, 400, 300),
            photo(ImageFormat::Png, 250, 330),
        );
        let t = Transform::default();
        let mut batch = Vec::new();
        t.append_tensor_from_bytes(&jpeg, u64::MAX, None, &mut batch)
            .unwrap();
        // Refused for each kind of reason: not an image, cut short, too many pixels.
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        for bad in [&b"not an image"[..], &png[..png.len() / 2], cut] {
            t.append_tensor_from_bytes(bad, u64::MAX, None, &mut batch)
                .unwrap_err();
        }
        t.append_tensor_from_bytes(&png, 1_000, None, &mut batch)
            .unwrap_err();
        t.append_tensor_from_bytes(&png, u64::MAX, None, &mut batch)
            .unwrap();
        let crop = t.crop(&decode_rgb8(&png, u64::MAX).unwrap());
        t.append_tensor_from_crop(&crop, &mut batch);
        let png_tensor = t.tensor_from_bytes(&png, u64::MAX).unwrap();
        let expected = [
            t.tensor_from_bytes(&jpeg, u64::MAX).unwrap(),
            png_tensor.clone(),
            png_tensor,
        ];
        assert_eq!(batch, expected.concat());
    }
}
