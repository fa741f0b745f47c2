//! `testhost`: boot and use the KVM test host by hand or from scripts.
//!
//! ```text
//! testhost start [--dir D] [--memory MIB] [--cpus N] [--exit-with-pid PID]
//! testhost run   [--dir D] [--timeout SECS] [-i] -- CMD [ARGS...]
//! testhost stop  [--dir D]
//! testhost with  [--memory MIB] [--cpus N] -- CMD [ARGS...]
//! testhost probe [--runs N]                (boot the guest kernel to its probe init)
//! testhost serve --dir D [...]            (what `start` runs in the background)
//! ```
//!
//! `with` boots a test host, runs CMD on *this* machine with
//! `MICROVM_TESTHOST_DIR` pointing at it (so a whole `cargo test` run shares
//! one boot), then powers it off. The state directory defaults to
//! `$MICROVM_TESTHOST_DIR` or `/tmp/microvm-testhost`.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use microvm_tests::client::{self, Input};
use microvm_tests::testhost::{self, Config, Supervisor, READY_FILE};
use microvm_tests::wire::Kind;
use microvm_tests::{probe, Kvm, VmHost};

const USAGE: &str = "usage:
  testhost start [--dir D] [--memory MIB] [--cpus N] [--exit-with-pid PID]
  testhost run   [--dir D] [--timeout SECS] [-i] -- CMD [ARGS...]
  testhost stop  [--dir D]
  testhost with  [--memory MIB] [--cpus N] -- CMD [ARGS...]
  testhost probe [--runs N]
  testhost serve --dir D [--memory MIB] [--cpus N] [--exit-with-pid PID]";

