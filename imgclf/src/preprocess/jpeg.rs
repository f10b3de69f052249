//! JPEG decoding with libjpeg-turbo's code (through mozjpeg-sys, built from source with its SIMD
//! kernels where `nasm` is installed, no system library): the same integer IDCT, fancy upsampling
//! and colour conversion as Pillow, so decoded pixels match the reference implementation's
//! exactly. Other decoders differ by a few levels.
//!
//! Only the rectangle the resize will read is decoded: rows above it are skipped (entropy
//! decoding only), columns beside it are cropped (no IDCT, upsampling or colour conversion), and
//! decoding stops after its last row. libjpeg treats the edges of a crop as image edges, so a few
//! pixels of margin are decoded and dropped to keep every kept pixel as a full decode has it.
//!
//! A progressive JPEG's scans are entropy-decoded by [`super::progressive`] where it takes the
//! file, into the coefficient arrays libjpeg's output pass then reads (see
//! [`Decoder::decode_scans_first`]); a baseline JPEG's MCUs by [`super::baseline`], one by one
//! as libjpeg's single-pass decoder asks for them (see [`Decoder::start`]). libjpeg decodes the
//! rest, and all pixels, but for flat blocks (no AC coefficient), which are filled with the
//! level its IDCT would give them ([`idct_or_fill`]).
//!
//! A progress monitor bounds the cost: at most [`MAX_JPEG_SCANS`] progressive scans, and the
//! decode's CPU-time [`Budget`] (both checked by the progressive decoder too).
//!
//! A progressive JPEG's coefficients, which must be held for the whole image before its first
//! row (7 MiB for 2.3 megapixels), live in the thread's reused [`Scratch`] buffers where the
//! progressive decoder takes the file, and where [`crate::tune_malloc`] has fixed glibc's mmap
//! threshold: there, memory libjpeg allocates afresh is mapped and faulted in page by page at
//! every decode. Elsewhere, in a file left to libjpeg, glibc raises its threshold when libjpeg
//! frees that memory and serves the next decode, and other large buffers, from the heap:
//! measured faster there than keeping the coefficients (BENCHMARKS.md).

// The crate's one FFI module; every unsafe block says why it holds.
#![allow(unsafe_code)]

use std::mem;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use mozjpeg_sys::{
    boolean, jpeg_common_struct, jpeg_component_info, jpeg_decompress_struct, jpeg_error_mgr,
    jpeg_progress_mgr, jvirt_barray_control, JBLOCK, JBLOCKARRAY, JBLOCKROW, JDIMENSION,
    JSAMPARRAY_MUT, J_COLOR_SPACE, J_DCT_METHOD,
};

use image::metadata::Orientation;

use super::baseline;
use super::budget::{too_many_scans, Budget, MAX_JPEG_SCANS};
use super::huffman::{Block, Stop};
use super::progressive::{self, Component, Frame};
use super::scratch::Scratch;
use super::{ImageError, Rect};

/// Pixels decoded beside a crop so that upsampling at its edges sees real neighbours.
const CROP_MARGIN: usize = 4;

/// Where a decoded row starts: `ROW_START` bytes past a multiple of `ROW_ALIGNMENT`, on no
/// 16-byte boundary (see [`Decoder::read_rect`]).
const ROW_ALIGNMENT: usize = 64;
const ROW_START: usize = 8;

/// A JPEG's stored width and height, from libjpeg's read of its header.
pub(super) fn size(bytes: &[u8], budget: &Budget) -> Result<(u32, u32), ImageError> {
    with_decoder(bytes, budget, |decoder| decoder.size32())
}

/// Checks a JPEG as far as libjpeg can without decoding pixels: markers, tables, frame and
/// scan headers, the size against `max_pixels`, and that the data is not cut short. Returns
/// the stored size.
pub(super) fn check(
    bytes: &[u8],
    max_pixels: u64,
    budget: &Budget,
) -> Result<(u32, u32), ImageError> {
    let checked = with_decoder(bytes, budget, |decoder| {
        let size = decoder.size32();
        super::check_pixels(size.0, size.1, max_pixels)?;
        // libjpeg would entropy-decode every scan of a progressive file before its first row,
        // the costliest part of decoding it, only to do it again in the worker: count the
        // scans in the bytes instead, and set up the decode without reading on.
        // SAFETY: the header has been read and decompression not started.
        if unsafe { mozjpeg_sys::jpeg_has_multiple_scans(&decoder.cinfo) } != 0 {
            let scans = count_scans(bytes);
            if scans > MAX_JPEG_SCANS as usize {
                let why = format!("{} ({scans})", too_many_scans());
                return Err(ImageError::TooCostly(why));
            }
            decoder.cinfo.buffered_image = true as boolean;
        }
        decoder.start(); // frame and first scan headers must make sense together
        Ok(size)
    });
    checked?
}

/// What decoding a JPEG needs from its header, read by libjpeg alone (no other decoder parses
/// or copies the file first).
pub(super) struct Header {
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
    /// Whether its pixels come in more than one scan (progressive JPEGs): then every scan is
    /// decoded before the first row.
    pub multiple_scans: bool,
}

/// Runs `work` on a decoder of `bytes` with its header read, turning libjpeg's fatal errors
/// into `Undecodable` and the progress monitor's stops into `TooCostly`.
pub(super) fn with_decoder<T>(
    bytes: &[u8],
    budget: &Budget,
    work: impl FnOnce(&mut Decoder) -> T,
) -> Result<T, ImageError> {
    // libjpeg only warns about missing data and fills the rest with grey; refuse instead, as
    // Pillow does.
    if !ends_its_scan(bytes) {
        return Err(ImageError::Undecodable(
            "truncated JPEG: the image data has no end-of-image marker".into(),
        ));
    }
    // libjpeg reports fatal errors by unwinding out of the C code (see `unwind_error_exit`).
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        work(&mut Decoder::new(bytes, budget))
    }))
    .map_err(|panic| match panic.downcast::<TooCostly>() {
        Ok(costly) => ImageError::TooCostly(costly.0),
        Err(panic) => ImageError::Undecodable(panic_message(panic)),
    })
}

/// Why the progress monitor stopped a decode (unwound through libjpeg like its own errors).
struct TooCostly(String);

/// libjpeg's progress hook and what it checks. `mgr` first: libjpeg sees only that part.
#[repr(C)]
struct Progress<'a> {
    mgr: jpeg_progress_mgr,
    budget: &'a Budget,
    calls: u32,
}

/// Called by libjpeg as it reads each scan and each row.
extern "C-unwind" fn monitor(cinfo: &mut jpeg_common_struct) {
    // SAFETY: `Decoder::new` points `progress` at the `mgr` of a `Progress` that outlives the
    // decompressor, and only decompressors are created here, so `cinfo` is the `common` head
    // of a `jpeg_decompress_struct`.
    let (progress, scan) = unsafe {
        let progress = &mut *(cinfo.progress as *mut Progress);
        let dinfo = &*(cinfo as *const jpeg_common_struct as *const jpeg_decompress_struct);
        (progress, dinfo.input_scan_number)
    };
    if scan > MAX_JPEG_SCANS {
        std::panic::resume_unwind(Box::new(TooCostly(too_many_scans())));
    }
    // Reading the clock costs a system call: look every few calls.
    progress.calls = progress.calls.wrapping_add(1);
    if progress.calls.is_multiple_of(64) && progress.budget.exceeded() {
        std::panic::resume_unwind(Box::new(TooCostly(progress.budget.why())));
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "libjpeg failed".into())
}

