//! Entropy decoding of progressive JPEGs into the coefficient blocks libjpeg's output pass
//! reads, instead of libjpeg's own: most of a progressive photo's decoding time is libjpeg's
//! refinement scans, which visit every coefficient of every block for each correction bit.
//! Here each block keeps a mask of its coefficients already nonzero, so a refinement scan
//! touches only those, without a branch on their values.
//!
//! Coefficients are lossless: any correct decoder gives libjpeg's values, so the pixels stay
//! exactly libjpeg's. To keep it so on every file, anything this decoder does not take for
//! certain (a marker or table it does not expect, a scan order libjpeg would warn about, data
//! cut short, a restart marker out of sequence, coefficients left unrefined) makes it return
//! [`Stop::Unsupported`], and libjpeg decodes the file from the start as before.

use super::budget::{too_many_scans, Budget, MAX_JPEG_SCANS};
use super::huffman::{
    extend, next_marker, segment, Bits, Block, Huffman, Result, Stop, Tables, NATURAL,
};

/// Coefficients libjpeg's block smoothing looks at: all of them must end fully refined, or
/// libjpeg would smooth the image and this decoder is not used.
const SMOOTHED: usize = 10;

/// A component's place in the frame, as libjpeg computed it from the header.
pub(super) struct Component {
    pub id: u8,
    pub h: usize,
    pub v: usize,
    pub width_in_blocks: usize,
    pub height_in_blocks: usize,
}

impl Component {
    /// Blocks per row of its coefficient array: libjpeg rounds up to whole MCUs.
    pub fn blocks_per_row(&self) -> usize {
        self.width_in_blocks.div_ceil(self.h) * self.h
    }

    /// Rows of blocks of its coefficient array.
    pub fn block_rows(&self) -> usize {
        self.height_in_blocks.div_ceil(self.v) * self.v
    }
}

/// The frame of a progressive JPEG, from libjpeg's reading of its header.
pub(super) struct Frame {
    pub width: usize,
    pub height: usize,
    pub components: Vec<Component>,
}

/// Decodes every scan of `bytes` (a progressive JPEG whose header gave `frame`) into `planes`,
/// one per component, each `blocks_per_row * block_rows` zeroed blocks.
pub(super) fn decode(
    bytes: &[u8],
    frame: &Frame,
    planes: &mut [&mut [Block]],
    budget: &Budget,
) -> Result<()> {
    if !bytes.starts_with(&[0xFF, 0xD8])
        || planes.len() != frame.components.len()
        || frame.components.len() > 4
    {
        return Err(Stop::Unsupported);
    }
    for (plane, c) in planes.iter().zip(&frame.components) {
        if plane.len() != c.blocks_per_row() * c.block_rows() {
            return Err(Stop::Unsupported);
        }
    }
    let mut decoder = Decoder {
        frame,
        masks: planes.iter().map(|p| vec![0; p.len()]).collect(),
        planes,
        progress: vec![[-1; 64]; frame.components.len()],
        tables: Tables::default(),
        restart_interval: 0,
        data: Bits::with_capacity(bytes.len()),
        budget,
    };
    let mut pos = 2;
    let mut scans = 0;
    let mut frames = 0;
    loop {
        let (marker, at) = next_marker(bytes, pos)?;
        pos = at;
        match marker {
            0xD9 => break,
            // One progressive Huffman frame (libjpeg's other multi-scan kinds are left to it).
            0xDA if frames != 1 => return Err(Stop::Unsupported),
            0xDA => {
                scans += 1;
                if scans > MAX_JPEG_SCANS {
                    return Err(Stop::TooCostly(too_many_scans()));
                }
                let header = segment(bytes, pos)?;
                pos = decoder.scan(bytes, pos + 2 + header.len(), header)?;
                continue;
            }
            0xC4 => decoder.tables.define(segment(bytes, pos)?)?,
            0xDD => match segment(bytes, pos)? {
                &[high, low] => decoder.restart_interval = u16::from_be_bytes([high, low]),
                _ => return Err(Stop::Unsupported),
            },
            // The frame, and quantisation tables libjpeg latches at each component's first
            // scan: defined before the first scan, as libjpeg read them with the header.
            0xC2 if scans == 0 => frames += 1,
            0xDB if scans == 0 => {}
            0xE0..=0xEF | 0xFE => {}
            _ => return Err(Stop::Unsupported),
        }
        pos += 2 + segment(bytes, pos)?.len();
    }
    // libjpeg smooths blocks whose first coefficients are not all fully refined.
    let complete = decoder
        .progress
        .iter()
        .all(|p| p[..SMOOTHED] == [0; SMOOTHED]);
    if complete {
        Ok(())
    } else {
        Err(Stop::Unsupported)
    }
}

