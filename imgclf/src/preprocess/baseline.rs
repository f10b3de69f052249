//! Entropy decoding of baseline JPEGs (one sequential Huffman scan), MCU by MCU, in place of
//! libjpeg's `decode_mcu` in its single-pass decoder (see `jpeg::Decoder::start`): the
//! largest part of a large photo's decoding time. libjpeg refills its bit buffer a byte at a
//! time, checking each byte for a marker, decodes a coefficient's code and then its value bits
//! apart, and takes its slow path for every MCU of a file with restart markers. Here each
//! restart interval's data is unstuffed once beforehand and read 64 bits at a time, and one
//! table lookup decodes up to two short codes with their value bits.
//!
//! Damaged data decodes as libjpeg decodes it: a code no table holds reads as 17 bits and
//! symbol 0; an interval whose data runs out reads zero bits to the end of that MCU and leaves
//! its later MCUs zero; a run of zeros past a block's end lands on coefficient 63; DC
//! predictions wrap as libjpeg's `int`s do. What libjpeg resolves in ways not mirrored here
//! (restart markers out of sequence, data with no marker after it, default tables, anything
//! but one baseline or extended Huffman frame) makes [`Scan::new`] return `None`, and libjpeg
//! decodes the file as before.

use super::huffman::{extend, next_marker, segment, Bits, Block, Huffman, Interval, Tables};
use super::huffman::{LOOKUP_BITS, NATURAL};
use super::progressive::Frame;

/// Bits of the lookup that decodes up to two short AC codes with their value bits (8 KiB a
/// table, so that a luma and a chroma table stay in the L1 cache beside the blocks).
const FAST_BITS: u32 = 10;

/// What [`AcTable::fast`] holds for each [`FAST_BITS`] bits, in fields of a `u64`: the bits
/// all of it takes (0..5), the bits its first coefficient takes (5..10), the zeros before
/// that coefficient (10..14), how far past it a second one is (14..19; 0 for none), whether
/// the block ends after them (bit 19), and the two values (32..48, 48..64; the first again
/// where there is no second). 0 where the bits do not hold a whole coefficient or end of
/// block.
fn entry(taken: u32, first: (u32, u32, i16), second: (u32, i16), ends: bool) -> u64 {
    let (first_taken, run, value) = first;
    let (past, second_value) = second;
    taken as u64
        | (first_taken as u64) << 5
        | (run as u64) << 10
        | (past as u64) << 14
        | if ends { END_OF_BLOCK } else { 0 }
        | (value as u16 as u64) << 32
        | (second_value as u16 as u64) << 48
}

/// The bit of an [`entry`] saying the block ends after it.
const END_OF_BLOCK: u64 = 1 << 19;

/// A short code and its value bits, at the top of some bits.
enum Short {
    /// Bits taken, zeros before it, value.
    Coefficient(u32, u32, i16),
    /// Bits taken: a symbol that ends the block (libjpeg ends it at any symbol of size 0 but
    /// a run of 16 zeros).
    EndOfBlock(u32),
}

/// The code and value bits at the top of `bits`, a number of `width` bits (at most
/// [`FAST_BITS`]), where they fit in them.
fn short(table: &Huffman, bits: u32, width: u32) -> Option<Short> {
    let index = if width >= LOOKUP_BITS {
        bits >> (width - LOOKUP_BITS)
    } else {
        bits << (LOOKUP_BITS - width)
    };
    let code = table.lookup[index as usize];
    let (length, symbol) = ((code >> 8) as u32, code as u8);
    let (run, size) = ((symbol >> 4) as u32, (symbol & 15) as u32);
    match () {
        _ if code == 0 || length + size > width => None,
        _ if size == 0 && run == 15 => None,
        _ if size == 0 => Some(Short::EndOfBlock(length)),
        _ => {
            let raw = (bits >> (width - length - size)) & ((1 << size) - 1);
            Some(Short::Coefficient(
                length + size,
                run,
                extend(raw, size) as i16,
            ))
        }
    }
}

