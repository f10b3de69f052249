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
//! A progress monitor bounds the cost: at most [`MAX_JPEG_SCANS`] progressive scans, and the
//! decode's CPU-time [`Budget`].
//!
//! A progressive JPEG's coefficients, which libjpeg must hold for the whole image before its
//! first row (7 MiB for 2.3 megapixels), live in the thread's reused [`Scratch`] buffers where
//! [`crate::tune_malloc`] has fixed glibc's mmap threshold: there, memory libjpeg allocates
//! afresh is mapped and faulted in page by page at every decode. Elsewhere glibc raises its
//! threshold when libjpeg frees that memory and serves the next decode, and other large
//! buffers, from the heap: measured faster there than keeping the coefficients (BENCHMARKS.md).

// The crate's one FFI module; every unsafe block says why it holds.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};

use mozjpeg_sys::{
    boolean, jpeg_common_struct, jpeg_decompress_struct, jpeg_error_mgr, jpeg_progress_mgr,
    jvirt_barray_control, JBLOCK, JBLOCKARRAY, JBLOCKROW, JDIMENSION, J_COLOR_SPACE,
};

use image::metadata::Orientation;

use super::budget::{Budget, MAX_JPEG_SCANS};
use super::scratch::Scratch;
use super::{ImageError, Rect};

/// Pixels decoded beside a crop so that upsampling at its edges sees real neighbours.
const CROP_MARGIN: usize = 4;

/// Checks a JPEG as far as libjpeg can without decoding pixels: markers, tables, frame and
/// scan headers, and that the data is not cut short. `Ok(false)` for colour spaces libjpeg does
/// not turn into RGB, which the caller checks another way.
pub(super) fn check(bytes: &[u8], budget: &Budget) -> Result<bool, ImageError> {
    let checked = with_decoder(bytes, budget, |decoder| {
        if !decoder.converts_to_rgb() {
            return Ok(false);
        }
        // libjpeg would entropy-decode every scan of a progressive file before its first row,
        // the costliest part of decoding it, only to do it again in the worker: count the
        // scans in the bytes instead, and set up the decode without reading on.
        // SAFETY: the header has been read and decompression not started.
        if unsafe { mozjpeg_sys::jpeg_has_multiple_scans(&decoder.cinfo) } != 0 {
            let scans = count_scans(bytes);
            if scans > MAX_JPEG_SCANS as usize {
                return Err(ImageError::TooCostly(format!(
                    "more than {MAX_JPEG_SCANS} progressive scans ({scans})"
                )));
            }
            decoder.cinfo.buffered_image = true as boolean;
        }
        decoder.start(); // frame and first scan headers must make sense together
        Ok(true)
    });
    checked?
}

/// 8-bit RGB of the `rect` of a JPEG, packed rows; `None` for colour spaces libjpeg does not
/// turn into RGB (CMYK, YCCK), which the caller decodes another way.
pub(super) fn decode_rect(
    bytes: &[u8],
    rect: Rect,
    budget: &Budget,
) -> Result<Option<Vec<u8>>, ImageError> {
    with_decoder(bytes, budget, |decoder| decoder.read_rect_pixels(rect))
}

/// What decoding a JPEG needs from its header, read by libjpeg alone (no other decoder parses
/// or copies the file first).
pub(super) struct Header {
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
    /// False for colour spaces libjpeg does not turn into RGB (CMYK, YCCK).
    pub rgb: bool,
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
        let why = format!("more than {MAX_JPEG_SCANS} progressive scans");
        std::panic::resume_unwind(Box::new(TooCostly(why)));
    }
    // Reading the clock costs a system call: look every few calls.
    progress.calls = progress.calls.wrapping_add(1);
    if progress.calls.is_multiple_of(64) && progress.budget.exceeded() {
        let ImageError::TooCostly(why) = progress.budget.error() else {
            unreachable!("a budget's error is TooCostly")
        };
        std::panic::resume_unwind(Box::new(TooCostly(why)));
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
/// header check that only sets up the decode touches none) and goes back when the decoder goes.
struct BlockArray {
    blocks_per_row: usize,
    rows: usize,
    /// Row pointers into `memory`, once accessed.
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
        if self.memory.is_none() {
            let row_bytes = self.blocks_per_row * mem::size_of::<JBLOCK>();
            let mut memory = Scratch::zeroed(row_bytes.checked_mul(self.rows)? + BLOCK_ALIGN);
            let base = memory.as_mut_ptr();
            let first = base.align_offset(BLOCK_ALIGN);
            self.row_pointers = (0..self.rows)
                // SAFETY: `first + rows * row_bytes` is within the buffer's length.
                .map(|row| unsafe { base.add(first + row * row_bytes) } as JBLOCKROW)
                .collect();
            self.memory = Some(memory);
        }
        // SAFETY: `start <= rows`, the length of `row_pointers`.
        Some(unsafe { self.row_pointers.as_mut_ptr().add(start) })
    }
}

