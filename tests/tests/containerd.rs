//! Containers through a real containerd (Debian's 1.6), with `ctr` and with
//! CRI calls the way kubelet makes them, where VMs run (inside the test host
//! on PVM machines). Each test body takes the runtime (a containerd runtime
//! name, or a CRI handler), so one body tests runc, the reference, and our
//! shim alike: a kata variant is a one-line test calling the same body with
//! `KATA_RUNTIME` or `KATA_HANDLER`.
//!
//! Every test ends by asserting that nothing is left: no task, container,
//! shim, VMM or container process, mount, container cgroup or shim socket,
//! before containerd stops and after.

use std::time::Duration;

use microvm_tests::containerd::{
    text, Containerd, Options, IMAGE, KATA_HANDLER, KATA_RUNTIME, RUNC_HANDLER, RUNC_RUNTIME,
    TIMEOUT,
};
use microvm_tests::{vm_host, ExitStatus, Output, VmHost};
use serde_json::Value;

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

/// A private containerd whose shims may take TCG's time; panics with the
/// reason when it cannot start, or when `runtime` needs a shim not built.
fn containerd(runtime: &str) -> Containerd<'static> {
    containerd_with_env(runtime, &[])
}

/// [`containerd`], with `env` added to containerd's (and its shims')
/// environment.
fn containerd_with_env(runtime: &str, env: &[(&str, &str)]) -> Containerd<'static> {
    let mut options = Options::new(env!("CARGO_BIN_EXE_cri"));
    if let Err(e) = options.require_shim(runtime) {
        panic!("the {runtime} tests cannot run: {e:#}");
    }
    options
        .env
        .extend(env.iter().map(|&(k, v)| (k.to_string(), v.to_string())));
    Containerd::start_for_test(host(), options)
}

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Prints what a container sees of its pod: `boot <kernel boot id>` and
/// `pod <its IPC and UTS namespaces> <hostname>`.
const POD_PROBE: &str = "echo boot $(cat /proc/sys/kernel/random/boot_id); \
    echo pod $(readlink /proc/self/ns/ipc /proc/self/ns/uts) $(hostname)";

/// Whether `runtime` (a runtime name or CRI handler) runs its containers in
/// a VM of their own, so they see a kernel other than the host's.
fn in_a_vm(runtime: &str) -> bool {
    runtime == KATA_RUNTIME || runtime == KATA_HANDLER
}

/// Checks that `boot_id`, read inside a container, is the host kernel's
/// for runc and another kernel's for kata.
fn assert_kernel(cd: &Containerd, runtime: &str, boot_id: &str) {
    let host_boot_id = cd.read_file(BOOT_ID).unwrap();
    let host_boot_id = host_boot_id.trim();
    assert_eq!(boot_id.len(), 36, "not a boot id: {boot_id:?}");
    if in_a_vm(runtime) {
        assert_ne!(boot_id, host_boot_id, "{runtime} ran on the host's kernel");
    } else {
        assert_eq!(boot_id, host_boot_id, "{runtime} ran on another kernel");
    }
}

/// Polls `ctr task ls` until `id`'s task is stopped or gone: its state then.
fn wait_task_ended(cd: &Containerd, id: &str) -> String {
    let mut last = String::new();
    for _ in 0..1200 {
        last = task_state(cd, id);
        if last == "STOPPED" || last == "absent" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last
}

/// `id`'s task state in `ctr task ls` (`absent` if it has none).
fn task_state(cd: &Containerd, id: &str) -> String {
    task_field(cd, id, 2).unwrap_or_else(|| "absent".into())
}

/// Column `n` of `id`'s line in `ctr task ls` (TASK PID STATUS).
fn task_field(cd: &Containerd, id: &str, n: usize) -> Option<String> {
    let tasks = cd.ctr_ok(&["task", "ls"]).unwrap();
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(n))
        .map(String::from)
}

/// `ctr run --rm [flags] --runtime RUNTIME IMAGE id argv…`.
fn ctr_run_rm(cd: &Containerd, runtime: &str, flags: &[&str], id: &str, argv: &[&str]) -> Output {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[IMAGE, id]);
    args.extend_from_slice(argv);
    cd.ctr(&args).unwrap()
}

/// `ctr run --rm` passes the container's output and exit code through.
fn ctr_run_exit_code(runtime: &str) {
    let cd = containerd(runtime);
    let id = cd.id("run");
    let script = format!("echo hi; cat {BOOT_ID} >&2; exit 3");
    let out = ctr_run_rm(&cd, runtime, &[], &id, &["sh", "-c", &script]);
    assert_eq!(
        (out.status, out.stdout_text().as_str()),
        (ExitStatus::Code(3), "hi\n"),
        "stderr: {}{}",
        out.stderr_text(),
        cd.log_tail()
    );
    assert_kernel(&cd, runtime, out.stderr_text().trim());
    cd.assert_nothing_left();
}

