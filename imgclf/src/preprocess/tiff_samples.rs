//! TIFF layouts that the `image` crate refuses but whose samples the `tiff` crate reads:
//! palette (8-bit, with or without alpha), grey with alpha (8 or 16 bits), 32-bit grey
//! (integer or float), YCbCr without subsampling and 8-bit CIELab. Strips, tiles, compression,
//! predictors, byte order and planes are all the `tiff` crate's; this turns its samples into
//! RGB as Pillow's `convert("RGB")` does. The crate refuses palette and CIELab files outright,
//! so those are read with the photometric tag changed as the bytes go by (to grey: each
//! pixel's palette index; to RGB: the L, a and b samples), without copying the file.

use std::io::{BufReader, Read, Seek, SeekFrom};

use image::error::{DecodingError, ImageFormatHint, LimitError, LimitErrorKind};
use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat, ImageResult, Limits};
use tiff::decoder::ifd::Value;
use tiff::decoder::{Decoder, DecodingResult};
use tiff::tags::Tag;
use tiff::{ColorType as Samples, TiffError};

use super::budget::{Budget, BudgetReader};

const PHOTOMETRIC: u16 = 262;
const SHORT: u16 = 3;
const BLACK_IS_ZERO: u16 = 1;
const RGB: u16 = 2;
const RGB_PALETTE: u16 = 3;
const YCBCR: u16 = 6;
const CIELAB: u16 = 8;

/// A TIFF's first image, decoded from its samples to RGB8.
pub(super) struct TiffSamples<'a> {
    decoder: Decoder<BufReader<Patched<BudgetReader<'a>>>>,
    dimensions: (u32, u32),
    /// Samples per pixel; the first ones are the colour, the rest (alpha) are dropped.
    samples: usize,
    colour: Colour,
    /// The decode's CPU budget, which the conversion after the last read spends too.
    budget: &'a Budget,
}

/// What a pixel's first samples mean.
enum Colour {
    /// An index into these colours.
    Palette(Vec<[u8; 3]>),
    /// Grey, black at zero.
    Grey,
    /// Y, Cb and Cr, full range after the reference black and white.
    YCbCr(YCbCr),
    /// CIE L*a*b*, L over 0..=255 and a, b signed.
    Lab,
}

/// The decoder of `bytes` if their first image is one of the layouts above; `None` for
/// anything else (the caller keeps the `image` crate's refusal). It reads and converts within
/// `budget` and allocates no more than `limits` allow.
pub(super) fn open<'a>(
    bytes: &'a [u8],
    limits: &Limits,
    budget: &'a Budget,
) -> Option<TiffSamples<'a>> {
    let ifd = Ifd::first(bytes)?;
    let photometric = ifd.short(PHOTOMETRIC)?;
    let read_as = match photometric {
        RGB_PALETTE => Some(BLACK_IS_ZERO),
        CIELAB => Some(RGB),
        _ => None,
    };
    let patched = Patched {
        inner: BudgetReader::new(bytes, budget),
        position: 0,
        patch: match read_as {
            Some(value) => Some((ifd.value_at(PHOTOMETRIC)? as u64, ifd.encode(value))),
            None => None,
        },
    };
    let max_alloc = usize::try_from(limits.max_alloc.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
    let mut tiff_limits = tiff::decoder::Limits::default();
    tiff_limits.decoding_buffer_size = max_alloc;
    tiff_limits.intermediate_buffer_size = max_alloc;
    let mut decoder = Decoder::new(BufReader::new(patched))
        .ok()?
        .with_limits(tiff_limits);
    let (depth, samples) = match decoder.colortype().ok()? {
        Samples::Gray(depth) => (depth, 1),
        Samples::Multiband {
            bit_depth,
            num_samples,
        } => (bit_depth, num_samples),
        Samples::YCbCr(depth) | Samples::RGB(depth) => (depth, 3),
        _ => return None,
    };
    let colour = match (photometric, depth, samples) {
        (RGB_PALETTE, 8, _) => palette(&mut decoder)?,
        (BLACK_IS_ZERO, 32, 1) | (BLACK_IS_ZERO, 8 | 16, 2..) => Colour::Grey,
        (YCBCR, 8, 3) => Colour::YCbCr(YCbCr::of(&mut decoder)?),
        (CIELAB, 8, 3) => Colour::Lab,
        _ => return None,
    };
    Some(TiffSamples {
        dimensions: decoder.dimensions().ok()?,
        decoder,
        samples: usize::from(samples),
        colour,
        budget,
    })
}

