//! `cargo bench -p microvm-tests --bench pod_network`
//!
//! Pod networking, host → pod, through a private containerd (Debian's 1.6)
//! with CNI (bridge + host-local, see `containerd::conflist`) where VMs run
//! (directly, or inside one KVM test host). One runc pod, the baseline, and
//! one kata pod (our shim, release if built, else debug) on the same bridge
//! each run `netbench serve` (`build/netbench`, static, bind-mounted into a
//! busybox container); the client runs in containerd's network namespace
//! (the pods' node) and connects to the pod IP:
//! 1. TCP throughput, client → pod: 5 s of writes, MB/s (10^6 bytes) counted
//!    by the server; median of 3 runs (and min / max);
//! 2. one-byte TCP round trips (`TCP_NODELAY`): p50 and p99 of 1000, after
//!    100 unmeasured ones.
//!
//! Target (issue "Pod networking"): kata throughput ≥ 0.5 × runc.
//! `MICROVM_BENCH_RUNS` overrides the 3 throughput runs;
//! `MICROVM_BENCH_SHIM_DIR` the directory of the shim (and so of the VMM
//! it runs, found next to it).
//! Run it on release builds: a debug VMM's data path is far slower.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use microvm_tests::artifact;
use microvm_tests::bench::{finish, kata_bench_options, min_med_max, runs, BenchHost};
use microvm_tests::containerd::{Containerd, KATA_HANDLER, RUNC_HANDLER};

/// The servers' port.
const PORT: u16 = 5201;
/// Seconds of one throughput run.
const THROUGHPUT_SECS: u32 = 5;
/// Measured round trips, and unmeasured ones before.
const ROUND_TRIPS: u32 = 1000;
const WARMUP: u32 = 100;
/// How long a server may take to answer once its container runs.
const READY_SECS: u32 = 120;
/// One client command may take this long (TCG is slow).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// One column: a runtime as CRI's handler.
struct Runtime {
    label: &'static str,
    handler: &'static str,
}

/// What one runtime measured (or why it could not).
struct Column {
    /// MB/s per run.
    throughput: Result<Vec<f64>>,
    /// Round-trip (p50, p99) in µs.
    latency: Result<(f64, f64)>,
}

fn main() -> Result<()> {
    let runs = runs(3);
    let runtimes = [
        Runtime {
            label: "runc",
            handler: RUNC_HANDLER,
        },
        Runtime {
            label: "kata (ours)",
            handler: KATA_HANDLER,
        },
    ];
    let netbench = artifact("netbench").context("the static netbench (scripts/build.sh)")?;
    let (mut options, shim) = kata_bench_options(env!("CARGO_BIN_EXE_cri"))?;
    options.network = true;
    let bench_host = BenchHost::start()?;
    let mut cd = Containerd::start(&bench_host.host, options)?;
    println!(
        "client: {} in containerd's netns; {runs} throughput runs of {THROUGHPUT_SECS} s; \
         {ROUND_TRIPS} round trips after {WARMUP}",
        netbench.display()
    );

    let mut columns = Vec::new();
    for runtime in &runtimes {
        if runtime.handler == KATA_HANDLER && shim.is_none() {
            columns.push(None);
            continue;
        }
        columns.push(Some(measure(&cd, runtime, &netbench, runs)));
    }

    println!();
    print!("{:<46}", "host -> pod");
    for runtime in &runtimes {
        print!(" {:>14}", runtime.label);
    }
    println!(" {:>10}", "kata/runc");
    let mut errors = Vec::new();
    let throughput: Vec<Option<Vec<f64>>> = columns
        .iter()
        .zip(&runtimes)
        .map(|(c, r)| match c.as_ref().map(|c| &c.throughput) {
            Some(Ok(samples)) => Some(samples.clone()),
            Some(Err(e)) => {
                errors.push(format!("{} throughput: {e:#}", r.label));
                None
            }
            None => None,
        })
        .collect();
    let latency: Vec<Option<(f64, f64)>> = columns
        .iter()
        .zip(&runtimes)
        .map(|(c, r)| match c.as_ref().map(|c| &c.latency) {
            Some(Ok(l)) => Some(*l),
            Some(Err(e)) => {
                errors.push(format!("{} latency: {e:#}", r.label));
                None
            }
            None => None,
        })
        .collect();
    let medians: Vec<Option<f64>> = throughput
        .iter()
        .map(|s| s.clone().map(|mut s| min_med_max(&mut s).1))
        .collect();
    row(
        &format!("TCP throughput MB/s ({THROUGHPUT_SECS} s, median of {runs})"),
        &medians,
        1,
    );
    let spread: Vec<String> = throughput
        .iter()
        .map(|s| match s {
            Some(s) => {
                let (a, _, c) = min_med_max(&mut s.clone());
                format!("{a:.0} / {c:.0}")
            }
            None => "-".into(),
        })
        .collect();
    println!("{:<46} {:>14} {:>14}", "  min / max", spread[0], spread[1]);
    row(
        &format!("round trip p50 µs ({ROUND_TRIPS} after {WARMUP})"),
        &latency.iter().map(|l| l.map(|l| l.0)).collect::<Vec<_>>(),
        0,
    );
    row(
        &format!("round trip p99 µs ({ROUND_TRIPS} after {WARMUP})"),
        &latency.iter().map(|l| l.map(|l| l.1)).collect::<Vec<_>>(),
        0,
    );
    match (medians[0], medians[1]) {
        (Some(runc), Some(kata)) => {
            let ratio = kata / runc;
            println!(
                "\ntarget kata throughput >= 0.5 x runc: {} ({ratio:.2} x)",
                if ratio >= 0.5 { "met" } else { "MISSED" }
            );
        }
        _ => println!("\ntarget kata throughput >= 0.5 x runc: not measured"),
    }
    finish(&mut cd, shim.as_deref(), &errors)
}