/// A whole-image array of coefficient blocks, handed to libjpeg in place of its own virtual
/// block arrays. Its memory is taken from the thread's scratch buffers on first access (a
/// header check that only sets up the decode touches none) and goes back when the decoder goes,
/// unless it was handed over already decoded (see [`Decoder::decode_scans_first`]).
struct BlockArray {
    blocks_per_row: usize,
    rows: usize,
    /// Row pointers into its memory, once accessed.
    row_pointers: Vec<JBLOCKROW>,
    memory: Option<Scratch>,
}

/// Whether progressive JPEGs' coefficients go in [`BlockArray`]s: set where glibc's mmap
/// threshold is fixed (see the module's documentation).
pub(crate) static REUSE_COEFFICIENT_MEMORY: AtomicBool = AtomicBool::new(false);

/// libjpeg's blocks are read with aligned SIMD loads (it aligns its own to 32 bytes).
const BLOCK_ALIGN: usize = 64;

impl BlockArray {
    /// Rows `start..start + count`; zeroed until written, as libjpeg's `pre_zero` arrays are.
    fn rows(&mut self, start: usize, count: usize) -> Option<JBLOCKARRAY> {
        if start.checked_add(count)? > self.rows {
            return None;
        }
        if self.row_pointers.is_empty() {
            let mut memory = Scratch::zeroed(block_bytes(self.blocks_per_row, self.rows)?);
            let first = aligned_blocks(&mut memory, self.blocks_per_row * self.rows);
            self.row_pointers = row_pointers(first, self.blocks_per_row, self.rows);
            self.memory = Some(memory);
        }
        // SAFETY: `start <= rows`, the length of `row_pointers`.
        Some(unsafe { self.row_pointers.as_mut_ptr().add(start) })
    }
}

/// Bytes of scratch memory that hold `blocks_per_row * rows` aligned blocks.
fn block_bytes(blocks_per_row: usize, rows: usize) -> Option<usize> {
    let blocks = blocks_per_row.checked_mul(rows)?;
    blocks
        .checked_mul(mem::size_of::<JBLOCK>())?
        .checked_add(BLOCK_ALIGN)
}

/// `count` blocks at the first aligned address of `memory` (of at least [`block_bytes`]).
fn aligned_blocks(memory: &mut [u8], count: usize) -> &mut [JBLOCK] {
    let first = memory.as_ptr().align_offset(BLOCK_ALIGN);
    let blocks = &mut memory[first..first + count * mem::size_of::<JBLOCK>()];
    // SAFETY: the bytes are in bounds (checked by the slice above), aligned for JBLOCK (an
    // array of i16) and every bit pattern is a valid i16; the slice borrows them exclusively.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut JBLOCK, count) }
}

/// libjpeg's row pointers for blocks laid out row by row from `blocks`.
fn row_pointers(blocks: &mut [JBLOCK], blocks_per_row: usize, rows: usize) -> Vec<JBLOCKROW> {
    let base = blocks.as_mut_ptr();
    (0..rows)
        // SAFETY: `row * blocks_per_row` is within `blocks` (`rows * blocks_per_row` long).
        .map(|row| unsafe { base.add(row * blocks_per_row) })
        .collect()
}

/// The coefficient arrays libjpeg asked one decoder for, and those decoded already for it;
/// `cinfo.client_data` points here.
#[derive(Default)]
struct BlockArrays {
    /// Boxed: libjpeg holds a pointer to each while more are added.
    #[allow(clippy::vec_box)]
    requested: Vec<Box<BlockArray>>,
    /// Each component's decoded blocks, handed out in order as libjpeg requests its arrays
    /// (one per component, in order), and their memory.
    decoded: Vec<Decoded>,
    decoded_memory: Option<Scratch>,
}

/// A component's coefficient blocks, decoded before libjpeg asks for them.
struct Decoded {
    blocks_per_row: usize,
    rows: usize,
    row_pointers: Vec<JBLOCKROW>,
    /// The blocks of an MCU: `h` across, `v` down.
    mcu: (usize, usize),
}

/// libjpeg's `request_virt_barray`, answered with a [`BlockArray`].
extern "C-unwind" fn request_block_array(
    cinfo: &mut jpeg_common_struct,
    _pool_id: std::ffi::c_int,
    _pre_zero: boolean,
    blocks_per_row: JDIMENSION,
    rows: JDIMENSION,
    _max_access: JDIMENSION,
) -> *mut jvirt_barray_control {
    // SAFETY: `Decoder::new` points `client_data` at its `BlockArrays`, which outlive the
    // decompressor.
    let arrays = unsafe { &mut *(cinfo.client_data as *mut BlockArrays) };
    let (blocks_per_row, rows) = (blocks_per_row as usize, rows as usize);
    let row_pointers = match arrays.decoded.get_mut(arrays.requested.len()) {
        Some(decoded) if (decoded.blocks_per_row, decoded.rows) == (blocks_per_row, rows) => {
            mem::take(&mut decoded.row_pointers)
        }
        Some(_) => std::panic::resume_unwind(Box::new(
            "coefficient arrays decoded for another layout than libjpeg's".to_string(),
        )),
        None => Vec::new(),
    };
    let mut array = Box::new(BlockArray {
        blocks_per_row,
        rows,
        row_pointers,
        memory: None,
    });
    let handle = &mut *array as *mut BlockArray as *mut jvirt_barray_control;
    arrays.requested.push(array); // the box's contents do not move
    handle
}

/// libjpeg's `access_virt_barray` for a [`BlockArray`]: every row is in memory.
extern "C-unwind" fn access_block_array(
    _cinfo: &mut jpeg_common_struct,
    array: *mut jvirt_barray_control,
    start_row: JDIMENSION,
    rows: JDIMENSION,
    _writable: boolean,
) -> JBLOCKARRAY {
    // SAFETY: libjpeg passes back a handle `request_block_array` returned for this decoder.
    let array = unsafe { &mut *(array as *mut BlockArray) };
    match array.rows(start_row as usize, rows as usize) {
        Some(rows) => rows,
        // What libjpeg's own arrays report (JERR_BAD_VIRTUAL_ACCESS), unwound the same way.
        None => std::panic::resume_unwind(Box::new("libjpeg: bogus virtual array access")),
    }
}

