//! Fuzzes the vsock device's TX and RX queues: packets with any header, op and credit, and host peers
//! (the harness: `vmm::fuzzing::vsock`). Every run must close every descriptor it opened.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::without_fd_leaks("vsock", || vmm::fuzzing::vsock::run(data));
});
