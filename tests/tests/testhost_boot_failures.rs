//! A test host that cannot boot must say why, with its console, and never
//! hang the test run. These boot their own (small) test hosts under QEMU/TCG
//! on this machine, beside the shared one.

use std::path::PathBuf;
use std::time::Duration;

use microvm_tests::testhost::{Config, Supervisor, TestHostError};

fn config(init: &str, extra_cmdline: &str, boot_timeout: Duration) -> Config {
    let mut config = Config::new(PathBuf::from(init));
    config.memory_mib = 512;
    config.cpus = 1;
    config.boot_timeout = boot_timeout;
    config.extra_cmdline = extra_cmdline.to_string();
    config
}

fn state_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("testhost-fail-{name}-{}", std::process::id()))
}

fn boot_error(config: &Config, name: &str) -> TestHostError {
    let dir = state_dir(name);
    let result = Supervisor::boot(config, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(_) => panic!("a test host with {:?} booted", config.init),
        Err(e) => e,
    }
}

#[test]
fn an_init_that_cannot_run_ends_the_boot_with_the_kernel_panic() {
    // A dynamically linked /init cannot run from the initramfs: the kernel
    // panics, panic=-1 resets, and QEMU (-no-reboot) exits.
    let err = boot_error(&config("/bin/true", "", Duration::from_secs(300)), "panic");
    let text = err.to_string();
    assert!(matches!(err, TestHostError::Boot { .. }), "{text}");
    assert!(text.contains("QEMU exited"), "{text}");
    assert!(text.contains("Kernel panic"), "{text}");
}

#[test]
fn a_boot_that_hangs_times_out_with_the_last_console_lines() {
    let err = boot_error(
        &config("/bin/true", "panic=0", Duration::from_secs(45)),
        "hang",
    );
    let text = err.to_string();
    assert!(text.contains("timed out after 45s"), "{text}");
    assert!(text.contains("Kernel panic"), "{text}");
    let lines = text
        .split("console lines")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(lines <= 52, "more than 50 console lines: {lines}");
}

#[test]
fn a_missing_init_binary_is_named() {
    let err = boot_error(
        &config("/nonexistent/testhost-init", "", Duration::from_secs(10)),
        "noinit",
    );
    assert!(
        err.to_string().contains("/nonexistent/testhost-init"),
        "{err}"
    );
}