/// The colour map's 256 colours: its 16-bit values' high bytes (255 is written as 65535 or
/// 65280).
fn palette<R: Read + Seek>(decoder: &mut Decoder<R>) -> Option<Colour> {
    let map: Vec<u16> = decoder.find_tag_unsigned_vec(Tag::ColorMap).ok()??;
    if map.len() != 3 * 256 {
        return None;
    }
    let colours = (0..256)
        .map(|i| [map[i], map[256 + i], map[512 + i]].map(|v| (v >> 8) as u8))
        .collect();
    Some(Colour::Palette(colours))
}

/// YCbCr to RGB as the TIFF tags define it (TIFF 6.0, section 21).
struct YCbCr {
    /// The luma weights of red, green and blue.
    luma: [f32; 3],
    /// Each component's reference black and white.
    reference: [f32; 6],
}

impl YCbCr {
    /// The file's coefficients and reference, if it is stored without subsampling and not as
    /// JPEG (whose decoder gives RGB itself).
    fn of<R: Read + Seek>(decoder: &mut Decoder<R>) -> Option<Self> {
        // TIFF's default subsampling is 2x2, which the `tiff` crate does not undo.
        let subsampling: Vec<u16> = decoder
            .find_tag_unsigned_vec(Tag::ChromaSubsampling)
            .ok()??;
        let compression = decoder.find_tag_unsigned::<u16>(Tag::Compression).ok()?;
        if subsampling != [1, 1] || matches!(compression, Some(6 | 7)) {
            return None;
        }
        let mut numbers = |tag| match decoder.find_tag(Tag::Unknown(tag)).ok()? {
            Some(Value::List(values)) => values.into_iter().map(number).collect(),
            Some(one) => Some(vec![number(one)?]),
            None => Some(Vec::new()),
        };
        let luma = match numbers(529)?[..] {
            [] => [0.299, 0.587, 0.114],
            [r, g, b] => [r, g, b],
            _ => return None,
        };
        let reference = match numbers(532)?[..] {
            [] => [0.0, 255.0, 128.0, 255.0, 128.0, 255.0],
            [a, b, c, d, e, f] if b != a && d != c && f != e => [a, b, c, d, e, f],
            _ => return None,
        };
        Some(Self { luma, reference })
    }

    fn rgb(&self, [y, cb, cr]: [u8; 3]) -> [u8; 3] {
        let [black_y, white_y, black_cb, white_cb, black_cr, white_cr] = self.reference;
        let y = (f32::from(y) - black_y) * 255.0 / (white_y - black_y);
        let cb = (f32::from(cb) - black_cb) * 127.0 / (white_cb - black_cb);
        let cr = (f32::from(cr) - black_cr) * 127.0 / (white_cr - black_cr);
        let [lr, lg, lb] = self.luma;
        let r = y + cr * (2.0 - 2.0 * lr);
        let b = y + cb * (2.0 - 2.0 * lb);
        let g = (y - lb * b - lr * r) / lg;
        [r, g, b].map(to_u8)
    }
}

/// A RATIONAL, FLOAT or integer tag value (`tiff` reads no RATIONAL as a float).
fn number(value: Value) -> Option<f32> {
    Some(match value {
        Value::Rational(n, d) if d != 0 => n as f32 / d as f32,
        Value::SRational(n, d) if d != 0 => n as f32 / d as f32,
        Value::Float(v) => v,
        Value::Double(v) => v as f32,
        Value::Short(v) => f32::from(v),
        Value::Unsigned(v) => v as f32,
        _ => return None,
    })
}

