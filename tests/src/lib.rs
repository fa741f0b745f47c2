//! Integration-test support for microvm: where to run VM tests, and the KVM
//! test host that gives machines without VMX/SVM (such as PVM hosts) a real
//! `/dev/kvm`.
//!
//! Tests call [`vm_host`] and run their commands through it. On a host with
//! hardware virtualization commands run directly; otherwise inside a test
//! host: the one named by `MICROVM_TESTHOST_DIR` (booted once per test run by
//! `testhost with -- cargo test`), or else one booted for this test process.

pub mod bench;
pub mod client;
pub mod containerd;
pub mod probe;
pub mod testhost;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use wire::ExitStatus;

/// What `/dev/kvm` is on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    /// VMX or SVM: guests run directly.
    Hardware(String),
    /// PVM (`kvm_pvm`): only PVM-enlightened guests run.
    Pvm,
    Missing(String),
}

impl Kvm {
    /// Inspects `/dev/kvm` and the loaded KVM modules under `sys_module`
    /// (normally `/sys/module`).
    pub fn detect_at(dev_kvm: &Path, sys_module: &Path) -> Kvm {
        if !dev_kvm.exists() {
            return Kvm::Missing(format!("{} does not exist", dev_kvm.display()));
        }
        if sys_module.join("kvm_pvm").exists() {
            return Kvm::Pvm;
        }
        for module in ["kvm_intel", "kvm_amd"] {
            if sys_module.join(module).exists() {
                return Kvm::Hardware(module.to_string());
            }
        }
        Kvm::Missing(format!(
            "{} exists but neither kvm_intel nor kvm_amd is loaded",
            dev_kvm.display()
        ))
    }

    pub fn detect() -> Kvm {
        Kvm::detect_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
    }
}

/// The workspace's `build/` directory, where `scripts/build.sh` puts the guest
/// kernel, initramfs images and static binaries (`MICROVM_BUILD_DIR`
/// overrides it).
pub fn build_dir() -> PathBuf {
    std::env::var_os("MICROVM_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build"))
}

/// A build artifact that must exist, or an error saying how to make it.
pub fn artifact(name: &str) -> Result<PathBuf> {
    let path = build_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/build.sh (the README's set-up does)",
            path.display()
        );
    }
    Ok(path)
}

/// The workspace's cargo target directory (`target/`, or `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A binary of this workspace (`target/debug/NAME`, or under
/// `CARGO_TARGET_DIR`), built by `cargo build --workspace --bins`.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the workspace first (cargo build --workspace --bins; scripts/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// A workspace binary for benchmarks: the release build when there is one
/// (`cargo build --release --bins`), else the debug build. Benchmarks print
/// which they used.
pub fn bench_binary(name: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let release = target.join("release").join(name);
    if release.is_file() {
        return Ok(release);
    }
    workspace_binary(name)
}

/// What a command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Where VM tests run their commands.
#[derive(Debug)]
pub enum VmHost {
    /// This machine has VMX/SVM.
    Direct,
    /// Inside the test host whose state directory this is.
    TestHost(PathBuf),
}

static VM_HOST: OnceLock<Result<VmHost, String>> = OnceLock::new();

/// The place to run VM tests, decided (and, if needed, booted) once per
/// process. `testhost_binary` is `env!("CARGO_BIN_EXE_testhost")`.
///
/// Panics with the reason when there is none: a VM test must fail, not pass,
/// when it cannot run.
pub fn vm_host(testhost_binary: &str) -> &'static VmHost {
    let host = VM_HOST
        .get_or_init(|| choose_vm_host(Path::new(testhost_binary)).map_err(|e| format!("{e:#}")));
    match host {
        Ok(host) => host,
        Err(reason) => panic!("VM tests cannot run here: {reason}"),
    }
}

fn choose_vm_host(testhost_binary: &Path) -> Result<VmHost> {
    if let Some(dir) = std::env::var_os("MICROVM_TESTHOST_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.join(testhost::READY_FILE).exists() {
            bail!(
                "MICROVM_TESTHOST_DIR={} names no running test host",
                dir.display()
            );
        }
        return Ok(VmHost::TestHost(dir));
    }
    match Kvm::detect() {
        Kvm::Hardware(_) => Ok(VmHost::Direct),
        kvm => {
            eprintln!("microvm tests: /dev/kvm here is {kvm:?}; booting a KVM test host for this test process");
            let dir = std::env::temp_dir().join(format!("microvm-testhost-{}", std::process::id()));
            let status = Command::new(testhost_binary)
                .arg("start")
                .arg("--dir")
                .arg(&dir)
                .arg("--exit-with-pid")
                .arg(std::process::id().to_string())
                .stdout(Stdio::null())
                .status()
                .with_context(|| format!("running {}", testhost_binary.display()))?;
            if !status.success() {
                bail!("booting the test host failed ({status}); see the messages above");
            }
            Ok(VmHost::TestHost(dir))
        }
    }
}

impl VmHost {
    /// Runs `argv` (with this process's environment and working directory)
    /// where VMs can run, feeding it `stdin`, killing it after `timeout`.
    pub fn run(&self, argv: &[&str], stdin: &[u8], timeout: Duration) -> Result<Output> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let started = Instant::now();
        match self {
            VmHost::Direct => run_direct(&argv, stdin, timeout),
            VmHost::TestHost(dir) => {
                let request = testhost::spawn_request_here(argv);
                let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
                let input = if stdin.is_empty() {
                    client::Input::None
                } else {
                    client::Input::Bytes(stdin.to_vec())
                };
                let outcome = client::run(dir, &request, input, Some(timeout), |kind, bytes| {
                    if kind == wire::Kind::Stdout {
                        stdout.extend_from_slice(bytes)
                    } else {
                        stderr.extend_from_slice(bytes)
                    }
                })?;
                Ok(Output {
                    status: outcome.status,
                    stdout,
                    stderr,
                    timed_out: outcome.timed_out,
                    elapsed: started.elapsed(),
                })
            }
        }
    }
}

fn run_direct(argv: &[String], stdin: &[u8], timeout: Duration) -> Result<Output> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let (program, args) = argv.split_first().context("empty command line")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut child_stdin = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || child_stdin.write_all(&input));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Ok(Output {
        status: status.into(),
        stdout: stdout_reader.join().unwrap_or_default(),
        stderr: stderr_reader.join().unwrap_or_default(),
        timed_out,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_hardware_and_missing_kvm() {
        let root = std::env::temp_dir().join(format!("kvm-detect-{}", std::process::id()));
        let dev = root.join("kvm");
        let modules = root.join("module");
        std::fs::create_dir_all(&modules).unwrap();
        assert!(matches!(Kvm::detect_at(&dev, &modules), Kvm::Missing(_)));
        std::fs::write(&dev, b"").unwrap();
        assert!(
            matches!(Kvm::detect_at(&dev, &modules), Kvm::Missing(m) if m.contains("kvm_intel"))
        );
        std::fs::create_dir_all(modules.join("kvm_amd")).unwrap();
        assert_eq!(
            Kvm::detect_at(&dev, &modules),
            Kvm::Hardware("kvm_amd".into())
        );
        std::fs::create_dir_all(modules.join("kvm_pvm")).unwrap();
        assert_eq!(Kvm::detect_at(&dev, &modules), Kvm::Pvm);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
