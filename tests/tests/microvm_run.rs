//! `microvm run` end to end: a real KVM microVM (our VMM, our guest kernel,
//! our agent as PID 1) runs the command; output, stdin, exit codes and
//! failures must come through as from a local shell. On PVM machines these run
//! inside the KVM test host.

use std::time::{Duration, Instant};

use microvm_tests::{vm_host, workspace_binary, ExitStatus, Output, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

fn microvm() -> String {
    workspace_binary("microvm").unwrap().display().to_string()
}

const TIMEOUT: Duration = Duration::from_secs(300);

/// Inside the nested test host (guests under KVM emulated by TCG) a boot
/// under load can take tens of seconds; on real hardware the default holds.
const AGENT_TIMEOUT: &str = "MICROVM_AGENT_TIMEOUT=120";

/// `microvm run [flags] -- argv`, with stdin, where VMs can run.
fn run(flags: &[&str], argv: &[&str], stdin: &[u8]) -> Output {
    let microvm = microvm();
    let mut command = vec!["env", AGENT_TIMEOUT, microvm.as_str(), "run"];
    command.extend_from_slice(flags);
    command.push("--");
    command.extend_from_slice(argv);
    host().run(&command, stdin, TIMEOUT).unwrap()
}

/// A shell command where VMs can run (for setups that need a pipeline).
fn sh(script: &str) -> Output {
    let script = format!("export {AGENT_TIMEOUT}; {script}");
    host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap()
}

#[test]
fn echo_round_trip() {
    let out = run(&[], &["echo", "hello from the guest"], b"");
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "stderr: {}",
        out.stderr_text()
    );
    assert_eq!(out.stdout_text(), "hello from the guest\n");
}

/// The guest's loopback is up: a container reaches itself on localhost.
#[test]
fn localhost_works_in_the_container() {
    let out = run(
        &[],
        &[
            "sh",
            "-c",
            "mkdir /tmp/www; echo ping > /tmp/www/index.html; \
             httpd -p 127.0.0.1:8080 -h /tmp/www && wget -qO- http://127.0.0.1:8080/index.html",
        ],
        b"",
    );
    assert_eq!(
        (out.status, out.stdout_text().as_str()),
        (ExitStatus::Code(0), "ping\n"),
        "stderr: {}",
        out.stderr_text()
    );
}

#[test]
fn exit_codes_pass_through() {
    // Exit 0 is covered by every other test.
    let out = run(&[], &["sh", "-c", "echo out; echo err >&2; exit 42"], b"");
    assert_eq!(
        out.status,
        ExitStatus::Code(42),
        "stderr: {}",
        out.stderr_text()
    );
    assert_eq!(out.stdout_text(), "out\n");
    assert!(
        out.stderr_text().ends_with("err\n"),
        "{}",
        out.stderr_text()
    );
}

#[test]
fn death_by_signal_is_128_plus_the_signal() {
    // In the guest itself: a container's init is PID 1 of its namespace,
    // which the kernel shields from its own SIGKILL (as with runc).
    let out = run(&["--guest"], &["sh", "-c", "kill -KILL $$"], b"");
    assert_eq!(
        out.status,
        ExitStatus::Code(137),
        "stderr: {}",
        out.stderr_text()
    );
}

/// A child of the command killed by the OOM killer is reported as such,
/// naming it, while the command itself goes on and its exit status passes
/// through: nothing claims the command died.
#[test]
fn an_oom_kill_of_a_child_is_not_reported_as_the_commands_death() {
    let out = run(
        &["--memory", "128"],
        &[
            "sh",
            "-c",
            "head -c 400m /dev/zero | tail > /dev/null; echo survived $?",
        ],
        b"",
    );
    let stderr = out.stderr_text();
    assert_eq!(
        (out.status, out.stdout_text().as_str()),
        (ExitStatus::Code(0), "survived 137\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the OOM killer ended tail (pid "),
        "the victim is not named: {stderr}"
    );
    assert!(
        stderr.contains("went on and exited with status 0"),
        "{stderr}"
    );
    assert!(!stderr.contains("was killed"), "{stderr}");
}

#[test]
fn a_missing_command_exits_127_with_a_message() {
    let out = run(&[], &["/no/such/program"], b"");
    assert_eq!(out.status, ExitStatus::Code(127));
    assert!(
        out.stderr_text().contains("/no/such/program"),
        "{}",
        out.stderr_text()
    );
}