/// The task API through ctr on a detached task: exec (with and without a
/// TTY), ps, pause and resume, metrics, kill with SIGTERM, delete.
fn ctr_task_lifecycle(runtime: &str) {
    let cd = containerd(runtime);
    let id = cd.id("task");
    cd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        IMAGE,
        &id,
        "sh",
        "-c",
        "trap 'exit 0' TERM; sleep 100000 & wait",
    ])
    .unwrap();
    let state = |cd: &Containerd| task_state(cd, &id);
    assert_eq!(state(&cd), "RUNNING");

    let exec = cd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            &id,
            "sh",
            "-c",
            "echo in; ps -o pid,comm; exit 4",
        ])
        .unwrap();
    assert_eq!(exec.status, ExitStatus::Code(4), "{}", exec.stderr_text());
    let exec_out = exec.stdout_text();
    assert!(
        exec_out.starts_with("in\n") && exec_out.contains("sleep"),
        "{exec_out}"
    );

    // ctr wants a terminal for --tty: script(1) gives it one.
    let tty = cd
        .sh(
            &format!(
                r#"script -qec "$CTR task exec --tty --exec-id tty {id} sh -c 'tty; stty size; exit 6'" /dev/null"#
            ),
            b"",
            TIMEOUT,
        )
        .unwrap();
    let tty_out = tty.stdout_text();
    assert_eq!(
        tty.status,
        ExitStatus::Code(6),
        "{tty_out}{}",
        tty.stderr_text()
    );
    assert!(
        tty_out.contains("/dev/pts/"),
        "no terminal in the exec: {tty_out}"
    );

    let ps = cd.ctr_ok(&["task", "ps", &id]).unwrap();
    assert_eq!(ps.lines().count(), 3, "sh and sleep: {ps}");

    cd.ctr_ok(&["task", "pause", &id]).unwrap();
    assert_eq!(state(&cd), "PAUSED");
    cd.ctr_ok(&["task", "resume", &id]).unwrap();
    assert_eq!(state(&cd), "RUNNING");

    let metrics = cd.ctr_ok(&["task", "metrics", &id]).unwrap();
    assert!(metrics.contains("pids.current"), "{metrics}");

    // The container's shell traps SIGTERM and exits.
    cd.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]).unwrap();
    assert_eq!(
        wait_task_ended(&cd, &id),
        "STOPPED",
        "the task did not stop after SIGTERM"
    );
    cd.ctr_ok(&["task", "rm", &id]).unwrap();
    cd.ctr_ok(&["container", "rm", &id]).unwrap();
    cd.assert_nothing_left();
}

/// `ctr run -d` of a `sleep` task `id` with `runtime`.
fn run_sleeper(cd: &Containerd, runtime: &str, id: &str) {
    cd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        IMAGE,
        id,
        "sleep",
        "100000",
    ])
    .unwrap();
}

/// Runs the shell `action` (say, a kill of the task's host process) while
/// `ctr task attach` waits on task `id`: ctr 1.6 has no `task wait`, and
/// attach ends with the task, exiting with its status (the stopped task is
/// gone from `ctr task ls` by then). Returns that status,
/// the milliseconds from the action until containerd reported the exit, and
/// the script's output.
fn task_exit_after(cd: &Containerd, id: &str, action: &str) -> (i32, u64, String) {
    let out = cd
        .sh(
            &format!(
                "$CTR task attach {id} </dev/null >/dev/null 2>&1 & w=$!; sleep 1; \
                 {action}; s=$(date +%s%N); wait $w; echo \"status $?\"; \
                 echo \"waited ms $(( ($(date +%s%N) - s) / 1000000 ))\""
            ),
            b"",
            TIMEOUT,
        )
        .unwrap();
    let text = out.stdout_text();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in: {text}{}", out.stderr_text()))
    };
    (field("status ") as i32, field("waited ms "), text.clone())
}

/// Deletes `id`'s stopped task if it is still listed (ctr exits with the
/// task's status, so only its absence afterwards tells success).
fn remove_stopped_task(cd: &Containerd, id: &str) {
    cd.ctr(&["task", "rm", id]).unwrap();
    assert_eq!(task_state(cd, id), "absent");
}

