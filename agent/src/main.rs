//! `microvm-agent`: the guest's PID 1.
//!
//! ```text
//! microvm-agent [--listen ADDR]
//! ```
//! ADDR is `vsock://-1:1024` by default; `unix:///path` serves on a Unix
//! socket instead (host tests, where the agent is not PID 1 and mounts
//! nothing). As PID 1 it never exits: a fatal error is logged on the console
//! and the VM is reset, which ends its VMM.

use std::sync::Arc;

use agent::{init, process::ProcessTable, reaper, service::Agent};
use anyhow::{bail, Context, Result};

/// As PID 1 the kernel hands us every command-line word it did not know;
/// those are ignored rather than fatal.
fn listen_address(args: &[String], is_init: bool) -> Result<String> {
    let mut address = format!("vsock://-1:{}", protocols::AGENT_VSOCK_PORT);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--listen" => address = iter.next().context("--listen needs an address")?.clone(),
            other if is_init => tracing::debug!("ignoring kernel argument {other:?}"),
            other => bail!("unknown argument {other:?}; usage: microvm-agent [--listen ADDR]"),
        }
    }
    Ok(address)
}

fn serve(address: &str, is_init: bool) -> Result<()> {
    reaper::block_sigchld().context("blocking SIGCHLD")?;
    if !is_init {
        // Container processes outlive their setup parents: be their reaper
        // (as PID 1 we are anyway).
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    }
    if is_init {
        init::setup().context("setting up the guest")?;
    }
    let processes = Arc::new(ProcessTable::default());
    reaper::start(processes.clone()).context("starting the reaper")?;
    if let Some(path) = address.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
    }
    let service =
        protocols::agent_ttrpc::create_agent_service(Arc::new(Agent::new(processes, is_init)));
    // Reads, writes and waits block: give every outstanding call a thread.
    let mut server = ttrpc::Server::new()
        .bind(address)
        .with_context(|| format!("listening on {address}"))?
        .register_service(service)
        .set_thread_count_min(4)
        .set_thread_count_default(8)
        .set_thread_count_max(256);
    server
        .start()
        .with_context(|| format!("serving on {address}"))?;
    tracing::info!("serving the agent API on {address}");
    loop {
        std::thread::park();
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(agent::container::SETUP_ARG) {
        agent::container::child::main();
    }
    let is_init = std::process::id() == 1;
    if is_init {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICROVM_AGENT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = listen_address(&args, is_init).and_then(|address| serve(&address, is_init));
    if let Err(e) = result {
        eprintln!("microvm-agent: {}", protocols::error_chain(&*e));
        if is_init {
            init::reset_vm();
        }
        std::process::exit(1);
    }
}
