//! A second thread for an image that has the machine to itself: while the calling thread
//! decodes a JPEG's upper rows (and resizes them, for a photo stored upright), it does the
//! same with the lower ones with a decoder of its own, which reads past the upper rows' data without making their pixels
//! (libjpeg's skip: entropy decoding only). The upper part is the larger, so that both end
//! together. Progressive JPEGs are not split: each thread would decode every scan before its
//! first row.

/// Smallest source, in pixels, worth splitting: below it waking the other thread costs about
/// what it saves.
pub(super) const SPLIT_PIXELS: usize = 1 << 18;

/// The share of the rows, in percent, that the calling thread decodes: the other thread also
/// entropy-decodes the rows above its own (measured best between 50% and 60% on a 4 MP
/// photo; 65% was 10% slower).
pub(super) const UPPER_PERCENT: usize = 55;

/// A thread kept to take the lower part of a lone image's decoding (see the module's comment).
/// It stops when dropped. One image at a time: a second caller's part would wait behind the
/// first's.
pub struct HelperThread(rayon::ThreadPool);

impl HelperThread {
    /// Starts the thread.
    pub fn spawn() -> Result<Self, rayon::ThreadPoolBuildError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "imgclf-helper".into())
            .build()
            .map(Self)
    }
}

impl HelperThread {
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
