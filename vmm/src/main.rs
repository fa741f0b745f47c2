//! `microvm-vmm`: runs one microVM until the guest stops.
//!
//! ```text
//! microvm-vmm --kernel VMLINUX [--initrd FILE] [--cpus N] [--memory MIB]
//!             [--cmdline EXTRA] [--console off|stdout|FILE]
//!             [--vsock-uds PATH [--guest-cid CID]] [--fs TAG=HOSTDIR]...
//!             [--net fd=N|tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=M]]...
//!             [--jail EMPTYDIR] [--seccomp on|off|log]
//! ```
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

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use vmm::jail::{self, seccomp};
use vmm::logger::{Capped, MAX_LOG_BYTES};
use vmm::vcpu::VmExit;
use vmm::vm::Vm;
use vmm::{Console, NetConfig, VmConfig, VsockConfig};

const USAGE: &str =
    "usage: microvm-vmm --kernel VMLINUX [--initrd FILE] [--cpus N] [--memory MIB] \
[--cmdline EXTRA] [--console off|stdout|FILE] [--vsock-uds PATH [--guest-cid CID]] \
[--fs TAG=HOSTDIR]... [--net fd=N|tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=M]]... \
[--jail EMPTYDIR] [--seccomp on|off|log]";

/// The confinement asked for on the command line.
struct Confinement {
    jail: Option<PathBuf>,
    seccomp: seccomp::Mode,
}

fn parse(args: &[String]) -> Result<(VmConfig, Confinement)> {
    let mut kernel = None;
    let mut config = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cpus: 1,
        memory_mib: 128,
        extra_cmdline: String::new(),
        console: Console::Off,
        vsock: None,
        fs: Vec::new(),
        net: Vec::new(),
    };
    let mut vsock_path = None;
    let mut confinement = Confinement {
        jail: None,
        seccomp: seccomp::Mode::Kill,
    };
    let mut guest_cid = 3;
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || {
            iter.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => config.initrd = Some(PathBuf::from(value()?)),
            "--cpus" => {
                let text = value()?;
                config.cpus = text
                    .parse()
                    .with_context(|| format!("--cpus {text}: give a number"))?;
            }
            "--memory" => {
                let text = value()?;
                config.memory_mib = text
                    .parse()
                    .with_context(|| format!("--memory {text}: give MiB"))?;
            }
            "--cmdline" => config.extra_cmdline = value()?.clone(),
            "--console" => {
                config.console = match value()?.as_str() {
                    "off" => Console::Off,
                    "stdout" | "-" => Console::Stdout,
                    path => Console::File(PathBuf::from(path)),
                }
            }
            "--vsock-uds" => vsock_path = Some(PathBuf::from(value()?)),
            "--fs" => {
                let value = value()?;
                let (tag, dir) = value
                    .split_once('=')
                    .with_context(|| format!("--fs {value}: give TAG=HOSTDIR"))?;
                if !std::path::Path::new(dir).is_dir() {
                    bail!(
                        "--fs {value}: shared directory {dir} does not exist or is not a directory"
                    );
                }
                config.fs.push(vmm::FsConfig {
                    tag: tag.to_string(),
                    dir: PathBuf::from(dir),
                });
            }
            "--net" => {
                let value = value()?;
                let nic = value
                    .parse::<NetConfig>()
                    .with_context(|| format!("--net {value}"))?;
                config.net.push(nic);
            }
            "--guest-cid" => {
                let text = value()?;
                guest_cid = text
                    .parse()
                    .with_context(|| format!("--guest-cid {text}: give a number"))?;
            }
            "--jail" => confinement.jail = Some(PathBuf::from(value()?)),
            "--seccomp" => {
                confinement.seccomp = value()?.parse().map_err(anyhow::Error::msg)?;
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    config.kernel = kernel.with_context(|| format!("--kernel is required\n{USAGE}"))?;
    config.vsock = vsock_path.map(|uds_path| VsockConfig {
        guest_cid,
        uds_path,
        host_ports_path: None,
    });
    Ok((config, confinement))
}

/// Parses, confines (as far as can be done before the VM is built), builds.
fn build(args: &[String]) -> Result<Vm> {
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
        jail::split_pid_namespace(confinement.seccomp)?;
    }
    if confinement.seccomp == seccomp::Mode::Off {
        eprintln!(
            "microvm-vmm: warning: seccomp is off: the VMM's threads may make any system call"
        );
    }
    seccomp::prepare(confinement.seccomp)?;
    let jail = match &confinement.jail {
        Some(root) => Some(jail::Jail::prepare(
            root,
            &mut config.fs,
            config.vsock.as_mut(),
        )?),
        None => None,
    };
    let vm = Vm::build(&config)?;
    if let Some(jail) = jail {
        jail.enter()?;
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let vm = match build(&args) {
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
