//! `cargo bench -p microvm-tests --bench containers`
//!
//! Prints side by side, in one run, where VMs run (directly, or inside one
//! KVM test host):
//! 1. virtio-fs against the VM's host file system (the baseline), on the
//!    same directory: sequential write then read of a 1 GiB file (dd, 1 MiB
//!    blocks; page caches dropped before reading, in the guest and on the
//!    host), creating then stat'ing 10,000 small files, and opening and
//!    closing one file 2,000 times (in the guest, two FUSE round trips
//!    each: what one costs, apart from any file system work); beside them the
//!    same workload on a tmpfs inside the guest, which shows what running
//!    in the guest costs before any file sharing (under nested
//!    virtualisation, most of the gap);
//! 2. `microvm run --image busybox-oci -- true` end to end (image cached
//!    after the first run), beside `runc run` of the same rootfs.
//!
//! `MICROVM_BENCH_RUNS` sets the number of end-to-end runs (default 5),
//! `MICROVM_BENCH_FS_MIB` the file size (default 1024). Release binaries
//! are used when built (`cargo build --release --bins`).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use microvm_tests::bench::{min_med_max, runs, BenchHost};
use microvm_tests::{artifact, bench_binary};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(900);

/// The file system workload: prints `write S`, `read S`, `meta S` lines
/// (seconds, from /proc/uptime) for the directory it is given as $1.
/// Any failing step fails the run (a `rm -rf` that left names behind once
/// went unnoticed here).
const WORKLOAD: &str = r#"
set -e
d=$1; t() { cut -d' ' -f1 /proc/uptime; }
sync; a=$(t); dd if=/dev/zero of=$d/big bs=1M count=$2 conv=fsync 2>/dev/null; b=$(t); echo "write $a $b"
sync; echo 3 > /proc/sys/vm/drop_caches
a=$(t); dd if=$d/big of=/dev/null bs=1M 2>/dev/null; b=$(t); echo "read $a $b"
rm -f $d/big; echo x > $d/one
a=$(t); i=0; while [ $i -lt 2000 ]; do : < $d/one; i=$((i+1)); done; b=$(t); echo "open $a $b"
rm -f $d/one; mkdir -p $d/many; cd $d/many
a=$(t); seq 1 10000 | xargs touch; ls -l > /dev/null; b=$(t); echo "meta $a $b"
cd /; rm -rf $d/many
"#;

fn seconds(text: &str, what: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{what} ")))
        .with_context(|| format!("no {what} figure in: {text}"))?;
    let parts: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap_or(0.0))
        .collect();
    Ok((parts[1] - parts[0]).max(0.01))
}

