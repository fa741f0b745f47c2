//! In-process harnesses for the fuzz targets of `vmm/fuzz`: each turns
//! arbitrary bytes into what a hostile guest can do to one device (MMIO
//! register accesses, descriptor chains on its virtqueues, the packets and
//! requests in them) and what its host peers do, runs the device's real
//! code on them, and checks the invariants that must hold whatever the
//! guest does:
//!
//! - nothing panics (libFuzzer reports a panic as a crash);
//! - nothing allocates without bound (libFuzzer's `-malloc_limit_mb` and
//!   `-rss_limit_mb`, set by `scripts/fuzz.sh`);
//! - a device never returns more buffers than the guest made available;
//! - the tables a device keeps for the guest stay within their caps;
//! - nothing is left behind: every descriptor the run opened is closed once
//!   the device is dropped ([`without_fd_leaks`], which the fuzz targets
//!   wrap every run in).
//!
//! The harnesses live here, not in the fuzz crate, so that a crash found by
//! the fuzzer becomes a unit test replaying its input (see `tests`).
//!
//! - [`input`]: reading typed values from the fuzzer's bytes;
//! - [`driver`]: the guest's side of the virtqueues in guest memory;
//! - [`mmio`], [`vsock`], [`net`], [`fs`]: one harness per target.

// Harness code, like test code: a panic here is a finding, so an unwrap
// is the assertion "this must not fail".
#![allow(clippy::unwrap_used)]

pub mod driver;
pub mod fs;
pub mod input;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::path::{Path, PathBuf};

use event_manager::{EventManager, MutEventSubscriber};

pub use input::Input;

/// Runs `events` until nothing is ready any more (at most `MAX_PASSES`
/// passes: a device that keeps rescheduling itself is bounded too).
pub(crate) fn run_until_idle<S: MutEventSubscriber>(events: &mut EventManager<S>) {
    const MAX_PASSES: usize = 64;
    for _ in 0..MAX_PASSES {
        match events.run_with_timeout(0) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A scratch directory, removed with everything in it when dropped.
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn new(what: &str) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "microvm-fuzz-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of a run that crashed with this pid and number.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)?;
        Ok(Self(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How many descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// Runs `harness` and checks that it closed every descriptor it opened.
/// The count is the process's: only a single-threaded caller (a fuzz
/// target, not a test among others running in parallel) can tell.
pub fn without_fd_leaks(what: &str, harness: impl FnOnce()) {
    let before = open_fds();
    harness();
    let after = open_fds();
    assert_eq!(
        before, after,
        "{what}: {before} descriptors open before the run, {after} after"
    );
}

#[cfg(test)]
mod tests;