/// SIGKILL to the task's host process (for runc the container's process,
/// for kata the pod's VMM): containerd sees the task exit, with a non-zero
/// status, and deleting it leaves nothing behind.
fn killed_task_process(runtime: &str) {
    let cd = containerd(runtime);
    let id = cd.id("killed");
    run_sleeper(&cd, runtime, &id);
    let pid = task_field(&cd, &id, 1).expect("the task's pid");
    let (status, waited_ms, text) =
        task_exit_after(&cd, &id, &format!("cat /proc/{pid}/comm; kill -KILL {pid}"));
    eprintln!("{runtime}: SIGKILL to pid {pid}: {text}");
    if in_a_vm(runtime) {
        assert!(
            text.starts_with("microvm-vmm"),
            "the task's pid is not the VMM: {text}"
        );
        assert_eq!(status, 255, "{text}");
    } else {
        assert_eq!(status, 128 + 9, "{text}");
    }
    assert!(waited_ms < 30_000, "{text}");
    remove_stopped_task(&cd, &id);
    cd.ctr_ok(&["container", "rm", &id]).unwrap();
    cd.assert_nothing_left();
}

/// SIGKILL to the task's shim: containerd cleans up with the shim's
/// `delete`, the task ends, and the container then goes without leftovers.
fn killed_shim(runtime: &str) {
    let cd = containerd(runtime);
    let id = cd.id("shimkill");
    run_sleeper(&cd, runtime, &id);
    let shim = if in_a_vm(runtime) {
        "containerd-shim-kata-v2"
    } else {
        "containerd-shim-runc-v2"
    };
    let killed = cd
        .sh(
            &format!(
                "for p in $(pgrep -f '^[^ ]*{shim} .*-namespace '$NS' '); do \
                     grep -qa -- {id} /proc/$p/cmdline && kill -KILL $p && echo killed $p; \
                 done"
            ),
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert!(
        killed.stdout_text().contains("killed"),
        "no shim of {id} found: {}{}",
        killed.stdout_text(),
        killed.stderr_text()
    );
    let ended = wait_task_ended(&cd, &id);
    assert!(
        ended == "STOPPED" || ended == "absent",
        "the task is still {ended}"
    );
    if ended == "STOPPED" {
        cd.ctr_ok(&["task", "rm", &id]).unwrap();
    }
    cd.ctr_ok(&["container", "rm", &id]).unwrap();
    if !in_a_vm(runtime) {
        // runc's shim leaves its socket when killed and containerd 1.6
        // does not remove it (ours removes it in `delete`): the control
        // cleans up after runc, so as not to count it against others.
        // containerd's own `shim delete` of the dead runc shim (which runs
        // `runc delete --force`) is killed after 5 s: on a loaded machine
        // the container's process and runc's state may then stay. The
        // control is here to show containerd's view (the task ended and
        // is removable), not runc's clean-up under load: it waits for
        // that clean-up and finishes it if containerd gave up.
        let cleanup = cd
            .sh(
                &format!(
                    r#"s=/run/containerd/s/$(printf %s "$S/$NS/{id}" | sha256sum | cut -d' ' -f1)
                   [ -S "$s" ] && ! grep -q " $s\$" /proc/net/unix && rm "$s"
                   state=/run/containerd/runc/$NS/{id}
                   for i in $(seq 1 300); do [ -e "$state" ] || exit 0; sleep 0.1; done
                   echo "containerd left runc's container {id}: deleting it" >&2
                   runc --root "/run/containerd/runc/$NS" delete --force {id}"#
                ),
                b"",
                TIMEOUT,
            )
            .unwrap();
        assert!(
            cleanup.status.success(),
            "cleaning up after runc: {}",
            cleanup.stderr_text()
        );
        if !cleanup.stderr_text().is_empty() {
            eprintln!("{}", cleanup.stderr_text());
        }
    }
    cd.assert_nothing_left();
}

/// A pod with two containers, kubelet's way: one that exits with output on
/// both streams (its CRI log and status), one that runs (exec, stats, stop);
/// then the pod is stopped and removed.
fn cri_pod_with_two_containers(handler: &str) {
    let cd = containerd(handler);
    let pod = cd.pod("two", handler);
    let pod_id = cd.run_pod(&pod).unwrap();
    let status = cd.cri(&["inspectp", &pod_id]).unwrap();
    assert_eq!(
        text(&status["status"]["state"]),
        "SANDBOX_READY",
        "{status}"
    );

    let writer = cd
        .create_container(
            &pod_id,
            &pod,
            "writer",
            &[],
            &[
                "sh",
                "-c",
                &format!("echo out-line; echo err-line >&2; {POD_PROBE}; exit 7"),
            ],
        )
        .unwrap();
    let sleeper = cd
        .create_container(
            &pod_id,
            &pod,
            "sleeper",
            &["--env", "GREETING=hello"],
            &[
                "sh",
                "-c",
                "trap 'echo stopping; exit 0' TERM; sleep 100000 & wait",
            ],
        )
        .unwrap();
    cd.cri(&["start", &writer]).unwrap();
    cd.cri(&["start", &sleeper]).unwrap();

    let exited = cd.cri(&["wait", "--state", "EXITED", &writer]).unwrap();
    let log_path = format!("{}/writer_0.log", pod.log_dir);
    assert_eq!(exited["status"]["exit_code"], 7, "{exited}");
    assert_eq!(text(&exited["status"]["log_path"]), log_path, "{exited}");
    // CRI's log format: TIME STREAM F|P LINE.
    let log = cd.read_file(&log_path).unwrap();
    let lines: Vec<Vec<&str>> = log
        .lines()
        .map(|l| l.split(' ').skip(1).collect())
        .collect();
    assert!(
        lines.contains(&vec!["stdout", "F", "out-line"])
            && lines.contains(&vec!["stderr", "F", "err-line"]),
        "{log}"
    );
    // What the writer saw of its pod: kernel, namespaces, hostname.
    let writer_probe: Vec<String> = lines
        .iter()
        .filter(|l| {
            l.get(..2) == Some(&["stdout", "F"]) && matches!(l.get(2), Some(&"boot" | &"pod"))
        })
        .map(|l| l[2..].join(" "))
        .collect();

    let running = cd.cri(&["status", &sleeper]).unwrap();
    assert_eq!(
        text(&running["status"]["state"]),
        "CONTAINER_RUNNING",
        "{running}"
    );
    let exec = cd
        .cri(&[
            "exec-sync",
            &sleeper,
            "--",
            "sh",
            "-c",
            "echo $GREETING; echo e >&2; exit 5",
        ])
        .unwrap();
    assert_eq!(
        (
            &exec["exit_code"],
            text(&exec["stdout"]),
            text(&exec["stderr"])
        ),
        (&Value::from(5), "hello\n", "e\n"),
        "{exec}"
    );
    // One kernel for the pod, and one IPC and UTS namespace (the sandbox's;
    // on the node's network CRI leaves UTS to the node, or for kata to the
    // guest), so one hostname: the writer's and the sleeper's.
    let probe = cd
        .cri(&["exec-sync", &sleeper, "--", "sh", "-c", POD_PROBE])
        .unwrap();
    let sleeper_probe: Vec<&str> = text(&probe["stdout"]).lines().collect();
    assert_eq!(
        sleeper_probe, writer_probe,
        "the pod's containers differ in kernel or IPC/UTS namespaces"
    );
    let boot_id = sleeper_probe[0].strip_prefix("boot ").unwrap_or_default();
    assert_kernel(&cd, handler, boot_id);

    let stats = cd.cri(&["stats", &sleeper]).unwrap();
    assert_eq!(
        text(&stats["stats"]["attributes"]["id"]),
        sleeper,
        "{stats}"
    );
    assert!(
        stats["stats"]["memory"]["working_set_bytes"]["value"].as_u64() > Some(0),
        "{stats}"
    );
    let listed = cd.cri(&["ps", "--pod", &pod_id]).unwrap();
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // StopContainer sends SIGTERM, which the container's shell traps.
    cd.cri(&["stop", "--grace", "60", &sleeper]).unwrap();
    let stopped = cd.cri(&["status", &sleeper]).unwrap();
    assert_eq!(
        (
            text(&stopped["status"]["state"]),
            &stopped["status"]["exit_code"]
        ),
        ("CONTAINER_EXITED", &Value::from(0)),
        "{stopped}"
    );
    let log = cd.read_file(text(&stopped["status"]["log_path"])).unwrap();
    assert!(log.contains(" stdout F stopping"), "{log}");

    cd.cri(&["stopp", &pod_id]).unwrap();
    let status = cd.cri(&["inspectp", &pod_id]).unwrap();
    assert_eq!(
        text(&status["status"]["state"]),
        "SANDBOX_NOTREADY",
        "{status}"
    );
    cd.cri(&["rmp", &pod_id]).unwrap();
    let pods = cd.cri(&["pods"]).unwrap();
    assert_eq!(pods["items"], Value::Array(vec![]), "{pods}");
    cd.assert_nothing_left();
}

/// Sizes of stdin the stdin tests send: nothing, one byte, around the
/// FIFO's 64 KiB, sizes at which the shim used to lose the stream's end
/// (its last tens of KiB), and over 8 MiB.
const STDIN_SIZES: [u64; 7] = [
    0,
    1,
    65_536,
    70_000,
    200_000,
    1_000_000,
    8 * 1024 * 1024 + 13,
];

/// Checks lines `SIZE WANT GOT` printed by a stdin script: each command
/// saw exactly the bytes sent (their SHA-256), for every size.
fn assert_stdin_intact(what: &str, out: &microvm_tests::Output) {
    let text = out.stdout_text();
    assert!(
        out.status.success() && !out.timed_out,
        "{what}: {:?}{}\n{text}{}",
        out.status,
        if out.timed_out { " (timed out)" } else { "" },
        out.stderr_text()
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), STDIN_SIZES.len(), "{what}: {text}");
    for (line, size) in lines.iter().zip(STDIN_SIZES) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "{what}: {line:?}");
        assert_eq!(fields[0], size.to_string(), "{what}: {line:?}");
        assert_eq!(
            fields[1], fields[2],
            "{what}: {size} bytes of stdin did not arrive intact (sha256 sent, received)"
        );
    }
}