/// An AC table with its lookup of short codes.
struct AcTable {
    table: Box<Huffman>,
    fast: Box<[u64; 1 << FAST_BITS]>,
}

impl AcTable {
    fn new(table: Box<Huffman>) -> Self {
        let mut fast = Box::new([0; 1 << FAST_BITS]);
        for (bits, slot) in fast.iter_mut().enumerate() {
            let bits = bits as u32;
            *slot = match short(&table, bits, FAST_BITS) {
                None => 0,
                // Writes a zero where the block is still zero.
                Some(Short::EndOfBlock(taken)) => entry(taken, (taken, 0, 0), (0, 0), true),
                Some(Short::Coefficient(taken, run, value)) => {
                    let left = FAST_BITS - taken;
                    let rest = bits & ((1 << left) - 1);
                    let first = (taken, run, value);
                    match (left > 0).then(|| short(&table, rest, left)).flatten() {
                        Some(Short::Coefficient(more, run, second)) => {
                            entry(taken + more, first, (1 + run, second), false)
                        }
                        Some(Short::EndOfBlock(more)) => {
                            entry(taken + more, first, (0, value), true)
                        }
                        None => entry(taken, first, (0, value), false),
                    }
                }
            };
        }
        AcTable { table, fast }
    }
}

/// One block of an MCU: its component's place in the scan and its tables.
#[derive(Clone, Copy)]
struct Coding {
    component: usize,
    dc: usize,
    ac: usize,
}

/// A baseline JPEG's scan, ready for libjpeg to ask for its MCUs in order.
pub(super) struct Scan {
    bits: Bits,
    /// Each restart interval's data (one if the file has no restart markers).
    intervals: Vec<Interval>,
    next_interval: usize,
    /// The blocks of each MCU, in order.
    mcu: Vec<Coding>,
    dc: [Option<Box<Huffman>>; 4],
    ac: [Option<AcTable>; 4],
    /// MCUs per restart interval, 0 without restarts.
    restart_interval: usize,
    to_restart: usize,
    predictions: [i32; 4],
    /// libjpeg's `insufficient_data`: the interval's data ran out.
    out_of_data: bool,
    /// Whether to decode with BMI2's shifts (chosen once, for the whole scan).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bmi2: bool,
    /// Where blocks libjpeg does not want go (it discards rows it skips).
    discarded: Block,
}

