//! `microvm`: run a command in a throwaway microVM.
//!
//! ```text
//! microvm run [--cpus N] [--memory MIB] [--kernel PATH] [--initrd PATH]
//!             [--console FILE|-] [--kernel-cmdline EXTRA] -- CMD [ARGS...]
//! ```
//! Starts a VM, runs CMD in it with this terminal's or pipe's stdin, streams
//! its output, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to it, and exits with
//! its exit code (128+N when signal N killed it, 127 when it could not be
//! run). The VM is gone when `microvm` returns, whichever way it ends.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use runtime::config::SandboxConfig;
use runtime::guest_command::{self, GuestCommand};
use runtime::sandbox::Sandbox;

const USAGE: &str = "usage: microvm run [--cpus N] [--memory MIB] [--kernel PATH] [--initrd PATH] \
[--console FILE|-] [--kernel-cmdline EXTRA] -- CMD [ARGS...]";

struct RunOptions {
    config: SandboxConfig,
    argv: Vec<String>,
}

fn parse_run(args: &[String]) -> Result<RunOptions> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cpus = None;
    let mut memory = None;
    let mut console = None;
    let mut extra_cmdline = String::new();
    let mut argv = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || {
            iter.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--cpus" => cpus = Some(value()?.parse().context("--cpus takes a number of vCPUs")?),
            "--memory" => memory = Some(value()?.parse().context("--memory takes MiB")?),
            "--console" => console = Some(PathBuf::from(value()?)),
            "--kernel-cmdline" => extra_cmdline = value()?.clone(),
            "--" => {
                argv = iter.cloned().collect();
                break;
            }
            other if !other.starts_with('-') => {
                argv = std::iter::once(other.to_string())
                    .chain(iter.cloned())
                    .collect();
                break;
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    if argv.is_empty() {
        bail!("no command given\n{USAGE}");
    }
    let mut config = SandboxConfig::with_defaults(kernel, initrd)?;
    if let Some(cpus) = cpus {
        config.cpus = cpus;
    }
    if let Some(memory) = memory {
        config.memory_mib = memory;
    }
    config.console = console.map(|path| {
        if path.as_os_str() == "-" {
            PathBuf::from("stdout")
        } else {
            path
        }
    });
    config.extra_cmdline = extra_cmdline;
    Ok(RunOptions { config, argv })
}

fn run(options: RunOptions) -> Result<u8> {
    let mut sandbox = Sandbox::start(&options.config)?;
    let stream = sandbox.connect_agent(options.config.agent_timeout)?;
    let command = GuestCommand {
        argv: options.argv,
        env: vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )],
        cwd: "/".into(),
    };
    let outcome = guest_command::run(stream, &command, &mut sandbox);
    let code = match outcome {
        Ok(guest_command::Outcome::Exited(status)) => status,
        Ok(guest_command::Outcome::CannotRun { code, message }) => {
            eprintln!("microvm: {message}");
            code
        }
        Err(e) => {
            // The VM's death explains a broken agent connection best.
            match sandbox.death_within(std::time::Duration::from_secs(2)) {
                Some(death) => bail!("{death}"),
                None => return Err(e),
            }
        }
    };
    sandbox.stop(std::time::Duration::from_secs(5));
    Ok(code)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICROVM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => parse_run(&args[1..]).and_then(run),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(0)
        }
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("microvm: {e:#}");
            ExitCode::from(1)
        }
    }
}
