//! OCI containers in microVMs behave like runc: one bundle (the default
//! busybox rootfs + a config.json written here) runs under Debian's runc,
//! the reference, and under `microvm run --bundle` in a real KVM guest, in
//! one script where VMs can run (inside the test host on PVM machines).
//! Their outputs must match apart from what belongs to the kernel (the
//! guest's memory size shows in `ulimit -i/-u`).

use std::time::Duration;

use microvm_tests::{artifact, vm_host, workspace_binary, Output, VmHost};
use oci_spec::runtime::Spec;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(300);
const AGENT_TIMEOUT: &str = "MICROVM_AGENT_TIMEOUT=120";
const RUNC_MARK: &str = "=== runc";
const MICROVM_MARK: &str = "=== microvm";

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

fn microvm() -> String {
    workspace_binary("microvm").unwrap().display().to_string()
}

/// runc's default spec (`runc spec`, as oci-spec builds it) running `script`.
fn base_spec(script: &str) -> Value {
    let mut spec = serde_json::to_value(Spec::default()).unwrap();
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["sh", "-c", script]);
    spec["hostname"] = json!("box");
    spec
}

/// Runs the bundle under runc, then under microvm; returns both outputs
/// (each with its exit status as a last `rc=N` line).
fn runc_and_microvm(spec: &Value) -> (String, String, Output) {
    let rootfs = artifact("busybox-rootfs").unwrap();
    let config = serde_json::to_string_pretty(spec).unwrap();
    let script = format!(
        "set -u; export {AGENT_TIMEOUT}; b=$(mktemp -d); chmod 755 $b; mkdir $b/rootfs; cp -a {rootfs}/. $b/rootfs/; \
         cat > $b/config.json <<'CONFIG_JSON'\n{config}\nCONFIG_JSON\n\
         echo '{RUNC_MARK}'; runc run -b $b runc-$$ 2>&1; echo rc=$?; runc delete -f runc-$$ >/dev/null 2>&1; \
         echo '{MICROVM_MARK}'; {microvm} run --bundle $b 2>&1; echo rc=$?; rm -rf $b",
        rootfs = rootfs.display(),
        microvm = microvm(),
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    let runc_at = text.find(RUNC_MARK).expect("runc ran");
    let microvm_at = text.find(MICROVM_MARK).expect("microvm ran");
    let runc = text[runc_at + RUNC_MARK.len()..microvm_at]
        .trim()
        .to_string();
    let microvm = text[microvm_at + MICROVM_MARK.len()..].trim().to_string();
    (runc, microvm, out)
}

/// Lines that belong to the kernel and its memory size, not the container.
///
/// It also drops the masks of /proc files the stripped guest kernel does not
/// have (no ACPI, no /proc/kcore, no sysrq), which runc masks on the test
/// host's stock kernel.
fn without_kernel_identity(text: &str) -> String {
    const ABSENT_IN_GUEST: [&str; 3] = ["/proc/acpi ", "/proc/kcore ", "/proc/sysrq-trigger "];
    text.lines()
        .filter(|line| {
            !line.starts_with("pending signals") && !line.starts_with("max user processes")
        })
        .filter(|line| !ABSENT_IN_GUEST.iter().any(|path| line.starts_with(path)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same(spec: &Value) -> String {
    let (runc, microvm, out) = runc_and_microvm(spec);
    assert_eq!(
        without_kernel_identity(&microvm),
        without_kernel_identity(&runc),
        "microvm (left) differs from runc (right); stderr: {}",
        out.stderr_text()
    );
    runc
}

#[test]
fn identity_env_capabilities_limits_mounts_and_devices_match_runc() {
    let probe = "id; hostname; pwd; env | sort; \
                 grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status; ulimit -a; ls /dev; \
                 cut -d' ' -f5,6,9,11 /proc/self/mountinfo | grep -v '^/ ' | sort; \
                 touch /written 2>&1; echo pid=$$; exit 3";
    let runc = assert_same(&base_spec(probe));
    // The probes really ran: a read-only root, PID 1, exit code 3.
    assert!(runc.contains("Read-only file system"), "{runc}");
    assert!(runc.contains("pid=1"), "{runc}");
    assert!(runc.ends_with("rc=3"), "{runc}");
}

#[test]
fn a_user_with_groups_cwd_and_no_capabilities_matches_runc() {
    let mut spec = base_spec("id; pwd; grep -E '^Cap' /proc/self/status; exit 7");
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    spec["process"]["cwd"] = json!("/tmp");
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
    let runc = assert_same(&spec);
    assert!(
        runc.contains("uid=1000(user) gid=1000(user) groups=10,20"),
        "{runc}"
    );
}

#[test]
fn a_seccomp_profile_matches_runc() {
    let mut spec =
        base_spec("grep Seccomp /proc/self/status; mkdir /tmp/denied 2>&1; echo mkdir=$?");
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    });
    let runc = assert_same(&spec);
    assert!(runc.contains("Operation not permitted"), "{runc}");
}

#[test]
fn a_user_namespace_matches_runc() {
    let mut spec = base_spec(
        "id; cat /proc/self/uid_map /proc/self/gid_map; ls -ln /bin/busybox | cut -c1-30",
    );
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    let mapping = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    spec["linux"]["uidMappings"] = mapping.clone();
    spec["linux"]["gidMappings"] = mapping;
    let runc = assert_same(&spec);
    assert!(runc.contains("100000"), "{runc}");
}

#[test]
fn the_pids_limit_is_enforced_like_runc() {
    let mut spec = base_spec(
        // `read` is a builtin: reading the limit needs no fork while the
        // sleeps may still hold every pid the limit allows.
        "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done 2>&1 | head -1; read max < /sys/fs/cgroup/pids.max; echo max=$max",
    );
    spec["linux"]["resources"] = json!({"pids": {"limit": 5}});
    let runc = assert_same(&spec);
    assert!(runc.contains("can't fork"), "{runc}");
}

#[test]
fn the_memory_limit_ends_in_an_oom_kill_reported_as_such() {
    let mut spec =
        base_spec("echo start; x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived");
    spec["linux"]["resources"] = json!({"memory": {"limit": 33554432}});
    let (runc, microvm, _) = runc_and_microvm(&spec);
    assert!(runc.ends_with("rc=137"), "runc: {runc}");
    assert!(microvm.ends_with("rc=137"), "microvm: {microvm}");
    assert!(!microvm.lines().any(|l| l == "survived"), "{microvm}");
    assert!(microvm.contains("out of memory"), "microvm: {microvm}");
}

#[test]
fn sigterm_reaches_the_container_process() {
    let spec =
        base_spec("trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.2; done");
    let rootfs = artifact("busybox-rootfs").unwrap();
    let config = serde_json::to_string(&spec).unwrap();
    let script = format!(
        "export {AGENT_TIMEOUT}; b=$(mktemp -d); mkdir $b/rootfs; cp -a {rootfs}/. $b/rootfs/; \
         cat > $b/config.json <<'CONFIG_JSON'\n{config}\nCONFIG_JSON\n\
         {microvm} run --bundle $b > $b/out 2>&1 & pid=$!; \
         for i in $(seq 1 600); do grep -q ready $b/out && break; sleep 0.1; done; \
         kill -TERM $pid; wait $pid; echo rc=$?; cat $b/out; rm -rf $b",
        rootfs = rootfs.display(),
        microvm = microvm(),
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    assert!(
        text.contains("rc=9") && text.contains("got-term"),
        "{text} / {}",
        out.stderr_text()
    );
}

#[test]
fn bad_specs_are_refused_with_a_clear_error() {
    let rootfs = artifact("busybox-rootfs").unwrap();
    let mut unknown_cap = base_spec("true");
    unknown_cap["process"]["capabilities"]["bounding"] = json!(["CAP_NOT_A_CAPABILITY"]);
    let mut bad_seccomp = base_spec("true");
    bad_seccomp["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_SOMETIMES"});
    let mut missing_rootfs = base_spec("true");
    missing_rootfs["root"]["path"] = json!("no-such-rootfs");
    let cases = [
        ("{ this is not json", "not a valid OCI runtime spec"),
        (
            &*serde_json::to_string(&unknown_cap).unwrap(),
            "CAP_NOT_A_CAPABILITY",
        ),
        (
            &*serde_json::to_string(&bad_seccomp).unwrap(),
            "SCMP_ACT_SOMETIMES",
        ),
        (
            &*serde_json::to_string(&missing_rootfs).unwrap(),
            "no-such-rootfs",
        ),
    ];
    for (config, expected) in cases {
        let script = format!(
            "b=$(mktemp -d); mkdir $b/rootfs; cp -a {rootfs}/. $b/rootfs/; \
             cat > $b/config.json <<'CONFIG_JSON'\n{config}\nCONFIG_JSON\n\
             mkdir $b/state; TMPDIR=$b/state {microvm} run --bundle $b; echo rc=$?; \
             echo leftover-vmms=$(pgrep -f -c \"microvm-vmm.*$b\") leftover-files=$(ls -A $b/state | wc -l); rm -rf $b",
            rootfs = rootfs.display(),
            microvm = microvm(),
        );
        let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
        let (stdout, stderr) = (out.stdout_text(), out.stderr_text());
        assert!(stdout.contains("rc=1"), "{config}: {stdout} / {stderr}");
        assert!(
            stderr.contains(expected),
            "{config}: expected {expected:?} in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stdout.contains("leftover-vmms=0 leftover-files=0"),
            "{stdout}"
        );
    }
}

#[test]
fn the_default_rootfs_runs_with_user_flags() {
    let script = format!(
        "export {AGENT_TIMEOUT}; {m} run -e GREETING=hi -w /tmp -u 1000:1000 --hostname flags -- \
         sh -c 'echo $GREETING; pwd; id -u; hostname; touch /tmp/ok && echo writable'; echo rc=$?; \
         {m} run --read-only -- touch /x; echo rc=$?",
        m = microvm()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    assert!(
        text.starts_with("hi\n/tmp\n1000\nflags\nwritable\nrc=0\n"),
        "{text} / {}",
        out.stderr_text()
    );
    assert!(text.trim_end().ends_with("rc=1"), "{text}");
    assert!(
        out.stderr_text().contains("Read-only file system"),
        "{}",
        out.stderr_text()
    );
}

#[test]
fn a_tty_container_has_a_pty_that_follows_the_terminal_size() {
    // `script` gives microvm a terminal of a chosen size.
    let script = format!(
        "export {AGENT_TIMEOUT}; stty_cmd='stty rows 33 cols 101'; \
         script -qec \"$stty_cmd; {m} run -t -- sh -c 'tty; stty size'\" /dev/null </dev/null",
        m = microvm()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text().replace('\r', "");
    assert!(
        text.contains("/dev/pts/0"),
        "{text} / {}",
        out.stderr_text()
    );
    assert!(text.contains("33 101"), "{text}");
}

/// Runs a `microvm ctl` script in one VM with the given containers.
fn ctl(containers: &[&str], script: &str) -> Output {
    let mut command = format!("export {AGENT_TIMEOUT}; {} ctl --memory 256", microvm());
    for id in containers {
        command.push_str(&format!(" --container {id}"));
    }
    command.push_str(" <<'CTL_SCRIPT'\n");
    command.push_str(script);
    command.push_str("\nCTL_SCRIPT\n");
    host().run(&["sh", "-c", &command], b"", TIMEOUT).unwrap()
}

#[test]
fn two_containers_in_one_vm_have_their_own_pid_namespaces_and_share_the_share() {
    let out = ctl(
        &["one", "two"],
        "create one -- sleep 31\n\
         start one\n\
         create two -- sleep 30\n\
         start two\n\
         exec one e1 -- sh -c 'echo one sees init $(tr \"\\\\0\" _ < /proc/1/cmdline) boot $(cat /proc/sys/kernel/random/boot_id)'\n\
         exec two e2 -- sh -c 'echo two sees init $(tr \"\\\\0\" _ < /proc/1/cmdline) boot $(cat /proc/sys/kernel/random/boot_id)'\n\
         exec two e3 -- hostname\n\
         kill one 9\n\
         wait one\n\
         kill two 9\n\
         wait two\n\
         rm one\n\
         rm two",
    );
    let text = out.stdout_text();
    assert!(!text.contains("error:"), "{text} / {}", out.stderr_text());
    // Each sees its own init as PID 1: its own pid namespace.
    let boot_id = |who: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{who} sees")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_default()
            .to_string()
    };
    assert!(text.contains("one sees init sleep_31_"), "{text}");
    assert!(text.contains("two sees init sleep_30_"), "{text}");
    assert_eq!(boot_id("one"), boot_id("two"), "one VM: {text}");
    assert!(
        text.contains("\ntwo\n"),
        "the exec ran in two's UTS namespace: {text}"
    );
    // SIGKILL from outside ends each init (SIGTERM would be ignored: an
    // init without a handler is shielded from it, as under runc).
    assert_eq!(text.matches("exit=137 oom=false").count(), 2, "{text}");
}

#[test]
fn exec_pids_stats_pause_resume_and_update_on_a_running_container() {
    let out = ctl(
        &["c"],
        "create c -- sh -c 'while :; do sleep 0.1; done'\n\
         start c\n\
         exec c e1 -- sh -c 'echo in-container; exit 5'\n\
         pids c\n\
         update c '{\"pids\":{\"limit\":50},\"memory\":{\"limit\":67108864}}'\n\
         stats c\n\
         pause c\n\
         exec c e2 -- true\n\
         resume c\n\
         exec c e3 -- cat /sys/fs/cgroup/pids.max\n\
         exec c e4 -- /no/such/program\n\
         kill c 9 --all\n\
         wait c\n\
         rm c\n\
         pids c",
    );
    let text = out.stdout_text();
    assert!(
        text.contains("in-container\nexit=5"),
        "{text} / {}",
        out.stderr_text()
    );
    assert!(text.contains("pids="), "{text}");
    assert!(text.contains("memory.limit=67108864"), "{text}");
    assert!(text.contains("pids.limit=50"), "{text}");
    assert!(text.contains("paused"), "{text}");
    // No exec into a paused container; it works again after resume.
    assert!(
        text.contains("error: container \"c\" is paused, not running"),
        "{text}"
    );
    assert!(text.contains("50\nexit=0"), "{text}");
    assert!(text.contains("executable file not found"), "{text}");
    assert!(text.contains("exit=137"), "{text}");
    assert!(
        text.contains("error: no container \"c\""),
        "removed: {text}"
    );
}

#[test]
fn images_run_with_their_config_in_every_format() {
    let layout = artifact("busybox-oci").unwrap();
    let oci_archive = artifact("busybox-oci.tar").unwrap();
    let docker_archive = artifact("busybox-docker.tar").unwrap();
    for image in [&layout, &oci_archive, &docker_archive] {
        let script = format!(
            "export {AGENT_TIMEOUT}; {m} run --image {image} -e EXTRA=1 -- sh -c 'echo $PATH $EXTRA; pwd; id -u'; echo rc=$?; \
             echo 'echo from-cmd' | {m} run --image {image}; echo rc=$?",
            m = microvm(),
            image = image.display()
        );
        let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
        let text = out.stdout_text();
        assert!(
            text.starts_with(
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin 1\n/\n0\nrc=0\n"
            ),
            "{}: {text} / {}",
            image.display(),
            out.stderr_text()
        );
        // No command: the image's Cmd (/bin/sh) reads the script from stdin.
        assert!(
            text.ends_with("from-cmd\nrc=0\n"),
            "{}: {text}",
            image.display()
        );
    }
}

#[test]
fn a_truncated_or_missing_image_is_refused_by_name() {
    let archive = artifact("busybox-oci.tar").unwrap();
    let script = format!(
        "d=$(mktemp -d); head -c 300000 {archive} > $d/cut.tar; export TMPDIR=$d; \
         {m} run --image $d/cut.tar -- true; echo rc=$?; \
         {m} run --image $d/missing.tar -- true; echo rc=$?; \
         echo leftover-vmms=$(pgrep -f -c \"microvm-vmm.*$d\"); rm -rf $d",
        archive = archive.display(),
        m = microvm()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let (stdout, stderr) = (out.stdout_text(), out.stderr_text());
    assert_eq!(stdout.matches("rc=1").count(), 2, "{stdout} / {stderr}");
    assert!(stderr.contains("cut.tar"), "{stderr}");
    assert!(stderr.contains("missing.tar"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("leftover-vmms=0"), "{stdout}");
}
