//! Byte buffers reused across images on the same thread.
//!
//! Each image needs a few buffers of up to a few MiB (decoded rows, the resize's intermediate,
//! the crop, a JPEG's unstuffed entropy-coded data; a turned photo's rows, a progressive JPEG's
//! coefficients). Allocated afresh, memory that size comes from `mmap` or a trimmed heap, and
//! every page faults in again on first touch: reused, it stays mapped and warm in cache.
//! Preprocessing runs on a fixed pool of threads, so each keeps its own few buffers.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Bytes one thread keeps between images at most: what a 12-megapixel phone photo stored
/// turned needs (21 MiB of its crop's rows, then the resize's), not what a huge one pins.
const KEEP_BYTES: usize = 32 << 20;

/// Buffers one thread keeps between images: what one image needs at a time (three coefficient
/// arrays and three of the resize's); more is waste.
const KEEP_COUNT: usize = 6;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// `len` zeroed bytes, in a buffer this thread used before where it has one; it returns to the
/// thread when dropped.
pub(super) struct Scratch(Vec<u8>);

impl Scratch {
    pub(super) fn zeroed(len: usize) -> Self {
        let mut buffer = Self::taken(len);
        buffer.0.resize(len, 0);
        buffer
    }

    /// An empty buffer that holds at least `capacity` bytes, to fill through
    /// [`Self::as_vec_mut`].
    pub(super) fn with_capacity(capacity: usize) -> Self {
        let mut buffer = Self::taken(capacity);
        buffer.0.reserve(capacity);
        buffer
    }

    /// The buffer, to fill or grow.
    pub(super) fn as_vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// An empty buffer from the thread's, best for `len` bytes.
    fn taken(len: usize) -> Self {
        let mut buffer = FREE
            .with_borrow_mut(|free| {
                // The smallest free buffer that holds `len` bytes, else the largest (to grow).
                let fits = (0..free.len())
                    .filter(|&i| free[i].capacity() >= len)
                    .min_by_key(|&i| free[i].capacity());
                let pick = fits.or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
                pick.map(|i| free.swap_remove(i))
            })
            .unwrap_or_default();
        buffer.clear();
        Self(buffer)
    }
}

impl Default for Scratch {
    /// An empty buffer, allocated when it grows.
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        if buffer.capacity() == 0 || buffer.capacity() > KEEP_BYTES {
            return;
        }
        // `try_with`: a buffer dropped while its thread's locals are torn down just goes.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            let kept: usize = free.iter().map(Vec::capacity).sum();
            if free.len() < KEEP_COUNT && kept + buffer.capacity() <= KEEP_BYTES {
                free.push(buffer);
            }
        });
    }
}

impl Deref for Scratch {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_zeroed_and_is_reused() {
        let first = {
            let mut a = Scratch::zeroed(1000);
            a.fill(7);
            a.as_ptr()
        };
        let b = Scratch::zeroed(800);
        assert_eq!(b.as_ptr(), first, "the same thread gets its buffer back");
        assert_eq!(b.len(), 800);
        assert!(b.iter().all(|&v| v == 0));
    }

    #[test]
    fn buffers_in_use_at_once_are_distinct_and_no_more_than_the_cap_is_kept() {
        let (a, b) = (Scratch::zeroed(64), Scratch::zeroed(64));
        assert_ne!(a.as_ptr(), b.as_ptr());
        drop((a, b));
        drop(Scratch::zeroed(KEEP_BYTES + 1));
        let half = (
            Scratch::zeroed(KEEP_BYTES / 2),
            Scratch::zeroed(KEEP_BYTES / 2),
        );
        drop(half);
        FREE.with_borrow(|free| {
            let kept: usize = free.iter().map(Vec::capacity).sum();
            assert!(kept <= KEEP_BYTES, "{kept} bytes kept");
        });
    }
}
