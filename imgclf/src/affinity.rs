//! Which core a thread runs on, for an image that has the machine to itself.
//!
//! Such an image is decoded on two threads and run on a model over every core. Each hands
//! work to a sleeping thread, and Linux usually wakes a thread on an idle core. But where the
//! cores are a virtual machine's, an idle one may not count as free, and the woken thread then
//! shares the waker's core while the other stays idle: the two halves take turns instead of
//! running at once. On a 2-core KVM guest (Intel Xeon, model 167), after 10–50 ms idle, a
//! thread woken for 2 ms of work landed on its waker's core 28–37 times in 40, and
//! EfficientNet-Lite0 on ONNX Runtime's two threads took 7.6 ms per image against 4.8 back to
//! back; pinned one per core, 5.8 ms.
//!
//! So each helper of such an image is pinned to a core of its own ([`other_cores`]), and the
//! thread it helps stays on the first one ([`OnFirstCore`]) while it works. Only where the
//! cores this process may run on are exactly the ones it uses (a machine or container with
//! cores of its own): under a CPU quota over a larger set, a pinned thread could wait on a core
//! another program keeps busy. Off Linux nothing is pinned.

use std::sync::OnceLock;

/// The cores this process may run on, in order, if it uses all of them and there are at least
/// two; `None` otherwise.
pub(crate) fn own_cores() -> Option<&'static [usize]> {
    static OWN: OnceLock<Option<Vec<usize>>> = OnceLock::new();
    OWN.get_or_init(|| {
        let allowed = allowed_cores()?;
        (allowed.len() >= 2 && allowed.len() == crate::cores()).then_some(allowed)
    })
    .as_deref()
}

/// The cores other than the first of [`own_cores`], one per helper thread, in order.
pub(crate) fn other_cores() -> &'static [usize] {
    own_cores().map_or(&[], |cores| &cores[1..])
}

/// Pins the calling thread to `core` for good (a helper thread, from its start).
pub(crate) fn pin_current_thread(core: usize) {
    if let Err(error) = set_current_thread(&[core]) {
        tracing::debug!(core, %error, "a helper thread stays unpinned");
    }
}

/// The calling thread held on the first of [`own_cores`] until dropped, when it may run on
/// every core it could before. A thread it starts meanwhile would inherit the pin: start none.
pub(crate) struct OnFirstCore(Vec<usize>);

impl OnFirstCore {
    /// `None` where nothing is pinned (see the module's comment) or pinning failed.
    pub(crate) fn pin() -> Option<Self> {
        let first = *own_cores()?.first()?;
        let before = allowed_cores()?;
        set_current_thread(&[first]).ok()?;
        Some(Self(before))
    }
}

impl Drop for OnFirstCore {
    fn drop(&mut self) {
        if let Err(error) = set_current_thread(&self.0) {
            tracing::warn!(%error, "a thread could not be unpinned from its core");
        }
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn allowed_cores() -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set, and sched_getaffinity writes at most its size.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        (libc::sched_getaffinity(0, size, &mut set) == 0).then_some(set)?
    };
    // SAFETY: CPU_ISSET reads the set in bounds for every index below CPU_SETSIZE.
    let allowed =
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) });
    Some(allowed.collect())
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_current_thread(cores: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET ignores indices past its size, and
    // sched_setaffinity reads at most that size. Thread 0 is the calling thread.
    let done = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &core in cores {
            libc::CPU_SET(core, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cores() -> Option<Vec<usize>> {
    None
}

#[cfg(not(target_os = "linux"))]
fn set_current_thread(_: &[usize]) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// The core the calling thread runs on now, for the tests.
#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
pub(crate) fn running_on() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    unsafe { libc::sched_getcpu() as usize }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_held_on_the_first_core_runs_there_and_everywhere_again_after() {
        let Some(own) = own_cores() else {
            return; // one core, or a CPU quota: nothing is pinned
        };
        std::thread::spawn(move || {
            let before = allowed_cores().unwrap();
            {
                let _held = OnFirstCore::pin().expect("pinned");
                assert_eq!(allowed_cores().unwrap(), [own[0]]);
                assert_eq!(running_on(), own[0]);
            }
            assert_eq!(allowed_cores().unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