#[derive(Default)]
struct Options {
    dir: Option<PathBuf>,
    memory_mib: Option<u32>,
    cpus: Option<u32>,
    exit_with_pid: Option<i32>,
    timeout: Option<Duration>,
    interactive: bool,
    runs: Option<usize>,
    command: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || {
            iter.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--dir" => options.dir = Some(PathBuf::from(value()?)),
            "--memory" => options.memory_mib = Some(value()?.parse().context("--memory")?),
            "--cpus" => options.cpus = Some(value()?.parse().context("--cpus")?),
            "--exit-with-pid" => {
                options.exit_with_pid = Some(value()?.parse().context("--exit-with-pid")?)
            }
            "--timeout" => {
                options.timeout = Some(Duration::from_secs(value()?.parse().context("--timeout")?))
            }
            "-i" => options.interactive = true,
            "--runs" => options.runs = Some(value()?.parse().context("--runs")?),
            "--" => {
                options.command = iter.cloned().collect();
                break;
            }
            other if !other.starts_with('-') => {
                options.command = std::iter::once(other.to_string())
                    .chain(iter.cloned())
                    .collect();
                break;
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    Ok(options)
}

fn state_dir(options: &Options) -> PathBuf {
    options
        .dir
        .clone()
        .or_else(|| std::env::var_os("MICROVM_TESTHOST_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp/microvm-testhost"))
}

fn config(options: &Options) -> Result<Config> {
    let init = std::env::var_os("MICROVM_TESTHOST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| microvm_tests::build_dir().join("testhost-init"));
    let mut config = Config::new(init);
    if let Some(memory) = options.memory_mib {
        config.memory_mib = memory;
    }
    if let Some(cpus) = options.cpus {
        config.cpus = cpus;
    }
    Ok(config)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICROVM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some(verb @ ("start" | "run" | "stop" | "with" | "probe" | "serve")) => parse(&args[1..])
            .and_then(|options| match verb {
                "start" => start(&options),
                "run" => run(&options),
                "stop" => stop(&options),
                "with" => with(&options),
                "probe" => probe(&options),
                _ => serve(&options),
            }),
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("testhost: {}", protocols::error_chain(&*e));
            ExitCode::from(1)
        }
    }
}

/// Boots in the foreground and serves until stopped.
fn serve(options: &Options) -> Result<u8> {
    let dir = options.dir.clone().context("serve needs --dir")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let supervisor = Supervisor::boot(&config(options)?, &dir)?;
    tracing::info!(
        "test host {} ready in {:.1} s",
        supervisor.kernel_release,
        supervisor.boot_time.as_secs_f64()
    );
    if let Some(pid) = options.exit_with_pid {
        let stop = stop.clone();
        std::thread::spawn(move || loop {
            // kill(pid, 0) fails with ESRCH once the process is gone.
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                tracing::info!("process {pid} is gone; stopping the test host");
                stop.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        });
    }
    let result = supervisor.serve(stop);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(0)
}

/// Starts `serve` in the background and waits until it is ready.
fn start(options: &Options) -> Result<u8> {
    let dir = state_dir(options);
    if dir.join(READY_FILE).exists() && testhost::connect(&dir).is_ok() {
        bail!(
            "a test host already runs in {} (`testhost stop` first)",
            dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("serve").arg("--dir").arg(&dir);
    if let Some(memory) = options.memory_mib {
        command.args(["--memory", &memory.to_string()]);
    }
    if let Some(cpus) = options.cpus {
        command.args(["--cpus", &cpus.to_string()]);
    }
    if let Some(pid) = options.exit_with_pid {
        command.args(["--exit-with-pid", &pid.to_string()]);
    }
    let started = Instant::now();
    let mut server = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting testhost serve")?;
    loop {
        if dir.join(READY_FILE).exists() {
            println!("{}", dir.display());
            eprintln!(
                "testhost: test host ready in {:.1} s (state in {})",
                started.elapsed().as_secs_f64(),
                dir.display()
            );
            return Ok(0);
        }
        if let Some(status) = server.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            bail!("the test host failed to boot ({status}):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(options: &Options) -> Result<u8> {
    let dir = state_dir(options);
    testhost::request_stop(&dir)
        .with_context(|| format!("no test host answers in {}", dir.display()))?;
    // The supervisor removes its directory when QEMU is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dir.exists() {
        if Instant::now() > deadline {
            bail!(
                "the test host in {} did not stop within 20 s",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(0)
}

fn run(options: &Options) -> Result<u8> {
    if options.command.is_empty() {
        bail!("run needs a command\n{USAGE}");
    }
    let dir = state_dir(options);
    let request = testhost::spawn_request_here(options.command.clone());
    let input = if options.interactive {
        Input::Reader(Box::new(std::io::stdin()))
    } else {
        Input::None
    };
    let outcome = match client::run(&dir, &request, input, options.timeout, |kind, bytes| {
        let _ = if kind == Kind::Stdout {
            std::io::stdout().write_all(bytes)
        } else {
            std::io::stderr().write_all(bytes)
        };
    }) {
        Ok(outcome) => outcome,
        // Like a shell: a command that cannot be run exits 127.
        Err(e @ client::RunError::SpawnFailed { .. }) => {
            eprintln!("testhost: {e}");
            return Ok(127);
        }
        Err(e) => return Err(e.into()),
    };
    if outcome.timed_out {
        eprintln!("testhost: {:?} timed out and was killed", options.command);
    }
    Ok(outcome.status.shell_code().clamp(0, 255) as u8)
}

/// A test host this process booted; powered off when dropped.
struct OwnTestHost {
    options: Options,
}

impl OwnTestHost {
    fn boot(options: &Options) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("microvm-testhost-{}", std::process::id()));
        let options = Options {
            dir: Some(dir),
            memory_mib: options.memory_mib,
            cpus: options.cpus,
            exit_with_pid: Some(std::process::id() as i32),
            ..Options::default()
        };
        start(&options)?;
        Ok(Self { options })
    }

    fn dir(&self) -> PathBuf {
        state_dir(&self.options)
    }
}

impl Drop for OwnTestHost {
    fn drop(&mut self) {
        if let Err(e) = stop(&self.options) {
            eprintln!("testhost: {}", protocols::error_chain(&*e));
        }
    }
}

/// Boots a test host, runs the command here with MICROVM_TESTHOST_DIR set,
/// and powers the test host off whatever happens.
fn with(options: &Options) -> Result<u8> {
    let (program, args) = options
        .command
        .split_first()
        .context("with needs a command")?;
    let test_host = OwnTestHost::boot(options)?;
    let failure = testhost::failure_file(&test_host.dir());
    let status = Command::new(program)
        .args(args)
        .env("MICROVM_TESTHOST_DIR", test_host.dir())
        .status()
        .with_context(|| format!("running {program}"))?;
    if let Ok(report) = std::fs::read_to_string(&failure) {
        eprintln!("testhost: the test host died during the run:\n{report}");
        let _ = std::fs::remove_file(&failure);
    }
    Ok(status.code().unwrap_or(1).clamp(0, 255) as u8)
}

/// Boots our guest kernel to the probe init under QEMU microvm `--runs`
/// times and prints how long each boot took.
fn probe(options: &Options) -> Result<u8> {
    let kernel = microvm_tests::artifact("vmlinux")?;
    let initrd = microvm_tests::artifact("probe-initramfs.cpio")?;
    let mut _own = None;
    let host = if let Some(dir) = std::env::var_os("MICROVM_TESTHOST_DIR") {
        VmHost::TestHost(PathBuf::from(dir))
    } else {
        match Kvm::detect() {
            Kvm::Hardware(module) => {
                eprintln!("testhost: /dev/kvm has {module}: booting directly");
                VmHost::Direct
            }
            kvm => {
                eprintln!("testhost: /dev/kvm here is {kvm:?}: booting inside the KVM test host");
                let own = _own.insert(OwnTestHost::boot(options)?);
                VmHost::TestHost(own.dir())
            }
        }
    };
    let runs = options.runs.unwrap_or(1).max(1);
    let mut walls = Vec::new();
    for run in 1..=runs {
        let boot = probe::boot_probe(&host, &kernel, &initrd, "", Duration::from_secs(120))?;
        println!(
            "probe boot {run}/{runs}: {} after {:.2} s wall (guest kernel to init: {} ms)",
            probe::MARKER,
            boot.wall.as_secs_f64(),
            boot.guest_boot_ms
        );
        walls.push(boot.wall);
    }
    walls.sort();
    println!(
        "probe boot over {runs} runs: min {:.2} s, median {:.2} s, max {:.2} s",
        walls[0].as_secs_f64(),
        walls[walls.len() / 2].as_secs_f64(),
        walls[walls.len() - 1].as_secs_f64()
    );
    Ok(0)
}
