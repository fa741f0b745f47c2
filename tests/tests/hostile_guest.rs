//! Issue 21's attack tests for bounded resources and the share: a guest
//! (root in it, running `build/hostile` or busybox over its share) that
//! storms the VMM's vsock and virtio-fs devices or tries to plant devices,
//! set-ID files and privileged xattrs on the host, and a pod asking for an
//! absurd VM. Each runs real VMs in the KVM test host on PVM machines.

use std::collections::BTreeMap;
use std::time::Duration;

use microvm_tests::containerd::{Containerd, Options, KATA_HANDLER, KATA_RUNTIME};
use microvm_tests::{artifact, vm_host, workspace_binary, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

fn microvm() -> String {
    workspace_binary("microvm").unwrap().display().to_string()
}

fn hostile() -> String {
    artifact("hostile").unwrap().display().to_string()
}

const TIMEOUT: Duration = Duration::from_secs(600);

/// The VMM's cap on vmm.log (`vmm::logger::MAX_LOG_BYTES`).
const MAX_LOG_BYTES: u64 = 4 << 20;
/// A call site's burst of lines before its rate limit
/// (`vmm::logger::BURST`).
const BURST: usize = 10;

/// A shell prelude: `$share` is a scratch directory holding `hostile`,
/// shared with the guest; `guest CMD` runs `microvm run --guest --share`
/// in the background with the share mounted on /mnt, its output in
/// `$share.out`; `vmm_of_run` prints the PID of that run's VMM (the jailed
/// one) once it exists; `finish` lets the guest end (it waits for
/// `/mnt/done`) and waits for the run.
fn prelude() -> String {
    format!(
        r#"
export MICROVM_AGENT_TIMEOUT=300
share=$(mktemp -d /tmp/hostile-XXXXXX)
cp {hostile} $share/hostile
guest() {{
    {microvm} run --guest --share $share -- sh -c "mkdir -p /mnt && mount -t virtiofs microvm /mnt || exit 1; $1; echo guest-done; for i in \$(seq 1 1200); do [ -e /mnt/done ] && break; sleep 0.5; done" >$share.out 2>&1 &
    run=$!
}}
wait_for() {{
    for i in $(seq 1 3000); do grep -q "$1" $share.out && return; sleep 0.2; done
    echo "never-saw $1"; cat $share.out
}}
vmm_of_run() {{
    for p in $(pgrep -x microvm-vmm); do
        grep -qa -- microvm-$run- /proc/$p/cmdline || continue
        case "$(grep NSpid: /proc/$p/status)" in *"	1") echo $p;; esac
    done
}}
finish() {{
    touch $share/done
    wait $run; echo "run-exit $?"
    cat $share.out | sed 's/^/guest: /'
}}
"#,
        hostile = hostile(),
        microvm = microvm()
    )
}

/// Lines `word rest…` of `text`, by first word.
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

fn one<'a>(facts: &'a BTreeMap<String, Vec<String>>, word: &str, text: &str) -> &'a str {
    facts
        .get(word)
        .and_then(|v| v.first())
        .unwrap_or_else(|| panic!("no `{word}` line in\n{text}"))
}

