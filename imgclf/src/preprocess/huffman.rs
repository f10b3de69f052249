//! Huffman-coded JPEG data as libjpeg reads it: markers and segments, tables, and the
//! entropy-coded bits of a restart interval. Shared by the [`super::progressive`] and
//! [`super::baseline`] decoders.

use super::scratch::Scratch;

/// The position in a block (row-major) of each zigzag index: libjpeg's `jpeg_natural_order`,
/// with its 16 extra entries of 63, where damaged data's runs of zeros past a block's end
/// land.
pub(super) const NATURAL: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

/// One 8x8 block of quantised coefficients in natural order, as libjpeg's `JBLOCK`.
pub(super) type Block = [i16; 64];

/// Why a file was not decoded here.
#[derive(Debug)]
pub(super) enum Stop {
    /// Something this decoder leaves to libjpeg, which decodes the whole file instead.
    Unsupported,
    /// Over the decode's budget (libjpeg's progress monitor stops the same way).
    TooCostly(String),
}

pub(super) type Result<T> = std::result::Result<T, Stop>;

/// The marker at or after `pos` (skipping fill bytes and, as libjpeg does, stray bytes) and
/// the position of its segment's length.
pub(super) fn next_marker(bytes: &[u8], mut pos: usize) -> Result<(u8, usize)> {
    loop {
        let ff = bytes
            .get(pos..)
            .and_then(|rest| memchr::memchr(0xFF, rest))
            .ok_or(Stop::Unsupported)?;
        pos += ff + 1;
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        match bytes.get(pos) {
            None => return Err(Stop::Unsupported),
            Some(0) => pos += 1,
            Some(&marker) => return Ok((marker, pos + 1)),
        }
    }
}

/// The contents of the segment whose length field is at `pos`.
pub(super) fn segment(bytes: &[u8], pos: usize) -> Result<&[u8]> {
    let length = match bytes.get(pos..pos + 2) {
        Some(&[high, low]) => u16::from_be_bytes([high, low]) as usize,
        _ => return Err(Stop::Unsupported),
    };
    length
        .checked_sub(2)
        .and_then(|len| bytes.get(pos + 2..pos + 2 + len))
        .ok_or(Stop::Unsupported)
}

/// The JPEG value of `size` bits `raw` (sizes up to 16).
pub(super) fn extend(raw: u32, size: u32) -> i32 {
    // Without a branch (the sign is as good as random): -1 where `raw` codes a negative value.
    let negative = (raw as i32 - (1 << size >> 1)) >> 31;
    raw as i32 + (negative & ((-1 << size) + 1))
}

/// Appends the entropy-coded bytes from `pos` to the next marker to `out` without their
/// stuffed zero bytes (libjpeg's rule: FF, any further FFs, then 00 is one data byte FF), with
/// eight zero bytes after them; returns the position of the marker.
fn unstuff(bytes: &[u8], mut pos: usize, out: &mut Vec<u8>) -> Result<usize> {
    loop {
        let rest = bytes.get(pos..).ok_or(Stop::Unsupported)?;
        let ff = memchr::memchr(0xFF, rest).ok_or(Stop::Unsupported)?;
        out.extend_from_slice(&rest[..ff]);
        let mut next = pos + ff + 1;
        while bytes.get(next) == Some(&0xFF) {
            next += 1;
        }
        match bytes.get(next) {
            Some(0) => {
                out.push(0xFF);
                pos = next + 1;
            }
            Some(_) => {
                out.extend_from_slice(&[0; 8]);
                return Ok(pos + ff);
            }
            None => return Err(Stop::Unsupported),
        }
    }
}

/// A canonical Huffman table: a lookup of the first [`LOOKUP_BITS`] bits for short codes,
/// and libjpeg's `maxcode`/`valoffset` for the rest.
pub(super) struct Huffman {
    /// Code length (high byte) and symbol, or 0 for a longer code.
    pub lookup: [u16; 1 << LOOKUP_BITS],
    max_code: [i32; 18],
    value_offset: [i32; 17],
    values: Vec<u8>,
    pub max_symbol: u8,
}

pub(super) const LOOKUP_BITS: u32 = 9;