struct Decoder<'a, 'p> {
    frame: &'a Frame,
    planes: &'a mut [&'p mut [Block]],
    /// Per block, bit `k` set where the coefficient at zigzag index `k` is nonzero.
    masks: Vec<Vec<u64>>,
    /// Per component and coefficient, its precision so far (libjpeg's `coef_bits`): -1 until
    /// its first scan, then the scan's `Al`.
    progress: Vec<[i8; 64]>,
    tables: Tables,
    restart_interval: u16,
    /// The entropy-coded data being read.
    data: Bits,
    budget: &'a Budget,
}

/// What a scan codes, from its header.
struct Scan {
    /// Component indices, with their DC and AC tables.
    components: Vec<(usize, usize, usize)>,
    ss: usize,
    se: usize,
    ah: u8,
    al: u8,
}

impl Decoder<'_, '_> {
    /// Reads a scan's header and decodes its data from `pos`; returns where its data ends.
    fn scan(&mut self, bytes: &[u8], pos: usize, header: &[u8]) -> Result<usize> {
        let scan = self.scan_header(header)?;
        let dc = scan.ss == 0;
        for &(c, dc_table, ac_table) in &scan.components {
            let needed = if dc {
                // DC tables' symbols are bit counts: libjpeg refuses more than 15.
                match &self.tables.dc[dc_table] {
                    Some(table) => scan.ah != 0 || table.max_symbol <= 15,
                    None => scan.ah != 0,
                }
            } else {
                self.tables.ac[ac_table].is_some()
            };
            if !needed {
                return Err(Stop::Unsupported);
            }
            // Each coefficient's first scan once, then refinements one bit at a time in
            // order: anything else makes libjpeg warn, and is left to it.
            for k in scan.ss..=scan.se {
                let before = self.progress[c][k];
                let in_order = if scan.ah == 0 {
                    before == -1
                } else {
                    before == scan.ah as i8
                };
                if !in_order || (!dc && self.progress[c][0] == -1) {
                    return Err(Stop::Unsupported);
                }
                self.progress[c][k] = scan.al as i8;
            }
        }
        let Decoder {
            frame,
            planes,
            masks,
            tables,
            restart_interval,
            data,
            budget,
            ..
        } = self;
        data.start(bytes, pos)?;
        // An AC scan codes one component, with its AC table.
        let (ac_table, al) = (scan.components[0].2, scan.al);
        let p1 = 1i16 << al;
        let blocks = Blocks {
            frame,
            planes,
            masks,
            scan: &scan,
            restart_interval: *restart_interval as usize,
            budget,
        };
        match (scan.ss, scan.ah) {
            (0, 0) => blocks.each(bytes, data, |bits, state, i, block, _| {
                let table = tables.dc(scan.components[i].1);
                dc_first(bits, table, block, &mut state.dc_predictions[i], al)
            }),
            (0, _) => blocks.each(bytes, data, |bits, _, _, block, _| {
                if bits.take(1) != 0 {
                    block[0] |= p1;
                }
                Ok(())
            }),
            (_, 0) => {
                let ac = AcScan::of(&scan, tables.ac(ac_table));
                blocks.each(bytes, data, |bits, state, _, block, mask| {
                    ac_first(bits, ac, Coded { block, mask }, &mut state.eob_run)
                })
            }
            _ => {
                let ac = AcScan::of(&scan, tables.ac(ac_table));
                let refine = ac_refine_on_this_cpu();
                blocks.each(bytes, data, |bits, state, _, block, mask| {
                    refine(bits, ac, Coded { block, mask }, &mut state.eob_run)
                })
            }
        }
    }