/// CIE L*a*b* to sRGB, from the D50 white of ICC profiles (as Pillow, through Little CMS,
/// reads them) with the Bradford adaptation to sRGB's D65.
fn lab_rgb([l, a, b]: [u8; 3]) -> [u8; 3] {
    const WHITE: [f32; 3] = [0.964_22, 1.0, 0.825_21];
    let fy = (f32::from(l) * 100.0 / 255.0 + 16.0) / 116.0;
    let fx = fy + f32::from(a as i8) / 500.0;
    let fz = fy - f32::from(b as i8) / 200.0;
    let linear = |f: f32| {
        if f > 6.0 / 29.0 {
            f * f * f
        } else {
            3.0 * (6.0f32 / 29.0).powi(2) * (f - 4.0 / 29.0)
        }
    };
    let f = [fx, fy, fz];
    let [x, y, z]: [f32; 3] = std::array::from_fn(|i| WHITE[i] * linear(f[i]));
    let rgb = [
        3.133_856 * x - 1.616_867 * y - 0.490_615 * z,
        -0.978_768 * x + 1.916_142 * y + 0.033_454 * z,
        0.071_945 * x - 0.228_991 * y + 1.405_243 * z,
    ];
    rgb.map(|c| {
        let c = c.max(0.0);
        let encoded = if c <= 0.003_130_8 {
            12.92 * c
        } else {
            1.055 * c.powf(1.0 / 2.4) - 0.055
        };
        to_u8(encoded * 255.0)
    })
}

/// Rounded and clamped to 0..=255.
fn to_u8(value: f32) -> u8 {
    value.round().clamp(0.0, 255.0) as u8
}

impl TiffSamples<'_> {
    /// `rgb`, three bytes per pixel, from the decoded samples (planar or not). Only grey is
    /// ever wider than 8 bits, and it is converted as Pillow converts it: 16 bits scaled
    /// (rounded, as the `image` crate does), 32-bit integers clamped, floats truncated and
    /// clamped (NaN is 0), as `as u8` does.
    fn rgb_into(&self, decoded: &DecodingResult, planar: bool, rgb: &mut [u8]) -> ImageResult<()> {
        let layout = Layout {
            samples: self.samples,
            planar,
            budget: self.budget,
        };
        match decoded {
            DecodingResult::U8(v) => layout.each_pixel(v, rgb, |px| match &self.colour {
                Colour::Palette(colours) => colours[usize::from(px[0])],
                Colour::Grey => [px[0]; 3],
                Colour::YCbCr(ycbcr) => ycbcr.rgb(px),
                Colour::Lab => lab_rgb(px),
            }),
            DecodingResult::U16(v) => {
                layout.each_pixel(v, rgb, |px| [((u32::from(px[0]) + 128) / 257) as u8; 3])
            }
            DecodingResult::U32(v) => layout.each_pixel(v, rgb, |px| [px[0].min(255) as u8; 3]),
            DecodingResult::I32(v) => {
                layout.each_pixel(v, rgb, |px| [px[0].clamp(0, 255) as u8; 3])
            }
            DecodingResult::F32(v) => layout.each_pixel(v, rgb, |px| [px[0] as u8; 3]),
            _ => Err(short()),
        }
    }
}

/// Where each pixel's samples lie: side by side, or one plane per sample.
struct Layout<'a> {
    samples: usize,
    planar: bool,
    budget: &'a Budget,
}

impl Layout<'_> {
    /// `rgb` from each pixel's first three samples (repeated where it has fewer); an error if
    /// there are fewer samples than its pixels need, or once the budget is spent (CIELab takes
    /// about 50 ns a pixel: seconds at the pixel cap).
    fn each_pixel<T: Copy>(
        &self,
        samples: &[T],
        rgb: &mut [u8],
        colour: impl Fn([T; 3]) -> [u8; 3],
    ) -> ImageResult<()> {
        let (pixels, n) = (rgb.len() / 3, self.samples);
        if samples.len() < pixels * n {
            return Err(short());
        }
        for (i, out) in rgb.chunks_exact_mut(3).enumerate() {
            if i % (1 << 16) == 0 && self.budget.exceeded() {
                return Err(image::ImageError::IoError(std::io::Error::other(
                    self.budget.why(),
                )));
            }
            let sample = |s: usize| match self.planar {
                true => samples[(s % n) * pixels + i],
                false => samples[i * n + s % n],
            };
            out.copy_from_slice(&colour([sample(0), sample(1), sample(2)]));
        }
        Ok(())
    }
}

