//! How the service's own threads share the cores with the model's.
//!
//! Under load the model's threads run for milliseconds at a time on every core, while the
//! threads that receive uploads, write images and records and answer wake up many times per
//! image between them. Linux lets a woken thread preempt the running one at once, so each of
//! those wake-ups interrupted a model run, and in a virtual machine each costs an
//! inter-processor interrupt too. [`service_runtime`] marks the service's threads
//! `SCHED_BATCH`: a woken one waits for the running thread's turn to end (a few milliseconds
//! at most) instead, and still gets its fair share of the cores. The model's threads run
//! under the normal policy. A thread woken on an idle core runs at once under either policy,
//! so a lone request waits for nothing.
//!
//! EfficientNet-Lite0 embedded, 16 clients, alternating with the normal policy (Intel Xeon,
//! model 167, 2 cores): 176.5 against 171.5 images/s (mean of eight rounds, ahead in seven).
//! In a profile of the distributed worker, the interrupts that preempted its model threads
//! took 3% of all samples. On an AMD EPYC (Zen 3 class, 2 cores) no gain showed: the normal
//! policy was ahead in 20 of 32 alternating pairs, by −1% to +10% from one sitting to the next,
//! within that host's noise. On one of the Zen 4 class the policy gained a little again: 142.9
//! against 141.2 images/s (eight rounds, ahead in six). On one of the Zen 5 class it made no
//! difference: the normal policy gave 173.6 against 172.7 (ten rounds, ahead in six, 153.8 to
//! 192.8 from one round to the next). `IMGCLF_BATCH_SCHEDULING=false` turns the policy off. Off
//! Linux nothing changes.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`yield_to_the_model`] was called: the model's threads then undo what they inherit.
static YIELDING: AtomicBool = AtomicBool::new(false);

/// The async runtime of a binary of the service. With `yield_to_model`, the calling thread is
/// first marked as the service's own, so that the runtime's threads, and every thread they
/// start, inherit it; where that fails on Linux, a warning says so and the normal policy stays.
pub fn service_runtime(yield_to_model: bool) -> std::io::Result<tokio::runtime::Runtime> {
    match yield_to_model.then(yield_to_the_model) {
        // Off Linux there is no batch policy to ask for.
        Some(Err(error)) if error.kind() == std::io::ErrorKind::Unsupported => {}
        Some(Err(error)) => {
            tracing::warn!(%error, "the service's threads stay under the normal scheduling policy");
        }
        _ => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Marks the calling thread, and every thread it starts from now on, as the service's own:
/// its wake-ups wait for a model thread's turn rather than preempting it. The model's threads
/// return to the normal policy themselves.
fn yield_to_the_model() -> std::io::Result<()> {
    set_policy(Policy::Batch)?;
    YIELDING.store(true, Ordering::Relaxed);
    Ok(())
}

/// Puts a model thread (an instance, or a helper that decodes for one) back under the normal
/// policy if it inherited the service's.
pub(crate) fn model_thread() {
    if YIELDING.load(Ordering::Relaxed) {
        if let Err(error) = set_policy(Policy::Normal) {
            tracing::debug!(%error, "a model thread keeps the batch policy");
        }
    }
}

enum Policy {
    Normal,
    Batch,
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_policy(policy: Policy) -> std::io::Result<()> {
    let policy = match policy {
        Policy::Normal => libc::SCHED_OTHER,
        Policy::Batch => libc::SCHED_BATCH,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; thread 0 is the calling thread, and
    // both policies take priority 0.
    match unsafe { libc::sched_setscheduler(0, policy, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_: Policy) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn policy_of_this_thread() -> i32 {
        // SAFETY: thread 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn the_threads_a_yielding_thread_starts_yield_too_and_model_threads_do_not() {
        std::thread::spawn(|| {
            yield_to_the_model().expect("SCHED_BATCH needs no privilege");
            assert_eq!(policy_of_this_thread(), libc::SCHED_BATCH);
            let started = std::thread::spawn(policy_of_this_thread).join().unwrap();
            assert_eq!(started, libc::SCHED_BATCH, "inherited");
            let model = std::thread::spawn(|| {
                model_thread();
                policy_of_this_thread()
            });
            assert_eq!(model.join().unwrap(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