    fn scan_header(&self, header: &[u8]) -> Result<Scan> {
        let [count, rest @ ..] = header else {
            return Err(Stop::Unsupported);
        };
        let count = *count as usize;
        if !(1..=4).contains(&count) || rest.len() != 2 * count + 3 {
            return Err(Stop::Unsupported);
        }
        let mut components: Vec<(usize, usize, usize)> = Vec::with_capacity(count);
        for pair in rest[..2 * count].chunks_exact(2) {
            let c = (self.frame.components.iter())
                .position(|c| c.id == pair[0])
                .ok_or(Stop::Unsupported)?;
            let (dc, ac) = ((pair[1] >> 4) as usize, (pair[1] & 15) as usize);
            if components.iter().any(|&(seen, ..)| seen == c) || dc > 3 || ac > 3 {
                return Err(Stop::Unsupported);
            }
            components.push((c, dc, ac));
        }
        let [ss, se, a] = rest[2 * count..] else {
            return Err(Stop::Unsupported);
        };
        let (ss, se, ah, al) = (ss as usize, se as usize, a >> 4, a & 15);
        let band_ok = if ss == 0 {
            se == 0
        } else {
            se >= ss && se <= 63 && count == 1
        };
        let refinement_ok = ah == 0 || al + 1 == ah;
        if !band_ok || !refinement_ok || al > 13 {
            return Err(Stop::Unsupported);
        }
        Ok(Scan {
            components,
            ss,
            se,
            ah,
            al,
        })
    }
}

/// What decoding a block of an AC scan needs of the scan.
#[derive(Clone, Copy)]
struct AcScan<'t> {
    table: &'t Huffman,
    ss: usize,
    se: usize,
    al: u8,
}

impl<'t> AcScan<'t> {
    fn of(scan: &Scan, table: &'t Huffman) -> Self {
        let (ss, se, al) = (scan.ss, scan.se, scan.al);
        AcScan { table, ss, se, al }
    }
}

/// A block being decoded, and the mask of its nonzero coefficients (bit `k`: zigzag index `k`).
struct Coded<'b> {
    block: &'b mut Block,
    mask: &'b mut u64,
}

/// The blocks of one scan, in the order its data codes them, and its restart intervals.
struct Blocks<'s, 'p> {
    frame: &'s Frame,
    planes: &'s mut [&'p mut [Block]],
    masks: &'s mut [Vec<u64>],
    scan: &'s Scan,
    restart_interval: usize,
    budget: &'s Budget,
}

impl Blocks<'_, '_> {
    /// Calls `decode` on each block of the scan (with the index of its component in the
    /// scan); `bits` holds the scan's first interval. Returns where the scan's data ends.
    fn each(
        self,
        bytes: &[u8],
        bits: &mut Bits,
        mut decode: impl FnMut(&mut Bits, &mut State, usize, &mut Block, &mut u64) -> Result<()>,
    ) -> Result<usize> {
        let frame = self.frame;
        // A scan of one component codes its blocks in raster order, one per MCU; else each
        // MCU holds each component's `h x v` blocks.
        let single = self.scan.components.len() == 1;
        let (mcus_per_row, mcu_rows) = if single {
            let c = &frame.components[self.scan.components[0].0];
            (c.width_in_blocks, c.height_in_blocks)
        } else {
            let max_h = frame.components.iter().map(|c| c.h).max().unwrap_or(1);
            let max_v = frame.components.iter().map(|c| c.v).max().unwrap_or(1);
            (
                frame.width.div_ceil(8 * max_h),
                frame.height.div_ceil(8 * max_v),
            )
        };
        let layout: Vec<(usize, usize, usize, usize)> = (self.scan.components.iter())
            .map(|&(c, ..)| {
                let component = &frame.components[c];
                let (h, v) = if single {
                    (1, 1)
                } else {
                    (component.h, component.v)
                };
                (c, h, v, component.blocks_per_row())
            })
            .collect();
        let mut state = State::default();
        let mut to_restart = self.restart_interval;
        let mut restarts = 0u8;
        for row in 0..mcu_rows {
            // Reading the thread's CPU clock is a system call: every few rows.
            if row % 16 == 0 && self.budget.exceeded() {
                return Err(Stop::TooCostly(self.budget.why()));
            }
            if single && self.restart_interval == 0 {
                // The common case, without the MCU bookkeeping: a row of blocks.
                let (c, .., per_row) = layout[0];
                let first = row * per_row;
                let blocks = (self.planes[c].get_mut(first..first + mcus_per_row))
                    .ok_or(Stop::Unsupported)?;
                let masks = &mut self.masks[c][first..first + mcus_per_row];
                for (block, mask) in blocks.iter_mut().zip(masks) {
                    decode(bits, &mut state, 0, block, mask)?;
                }
                continue;
            }
            for col in 0..mcus_per_row {
                if self.restart_interval > 0 {
                    if to_restart == 0 {
                        // The restart marker the interval must end with, in sequence.
                        let at = bits.end()?;
                        if bytes.get(at..at + 2) != Some(&[0xFF, 0xD0 + restarts]) {
                            return Err(Stop::Unsupported);
                        }
                        restarts = (restarts + 1) % 8;
                        bits.start(bytes, at + 2)?;
                        state = State::default();
                        to_restart = self.restart_interval;
                    }
                    to_restart -= 1;
                }
                for (i, &(c, h, v, per_row)) in layout.iter().enumerate() {
                    let (plane, masks) = (&mut *self.planes[c], &mut self.masks[c]);
                    for y in 0..v {
                        let first = (row * v + y) * per_row + col * h;
                        let blocks = plane.get_mut(first..first + h).ok_or(Stop::Unsupported)?;
                        for (block, mask) in blocks.iter_mut().zip(&mut masks[first..]) {
                            decode(bits, &mut state, i, block, mask)?;
                        }
                    }
                }
            }
        }
        bits.end()
    }
}