/// A script that sends random files of every [`STDIN_SIZES`] to `CMD`
/// (evaluated with `$N`, the size, and `$F`, the file, set) and prints
/// `SIZE SENT_SHA256 RECEIVED_SHA256` per size; CMD prints the hash of
/// what it read. With `gate` (a shell condition, evaluated with `$N` set),
/// the bytes are sent only once it holds.
fn stdin_script(cmd: &str, gate: Option<&str>) -> String {
    let sizes: Vec<String> = STDIN_SIZES.iter().map(u64::to_string).collect();
    let feed = match gate {
        Some(gate) => format!(
            "{{ for i in $(seq 1 1200); do {gate} && break; sleep 0.1; done; cat $F; }} | {cmd}"
        ),
        None => format!("{cmd} < $F"),
    };
    format!(
        r#"set -e
for N in {sizes}; do
    F=$D/stdin-$N
    head -c $N /dev/urandom > $F
    want=$(sha256sum < $F | cut -d' ' -f1)
    got=$({feed} | tr -d '\r' | cut -d' ' -f1)
    rm -f $F
    echo $N $want $got
done"#,
        sizes = sizes.join(" ")
    )
}

/// Every byte of stdin reaches the container's process, whatever its
/// size, through `ctr run` (the init process) and `ctr task exec`: the
/// stream's end (containerd's CloseIO) closes the process's stdin only
/// after the bytes before it were delivered.
fn ctr_stdin_intact(runtime: &str) {
    let cd = containerd(runtime);
    let id = cd.id("stdin");
    let timeout = Duration::from_secs(600);
    // ctr sends CloseIO only if its input ends after the task or exec was
    // created (it sets its stdin closer then), and with an empty input it
    // never opens the FIFO at all: fed at once, a small input would leave
    // runc's shim, which holds the FIFO open until CloseIO, waiting
    // forever. So each command gets its input once it runs.
    let run = cd
        .sh(
            &stdin_script(
                &format!("$CTR run --rm --runtime {runtime} $IMAGE {id}-$N sha256sum"),
                Some(&format!(
                    "$CTR task ls | grep -q '^{id}-'$N'  *[0-9]*  *RUNNING'"
                )),
            ),
            b"",
            timeout,
        )
        .unwrap();
    assert_stdin_intact(&format!("ctr run ({runtime})"), &run);

    run_sleeper(&cd, runtime, &id);
    let exec = cd
        .sh(
            &stdin_script(
                &format!("$CTR task exec --exec-id in-$N {id} sha256sum"),
                // The sleeper, ps's header and the exec.
                Some(&format!("[ $($CTR task ps {id} | wc -l) -ge 3 ]")),
            ),
            b"",
            timeout,
        )
        .unwrap();
    assert_stdin_intact(&format!("ctr task exec ({runtime})"), &exec);
    cd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]).unwrap();
    wait_task_ended(&cd, &id);
    cd.ctr_ok(&["task", "rm", &id]).unwrap();
    cd.ctr_ok(&["container", "rm", &id]).unwrap();
    cd.assert_nothing_left();
}

