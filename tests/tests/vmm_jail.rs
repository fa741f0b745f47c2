//! The VMM's confinement (docs/design/vmm-jail.md), checked from outside on
//! running VMs (inside the KVM test host on PVM machines): the jailed VMM
//! of `microvm run` and of a CRI pod has its own namespaces, a root holding
//! none of the host's files, seccomp and no_new_privs on every thread, only
//! the file server's capabilities, and its cgroup (the pod's); a forbidden
//! system call from any kind of thread kills it, is named, and leaves
//! nothing behind.

use std::collections::BTreeMap;
use std::time::Duration;

use microvm_tests::containerd::{Containerd, Options, IMAGE, KATA_HANDLER, KATA_RUNTIME};
use microvm_tests::{vm_host, workspace_binary, ExitStatus, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

fn microvm() -> String {
    workspace_binary("microvm").unwrap().display().to_string()
}

const TIMEOUT: Duration = Duration::from_secs(400);

/// The capabilities of a virtio-fs thread (CHOWN, DAC_OVERRIDE,
/// DAC_READ_SEARCH, FOWNER, FSETID, SETGID, SETUID, SETFCAP), as /proc
/// shows them.
const FS_CAPS: &str = "00000000800000df";
const NO_CAPS: &str = "0000000000000000";

/// A shell function: `probe MARKER` waits for the jailed VMM whose command
/// line holds MARKER (the PID 1 of its PID namespace, once its main thread
/// is confined), then prints what the host sees of it, one fact a line.
const PROBE: &str = r#"
probe() {
    marker=$1; vmm=; sup=
    for i in $(seq 1 1500); do
        for p in $(pgrep -x microvm-vmm); do
            grep -qa -- "$marker" /proc/$p/cmdline 2>/dev/null || continue
            case "$(grep NSpid: /proc/$p/status)" in
                *"	1") vmm=$p;;
                *) sup=$p;;
            esac
        done
        [ -n "$vmm" ] && grep -q "^Seccomp:	2" /proc/$vmm/status 2>/dev/null && break
        sleep 0.2
    done
    [ -n "$vmm" ] || { echo "no jailed VMM for $marker"; return; }
    for t in /proc/$vmm/task/*; do
        echo "thread $(cat $t/comm) $(grep -E '^(CapEff|CapPrm|CapBnd|Seccomp|NoNewPrivs):' $t/status | tr '\t\n' '  ')"
    done
    echo "supervisor $(grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/$sup/status | tr '\t\n' '  ')"
    for t in /proc/$vmm/task/*; do
        for ns in mnt pid net ipc uts; do
            [ "$(readlink $t/ns/$ns)" = "$(readlink /proc/1/ns/$ns)" ] && echo "same-ns $(cat $t/comm) $ns"
        done
    done
    # No descriptor into the host's proc (from it, `..` leads everywhere).
    host_proc=$(stat -c %d /proc/self/)
    for fd in /proc/$vmm/fd/*; do
        [ "$(stat -L -c %d $fd 2>/dev/null)" = "$host_proc" ] && echo "host-proc-fd $fd $(readlink $fd)"
    done
    echo "root $(ls -A /proc/$vmm/root | tr '\n' ' ')"
    echo "vsock-dir $(ls -A /proc/$vmm/root/vsock | tr '\n' ' ')"
    for f in /etc/shadow /etc /home /run/containerd /usr /sys /dev/kvm /proc/sys /proc/sysrq-trigger; do
        [ -e /proc/$vmm/root$f ] && echo "visible $f"
    done
    echo "cgroup $(grep '^0::' /proc/$vmm/cgroup | cut -d: -f3)"
    echo "supervisor-cgroup $(grep '^0::' /proc/$sup/cgroup | cut -d: -f3)"
}
"#;

/// What [`PROBE`] printed, by first word (lines of a word joined).
fn facts(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut facts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        facts
            .entry(word.to_string())
            .or_default()
            .push(rest.trim().to_string());
    }
    facts
}

/// A field of a `thread` or `supervisor` line: `CapEff:` → its value.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == name {
            return words.next().unwrap_or("");
        }
    }
    ""
}

/// Asserts the jail as seen from outside, and returns the VMM's cgroup.
fn assert_jailed(text: &str) -> String {
    let facts = facts(text);
    let threads = facts.get("thread").cloned().unwrap_or_default();
    assert!(!threads.is_empty(), "no jailed VMM found:\n{text}");
    let mut kinds = Vec::new();
    for line in &threads {
        let name = line.split_whitespace().next().unwrap_or("");
        kinds.push(name.to_string());
        assert_eq!(field(line, "Seccomp:"), "2", "thread {line}\n{text}");
        assert_eq!(field(line, "NoNewPrivs:"), "1", "thread {line}\n{text}");
        let caps = if name == "virtio-fs" {
            FS_CAPS
        } else {
            NO_CAPS
        };
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(line, set), caps, "{set} of thread {line}\n{text}");
        }
    }
    for kind in ["microvm-vmm", "vcpu0", "devices", "virtio-fs"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} thread: {kinds:?}\n{text}"
        );
    }
    let supervisor = &facts["supervisor"][0];
    assert_eq!(field(supervisor, "CapEff:"), NO_CAPS, "{text}");
    assert_eq!(field(supervisor, "CapBnd:"), NO_CAPS, "{text}");
    assert!(
        !facts.contains_key("same-ns"),
        "namespaces shared with the host: {:?}\n{text}",
        facts.get("same-ns")
    );
    assert!(
        !facts.contains_key("host-proc-fd"),
        "descriptors into the host's /proc: {:?}\n{text}",
        facts.get("host-proc-fd")
    );
    assert!(
        !facts.contains_key("visible"),
        "host paths visible in the VMM's root: {:?}\n{text}",
        facts.get("visible")
    );
    let root: Vec<&str> = facts["root"][0].split_whitespace().collect();
    assert_eq!(root, ["fs", "proc", "vsock"], "the jail's root\n{text}");
    // Of the state directory, only the vsock socket's own directory.
    let vsock: Vec<&str> = facts["vsock-dir"][0].split_whitespace().collect();
    assert_eq!(vsock, ["vsock.sock"], "the jail's /vsock\n{text}");
    let cgroup = facts["cgroup"][0].clone();
    assert_eq!(
        facts["supervisor-cgroup"][0], cgroup,
        "the supervisor and the VMM share the cgroup\n{text}"
    );
    cgroup
}

/// `microvm run`'s VMM: jailed, in a cgroup of its own that goes with it.
#[test]
fn jailed_microvm_run_vmm_sees_no_host_files_and_holds_no_privilege() {
    let script = format!(
        "{PROBE}
        export MICROVM_AGENT_TIMEOUT=120
        {microvm} run -- sh -c 'trap \"exit 0\" TERM; echo started; sleep 300 & wait' >/tmp/jailed-run.out &
        run=$!
        probe microvm-$run-
        # SIGTERM once the command runs: forwarded to it, it exits 0.
        for i in $(seq 1 600); do grep -q started /tmp/jailed-run.out && break; sleep 0.2; done
        kill -TERM $run; wait $run; echo \"exit $?\"
        for p in $(pgrep -x microvm-vmm); do
            grep -qa -- microvm-$run- /proc/$p/cmdline && echo \"left-process $p\"
        done
        ls -d /sys/fs/cgroup/microvm/microvm-$run-* 2>/dev/null | sed 's/^/left-cgroup /'
        true",
        microvm = microvm()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    eprintln!("{text}{}", out.stderr_text());
    let cgroup = assert_jailed(&text);
    assert!(
        cgroup.starts_with("/microvm/microvm-"),
        "the VMM's cgroup: {cgroup}\n{text}"
    );
    let facts = facts(&text);
    assert_eq!(facts.get("exit"), Some(&vec!["0".to_string()]), "{text}");
    assert!(
        !facts.contains_key("left-process") && !facts.contains_key("left-cgroup"),
        "left behind: {:?} {:?}",
        facts.get("left-process"),
        facts.get("left-cgroup")
    );
}

/// A CRI pod's VMM: jailed, and in the pod's cgroup (the sandbox's
/// `linux.cgroupsPath`, under the pod's cgroup parent), which goes with
/// the pod.
#[test]
fn pod_vmm_is_jailed_and_runs_in_the_pods_cgroup() {
    let cd = containerd(&[]);
    let pod = cd.pod("jailed", KATA_HANDLER);
    let pod_id = cd.run_pod(&pod).unwrap();
    let out = cd
        .sh(&format!("{PROBE}\nprobe {pod_id}"), b"", TIMEOUT)
        .unwrap();
    let text = out.stdout_text();
    eprintln!("{text}{}", out.stderr_text());
    let cgroup = assert_jailed(&text);
    assert!(
        cgroup.starts_with(&format!("{}/", cd.pod_cgroup_parent())),
        "the VMM's cgroup {cgroup} is not under the pod's parent {}",
        cd.pod_cgroup_parent()
    );
    cd.cri(&["stopp", &pod_id]).unwrap();
    cd.cri(&["rmp", &pod_id]).unwrap();
    let left = cd
        .sh(
            &format!("test -e /sys/fs/cgroup{cgroup} && echo left"),
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        left.stdout_text(),
        "",
        "the pod's VMM cgroup {cgroup} is left"
    );
    cd.assert_nothing_left();
}

fn containerd(env: &[(&str, &str)]) -> Containerd<'static> {
    let mut options = Options::new(env!("CARGO_BIN_EXE_cri"));
    if let Err(e) = options.require_shim(KATA_RUNTIME) {
        panic!("the kata tests cannot run: {e:#}");
    }
    options
        .env
        .extend(env.iter().map(|&(k, v)| (k.to_string(), v.to_string())));
    Containerd::start_for_test(host(), options)
}

/// Each kind of VMM thread, made to call outside its list (the VMM's test
/// hook), kills the VMM at once; `microvm run` fails naming the filter,
/// the system call (getppid, 110) and the thread; nothing is left.
#[test]
fn each_thread_kind_is_killed_by_a_call_outside_its_list() {
    let kinds = [
        ("main", "microvm-vmm"),
        ("vcpu", "vcpu0"),
        ("devices", "devices"),
        ("fs", "virtio-fs"),
    ];
    let script = format!(
        "export MICROVM_AGENT_TIMEOUT=120
        for k in {kinds}; do
            ( MICROVM_TEST_SECCOMP_VIOLATION=$k {microvm} run -- true >/tmp/violation-$k 2>&1
              echo \"exit $?\" >>/tmp/violation-$k ) &
            eval pid_$k=$!
        done
        wait
        for k in {kinds}; do echo \"== $k\"; cat /tmp/violation-$k; done
        echo '== left'
        for p in $(pgrep -x microvm-vmm); do
            for k in {kinds}; do
                eval run=\\$pid_$k
                grep -qa -- microvm-$run- /proc/$p/cmdline && echo \"process $k $p\"
            done
        done
        for k in {kinds}; do
            eval run=\\$pid_$k
            ls -d /sys/fs/cgroup/microvm/microvm-$run-* /tmp/microvm-$run-* 2>/dev/null
        done
        true",
        kinds = kinds.map(|(k, _)| k).join(" "),
        microvm = microvm()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    eprintln!("{text}{}", out.stderr_text());
    let mut sections = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            current = name.to_string();
            sections.insert(current.clone(), String::new());
        } else if let Some(section) = sections.get_mut(&current) {
            section.push_str(line);
            section.push('\n');
        }
    }
    for (kind, thread) in kinds {
        let section = sections.get(kind).cloned().unwrap_or_default();
        assert!(
            !section.contains("exit 0\n"),
            "{kind}: microvm run succeeded\n{section}"
        );
        let expected = format!(
            "the VMM was killed by its seccomp filter: system call 110 in thread \"{thread}\""
        );
        assert!(
            section.contains(&expected),
            "{kind}: expected {expected:?} in\n{section}"
        );
    }
    assert_eq!(sections.get("left").map(String::as_str), Some(""), "{text}");
}

/// A pod whose VMM is killed by its seccomp filter while its task runs:
/// the task ends with status 255, the shim's log says why, and deleting it
/// leaves nothing behind.
#[test]
fn a_forbidden_system_call_kills_the_vmm_and_ends_the_pod() {
    // Long enough for the task to start in a TCG test host first.
    let cd = containerd(&[("MICROVM_TEST_SECCOMP_VIOLATION", "devices@45")]);
    let id = cd.id("seccomp");
    let started = std::time::Instant::now();
    cd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        KATA_RUNTIME,
        IMAGE,
        &id,
        "sleep",
        "100000",
    ])
    .unwrap_or_else(|e| {
        panic!(
            "the task did not start within {:?} (the VMM is killed after 45 s): {e:#}",
            started.elapsed()
        )
    });
    let out = cd
        .sh(
            &format!("$CTR task attach {id} </dev/null >/dev/null 2>&1; echo \"status $?\""),
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        out.stdout_text().trim(),
        "status 255",
        "{}",
        out.stderr_text()
    );
    let log = cd.log().unwrap();
    assert!(
        log.contains("killed by its seccomp filter: system call 110 in thread"),
        "containerd's log does not say why the VM died:\n{}",
        cd.log_tail()
    );
    cd.ctr(&["task", "rm", &id]).unwrap();
    cd.ctr_ok(&["container", "rm", &id]).unwrap();
    cd.assert_nothing_left();
}

/// The switch for debugging: `--seccomp off` runs without filters (the
/// test hook's forbidden call goes through) and says so.
#[test]
fn seccomp_off_warns_and_still_runs() {
    let microvm = microvm();
    let out = host()
        .run(
            &[
                "env",
                "MICROVM_AGENT_TIMEOUT=120",
                "MICROVM_TEST_SECCOMP_VIOLATION=vcpu",
                &microvm,
                "run",
                "--seccomp",
                "off",
                "--",
                "echo",
                "unfiltered",
            ],
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        (out.status, out.stdout_text().as_str()),
        (ExitStatus::Code(0), "unfiltered\n"),
        "{}",
        out.stderr_text()
    );
    assert!(
        out.stderr_text().contains("seccomp filters are off"),
        "no warning: {}",
        out.stderr_text()
    );
}

/// SIGTERM to `microvm run` while its VM boots: held until the command
/// runs, then given to it; the VM, its cgroup and its state go as usual.
#[test]
fn sigterm_during_boot_leaves_no_cgroup_or_state() {
    let script = format!(
        "export MICROVM_AGENT_TIMEOUT=120
        {microvm} run -- sleep 20 &
        run=$!
        sleep 0.5; kill -TERM $run; wait $run; echo \"exit $?\"
        ls -d /sys/fs/cgroup/microvm/microvm-$run-* /tmp/microvm-$run-* 2>/dev/null | sed 's/^/left /'
        for p in $(pgrep -x microvm-vmm); do
            grep -qa -- microvm-$run- /proc/$p/cmdline && echo \"left process $p\"
        done
        true",
        microvm = microvm()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    // The command, PID 1 of its container without a handler, outlives the
    // forwarded SIGTERM and ends after its 20 s; the run then ends and
    // leaves nothing.
    assert!(
        text.lines().any(|l| l.starts_with("exit ")),
        "{text}{}",
        out.stderr_text()
    );
    assert!(
        !text.contains("left"),
        "left behind: {text}{}",
        out.stderr_text()
    );
}
