//! A tiny static init for proof boots: prints a marker line (with the guest's
//! time since boot) on the console and resets the machine, which ends the
//! VMM. Boot it with `reboot=t` (QEMU: plus `-no-reboot`) or on a VMM that
//! exits on i8042 reset.

use std::io::Write;

/// The line a proof boot waits for.
const MARKER: &str = "MICROVM-PROBE-READY";

fn boot_time_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

fn main() {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{MARKER} guest_boot_ms={}", boot_time_ms());
    let _ = stdout.flush();
    // SAFETY: sync and reboot take no pointers; we are PID 1 and want the VM gone.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; PID 1 must not exit (that panics the kernel).
    eprintln!(
        "probe-init: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::park();
    }
}