fn main() -> Result<()> {
    let runs = runs(5);
    let microvm = bench_binary("microvm")?.display().to_string();
    println!("binaries: {microvm} (and the VMM next to it)");
    let file_mib: u64 = std::env::var("MICROVM_BENCH_FS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rootfs = artifact("busybox-rootfs")?.display().to_string();
    let image = artifact("busybox-oci")?.display().to_string();
    let bench_host = BenchHost::start()?;
    let host = &bench_host.host;

    // A privileged container (it drops the guest's page cache) whose rootfs
    // is the shared directory the workload runs in.
    let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default())?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!([
        "sh",
        "-c",
        format!(
            "sh /workload.sh /bench {file_mib} && echo '=== guest tmpfs' && \
             sh /workload.sh /scratch {file_mib}"
        )
    ]);
    spec["root"]["readonly"] = json!(false);
    spec["mounts"]
        .as_array_mut()
        .context("the default spec's mounts")?
        .push(json!({
            "destination": "/scratch",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", format!("size={}m", file_mib + 128)],
        }));
    // Room for the tmpfs file besides the page cache the workload uses.
    let guest_mib = 512 + file_mib;
    spec["linux"]["readonlyPaths"] = json!([]);
    let all_caps: Vec<String> = caps_all();
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = json!(all_caps);
    }
    let script = format!(
        "set -e; b=$(mktemp -d); mkdir $b/rootfs; cp -a {rootfs}/. $b/rootfs/; mkdir $b/rootfs/bench; \
         cat > $b/rootfs/workload.sh <<'WORKLOAD'\n{WORKLOAD}\nWORKLOAD\n\
         cat > $b/config.json <<'CONFIG'\n{config}\nCONFIG\n\
         echo '=== host'; sh $b/rootfs/workload.sh $b/rootfs/bench {file_mib}; \
         echo '=== guest'; MICROVM_AGENT_TIMEOUT=120 {microvm} run --memory {guest_mib} --bundle $b; \
         rm -rf $b",
        config = serde_json::to_string(&spec)?,
    );
    let out = host.run(&["sh", "-c", &script], b"", TIMEOUT)?;
    let text = out.stdout_text();
    let (Some(host_at), Some(guest_at), Some(tmpfs_at)) = (
        text.find("=== host"),
        text.find("=== guest\n"),
        text.find("=== guest tmpfs"),
    ) else {
        bail!("the workload did not run: {text} / {}", out.stderr_text());
    };
    let on_host = &text[host_at..guest_at];
    let (in_guest, guest_tmpfs) = (&text[guest_at..tmpfs_at], &text[tmpfs_at..]);
    println!("\n1. virtio-fs vs the VM's host file system (same directory, {file_mib} MiB file, 10,000 files),");
    println!("   and the same workload on a tmpfs in the guest (no file sharing):");
    println!(
        "{:<28} {:>14} {:>14} {:>8} {:>14}",
        "", "host", "virtio-fs", "ratio", "guest tmpfs"
    );
    for (what, label, amount, unit) in [
        ("write", "sequential write", file_mib as f64, "MiB/s"),
        ("read", "sequential read", file_mib as f64, "MiB/s"),
        ("meta", "create+stat 10k files", 10000.0, "files/s"),
        ("open", "open+close a file, 2k times", 2000.0, "opens/s"),
    ] {
        let host_rate = amount / seconds(on_host, what)?;
        let guest_rate = amount / seconds(in_guest, what)?;
        let tmpfs_rate = amount / seconds(guest_tmpfs, what)?;
        println!(
            "{:<28} {:>8.0} {:<5} {:>8.0} {:<5} {:>7.2}x {:>8.0} {:<5}",
            label,
            host_rate,
            unit,
            guest_rate,
            unit,
            guest_rate / host_rate,
            tmpfs_rate,
            unit
        );
    }

    println!("\n2. end to end, {runs} runs each (image cached after a first, unmeasured run):");
    let warm = host.run(
        &[
            "env",
            "MICROVM_AGENT_TIMEOUT=120",
            &microvm,
            "run",
            "--image",
            &image,
            "--",
            "true",
        ],
        b"",
        TIMEOUT,
    )?;
    if !warm.status.success() {
        bail!("microvm run --image failed: {}", warm.stderr_text());
    }
    let mut ours = Vec::new();
    for _ in 0..runs {
        let out = host.run(
            &[
                "env",
                "MICROVM_AGENT_TIMEOUT=120",
                &microvm,
                "run",
                "--image",
                &image,
                "--",
                "true",
            ],
            b"",
            TIMEOUT,
        )?;
        if !out.status.success() {
            bail!("microvm run --image failed: {}", out.stderr_text());
        }
        ours.push(out.elapsed.as_secs_f64());
    }
    let mut theirs = Vec::new();
    let mut true_spec = serde_json::to_value(oci_spec::runtime::Spec::default())?;
    true_spec["process"]["terminal"] = json!(false);
    true_spec["process"]["args"] = json!(["true"]);
    let runc_script = format!(
        "b=$(mktemp -d); mkdir $b/rootfs; cp -a {rootfs}/. $b/rootfs/; \
         cat > $b/config.json <<'CONFIG'\n{}\nCONFIG\n\
         for i in $(seq 1 {runs}); do a=$(cut -d' ' -f1 /proc/uptime); runc run -b $b bench-$i; \
         b2=$(cut -d' ' -f1 /proc/uptime); echo \"took $a $b2\"; done; rm -rf $b",
        serde_json::to_string(&true_spec)?
    );
    let out = host.run(&["sh", "-c", &runc_script], b"", TIMEOUT)?;
    for line in out.stdout_text().lines().filter(|l| l.starts_with("took ")) {
        theirs.push(seconds(line, "took")?);
    }
    println!("{:<44} {:>22}", "", "wall min/med/max (s)");
    let (a, b, c) = min_med_max(&mut ours);
    println!(
        "{:<44} {a:>6.2} / {b:.2} / {c:.2}",
        "microvm run --image busybox-oci -- true"
    );
    if theirs.is_empty() {
        println!(
            "{:<44} (runc did not run: {})",
            "runc run (same rootfs) true",
            out.stderr_text().trim()
        );
    } else {
        let (a, b, c) = min_med_max(&mut theirs);
        println!(
            "{:<44} {a:>6.2} / {b:.2} / {c:.2}",
            "runc run (same rootfs), baseline"
        );
    }
    Ok(())
}

/// Every capability name the OCI spec knows, for a privileged container.
fn caps_all() -> Vec<String> {
    [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
