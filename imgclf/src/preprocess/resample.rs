//! Pillow's antialiased bilinear resampling (`Image.resize(..., BILINEAR)`), bit for bit.
//!
//! The reference results come from Pillow, and its fixed-point arithmetic differs from other
//! resizers by one level on many pixels, enough to move a probability by 0.01. So this follows
//! `libImaging/Resample.c`: double-precision filter weights normalised per output pixel, rounded
//! to 22-bit fixed point, a horizontal pass into an 8-bit intermediate, then a vertical pass.
//! Only the pixels inside the crop window are computed; each is computed exactly as Pillow would
//! compute it for the full image.

use std::ops::Range;

use super::helper_thread::HelperThread;
use super::scratch::Scratch;
use super::Rect;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel of a range: the first input pixel, the number of inputs, and their
/// weights.
struct Coefficients {
    /// The output pixel that `bounds[0]` is for.
    first: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

impl Coefficients {
    /// Output pixel `at`'s first input pixel and its weights, one per input pixel.
    fn taps(&self, at: usize) -> (usize, &[i32]) {
        let i = at - self.first;
        let (min, len) = self.bounds[i];
        (min, &self.weights[i * self.ksize..][..len])
    }
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the output pixels in `wanted`
/// only: each pixel's taps depend on its own position alone, and a thin image's resized long
/// side can be a billion pixels, of which the crop keeps a few hundred.
fn coefficients(in_size: u32, out_size: u32, wanted: Range<usize>) -> Coefficients {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(wanted.len());
    let mut weights = vec![0i32; wanted.len() * ksize];
    let mut k = vec![0f64; ksize];
    let first = wanted.start;
    for xx in wanted {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) as usize - xmin;
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(xmax) {
            let w = bilinear(((x + xmin) as f64 - center + 0.5) * ss);
            *slot = w;
            ww += w;
        }
        for (x, &w) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[(xx - first) * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        first,
        bounds,
        weights,
        ksize,
    }
}

/// Added before the shift, so that it rounds to nearest.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// How one `width` x `height` image becomes the `window` of its resize to `new_w` x `new_h`.
pub(super) struct Plan {
    horizontal: Option<Coefficients>,
    /// The window's horizontal taps laid out for a SIMD kernel, where the CPU has one.
    #[cfg(target_arch = "x86_64")]
    simd: Option<Kernel>,
    vertical: Option<Coefficients>,
    /// The window's vertical taps laid out for an AVX-512 kernel, where the CPU has one.
    #[cfg(target_arch = "x86_64")]
    vertical_simd: Option<avx512::Vertical>,
    window: Rect,
    source: Rect,
}

impl Plan {
    pub(super) fn new(width: u32, height: u32, new_w: u32, new_h: u32, window: Rect) -> Self {
        let horizontal = (new_w != width)
            .then(|| coefficients(width, new_w, window.left..window.left + window.width));
        let vertical = (new_h != height)
            .then(|| coefficients(height, new_h, window.top..window.top + window.height));
        // Bounds grow with the output position, so the first and last output pixels of the
        // window bound what it reads.
        let span = |c: &Option<Coefficients>, start: usize, len: usize| match c {
            Some(c) => {
                let (last_min, last) = c.taps(start + len - 1);
                (c.taps(start).0, last_min + last.len())
            }
            None => (start, start + len),
        };
        let (left, right) = span(&horizontal, window.left, window.width);
        let (top, bottom) = span(&vertical, window.top, window.height);
        Self {
            #[cfg(target_arch = "x86_64")]
            simd: horizontal
                .as_ref()
                .and_then(|c| Kernel::new(c, window.left, window.width, left)),
            #[cfg(target_arch = "x86_64")]
            vertical_simd: vertical
                .as_ref()
                .and_then(|c| avx512::Vertical::new(c, window.top, window.height, top)),
            horizontal,
            vertical,
            window,
            source: Rect {
                left,
                top,
                width: right - left,
                height: bottom - top,
            },
        }
    }

    /// The source pixels the resize reads: all that needs decoding.
    pub(super) fn source(&self) -> Rect {
        self.source
    }

    /// The part of the resized image that is kept.
    pub(super) fn window(&self) -> Rect {
        self.window
    }

    /// Resizes the [`Self::source`] rectangle of packed RGB8 rows `pitch` bytes apart, `src`
    /// starting at its first pixel, and returns the window as packed RGB8 rows.
    pub(super) fn run(&self, src: &[u8], pitch: usize) -> Scratch {
        let row_len = self.source.width * 3;
        assert!(pitch >= row_len && src.len() >= (self.source.height - 1) * pitch + row_len);
        let mut resize = self.start();
        for y in 0..self.source.height {
            resize.push_row(&src[y * pitch..][..row_len]);
        }
        resize.finish()
    }