/// Every byte of stdin reaches a CRI exec's process (`kubectl exec -i`'s
/// path: CRI Exec, the streaming server, stdin half-closed at its end),
/// whatever its size.
fn cri_exec_stdin_intact(handler: &str) {
    let cd = containerd(handler);
    let pod = cd.pod("stdin", handler);
    let pod_id = cd.run_pod(&pod).unwrap();
    let sleeper = cd
        .create_container(&pod_id, &pod, "sleeper", &[], &["sleep", "100000"])
        .unwrap();
    cd.cri(&["start", &sleeper]).unwrap();
    let exec = cd
        .sh(
            &stdin_script(
                &format!("$CRI --timeout 600 exec --stdin - {sleeper} -- sha256sum"),
                None,
            ),
            b"",
            Duration::from_secs(600),
        )
        .unwrap();
    assert_stdin_intact(&format!("CRI exec ({handler})"), &exec);
    cd.cri(&["stopp", &pod_id]).unwrap();
    cd.cri(&["rmp", &pod_id]).unwrap();
    cd.assert_nothing_left();
}

#[test]
fn cri_exec_stdin_arrives_whole_runc() {
    cri_exec_stdin_intact(RUNC_HANDLER);
}

#[test]
fn cri_exec_stdin_arrives_whole_kata() {
    cri_exec_stdin_intact(KATA_HANDLER);
}