/// A libjpeg decompressor over bytes in memory, with its header read. Its methods unwind on a
/// fatal libjpeg error; it is destroyed on drop, also during that unwinding.
pub(super) struct Decoder<'a> {
    // Boxed: libjpeg keeps pointers to all four.
    cinfo: Box<jpeg_decompress_struct>,
    _err: Box<jpeg_error_mgr>,
    progress: Box<Progress<'a>>,
    blocks: Box<BlockArrays>,
    /// A baseline JPEG's entropy decoder, where [`baseline`] takes the file.
    baseline: Option<Box<BaselineEntropy>>,
    bytes: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn new(bytes: &'a [u8], budget: &'a Budget) -> Self {
        // SAFETY: both structs are plain C data that libjpeg initialises (zeroed is their
        // documented starting state); `bytes` outlives the decoder through `'a`.
        unsafe {
            let mut err: Box<jpeg_error_mgr> = Box::new(mem::zeroed());
            mozjpeg_sys::jpeg_std_error(&mut err);
            err.error_exit = Some(unwind_error_exit);
            err.emit_message = Some(silence_message);
            let mut progress = Box::new(Progress {
                mgr: mem::zeroed(),
                budget,
                calls: 0,
            });
            progress.mgr.progress_monitor = Some(monitor);
            let mut cinfo: Box<jpeg_decompress_struct> = Box::new(mem::zeroed());
            cinfo.common.err = &mut *err;
            mozjpeg_sys::jpeg_create_decompress(&mut *cinfo);
            cinfo.common.progress = &mut progress.mgr;
            let mut decoder = Decoder {
                cinfo,
                _err: err,
                progress,
                blocks: Box::default(),
                baseline: None,
                bytes,
            };
            if REUSE_COEFFICIENT_MEMORY.load(Ordering::Relaxed) {
                decoder.use_block_arrays();
            }
            mozjpeg_sys::jpeg_mem_src(&mut decoder.cinfo, bytes.as_ptr(), bytes.len() as _);
            // APP1 holds EXIF (and XMP): kept for the orientation, at most 64 KiB by format.
            mozjpeg_sys::jpeg_save_markers(&mut decoder.cinfo, 0xE1, 0xFFFF);
            // With the whole file in memory libjpeg never suspends: it returns or unwinds.
            mozjpeg_sys::jpeg_read_header(&mut decoder.cinfo, true as boolean);
            decoder
        }
    }

    /// Its size and EXIF orientation, and whether it is progressive.
    pub(super) fn header(&self) -> Header {
        let (width, height) = self.size32();
        Header {
            width,
            height,
            orientation: self.exif_orientation(),
            // SAFETY: the header has been read.
            multiple_scans: unsafe { mozjpeg_sys::jpeg_has_multiple_scans(&self.cinfo) } != 0,
        }
    }

    /// [`Self::read_rect`] into packed rows.
    pub(super) fn read_rect_pixels(&mut self, rect: Rect) -> Vec<u8> {
        let mut pixels = Vec::with_capacity(rect.width * rect.height * 3);
        self.read_rect(rect, |row| pixels.extend_from_slice(row));
        pixels
    }

    fn size(&self) -> (usize, usize) {
        let (width, height) = self.size32();
        (width as usize, height as usize)
    }

    fn size32(&self) -> (u32, u32) {
        (self.cinfo.image_width, self.cinfo.image_height)
    }

    /// The orientation in the first EXIF block, as `image` reads it.
    fn exif_orientation(&self) -> Orientation {
        let mut marker = self.cinfo.marker_list;
        while !marker.is_null() {
            // SAFETY: libjpeg's list of saved markers, alive with the decompressor; each holds
            // `data_length` bytes at `data`.
            let (data, next) = unsafe {
                let m = &*marker;
                let data = if m.data.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(m.data, m.data_length as usize)
                };
                (data, m.next)
            };
            if let Some(tiff) = data.strip_prefix(b"Exif\0\0") {
                return Orientation::from_exif_chunk(tiff).unwrap_or(Orientation::NoTransforms);
            }
            marker = next;
        }
        Orientation::NoTransforms
    }

    /// Has libjpeg ask for [`BlockArray`]s: the memory manager exists from creation; its
    /// arrays are requested when the decode starts.
    fn use_block_arrays(&mut self) {
        self.cinfo.common.client_data =
            &mut *self.blocks as *mut BlockArrays as *mut std::ffi::c_void;
        // SAFETY: created with the decompressor; its `realize_virt_arrays` skips these arrays,
        // which are not on its lists.
        let memory = unsafe { &mut *self.cinfo.common.mem };
        memory.request_virt_barray = Some(request_block_array);
        memory.access_virt_barray = Some(access_block_array);
    }

    /// For a progressive JPEG, before the decode starts: its scans entropy-decoded by
    /// [`progressive`] into the coefficient arrays libjpeg will ask for, and libjpeg's input
    /// pointed at an end-of-image marker, so that it decodes no scan and its output pass reads
    /// those arrays. Nothing changes where that decoder leaves the file to libjpeg.
    ///
    /// libjpeg still reads its first scan's header, finds the data missing (a warning), and
    /// decodes the scan's first MCU from zero bits before it leaves the rest untouched (also
    /// across restart markers, which it cannot find): the blocks that MCU can cover are put
    /// back by [`Self::start`].
    fn decode_scans_first(&mut self) {
        // SAFETY: the header has been read.
        if unsafe { mozjpeg_sys::jpeg_has_multiple_scans(&self.cinfo) } == 0 {
            return;
        }
        let frame = self.frame();
        let quant_tbl_ptrs = self.cinfo.quant_tbl_ptrs;
        let quant_tables: Vec<_> = (self.components().iter())
            .map(|c| quant_tbl_ptrs.get(c.quant_tbl_no as usize).copied())
            .collect();
        if quant_tables.iter().any(|t| t.is_none_or(|t| t.is_null())) {
            return; // libjpeg fails on it
        }
        // One scratch buffer for all components, each one's blocks aligned.
        let sizes: Option<Vec<usize>> = (frame.components.iter())
            .map(|c| block_bytes(c.blocks_per_row(), c.block_rows()))
            .collect();
        let Some(sizes) = sizes else { return };
        let mut memory = Scratch::zeroed(sizes.iter().sum());
        let mut planes = Vec::with_capacity(frame.components.len());
        let mut rest = &mut memory[..];
        for (c, &size) in frame.components.iter().zip(&sizes) {
            let (mine, others) = rest.split_at_mut(size);
            planes.push(aligned_blocks(mine, c.blocks_per_row() * c.block_rows()));
            rest = others;
        }
        match progressive::decode(self.bytes, &frame, &mut planes, self.progress.budget) {
            Ok(()) => {}
            Err(Stop::Unsupported) => return,
            Err(Stop::TooCostly(why)) => std::panic::resume_unwind(Box::new(TooCostly(why))),
        }
        self.blocks.decoded = (planes.into_iter().zip(&frame.components))
            .map(|(blocks, c)| {
                let (blocks_per_row, rows) = (c.blocks_per_row(), c.block_rows());
                Decoded {
                    blocks_per_row,
                    rows,
                    row_pointers: row_pointers(blocks, blocks_per_row, rows),
                    mcu: (c.h, c.v),
                }
            })
            .collect();
        self.blocks.decoded_memory = Some(memory);
        self.use_block_arrays();
        for (component, table) in self.components().iter_mut().zip(quant_tables) {
            // What libjpeg latches at each component's first scan: no table is defined later
            // (the decoder leaves such files to libjpeg).
            if component.quant_table.is_null() {
                component.quant_table = table.expect("checked above");
            }
        }
        // Block smoothing applies only to coefficients not yet fully refined; the decoder
        // took the file only if none is left so.
        self.cinfo.do_block_smoothing = false as boolean;
        // SAFETY: `jpeg_mem_src` set the source manager; this static outlives the decoder.
        unsafe {
            let source = &mut *self.cinfo.src;
            source.next_input_byte = END_OF_IMAGE.as_ptr();
            source.bytes_in_buffer = END_OF_IMAGE.len();
        }
    }

    /// The frame as libjpeg read it from the header.
    fn frame(&mut self) -> Frame {
        Frame {
            width: self.cinfo.image_width as usize,
            height: self.cinfo.image_height as usize,
            components: (self.components().iter())
                .map(|c| Component {
                    id: c.component_id as u8,
                    h: c.h_samp_factor as usize,
                    v: c.v_samp_factor as usize,
                    width_in_blocks: c.width_in_blocks as usize,
                    height_in_blocks: c.height_in_blocks as usize,
                })
                .collect(),
        }
    }

    fn components(&mut self) -> &mut [jpeg_component_info] {
        let count = self.cinfo.num_components as usize;
        // SAFETY: libjpeg allocated `num_components` entries when it read the frame header.
        unsafe { std::slice::from_raw_parts_mut(self.cinfo.comp_info, count) }
    }

    /// For a baseline JPEG, before the decode starts: its scan ready for [`baseline`] to
    /// entropy-decode MCU by MCU as libjpeg asks ([`Self::start`] hands it over).
    fn prepare_baseline(&mut self) {
        // SAFETY: the header has been read.
        if unsafe { mozjpeg_sys::jpeg_has_multiple_scans(&self.cinfo) } != 0 {
            return;
        }
        #[cfg(test)]
        if LIBJPEG_ALONE.get() {
            return;
        }
        // SAFETY: `jpeg_mem_src` set the source manager; libjpeg has read `bytes` up to the
        // scan's data.
        let next = unsafe { (*self.cinfo.src).next_input_byte } as usize;
        // Compared as addresses: past the file's end, libjpeg reads from a buffer of its own.
        let data_start = next.checked_sub(self.bytes.as_ptr() as usize);
        let Some(data_start) = data_start.filter(|&at| at <= self.bytes.len()) else {
            return;
        };
        let frame = self.frame();
        let scan = baseline::Scan::new(self.bytes, &frame, data_start);
        self.baseline = scan.map(|scan| {
            Box::new(BaselineEntropy {
                start_pass: no_second_scan,
                decode_mcu: decode_baseline_mcu,
                insufficient_data: false as boolean,
                scan,
            })
        });
    }

    fn start(&mut self) {
        // The blocks libjpeg's first MCU can cover, decoded already (see
        // `decode_scans_first`): rows `0..v` and columns `0..h` of each component.
        let mut first_mcu = Vec::new();
        for decoded in &self.blocks.decoded {
            let (h, v) = decoded.mcu;
            for row in &decoded.row_pointers[..v.min(decoded.rows)] {
                for x in 0..h.min(decoded.blocks_per_row) {
                    // SAFETY: block `x` of a row of the array, whose memory the decoder holds.
                    let block = unsafe { row.add(x) };
                    first_mcu.push((block, unsafe { *block }));
                }
            }
        }
        // CMYK, and YCCK, which libjpeg turns into CMYK, come out as CMYK (see `cmyk_to_rgb`).
        self.cinfo.out_color_space = match self.cinfo.jpeg_color_space {
            J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK => J_COLOR_SPACE::JCS_CMYK,
            _ => J_COLOR_SPACE::JCS_RGB,
        };
        // SAFETY: the header has been read; errors unwind.
        unsafe { mozjpeg_sys::jpeg_start_decompress(&mut self.cinfo) };
        if let Some(entropy) = self.baseline.as_deref_mut() {
            let end = entropy.scan.end();
            // SAFETY: libjpeg set up its entropy decoder for the scan and has decoded no MCU;
            // from here it calls `decode_mcu` through this pointer, on `entropy`, which the
            // decoder keeps alive.
            unsafe {
                let field = entropy_field(&mut self.cinfo);
                assert!(!(*field).is_null(), "libjpeg has an entropy decoder");
                *field = entropy as *mut BaselineEntropy as *mut std::ffi::c_void;
                // Nothing of the scan's data is libjpeg's to read: its input goes on after it.
                let source = &mut *self.cinfo.src;
                source.next_input_byte = self.bytes[end..].as_ptr();
                source.bytes_in_buffer = self.bytes.len() - end;
            }
        }
        for (block, kept) in first_mcu {
            // SAFETY: as above; libjpeg holds no reference to the block between its calls.
            unsafe { *block = kept };
        }
        fill_flat_blocks(&mut self.cinfo);
    }

    /// Decodes `rect` (inside the image), handing each packed RGB row to `each_row`, top to
    /// bottom.
    pub(super) fn read_rect(&mut self, rect: Rect, mut each_row: impl FnMut(&[u8])) {
        let (width, height) = self.size();
        assert!(rect.left + rect.width <= width && rect.top + rect.height <= height);
        self.decode_scans_first();
        self.prepare_baseline();
        self.start();
        let mut x = rect.left.saturating_sub(CROP_MARGIN) as u32;
        let mut crop_width =
            ((rect.left + rect.width + CROP_MARGIN).min(width) - x as usize) as u32;
        // SAFETY: the crop lies inside the image and no scanline has been read; libjpeg moves
        // `x` left to an iMCU boundary and widens `crop_width` to match.
        unsafe { mozjpeg_sys::jpeg_crop_scanline(&mut self.cinfo, &mut x, &mut crop_width) };
        let skip = rect.left - x as usize;
        let channels = self.cinfo.out_color_components as usize;
        let row_len = crop_width as usize * channels;
        let mut buffer = Scratch::zeroed(row_len + ROW_ALIGNMENT);
        // libjpeg's SIMD colour conversion writes a row that starts on a 16- or 32-byte
        // boundary with non-temporal stores, past the cache, and the resize reads it straight
        // back: from memory, at twice the time of the horizontal pass. Off those boundaries
        // it stays in cache.
        let misalignment = buffer.as_ptr() as usize % ROW_ALIGNMENT;
        let start = (ROW_ALIGNMENT + ROW_START - misalignment) % ROW_ALIGNMENT;
        let row = &mut buffer[start..][..row_len];
        let mut rgb = vec![0; if channels == 4 { rect.width * 3 } else { 0 }];
        // SAFETY: `rect.top` rows exist; skipping keeps the upsampler's context rows.
        unsafe { mozjpeg_sys::jpeg_skip_scanlines(&mut self.cinfo, rect.top as u32) };
        for _ in 0..rect.height {
            let mut row_ptr = row.as_mut_ptr();
            // SAFETY: `row` holds one output scanline of the cropped width.
            let read =
                unsafe { mozjpeg_sys::jpeg_read_scanlines(&mut self.cinfo, &mut row_ptr, 1) };
            assert_eq!(read, 1, "libjpeg returned no scanline");
            let kept = &row[skip * channels..][..rect.width * channels];
            if channels == 4 {
                cmyk_to_rgb(kept, &mut rgb);
                each_row(&rgb);
            } else {
                each_row(kept);
            }
        }
    }
}