    /// A resize fed one source row at a time, top to bottom: a decoder's rows go through the
    /// horizontal pass while they are still in cache, and only the narrow intermediate is kept.
    pub(super) fn start(&self) -> Resize<'_> {
        Resize {
            plan: self,
            temp: Scratch::zeroed(self.source.height * self.window.width * 3),
            rows: 0,
        }
    }

    /// Like [`Self::start`] and [`Resize::finish`], with the source rows in two parts made at
    /// once: `upper` hands over the first `split` rows on this thread, `lower` the rest on
    /// `helper`'s (see [`HelperThread::fill_in_two`]).
    pub(super) fn run_in_two<E: Send>(
        &self,
        helper: &HelperThread,
        split: usize,
        upper: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E>,
        lower: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E> + Send,
    ) -> Result<Scratch, E> {
        let stride = self.window.width * 3;
        let mut temp = Scratch::zeroed(self.source.height * stride);
        let horizontal = self.checked_horizontal();
        helper.fill_in_two(&mut temp, stride, split, &horizontal, upper, lower)?;
        Ok(self.vertical_pass(temp))
    }

    /// Like [`Self::start`] and [`Resize::finish`], with the source rows that `rows` hands
    /// over on this thread resized on `helper`'s meanwhile (see
    /// [`HelperThread::fill_pipelined`]).
    pub(super) fn run_pipelined<E: Send>(
        &self,
        helper: &HelperThread,
        rows: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E>,
    ) -> Result<Scratch, E> {
        let stride = self.window.width * 3;
        let mut temp = Scratch::zeroed(self.source.height * stride);
        let horizontal = self.checked_horizontal();
        let row_len = self.source.width * 3;
        helper.fill_pipelined(&mut temp, stride, row_len, &horizontal, rows)?;
        Ok(self.vertical_pass(temp))
    }

    /// [`Self::horizontal`], checking that it is given source rows.
    fn checked_horizontal(&self) -> impl Fn(&[u8], &mut [u8]) + Sync + '_ {
        let row_len = self.source.width * 3;
        move |row, out| {
            assert_eq!(row.len(), row_len, "a source row");
            self.horizontal(row, out);
        }
    }

    /// The horizontal pass over one source row (packed RGB8 from the source's left edge) into
    /// one row of the 8-bit intermediate, as Pillow has it.
    fn horizontal(&self, in_row: &[u8], out_row: &mut [u8]) {
        let Some(c) = &self.horizontal else {
            let left = (self.window.left - self.source.left) * 3;
            out_row.copy_from_slice(&in_row[left..][..out_row.len()]);
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = &self.simd {
            kernel.horizontal(in_row, out_row);
            return;
        }
        for (x, out) in out_row.chunks_exact_mut(3).enumerate() {
            let at = self.window.left + x;
            let (xmin, k) = c.taps(at);
            let px = &in_row[(xmin - self.source.left) * 3..][..k.len() * 3];
            let mut sums = [ROUNDING; 3];
            for (px, &weight) in px.chunks_exact(3).zip(k) {
                sums[0] += i32::from(px[0]) * weight;
                sums[1] += i32::from(px[1]) * weight;
                sums[2] += i32::from(px[2]) * weight;
            }
            out.copy_from_slice(&sums.map(clip8));
        }
    }

    /// The vertical pass over the intermediate rows, Pillow's second pass.
    fn vertical_pass(&self, temp: Scratch) -> Scratch {
        let source = self.source;
        let stride = self.window.width * 3;
        let Some(c) = &self.vertical else { return temp };
        let mut out = Scratch::zeroed(self.window.height * stride);
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = &self.vertical_simd {
            kernel.pass(&temp, stride, &mut out);
            return out;
        }
        let mut sums = vec![0i32; stride];
        for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let at = self.window.top + y;
            let (ymin, k) = c.taps(at);
            // Row by row, so the inner loop runs along contiguous memory and vectorises.
            sums.fill(ROUNDING);
            for (j, &weight) in k.iter().enumerate() {
                let row = &temp[(ymin - source.top + j) * stride..][..stride];
                #[cfg(target_arch = "x86_64")]
                avx2::accumulate(&mut sums, row, weight);
                #[cfg(not(target_arch = "x86_64"))]
                accumulate(&mut sums, row, weight);
            }
            for (value, &sum) in out_row.iter_mut().zip(&sums) {
                *value = clip8(sum);
            }
        }
        out
    }
}

/// A [`Plan`] being run, row by row (see [`Plan::start`]).
pub(super) struct Resize<'a> {
    plan: &'a Plan,
    temp: Scratch,
    rows: usize,
}

