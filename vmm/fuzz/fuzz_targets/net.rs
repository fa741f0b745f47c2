//! Fuzzes virtio-net TX and RX chains on a socket pair standing in for the tap
//! (the harness: `vmm::fuzzing::net`). Every run must close every descriptor it opened.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::without_fd_leaks("net", || vmm::fuzzing::net::run(data));
});