impl Scan {
    /// The scan of `bytes`, a JPEG whose header libjpeg read as `frame` with one scan whose
    /// data starts at `data_start`; `None` where libjpeg is left to decode it.
    pub fn new(bytes: &[u8], frame: &Frame, data_start: usize) -> Option<Scan> {
        if !bytes.starts_with(&[0xFF, 0xD8]) {
            return None;
        }
        let mut tables = Tables::default();
        let mut restart_interval = 0;
        let mut frames = 0;
        let mut pos = 2;
        let header = loop {
            let (marker, at) = next_marker(bytes, pos).ok()?;
            let contents = segment(bytes, at).ok()?;
            pos = at + 2 + contents.len();
            match marker {
                0xDA if frames == 1 => break contents,
                0xC0 | 0xC1 => frames += 1,
                0xC4 => tables.define(contents).ok()?,
                0xDD => match contents {
                    &[high, low] => restart_interval = u16::from_be_bytes([high, low]) as usize,
                    _ => return None,
                },
                0xDB | 0xE0..=0xEF | 0xFE => {}
                _ => return None,
            }
        };
        if pos != data_start {
            return None;
        }
        // All components, each once, with defined tables, coded sequentially.
        let [count, rest @ ..] = header else {
            return None;
        };
        let count = *count as usize;
        if count != frame.components.len()
            || rest.len() != 2 * count + 3
            || rest[2 * count..] != [0, 63, 0]
        {
            return None;
        }
        let mut dc: [Option<Box<Huffman>>; 4] = Default::default();
        let mut ac: [Option<AcTable>; 4] = Default::default();
        let mut mcu = Vec::new();
        let mut seen = Vec::with_capacity(count);
        for (i, pair) in rest[..2 * count].chunks_exact(2).enumerate() {
            let c = (frame.components.iter()).position(|c| c.id == pair[0])?;
            let (d, a) = ((pair[1] >> 4) as usize, (pair[1] & 15) as usize);
            if seen.contains(&c) || d > 3 || a > 3 {
                return None;
            }
            seen.push(c);
            if dc[d].is_none() {
                // DC symbols are bit counts: libjpeg refuses tables with more than 15.
                let table = tables.dc[d].take()?;
                dc[d] = Some(table).filter(|t| t.max_symbol <= 15);
            }
            if ac[a].is_none() {
                ac[a] = Some(AcTable::new(tables.ac[a].take()?));
            }
            dc[d].as_ref()?;
            let component = &frame.components[c];
            let blocks = if count == 1 {
                1
            } else {
                component.h * component.v
            };
            let coding = Coding {
                component: i,
                dc: d,
                ac: a,
            };
            mcu.extend(std::iter::repeat_n(coding, blocks));
        }
        // libjpeg's limit (it refuses larger MCUs).
        if mcu.len() > 10 {
            return None;
        }
        let mcus = if count == 1 {
            let c = &frame.components[seen[0]];
            c.width_in_blocks * c.height_in_blocks
        } else {
            let max_h = frame.components.iter().map(|c| c.h).max()?;
            let max_v = frame.components.iter().map(|c| c.v).max()?;
            frame.width.div_ceil(8 * max_h) * frame.height.div_ceil(8 * max_v)
        };
        let interval_count = match restart_interval {
            0 => 1,
            n => mcus.div_ceil(n),
        };
        // Each interval ends in a marker: a file with fewer bytes is damaged, and libjpeg's.
        if interval_count > bytes.len() / 2 {
            return None;
        }
        // Every interval's data, each but the last ending in the restart marker due next.
        // Room for all the data and each interval's zero bytes, from the thread's buffers.
        let mut bits =
            Bits::with_capacity(bytes.len().saturating_sub(data_start) + 8 * interval_count);
        let mut intervals = Vec::with_capacity(interval_count);
        let mut pos = data_start;
        for i in 0..interval_count {
            intervals.push(bits.append(bytes, pos).ok()?);
            let marker = bits.marker();
            if i + 1 < interval_count {
                if bytes.get(marker..marker + 2) != Some(&[0xFF, 0xD0 + (i % 8) as u8]) {
                    return None;
                }
                pos = marker + 2;
            }
        }
        bits.select(intervals[0]);
        #[cfg(target_arch = "x86_64")]
        let bmi2 = bmi2::available();
        #[cfg(not(target_arch = "x86_64"))]
        let bmi2 = false;
        Some(Scan {
            bits,
            intervals,
            next_interval: 1,
            mcu,
            dc,
            ac,
            restart_interval,
            to_restart: restart_interval,
            predictions: [0; 4],
            out_of_data: false,
            bmi2,
            discarded: [0; 64],
        })
    }

    /// Where the scan's data ends in the file: the marker after it.
    pub fn end(&self) -> usize {
        self.bits.marker()
    }

    /// Blocks per MCU.
    pub fn blocks_per_mcu(&self) -> usize {
        self.mcu.len()
    }

    /// Whether the current interval's data has run out (libjpeg's `insufficient_data`).
    pub fn out_of_data(&self) -> bool {
        self.out_of_data
    }

