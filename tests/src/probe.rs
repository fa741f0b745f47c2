//! The proof boot: our guest kernel with the probe initramfs under Debian's
//! `qemu-system-x86_64 -M microvm -accel kvm`, run where VMs can run. It proves
//! kernel + initramfs + KVM before (and independently of) our own VMM.

use std::path::Path;
use std::time::Duration;

use crate::{Output, VmHost};

/// What `probe-init` prints once it runs.
pub const MARKER: &str = "MICROVM-PROBE-READY";

/// A successful proof boot.
#[derive(Debug, Clone)]
pub struct ProbeBoot {
    /// The guest's own time from kernel start to init (CLOCK_BOOTTIME).
    pub guest_boot_ms: u64,
    /// Wall time of the whole QEMU run, as seen where it ran.
    pub wall: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the guest did not print {MARKER} within {timeout:?}; QEMU was killed. Last console lines:\n{tail}")]
    TimedOut { timeout: Duration, tail: String },
    #[error("the guest ended ({status}) without printing {MARKER}. Last console lines:\n{tail}")]
    NoMarker { status: String, tail: String },
    #[error(
        "the guest printed {MARKER} but QEMU then ended with {status}. Last console lines:\n{tail}"
    )]
    UncleanExit { status: String, tail: String },
    #[error("running QEMU")]
    Run(#[source] anyhow::Error),
}

/// The QEMU command line for a proof boot. `quiet`: each console line costs
/// ~0.1 s of emulated UART exits in a nested test host. `reboot=t` + `-no-reboot`: the
/// probe's reset (a triple fault) ends QEMU with status 0; `panic=-1` turns a
/// kernel panic into the same reset, so nothing waits forever on a dead guest.
pub fn qemu_microvm_command(kernel: &Path, initrd: &Path, extra_cmdline: &str) -> Vec<String> {
    let cmdline = format!("console=ttyS0 quiet reboot=t panic=-1 {extra_cmdline}");
    [
        "qemu-system-x86_64",
        "-M",
        "microvm,acpi=off,pit=on,pic=on,rtc=off,isa-serial=on",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        &kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        cmdline.trim(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn last_lines(output: &Output, count: usize) -> String {
    let text = output.stdout_text() + &output.stderr_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Boots `kernel` + `initrd` once and checks the probe's marker and a clean end.
pub fn boot_probe(
    host: &VmHost,
    kernel: &Path,
    initrd: &Path,
    extra_cmdline: &str,
    timeout: Duration,
) -> Result<ProbeBoot, ProbeError> {
    let argv = qemu_microvm_command(kernel, initrd, extra_cmdline);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let output = host.run(&argv, b"", timeout).map_err(ProbeError::Run)?;
    let tail = last_lines(&output, 50);
    if output.timed_out {
        return Err(ProbeError::TimedOut { timeout, tail });
    }
    let stdout = output.stdout_text();
    let Some(marker_line) = stdout.lines().find(|line| line.contains(MARKER)) else {
        return Err(ProbeError::NoMarker {
            status: output.status.to_string(),
            tail,
        });
    };
    if !output.status.success() {
        return Err(ProbeError::UncleanExit {
            status: output.status.to_string(),
            tail,
        });
    }
    let guest_boot_ms = marker_line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("guest_boot_ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    Ok(ProbeBoot {
        guest_boot_ms,
        wall: output.elapsed,
    })
}
