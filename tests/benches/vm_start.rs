//! `cargo bench -p microvm-tests --bench vm_start`
//!
//! Prints, in one run, where VMs run (directly, or in one KVM test host):
//! 1. boot to the probe init's marker with the same kernel and initramfs:
//!    our VMM (`microvm-vmm`) side by side with QEMU `-M microvm` (baseline);
//! 2. `microvm run -- true` end to end (VMM start, boot, agent, exec, exit,
//!    teardown);
//! 3. resident memory of an idle guest's VMM process (the same kernel and
//!    initramfs idling in `sleep`, 128 MiB of guest RAM): ours vs QEMU.
//!
//! `MICROVM_BENCH_RUNS` sets the number of runs (default 10). It runs the
//! release builds when there are (`cargo build --release --bins`), else the
//! debug ones, and prints which.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use microvm_tests::bench::{min_med_max, runs, BenchHost};
use microvm_tests::probe::{boot_probe, MARKER};
use microvm_tests::{artifact, bench_binary, ExitStatus, VmHost};

const TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let runs = runs(10);
    let kernel = artifact("vmlinux")?.display().to_string();
    let probe = artifact("probe-initramfs.cpio")?.display().to_string();
    let initramfs = artifact("microvm-initramfs.cpio")?.display().to_string();
    // Release builds when there are (`cargo build --release --bins`): a
    // debug VMM spends much of its start in unoptimised setup code.
    let vmm = bench_binary("microvm-vmm")?.display().to_string();
    let microvm = bench_binary("microvm")?.display().to_string();
    println!("binaries: {vmm}, {microvm}");
    let bench_host = BenchHost::start()?;
    let host = &bench_host.host;

    println!("\n1. boot to the probe's marker, same kernel + initramfs, {runs} runs each:");
    println!(
        "{:<36} {:>22} {:>20}",
        "VMM", "wall min/med/max (s)", "guest boot med (ms)"
    );
    let (mut ours, mut ours_guest) = (Vec::new(), Vec::new());
    let (mut jailed_boot, mut jailed_guest) = (Vec::new(), Vec::new());
    // The VMM's own set-up, from its start until its first vCPU enters the
    // guest (its debug log's `startup:` lines): where the jail's cost is.
    let (mut setup, mut jailed_setup) = (Vec::new(), Vec::new());
    // The jail's root: an empty directory made once, outside the timing
    // (the tmpfs on it goes with the VMM's mount namespace).
    let jail_root = "/tmp/microvm-bench-jail";
    host.run(&["mkdir", "-p", jail_root], b"", TIMEOUT)?;
    for _ in 0..runs {
        // Alternating: without the jail (seccomp on), then jailed.
        for (jail, walls, guest, setups) in [
            (false, &mut ours, &mut ours_guest, &mut setup),
            (true, &mut jailed_boot, &mut jailed_guest, &mut jailed_setup),
        ] {
            let log = "MICROVM_LOG=microvm_vmm=debug,vmm::vm=debug";
            let args = format!(
                "{vmm} --kernel {kernel} --initrd {probe} --console stdout --cmdline quiet"
            );
            let command = if jail {
                format!("export {log}; exec {args} --jail {jail_root}")
            } else {
                format!("export {log}; exec {args}")
            };
            let out = host.run(&["sh", "-c", &command], b"", TIMEOUT)?;
            let text = out.stdout_text();
            let Some(line) = text.lines().find(|l| l.contains(MARKER)) else {
                bail!(
                    "microvm-vmm (jail {jail}) did not boot to the marker: {}",
                    out.stderr_text()
                );
            };
            walls.push(out.elapsed.as_secs_f64());
            guest.push(guest_ms(line));
            setups.push(first_guest_entry_ms(&out.stderr_text()).with_context(|| {
                format!(
                    "microvm-vmm (jail {jail}) logged no start-up steps: {}",
                    out.stderr_text()
                )
            })?);
        }
    }
    let mut qemu = Vec::new();
    let mut qemu_guest = Vec::new();
    for _ in 0..runs {
        let boot = boot_probe(host, kernel.as_ref(), probe.as_ref(), "", TIMEOUT)
            .context("QEMU baseline")?;
        qemu.push(boot.wall.as_secs_f64());
        qemu_guest.push(boot.guest_boot_ms as f64);
    }
    row("microvm-vmm (ours)", &mut ours, &mut ours_guest);
    row(
        "microvm-vmm --jail (ours)",
        &mut jailed_boot,
        &mut jailed_guest,
    );
    row("baseline: QEMU 7.2 -M microvm", &mut qemu, &mut qemu_guest);
    let (setup_min, setup_med, setup_max) = min_med_max(&mut setup);
    let (jailed_min, jailed_med, jailed_max) = min_med_max(&mut jailed_setup);
    println!(
        "VMM set-up until the first vCPU enters the guest, min/med/max (ms): \
         {setup_min:.0} / {setup_med:.0} / {setup_max:.0} without the jail, \
         {jailed_min:.0} / {jailed_med:.0} / {jailed_max:.0} jailed"
    );

    println!(
        "\n2. `microvm run -- true` end to end, {runs} runs each, the VMM jailed and \
         filtered (the default), jailed only, or neither, alternating:"
    );
    let (mut jailed, mut jail_only, mut unjailed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        for (jail, seccomp, walls) in [
            ("on", "on", &mut jailed),
            ("on", "off", &mut jail_only),
            ("off", "off", &mut unjailed),
        ] {
            let (jail_var, seccomp_var) = (
                format!("MICROVM_JAIL={jail}"),
                format!("MICROVM_SECCOMP={seccomp}"),
            );
            let argv = [
                "env",
                &jail_var,
                &seccomp_var,
                &microvm,
                "run",
                "--",
                "true",
            ];
            let out = host.run(&argv, b"", TIMEOUT)?;
            if out.status != ExitStatus::Code(0) {
                bail!(
                    "jail {jail}, seccomp {seccomp}: microvm run -- true failed: {}",
                    out.stderr_text()
                );
            }
            walls.push(out.elapsed.as_secs_f64());
        }
    }
    let (_, jailed_med, _) = min_med_max(&mut jailed);
    let (_, unjailed_med, _) = min_med_max(&mut unjailed);
    for (label, walls) in [
        ("microvm run -- true (jail on)", &mut jailed),
        ("  jail on, seccomp off", &mut jail_only),
        ("microvm run -- true (jail off)", &mut unjailed),
    ] {
        let (min, med, max) = min_med_max(walls);
        println!("{label:<36} {min:>6.2} {med:>6.2} {max:>6.2} s");
    }
    println!(
        "{:<36} {:+.1} %",
        "median jail on / off",
        (jailed_med / unjailed_med - 1.0) * 100.0
    );

    println!("\n3. resident memory of the VMM process, idle guest, 128 MiB guest RAM:");
    let idle = "rdinit=/bin/sleep -- 600";
    let ours_rss = idle_rss(
        host,
        &format!("{vmm} --kernel {kernel} --initrd {initramfs} --memory 128 --cmdline '{idle}'"),
    )?;
    // Jailed: the VMM proper and its supervisor, both counted.
    let jailed_rss = idle_rss(
        host,
        &format!(
            "jail=$(mktemp -d); {vmm} --jail $jail --kernel {kernel} --initrd {initramfs} \
             --memory 128 --cmdline '{idle}'"
        ),
    )?;
    let qemu_rss = idle_rss(
        host,
        &format!(
            "qemu-system-x86_64 -M microvm,acpi=off,pit=on,pic=on,rtc=off,isa-serial=on -accel kvm -cpu host \
             -smp 1 -m 128 -nodefaults -no-user-config -display none -serial null -kernel {kernel} \
             -initrd {initramfs} -append 'console=ttyS0 quiet {idle}'"
        ),
    )?;
    println!("{:<36} {:>8} KiB", "microvm-vmm (ours)", ours_rss);
    println!(
        "{:<36} {:>8} KiB",
        "microvm-vmm --jail (+ supervisor)", jailed_rss
    );
    println!(
        "{:<36} {:>8} KiB",
        "baseline: QEMU 7.2 -M microvm", qemu_rss
    );
    Ok(())
}