/// What carries from block to block within a restart interval.
#[derive(Default)]
struct State {
    dc_predictions: [i32; 4],
    eob_run: u32,
}

fn dc_first(
    bits: &mut Bits,
    table: &Huffman,
    block: &mut Block,
    prediction: &mut i32,
    al: u8,
) -> Result<()> {
    let size = bits.symbol(table)?;
    let difference = extend(bits.take(size as u32), size as u32);
    *prediction = prediction
        .checked_add(difference)
        .ok_or(Stop::Unsupported)?;
    block[0] = ((*prediction as u32) << al) as i16;
    Ok(())
}

fn ac_first(bits: &mut Bits, scan: AcScan, coded: Coded, eob_run: &mut u32) -> Result<()> {
    let Coded { block, mask } = coded;
    if *eob_run > 0 {
        *eob_run -= 1;
        return Ok(());
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let symbol = bits.symbol(scan.table)?;
        let (run, size) = ((symbol >> 4) as usize, (symbol & 15) as u32);
        if size != 0 {
            k += run;
            if k > scan.se {
                return Err(Stop::Unsupported);
            }
            let value = extend(bits.take(size), size);
            let coefficient = ((value as u32) << scan.al) as i16;
            block[NATURAL[k]] = coefficient;
            *mask |= ((coefficient != 0) as u64) << k;
            k += 1;
        } else if run == 15 {
            k += 16;
        } else {
            *eob_run = (1 << run) + bits.take(run as u32) - 1;
            break;
        }
    }
    Ok(())
}

/// One block of a refinement scan of AC coefficients.
type Refine = fn(&mut Bits, AcScan, Coded, &mut u32) -> Result<()>;

#[cfg(test)]
thread_local! {
    /// Set by tests to decode with the portable [`ac_refine`] on any CPU.
    pub(super) static PORTABLE_REFINEMENT: std::cell::Cell<bool> =
        const { std::cell::Cell::new(false) };
}

/// [`ac_refine`] as this CPU runs it fastest.
fn ac_refine_on_this_cpu() -> Refine {
    #[cfg(test)]
    if PORTABLE_REFINEMENT.get() {
        return ac_refine::<false>;
    }
    #[cfg(target_arch = "x86_64")]
    if bmi2::deposits_fast() {
        return bmi2::ac_refine;
    }
    ac_refine::<false>
}

/// [`ac_refine`] with BMI2's bit deposit (`pdep`) finding the coefficient a run of zeros ends
/// at, in one instruction where a loop over the run mispredicts its end (a quarter fewer
/// branch mispredictions over a photo's decode).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // a target-feature function; each unsafe block says why it holds
mod bmi2 {
    use std::sync::OnceLock;

    use super::{AcScan, Bits, Coded, Result};

    /// Whether the CPU has BMI2 and runs `pdep` in a few cycles: AMD's before Zen 3 (family
    /// 0x19) and Hygon's run it in microcode, tens to hundreds of cycles.
    pub(super) fn deposits_fast() -> bool {
        static FAST: OnceLock<bool> = OnceLock::new();
        *FAST.get_or_init(|| {
            use std::arch::x86_64::__cpuid;
            if !std::is_x86_feature_detected!("bmi2") {
                return false;
            }
            let vendor = __cpuid(0);
            let vendor = [vendor.ebx, vendor.edx, vendor.ecx].map(u32::to_le_bytes);
            let family = __cpuid(1).eax;
            let family = (family >> 8 & 0xF) + (family >> 20 & 0xFF);
            match vendor.as_flattened() {
                b"GenuineIntel" => true,
                b"AuthenticAMD" => family >= 0x19,
                _ => false,
            }
        })
    }

