//! Fuzzes FUSE requests on the virtio-fs queues, served over a scratch directory
//! (the harness: `vmm::fuzzing::fs`). Every run must close every descriptor it opened.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::without_fd_leaks("fs", || vmm::fuzzing::fs::run(data));
});
