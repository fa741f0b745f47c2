//! Proof that the guest kernel, the initramfs writer and the KVM test host
//! work together before our own VMM exists: Debian's QEMU `-M microvm` boots
//! our kernel with the probe initramfs under real KVM.

use std::time::Duration;

use microvm_tests::probe::{boot_probe, ProbeError};
use microvm_tests::{artifact, vm_host, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

#[test]
fn guest_kernel_boots_to_the_probe_init() {
    let kernel = artifact("vmlinux").unwrap();
    let initrd = artifact("probe-initramfs.cpio").unwrap();
    let boot = boot_probe(host(), &kernel, &initrd, "", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{}", protocols::error_chain(&e)));
    assert!(boot.guest_boot_ms > 0, "the probe reported no boot time");
}

#[test]
fn a_guest_without_init_ends_with_its_panic_not_a_hang() {
    let kernel = artifact("vmlinux").unwrap();
    let initrd = artifact("probe-initramfs.cpio").unwrap();
    // panic=-1 resets the guest, which ends QEMU (-no-reboot). loglevel=7
    // overrides `quiet`, so a guest that hangs before its panic shows where.
    let err = boot_probe(
        host(),
        &kernel,
        &initrd,
        "rdinit=/missing loglevel=7",
        Duration::from_secs(120),
    )
    .unwrap_err();
    assert!(matches!(err, ProbeError::NoMarker { .. }), "{err}");
    assert!(err.to_string().contains("Kernel panic"), "{err}");
}

#[test]
fn a_hung_guest_times_out_with_its_last_console_lines() {
    let kernel = artifact("vmlinux").unwrap();
    let initrd = artifact("probe-initramfs.cpio").unwrap();
    // panic=0 (the later value wins) leaves the panicked guest hanging.
    let err = boot_probe(
        host(),
        &kernel,
        &initrd,
        "rdinit=/missing panic=0",
        Duration::from_secs(20),
    )
    .unwrap_err();
    assert!(matches!(err, ProbeError::TimedOut { .. }), "{err}");
    assert!(err.to_string().contains("Kernel panic"), "{err}");
}

#[test]
fn a_missing_kernel_is_named() {
    let initrd = artifact("probe-initramfs.cpio").unwrap();
    let missing = std::path::Path::new("/nonexistent/vmlinux");
    let err = boot_probe(host(), missing, &initrd, "", Duration::from_secs(60)).unwrap_err();
    let text = protocols::error_chain(&err);
    assert!(text.contains("/nonexistent/vmlinux"), "{text}");
}