    pub(super) fn ac_refine(
        bits: &mut Bits,
        scan: AcScan,
        coded: Coded,
        eob: &mut u32,
    ) -> Result<()> {
        // SAFETY: only handed out where `deposits_fast`, so the CPU has BMI2.
        unsafe { with_bmi2(|| super::ac_refine::<true>(bits, scan, coded, eob)) }
    }

    /// `work` compiled for BMI2 (with what it inlines, as `ac_refine` is).
    #[target_feature(enable = "bmi2")]
    fn with_bmi2<R>(work: impl FnOnce() -> R) -> R {
        work()
    }

    /// The lowest set bit of `ones` with `n` set bits below it (0 if none).
    #[inline(always)]
    pub(super) fn nth_one(ones: u64, n: u8) -> u64 {
        // SAFETY: called only from `ac_refine::<true>`, which runs within `with_bmi2`.
        unsafe { std::arch::x86_64::_pdep_u64(1 << n, ones) }
    }
}

/// One block of a refinement scan of AC coefficients (`PDEP`: through [`bmi2::ac_refine`]).
#[inline(always)]
fn ac_refine<const PDEP: bool>(
    bits: &mut Bits,
    scan: AcScan,
    coded: Coded,
    eob_run: &mut u32,
) -> Result<()> {
    let Coded { block, mask } = coded;
    let p1 = 1i16 << scan.al;
    let mut k = scan.ss;
    if *eob_run == 0 {
        while k <= scan.se {
            let symbol = bits.symbol(scan.table)?;
            let (run, size) = (symbol >> 4, symbol & 15);
            let new = match size {
                0 if run < 15 => {
                    *eob_run = (1 << run) + bits.take(run as u32);
                    break;
                }
                0 => 0,
                1 if bits.take(1) != 0 => p1,
                1 => -p1,
                _ => return Err(Stop::Unsupported),
            };
            // The coefficient `run` still-zero ones on, correcting the nonzero ones passed.
            let zeros = !*mask & band(k, scan.se);
            let zeros = match PDEP {
                #[cfg(target_arch = "x86_64")]
                true => bmi2::nth_one(zeros, run),
                _ => (0..run).fold(zeros, |zeros, _| zeros & zeros.wrapping_sub(1)),
            };
            if zeros == 0 {
                if new != 0 {
                    return Err(Stop::Unsupported);
                }
                // A run of zeros past the band's end: libjpeg corrects the rest and ends the
                // block there.
                correct(bits, block, *mask & band(k, scan.se), p1);
                return Ok(());
            }
            let target = zeros.trailing_zeros() as usize;
            correct(
                bits,
                block,
                *mask & band(k, scan.se) & !band(target, 63),
                p1,
            );
            if new != 0 {
                block[NATURAL[target]] = new;
                *mask |= 1 << target;
            }
            k = target + 1;
        }
    }
    if *eob_run > 0 {
        if k <= scan.se {
            correct(bits, block, *mask & band(k, scan.se), p1);
        }
        *eob_run -= 1;
    }
    Ok(())
}

/// Reads one correction bit for each coefficient in `nonzero` (zigzag bits), in order, and
/// adds `p1` to the magnitude of those whose bit is set (once: a bit already there stays).
#[inline(always)]
fn correct(bits: &mut Bits, block: &mut Block, mut nonzero: u64, p1: i16) {
    while nonzero != 0 {
        let k = nonzero.trailing_zeros() as usize;
        nonzero &= nonzero - 1;
        let raise = bits.bit();
        let coefficient = &mut block[NATURAL[k]];
        // Without branches: the signs of the coefficients are as good as random.
        let sign = *coefficient >> 15;
        let away_from_zero = (p1 ^ sign) - sign;
        let raise = raise & (*coefficient & p1 == 0);
        *coefficient = coefficient.wrapping_add(away_from_zero & -(raise as i16));
    }
}

/// Bits `from..=to` of a zigzag mask.
fn band(from: usize, to: usize) -> u64 {
    (u64::MAX << from) & (u64::MAX >> (63 - to))
}

#[cfg(test)]
mod tests {
    use super::band;

    #[test]
    fn bands_are_inclusive() {
        assert_eq!(band(0, 63), u64::MAX);
        assert_eq!(band(1, 5), 0b11_1110);
        assert_eq!(band(63, 63), 1 << 63);
    }
}
