//! `cargo bench -p microvm-tests --bench containerd`
//!
//! Containers through a private containerd (Debian's 1.6) where VMs run
//! (directly, or inside one KVM test host), one column per runtime: runc,
//! the baseline, and our shim (`io.containerd.kata.v2`, handler `kata`)
//! when `containerd-shim-kata-v2` is built (release if built, else debug):
//! 1. `ctr run --rm IMAGE ID /bin/true`, wall time of the whole ctr command;
//! 2. CRI RunPodSandbox + CreateContainer + StartContainer until the
//!    container runs (the `cri up` command's own clock; tearing the pod
//!    down afterwards is not measured), and each step's median;
//! 3. SIGKILL to a running task's host process (runc: the container's
//!    process; kata: the pod's VMM) until a waiting `ctr task attach`
//!    returns: how soon containerd learns that the task died.
//!
//! `MICROVM_BENCH_RUNS` sets the number of runs (default 20), after one
//! unmeasured warm-up run each; `MICROVM_BENCH_SHIM_DIR` the directory of
//! the shim (default: the release build if there is one, else the debug
//! build); `MICROVM_BENCH_LOG=FILE` runs containerd (and the shims) at debug
//! level and copies its log, with the shims' timestamped phases, to FILE.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use microvm_tests::bench::{finish, kata_bench_options, min_med_max, runs, BenchHost};
use microvm_tests::containerd::{
    Containerd, KATA_HANDLER, KATA_RUNTIME, RUNC_HANDLER, RUNC_RUNTIME,
};
use serde_json::Value;

/// One script may run every iteration of a measurement.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(3600);

/// One column: a runtime as ctr names it and as CRI's handler.
struct Runtime {
    label: &'static str,
    runtime: &'static str,
    handler: &'static str,
}

/// One row of the table: a column's samples, in seconds.
type Samples = fn(&Column) -> Result<Vec<f64>>;

/// What one runtime measured, in seconds (or why it could not).
struct Column {
    ctr_run: Result<Vec<f64>>,
    pod_up: Result<Vec<Value>>,
    killed: Result<Vec<f64>>,
}

fn main() -> Result<()> {
    let runs = runs(20);
    let runtimes = [
        Runtime {
            label: "runc",
            runtime: RUNC_RUNTIME,
            handler: RUNC_HANDLER,
        },
        Runtime {
            label: "kata (ours)",
            runtime: KATA_RUNTIME,
            handler: KATA_HANDLER,
        },
    ];
    let (mut options, shim) = kata_bench_options(env!("CARGO_BIN_EXE_cri"))?;
    let keep_log = std::env::var_os("MICROVM_BENCH_LOG");
    options.debug = keep_log.is_some();
    let bench_host = BenchHost::start()?;
    let mut cd = Containerd::start(&bench_host.host, options)?;
    let version = cd.ctr_ok(&["version"])?;
    let server = version
        .split("Server:")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.contains("Version:")))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    println!("containerd: {server}; {runs} runs each, after one warm-up run");

    let mut columns = Vec::new();
    for runtime in &runtimes {
        if runtime.runtime == KATA_RUNTIME && shim.is_none() {
            columns.push(None);
            continue;
        }
        columns.push(Some(Column {
            ctr_run: ctr_run_true(&cd, runtime.runtime, runs),
            pod_up: pod_up(&cd, runtime.handler, runs),
            killed: kill_to_exit(&cd, runtime.runtime, runs),
        }));
    }

    println!();
    print!("{:<44}", "min / median / max (s)");
    for runtime in &runtimes {
        print!(" {:>26}", runtime.label);
    }
    println!();
    let rows: [(&str, Samples); 6] = [
        ("ctr run --rm IMAGE /bin/true", |c| clone_result(&c.ctr_run)),
        ("CRI pod up (runp + create + start)", |c| {
            field(c, "elapsed_ms")
        }),
        ("  RunPodSandbox", |c| field(c, "runp_ms")),
        ("  CreateContainer", |c| field(c, "create_ms")),
        ("  StartContainer until running", |c| field(c, "start_ms")),
        ("SIGKILL task process -> task exit seen", |c| {
            clone_result(&c.killed)
        }),
    ];
    let mut errors = Vec::new();
    for (label, samples) in rows {
        print!("{label:<44}");
        for (runtime, column) in runtimes.iter().zip(&columns) {
            let cell = match column {
                None => "not built".to_string(),
                Some(column) => match samples(column) {
                    Ok(mut s) => {
                        let (a, b, c) = min_med_max(&mut s);
                        format!("{a:.3} / {b:.3} / {c:.3}")
                    }
                    Err(e) => {
                        errors.push(format!("{} {label}: {e:#}", runtime.label));
                        "failed".to_string()
                    }
                },
            };
            print!(" {cell:>26}");
        }
        println!();
    }
    if shim.is_some() {
        jail_on_off(&cd, runs, &mut errors);
    }
    if let Some(file) = keep_log {
        let log = cd.log()?;
        std::fs::write(&file, log)
            .with_context(|| format!("writing containerd's log to {file:?}"))?;
    }
    finish(&mut cd, shim.as_deref(), &errors)
}

