//! TIFF layouts that the `image` crate refuses but whose samples the `tiff` crate reads:
//! palette (8-bit, with or without alpha), grey with alpha (8 or 16 bits), 32-bit grey
//! (integer or float), 8-bit YCbCr (its chroma subsampled or not) and 8-bit CIELab. Strips,
//! tiles, compression, predictors, byte order and planes are all the `tiff` crate's; this turns
//! its samples into RGB as Pillow's `convert("RGB")` does. The crate refuses palette, CIELab and
//! subsampled YCbCr files outright, so those are read with some tags changed as the bytes go by,
//! without copying the file: palette as grey (each pixel's palette index), CIELab as RGB (the
//! L, a and b samples), and subsampled YCbCr as grey with one row of bytes per row of blocks.

use std::io::{BufReader, Read, Seek, SeekFrom};

use image::error::{DecodingError, ImageFormatHint, LimitError, LimitErrorKind};
use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat, ImageResult, Limits};
use tiff::decoder::ifd::Value;
use tiff::decoder::{Decoder, DecodingResult};
use tiff::tags::Tag;
use tiff::{ColorType as Samples, TiffError};

use super::budget::{Budget, BudgetReader};

const IMAGE_WIDTH: u16 = 256;
const IMAGE_LENGTH: u16 = 257;
const BITS_PER_SAMPLE: u16 = 258;
const COMPRESSION: u16 = 259;
const PHOTOMETRIC: u16 = 262;
const SAMPLES_PER_PIXEL: u16 = 277;
const ROWS_PER_STRIP: u16 = 278;
const PLANAR_CONFIGURATION: u16 = 284;
const PREDICTOR: u16 = 317;
const TILE_WIDTH: u16 = 322;
const TILE_LENGTH: u16 = 323;
const YCBCR_SUBSAMPLING: u16 = 530;
const SHORT: u16 = 3;
const LONG: u16 = 4;
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
    /// Where the samples are subsampled YCbCr, read as grey: its blocks.
    blocks: Option<Blocks>,
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
    let (blocks, patches) = match photometric {
        RGB_PALETTE => (None, vec![ifd.rewrite(PHOTOMETRIC, BLACK_IS_ZERO.into())?]),
        CIELAB => (None, vec![ifd.rewrite(PHOTOMETRIC, RGB.into())?]),
        YCBCR => {
            let (blocks, patches) = Blocks::of(&ifd)?.unzip();
            (blocks, patches.unwrap_or_default())
        }
        _ => (None, Vec::new()),
    };
    let patched = Patched {
        inner: BudgetReader::new(bytes, budget),
        position: 0,
        patches,
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
        (YCBCR, 8, 3) if blocks.is_none() => Colour::YCbCr(YCbCr::of(&mut decoder)?),
        (YCBCR, 8, 1) if blocks.is_some() => Colour::YCbCr(YCbCr::of(&mut decoder)?),
        (CIELAB, 8, 3) => Colour::Lab,
        _ => return None,
    };
    Some(TiffSamples {
        dimensions: match &blocks {
            Some(blocks) => (blocks.width, blocks.height),
            None => decoder.dimensions().ok()?,
        },
        decoder,
        samples: usize::from(samples),
        colour,
        blocks,
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
    /// The file's coefficients and reference.
    fn of<R: Read + Seek>(decoder: &mut Decoder<R>) -> Option<Self> {
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

/// How a YCbCr TIFF with subsampled chroma stores its pixels (TIFF 6.0, section 21): in blocks
/// of `across` x `down` luma samples, each followed by the block's Cb and Cr.
struct Blocks {
    across: usize,
    down: usize,
    /// The image's size in pixels.
    width: u32,
    height: u32,
}

impl Blocks {
    /// The blocks of a contiguous 8-bit YCbCr file, and the tags that make the `tiff` crate
    /// read its strips or tiles as grey, one row of bytes per row of blocks; `Some(None)` if
    /// its chroma is not subsampled; `None` for what cannot be read so: planes and strips that
    /// cut blocks (which libtiff, and so Pillow, does not read either), blocks other than 1, 2
    /// or 4 pixels a side, a predictor (its differences run over the blocks' bytes) and JPEG
    /// (whose own decoder gives RGB, and which the `image` crate reads when it can).
    fn of(ifd: &Ifd) -> Option<Option<(Self, Vec<Patch>)>> {
        if matches!(ifd.unsigned(COMPRESSION), Some(6 | 7)) {
            return None;
        }
        // TIFF's default is 2x2.
        let [across, down] = match ifd.entry_at(YCBCR_SUBSAMPLING) {
            None => [2, 2],
            Some(_) => ifd.shorts(YCBCR_SUBSAMPLING)?,
        };
        if [across, down] == [1, 1] {
            return Some(None);
        }
        let absent_or_one = |tag| ifd.entry_at(tag).is_none() || ifd.unsigned(tag) == Some(1);
        if ![across, down].iter().all(|n| [1, 2, 4].contains(n))
            || ifd.unsigned(SAMPLES_PER_PIXEL)? != 3
            || ifd.shorts(BITS_PER_SAMPLE)? != [8, 8, 8]
            || !absent_or_one(PLANAR_CONFIGURATION)
            || !absent_or_one(PREDICTOR)
        {
            return None;
        }
        let (across, down) = (u32::from(across), u32::from(down));
        let width = ifd.unsigned(IMAGE_WIDTH)?;
        let height = ifd.unsigned(IMAGE_LENGTH)?;
        let block_bytes = across * down + 2;
        // Bytes for `pixels` across, and rows for `pixels` down, each a whole number of blocks.
        let row_bytes = |pixels: u32| pixels.div_ceil(across).checked_mul(block_bytes);
        let rows = |pixels: u32| pixels.div_ceil(down);
        let mut patches = vec![
            ifd.rewrite(IMAGE_WIDTH, row_bytes(width)?)?,
            ifd.rewrite(IMAGE_LENGTH, rows(height))?,
            ifd.rewrite(BITS_PER_SAMPLE, 8)?,
            ifd.rewrite(SAMPLES_PER_PIXEL, 1)?,
            ifd.rewrite(PHOTOMETRIC, BLACK_IS_ZERO.into())?,
        ];
        if ifd.entry_at(TILE_WIDTH).is_some() {
            let (tile_width, tile_length) = (ifd.unsigned(TILE_WIDTH)?, ifd.unsigned(TILE_LENGTH)?);
            if tile_width % across != 0 || tile_length % down != 0 {
                return None;
            }
            patches.push(ifd.rewrite(TILE_WIDTH, row_bytes(tile_width)?)?);
            patches.push(ifd.rewrite(TILE_LENGTH, rows(tile_length))?);
        } else if ifd.entry_at(ROWS_PER_STRIP).is_some() {
            let strip = ifd.unsigned(ROWS_PER_STRIP)?;
            if strip % down != 0 && strip < height {
                return None;
            }
            patches.push(ifd.rewrite(ROWS_PER_STRIP, rows(strip))?);
        }
        let blocks = Blocks {
            across: across as usize,
            down: down as usize,
            width,
            height,
        };
        Some(Some((blocks, patches)))
    }

    /// `rgb` from the blocks, each block's chroma repeated over its pixels as libtiff's RGBA
    /// interface (which Pillow reads these files through) does.
    fn rgb_into(
        &self,
        samples: &[u8],
        ycbcr: &YCbCr,
        rgb: &mut [u8],
        budget: &Budget,
    ) -> ImageResult<()> {
        let width = self.width as usize;
        let block_len = self.across * self.down + 2;
        let row = width.div_ceil(self.across) * block_len;
        if width == 0 || samples.len() < (self.height as usize).div_ceil(self.down) * row {
            return Err(short());
        }
        for (y, out) in rgb.chunks_exact_mut(width * 3).enumerate() {
            if y % 64 == 0 && budget.exceeded() {
                return Err(over_budget(budget));
            }
            let blocks = &samples[y / self.down * row..][..row];
            let line = y % self.down * self.across;
            for (x, pixel) in out.chunks_exact_mut(3).enumerate() {
                let block = &blocks[x / self.across * block_len..][..block_len];
                let luma = block[line + x % self.across];
                let [cb, cr] = [block[block_len - 2], block[block_len - 1]];
                pixel.copy_from_slice(&ycbcr.rgb([luma, cb, cr]));
            }
        }
        Ok(())
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
                return Err(over_budget(self.budget));
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
        match (&self.blocks, &self.colour, &decoded) {
            (Some(blocks), Colour::YCbCr(ycbcr), DecodingResult::U8(v)) => {
                blocks.rgb_into(v, ycbcr, buf, self.budget)
            }
            (Some(_), ..) => Err(short()),
            (None, ..) => self.rgb_into(&decoded, layout.planes > 1, buf),
        }
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

/// The error once the decode's CPU budget is spent.
fn over_budget(budget: &Budget) -> image::ImageError {
    image::ImageError::IoError(std::io::Error::other(budget.why()))
}

/// Fewer samples than pixels: the decoder stopped early.
fn short() -> image::ImageError {
    image::ImageError::Decoding(DecodingError::new(
        ImageFormatHint::Exact(ImageFormat::Tiff),
        "fewer samples than pixels",
    ))
}

/// `inner`, with the directory entries at some positions read as others.
struct Patched<R> {
    inner: R,
    position: u64,
    patches: Vec<Patch>,
}

/// A directory entry's position in the file, and the bytes read there instead.
type Patch = (u64, [u8; 12]);

impl<R: Read> Read for Patched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        for (at, value) in &self.patches {
            for (i, &byte) in value.iter().enumerate() {
                let slot = (at + i as u64)
                    .checked_sub(self.position)
                    .and_then(|at| usize::try_from(at).ok())
                    .and_then(|at| buf[..read].get_mut(at));
                if let Some(slot) = slot {
                    *slot = byte;
                }
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

    fn encode_u16(&self, value: u16) -> [u8; 2] {
        match self.little_endian {
            true => value.to_le_bytes(),
            false => value.to_be_bytes(),
        }
    }

    fn encode_u32(&self, value: u32) -> [u8; 4] {
        match self.little_endian {
            true => value.to_le_bytes(),
            false => value.to_be_bytes(),
        }
    }

    /// Where the entry of `tag` starts.
    fn entry_at(&self, tag: u16) -> Option<usize> {
        (0..self.count)
            .map(|i| self.entries + 12 * i)
            .find(|&at| self.u16_at(at) == Some(tag))
    }

    /// Where the values of a SHORT tag lie (in the entry when it holds two or fewer), and how
    /// many it holds.
    fn shorts_at(&self, tag: u16) -> Option<(usize, usize)> {
        let at = self.entry_at(tag)?;
        if self.u16_at(at + 2)? != SHORT {
            return None;
        }
        let count = self.u32_at(at + 4)? as usize;
        let first = match count {
            0..=2 => at + 8,
            _ => self.u32_at(at + 8)? as usize,
        };
        Some((first, count))
    }

    /// The `N` values of a SHORT tag that holds `N`.
    fn shorts<const N: usize>(&self, tag: u16) -> Option<[u16; N]> {
        let (first, count) = self.shorts_at(tag)?;
        if count != N {
            return None;
        }
        let mut values = [0; N];
        for (i, value) in values.iter_mut().enumerate() {
            *value = self.u16_at(first.checked_add(2 * i)?)?;
        }
        Some(values)
    }

    /// The value of a tag that holds one SHORT or LONG.
    fn unsigned(&self, tag: u16) -> Option<u32> {
        let at = self.entry_at(tag)?;
        if self.u32_at(at + 4)? != 1 {
            return None;
        }
        match self.u16_at(at + 2)? {
            SHORT => self.u16_at(at + 8).map(u32::from),
            LONG => self.u32_at(at + 8),
            _ => None,
        }
    }

    /// The entry of `tag`, rewritten to hold one LONG: `value`.
    fn rewrite(&self, tag: u16, value: u32) -> Option<Patch> {
        let at = self.entry_at(tag)?;
        let mut entry = [0; 12];
        entry[..2].copy_from_slice(&self.encode_u16(tag));
        entry[2..4].copy_from_slice(&self.encode_u16(LONG));
        entry[4..8].copy_from_slice(&self.encode_u32(1));
        entry[8..].copy_from_slice(&self.encode_u32(value));
        Some((at as u64, entry))
    }

    /// The first value of a SHORT tag (a tag that gives one per sample gives them all alike).
    fn short(&self, tag: u16) -> Option<u16> {
        match self.shorts_at(tag)? {
            (_, 0) => None,
            (first, _) => self.u16_at(first),
        }
    }
}