#[test]
fn ten_mib_of_stdin_round_trips_byte_identical() {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let input: Vec<u8> = (0..10 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let out = run(&[], &["cat"], &input);
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "stderr: {}",
        out.stderr_text()
    );
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat returned different bytes");
}

#[test]
fn output_streams_while_the_command_runs() {
    // The first line must leave the VM long before the command ends.
    let script = format!(
        "{} run -- sh -c 'echo first; sleep 5; echo second' | while read line; do echo \"$(date +%s) $line\"; done",
        microvm()
    );
    let out = sh(&script);
    let stamps: Vec<u64> = out
        .stdout_text()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(stamps.len(), 2, "{}", out.stdout_text());
    assert!(
        stamps[1] - stamps[0] >= 4,
        "output was not streamed: {}",
        out.stdout_text()
    );
}

#[test]
fn four_concurrent_runs_do_not_interfere() {
    let threads: Vec<_> = (0..4)
        .map(|id| {
            std::thread::spawn(move || {
                let script = format!("for i in $(seq 1 100); do echo {id}-$i; done; exit {id}");
                run(&["--cpus", "1"], &["sh", "-c", &script], b"")
            })
        })
        .collect();
    for (id, thread) in threads.into_iter().enumerate() {
        let out = thread.join().unwrap();
        assert_eq!(
            out.status,
            ExitStatus::Code(id as i32),
            "stderr: {}",
            out.stderr_text()
        );
        let expected: String = (1..=100).map(|i| format!("{id}-{i}\n")).collect();
        assert_eq!(out.stdout_text(), expected);
    }
}

#[test]
fn missing_or_corrupt_assets_are_named() {
    let out = run(&["--kernel", "/nonexistent/vmlinux"], &["true"], b"");
    assert_ne!(out.status, ExitStatus::Code(0));
    assert!(
        out.stderr_text().contains("/nonexistent/vmlinux"),
        "{}",
        out.stderr_text()
    );
    let out = run(&["--initrd", "/nonexistent/initrd.cpio"], &["true"], b"");
    assert_ne!(out.status, ExitStatus::Code(0));
    assert!(
        out.stderr_text().contains("/nonexistent/initrd.cpio"),
        "{}",
        out.stderr_text()
    );
    let out = sh(&format!(
        "echo 'not a kernel' > /tmp/corrupt-vmlinux; {} run --kernel /tmp/corrupt-vmlinux -- true",
        microvm()
    ));
    assert_ne!(out.status, ExitStatus::Code(0));
    assert!(
        out.stderr_text().contains("ELF vmlinux"),
        "{}",
        out.stderr_text()
    );
}

#[test]
fn no_kvm_device_is_one_clear_line() {
    let out = sh(&format!(
        "MICROVM_KVM_DEVICE=/nonexistent/kvm {} run -- true",
        microvm()
    ));
    assert_ne!(out.status, ExitStatus::Code(0));
    assert!(
        out.stderr_text()
            .contains("/nonexistent/kvm does not exist"),
        "{}",
        out.stderr_text()
    );
}

