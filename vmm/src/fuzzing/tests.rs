//! The harnesses on fixed inputs: each target's corner cases and a few
//! hundred pseudo-random inputs (a fixed seed, so a failure replays), and
//! every crash the fuzzer found, replayed.

use super::*;

/// `count` pseudo-random inputs of `len` bytes (xorshift64, fixed seed).
fn inputs(count: usize, len: usize) -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        })
        .collect()
}

fn corner_cases() -> Vec<Vec<u8>> {
    vec![
        vec![],
        vec![0; 1],
        vec![0; 4096],
        vec![0xff; 4096],
        (0..=255u8).cycle().take(4096).collect(),
    ]
}

fn run_all(target: fn(&[u8])) {
    for input in corner_cases().into_iter().chain(inputs(300, 512)) {
        target(&input);
    }
}

#[test]
fn mmio_survives_corner_cases_and_random_inputs() {
    run_all(mmio::run);
}

#[test]
fn vsock_survives_corner_cases_and_random_inputs() {
    run_all(vsock::run);
}

#[test]
fn net_survives_corner_cases_and_random_inputs() {
    run_all(net::run);
}

#[test]
fn fs_survives_corner_cases_and_random_inputs() {
    run_all(fs::run);
}