#[test]
fn ctr_stdin_arrives_whole_runc() {
    ctr_stdin_intact(RUNC_RUNTIME);
}

#[test]
fn ctr_stdin_arrives_whole_kata() {
    ctr_stdin_intact(KATA_RUNTIME);
}

#[test]
fn ctr_run_passes_output_and_exit_code_runc() {
    ctr_run_exit_code(RUNC_RUNTIME);
}

#[test]
fn ctr_run_passes_output_and_exit_code_kata() {
    ctr_run_exit_code(KATA_RUNTIME);
}

#[test]
fn ctr_task_exec_ps_pause_resume_metrics_kill_runc() {
    ctr_task_lifecycle(RUNC_RUNTIME);
}

#[test]
fn ctr_task_exec_ps_pause_resume_metrics_kill_kata() {
    ctr_task_lifecycle(KATA_RUNTIME);
}

#[test]
fn cri_pod_with_two_containers_runc() {
    cri_pod_with_two_containers(RUNC_HANDLER);
}

#[test]
fn cri_pod_with_two_containers_kata() {
    cri_pod_with_two_containers(KATA_HANDLER);
}

#[test]
fn sigkill_to_the_task_process_ends_the_task_runc() {
    killed_task_process(RUNC_RUNTIME);
}

#[test]
fn sigkill_to_the_vmm_ends_the_task_kata() {
    killed_task_process(KATA_RUNTIME);
}

/// A pod whose guest stops answering while its VMM lives on (the VMM
/// stopped with SIGSTOP): the shim's health checks find it, kill the VMM,
/// and containerd sees the task exit 255; deleting it leaves nothing.
#[test]
fn a_stuck_guest_ends_the_task_kata() {
    let cd = containerd_with_env(KATA_RUNTIME, &[("MICROVM_AGENT_UNRESPONSIVE", "6")]);
    let id = cd.id("stuck");
    run_sleeper(&cd, KATA_RUNTIME, &id);
    let pid = task_field(&cd, &id, 1).expect("the task's pid");
    let (status, waited_ms, text) =
        task_exit_after(&cd, &id, &format!("cat /proc/{pid}/comm; kill -STOP {pid}"));
    assert!(
        text.starts_with("microvm-vmm"),
        "the task's pid is not the VMM: {text}"
    );
    assert_eq!(status, 255, "{text}");
    // One check interval (3 s) and the 6 s limit, with room for a loaded host.
    assert!(
        (5_000..=40_000).contains(&waited_ms),
        "found stuck after {waited_ms} ms"
    );
    let left = cd.sh(
        &format!("[ -e /proc/{pid} ] && echo vmm-left; true"),
        b"",
        TIMEOUT,
    );
    assert_eq!(
        left.unwrap().stdout_text(),
        "",
        "the stopped VMM was not killed"
    );
    remove_stopped_task(&cd, &id);
    cd.ctr_ok(&["container", "rm", &id]).unwrap();
    cd.assert_nothing_left();
}

#[test]
fn sigkill_to_the_shim_is_cleaned_up_runc() {
    killed_shim(RUNC_RUNTIME);
}

#[test]
fn sigkill_to_the_shim_is_cleaned_up_kata() {
    killed_shim(KATA_RUNTIME);
}

/// Runs `argv` where VMs run; panics with its output unless it succeeds.
fn run_ok(argv: &[&str]) {
    let out = host().run(argv, b"", TIMEOUT).unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {:?}\n{}{}",
        out.status,
        out.stdout_text(),
        out.stderr_text()
    );
}