/// Prints one row: runc, kata and kata/runc (`failed` or `-` for what is
/// missing), with `decimals`.
fn row(label: &str, values: &[Option<f64>], decimals: usize) {
    print!("{label:<46}");
    for value in values {
        match value {
            Some(v) => print!(" {v:>14.decimals$}"),
            None => print!(" {:>14}", "-"),
        }
    }
    match (values[0], values[1]) {
        (Some(runc), Some(kata)) if runc > 0.0 => println!(" {:>10.2}", kata / runc),
        _ => println!(" {:>10}", "-"),
    }
}

/// Runs a `netbench serve` pod of `runtime`, measures it from containerd's
/// netns, and removes it.
fn measure(cd: &Containerd, runtime: &Runtime, netbench: &Path, runs: usize) -> Column {
    let pod = match serve(cd, runtime.handler, netbench) {
        Ok(pod) => pod,
        Err(e) => {
            let message = format!("{e:#}");
            return Column {
                throughput: Err(anyhow::anyhow!("{message}")),
                latency: Err(anyhow::anyhow!("the server did not start")),
            };
        }
    };
    let (pod_id, ip) = pod;
    let client = |args: &str| -> Result<String> {
        let script = format!("{} client {ip} {PORT} {args}", netbench.display());
        cd.sh_in_netns_ok(&script, CLIENT_TIMEOUT)
    };
    let throughput = (0..runs)
        .map(|_| {
            let line = client(&format!("--throughput {THROUGHPUT_SECS}"))?;
            field(&line, "throughput", "mb_per_s")
        })
        .collect();
    let latency = client(&format!("--latency {ROUND_TRIPS} --warmup {WARMUP}")).and_then(|line| {
        Ok((
            field(&line, "latency", "p50_us")?,
            field(&line, "latency", "p99_us")?,
        ))
    });
    for step in ["stopp", "rmp"] {
        if let Err(e) = cd.cri(&[step, &pod_id]) {
            println!("{}: {step} {pod_id}: {e:#}", runtime.label);
        }
    }
    Column {
        throughput,
        latency,
    }
}

/// A pod of `handler` whose container runs `netbench serve PORT`, once the
/// server answers from containerd's netns: (pod id, pod IP).
fn serve(cd: &Containerd, handler: &str, netbench: &Path) -> Result<(String, String)> {
    let mut pod = cd.pod(&format!("netbench-{handler}"), handler);
    pod.extra.push("--pod-network".into());
    let pod_id = cd.run_pod(&pod)?;
    let mount = format!("{}:/netbench:ro", netbench.display());
    let port = PORT.to_string();
    let container = cd.create_container(
        &pod_id,
        &pod,
        "server",
        &["--mount", &mount],
        &["/netbench", "serve", &port],
    )?;
    cd.cri(&["start", &container])?;
    cd.cri(&["wait", "--state", "RUNNING", "--for", "300", &container])?;
    let ip = cd.pod_ip(&pod_id)?;
    let probe = format!(
        "i=0; while [ $i -lt {READY_SECS} ]; do \
             timeout 10 {nb} client {ip} {PORT} --latency 1 --warmup 0 >/dev/null 2>&1 && exit 0; \
             i=$((i + 1)); sleep 1; \
         done; timeout 10 {nb} client {ip} {PORT} --latency 1 --warmup 0",
        nb = netbench.display()
    );
    let out = cd.sh_in_netns(&probe, b"", CLIENT_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "the {handler} pod's server at {ip}:{PORT} does not answer: {}{}",
            out.stdout_text(),
            out.stderr_text()
        );
    }
    Ok((pod_id, ip))
}

/// `key=value` of the line starting with `kind` in netbench's output.
fn field(output: &str, kind: &str, key: &str) -> Result<f64> {
    let line = output
        .lines()
        .find(|l| l.split_whitespace().next() == Some(kind))
        .with_context(|| format!("no {kind} line in {output:?}"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key} in {line:?}"))?
        .parse()
        .with_context(|| format!("{key} in {line:?}"))
}
