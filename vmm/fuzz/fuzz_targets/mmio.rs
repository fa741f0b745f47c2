//! Fuzzes MMIO register reads and writes of a virtio-mmio device (vsock or net), its setup and queues
//! (the harness: `vmm::fuzzing::mmio`). Every run must close every descriptor it opened.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::without_fd_leaks("mmio", || vmm::fuzzing::mmio::run(data));
});
