//! Shared by the benchmarks: a place where VMs run (this machine, or one
//! test host booted for the whole benchmark) and small statistics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::containerd::{Containerd, Options, AGENT_TIMEOUT_SECS, KATA_SHIM};
use crate::testhost::{Config, Supervisor, TestHostError, READY_FILE};
use crate::{bench_binary, build_dir, Kvm, VmHost};

/// The thread serving a test host's commands, and how to stop it.
type Serving = (Arc<AtomicBool>, JoinHandle<Result<(), TestHostError>>);

/// Where a benchmark's VMs run; a test host it booted is stopped on drop.
pub struct BenchHost {
    pub host: VmHost,
    serving: Option<Serving>,
}

impl BenchHost {
    /// Runs directly on VMX/SVM hosts; otherwise boots a test host and
    /// prints how long that took.
    pub fn start() -> Result<BenchHost> {
        match Kvm::detect() {
            Kvm::Hardware(module) => {
                println!("test host: not needed ({module})");
                Ok(BenchHost {
                    host: VmHost::Direct,
                    serving: None,
                })
            }
            kvm => {
                let dir =
                    std::env::temp_dir().join(format!("microvm-bench-{}", std::process::id()));
                let config = Config::new(build_dir().join("testhost-init"));
                let supervisor = Supervisor::boot(&config, &dir)?;
                println!(
                    "test host boot ({kvm:?} here): {:.2} s to commands (Debian {} under QEMU/TCG, -cpu {})",
                    supervisor.boot_time.as_secs_f64(),
                    supervisor.kernel_release,
                    crate::testhost::TEST_HOST_CPU
                );
                let stop = Arc::new(AtomicBool::new(false));
                let serving = {
                    let stop = stop.clone();
                    std::thread::spawn(move || supervisor.serve(stop))
                };
                while !dir.join(READY_FILE).exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(BenchHost {
                    host: VmHost::TestHost(dir),
                    serving: Some((stop, serving)),
                })
            }
        }
    }
}

impl Drop for BenchHost {
    fn drop(&mut self) {
        if let Some((stop, serving)) = self.serving.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = serving.join();
        }
        if let VmHost::TestHost(dir) = &self.host {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// (min, median, max) of some samples.
pub fn min_med_max(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    match samples {
        [] => (f64::NAN, f64::NAN, f64::NAN),
        s => (s[0], s[s.len() / 2], s[s.len() - 1]),
    }
}

/// How many runs a benchmark makes: `MICROVM_BENCH_RUNS`, default `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("MICROVM_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Options for a benchmark's containerd whose kata runtime is our shim from
/// `MICROVM_BENCH_SHIM_DIR` when set, else the release build if there is
/// one, else the debug build; with the shim found (`None`: not built, the
/// kata column is left empty). Prints which shim it is, and warns when a
/// release shim is older than the debug one.
pub fn kata_bench_options(cri: &str) -> Result<(Options, Option<PathBuf>)> {
    let shim: Option<PathBuf> = match std::env::var_os("MICROVM_BENCH_SHIM_DIR") {
        Some(dir) => Some(Path::new(&dir).join(KATA_SHIM)).filter(|p| p.is_file()),
        None => bench_binary(KATA_SHIM).ok(),
    };
    if let Some(warning) = shim.as_deref().and_then(stale_release) {
        println!("WARNING: {warning}");
    }
    let mut options = Options::new(cri);
    options
        .env
        .push(("MICROVM_AGENT_TIMEOUT".into(), AGENT_TIMEOUT_SECS.into()));
    match &shim {
        Some(path) => {
            println!("shim: {}", path.display());
            options.shim_dir = path.parent().context("the shim's directory")?.into();
        }
        None => println!("shim: {KATA_SHIM} not built"),
    }
    Ok((options, shim))
}

/// The end of a containerd benchmark: says so when the kata shim was not
/// built, prints the errors met on the way, stops containerd and prints what
/// its teardown warned about.
pub fn finish(cd: &mut Containerd, shim: Option<&Path>, errors: &[String]) -> Result<()> {
    if shim.is_none() {
        println!("\nkata: not built ({KATA_SHIM} is in neither target/release nor target/debug)");
    }
    for error in errors {
        println!("\n{error}");
    }
    let warnings = cd.stop()?;
    if !warnings.is_empty() {
        println!("\nteardown: {}", warnings.join("; "));
    }
    Ok(())
}

/// Whether `shim` is a release build older than the debug build (the VMM
/// next to it, which the shim runs, likely is too).
fn stale_release(shim: &Path) -> Option<String> {
    let dir = shim.parent()?;
    if dir.file_name()? != "release" {
        return None;
    }
    let debug = dir.parent()?.join("debug").join(KATA_SHIM);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(shim)? < modified(&debug)?).then(|| {
        format!(
            "{} is older than {}: the kata column measures an older build \
             (cargo build --release --bins, or MICROVM_BENCH_SHIM_DIR=target/debug)",
            shim.display(),
            debug.display()
        )
    })
}