/// A guest connecting to CID 1 (which the VMM drops, once with a warning
/// per packet before issue 21) and to host ports nobody listens on, tens of
/// thousands of times: vmm.log keeps a burst of lines per call site, far
/// under its cap, and the VM still works (its agent answers over vsock and
/// the command ends normally).
#[test]
fn a_vsock_connect_storm_leaves_vmm_log_small_and_the_vm_working() {
    let script = format!(
        r#"{prelude}
guest "/mnt/hostile vsock-storm 1 1234 5000; /mnt/hostile vsock-storm 2 9999 2000; /mnt/hostile vsock-storm 77 1 2000"
wait_for guest-done
log=$(ls /tmp/microvm-$run-*/vmm.log | head -1)
echo "log-file $log"
echo "log-bytes $(stat -c %s "$log" </dev/null)"
echo "cid1-lines $(grep -c 'to cid 1\( \|$\)' "$log" </dev/null)"
echo "cid77-lines $(grep -c 'to cid 77\( \|$\)' "$log" </dev/null)"
finish
"#,
        prelude = prelude()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    eprintln!("{text}{}", out.stderr_text());
    let facts = facts(&text);
    assert!(!facts.contains_key("never-saw"), "{text}");
    let storms: Vec<&String> = facts
        .get("guest:")
        .into_iter()
        .flatten()
        .filter(|l| l.starts_with("vsock-storm"))
        .collect();
    assert_eq!(storms.len(), 3, "{text}");
    assert!(
        storms[0].starts_with("vsock-storm sent=5000"),
        "the storm ran: {text}"
    );
    let log_bytes: u64 = one(&facts, "log-bytes", &text).parse().unwrap();
    assert!(log_bytes < MAX_LOG_BYTES, "{text}");
    // 5000 connects to CID 1 send at least 5000 packets: a burst of lines
    // went to the log, the rest were counted.
    let cid1: usize = one(&facts, "cid1-lines", &text).parse().unwrap();
    let cid77: usize = one(&facts, "cid77-lines", &text).parse().unwrap();
    assert!(
        cid1 + cid77 <= 2 * BURST && cid1 >= 1,
        "lines about dropped packets: {cid1} + {cid77}\n{text}"
    );
    assert_eq!(
        one(&facts, "run-exit", &text),
        "0",
        "the VM kept working\n{text}"
    );
}

/// A guest opening a directory of 4,000 names of 250 bytes 150 times and
/// reading each (the file server lists the whole directory at the first
/// read, ~1.1 MB each, 170 MB in all): listings stop at their budget, the guest gets
/// ENOMEM for the rest, and the VMM's memory stays bounded (its guest
/// memory, 128 MiB, plus the 64 MiB budget and its own needs).
#[test]
fn an_opendir_storm_gets_errors_not_vmm_memory() {
    let script = format!(
        r#"{prelude}
mkdir $share/huge
cd $share/huge && seq -f "%05g-$(printf 'x%.0s' $(seq 1 244))" 1 4000 | xargs touch && cd /
echo "files $(ls $share/huge | wc -l)"
guest "/mnt/hostile opendir-storm /mnt/huge 150"
wait_for guest-done
vmm=$(vmm_of_run)
echo "vmm-hwm-kib $(grep VmHWM: /proc/$vmm/status | tr -s ' \t' ' ' | cut -d' ' -f2)"
echo "vmm-rss-kib $(grep VmRSS: /proc/$vmm/status | tr -s ' \t' ' ' | cut -d' ' -f2)"
finish
"#,
        prelude = prelude()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    eprintln!("{text}{}", out.stderr_text());
    let facts = facts(&text);
    assert!(!facts.contains_key("never-saw"), "{text}");
    assert_eq!(one(&facts, "files", &text), "4000", "{text}");
    let storm = facts
        .get("guest:")
        .into_iter()
        .flatten()
        .find(|l| l.starts_with("opendir-storm"))
        .unwrap_or_else(|| panic!("no storm report\n{text}"));
    assert!(storm.contains("opened=150"), "{storm}");
    assert!(storm.contains("ENOMEM:"), "past the budget: {storm}");
    let hwm: u64 = one(&facts, "vmm-hwm-kib", &text).parse().unwrap();
    // Unbounded, the listings alone would take some 170 MB.
    assert!(
        hwm < (128 + 64 + 64) * 1024,
        "the VMM peaked at {hwm} KiB\n{text}"
    );
    assert_eq!(one(&facts, "run-exit", &text), "0", "{text}");
}

/// A `security.capability` value (VFS_CAP_REVISION_2) granting CAP_NET_RAW
/// permitted, which the guest's kernel accepts and sends on.
const CAP_NET_RAW: &str = "0000000200200000000000000000000000000000";

/// Root in the guest tries to leave a device node, set-ID files and
/// privileged xattrs in the share: devices are refused, set-ID bits do not
/// reach the host, security.* and trusted.* xattrs are refused (user.* is
/// fine), FIFOs are harmless and allowed.
#[test]
fn the_guest_cannot_plant_devices_set_id_files_or_capabilities_on_the_host() {
    let script = format!(
        r#"{prelude}
guest "cd /mnt; mknod null c 1 3; echo mknod-chr \$?; mknod disk b 8 0; echo mknod-blk \$?; mknod fifo p; echo mknod-fifo \$?; cp /bin/busybox suid; chmod 4755 suid; echo chmod-suid \$?; touch sgid; chmod 2755 sgid; mkdir sgid-dir; chmod 2775 sgid-dir; for x in trusted.overlay.opaque security.selinux user.note; do ./hostile setxattr suid \$x 1; done; ./hostile setxattr suid security.capability hex:{CAP_NET_RAW}"
wait_for guest-done
for f in null disk fifo suid sgid sgid-dir; do
    if [ -e $share/$f ] || [ -p $share/$f ]; then echo "host $f $(stat -c '%F %a' $share/$f)"; else echo "host $f absent"; fi
done
finish
"#,
        prelude = prelude()
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let text = out.stdout_text();
    eprintln!("{text}{}", out.stderr_text());
    let facts = facts(&text);
    assert!(!facts.contains_key("never-saw"), "{text}");
    let guest: Vec<&str> = facts
        .get("guest:")
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let said = |line: &str| guest.contains(&line);
    for refused in ["mknod-chr 1", "mknod-blk 1"] {
        assert!(said(refused), "expected `{refused}` from the guest\n{text}");
    }
    assert!(said("mknod-fifo 0"), "{text}");
    // The guest's kernel may refuse a capability itself (EINVAL) before
    // it reaches the file server; either way it is refused.
    assert!(
        said("setxattr security.capability EPERM") || said("setxattr security.capability errno22"),
        "security.capability was not refused\n{text}"
    );
    for name in ["trusted.overlay.opaque", "security.selinux"] {
        assert!(
            said(&format!("setxattr {name} EPERM")),
            "{name} was not refused\n{text}"
        );
    }
    assert!(
        !said("setxattr user.note EPERM"),
        "user.* is the guest's\n{text}"
    );
    let on_host: BTreeMap<&str, &str> = facts["host"]
        .iter()
        .map(|l| l.split_once(' ').unwrap())
        .collect();
    assert_eq!(on_host["null"], "absent", "{text}");
    assert_eq!(on_host["disk"], "absent", "{text}");
    assert_eq!(on_host["fifo"], "fifo 644", "{text}");
    assert_eq!(on_host["suid"], "regular file 755", "{text}");
    assert_eq!(on_host["sgid"], "regular empty file 755", "{text}");
    assert_eq!(on_host["sgid-dir"], "directory 2775", "{text}");
    assert_eq!(one(&facts, "run-exit", &text), "0", "{text}");
}

/// A pod whose containers ask for 7 TiB and 64 CPUs gets a VM clamped to
/// the host (the default maxima: its RAM, its CPUs), starts, and the shim
/// says what it clamped.
#[test]
fn a_pod_with_huge_limits_is_clamped_and_starts_kata() {
    let options = Options::new(env!("CARGO_BIN_EXE_cri"));
    if let Err(e) = options.require_shim(KATA_RUNTIME) {
        panic!("the kata tests cannot run: {e:#}");
    }
    let cd = Containerd::start_for_test(host(), options);
    let mut pod = cd.pod("huge", KATA_HANDLER);
    let seven_tib = (7u64 << 40).to_string();
    pod.extra = ["--pod-memory", &seven_tib, "--pod-cpu-quota", "6400000"]
        .into_iter()
        .chain(["--pod-cpu-period", "100000"])
        .map(String::from)
        .collect();
    let pod_id = cd.run_pod(&pod).unwrap();
    let sleeper = cd
        .create_container(&pod_id, &pod, "sleeper", &[], &["sleep", "100000"])
        .unwrap();
    cd.cri(&["start", &sleeper]).unwrap();
    let inside = cd
        .cri(&[
            "exec-sync",
            &sleeper,
            "--",
            "sh",
            "-c",
            "grep MemTotal /proc/meminfo; nproc",
        ])
        .unwrap();
    let inside = inside["stdout"].as_str().unwrap_or_default().to_string();
    let host_info = host()
        .run(
            &["sh", "-c", "grep MemTotal /proc/meminfo; nproc"],
            b"",
            TIMEOUT,
        )
        .unwrap()
        .stdout_text();
    let kib = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal in {text}"))
    };
    let cpus = |text: &str| -> u32 { text.lines().last().unwrap().trim().parse().unwrap() };
    assert!(
        kib(&inside) <= kib(&host_info),
        "the guest has {} KiB, the host {} KiB",
        kib(&inside),
        kib(&host_info)
    );
    assert!(
        cpus(&inside) <= cpus(&host_info).min(32),
        "{inside} / {host_info}"
    );
    let log = cd.log().unwrap();
    assert!(
        log.contains("clamped to default_maxmemory") && log.contains("clamped to default_maxvcpus"),
        "the shim did not say it clamped:\n{}",
        cd.log_tail()
    );
    cd.cri(&["stopp", &pod_id]).unwrap();
    cd.cri(&["rmp", &pod_id]).unwrap();
    cd.assert_nothing_left();
}