impl ImageDecoder for TiffSamples<'_> {
    fn dimensions(&self) -> (u32, u32) {
        self.dimensions
    }

    fn color_type(&self) -> ColorType {
        ColorType::Rgb8
    }

    fn orientation(&mut self) -> ImageResult<Orientation> {
        let exif = self.decoder.find_tag_unsigned::<u8>(Tag::Orientation);
        Ok(exif
            .ok()
            .flatten()
            .and_then(Orientation::from_exif)
            .unwrap_or(Orientation::NoTransforms))
    }

    fn read_image(mut self, buf: &mut [u8]) -> ImageResult<()> {
        let mut decoded = DecodingResult::U8(Vec::new());
        let layout = self
            .decoder
            .read_image_to_buffer(&mut decoded)
            .map_err(tiff_error)?;
        // Planes past the first are left out when they would pass the allocation limit.
        if decoded.as_buffer(0).as_bytes().len() < layout.complete_len {
            return Err(tiff_error(TiffError::LimitsExceeded));
        }
        self.rgb_into(&decoded, layout.planes > 1, buf)
    }

    fn read_image_boxed(self: Box<Self>, buf: &mut [u8]) -> ImageResult<()> {
        (*self).read_image(buf)
    }
}

/// The `image` crate's error for the `tiff` crate's, as its own TIFF decoder maps them.
fn tiff_error(error: TiffError) -> image::ImageError {
    match error {
        TiffError::IoError(error) => image::ImageError::IoError(error),
        TiffError::LimitsExceeded => {
            image::ImageError::Limits(LimitError::from_kind(LimitErrorKind::InsufficientMemory))
        }
        other => image::ImageError::Decoding(DecodingError::new(ImageFormat::Tiff.into(), other)),
    }
}

/// Fewer samples than pixels: the decoder stopped early.
fn short() -> image::ImageError {
    image::ImageError::Decoding(DecodingError::new(
        ImageFormatHint::Exact(ImageFormat::Tiff),
        "fewer samples than pixels",
    ))
}

/// `inner`, with the two bytes at a position (if any) read as others.
struct Patched<R> {
    inner: R,
    position: u64,
    patch: Option<(u64, [u8; 2])>,
}

impl<R: Read> Read for Patched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        let Some((at, value)) = self.patch else {
            return Ok(read);
        };
        for (i, &byte) in value.iter().enumerate() {
            let slot = (at + i as u64)
                .checked_sub(self.position)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| buf[..read].get_mut(at));
            if let Some(slot) = slot {
                *slot = byte;
            }
        }
        self.position += read as u64;
        Ok(read)
    }
}

impl<R: Seek> Seek for Patched<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.position = self.inner.seek(to)?;
        Ok(self.position)
    }
}

/// The first image file directory of a classic TIFF, read only as far as these tags need.
struct Ifd<'a> {
    bytes: &'a [u8],
    little_endian: bool,
    entries: usize,
    count: usize,
}

impl<'a> Ifd<'a> {
    fn first(bytes: &'a [u8]) -> Option<Self> {
        let little_endian = match bytes.get(..4)? {
            b"II*\0" => true,
            b"MM\0*" => false,
            _ => return None,
        };
        let mut ifd = Ifd {
            bytes,
            little_endian,
            entries: 0,
            count: 0,
        };
        let offset = ifd.u32_at(4)? as usize;
        ifd.count = usize::from(ifd.u16_at(offset)?);
        ifd.entries = offset + 2;
        Some(ifd)
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        let b: [u8; 2] = self.bytes.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if self.little_endian {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b: [u8; 4] = self.bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if self.little_endian {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    fn encode(&self, value: u16) -> [u8; 2] {
        if self.little_endian {
            value.to_le_bytes()
        } else {
            value.to_be_bytes()
        }
    }

    /// The entry of `tag` if it holds SHORTs: where it starts, and how many it holds.
    fn entry(&self, tag: u16) -> Option<(usize, usize)> {
        (0..self.count)
            .map(|i| self.entries + 12 * i)
            .find(|&at| self.u16_at(at) == Some(tag))
            .filter(|&at| self.u16_at(at + 2) == Some(SHORT))
            .and_then(|at| Some((at, self.u32_at(at + 4)? as usize)))
    }

    /// Where the first SHORT of `tag` lies: in the entry when it holds two or fewer.
    fn value_at(&self, tag: u16) -> Option<usize> {
        let (at, count) = self.entry(tag)?;
        match count {
            0 => None,
            1 | 2 => Some(at + 8),
            _ => Some(self.u32_at(at + 8)? as usize),
        }
    }

    /// The first value of a SHORT tag (a tag that gives one per sample gives them all alike).
    fn short(&self, tag: u16) -> Option<u16> {
        self.u16_at(self.value_at(tag)?)
    }
}