/// CMYK rows as libjpeg gives them to RGB, as Pillow turns them: it reads every four-channel
/// JPEG as Adobe's inverted CMYK, and its conversion then comes to each stored ink times the
/// stored black, over 255, rounded.
fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (px, out) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        let black = u32::from(px[3]);
        for (out, &ink) in out.iter_mut().zip(&px[..3]) {
            let product = u32::from(ink) * black + 128;
            *out = ((product + (product >> 8)) >> 8) as u8;
        }
    }
}

impl Drop for Decoder<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `new`; destroying also releases a decompression left unfinished.
        unsafe { mozjpeg_sys::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

/// What libjpeg reads once [`Decoder::decode_scans_first`] has decoded the scans.
static END_OF_IMAGE: [u8; 2] = [0xFF, 0xD9];

#[cold]
extern "C-unwind" fn unwind_error_exit(cinfo: &mut jpeg_common_struct) {
    let mut buffer = [0u8; 80];
    // SAFETY: libjpeg sets `err` and `format_message` in `jpeg_std_error`; the buffer has the
    // JMSG_LENGTH_MAX bytes the function writes at most.
    let message = unsafe {
        match (*cinfo.err).format_message {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]) =
                    mem::transmute(format);
                format(cinfo, &mut buffer);
                let text = buffer.split(|&c| c == 0).next().unwrap_or_default();
                String::from_utf8_lossy(text).into_owned()
            }
            None => format!("error code {}", (*cinfo.err).msg_code),
        }
    };
    // resume_unwind: a fatal error in a bad upload is not a bug, so skip the panic hook.
    std::panic::resume_unwind(Box::new(format!("libjpeg: {message}")));
}