impl Huffman {
    /// Builds the table as libjpeg's `jpeg_make_d_derived_tbl` does, refusing what it
    /// refuses.
    fn new(counts: &[u8; 16], values: &[u8]) -> Result<Self> {
        let mut table = Huffman {
            lookup: [0; 1 << LOOKUP_BITS],
            max_code: [-1; 18],
            value_offset: [0; 17],
            values: values.to_vec(),
            max_symbol: values.iter().copied().max().unwrap_or(0),
        };
        let mut code = 0u32;
        let mut p = 0usize;
        for length in 1..=16u32 {
            let count = counts[length as usize - 1] as usize;
            if count > 0 {
                table.value_offset[length as usize] = p as i32 - code as i32;
                for symbol in &values[p..p + count] {
                    // No code may be all ones at its length (libjpeg: JERR_BAD_HUFF_TABLE).
                    if code + 1 >= 1 << length {
                        return Err(Stop::Unsupported);
                    }
                    if length <= LOOKUP_BITS {
                        let shift = LOOKUP_BITS - length;
                        let first = (code << shift) as usize;
                        let entry = (length as u16) << 8 | *symbol as u16;
                        table.lookup[first..first + (1 << shift)].fill(entry);
                    }
                    code += 1;
                }
                p += count;
                table.max_code[length as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        table.max_code[17] = i32::MAX;
        Ok(table)
    }
}

/// The Huffman tables defined so far, by class and number.
#[derive(Default)]
pub(super) struct Tables {
    pub dc: [Option<Box<Huffman>>; 4],
    pub ac: [Option<Box<Huffman>>; 4],
}

impl Tables {
    /// Adds (or replaces) the tables of a DHT segment.
    pub fn define(&mut self, mut segment: &[u8]) -> Result<()> {
        while let [class_id, rest @ ..] = segment {
            let (class, id) = (class_id >> 4, (class_id & 15) as usize);
            if rest.len() < 16 || id > 3 || class > 1 {
                return Err(Stop::Unsupported);
            }
            let counts: [u8; 16] = rest[..16].try_into().expect("16 counts");
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            if total > 256 {
                return Err(Stop::Unsupported);
            }
            let values = rest.get(16..16 + total).ok_or(Stop::Unsupported)?;
            let table = Box::new(Huffman::new(&counts, values)?);
            if class == 0 {
                self.dc[id] = Some(table);
            } else {
                self.ac[id] = Some(table);
            }
            segment = &rest[16 + total..];
        }
        Ok(())
    }

    /// DC table `id`, checked to be defined when its scan began.
    pub fn dc(&self, id: usize) -> &Huffman {
        self.dc[id].as_deref().expect("checked when the scan began")
    }

    /// AC table `id`, checked to be defined when its scan began.
    pub fn ac(&self, id: usize) -> &Huffman {
        self.ac[id].as_deref().expect("checked when the scan began")
    }
}

/// Where one restart interval's unstuffed data lies in [`Bits`]' buffer.
#[derive(Clone, Copy)]
pub(super) struct Interval {
    start: usize,
    len: usize,
}

/// Bits of restart intervals' entropy-coded data, unstuffed, read one interval at a time,
/// most significant first, with zeros after its end.
#[derive(Default)]
pub(super) struct Bits {
    /// The intervals' data, each followed by eight zero bytes.
    data: Scratch,
    /// The interval being read: where its data starts and ends in `data`.
    start: usize,
    end: usize,
    /// Where the marker after the last interval appended is, in the file.
    marker: usize,
    pos: usize,
    /// Unread bits, left-aligned.
    buffer: u64,
    count: u32,
    /// Zero bits supplied past the end of the interval's data.
    past_end: u64,
}

impl Bits {
    /// Bits with room for `capacity` bytes of data before they grow.
    pub fn with_capacity(capacity: usize) -> Self {
        Bits {
            data: Scratch::with_capacity(capacity),
            ..Bits::default()
        }
    }

    /// Reads the data at `pos` in `bytes`, up to the next marker, in place of any before.
    pub fn start(&mut self, bytes: &[u8], pos: usize) -> Result<()> {
        self.data.as_vec_mut().clear();
        let interval = self.append(bytes, pos)?;
        self.select(interval);
        Ok(())
    }

    /// Adds the data at `pos` in `bytes`, up to the next marker, as an interval to
    /// [`Self::select`] later; [`Self::marker`] is then where that marker is.
    pub fn append(&mut self, bytes: &[u8], pos: usize) -> Result<Interval> {
        let start = self.data.len();
        self.marker = unstuff(bytes, pos, self.data.as_vec_mut())?;
        let len = self.data.len() - 8 - start;
        Ok(Interval { start, len })
    }

    /// Where the marker after the last interval appended is, in the file.
    pub fn marker(&self) -> usize {
        self.marker
    }

    /// Reads `interval` from its start.
    pub fn select(&mut self, interval: Interval) {
        (self.start, self.end) = (interval.start, interval.start + interval.len);
        (self.pos, self.buffer, self.count, self.past_end) = (interval.start, 0, 0, 0);
    }

    /// Whether more bits were read than the interval's data holds (libjpeg reads zeros
    /// there, and leaves the rest of the interval undecoded).
    #[inline(always)]
    pub fn overran(&self) -> bool {
        let read = (self.pos - self.start) as u64 * 8 + self.past_end - self.count as u64;
        read > (self.end - self.start) as u64 * 8
    }

    /// Where the marker after the data is, unless more bits were read than the data holds
    /// (libjpeg would have run out and left the rest of the scan undecoded).
    pub fn end(&self) -> Result<usize> {
        if self.overran() {
            return Err(Stop::Unsupported);
        }
        Ok(self.marker)
    }

    /// Tops the buffer up to at least 56 bits.
    #[inline(always)]
    fn refill(&mut self) {
        // The eight zero bytes after the data make every word up to its end readable.
        if self.pos <= self.end {
            let next = &self.data[self.pos..self.pos + 8];
            let word = u64::from_be_bytes(next.try_into().expect("eight bytes"));
            self.buffer |= word >> self.count;
            self.pos += (63 - self.count as usize) >> 3;
            self.count |= 56;
        } else {
            let added = (63 - self.count) & !7;
            self.past_end += added as u64;
            self.count += added;
        }
    }

    /// At least `n` bits in the buffer (`n` at most 56).
    #[inline(always)]
    pub fn ensure(&mut self, n: u32) {
        if self.count < n {
            self.refill();
        }
    }

    /// The next `n` bits, left in the buffer (after [`Self::ensure`]).
    #[inline(always)]
    pub fn peek(&self, n: u32) -> usize {
        (self.buffer >> (64 - n)) as usize
    }

    /// Drops `n` bits from the buffer (after [`Self::ensure`]).
    #[inline(always)]
    pub fn consume(&mut self, n: u32) {
        self.buffer <<= n;
        self.count -= n;
    }

    /// The next bit.
    #[inline(always)]
    pub fn bit(&mut self) -> bool {
        if self.count == 0 {
            self.refill();
        }
        let bit = self.buffer >> 63 != 0;
        self.buffer <<= 1;
        self.count -= 1;
        bit
    }

    /// The next `n` bits (at most 32) as a number.
    #[inline(always)]
    pub fn take(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.count < n {
            self.refill();
        }
        let value = (self.buffer >> (64 - n)) as u32;
        self.buffer <<= n;
        self.count -= n;
        value
    }

    /// The next symbol of `table`; a code it does not hold is left to libjpeg.
    #[inline(always)]
    pub fn symbol(&mut self, table: &Huffman) -> Result<u8> {
        if self.count < 16 {
            self.refill();
        }
        let entry = table.lookup[(self.buffer >> (64 - LOOKUP_BITS)) as usize];
        if entry != 0 {
            let length = (entry >> 8) as u32;
            self.buffer <<= length;
            self.count -= length;
            return Ok(entry as u8);
        }
        for length in LOOKUP_BITS + 1..=16 {
            let code = (self.buffer >> (64 - length)) as i32;
            if code <= table.max_code[length as usize] {
                self.buffer <<= length;
                self.count -= length;
                let index = code + table.value_offset[length as usize];
                return table
                    .values
                    .get(index as usize)
                    .copied()
                    .ok_or(Stop::Unsupported);
            }
        }
        Err(Stop::Unsupported)
    }

    /// The next symbol of `table`, with at least 17 bits in the buffer. A code the table does
    /// not hold reads as libjpeg reads it: 17 bits, and symbol 0.
    #[inline(always)]
    pub fn symbol_as_libjpeg(&mut self, table: &Huffman) -> u8 {
        let entry = table.lookup[self.peek(LOOKUP_BITS)];
        let (length, symbol) = if entry != 0 {
            ((entry >> 8) as u32, entry as u8)
        } else {
            long_code(self.buffer, table)
        };
        self.consume(length);
        symbol
    }

    /// The next `n` bits (at most 32) as a number, with at least `n` in the buffer.
    #[inline(always)]
    pub fn take_buffered(&mut self, n: u32) -> u32 {
        // Two shifts, so that `n` = 0 gives 0.
        let value = (self.buffer >> (63 - n) >> 1) as u32;
        self.consume(n);
        value
    }
}

/// The length and symbol of the code longer than the lookup at the top of `buffer` (see
/// [`Bits::symbol_as_libjpeg`]). Apart from the reader, so that its state stays in registers.
#[inline(never)]
fn long_code(buffer: u64, table: &Huffman) -> (u32, u8) {
    for length in LOOKUP_BITS + 1..=16 {
        let code = (buffer >> (64 - length)) as i32;
        if code <= table.max_code[length as usize] {
            let index = code + table.value_offset[length as usize];
            return (
                length,
                table.values.get(index as usize).copied().unwrap_or(0),
            );
        }
    }
    (17, 0)
}

#[cfg(test)]
mod tests {
    use super::{extend, unstuff, Huffman};

    #[test]
    fn values_extend_as_jpeg_codes_them() {
        assert_eq!(extend(0, 0), 0);
        assert_eq!(extend(0, 1), -1);
        assert_eq!(extend(1, 1), 1);
        assert_eq!(extend(0b010, 3), -5);
        assert_eq!(extend(0b110, 3), 6);
    }

    #[test]
    fn stuffed_bytes_and_fill_bytes_are_read_as_libjpeg_reads_them() {
        let mut out = Vec::new();
        let bytes = [1, 0xFF, 0x00, 2, 0xFF, 0xFF, 0x00, 3, 0xFF, 0xD9];
        assert_eq!(unstuff(&bytes, 0, &mut out).ok(), Some(8));
        assert_eq!(out, [1, 0xFF, 2, 0xFF, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn tables_with_an_all_ones_code_are_refused() {
        assert!(Huffman::new(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 1]).is_err());
        assert!(Huffman::new(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 1]).is_ok());
    }
}