/// The VMM's `startup: vcpu0 enters the guest at X ms` (debug log).
fn first_guest_entry_ms(log: &str) -> Option<f64> {
    log.lines()
        .find_map(|line| line.split("startup: vcpu0 enters the guest at ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn guest_ms(line: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("guest_boot_ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(f64::NAN)
}

fn row(name: &str, walls: &mut [f64], guest: &mut [f64]) {
    let (min, med, max) = min_med_max(walls);
    let (_, guest_med, _) = min_med_max(guest);
    println!("{name:<36} {min:>6.2} {med:>6.2} {max:>6.2}  {guest_med:>19.0}");
}

/// Starts `command` in the background, lets its guest settle, reads the
/// VmRSS of it and its children (a jailed VMM's supervisor and the VMM
/// proper), and kills it.
fn idle_rss(host: &VmHost, command: &str) -> Result<u64> {
    let script = format!(
        "{command} >/dev/null 2>&1 & pid=$!; sleep 8; \
         for p in $pid $(cat /proc/$pid/task/$pid/children); do grep VmRSS /proc/$p/status; done; \
         kill -9 $pid; wait $pid 2>/dev/null; true"
    );
    let out = host.run(&["sh", "-c", &script], b"", TIMEOUT)?;
    let text = out.stdout_text();
    let kib: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    if kib.is_empty() {
        bail!("no VmRSS for `{command}`: {text} {}", out.stderr_text());
    }
    Ok(kib.iter().sum())
}