#[cfg(test)]
thread_local! {
    /// Set by tests to have libjpeg entropy-decode baseline JPEGs itself, and run its IDCT on
    /// every block.
    static LIBJPEG_ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Blocks [`idct_or_fill`] has filled on this thread.
    static FILLED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// libjpeg's `struct jpeg_entropy_decoder` (jpegint.h), through which it has a baseline scan
/// decoded, and that scan.
#[repr(C)]
struct BaselineEntropy {
    start_pass: unsafe extern "C-unwind" fn(&mut jpeg_decompress_struct),
    decode_mcu: unsafe extern "C-unwind" fn(&mut jpeg_decompress_struct, *mut JBLOCKROW) -> boolean,
    insufficient_data: boolean,
    scan: baseline::Scan,
}

/// The address of `cinfo.entropy`, which mozjpeg-sys keeps private.
fn entropy_field(cinfo: &mut jpeg_decompress_struct) -> *mut *mut std::ffi::c_void {
    private_field(cinfo, 5)
}

/// The address of one of the pointers that end the struct, which mozjpeg-sys keeps private,
/// counted from its end as jpeglib.h declares them: `entropy` (5), `idct` (4), `upsample`,
/// `cconvert`, `cquantize` (1).
fn private_field(
    cinfo: &mut jpeg_decompress_struct,
    from_end: usize,
) -> *mut *mut std::ffi::c_void {
    let offset = mem::size_of::<jpeg_decompress_struct>() - from_end * mem::size_of::<usize>();
    // SAFETY: within the struct, at a pointer-aligned offset (its size is a multiple of its
    // pointer alignment).
    unsafe { (cinfo as *mut jpeg_decompress_struct as *mut u8).add(offset) as *mut _ }
}

/// An IDCT of libjpeg's: one block's coefficients into 8x8 samples at a column of 8 rows.
type InverseDctFn = unsafe extern "C-unwind" fn(
    *mut jpeg_decompress_struct,
    *mut jpeg_component_info,
    *const i16,
    JSAMPARRAY_MUT,
    JDIMENSION,
);

/// libjpeg's `struct jpeg_inverse_dct` (jpegint.h): the IDCT of each component's blocks.
#[repr(C)]
struct InverseDct {
    start_pass: Option<unsafe extern "C-unwind" fn(&mut jpeg_decompress_struct)>,
    inverse_dct: [Option<InverseDctFn>; 10],
}

/// libjpeg's integer IDCT (its SIMD one where the CPU has it), which [`idct_or_fill`] runs on
/// every block it does not fill: the same function in every decoder of the process.
static LIBJPEG_IDCT: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Has libjpeg run [`idct_or_fill`] in place of its integer IDCT on every component, where it
/// runs that IDCT (the default, at full scale), the same function for all: once the decode
/// has started, when libjpeg has chosen its IDCT for the one output pass.
fn fill_flat_blocks(cinfo: &mut jpeg_decompress_struct) {
    #[cfg(test)]
    if LIBJPEG_ALONE.get() {
        return;
    }
    if cinfo.dct_method != J_DCT_METHOD::JDCT_ISLOW || cinfo.scale_num != cinfo.scale_denom {
        return;
    }
    let components = (cinfo.num_components as usize).min(10);
    // SAFETY: `jpeg_start_decompress` set up the IDCT controller (a `jpeg_inverse_dct` first
    // in libjpeg's own struct) and chose each component's method; libjpeg reads them from it
    // at each block.
    let Some(idct) = (unsafe { (*private_field(cinfo, 4) as *mut InverseDct).as_mut() }) else {
        return;
    };
    let Some(chosen) = idct.inverse_dct[0] else {
        return;
    };
    let methods = &mut idct.inverse_dct[..components];
    if methods
        .iter()
        .any(|m| m.map(|m| m as usize) != Some(chosen as usize))
    {
        return;
    }
    let chosen = chosen as *mut ();
    let known = LIBJPEG_IDCT
        .compare_exchange(
            std::ptr::null_mut(),
            chosen,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .unwrap_or_else(|known| known);
    if known.is_null() || known == chosen {
        methods.fill(Some(idct_or_fill));
    }
}

/// libjpeg's integer IDCT of one block, except that a flat block (no AC coefficient, common
/// in chroma and smooth areas) is filled with its level without a transform: the level
/// `jidctint.c` computes for it (its shortcut for a lone DC term, which its SIMD versions
/// match), `(dc * q + 4) >> 3` centred on 128 and clamped. A dequantised DC term outside
/// ±2048 (only damaged data has one: a flat block's is 8 times its level's distance from
/// 128), where libjpeg's versions wrap or saturate differently, goes to its IDCT, and so does
/// a component that no scan names: it has no table (libjpeg's IDCT multiplies by zeros).
unsafe extern "C-unwind" fn idct_or_fill(
    cinfo: *mut jpeg_decompress_struct,
    component: *mut jpeg_component_info,
    coefficients: *const i16,
    output: JSAMPARRAY_MUT,
    column: JDIMENSION,
) {
    // SAFETY: libjpeg passes one block of 64 coefficients, its component (with the
    // quantisation table it latched at the component's first scan, or null if no scan named
    // it) and 8 output rows, each with 8 samples at `column`.
    unsafe {
        let block = &*(coefficients as *const [i16; 64]);
        // The two lowest frequencies first: most blocks that are not flat have one of them.
        let flat = (block[1] | block[8]) == 0 && block[1..].iter().fold(0, |any, &c| any | c) == 0;
        let table = (*component).quant_table;
        // The dequantised DC term, in range (also the 16-bit product the SIMD IDCT takes).
        let filled = (flat && !table.is_null())
            .then(|| block[0] as i32 * (*table).quantval[0] as i32)
            .filter(|dc| (-2048..2048).contains(dc));
        if let Some(dc) = filled {
            let level = (((dc + 4) >> 3) + 128).clamp(0, 255) as u8;
            for row in 0..8 {
                std::ptr::write_bytes((*output.add(row)).add(column as usize), level, 8);
            }
            #[cfg(test)]
            FILLED.set(FILLED.get() + 1);
            return;
        }
        let idct: InverseDctFn = mem::transmute(LIBJPEG_IDCT.load(Ordering::Relaxed));
        idct(cinfo, component, coefficients, output, column)
    }
}

/// libjpeg's `decode_mcu` for a baseline scan: the next MCU into `mcu`'s blocks (zeroed by
/// libjpeg), or discarded where `mcu` is null (rows it skips).
extern "C-unwind" fn decode_baseline_mcu(
    cinfo: &mut jpeg_decompress_struct,
    mcu: *mut JBLOCKROW,
) -> boolean {
    // SAFETY: `Decoder::start` pointed `entropy` at its `BaselineEntropy`, alive while
    // libjpeg decodes.
    let entropy = unsafe { &mut *(*entropy_field(cinfo) as *mut BaselineEntropy) };
    let count = entropy.scan.blocks_per_mcu();
    // SAFETY: libjpeg passes one pointer per block of the MCU, each to a distinct block.
    let blocks = (!mcu.is_null())
        .then(|| unsafe { std::slice::from_raw_parts_mut(mcu as *mut &mut Block, count) });
    entropy.scan.decode_mcu(blocks);
    entropy.insufficient_data = entropy.scan.out_of_data() as boolean;
    true as boolean
}

/// libjpeg starts a second scan only in files with several, which it decodes itself.
extern "C-unwind" fn no_second_scan(_cinfo: &mut jpeg_decompress_struct) {
    std::panic::resume_unwind(Box::new(
        "libjpeg: a second scan in a one-scan file".to_string(),
    ))
}

#[cold]
extern "C-unwind" fn silence_message(_cinfo: &mut jpeg_common_struct, _level: std::ffi::c_int) {}

/// Start-of-scan markers (FF DA) in a JPEG. Entropy-coded data never holds one (an FF byte
/// there is followed by 00 or a restart marker), so only metadata, such as an EXIF thumbnail,
/// can add to the count.
fn count_scans(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .zip(bytes.get(1..).unwrap_or_default())
        .filter(|&(&a, &b)| a == 0xFF && b == 0xDA)
        .count()
}

/// Whether an end-of-image marker (FF D9) follows the last start-of-scan (FF DA). An EXIF
/// thumbnail brings its own markers, but they come before the main image's scan.
fn ends_its_scan(bytes: &[u8]) -> bool {
    // Searched from the ends inward: the end marker is near the end of the file and the first
    // scan near its start, so neither search reads the (large) entropy-coded data.
    let marker = |m: u8| move |w: &[u8]| w == [0xFF, m];
    let Some(end) = bytes.windows(2).rposition(marker(0xD9)) else {
        return false;
    };
    let scan_before = bytes[..end].windows(2).any(marker(0xDA));
    let scan_after = bytes[end..].windows(2).any(marker(0xDA));
    scan_before && !scan_after
}

#[cfg(test)]
mod tests {
    use super::{count_scans, ends_its_scan};

    #[test]
    fn a_jpeg_cut_short_is_detected() {
        let whole = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3, 0xFF, 0xD9];
        assert!(ends_its_scan(&whole));
        assert!(!ends_its_scan(&whole[..6]));
        // A thumbnail's end marker before the main scan does not count.
        let thumb = [0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2];
        assert!(!ends_its_scan(&thumb));
    }

    #[test]
    fn scans_are_counted_by_their_markers() {
        assert_eq!(count_scans(&[]), 0);
        assert_eq!(count_scans(&[0xFF]), 0);
        let two = [
            0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0x00, 0xDA, 0xFF, 0xDA, 0xFF, 0xD9,
        ];
        assert_eq!(count_scans(&two), 2, "a stuffed FF 00 is data");
    }
}

/// imgclf's entropy decoders (progressive and baseline) against libjpeg's own: every pixel
/// the same, on files made by libjpeg's and mozjpeg's encoders across the layouts they write.
#[cfg(test)]
mod entropy_tests {
    use std::ffi::c_ulong;

    use mozjpeg_sys::{
        jpeg_compress_struct, jpeg_scan_info, JINT_COMPRESS_PROFILE_VALUE, J_INT_PARAM,
    };

    use super::super::progressive::PORTABLE_REFINEMENT;
    use super::*;

    /// How a test image is encoded.
    #[derive(Clone, Copy, Debug)]
    struct Encoding {
        /// Luma's sampling factors (chroma's are 1), or `None` for greyscale.
        luma: Option<(i32, i32)>,
        quality: i32,
        /// MCUs per restart interval (0: none).
        restart_interval: u32,
        script: Script,
    }

    #[derive(Clone, Copy, Debug)]
    enum Script {
        /// libjpeg's standard progression.
        Libjpeg,
        /// mozjpeg's, chosen per image.
        Mozjpeg,
        /// [`SCRIPT`].
        Own,
        /// One sequential scan (baseline), with the standard Huffman tables.
        Baseline,
        /// One sequential scan, with Huffman tables made for the image.
        BaselineOptimized,
    }

    /// A script unlike the encoders' own: DC scans of one component and of several, with
    /// successive approximation, bands split differently per component, a component's
    /// refinement scans apart from each other.
    const SCRIPT: [(&[i32], i32, i32, i32, i32); 12] = [
        (&[0], 0, 0, 0, 1),
        (&[1, 2], 0, 0, 0, 1),
        (&[0], 1, 9, 0, 2),
        (&[0], 10, 63, 0, 1),
        (&[1], 1, 63, 0, 0),
        (&[0], 1, 9, 2, 1),
        (&[0], 0, 0, 1, 0),
        (&[1, 2], 0, 0, 1, 0),
        (&[2], 1, 20, 0, 1),
        (&[2], 21, 63, 0, 0),
        (&[0], 1, 63, 1, 0),
        (&[2], 1, 20, 1, 0),
    ];

    fn encode(pixels: &[u8], (width, height): (usize, usize), how: Encoding) -> Vec<u8> {
        let channels = if how.luma.is_some() { 3 } else { 1 };
        assert_eq!(pixels.len(), width * height * channels);
        // libjpeg writes into this buffer, which is ample, and allocates no other.
        let mut buffer = vec![0u8; width * height * channels * 4 + 65536];
        let (mut out, mut len) = (buffer.as_mut_ptr(), buffer.len() as c_ulong);
        // SAFETY: the usual libjpeg compression sequence on zeroed structs, over rows of
        // `pixels` that live through it; errors unwind.
        unsafe {
            let mut err: jpeg_error_mgr = mem::zeroed();
            mozjpeg_sys::jpeg_std_error(&mut err);
            err.error_exit = Some(unwind_error_exit);
            let mut cinfo: jpeg_compress_struct = mem::zeroed();
            cinfo.common.err = &mut err;
            mozjpeg_sys::jpeg_create_compress(&mut cinfo);
            mozjpeg_sys::jpeg_mem_dest(&mut cinfo, &mut out, &mut len);
            cinfo.image_width = width as u32;
            cinfo.image_height = height as u32;
            cinfo.input_components = channels as i32;
            cinfo.in_color_space = if channels == 3 {
                J_COLOR_SPACE::JCS_RGB
            } else {
                J_COLOR_SPACE::JCS_GRAYSCALE
            };
            if !matches!(how.script, Script::Mozjpeg) {
                let fastest = JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as i32;
                let profile = J_INT_PARAM::JINT_COMPRESS_PROFILE;
                mozjpeg_sys::jpeg_c_set_int_param(&mut cinfo, profile, fastest);
            }
            mozjpeg_sys::jpeg_set_defaults(&mut cinfo);
            mozjpeg_sys::jpeg_set_quality(&mut cinfo, how.quality, true as boolean);
            if let Some((h, v)) = how.luma {
                let luma = &mut *cinfo.comp_info;
                (luma.h_samp_factor, luma.v_samp_factor) = (h, v);
            }
            cinfo.restart_interval = how.restart_interval;
            let baseline = matches!(how.script, Script::Baseline | Script::BaselineOptimized);
            if baseline {
                cinfo.optimize_coding = matches!(how.script, Script::BaselineOptimized) as boolean;
            } else {
                mozjpeg_sys::jpeg_simple_progression(&mut cinfo);
            }
            // The scans of those components the image has; libjpeg reads them at the start.
            let script: Vec<jpeg_scan_info> = (SCRIPT.iter())
                .filter(|scan| scan.0.iter().all(|&c| c < channels as i32))
                .map(|&(components, ss, se, ah, al)| {
                    let mut index = [0; 4];
                    index[..components.len()].copy_from_slice(components);
                    jpeg_scan_info {
                        comps_in_scan: components.len() as i32,
                        component_index: index,
                        Ss: ss,
                        Se: se,
                        Ah: ah,
                        Al: al,
                    }
                })
                .collect();
            if let Script::Own = how.script {
                cinfo.scan_info = script.as_ptr();
                cinfo.num_scans = script.len() as i32;
            }
            mozjpeg_sys::jpeg_start_compress(&mut cinfo, true as boolean);
            for row in pixels.chunks_exact(width * channels) {
                let row = row.as_ptr();
                mozjpeg_sys::jpeg_write_scanlines(&mut cinfo, &row, 1);
            }
            mozjpeg_sys::jpeg_finish_compress(&mut cinfo);
            mozjpeg_sys::jpeg_destroy_compress(&mut cinfo);
        }
        assert_eq!(out, buffer.as_mut_ptr(), "libjpeg kept to the buffer");
        buffer.truncate(len as usize);
        buffer
    }

    /// RGB (or grey) of smooth gradients with noise in one half: coefficients of every size.
    fn test_pixels((width, height): (usize, usize), channels: usize) -> Vec<u8> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut out = Vec::with_capacity(width * height * channels);
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let smooth = (x * 255 / width.max(2) + y * (c + 1) * 3) as u64;
                    let noise = if x < width / 2 { state % 96 } else { 0 };
                    out.push(((smooth + noise) % 256) as u8);
                }
            }
        }
        out
    }

    /// The whole image's pixels as `read_rect_pixels` gives them, and whether the progressive
    /// decoder took the file.
    fn decoded(bytes: &[u8]) -> (Vec<u8>, bool) {
        with_decoder(bytes, &Budget::start(), |decoder| {
            let (width, height) = decoder.size();
            let whole = Rect {
                left: 0,
                top: 0,
                width,
                height,
            };
            let mut pixels = Vec::new();
            decoder.read_rect(whole, |row| pixels.extend_from_slice(row));
            let taken = decoder.blocks.decoded_memory.is_some() || decoder.baseline.is_some();
            (pixels, taken)
        })
        .expect("decodes")
    }

    /// `rect`'s pixels as `read_rect_pixels` gives them, by imgclf's entropy decoders where they
    /// take the file or by libjpeg's alone (`libjpeg_alone`: its entropy decoding and IDCT).
    fn decoded_rect(bytes: &[u8], rect: Rect, libjpeg_alone: bool) -> Result<Vec<u8>, ImageError> {
        LIBJPEG_ALONE.set(libjpeg_alone);
        let pixels = with_decoder(bytes, &Budget::start(), |decoder| {
            let mut pixels = Vec::new();
            decoder.read_rect(rect, |row| pixels.extend_from_slice(row));
            pixels
        });
        LIBJPEG_ALONE.set(false);
        pixels
    }

    /// The pixels libjpeg gives alone: its own entropy decoding, arrays and memory.
    fn libjpeg_alone(bytes: &[u8]) -> Vec<u8> {
        // SAFETY: the usual libjpeg decompression sequence over `bytes`; errors unwind.
        unsafe {
            let mut err: jpeg_error_mgr = mem::zeroed();
            mozjpeg_sys::jpeg_std_error(&mut err);
            err.error_exit = Some(unwind_error_exit);
            err.emit_message = Some(silence_message);
            let mut cinfo: jpeg_decompress_struct = mem::zeroed();
            cinfo.common.err = &mut err;
            mozjpeg_sys::jpeg_create_decompress(&mut cinfo);
            mozjpeg_sys::jpeg_mem_src(&mut cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
            mozjpeg_sys::jpeg_read_header(&mut cinfo, true as boolean);
            cinfo.out_color_space = J_COLOR_SPACE::JCS_RGB;
            mozjpeg_sys::jpeg_start_decompress(&mut cinfo);
            let row_len = cinfo.output_width as usize * 3;
            let mut pixels = vec![0u8; row_len * cinfo.output_height as usize];
            for row in pixels.chunks_exact_mut(row_len) {
                let mut row = row.as_mut_ptr();
                mozjpeg_sys::jpeg_read_scanlines(&mut cinfo, &mut row, 1);
            }
            mozjpeg_sys::jpeg_destroy_decompress(&mut cinfo);
            pixels
        }
    }

    /// Calls `check` with a description and the bytes of the test image at each size and
    /// layout, encoded at each of `settings` (quality, restart interval) with each of
    /// `scripts`; returns how many it made.
    fn each_encoding(
        settings: &[(i32, u32)],
        scripts: &[Script],
        mut check: impl FnMut(&str, (usize, usize), &[u8]),
    ) -> usize {
        let mut cases = 0;
        for size in [(1, 1), (9, 7), (64, 48), (203, 117)] {
            for luma in [None, Some((1, 1)), Some((2, 1)), Some((1, 2)), Some((2, 2))] {
                for &(quality, restart_interval) in settings {
                    for &script in scripts {
                        let how = Encoding {
                            luma,
                            quality,
                            restart_interval,
                            script,
                        };
                        let channels = if luma.is_some() { 3 } else { 1 };
                        let jpeg = encode(&test_pixels(size, channels), size, how);
                        check(&format!("{size:?} {how:?}"), size, &jpeg);
                        cases += 1;
                    }
                }
            }
        }
        cases
    }

    #[test]
    fn every_layout_and_scan_script_decodes_as_libjpeg_alone_does() {
        let settings = [(90, 0), (100, 1), (50, 3)];
        let scripts = [Script::Libjpeg, Script::Mozjpeg, Script::Own];
        let cases = each_encoding(&settings, &scripts, |what, _, jpeg| {
            let libjpeg = libjpeg_alone(jpeg);
            // With this CPU's refinement, and with the portable one.
            for portable in [false, true] {
                PORTABLE_REFINEMENT.set(portable);
                let (pixels, taken) = decoded(jpeg);
                let what = format!("{what}, portable {portable}");
                assert!(taken, "{what}: the progressive decoder took it");
                assert!(pixels == libjpeg, "{what}: pixels differ from libjpeg's");
            }
        });
        assert_eq!(cases, 180);
    }

    #[test]
    fn every_layout_of_a_baseline_jpeg_decodes_as_libjpeg_alone_does() {
        let settings = [(90, 0), (100, 1), (50, 3), (75, 7)];
        let scripts = [Script::Baseline, Script::BaselineOptimized];
        let cases = each_encoding(&settings, &scripts, |what, (width, height), jpeg| {
            let libjpeg = libjpeg_alone(jpeg);
            // With BMI2 where the CPU has it, and without.
            for portable in [false, true] {
                baseline::PORTABLE.set(portable);
                let (pixels, taken) = decoded(jpeg);
                let what = format!("{what}, portable {portable}");
                assert!(taken, "{what}: the baseline decoder took it");
                assert!(pixels == libjpeg, "{what}: pixels differ");
            }
            baseline::PORTABLE.set(false);
            // A rectangle below the top and right of the left edge: libjpeg skips rows (MCUs
            // discarded) and crops columns.
            let rect = Rect {
                left: width / 3,
                top: height / 2,
                width: (width / 3).max(1),
                height: (height / 3).max(1),
            };
            assert!(
                decoded_rect(jpeg, rect, false).unwrap() == decoded_rect(jpeg, rect, true).unwrap(),
                "{what}: a rectangle's pixels differ"
            );
        });
        assert_eq!(cases, 160);
    }

    /// Damaged baseline JPEGs, in their data and anywhere: whatever libjpeg makes of them
    /// (pixels or an error), imgclf's baseline decoder makes the same.
    #[test]
    fn a_damaged_baseline_jpeg_decodes_as_libjpeg_alone_decodes_it() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1) as u64) as usize
        };
        let (mut taken, mut same) = (0, 0);
        for (luma, restart_interval, script) in [
            (Some((2, 2)), 0, Script::BaselineOptimized),
            (Some((2, 2)), 2, Script::Baseline),
            (Some((1, 1)), 1, Script::BaselineOptimized),
            (None, 3, Script::Baseline),
        ] {
            let how = Encoding {
                luma,
                quality: 90,
                restart_interval,
                script,
            };
            let channels = if luma.is_some() { 3 } else { 1 };
            let original = encode(&test_pixels((64, 48), channels), (64, 48), how);
            let data_start = original.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap() + 14;
            for _ in 0..500 {
                let mut jpeg = original.clone();
                for _ in 0..1 + next(3) {
                    // Mostly in the scan's data (before its end-of-image marker).
                    let at = match next(4) {
                        0 => next(jpeg.len()),
                        _ => data_start + next(jpeg.len() - 2 - data_start),
                    };
                    match next(4) {
                        0 => jpeg[at] ^= 1 << next(8),
                        1 => jpeg[at] = 0xFF,
                        2 => {
                            let end = (at + 1 + next(40)).min(jpeg.len() - 2);
                            jpeg.drain(at..end.max(at));
                        }
                        _ => jpeg[at] = next(256) as u8,
                    }
                }
                let whole = Rect {
                    left: 0,
                    top: 0,
                    width: 64,
                    height: 48,
                };
                let ours = decoded_rect(&jpeg, whole, false);
                let theirs = decoded_rect(&jpeg, whole, true);
                match (ours, theirs) {
                    (Ok(ours), Ok(theirs)) => {
                        assert!(ours == theirs, "{how:?}: pixels differ on {jpeg:?}");
                        same += 1;
                    }
                    (Err(_), Err(_)) => {}
                    (ours, theirs) => panic!("{how:?}: {ours:?} against {theirs:?} on {jpeg:?}"),
                }
                if with_decoder(&jpeg, &Budget::start(), |decoder| {
                    decoder.prepare_baseline();
                    decoder.baseline.is_some()
                }) == Ok(true)
                {
                    taken += 1;
                }
            }
        }
        eprintln!("{same} of 2000 damaged baseline JPEGs decoded as libjpeg does; {taken} taken");
        assert!(
            taken > 1000 && same > 1000,
            "the damage exercises the decoder"
        );
    }

    /// Flat blocks at levels from 0 to 255, beside noisy ones, in every layout and at qualities
    /// whose DC quantisers round differently: filled with the levels libjpeg's IDCT gives.
    #[test]
    fn flat_blocks_are_filled_as_libjpeg_transforms_them() {
        let (width, height) = (160, 96);
        let mut filled = 0;
        for luma in [None, Some((1, 1)), Some((2, 1)), Some((1, 2)), Some((2, 2))] {
            let channels = if luma.is_some() { 3 } else { 1 };
            let mut noise = 0x2545_F491_4F6C_DD1Du64;
            let mut pixels = Vec::with_capacity(width * height * channels);
            for y in 0..height {
                for x in 0..width {
                    // 16x16 tiles, so that subsampled chroma is flat too; every seventh noisy.
                    let tile = x / 16 + y / 16 * (width / 16);
                    for c in 0..channels {
                        noise ^= noise << 13;
                        noise ^= noise >> 7;
                        noise ^= noise << 17;
                        // Black, white, red and blue first: luma's and chroma's extremes.
                        let level = match tile {
                            0..4 => [[0; 3], [255; 3], [255, 0, 0], [0, 0, 255]][tile][c],
                            _ => (tile * 37 + c * 101) % 256,
                        };
                        let level = match tile % 7 {
                            6 => (level as u64 + noise % 64) % 256,
                            _ => level as u64,
                        };
                        pixels.push(level as u8);
                    }
                }
            }
            for quality in [1, 10, 50, 90, 100] {
                let how = Encoding {
                    luma,
                    quality,
                    restart_interval: 0,
                    script: Script::Baseline,
                };
                let jpeg = encode(&pixels, (width, height), how);
                FILLED.set(0);
                let (ours, _) = decoded(&jpeg);
                filled += FILLED.get();
                assert!(ours == libjpeg_alone(&jpeg), "{how:?}: pixels differ");
                // Quantisers raised under the coefficients: DC terms far out of range, where
                // libjpeg's IDCTs wrap or saturate.
                let raised = with_dc_quantisers(&jpeg, 255);
                assert!(
                    decoded(&raised).0 == libjpeg_alone(&raised),
                    "{how:?}, DC quantisers raised: pixels differ"
                );
            }
        }
        assert!(filled > 1000, "flat blocks were filled: {filled}");
    }

    /// `jpeg` with the DC quantiser of each of its 8-bit quantisation tables set to `value`.
    fn with_dc_quantisers(jpeg: &[u8], value: u8) -> Vec<u8> {
        let mut jpeg = jpeg.to_vec();
        let mut at = 2;
        while jpeg[at] == 0xFF && jpeg[at + 1] != 0xDA {
            let length = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
            if jpeg[at + 1] == 0xDB {
                // Tables of a precision byte and 64 values, the DC one first.
                for table in (at + 4..at + 2 + length).step_by(65) {
                    assert_eq!(jpeg[table] >> 4, 0, "8-bit tables");
                    jpeg[table + 1] = value;
                }
            }
            at += 2 + length;
        }
        jpeg
    }

    /// A 64x48 4:2:0 JPEG with libjpeg's standard scans, restarts every `restart_interval` MCUs.
    fn small_jpeg(restart_interval: u32) -> Vec<u8> {
        let how = Encoding {
            luma: Some((2, 2)),
            quality: 90,
            restart_interval,
            script: Script::Libjpeg,
        };
        encode(&test_pixels((64, 48), 3), (64, 48), how)
    }

    fn assert_left_to_libjpeg(jpeg: &[u8]) {
        let (pixels, taken) = decoded(jpeg);
        assert!(!taken, "left to libjpeg");
        assert!(
            pixels == libjpeg_alone(jpeg),
            "pixels differ from libjpeg's"
        );
    }

    /// A file whose last scan is missing is left to libjpeg, which smooths the blocks whose
    /// coefficients are not fully refined: the same pixels as libjpeg alone.
    #[test]
    fn an_incomplete_file_is_left_to_libjpeg() {
        let jpeg = small_jpeg(0);
        let last_scan = jpeg.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        assert_left_to_libjpeg(&[&jpeg[..last_scan], &[0xFF, 0xD9][..]].concat());
    }

    /// `jpeg` with `extra` more components in its frame header, which no scan names.
    fn with_unscanned_components(jpeg: &[u8], extra: u8) -> Vec<u8> {
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC2]).unwrap();
        let length = u16::from_be_bytes([jpeg[sof + 2], jpeg[sof + 3]]);
        let count = jpeg[sof + 9];
        let mut out = jpeg[..sof + 2].to_vec();
        out.extend_from_slice(&(length + 3 * u16::from(extra)).to_be_bytes());
        out.extend_from_slice(&jpeg[sof + 4..sof + 9]);
        out.push(count + extra);
        out.extend_from_slice(&jpeg[sof + 10..sof + 2 + length as usize]);
        for id in 0..extra {
            out.extend_from_slice(&[200 + id, 0x11, 0]);
        }
        out.extend_from_slice(&jpeg[sof + 2 + length as usize..]);
        out
    }

    /// A component that no scan names has no quantisation table: its blocks go to libjpeg's
    /// IDCT (which gives them mid-grey), never to a read of the missing table. A grey file
    /// given two such components is read as YCbCr, a colour one given a fourth as CMYK.
    #[test]
    fn a_component_no_scan_names_decodes_as_libjpeg_does() {
        let grey = Encoding {
            luma: None,
            quality: 90,
            restart_interval: 0,
            script: Script::Libjpeg,
        };
        let ycbcr =
            with_unscanned_components(&encode(&test_pixels((64, 48), 1), (64, 48), grey), 2);
        let (pixels, _) = decoded(&ycbcr);
        assert!(
            pixels == libjpeg_alone(&ycbcr),
            "pixels differ from libjpeg's"
        );
        let cmyk = with_unscanned_components(&small_jpeg(0), 1);
        let (pixels, _) = decoded(&cmyk);
        assert_eq!(pixels.len(), 64 * 48 * 3);
    }

    /// A restart marker out of sequence: libjpeg resynchronises in its own way, so the file is
    /// left to it.
    #[test]
    fn a_restart_marker_out_of_sequence_is_left_to_libjpeg() {
        let mut jpeg = small_jpeg(2);
        let first_restart = jpeg.windows(2).position(|w| w == [0xFF, 0xD0]).unwrap();
        jpeg[first_restart + 1] = 0xD3;
        assert_left_to_libjpeg(&jpeg);
    }
}