/// Debian's own `/etc/containerd/config.toml`, checked unmodified against
/// the package's conffile hash (it declares no runtimes).
fn debian_containerd_config() -> String {
    let out = host()
        .run(
            &[
                "sh",
                "-c",
                "set -e; want=$(dpkg-query -W -f='${Conffiles}' containerd | \
                 awk '$1 == \"/etc/containerd/config.toml\" { print $2 }'); \
                 got=$(md5sum < /etc/containerd/config.toml | cut -d' ' -f1); \
                 [ -n \"$want\" ] && [ \"$want\" = \"$got\" ] || \
                 { echo \"/etc/containerd/config.toml is not Debian's stock file (md5 $got, package $want)\" >&2; exit 1; }; \
                 cat /etc/containerd/config.toml",
            ],
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    out.stdout_text()
}

/// `microvm install` into a directory, with `--containerd-config` on a
/// copy of Debian's stock containerd configuration: the edit keeps runc
/// (declaring kata would otherwise drop containerd's built-in runtime
/// table, and CRI would not load), keeps a backup, and a second install
/// changes nothing. containerd, run with the edited file as it is, loads
/// CRI and runs a pod with handler runc and one with handler kata, the
/// latter with the installed shim, kernel, initramfs and VMM and the
/// installed configuration's memory.
#[test]
fn installed_runtime_runs_a_pod_with_its_configuration() {
    let dir = format!("/run/microvm-install-{}", std::process::id());
    let microvm = microvm_tests::workspace_binary("microvm").unwrap();
    let config = format!("{dir}/etc/configuration.toml");
    let containerd_config = format!("{dir}/containerd.toml");
    let stock = debian_containerd_config();
    assert!(
        !stock.contains("runtimes"),
        "Debian's file declares runtimes now: {stock}"
    );
    run_ok(&["mkdir", "-p", &dir]);
    host()
        .run(
            &["sh", "-c", &format!("cat > {containerd_config}")],
            stock.as_bytes(),
            TIMEOUT,
        )
        .unwrap();
    let install = [
        microvm.to_str().unwrap(),
        "install",
        "--bin-dir",
        &format!("{dir}/bin"),
        "--share-dir",
        &format!("{dir}/share"),
        "--config",
        &config,
        "--containerd-config",
        &containerd_config,
    ];
    let first = host().run(&install, b"", TIMEOUT).unwrap();
    assert!(first.status.success(), "{}", first.stderr_text());
    assert!(
        first
            .stdout_text()
            .contains("added runtime kata and containerd's default runtime runc"),
        "{}",
        first.stdout_text()
    );
    let edited = cd_read(&containerd_config);
    assert_eq!(cd_read(&format!("{containerd_config}.microvm.bak")), stock);
    let second = host().run(&install, b"", TIMEOUT).unwrap();
    assert!(second.status.success(), "{}", second.stderr_text());
    assert!(
        second
            .stdout_text()
            .contains("has runtime kata already: not changed"),
        "{}",
        second.stdout_text()
    );
    assert_eq!(
        cd_read(&containerd_config),
        edited,
        "a second install changed it"
    );
    run_ok(&[
        "sh",
        "-c",
        &format!(
            "set -e; sed -i -e 's/^memory_mib = .*/memory_mib = 192/' -e 's/^timeout_secs = .*/timeout_secs = 120/' {config}; \
             ls {dir}/bin {dir}/share"
        ),
    ]);

    let mut options = Options::new(env!("CARGO_BIN_EXE_cri"));
    options.shim_dir = format!("{dir}/bin").into();
    options.config = Some(edited);
    let cd = Containerd::start_for_test(host(), options);
    let plugins = cd.ctr_ok(&["plugins", "ls"]).unwrap();
    let cri = plugins
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("cri"))
        .unwrap_or_else(|| panic!("no CRI plugin: {plugins}"));
    assert_eq!(
        cri.split_whitespace().last(),
        Some("ok"),
        "CRI did not load: {cri}\n{}",
        cd.log_tail()
    );
    for handler in [RUNC_HANDLER, KATA_HANDLER] {
        let pod = cd.pod(&format!("installed-{handler}"), handler);
        let pod_id = cd.run_pod(&pod).unwrap();
        let sleeper = cd
            .create_container(&pod_id, &pod, "sleeper", &[], &["sleep", "100000"])
            .unwrap();
        cd.cri(&["start", &sleeper]).unwrap();
        if handler == KATA_HANDLER {
            assert_guest_memory(
                mem_total_kib(&cd, &sleeper),
                192,
                "the configuration's memory_mib",
            );
            let shims = cd
                .sh(
                    &format!("ps -eo args | grep -c '^{dir}/bin/containerd-shim-kata-v2' || true"),
                    b"",
                    TIMEOUT,
                )
                .unwrap();
            assert_eq!(
                shims.stdout_text().trim(),
                "1",
                "the installed shim does not run the pod"
            );
        } else {
            let status = cd.cri(&["status", &sleeper]).unwrap();
            assert_eq!(
                text(&status["status"]["state"]),
                "CONTAINER_RUNNING",
                "{status}"
            );
        }
        cd.cri(&["stopp", &pod_id]).unwrap();
        cd.cri(&["rmp", &pod_id]).unwrap();
    }
    cd.assert_nothing_left();
    host().run(&["rm", "-rf", &dir], b"", TIMEOUT).unwrap();
}