impl Resize<'_> {
    /// The next source row: packed RGB8, the source rectangle's width.
    pub(super) fn push_row(&mut self, row: &[u8]) {
        let stride = self.plan.window.width * 3;
        assert!(
            self.rows < self.plan.source.height,
            "more rows than the source has"
        );
        assert_eq!(row.len(), self.plan.source.width * 3, "a source row");
        let out = &mut self.temp[self.rows * stride..][..stride];
        self.plan.horizontal(row, out);
        self.rows += 1;
    }

    /// The window as packed RGB8 rows, once every source row is in.
    pub(super) fn finish(self) -> Scratch {
        assert_eq!(self.rows, self.plan.source.height, "every source row");
        self.plan.vertical_pass(self.temp)
    }
}

/// `sums += row * weight`, lane by lane: the vertical pass's inner loop.
#[inline(always)]
fn accumulate(sums: &mut [i32], row: &[u8], weight: i32) {
    for (sum, &v) in sums.iter_mut().zip(row) {
        *sum += i32::from(v) * weight;
    }
}

/// A SIMD horizontal pass, with its taps laid out for it.
#[cfg(target_arch = "x86_64")]
enum Kernel {
    Avx2(avx2::Taps),
    Avx512(avx512::Taps),
}

#[cfg(target_arch = "x86_64")]
impl Kernel {
    /// The widest kernel this CPU runs for these taps (see each kernel's `Taps::new`).
    fn new(c: &Coefficients, left: usize, width: usize, source_left: usize) -> Option<Self> {
        avx512::Taps::new(c, left, width, source_left)
            .map(Kernel::Avx512)
            .or_else(|| avx2::Taps::new(c, left, width, source_left).map(Kernel::Avx2))
    }

    fn horizontal(&self, in_row: &[u8], out_row: &mut [u8]) {
        match self {
            Kernel::Avx2(taps) => taps.horizontal(in_row, out_row),
            Kernel::Avx512(taps) => taps.horizontal(in_row, out_row),
        }
    }
}

