//! The batch cap, re-checked while the service is busy.
//!
//! The start-up tuning times zero tensors with nothing else running, and cannot rank batch
//! sizes within a few percent of each other, nor a batch of one (see [`super::tuning`]). Under
//! load the instances share the cores with decoding, uploads and records, and the ranking can
//! differ: EfficientNet-Lite0 embedded under 16 clients on two cores of an Intel Xeon (model
//! 167) ran 2–3% faster at a cap of one than at the 2 or 4 the tuning chose, and on an AMD EPYC
//! of the Zen 3 class 3–7% slower. So, when the cap is left to the service, the instances try
//! every cap from one up to the start-up choice, or [`LEAST_LARGEST`] where it chose less, in
//! turns, [`TRIAL_IMAGES`] images at a time, [`PASSES`] times over, and keep the largest whose
//! CPU time per image in its cheapest pass was within 1% of the best, for [`HOLD_IMAGES`]
//! images, then try again: what the model, the photos and the machine's other work make best
//! now. Taking turns, as the start-up tuning does, lets a drift of the machine's speed touch
//! every cap alike. A cap only binds when images wait, so only busy periods advance the
//! trials.
//!
//! The cost of a batch is the CPU time its instance's thread spent running the model and
//! answering, per image: the model's input has one size whatever the photo, so it is steady
//! from batch to batch, where the photos' decoding is not. A near tie goes to the larger cap,
//! unlike at start: the work a batch causes on other threads (waking its waiters, writing its
//! records) is shared by its images but not in this figure, and the trials have already made
//! the runtime hold the largest cap's buffers. ResNet18 under 16 clients on two cores of an
//! AMD EPYC (Zen 4 class) ran 2.2% faster at a cap of 4 than of 2 (three alternating rounds),
//! where the figure put them 0.5% apart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::tuning::MARGIN;

/// The largest cap tried under load where the start-up choice is smaller. The start cannot tell
/// 2 from 4 on ResNet18 (on two cores of an AMD EPYC of the Zen 4 class it chose 2 at one start
/// in three, while under load 4 ran 2.9% faster, in eight alternating rounds of eight), and
/// only a cap tried under load can be chosen there. No more than 4: ONNX Runtime keeps the
/// buffers of the largest batch it ran, and there 8 cost ResNet18 about 50 MiB more than 4 at
/// its peak for 0.3% more speed.
pub const LEAST_LARGEST: usize = 4;

/// Images each cap runs in one turn of a round of trials.
pub const TRIAL_IMAGES: usize = 16;

/// Turns of every cap in a round of trials.
pub const PASSES: usize = 4;

/// Images run at the chosen cap, in batches that filled it, before the next round of trials (a
/// couple of minutes under load, against a second or two of trials).
pub const HOLD_IMAGES: usize = 20_000;

/// The cap the instances take batches up to, and its trials.
pub struct UnderLoad {
    /// Powers of two below `largest`, and `largest` itself.
    caps: Vec<usize>,
    cap: AtomicUsize,
    trials: Mutex<Trials>,
}

struct Trials {
    /// The cap being tried (an index into `caps`), or `None` while the choice is held.
    trying: Option<usize>,
    /// The pass of this round.
    pass: usize,
    /// CPU time and images at each cap in this pass.
    spent: Vec<(Duration, usize)>,
    /// The CPU time per image of each cap's cheapest pass so far.
    cheapest: Vec<f64>,
    /// Images run at the chosen cap since it was chosen.
    held: usize,
    /// The last round's choice.
    chosen: Option<usize>,
}

impl UnderLoad {
    /// Trials of every cap up to `largest` (the start-up choice, or [`LEAST_LARGEST`]), the
    /// smallest first; `None` where a thread's CPU time cannot be read, or `largest` is one.
    pub fn new(largest: usize) -> Option<Self> {
        thread_cpu_time()?;
        let mut caps: Vec<usize> = (0..usize::BITS)
            .map(|shift| 1 << shift)
            .take_while(|&cap| cap < largest)
            .collect();
        caps.push(largest);
        (largest > 1).then(|| UnderLoad {
            cap: AtomicUsize::new(caps[0]),
            trials: Mutex::new(Trials {
                trying: Some(0),
                pass: 0,
                spent: vec![(Duration::ZERO, 0); caps.len()],
                cheapest: vec![f64::INFINITY; caps.len()],
                held: 0,
                chosen: None,
            }),
            caps,
        })
    }

