//! A second thread for an image that has the machine to itself: while the calling thread
//! decodes and resizes a JPEG's upper rows, it decodes and resizes the lower ones with a
//! decoder of its own, which reads past the upper rows' data without making their pixels
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
pub struct HelperThread(pub(super) rayon::ThreadPool);

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