    /// Decodes the next MCU into `blocks` (zeroed, one per block of the MCU), or discards it.
    pub fn decode_mcu(&mut self, blocks: Option<&mut [&mut Block]>) {
        if self.restart_interval > 0 {
            if self.to_restart == 0 {
                // Past the last interval (libjpeg asks for no more MCUs than the scan has)
                // there is no data: the MCUs stay zero.
                let interval = self.intervals.get(self.next_interval).copied();
                if let Some(interval) = interval {
                    self.bits.select(interval);
                }
                self.next_interval += 1;
                self.predictions = [0; 4];
                self.out_of_data = interval.is_none();
                self.to_restart = self.restart_interval;
            }
            self.to_restart -= 1;
        }
        if self.out_of_data {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.bmi2 {
            return bmi2::decode_blocks(self, blocks);
        }
        self.decode_blocks(blocks);
    }

    /// The MCU's blocks, from the current interval's data.
    #[inline(always)]
    fn decode_blocks(&mut self, mut blocks: Option<&mut [&mut Block]>) {
        // A local reader, whose state the compiler keeps in registers.
        let mut bits = std::mem::take(&mut self.bits);
        for (i, coding) in self.mcu.iter().enumerate() {
            let block = match blocks.as_deref_mut() {
                Some(blocks) => &mut *blocks[i],
                None => &mut self.discarded,
            };
            let dc = self.dc[coding.dc].as_deref().expect("checked in new");
            let ac = self.ac[coding.ac].as_ref().expect("checked in new");
            let prediction = &mut self.predictions[coding.component];
            decode_block(&mut bits, dc, ac, prediction, block);
        }
        self.out_of_data = bits.overran();
        self.bits = bits;
    }
}

#[cfg(test)]
thread_local! {
    /// Set by tests to decode without BMI2 on any CPU.
    pub(super) static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`Scan::decode_blocks`] compiled with BMI2, whose shifts by a register's count (`shlx`,
/// `shrx`) take one cycle and no flags: the bit reader shifts by each code's length.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // a target-feature function; the unsafe block says why it holds
mod bmi2 {
    use super::{Block, Scan};

    pub(super) fn available() -> bool {
        #[cfg(test)]
        if super::PORTABLE.get() {
            return false;
        }
        std::is_x86_feature_detected!("bmi2")
    }

    pub(super) fn decode_blocks(scan: &mut Scan, blocks: Option<&mut [&mut Block]>) {
        // SAFETY: called only where the scan found BMI2 `available`.
        unsafe { with_bmi2(scan, blocks) }
    }

    #[target_feature(enable = "bmi2")]
    fn with_bmi2(scan: &mut Scan, blocks: Option<&mut [&mut Block]>) {
        scan.decode_blocks(blocks);
    }
}

/// One block: its DC difference and its AC coefficients, as libjpeg's `decode_mcu_slow`.
#[inline(always)]
fn decode_block(
    bits: &mut Bits,
    dc: &Huffman,
    ac: &AcTable,
    prediction: &mut i32,
    block: &mut Block,
) {
    // A code (17 bits at most) and its value bits (15): refilled below 32.
    bits.ensure(32);
    let size = bits.symbol_as_libjpeg(dc) as u32;
    *prediction = prediction.wrapping_add(extend(bits.take_buffered(size), size));
    block[0] = *prediction as i16;
    let mut k = 1;
    while k < 64 {
        bits.ensure(32);
        let entry = ac.fast[bits.peek(FAST_BITS)];
        if entry != 0 {
            let first = k + (entry >> 10 & 15) as usize;
            if first + 1 < 64 {
                bits.consume((entry & 31) as u32);
                block[NATURAL[first]] = (entry >> 32) as i16;
                // Where there is no second coefficient, the first again.
                let second = first + (entry >> 14 & 31) as usize;
                block[NATURAL[second]] = (entry >> 48) as i16;
                k = second + 1;
                if entry & END_OF_BLOCK != 0 {
                    break;
                }
            } else {
                // The block's last coefficient: libjpeg reads nothing after it.
                bits.consume((entry >> 5 & 31) as u32);
                block[NATURAL[first]] = (entry >> 32) as i16;
                k = first + 1;
            }
            continue;
        }
        let symbol = bits.symbol_as_libjpeg(&ac.table);
        let (run, size) = ((symbol >> 4) as usize, (symbol & 15) as u32);
        if size != 0 {
            k += run;
            block[NATURAL[k]] = extend(bits.take_buffered(size), size) as i16;
            k += 1;
        } else if run == 15 {
            k += 16;
        } else {
            break;
        }
    }
}