/// The horizontal pass with AVX2: four taps per step, multiplied and summed in 16-bit pairs
/// (`vpmaddwd`) on split weights. The same integer sums as the scalar pass, so the same bytes.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics; each unsafe block says why it holds
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Coefficients, ROUNDING};

    /// [`super::accumulate`], compiled for AVX2 where the CPU has it.
    pub(super) fn accumulate(sums: &mut [i32], row: &[u8], weight: i32) {
        #[target_feature(enable = "avx2")]
        fn with_avx2(sums: &mut [i32], row: &[u8], weight: i32) {
            super::accumulate(sums, row, weight)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { with_avx2(sums, row, weight) }
        } else {
            super::accumulate(sums, row, weight)
        }
    }

    /// Weights are split into 11-bit halves, `w = hi << 11 | lo`, so that each half fits the
    /// 16-bit lanes of `vpmaddwd`; the two sums recombine to the exact 32-bit sum.
    const SPLIT: u32 = 11;

    /// Per output pixel of the window: the offset of its first source byte in a row of the
    /// source rectangle, and its taps in groups of four: each group's weights as two `[i16; 16]`
    /// (high and low halves), laid out to meet the pixels as `pixels` shuffles them.
    pub(super) struct Taps {
        starts: Vec<usize>,
        groups: Vec<(usize, usize)>,
        hi: Vec<[i16; 16]>,
        lo: Vec<[i16; 16]>,
    }

    impl Taps {
        /// `None` where the CPU has no AVX2 (holding `Taps` proves it has), or where a weight
        /// is negative or too large to split (never for the bilinear filter).
        pub(super) fn new(
            c: &Coefficients,
            left: usize,
            width: usize,
            source_left: usize,
        ) -> Option<Self> {
            if !std::is_x86_feature_detected!("avx2") {
                return None;
            }
            let mut taps = Taps {
                starts: Vec::with_capacity(width),
                groups: Vec::with_capacity(width),
                hi: Vec::new(),
                lo: Vec::new(),
            };
            for at in left..left + width {
                let (xmin, k) = c.taps(at);
                let len = k.len();
                if k.iter().any(|&w| !(0..1 << (SPLIT + 15)).contains(&w)) {
                    return None;
                }
                taps.starts.push((xmin - source_left) * 3);
                taps.groups.push((taps.hi.len(), len.div_ceil(4)));
                for group in k.chunks(4) {
                    let w = |i: usize| group.get(i).copied().unwrap_or(0);
                    let (mut hi, mut lo) = ([0i16; 16], [0i16; 16]);
                    // Lanes: R, G, B and an empty pair, for taps (0, 1) then taps (2, 3).
                    for (half, (a, b)) in [(w(0), w(1)), (w(2), w(3))].into_iter().enumerate() {
                        for channel in 0..3 {
                            let lane = half * 8 + channel * 2;
                            hi[lane] = (a >> SPLIT) as i16;
                            hi[lane + 1] = (b >> SPLIT) as i16;
                            lo[lane] = (a & ((1 << SPLIT) - 1)) as i16;
                            lo[lane + 1] = (b & ((1 << SPLIT) - 1)) as i16;
                        }
                    }
                    taps.hi.push(hi);
                    taps.lo.push(lo);
                }
            }
            Some(taps)
        }

        /// The horizontal pass over one packed RGB row into one row of the intermediate.
        pub(super) fn horizontal(&self, in_row: &[u8], out_row: &mut [u8]) {
            // SAFETY: `self` exists only where the CPU has AVX2.
            unsafe { horizontal_row(in_row, out_row, self) };
        }
    }

    /// Sixteen bytes from `at`, zero past the end of `bytes`.
    #[inline(always)]
    fn sixteen(bytes: &[u8], at: usize) -> [u8; 16] {
        match bytes.get(at..at + 16) {
            Some(b) => b.try_into().expect("sixteen bytes"),
            None => {
                let mut padded = [0u8; 16];
                let tail = &bytes[at.min(bytes.len())..];
                padded[..tail.len()].copy_from_slice(tail);
                padded
            }
        }
    }

    const _: () = assert!(super::PRECISION_BITS == 22, "the shift below");

    /// One row: `row` starts at the row's first source byte (reads past its end see zeros,
    /// which only zero weights touch); `out_row` receives packed RGB.
    ///
    /// Four taps are 12 bytes, one 16-byte load: shuffled to R0 R1 G0 G1 B0 B1 _ _ R2 R3 G2
    /// G3 B2 B3 _ _, widened to 16-bit lanes, and `vpmaddwd` multiplies and adds each pair of
    /// taps per channel, for both halves of the weights.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_row(row: &[u8], out_row: &mut [u8], taps: &Taps) {
        let pixels = _mm_setr_epi8(0, 3, 1, 4, 2, 5, -1, -1, 6, 9, 7, 10, 8, 11, -1, -1);
        let rounding = _mm_set1_epi32(ROUNDING);
        // SAFETY (for the loads below): each reads exactly one `[i16; 16]` or `[u8; 16]`.
        let load = |w: &[i16; 16]| unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
        for (x, out) in out_row.chunks_exact_mut(3).enumerate() {
            let (first, groups) = taps.groups[x];
            let mut at = taps.starts[x];
            let (mut acc_hi, mut acc_lo) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (hi, lo) in taps.hi[first..first + groups]
                .iter()
                .zip(&taps.lo[first..first + groups])
            {
                let bytes = sixteen(row, at);
                // SAFETY: sixteen bytes.
                let bytes = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
                let wide = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(bytes, pixels));
                acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(wide, load(hi)));
                acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(wide, load(lo)));
                at += 12;
            }
            let acc = _mm256_add_epi32(_mm256_slli_epi32::<{ SPLIT as i32 }>(acc_hi), acc_lo);
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256::<1>(acc),
            );
            // Round, shift and clamp to 0..=255 (the two saturating packs), as `clip8` does.
            let shifted = _mm_srai_epi32::<22>(_mm_add_epi32(sum, rounding));
            let packed = _mm_packus_epi16(_mm_packs_epi32(shifted, shifted), shifted);
            out.copy_from_slice(&_mm_cvtsi128_si32(packed).to_le_bytes()[..3]);
        }
    }
}

