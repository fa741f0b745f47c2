//! `microvm-vmm`: runs one microVM until the guest stops.
//!
//! Its command line is `protocols::vmm::VmmArgs` (the runtime encodes it):
//! `protocols::vmm::USAGE`.
//!
//! `--jail EMPTYDIR`: confine the VMM (see `vmm::jail`): PID, mount,
//! network, IPC and UTS namespaces of its own, its root a tmpfs mounted on
//! EMPTYDIR in its own namespace, only the shares' capabilities. `--seccomp`
//! (default on): each thread's system call allow-list; `log` logs instead
//! of killing (for measuring the lists), `off` is for debugging only.
//! `--net fd=N`: an inherited tap fd opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR
//! (the VMM owns it from then on); `--net tap=NAME`: the VMM opens (creates if
//! needed) tap NAME in its own network namespace. `mtu` (68 to 65535, default
//! 1500) is the largest MTU the guest may use. One NIC per `--net`, eth0 first.
//! Exits 0 when the guest resets or powers off, 1 on any error (printed on
//! stderr as one line naming what was wrong).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use protocols::vmm::{self as vmm_args, VmmArgs};
use vmm::jail::{self, seccomp};
use vmm::logger::{Capped, MAX_LOG_BYTES};
use vmm::vcpu::VmExit;
use vmm::vm::Vm;
use vmm::{Console, FsConfig, VmConfig, VsockConfig};

/// The confinement asked for on the command line.
struct Confinement {
    jail: Option<PathBuf>,
    seccomp: seccomp::Mode,
}

fn parse(args: Vec<OsString>) -> Result<(VmConfig, Confinement)> {
    let args = VmmArgs::parse(args)?;
    for share in &args.fs {
        if !share.dir.is_dir() {
            bail!(
                "--fs {}={}: shared directory {} does not exist or is not a directory",
                share.tag,
                share.dir.display(),
                share.dir.display()
            );
        }
    }
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        extra_cmdline: args.cmdline,
        console: match args.console {
            vmm_args::Console::Off => Console::Off,
            vmm_args::Console::Stdout => Console::Stdout,
            vmm_args::Console::File(path) => Console::File(path),
        },
        vsock: args.vsock.map(|vsock| VsockConfig {
            guest_cid: vsock.guest_cid,
            uds_path: vsock.uds,
            host_ports_path: None,
        }),
        fs: args
            .fs
            .into_iter()
            .map(|share| FsConfig {
                tag: share.tag,
                dir: share.dir,
            })
            .collect(),
        net: args.net,
    };
    let confinement = Confinement {
        jail: args.jail,
        seccomp: args.seccomp,
    };
    Ok((config, confinement))
}

/// Parses, confines (as far as can be done before the VM is built), builds.
fn build(args: Vec<OsString>) -> Result<Vm> {
    let step = |what: &str| tracing::debug!("startup: {what} at {:.1} ms", vmm::startup_ms());
    let (mut config, confinement) = parse(args)?;
    if confinement.jail.is_some() {
        if let Some(nic) = config
            .net
            .iter()
            .find(|nic| !matches!(nic.tap, vmm::TapSource::Fd(_)))
        {
            bail!(
                "--net {nic:?}: a jailed VMM has no network of its own to open a tap in: \
                 pass an open tap (--net fd=N,...)"
            );
        }
    }
    if confinement.seccomp == seccomp::Mode::Off {
        eprintln!(
            "microvm-vmm: warning: seccomp is off: the VMM's threads may make any system call"
        );
    }
    // Every list compiled once, before the split: the supervisor inherits
    // its own.
    seccomp::prepare(confinement.seccomp)?;
    step("seccomp filters compiled");
    if confinement.jail.is_some() {
        jail::split_pid_namespace()?;
        step("PID namespace split");
    }
    let jail = match &confinement.jail {
        Some(root) => Some(jail::Jail::prepare(
            root,
            &mut config.fs,
            config.vsock.as_mut(),
        )?),
        None => None,
    };
    step("jail prepared");
    let vm = Vm::build(&config)?;
    step("VM built");
    if let Some(jail) = jail {
        jail.enter()?;
        step("jail entered");
    }
    Ok(vm)
}

/// The cap on what the VMM logs: `MICROVM_LOG_MAX_BYTES`, or
/// [`MAX_LOG_BYTES`].
fn log_cap() -> u64 {
    std::env::var("MICROVM_LOG_MAX_BYTES")
        .ok()
        .and_then(|bytes| bytes.parse().ok())
        .unwrap_or(MAX_LOG_BYTES)
}

/// How many guest-triggered lines the rate limit kept out of the log, per
/// call site: one line, past the log's cap (its length is bounded by the
/// number of call sites).
fn report_suppressed_lines() {
    let report = vmm::logger::report_suppressed();
    if !report.is_empty() {
        eprintln!("microvm-vmm: {report}");
    }
}

fn main() -> ExitCode {
    vmm::startup_ms();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICROVM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        // The guest can make the VMM log (rate-limited per call site): the
        // log, a file on the host, is capped too.
        .with_writer(std::sync::Mutex::new(Capped::new(
            std::io::stderr(),
            log_cap(),
            "vmm.log",
        )))
        .init();
    let vm = match build(std::env::args_os().skip(1).collect()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("microvm-vmm: {}", protocols::error_chain(&*e));
            return ExitCode::from(1);
        }
    };
    match vm.run() {
        VmExit::GuestStopped(how) => {
            report_suppressed_lines();
            // One line for whoever supervises us (the runtime keeps it in the VM's log).
            eprintln!("microvm-vmm: guest stopped: {how}");
            // vCPU threads may still be blocked in KVM_RUN: leave now.
            std::process::exit(0)
        }
        VmExit::Failed(reason) => {
            report_suppressed_lines();
            eprintln!("microvm-vmm: the VM failed: {reason}");
            std::process::exit(1)
        }
    }
}