/// Seconds per `ctr run --rm … /bin/true`, timed where VMs run.
fn ctr_run_true(cd: &Containerd, runtime: &str, runs: usize) -> Result<Vec<f64>> {
    let script = format!(
        "set -e; for i in $(seq 0 {runs}); do \
           a=$(date +%s%N); $CTR run --rm --runtime {runtime} $IMAGE {id}-$i /bin/true; \
           b=$(date +%s%N); [ $i = 0 ] || echo took $((b - a)); done",
        id = cd.id(&format!("true-{}", runtime.replace('.', "-"))),
    );
    timed_script(cd, &script, "ctr run")
}

/// Seconds from SIGKILL to the task's host process until `ctr task
/// attach`, already waiting on the task, returns (ctr 1.6 has no `task
/// wait`; attach ends with the task and exits with its non-zero status,
/// which the script checks, as it checks that attach was still waiting).
fn kill_to_exit(cd: &Containerd, runtime: &str, runs: usize) -> Result<Vec<f64>> {
    let script = format!(
        "set -e; for i in $(seq 0 {runs}); do \
           c={id}-$i; $CTR run -d --runtime {runtime} $IMAGE $c sleep 100000; \
           pid=$($CTR task ls | awk -v c=$c '$1 == c {{print $2}}'); \
           $CTR task attach $c </dev/null >/dev/null 2>&1 & w=$!; sleep 1; kill -0 $w; \
           a=$(date +%s%N); kill -KILL $pid; st=0; wait $w || st=$?; b=$(date +%s%N); \
           [ $st -ne 0 ]; [ $i = 0 ] || echo took $((b - a)); \
           $CTR task rm $c >/dev/null 2>&1 || true; $CTR container rm $c; done",
        id = cd.id(&format!("kill-{}", runtime.replace('.', "-"))),
    );
    timed_script(cd, &script, "killing tasks")
}