/// The horizontal pass with AVX-512 (VBMI and VNNI), sixteen output bytes (channels of five or
/// six pixels) at a time. Each lane is one output byte, and sums its taps four at a time: for
/// each group of four taps, one `vpermt2b` gathers every lane's four source bytes from 128
/// bytes of the row, and `vpdpbusd` multiplies and sums them against the weights split into
/// three signed bytes, `w = d2 << 16 + d1 << 8 + d0`. A lane's sum then needs no reduction
/// across lanes: it lands in the output's byte order. The same integer sums as the scalar
/// pass, so the same bytes.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics; each unsafe block says why it holds
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Coefficients, ROUNDING};

    /// Output bytes a block computes at most: one per dword lane.
    const LANES: usize = 16;

    /// How far after a block's first pixel's first source byte its last pixel's may start:
    /// each lane reads 12 bytes from its pixel's start per group of four taps, all within the
    /// 128 bytes one gather selects from.
    const REACH: usize = 128 - 12;

    /// The window's output bytes in blocks of up to [`LANES`] consecutive ones: per block, its
    /// first source byte, its first output byte and how many it makes, where its groups start
    /// in `digits` and how many there are, and where each of its 64 byte lanes takes its byte
    /// from among the 128 a gather reads.
    pub(super) struct Taps {
        blocks: Vec<Block>,
        lanes: Vec<[u8; 64]>,
        /// Per block and group of four taps, the weights' three signed bytes, lane by lane;
        /// zero where a lane's pixel has no such tap (and in a block's unused lanes).
        digits: Vec<[[i8; 64]; 3]>,
    }

    struct Block {
        source: usize,
        out: usize,
        len: usize,
        first_group: usize,
        groups: usize,
    }

    impl Taps {
        /// `None` where the CPU lacks AVX-512 BW, VBMI or VNNI (holding `Taps` proves it has
        /// them), or where a weight is negative or over 1.0.
        pub(super) fn new(
            c: &Coefficients,
            left: usize,
            width: usize,
            source_left: usize,
        ) -> Option<Self> {
            let cpu_has_them = std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vbmi")
                && std::is_x86_feature_detected!("avx512vnni");
            if !cpu_has_them {
                return None;
            }
            let pixel = |x: usize| {
                let at = left + x;
                let (xmin, weights) = c.taps(at);
                ((xmin - source_left) * 3, weights)
            };
            if !(0..width).all(|x| splittable(pixel(x).1)) {
                return None;
            }
            let mut taps = Taps {
                blocks: Vec::new(),
                lanes: Vec::new(),
                digits: Vec::new(),
            };
            let bytes = width * 3;
            let mut out = 0;
            while out < bytes {
                // As many output bytes as fit: sixteen, or fewer where pixels lie far apart.
                let source = pixel(out / 3).0;
                let len = (out..bytes.min(out + LANES))
                    .take_while(|&b| pixel(b / 3).0 - source <= REACH)
                    .count();
                let groups = (out..out + len)
                    .map(|b| pixel(b / 3).1.len().div_ceil(4))
                    .max()
                    .unwrap_or(0);
                let mut lanes = [0u8; 64];
                let first_group = taps.digits.len();
                taps.digits.resize(first_group + groups, [[0i8; 64]; 3]);
                for (lane, b) in (out..out + len).enumerate() {
                    let (start, weights) = pixel(b / 3);
                    let channel = b % 3;
                    for t in 0..4 {
                        lanes[lane * 4 + t] = (start - source + 3 * t + channel) as u8;
                    }
                    for (tap, &w) in weights.iter().enumerate() {
                        let group = &mut taps.digits[first_group + tap / 4];
                        for (digits, d) in group.iter_mut().zip(split(w)) {
                            digits[lane * 4 + tap % 4] = d;
                        }
                    }
                }
                taps.blocks.push(Block {
                    source,
                    out,
                    len,
                    first_group,
                    groups,
                });
                taps.lanes.push(lanes);
                out += len;
            }
            Some(taps)
        }

        /// The horizontal pass over one packed RGB row into one row of the intermediate.
        pub(super) fn horizontal(&self, in_row: &[u8], out_row: &mut [u8]) {
            assert!(
                self.blocks
                    .last()
                    .is_none_or(|b| b.out + b.len <= out_row.len()),
                "the window's row"
            );
            // SAFETY: `self` exists only where the CPU has AVX-512 BW, VBMI and VNNI.
            unsafe { horizontal_row(in_row, out_row, self) };
        }
    }

    /// Whether every weight is one [`split`] takes: from 0 to 1.0.
    fn splittable(weights: &[i32]) -> bool {
        (weights.iter()).all(|&w| (0..=1 << super::PRECISION_BITS).contains(&w))
    }

    /// `w` as three signed bytes, lowest first: `w = d2 << 16 + d1 << 8 + d0`.
    pub(super) fn split(w: i32) -> [i8; 3] {
        let low = |v: i32| ((v + 128) & 255) - 128;
        let d0 = low(w);
        let d1 = low((w - d0) >> 8);
        let d2 = (((w - d0) >> 8) - d1) >> 8;
        [d0, d1, d2].map(|d| i8::try_from(d).expect("a weight of at most 1.0"))
    }

    /// Sixty-four bytes from `at`, zero past the end of `bytes`, straight into a register
    /// (a copy through the stack would stall the load that follows it).
    ///
    /// # Safety
    /// The CPU must have AVX-512 BW.
    #[inline]
    #[target_feature(enable = "avx512bw")]
    unsafe fn sixty_four(bytes: &[u8], at: usize) -> __m512i {
        let valid = bytes.len().saturating_sub(at);
        let mask = if valid >= 64 { !0 } else { (1u64 << valid) - 1 };
        // SAFETY: the mask reads only bytes inside `bytes`; masked-off bytes are not
        // touched, so the address past the end is never read.
        unsafe { _mm512_maskz_loadu_epi8(mask, bytes.as_ptr().wrapping_add(at).cast()) }
    }

    const _: () = assert!(super::PRECISION_BITS == 22, "the shift below");

    /// One row: `row` starts at the row's first source byte (reads past its end see zeros,
    /// which only zero weights touch); `out_row` receives packed RGB.
    ///
    /// # Safety
    /// The CPU must have AVX-512 BW, VBMI and VNNI; every block's output bytes must lie in
    /// `out_row`.
    #[target_feature(enable = "avx512bw,avx512vbmi,avx512vnni")]
    unsafe fn horizontal_row(row: &[u8], out_row: &mut [u8], taps: &Taps) {
        // SAFETY (for the loads below): each reads exactly 64 bytes of one array.
        let load = |bytes: *const [u8; 64]| unsafe { _mm512_loadu_si512(bytes.cast()) };
        let rounding = _mm512_set1_epi32(ROUNDING);
        for (block, lanes) in taps.blocks.iter().zip(&taps.lanes) {
            let lanes = load(lanes);
            let mut acc = [_mm512_setzero_si512(); 3];
            let digits = &taps.digits[block.first_group..][..block.groups];
            for (group, digits) in digits.iter().enumerate() {
                let at = block.source + 12 * group;
                // SAFETY: the CPU has AVX-512 BW.
                let (low, high) = unsafe { (sixty_four(row, at), sixty_four(row, at + 64)) };
                let bytes = _mm512_permutex2var_epi8(low, lanes, high);
                for (acc, digits) in acc.iter_mut().zip(digits) {
                    *acc = _mm512_dpbusd_epi32(*acc, bytes, load(digits.as_ptr().cast()));
                }
            }
            let [d0, d1, d2] = acc;
            let high = _mm512_add_epi32(_mm512_slli_epi32::<16>(d2), _mm512_slli_epi32::<8>(d1));
            let sum = _mm512_add_epi32(_mm512_add_epi32(high, d0), rounding);
            // Round, shift and clamp to 0..=255, as `clip8` does.
            let clamped = _mm512_max_epi32(_mm512_srai_epi32::<22>(sum), _mm512_setzero_si512());
            let mask = ((1u32 << block.len) - 1) as u16;
            let out = out_row[block.out..].as_mut_ptr();
            // SAFETY: the mask writes only the block's bytes, inside `out_row`.
            unsafe { _mm512_mask_cvtusepi32_storeu_epi8(out.cast(), mask, clamped) };
        }
    }

    /// The vertical pass's taps for [`vertical_pass`]: per output row of the window, its first
    /// source row (from the source rectangle's top), its number of taps and its first group
    /// of four; per group, each of the weights' three signed bytes for its four taps, packed
    /// in a dword (tap `t` in byte `t`; zero for a missing tap).
    pub(super) struct Vertical {
        rows: Vec<(usize, usize, usize)>,
        digits: Vec<[i32; 3]>,
    }

    impl Vertical {
        /// `None` where the CPU lacks AVX-512 BW or VNNI (holding `Vertical` proves it has
        /// them) or where a weight is negative or over 1.0.
        pub(super) fn new(
            c: &Coefficients,
            top: usize,
            height: usize,
            source_top: usize,
        ) -> Option<Self> {
            let cpu_has_them = std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni");
            if !cpu_has_them {
                return None;
            }
            let mut vertical = Vertical {
                rows: Vec::with_capacity(height),
                digits: Vec::new(),
            };
            for at in top..top + height {
                let (ymin, weights) = c.taps(at);
                let len = weights.len();
                if len == 0 || !splittable(weights) {
                    return None;
                }
                vertical
                    .rows
                    .push((ymin - source_top, len, vertical.digits.len()));
                for group in weights.chunks(4) {
                    let mut dwords = [0i32; 3];
                    for (t, &w) in group.iter().enumerate() {
                        for (dword, d) in dwords.iter_mut().zip(split(w)) {
                            *dword |= i32::from(d as u8) << (8 * t);
                        }
                    }
                    vertical.digits.push(dwords);
                }
            }
            Some(vertical)
        }

        /// The vertical pass over `temp`, rows of `stride` bytes from the source rectangle's
        /// top, into `out`, the window's rows.
        pub(super) fn pass(&self, temp: &[u8], stride: usize, out: &mut [u8]) {
            let last = self.rows.iter().map(|&(first, len, _)| first + len).max();
            assert!(
                temp.len() >= last.unwrap_or(0) * stride,
                "the rows the taps read"
            );
            assert_eq!(out.len(), self.rows.len() * stride, "the window's rows");
            // SAFETY: `self` exists only where the CPU has AVX-512 BW and VNNI.
            unsafe { vertical_pass(temp, stride, self, out) };
        }
    }

    /// Each output row, 64 bytes across at a time: four source rows' bytes are interleaved
    /// into dwords (`vpunpck*`, within each 128-bit block), `vpdpbusd` multiplies and sums
    /// the four taps per lane for each of the weights' three signed bytes, and the packs
    /// (also within each block) put the bytes back in order: the scalar pass's sums.
    ///
    /// # Safety
    /// The CPU must have AVX-512 BW and VNNI; `temp` must hold every row the taps read.
    #[target_feature(enable = "avx512bw,avx512vnni")]
    unsafe fn vertical_pass(temp: &[u8], stride: usize, taps: &Vertical, out: &mut [u8]) {
        let rounding = _mm512_set1_epi32(ROUNDING);
        for (out_row, &(first, len, group)) in out.chunks_exact_mut(stride).zip(&taps.rows) {
            for x in (0..stride).step_by(64) {
                let valid = stride - x;
                let mask = if valid >= 64 { !0 } else { (1u64 << valid) - 1 };
                // Digit by digit, the sums of the bytes 0..4, 4..8, 8..12 and 12..16 of each
                // 128-bit block.
                let mut acc = [[_mm512_setzero_si512(); 4]; 3];
                for (g, digits) in taps.digits[group..][..len.div_ceil(4)].iter().enumerate() {
                    // A missing fourth tap reads the last row again, with a zero weight.
                    let row = |t: usize| {
                        let at = (first + (4 * g + t).min(len - 1)) * stride + x;
                        // SAFETY: the row is inside `temp` (checked by `pass`) and the mask
                        // reads only its bytes from `x` on.
                        unsafe { _mm512_maskz_loadu_epi8(mask, temp.as_ptr().add(at).cast()) }
                    };
                    let (a, b, c, d) = (row(0), row(1), row(2), row(3));
                    let (ab_lo, ab_hi) = (_mm512_unpacklo_epi8(a, b), _mm512_unpackhi_epi8(a, b));
                    let (cd_lo, cd_hi) = (_mm512_unpacklo_epi8(c, d), _mm512_unpackhi_epi8(c, d));
                    let quads = [
                        _mm512_unpacklo_epi16(ab_lo, cd_lo),
                        _mm512_unpackhi_epi16(ab_lo, cd_lo),
                        _mm512_unpacklo_epi16(ab_hi, cd_hi),
                        _mm512_unpackhi_epi16(ab_hi, cd_hi),
                    ];
                    for (acc, &digit) in acc.iter_mut().zip(digits) {
                        let weights = _mm512_set1_epi32(digit);
                        for (acc, &quad) in acc.iter_mut().zip(&quads) {
                            *acc = _mm512_dpbusd_epi32(*acc, quad, weights);
                        }
                    }
                }
                let [d0, d1, d2] = acc;
                let sum = |q: usize| {
                    let high = _mm512_add_epi32(
                        _mm512_slli_epi32::<16>(d2[q]),
                        _mm512_slli_epi32::<8>(d1[q]),
                    );
                    let sum = _mm512_add_epi32(_mm512_add_epi32(high, d0[q]), rounding);
                    _mm512_srai_epi32::<22>(sum)
                };
                // Clamped to 0..=255 by the two saturating packs, as `clip8` does.
                let words = [
                    _mm512_packs_epi32(sum(0), sum(1)),
                    _mm512_packs_epi32(sum(2), sum(3)),
                ];
                let bytes = _mm512_packus_epi16(words[0], words[1]);
                // SAFETY: the mask writes only the bytes of `out_row` from `x` on.
                unsafe { _mm512_mask_storeu_epi8(out_row.as_mut_ptr().add(x).cast(), mask, bytes) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (from, to) in [(512, 256), (768, 341), (300, 256), (2560, 409), (256, 256)] {
            let c = coefficients(from, to, 0..to as usize);
            for x in 0..to as usize {
                let k = c.taps(x).1;
                let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{from}->{to} at {x}"
                );
            }
        }
    }

    #[test]
    fn a_window_s_taps_are_those_of_the_whole_resize() {
        for (from, to, wanted) in [(512, 256, 16..240), (300, 451, 113..337), (2, 800, 0..800)] {
            let whole = coefficients(from, to, 0..to as usize);
            let window = coefficients(from, to, wanted.clone());
            for at in wanted {
                assert_eq!(window.taps(at), whole.taps(at), "{from}->{to} at {at}");
            }
        }
    }

    #[test]
    fn a_thin_image_s_plan_holds_only_its_window() {
        // 4,000,000 x 1 resized to 1,024,000,000 x 256: taps for all of that long side would
        // take over 28 GB; the window needs 224 of them.
        let (width, height) = (4_000_000, 1);
        let (new_w, new_h) = super::super::resized_size(width, height, 256);
        assert_eq!((new_w, new_h), (1_024_000_000, 256));
        let window = Rect {
            left: super::super::centre_offset(new_w, 224) as usize,
            top: 16,
            width: 224,
            height: 224,
        };
        let plan = Plan::new(width, height, new_w, new_h, window);
        let horizontal = plan.horizontal.as_ref().unwrap();
        assert_eq!(horizontal.bounds.len(), 224);
        assert!(plan.source().width <= 3, "{:?}", plan.source());
    }

    /// `Plan::new`, with `kernel`'s choice of SIMD horizontal kernel (`None`: the scalar pass),
    /// and the SIMD vertical kernel where `vertical` and the CPU has it.
    #[cfg(target_arch = "x86_64")]
    fn with_kernel(
        (width, height, new_w, new_h): (u32, u32, u32, u32),
        window: Rect,
        kernel: fn(&Coefficients, usize, usize, usize) -> Option<Kernel>,
        vertical: bool,
    ) -> Plan {
        let plan = Plan::new(width, height, new_w, new_h, window);
        let simd = plan
            .horizontal
            .as_ref()
            .and_then(|c| kernel(c, window.left, window.width, plan.source.left));
        let vertical_simd = plan.vertical_simd.filter(|_| vertical);
        Plan {
            simd,
            vertical_simd,
            ..plan
        }
    }

    /// Every resize of a noisy image through each SIMD kernel this CPU runs gives the bytes
    /// of the scalar passes (which follow Pillow's code line by line).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_simd_pass_gives_the_scalar_bytes() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("this CPU has no AVX2: the SIMD kernels are not tested here");
            return;
        }
        let mut seed = 0x2545_f491_u32;
        let mut noise = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        };
        for (size, window_w) in [
            ((2560, 1600, 409, 256), 224),
            ((512, 512, 256, 256), 224),
            ((301, 257, 299, 256), 224),
            ((1000, 872, 293, 256), 223),
            ((300, 451, 256, 384), 224),
            ((97, 61, 33, 21), 33),
            ((4000, 300, 256, 19), 1),
            // Downscaling by more than 13: blocks of fewer pixels (neighbours far apart).
            ((4000, 300, 256, 19), 255),
            ((3300, 300, 256, 19), 256),
            // A steep vertical downscale: hundreds of vertical taps.
            ((300, 4000, 256, 19), 224),
        ] {
            let (.., new_w, new_h) = size;
            let window = Rect {
                left: (new_w as usize - window_w) / 2,
                top: (new_h as usize).saturating_sub(224) / 2,
                width: window_w,
                height: (new_h as usize).min(224),
            };
            let scalar = with_kernel(size, window, |_, _, _, _| None, false);
            let source = scalar.source();
            let src: Vec<u8> = (0..source.width * source.height * 3)
                .map(|_| noise())
                .collect();
            let pitch = source.width * 3;
            let expected = scalar.run(&src, pitch);
            let avx2 = with_kernel(
                size,
                window,
                |c, l, w, s| avx2::Taps::new(c, l, w, s).map(Kernel::Avx2),
                false,
            );
            let avx512 = with_kernel(
                size,
                window,
                |c, l, w, s| avx512::Taps::new(c, l, w, s).map(Kernel::Avx512),
                false,
            );
            let vertical = with_kernel(size, window, |_, _, _, _| None, true);
            assert!(avx2.simd.is_some(), "the CPU has AVX2");
            assert!(
                Plan::new(size.0, size.1, new_w, new_h, window)
                    .simd
                    .is_some(),
                "{size:?}: the CPU has AVX2, so the plan takes a SIMD kernel"
            );
            for (name, plan) in [("AVX2", avx2), ("AVX-512", avx512)] {
                if plan.simd.is_none() {
                    eprintln!(
                        "{name} does not run {size:?} here (CPU features or too steep a downscale)"
                    );
                    continue;
                }
                assert!(
                    *plan.run(&src, pitch) == *expected,
                    "{name}: {size:?}, window {window_w} wide"
                );
            }
            if vertical.vertical_simd.is_none() {
                eprintln!("this CPU has no AVX-512 VNNI: the vertical kernel is not tested here");
                continue;
            }
            assert!(
                *vertical.run(&src, pitch) == *expected,
                "AVX-512 vertical: {size:?}, window {window_w} wide"
            );
        }
    }

    /// The AVX-512 kernel's weights, split into three signed bytes, add up to the weights.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn split_weights_add_up() {
        for w in (0..=1 << PRECISION_BITS)
            .step_by(37)
            .chain([1 << 22, 127, 128, 32895])
        {
            let [d0, d1, d2] = avx512::split(w).map(i32::from);
            assert_eq!((d2 << 16) + (d1 << 8) + d0, w, "{w}");
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let window = Rect {
            left: 10,
            top: 5,
            width: 100,
            height: 80,
        };
        let plan = Plan::new(500, 300, 426, 256, window);
        let source = plan.source();
        let src = vec![77u8; source.width * source.height * 3];
        let out = plan.run(&src, source.width * 3);
        assert_eq!(out.len(), 100 * 80 * 3);
        assert!(out.iter().all(|&v| v == 77));
    }
}
