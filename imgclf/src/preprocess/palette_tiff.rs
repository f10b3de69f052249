//! 8-bit palette TIFFs, which the `tiff` crate refuses to decode. Read as grey (its
//! photometric interpretation changed as it is read), the same file gives each pixel's palette
//! index, strips, tiles and compression all handled by the crate; its colour map gives their
//! colours.

use std::io::{BufReader, Read, Seek, SeekFrom};

use image::codecs::tiff::TiffDecoder;
use image::{ColorType, ImageDecoder, ImageResult, Limits};

use super::budget::{Budget, BudgetReader};

const BITS_PER_SAMPLE: u16 = 258;
const PHOTOMETRIC: u16 = 262;
const SAMPLES_PER_PIXEL: u16 = 277;
const COLOR_MAP: u16 = 320;
const SHORT: u16 = 3;
const RGB_PALETTE: u16 = 3;
const BLACK_IS_ZERO: u16 = 1;

/// A palette TIFF's first image, decoded to RGB8.
pub(super) struct PaletteTiff<'a> {
    indices: TiffDecoder<BufReader<Patched<BudgetReader<'a>>>>,
    colours: Vec<[u8; 3]>,
}

/// The decoder of `bytes` if they are a classic (not Big) TIFF whose first image is one 8-bit
/// sample per pixel through a colour map; `None` for anything else. It reads within `budget`.
pub(super) fn open<'a>(
    bytes: &'a [u8],
    limits: Limits,
    budget: &'a Budget,
) -> Option<PaletteTiff<'a>> {
    let ifd = Ifd::first(bytes)?;
    let is_palette = ifd.short(PHOTOMETRIC)? == RGB_PALETTE
        && ifd.short(BITS_PER_SAMPLE)? == 8
        && ifd.short(SAMPLES_PER_PIXEL).unwrap_or(1) == 1;
    if !is_palette {
        return None;
    }
    let map = ifd.shorts(COLOR_MAP, 3 * 256)?;
    // 16-bit colour values: the high byte is the 8-bit colour (255 is written as 65535 or 65280).
    let colours = (0..256)
        .map(|i| [map[i], map[256 + i], map[512 + i]].map(|v| (v >> 8) as u8))
        .collect();
    let as_grey = Patched {
        inner: BudgetReader::new(bytes, budget),
        position: 0,
        at: ifd.value_at(PHOTOMETRIC)? as u64,
        value: ifd.encode(BLACK_IS_ZERO),
    };
    let mut indices = TiffDecoder::new(BufReader::new(as_grey)).ok()?;
    indices.set_limits(limits).ok()?;
    (indices.color_type() == ColorType::L8).then_some(PaletteTiff { indices, colours })
}

impl ImageDecoder for PaletteTiff<'_> {
    fn dimensions(&self) -> (u32, u32) {
        self.indices.dimensions()
    }

    fn color_type(&self) -> ColorType {
        ColorType::Rgb8
    }

    fn read_image(self, buf: &mut [u8]) -> ImageResult<()> {
        let (width, height) = self.dimensions();
        let mut indices = vec![0; width as usize * height as usize];
        self.indices.read_image(&mut indices)?;
        for (&index, pixel) in indices.iter().zip(buf.chunks_exact_mut(3)) {
            pixel.copy_from_slice(&self.colours[usize::from(index)]);
        }
        Ok(())
    }

    fn read_image_boxed(self: Box<Self>, buf: &mut [u8]) -> ImageResult<()> {
        (*self).read_image(buf)
    }
}

/// `inner`, with the two bytes at `at` read as `value`.
struct Patched<R> {
    inner: R,
    position: u64,
    at: u64,
    value: [u8; 2],
}

impl<R: Read> Read for Patched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        for (i, &byte) in self.value.iter().enumerate() {
            let slot = (self.at + i as u64)
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

    /// Exactly `count` SHORTs of `tag`.
    fn shorts(&self, tag: u16, count: usize) -> Option<Vec<u16>> {
        if self.entry(tag)?.1 != count {
            return None;
        }
        let at = self.value_at(tag)?;
        (0..count).map(|i| self.u16_at(at + 2 * i)).collect()
    }
}