/// `ctr run --rm … /bin/true` with our shim, the VMM jailed and filtered
/// (the default) and not (`--runtime-config-path` to a configuration with
/// `jail = false`, `seccomp = false`), alternating run by run in the same
/// containerd so both see the same load.
fn jail_on_off(cd: &Containerd, runs: usize, errors: &mut Vec<String>) {
    let script = format!(
        "set -e; off=/tmp/microvm-bench-unjailed.toml; \
         printf '[hypervisor]\\njail = false\\nseccomp = false\\n' > $off; \
         for i in $(seq 0 {runs}); do \
           a=$(date +%s%N); $CTR run --rm --runtime {KATA_RUNTIME} $IMAGE {id}-on-$i /bin/true; \
           b=$(date +%s%N); [ $i = 0 ] || echo on $((b - a)); \
           a=$(date +%s%N); $CTR run --rm --runtime {KATA_RUNTIME} --runtime-config-path $off \
             $IMAGE {id}-off-$i /bin/true; \
           b=$(date +%s%N); [ $i = 0 ] || echo off $((b - a)); done",
        id = cd.id("jail"),
    );
    println!("\nctr run --rm IMAGE /bin/true with our shim, {runs} runs each, alternating:");
    let out = match cd.sh(&script, b"", SCRIPT_TIMEOUT) {
        Ok(out) if out.status.success() => out.stdout_text(),
        Ok(out) => {
            errors.push(format!(
                "jail on/off failed ({:?}): {}",
                out.status,
                out.stderr_text().trim()
            ));
            return;
        }
        Err(e) => {
            errors.push(format!("jail on/off: {e:#}"));
            return;
        }
    };
    let samples = |tag: &str| -> Vec<f64> {
        out.lines()
            .filter_map(|l| l.strip_prefix(tag))
            .filter_map(|ns| ns.trim().parse::<f64>().ok())
            .map(|ns| ns / 1e9)
            .collect()
    };
    let (mut on, mut off) = (samples("on "), samples("off "));
    let (_, on_med, _) = min_med_max(&mut on);
    let (_, off_med, _) = min_med_max(&mut off);
    for (label, samples) in [
        ("jail + seccomp on (default)", &mut on),
        ("jail + seccomp off", &mut off),
    ] {
        let (a, b, c) = min_med_max(samples);
        println!("{label:<44} {:>26}", format!("{a:.3} / {b:.3} / {c:.3}"));
    }
    println!(
        "{:<44} {:>26}",
        "median on / off",
        format!("{:+.1} %", (on_med / off_med - 1.0) * 100.0)
    );
}

/// Runs `script`, which prints `took NANOSECONDS` per measured run: the
/// runs in seconds.
fn timed_script(cd: &Containerd, script: &str, what: &str) -> Result<Vec<f64>> {
    let out = cd.sh(script, b"", SCRIPT_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({:?}): {}{}",
            out.status,
            out.stderr_text().trim(),
            cd.log_tail()
        );
    }
    Ok(out
        .stdout_text()
        .lines()
        .filter_map(|l| l.strip_prefix("took "))
        .filter_map(|ns| ns.trim().parse::<f64>().ok())
        .map(|ns| ns / 1e9)
        .collect())
}

/// `cri up` answers (a pod with one `sleep` container, running), each pod
/// stopped and removed before the next.
fn pod_up(cd: &Containerd, handler: &str, runs: usize) -> Result<Vec<Value>> {
    let mut answers = Vec::new();
    for i in 0..=runs {
        let pod = cd.pod(&format!("bench-{handler}-{i}"), handler);
        let mut args = vec!["up".to_string(), "--handler".into(), handler.into()];
        args.extend(pod.args());
        args.extend(
            [
                "--name",
                "c",
                "--image",
                microvm_tests::containerd::IMAGE,
                "--",
            ]
            .iter()
            .chain(&["sleep", "100000"])
            .map(|s| s.to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer = cd.cri(&args)?;
        let pod_id = answer["pod_id"].as_str().unwrap_or_default().to_string();
        cd.cri(&["stopp", &pod_id])?;
        cd.cri(&["rmp", &pod_id])?;
        if i > 0 {
            answers.push(answer);
        }
    }
    Ok(answers)
}

/// One timing of every `cri up` answer, in seconds.
fn field(column: &Column, name: &str) -> Result<Vec<f64>> {
    match &column.pod_up {
        Ok(answers) => answers
            .iter()
            .map(|a| {
                a[name]
                    .as_f64()
                    .map(|ms| ms / 1000.0)
                    .with_context(|| format!("no {name} in {a}"))
            })
            .collect(),
        Err(e) => bail!("{e:#}"),
    }
}

fn clone_result(result: &Result<Vec<f64>>) -> Result<Vec<f64>> {
    match result {
        Ok(v) => Ok(v.clone()),
        Err(e) => bail!("{e:#}"),
    }
}