/// A file's text where VMs run.
fn cd_read(path: &str) -> String {
    let out = host().run(&["cat", path], b"", TIMEOUT).unwrap();
    assert!(out.status.success(), "{path}: {}", out.stderr_text());
    out.stdout_text()
}

/// MemTotal of /proc/meminfo in running container `id` (CRI ExecSync).
fn mem_total_kib(cd: &Containerd, id: &str) -> u64 {
    let meminfo = cd
        .cri(&["exec-sync", id, "--", "cat", "/proc/meminfo"])
        .unwrap();
    mem_total_in(text(&meminfo["stdout"]))
}

/// MemTotal, in KiB, of `meminfo` (the text of /proc/meminfo).
fn mem_total_in(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {meminfo}"))
}

/// Asserts that a guest of `mib` MiB, which keeps well under 64 MiB for its
/// kernel, shows `total_kib` as MemTotal.
fn assert_guest_memory(total_kib: u64, mib: u64, what: &str) {
    assert!(
        ((mib - 64) * 1024..=mib * 1024).contains(&total_kib),
        "{what}: the guest has {total_kib} KiB, not {mib} MiB"
    );
}

/// A container outside CRI (`ctr run`, nerdctl) is a pod of its own: its
/// memory limit is added to its VM, as a pod's containers' limits are.
#[test]
fn a_ctr_containers_vm_is_sized_by_its_memory_limit_kata() {
    let cd = containerd(KATA_RUNTIME);
    let id = cd.id("limited");
    let out = ctr_run_rm(
        &cd,
        KATA_RUNTIME,
        &["--memory-limit", "402653184"],
        &id,
        &["cat", "/proc/meminfo"],
    );
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr_text());
    assert_guest_memory(
        mem_total_in(&out.stdout_text()),
        256 + 384,
        "ctr run --memory-limit 384 MiB",
    );
    cd.assert_nothing_left();
}

/// A pod whose containers' limits come with it (the pod's
/// `linux.resources`, which containerd turns into sandbox annotations) gets
/// a VM that large on top of the configured 256 MiB, as with Kata's static
/// sandbox sizing; a pod without gets the configured size.
#[test]
fn a_kata_pods_vm_is_sized_by_its_containers_limits() {
    let cd = containerd(KATA_RUNTIME);
    let mut sized = cd.pod("sized", KATA_HANDLER);
    // 384 MiB; CPUs as well (capped at the host's: one in the test host).
    sized.extra = ["--pod-memory", "402653184", "--pod-cpu-quota", "150000"]
        .into_iter()
        .chain(["--pod-cpu-period", "100000"])
        .map(String::from)
        .collect();
    let plain = cd.pod("plain", KATA_HANDLER);
    for (pod, mib) in [(&sized, 256 + 384), (&plain, 256)] {
        let pod_id = cd.run_pod(pod).unwrap();
        let sleeper = cd
            .create_container(&pod_id, pod, "sleeper", &[], &["sleep", "100000"])
            .unwrap();
        cd.cri(&["start", &sleeper]).unwrap();
        assert_guest_memory(mem_total_kib(&cd, &sleeper), mib, &pod.name);
        cd.cri(&["stopp", &pod_id]).unwrap();
        cd.cri(&["rmp", &pod_id]).unwrap();
    }
    cd.assert_nothing_left();
}

/// The harness itself: what a test leaves running is reported, with its
/// shim, mounts and cgroup, and the teardown still removes it all.
#[test]
fn leftovers_are_reported_and_torn_down() {
    let mut cd = containerd(RUNC_RUNTIME);
    let id = cd.id("forgotten");
    cd.ctr_ok(&["run", "-d", IMAGE, &id, "sleep", "100000"])
        .unwrap();
    let pod = cd.pod("forgotten", RUNC_HANDLER);
    let pod_id = cd.run_pod(&pod).unwrap();
    let left = cd.leftovers().unwrap();
    let has = |prefix: &str, needle: &str| {
        left.iter()
            .any(|l| l.starts_with(prefix) && l.contains(needle))
    };
    for (prefix, needle) in [
        ("task:", id.as_str()),
        ("container:", id.as_str()),
        ("container:", pod_id.as_str()),
        ("process:", "containerd-shim-runc-v2"),
        ("process:", "sleep 100000"),
        ("mount:", "rootfs"),
        ("cgroup:", id.as_str()),
    ] {
        assert!(has(prefix, needle), "no {prefix} {needle} in {left:#?}");
    }
    cd.stop().unwrap();
    let left = cd.leftovers().unwrap();
    assert!(left.is_empty(), "{left:#?}");
    // The CRI log directory went with the instance's directory.
    let gone = host()
        .run(&["test", "-e", &pod.log_dir], b"", TIMEOUT)
        .unwrap();
    assert_eq!(gone.status, ExitStatus::Code(1));
}
