//! A second thread for an image that has the machine to itself: while the calling thread
//! decodes a JPEG's upper rows (and resizes them, for a photo stored upright), it does the
//! same with the lower ones, with a decoder of its own that reads past the upper rows' data
//! without making their pixels (libjpeg's skip: entropy decoding only). The upper part is the
//! larger, so that both end together. A photo stored turned then has its shown rows resized
//! in two halves. Progressive JPEGs are not split: each thread would decode every scan before
//! its first row. Instead the helper resizes their rows while the calling thread decodes the
//! next ones, handed over in buffers of about [`CHUNK_BYTES`]: small enough to stay in cache
//! between the two cores, large enough that waking the other thread is rare.

use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// Decoded bytes handed over at a time, in a pipeline.
const CHUNK_BYTES: usize = 128 << 10;

/// Buffers decoded ahead of the helper at most: it is the faster stage, so this only bounds
/// memory if its thread is held up.
const CHUNKS_AHEAD: usize = 4;

/// Smallest source, in pixels, worth splitting: below it waking the other thread costs about
/// what it saves.
pub(super) const SPLIT_PIXELS: usize = 1 << 18;

/// The share of the rows, in percent, that the calling thread decodes: the other thread also
/// entropy-decodes the rows above its own (measured best between 50% and 60% on a 4 MP
/// photo; 65% was about 12% slower).
pub(super) const UPPER_PERCENT: usize = 55;

/// How long the helper polls for the next buffer of a pipeline before it sleeps: the next one
/// is usually a fraction of a millisecond away, and where the machine is a virtual one, waking
/// a thread whose core went idle takes about as long. A pipeline runs only for an image alone
/// on the machine, so the polling keeps no other work off the core.
const POLL_BEFORE_SLEEP: Duration = Duration::from_millis(1);

/// A thread kept to share a lone image's decoding (see the module's comment).
/// It stops when dropped. One image at a time: a second caller's part would wait behind the
/// first's.
pub struct HelperThread(rayon::ThreadPool);

impl HelperThread {
    /// Starts the thread, on a core of its own where the process has cores of its own (see
    /// `crate::affinity`): the thread it helps is then held on another.
    pub fn spawn() -> Result<Self, rayon::ThreadPoolBuildError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "imgclf-helper".into())
            .start_handler(|_| {
                crate::scheduling::model_thread();
                if let Some(&core) = crate::affinity::other_cores().first() {
                    crate::affinity::pin_current_thread(core);
                }
            })
            .build()
            .map(Self)
    }

    /// Fills `out`, rows of `out_row` bytes, from two parts at once: `upper` hands over the
    /// rows for the first `split` on this thread, `lower` the rest on the helper's, and
    /// `each_row` makes a row of `out` from each. Either's error is returned (the upper one's
    /// first); a part that returns `Ok` must have handed over all its rows.
    pub(super) fn fill_in_two<E: Send>(
        &self,
        out: &mut [u8],
        out_row: usize,
        split: usize,
        each_row: &(dyn Fn(&[u8], &mut [u8]) + Sync),
        upper: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E>,
        lower: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E> + Send,
    ) -> Result<(), E> {
        let (upper_out, lower_out) = out.split_at_mut(split * out_row);
        let mut lower_done = None;
        let upper_done = self.0.in_place_scope(|scope| {
            scope.spawn(|_| lower_done = Some(fill(lower_out, out_row, each_row, lower)));
            fill(upper_out, out_row, each_row, upper)
        });
        upper_done?;
        lower_done.expect("the scope ran its task")
    }

    /// Fills `out` like [`Self::fill_in_two`] from one part, `rows` (each `in_row` bytes),
    /// decoded on this thread while the helper makes rows of `out` from those handed over.
    pub(super) fn fill_pipelined<E: Send>(
        &self,
        out: &mut [u8],
        out_row: usize,
        in_row: usize,
        each_row: &(dyn Fn(&[u8], &mut [u8]) + Sync),
        rows: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E>,
    ) -> Result<(), E> {
        let chunk_len = (CHUNK_BYTES / in_row).max(1) * in_row;
        let (full, full_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_AHEAD);
        let (empty, empty_rx) = mpsc::channel::<Vec<u8>>();
        let mut out_rows = out.chunks_exact_mut(out_row);
        let mut all_filled = false;
        let decoded = self.0.in_place_scope(|scope| {
            scope.spawn(|_| {
                let chunks = full_rx;
                while let Some(mut chunk) = next_chunk(&chunks) {
                    for row in chunk.chunks_exact(in_row) {
                        each_row(row, out_rows.next().expect("no more rows than `out` has"));
                    }
                    chunk.clear();
                    let _ = empty.send(chunk);
                }
                all_filled = out_rows.next().is_none();
            });
            let mut chunk = Vec::with_capacity(chunk_len);
            let decoded = rows(&mut |row| {
                chunk.extend_from_slice(row);
                if chunk.len() >= chunk_len {
                    let next = empty_rx
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(chunk_len));
                    let _ = full.send(std::mem::replace(&mut chunk, next));
                }
            });
            let _ = full.send(chunk);
            drop(full); // ends the helper's loop
            decoded
        });
        decoded?;
        assert!(all_filled, "every row of `out`");
        Ok(())
    }
}

/// The next buffer of a pipeline, `None` once its sender is gone: polled for up to
/// [`POLL_BEFORE_SLEEP`], then waited for asleep.
fn next_chunk(chunks: &Receiver<Vec<u8>>) -> Option<Vec<u8>> {
    let started = Instant::now();
    loop {
        match chunks.try_recv() {
            Ok(chunk) => return Some(chunk),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if started.elapsed() < POLL_BEFORE_SLEEP => {
                std::hint::spin_loop();
            }
            Err(TryRecvError::Empty) => return chunks.recv().ok(),
        }
    }
}

/// `out`, rows of `out_row` bytes, made by `each_row` from every row `rows` hands over.
fn fill<E>(
    out: &mut [u8],
    out_row: usize,
    each_row: &(dyn Fn(&[u8], &mut [u8]) + Sync),
    rows: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E>,
) -> Result<(), E> {
    let mut out_rows = out.chunks_exact_mut(out_row);
    rows(&mut |row| each_row(row, out_rows.next().expect("no more rows than `out` has")))?;
    assert!(out_rows.next().is_none(), "every row of `out`");
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::affinity::{own_cores, running_on, OnFirstCore};

    /// Where the process has cores of its own, the two parts of an image run on two cores:
    /// the helper on the second, the thread it helps held on the first.
    #[test]
    fn the_helper_works_on_a_core_of_its_own_beside_the_thread_it_helps() {
        let Some(own) = own_cores() else {
            return; // one core, or a CPU quota: nothing is pinned
        };
        let helper = HelperThread::spawn().expect("a thread");
        std::thread::spawn(move || {
            let _held = OnFirstCore::pin().expect("pinned");
            for _ in 0..20 {
                let mut cores = [0; 2];
                let each_row = |row: &[u8], out: &mut [u8]| out.copy_from_slice(row);
                let part = |push: &mut dyn FnMut(&[u8])| {
                    push(&[running_on() as u8]);
                    Ok::<_, ()>(())
                };
                helper
                    .fill_in_two(&mut cores, 1, 1, &each_row, part, part)
                    .unwrap();
                assert_eq!(cores, [own[0] as u8, own[1] as u8]);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .join()
        .unwrap();
    }
}