    /// The most images a batch may take now.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Counts a batch of `images` that filled `cap` (with others waiting, for a cap of one),
    /// which cost its thread `spent`; moves to the next turn, or chooses, once this one has run
    /// enough images.
    pub fn record(&self, cap: usize, images: usize, spent: Duration) {
        let mut trials = self.trials.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = trials.trying else {
            trials.held += images;
            if trials.held >= HOLD_IMAGES {
                trials.held = 0;
                trials.pass = 0;
                trials.spent.fill((Duration::ZERO, 0));
                trials.cheapest.fill(f64::INFINITY);
                trials.trying = Some(0);
                self.cap.store(self.caps[0], Ordering::Relaxed);
            }
            return;
        };
        // A batch taken under another turn's cap.
        if self.caps[i] != cap {
            return;
        }
        let (time, count) = &mut trials.spent[i];
        *time += spent;
        *count += images;
        if *count < TRIAL_IMAGES {
            return;
        }
        let per_image = time.as_secs_f64() / *count as f64;
        trials.spent[i] = (Duration::ZERO, 0);
        trials.cheapest[i] = trials.cheapest[i].min(per_image);
        let next = match i + 1 {
            next if next < self.caps.len() => Some(next),
            _ => {
                trials.pass += 1;
                (trials.pass < PASSES).then_some(0)
            }
        };
        if let Some(next) = next {
            trials.trying = Some(next);
            self.cap.store(self.caps[next], Ordering::Relaxed);
            return;
        }
        let cheapest = trials.cheapest.clone();
        let best = cheapest.iter().copied().fold(f64::INFINITY, f64::min);
        let chosen = self.caps[cheapest
            .iter()
            .rposition(|&t| t <= best * (1.0 + MARGIN))
            .unwrap_or(0)];
        trials.trying = None;
        self.cap.store(chosen, Ordering::Relaxed);
        let before = trials.chosen.replace(chosen);
        let ms: Vec<String> = self
            .caps
            .iter()
            .zip(&cheapest)
            .map(|(cap, t)| format!("{cap}: {:.2}", t * 1e3))
            .collect();
        let ms = ms.join(", ");
        // The first choice, and any change, in one line each.
        if before != Some(chosen) {
            tracing::info!(
                chosen,
                "classifier: batches of up to {chosen} under load (CPU ms per image by cap: {ms})"
            );
        } else {
            tracing::debug!(
                chosen,
                "classifier: batches of up to {chosen} under load (CPU ms per image by cap: {ms})"
            );
        }
    }
}

/// The CPU time the calling thread has used.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (read == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// The CPU time the calling thread has used: unknown here.
#[cfg(not(unix))]
pub fn thread_cpu_time() -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `images` at the current cap, each costing `cost(cap)` ms.
    fn run(under_load: &UnderLoad, images: usize, cost: impl Fn(usize) -> f64) {
        let mut left = images;
        while left > 0 {
            let cap = under_load.cap();
            let n = cap.min(left);
            let spent = Duration::from_secs_f64(cost(cap) * n as f64 / 1e3);
            under_load.record(cap, n, spent);
            left -= n;
        }
    }

    #[test]
    fn tries_every_cap_up_to_the_start_up_choice_and_keeps_the_cheapest() {
        let under_load = UnderLoad::new(4).expect("a thread's CPU time is readable here");
        assert_eq!(under_load.caps, [1, 2, 4]);
        assert_eq!(under_load.cap(), 1, "the first trial");
        let cost = |cap| match cap {
            1 => 6.0,
            2 => 5.0,
            _ => 5.4,
        };
        run(&under_load, 3 * TRIAL_IMAGES * PASSES, cost);
        assert_eq!(under_load.cap(), 2);
        // Held, then tried again: the machine's work has changed, and one is best now.
        run(&under_load, HOLD_IMAGES - 1, cost);
        assert_eq!(under_load.cap(), 2, "held");
        run(&under_load, 2, cost);
        assert_eq!(under_load.cap(), 1, "a new round");
        run(&under_load, 3 * TRIAL_IMAGES * PASSES, |cap| {
            5.0 + cap as f64 / 10.0
        });
        assert_eq!(under_load.cap(), 1);
    }

    #[test]
    fn keeps_the_largest_cap_within_the_margin_of_the_best() {
        let under_load = UnderLoad::new(8).unwrap();
        assert_eq!(under_load.caps, [1, 2, 4, 8]);
        run(&under_load, 4 * TRIAL_IMAGES * PASSES, |cap| match cap {
            1 => 7.0,
            2 => 6.0,
            4 => 6.05,
            _ => 6.2,
        });
        assert_eq!(under_load.cap(), 4, "within 1% of two, and larger");
    }

    #[test]
    fn a_machine_slowing_down_during_the_trials_does_not_favour_the_first_cap() {
        let under_load = UnderLoad::new(4).unwrap();
        // Every image costs a little more than the one before; two is 3% cheaper throughout.
        let ran = std::cell::Cell::new(0.0);
        run(&under_load, 3 * TRIAL_IMAGES * PASSES, |cap| {
            ran.set(ran.get() + 1.0);
            let slower = 1.0 + ran.get() / 1000.0;
            slower * if cap == 2 { 5.82 } else { 6.0 }
        });
        assert_eq!(under_load.cap(), 2);
    }

    #[test]
    fn a_batch_taken_under_another_cap_counts_for_nothing() {
        let under_load = UnderLoad::new(2).unwrap();
        under_load.record(2, 2 * TRIAL_IMAGES, Duration::from_secs(1));
        assert_eq!(under_load.cap(), 1, "still the first trial");
    }

    #[test]
    fn the_caps_are_powers_of_two_up_to_the_start_up_choice() {
        assert_eq!(UnderLoad::new(6).unwrap().caps, [1, 2, 4, 6]);
        assert!(UnderLoad::new(1).is_none(), "nothing to try");
    }

    #[test]
    fn the_threads_cpu_time_advances_with_its_work() {
        let before = thread_cpu_time().unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_time().unwrap() > before, "{x}");
    }
}
