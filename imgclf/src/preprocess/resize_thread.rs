//! A second thread for an image that has the machine to itself: it resizes a JPEG's rows
//! while the calling thread decodes the next ones, so that the image is preprocessed in about
//! the time decoding takes rather than decoding plus resizing. Rows cross in chunks of about
//! [`CHUNK_BYTES`], small enough to stay in cache between the two cores, large enough that
//! waking the other thread is rare.

use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc};

use super::resample::Plan;
use super::scratch::Scratch;

/// Decoded bytes handed over at a time.
const CHUNK_BYTES: usize = 128 << 10;

/// Chunks decoded ahead of the resize at most: the resize is the faster stage, so this only
/// bounds memory if its thread is held up.
const CHUNKS_AHEAD: usize = 4;

/// Smallest source, in pixels, worth splitting over two threads: below it the hand-offs cost
/// about what the resize would.
pub(super) const SPLIT_PIXELS: usize = 1 << 18;

type Job = Box<dyn FnOnce() + Send>;

/// A thread kept for resizing beside a decoding thread (see the module's comment). It stops
/// when dropped. One image at a time: a second caller's rows would wait behind the first's.
pub struct ResizeThread {
    jobs: mpsc::Sender<Job>,
}

impl ResizeThread {
    /// Starts the thread.
    pub fn spawn() -> std::io::Result<Self> {
        let (jobs, received) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("imgclf-resize".into())
            .spawn(move || {
                for job in received {
                    // A job's panic (a bug) ends that image's resize, not the thread: its
                    // caller sees no answer and fails the image.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `plan` on this thread over the rows `feed` decodes on the caller's, then `finish`
    /// on the window, and returns what `finish` made; `None` if the rows fell short (`feed`
    /// unwound, on a decoding error) or the thread failed.
    pub(super) fn resize<T: Send + 'static>(
        &self,
        plan: Arc<Plan>,
        feed: impl FnOnce(&mut dyn FnMut(&[u8])),
        finish: impl FnOnce(&Plan, Scratch) -> T + Send + 'static,
    ) -> Option<T> {
        let row_len = plan.source().width * 3;
        let chunk_len = (CHUNK_BYTES / row_len).max(1) * row_len;
        let (full, full_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_AHEAD);
        let (empty, empty_rx) = mpsc::channel::<Vec<u8>>();
        let (done, done_rx) = mpsc::sync_channel::<T>(1);
        let job = move || {
            let mut resize = plan.start();
            for mut chunk in full_rx {
                chunk
                    .chunks_exact(row_len)
                    .for_each(|row| resize.push_row(row));
                chunk.clear();
                let _ = empty.send(chunk);
            }
            if let Some(window) = resize.finished() {
                let _ = done.send(finish(&plan, window));
            }
        };
        self.jobs.send(Box::new(job)).ok()?;
        let mut chunk = Vec::with_capacity(chunk_len);
        feed(&mut |row| {
            chunk.extend_from_slice(row);
            if chunk.len() + row.len() > chunk_len {
                let next = empty_rx
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(chunk_len));
                let _ = full.send(std::mem::replace(&mut chunk, next));
            }
        });
        if !chunk.is_empty() {
            let _ = full.send(chunk);
        }
        drop(full);
        done_rx.recv().ok()
    }
}
