//! What one decode may cost. A few kilobytes can describe a very expensive image: a progressive
//! JPEG whose refinement scan is repeated thousands of times, a GIF frame far larger than its
//! screen, a deflate stream that inflates without end. Structural limits stop each known trick
//! cheaply (scans, pixels, allocation); a CPU-time budget per decode is the last line for the
//! tricks no one has listed yet.

use std::io::{BufRead, Cursor, Read, Seek, SeekFrom};
use std::time::Duration;

use cpu_time::ThreadTime;

/// CPU time one decode may take, at upload or in the worker. The largest legitimate photo at
/// the default pixel cap decodes in a fraction of it.
pub const DECODE_CPU_BUDGET: Duration = Duration::from_secs(1);

/// Progressive JPEG scans a decode reads at most. Encoders write about ten; libjpeg-turbo's
/// own tools offer the same guard (`djpeg -maxscans`).
pub const MAX_JPEG_SCANS: i32 = 100;

/// Bytes a decoder may allocate per pixel of the cap: 16-bit RGBA, the widest layout decoded.
pub const MAX_ALLOC_PER_PIXEL: u64 = 8;

/// The CPU time of this thread since the decode began.
pub(crate) struct Budget {
    started: ThreadTime,
    limit: Duration,
}

impl Budget {
    /// Starts counting this thread's CPU time.
    pub(crate) fn start() -> Self {
        Self {
            started: ThreadTime::now(),
            limit: DECODE_CPU_BUDGET,
        }
    }

    /// Whether the decode has used up its budget.
    pub(crate) fn exceeded(&self) -> bool {
        self.started.elapsed() > self.limit
    }

    /// The error a decode over budget ends with.
    pub(crate) fn error(&self) -> super::ImageError {
        super::ImageError::TooCostly(self.why())
    }

    /// Why a decode over budget was stopped.
    pub(crate) fn why(&self) -> String {
        format!("decoding took more than {:?} of CPU time", self.limit)
    }
}

/// Why a JPEG of more than [`MAX_JPEG_SCANS`] scans was stopped.
pub(crate) fn too_many_scans() -> String {
    format!("more than {MAX_JPEG_SCANS} progressive scans")
}

/// The image bytes, read by a decoder that stops (with an I/O error) once the budget is spent:
/// every decoder reads as it goes, so none can outlast its budget by more than one read.
pub(crate) struct BudgetReader<'a> {
    inner: Cursor<&'a [u8]>,
    budget: &'a Budget,
    reads: u32,
}

impl<'a> BudgetReader<'a> {
    pub(crate) fn new(bytes: &'a [u8], budget: &'a Budget) -> Self {
        Self {
            inner: Cursor::new(bytes),
            budget,
            reads: 0,
        }
    }

    fn check(&mut self) -> std::io::Result<()> {
        // Reading the clock costs a system call: look every few reads.
        self.reads = self.reads.wrapping_add(1);
        if self.reads.is_multiple_of(16) && self.budget.exceeded() {
            return Err(std::io::Error::other("decode budget exceeded"));
        }
        Ok(())
    }
}

impl Read for BudgetReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.read(buf)
    }
}

impl BufRead for BudgetReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.check()?;
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        self.inner.consume(amount)
    }
}

impl Seek for BudgetReader<'_> {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(position)
    }
}