/// The coefficient arrays libjpeg asked one decoder for; `cinfo.client_data` points here.
/// Boxed: libjpeg holds a pointer to each while more are added.
#[allow(clippy::vec_box)]
type BlockArrays = Vec<Box<BlockArray>>;

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
    let mut array = Box::new(BlockArray {
        blocks_per_row: blocks_per_row as usize,
        rows: rows as usize,
        row_pointers: Vec::new(),
        memory: None,
    });
    let handle = &mut *array as *mut BlockArray as *mut jvirt_barray_control;
    arrays.push(array); // the box's contents do not move
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
    _progress: Box<Progress<'a>>,
    _blocks: Box<BlockArrays>,
    _bytes: PhantomData<&'a [u8]>,
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
            let mut blocks = Box::<BlockArrays>::default();
            if REUSE_COEFFICIENT_MEMORY.load(Ordering::Relaxed) {
                cinfo.common.client_data =
                    &mut *blocks as *mut BlockArrays as *mut std::ffi::c_void;
                // The memory manager exists from creation; its arrays are requested when the
                // decode starts. Its `realize_virt_arrays` skips these: not on its lists.
                let memory = &mut *cinfo.common.mem;
                memory.request_virt_barray = Some(request_block_array);
                memory.access_virt_barray = Some(access_block_array);
            }
            let mut decoder = Decoder {
                cinfo,
                _err: err,
                _progress: progress,
                _blocks: blocks,
                _bytes: PhantomData,
            };
            mozjpeg_sys::jpeg_mem_src(&mut decoder.cinfo, bytes.as_ptr(), bytes.len() as _);
            // APP1 holds EXIF (and XMP): kept for the orientation, at most 64 KiB by format.
            mozjpeg_sys::jpeg_save_markers(&mut decoder.cinfo, 0xE1, 0xFFFF);
            // With the whole file in memory libjpeg never suspends: it returns or unwinds.
            mozjpeg_sys::jpeg_read_header(&mut decoder.cinfo, true as boolean);
            decoder
        }
    }

    /// Its size, EXIF orientation and whether libjpeg decodes it to RGB.
    pub(super) fn header(&self) -> Header {
        let (width, height) = self.size();
        Header {
            width: width as u32,
            height: height as u32,
            orientation: self.exif_orientation(),
            rgb: self.converts_to_rgb(),
            // SAFETY: the header has been read.
            multiple_scans: unsafe { mozjpeg_sys::jpeg_has_multiple_scans(&self.cinfo) } != 0,
        }
    }

    /// [`Self::read_rect`] into packed rows; `None` (nothing decoded) for colour spaces libjpeg
    /// does not turn into RGB.
    pub(super) fn read_rect_pixels(&mut self, rect: Rect) -> Option<Vec<u8>> {
        if !self.converts_to_rgb() {
            return None;
        }
        let mut pixels = Vec::with_capacity(rect.width * rect.height * 3);
        self.read_rect(rect, |row| pixels.extend_from_slice(row));
        Some(pixels)
    }

    fn size(&self) -> (usize, usize) {
        (
            self.cinfo.image_width as usize,
            self.cinfo.image_height as usize,
        )
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

    fn converts_to_rgb(&self) -> bool {
        !matches!(
            self.cinfo.jpeg_color_space,
            J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK
        )
    }

    fn start(&mut self) {
        self.cinfo.out_color_space = J_COLOR_SPACE::JCS_RGB;
        // SAFETY: the header has been read; errors unwind.
        unsafe { mozjpeg_sys::jpeg_start_decompress(&mut self.cinfo) };
    }

    /// Decodes `rect` (inside the image, of a JPEG that [`Header::rgb`] says libjpeg turns
    /// into RGB), handing each packed RGB row to `each_row`, top to bottom.
    pub(super) fn read_rect(&mut self, rect: Rect, mut each_row: impl FnMut(&[u8])) {
        let (width, height) = self.size();
        assert!(rect.left + rect.width <= width && rect.top + rect.height <= height);
        self.start();
        let mut x = rect.left.saturating_sub(CROP_MARGIN) as u32;
        let mut crop_width =
            ((rect.left + rect.width + CROP_MARGIN).min(width) - x as usize) as u32;
        // SAFETY: the crop lies inside the image and no scanline has been read; libjpeg moves
        // `x` left to an iMCU boundary and widens `crop_width` to match.
        unsafe { mozjpeg_sys::jpeg_crop_scanline(&mut self.cinfo, &mut x, &mut crop_width) };
        let skip = rect.left - x as usize;
        let mut row = Scratch::zeroed(crop_width as usize * 3);
        // SAFETY: `rect.top` rows exist; skipping keeps the upsampler's context rows.
        unsafe { mozjpeg_sys::jpeg_skip_scanlines(&mut self.cinfo, rect.top as u32) };
        for _ in 0..rect.height {
            let mut row_ptr = row.as_mut_ptr();
            // SAFETY: `row` holds one output scanline of the cropped width.
            let read =
                unsafe { mozjpeg_sys::jpeg_read_scanlines(&mut self.cinfo, &mut row_ptr, 1) };
            assert_eq!(read, 1, "libjpeg returned no scanline");
            each_row(&row[skip * 3..][..rect.width * 3]);
        }
    }
}

impl Drop for Decoder<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `new`; destroying also releases a decompression left unfinished.
        unsafe { mozjpeg_sys::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

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