#[test]
fn help_is_usage_on_stdout_and_a_bad_option_is_named() {
    // No VM: runs on this machine itself.
    let run = |args: &[&str]| {
        std::process::Command::new(microvm())
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["run", "--help"][..],
        &["run", "-e", "A=1", "-h"],
        &["ctl", "--help"],
    ] {
        let out = run(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(stdout.starts_with("usage: microvm"), "{args:?}: {stdout}");
    }
    let out = run(&["run", "--bogus", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown option --bogus"),
        "{out:?}"
    );
}

#[test]
fn a_pvm_host_refuses_a_non_pvm_kernel_up_front() {
    // This one runs on this machine itself, not in the test host.
    if microvm_tests::Kvm::detect() != microvm_tests::Kvm::Pvm {
        eprintln!("not a PVM host: the PVM refusal is covered by vmm's unit tests only");
        return;
    }
    let output = std::process::Command::new(microvm())
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("PVM") && stderr.contains("CONFIG_PVM_GUEST"),
        "{stderr}"
    );
}

#[test]
fn a_guest_kernel_panic_ends_the_run_promptly() {
    let started = Instant::now();
    let out = run(&["--kernel-cmdline", "rdinit=/nonexistent"], &["true"], b"");
    assert_ne!(out.status, ExitStatus::Code(0));
    assert!(out.stderr_text().contains("VM"), "{}", out.stderr_text());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_killed_vmm_ends_the_run_with_an_error() {
    // A private TMPDIR names this run's VMM (its vsock path is under it).
    let script = format!(
        "dir=$(mktemp -d); TMPDIR=$dir {} run -- sh -c 'sleep 300' & \
         for i in $(seq 1 300); do pid=$(pgrep -f \"microvm-vmm.*$dir\") && break; sleep 0.1; done; \
         sleep 2; kill -9 $pid; start=$(date +%s); wait $!; rc=$?; end=$(date +%s); rm -rf $dir; \
         echo \"rc=$rc took=$((end-start))\"",
        microvm()
    );
    let out = sh(&script);
    let text = out.stdout_text();
    assert!(
        text.contains("rc=") && !text.contains("rc=0"),
        "{text} / {}",
        out.stderr_text()
    );
    let took: u64 = text.trim().rsplit("took=").next().unwrap().parse().unwrap();
    assert!(took <= 10, "microvm run took {took} s to notice");
    assert!(out.stderr_text().contains("VM"), "{}", out.stderr_text());
}

/// A guest that stops answering while its VMM lives on (here the VMM is
/// stopped with SIGSTOP) is found by the agent's health checks: the run
/// fails saying so, the VMM is killed and nothing of the run is left.
#[test]
fn a_stuck_guest_is_found_and_its_vm_killed() {
    let script = format!(
        "dir=$(mktemp -d); \
         TMPDIR=$dir MICROVM_AGENT_UNRESPONSIVE=6 {m} run -- sh -c 'echo running; sleep 300' \
           > $dir/out 2> $dir/err & \
         for i in $(seq 1 1200); do grep -q running $dir/out && break; sleep 0.1; done; \
         pid=$(pgrep -f \"microvm-vmm.*$dir\"); kill -STOP $pid; start=$(date +%s); \
         wait $!; rc=$?; end=$(date +%s); cat $dir/err >&2; \
         echo \"rc=$rc took=$((end-start))\"; [ -e /proc/$pid ] && echo vmm-left; \
         echo leftovers: $(ls -A $dir | grep -vx -e out -e err); rm -rf $dir",
        m = microvm()
    );
    let out = sh(&script);
    let (text, errors) = (out.stdout_text(), out.stderr_text());
    assert!(
        text.contains("rc=") && !text.contains("rc=0"),
        "{text} / {errors}"
    );
    assert!(
        errors.contains("did not answer a health check for 6 s")
            && errors.contains("its VM was killed"),
        "{errors}"
    );
    // One check interval (3 s) and the 6 s limit, with room for a loaded host.
    let took: u64 = text
        .split("took=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!((5..=40).contains(&took), "found stuck after {took} s");
    assert!(!text.contains("vmm-left"), "{text}");
    assert!(text.contains("leftovers:\n"), "{text}");
}

#[test]
fn eight_runs_leave_nothing_behind() {
    let script = format!(
        "set -u; dir=$(mktemp -d); export TMPDIR=$dir; \
         for i in $(seq 1 8); do \
           case $((i % 4)) in \
             0) {m} run -- true ;; 1) {m} run -- sh -c 'exit 3' ;; \
             2) {m} run -- /missing ;; 3) {m} run --kernel /missing -- true ;; \
           esac >/dev/null 2>&1; \
         done; \
         echo leftover-files: $(ls -A $dir | wc -l); \
         echo leftover-vmms: $(pgrep -f \"microvm-vmm.*$dir\" | wc -l); rm -rf $dir",
        m = microvm()
    );
    let out = sh(&script);
    let text = out.stdout_text();
    assert!(text.contains("leftover-files: 0"), "{text}");
    assert!(text.contains("leftover-vmms: 0"), "{text}");
}

#[test]
fn sigterm_to_microvm_reaches_the_command() {
    // The command traps TERM and exits 7: only a forwarded signal gives 7
    // (microvm itself dying of SIGTERM would give 143).
    let script = format!(
        "{} run -- sh -c 'trap \"exit 7\" TERM; echo ready; while :; do sleep 0.2; done' > $$.out & pid=$!; \
         for i in $(seq 1 600); do grep -q ready $$.out 2>/dev/null && break; sleep 0.1; done; \
         kill -TERM $pid; wait $pid; echo rc=$?; rm -f $$.out",
        microvm()
    );
    let out = sh(&script);
    assert!(
        out.stdout_text().contains("rc=7"),
        "{} / {}",
        out.stdout_text(),
        out.stderr_text()
    );
}

/// `--net`: the container has eth0 = 10.201.N.2/30 with a default route via
/// the host end `mvh<pid>` (10.201.N.1), MTU 1500, the host's resolv.conf
/// read-only; what it sends to the host end arrives; afterwards its
/// `mvh<pid>` is gone (only its own is counted: another test's may still be
/// going away).
#[test]
fn net_gives_the_container_a_nic_to_the_host() {
    let guest = "ip -o -4 addr show eth0; ip route; cat /sys/class/net/eth0/mtu; \
                 gw=$(ip route | sed -n \"s/^default via \\([0-9.]*\\).*/\\1/p\"); \
                 echo hello-from-the-guest | nc $gw 47123; \
                 (echo x >> /etc/resolv.conf) 2>/dev/null && echo resolv-writable; \
                 echo --resolv--; cat /etc/resolv.conf";
    let script = format!(
        "set -u; d=$(mktemp -d); \
         timeout 250 busybox nc -l -p 47123 > $d/got & listener=$!; sleep 0.5; \
         {m} run --net -- sh -c '{guest}' > $d/out 2> $d/err & run=$!; wait $run; echo rc=$?; \
         wait $listener; echo got=$(cat $d/got); \
         cat $d/out; cat $d/err >&2; \
         sed -n '/^--resolv--$/,$p' $d/out | tail -n +2 | cmp -s - /etc/resolv.conf && echo resolv-same; \
         echo leftover-links: $(ip -o link show | grep -c \": mvh$run\"); rm -rf $d",
        m = microvm()
    );
    let out = sh(&script);
    let text = out.stdout_text();
    let why = format!("{text} / {}", out.stderr_text());
    assert!(text.contains("rc=0"), "{why}");
    let address = text
        .lines()
        .find(|l| l.contains("eth0") && l.contains("inet "))
        .unwrap_or_else(|| panic!("no IPv4 address on eth0: {why}"));
    assert!(
        address.contains("inet 10.201.") && address.contains("/30"),
        "{why}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("default via 10.201.") && l.contains("eth0")),
        "{why}"
    );
    assert!(text.lines().any(|l| l.trim() == "1500"), "{why}");
    assert!(text.contains("got=hello-from-the-guest"), "{why}");
    assert!(!text.contains("resolv-writable"), "{why}");
    assert!(text.contains("resolv-same"), "{why}");
    assert!(text.contains("leftover-links: 0"), "{why}");
}

/// `--net` after a SIGKILL of microvm: the anonymous namespace dies with
/// it (the VMM too, by PDEATHSIG), taking the veth pair and so `mvh<pid>`.
#[test]
fn net_leaves_no_link_when_microvm_is_killed() {
    let script = format!(
        "set -u; {m} run --net -- sh -c 'echo ready; sleep 600' > $$.out 2>&1 & pid=$!; \
         for i in $(seq 1 1200); do grep -q ready $$.out 2>/dev/null && break; sleep 0.1; done; \
         echo links-while-running: $(ip -o link show | grep -c \": mvh$pid\"); \
         kill -KILL $pid; wait $pid; \
         for i in $(seq 1 100); do ip -o link show | grep -q \": mvh$pid\" || break; sleep 0.1; done; \
         echo leftover-links: $(ip -o link show | grep -c \": mvh$pid\"); rm -f $$.out",
        m = microvm()
    );
    let out = sh(&script);
    let text = out.stdout_text();
    assert!(
        text.contains("links-while-running: 1"),
        "{text} / {}",
        out.stderr_text()
    );
    assert!(
        text.contains("leftover-links: 0"),
        "{text} / {}",
        out.stderr_text()
    );
}

/// A command starts as under runc: no signal blocked or ignored (the
/// agent blocks SIGCHLD for its reaper and Rust ignores SIGPIPE; neither
/// may leak), so a shell's `wait` for a background job returns.
#[test]
fn the_command_starts_with_default_signals() {
    let probe = "grep -E '^Sig(Blk|Ign):' /proc/self/status; sleep 1 & wait; echo waited";
    for flags in [&[][..], &["--guest"][..]] {
        let out = run(flags, &["sh", "-c", probe], b"");
        assert_eq!(
            out.stdout_text(),
            "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nwaited\n",
            "{flags:?}: {}",
            out.stderr_text()
        );
    }
}
