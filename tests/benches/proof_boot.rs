//! `cargo bench -p microvm-tests --bench proof_boot`
//!
//! Prints, in one run:
//! - the guest kernel's build time and vmlinux size (from the build cache);
//! - the KVM test host's boot time (when this machine needs one);
//! - time to the probe's marker over N runs (min/median/max, default 10) for
//!   our stripped guest kernel, side by side with Debian's stock kernel
//!   booting the same probe initramfs under the same QEMU `-M microvm`.
//!
//! `MICROVM_BENCH_RUNS` sets N.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use microvm_tests::bench::BenchHost;
use microvm_tests::probe::boot_probe;
use microvm_tests::testhost::find_host_kernel;
use microvm_tests::{artifact, VmHost};

fn main() -> Result<()> {
    // `cargo bench` passes "--bench"; nothing else to parse.
    let runs = microvm_tests::bench::runs(10);
    let kernel = artifact("vmlinux")?;
    let initrd = artifact("probe-initramfs.cpio")?;
    report_kernel_build(&kernel)?;
    let bench_host = BenchHost::start()?;
    let host = &bench_host.host;

    let stock = find_host_kernel(Path::new("/"))?.image;
    println!("\nproof boot to the probe's marker, QEMU -M microvm -accel kvm, {runs} runs each:");
    println!(
        "{:<34} {:>21} {:>21}",
        "kernel", "wall min/med/max (s)", "guest boot med (ms)"
    );
    for (name, image) in [
        ("microvm guest (stripped 6.1)", kernel),
        ("baseline: Debian stock 6.1", stock),
    ] {
        let (walls, guest_ms) = measure(host, &image, &initrd, runs)?;
        println!(
            "{name:<34} {:>6.2} {:>6.2} {:>6.2}  {:>19}",
            walls[0],
            walls[walls.len() / 2],
            walls[walls.len() - 1],
            guest_ms[guest_ms.len() / 2]
        );
    }

    Ok(())
}

/// Sorted wall times (s) and guest boot times (ms) of `runs` proof boots.
fn measure(
    host: &VmHost,
    kernel: &Path,
    initrd: &Path,
    runs: usize,
) -> Result<(Vec<f64>, Vec<u64>)> {
    let mut walls = Vec::new();
    let mut guest_ms = Vec::new();
    for _ in 0..runs {
        let boot = boot_probe(host, kernel, initrd, "", Duration::from_secs(180))
            .with_context(|| format!("booting {}", kernel.display()))?;
        walls.push(boot.wall.as_secs_f64());
        guest_ms.push(boot.guest_boot_ms);
    }
    walls.sort_by(f64::total_cmp);
    guest_ms.sort();
    Ok((walls, guest_ms))
}

fn report_kernel_build(kernel: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-kernel-config/build.sh");
    let output = Command::new(&script)
        .output()
        .context("running guest-kernel-config/build.sh")?;
    let cached = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let stats = std::fs::read_to_string(cached.with_file_name("build-stats")).unwrap_or_default();
    let mut fields = stats.split_whitespace();
    let size = std::fs::metadata(kernel)?.len();
    match fields.next() {
        Some(seconds) => println!(
            "guest kernel: built in {seconds} s on {} cores, vmlinux {:.1} MiB",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            size as f64 / (1 << 20) as f64
        ),
        None => println!(
            "guest kernel: vmlinux {:.1} MiB (build time not recorded)",
            size as f64 / (1 << 20) as f64
        ),
    }
    Ok(())
}
