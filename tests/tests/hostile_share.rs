//! A hostile guest against the pod's share (issue 21, items 1 to 4), played
//! for real where VMs run (inside the KVM test host on PVM machines):
//!
//! - a root process in a kata pod's guest (a privileged container that
//!   mounts the share itself: the container escape every VM-runtime threat
//!   model starts from) plants symlinks and directories wherever the host
//!   makes its mount points, without pause, while the pod starts 50
//!   containers with volumes; nothing outside the pod's private tree may
//!   change (a canary the links point to stays intact, no mount appears
//!   outside), and the guest may plant nothing at all in the share's tree;
//! - an unprivileged host user can neither list nor read the runtime's
//!   state (`/run/microvm`, the pods' volumes and shares in it);
//! - a read-only volume with a submount is read-only all the way down;
//! - `microvm run`'s state directory cannot be pre-planted by another user.

use std::collections::BTreeSet;
use std::time::Duration;

use microvm_tests::containerd::{
    text, Containerd, Options, BASE_DIR, KATA_HANDLER, KATA_STATE_ROOT, TIMEOUT,
};
use microvm_tests::{vm_host, workspace_binary, ExitStatus, Output, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

fn containerd() -> Containerd<'static> {
    let options = Options::new(env!("CARGO_BIN_EXE_cri"));
    if let Err(e) = options.require_shim(KATA_HANDLER) {
        panic!("the kata tests cannot run: {e:#}");
    }
    Containerd::start_for_test(host(), options)
}

fn sh_ok(cd: &Containerd, script: &str) -> String {
    let out = cd.sh(script, b"", TIMEOUT).unwrap();
    assert_ok(&out, script);
    out.stdout_text()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status == ExitStatus::Code(0) && !out.timed_out,
        "{what}: {:?}{}\nstdout: {}\nstderr: {}",
        out.status,
        if out.timed_out { " (timed out)" } else { "" },
        out.stdout_text(),
        out.stderr_text()
    );
}

/// The attacker, as root in the guest: mounts the share (the same virtio-fs
/// tag the agent mounted) and, until killed, in the share and in every
/// container directory in it, plants `rootfs`, `mounts`, `mounts/0..7`
/// wherever they are missing (the names the host makes next), fresh names,
/// and moves `mounts` away, with symlinks to the host's canary (a file and
/// its directory) and with directories: a busybox shell polling the share
/// through virtio-fs, as fast as the guest's vCPU runs it. Counts in
/// /tmp/planted the plants that took (listed in /tmp/planted-list), in
/// /tmp/refused those that failed.
const ATTACKER: &str = r#"
set -u
mkdir -p /mnt/share
mount -t virtiofs microvm /mnt/share || { echo "cannot mount the share"; exit 1; }
echo mounted > /tmp/ready
planted=0; refused=0; round=0
# A plant counts when its name itself became the guest's (a link, or a
# directory made or moved there): `ln -s` onto an existing directory (a
# rootfs, the container's own file system) makes the link inside it.
planted() { planted=$((planted+1)); echo "$1" >> /tmp/planted-list; }
link() { ln -s "$1" "$2" 2>/dev/null; if [ -L "$2" ]; then planted "$2"; else refused=$((refused+1)); fi; }
dir() { if mkdir "$1" 2>/dev/null; then planted "$1"; else refused=$((refused+1)); fi; }
while :; do
    round=$((round+1))
    link "$CANARY_DIR" /mnt/share/planted-$round
    dir /mnt/share/dir-$round
    for c in /mnt/share/*; do
        [ -d "$c" ] || continue
        [ -e "$c/mounts" ] || link "$CANARY_DIR" "$c/mounts"
        [ -e "$c/rootfs" ] || link "$CANARY_DIR" "$c/rootfs"
        link "$CANARY_DIR/canary" "$c/next-$round"
        if [ -d "$c/mounts" ] && [ ! -L "$c/mounts" ]; then
            for n in 0 1 2 3 4 5 6 7; do
                [ -e "$c/mounts/$n" ] || link "$CANARY_DIR/canary" "$c/mounts/$n"
            done
            if mv "$c/mounts" "$c/moved-$round" 2>/dev/null; then planted "$c/moved-$round"; else refused=$((refused+1)); fi
        fi
    done
    echo $planted > /tmp/planted.new; mv /tmp/planted.new /tmp/planted
    echo $refused > /tmp/refused.new; mv /tmp/refused.new /tmp/refused
done
"#;

/// Where VMs run: the mount points of the test host outside the state tree
/// and the test containerds' directories (where the other tests of this
/// file mount their volumes), one a line, sorted.
fn mounts_outside() -> String {
    format!(
        "awk '{{print $5}}' /proc/self/mountinfo | grep -v \"^{KATA_STATE_ROOT}/\" \
         | grep -v \"^{BASE_DIR}/\" | sort -u"
    )
}

/// Issue 21 item 1 (with item 2's unprivileged user): a guest that races
/// container starts cannot make the host create, truncate or mount
/// anything outside the pod's private tree.
#[test]
fn a_guest_racing_50_container_starts_changes_nothing_outside_its_pod_kata() {
    const STARTS: usize = 50;
    let cd = containerd();
    let canary_dir = format!("{}/canary", cd.dir().display());
    let volume = format!("{}/volume", cd.dir().display());
    sh_ok(
        &cd,
        &format!(
            "set -e; mkdir -p {canary_dir} {volume}; echo intact > {canary_dir}/canary; \
             echo data > {volume}/file"
        ),
    );
    let mut pod = cd.pod("hostile", KATA_HANDLER);
    pod.extra.push("--pod-privileged".into());
    let pod_id = cd.run_pod(&pod).unwrap();
    let before = sh_ok(&cd, &mounts_outside());

    let env = format!("CANARY_DIR={canary_dir}");
    let attacker = cd
        .create_container(
            &pod_id,
            &pod,
            "attacker",
            &["--privileged", "--env", &env],
            &["sh", "-c", ATTACKER],
        )
        .unwrap();
    cd.cri(&["start", &attacker]).unwrap();
    let ready = cd
        .cri_output(&[
            "exec",
            &attacker,
            "--",
            "sh",
            "-c",
            "for i in $(seq 1 600); do [ -e /tmp/ready ] && exit 0; sleep 0.1; done; exit 1",
        ])
        .unwrap();
    assert_ok(&ready, "the attacker mounting the share");

    // The host's view as a local unprivileged user (item 2), while the pod
    // runs with its volumes mounted.
    let state = format!("{KATA_STATE_ROOT}/k8s.io/{pod_id}");
    let nobody = cd
        .sh(
            &format!(
                "ls -ld {KATA_STATE_ROOT} {KATA_STATE_ROOT}/k8s.io {state} {state}/mounts {state}/shared; \
                 for p in {KATA_STATE_ROOT} {state} {state}/shared {state}/mounts {state}/vmm.log \
                          {state}/shared/{attacker}/rootfs/etc/passwd; do \
                     if setpriv --reuid=65534 --regid=65534 --clear-groups ls {KATA_STATE_ROOT} $p >/dev/null 2>&1 \
                        || setpriv --reuid=65534 --regid=65534 --clear-groups cat $p >/dev/null 2>&1; then \
                         echo \"nobody reads $p\"; fi; \
                 done"
            ),
            b"",
            TIMEOUT,
        )
        .unwrap();
    let listing = nobody.stdout_text();
    assert!(!listing.contains("nobody reads"), "{listing}");
    // The state tree is 0700; the share's roots inside it 0711 (a
    // user-namespaced container's setup in the guest passes through them),
    // unreachable for other host users all the same.
    for line in listing.lines().filter(|l| l.starts_with('d')) {
        let share_root = line.ends_with("/mounts") || line.ends_with("/shared");
        assert!(
            line.starts_with("drwx------")
                || line.starts_with("dr-x------")
                || (share_root
                    && (line.starts_with("drwx--x--x") || line.starts_with("dr-x--x--x"))),
            "the state tree is open to others: {line}\n{listing}"
        );
    }

    // 50 containers with a volume each (mounts/N) start and go while the
    // attacker plants; the mount points outside are taken after each start.
    let script = format!(
        r#"set -u
pod_args="--pod-name {name} --log-dir {log_dir} --cgroup-parent {cgroup} --pod-privileged"
for i in $(seq 1 {STARTS}); do
    id=$($CRI create {pod_id} $pod_args --name victim-$i --image $IMAGE --mount {volume}:/vol -- cat /vol/file \
        | sed -n 's/.*"container_id":"\([0-9a-f]*\)".*/\1/p')
    [ -n "$id" ] || {{ echo "create $i failed"; continue; }}
    $CRI start $id >/dev/null || echo "start $i failed"
    {mounts_outside} | sed 's/^/outside /'
    $CRI wait --state EXITED $id >/dev/null || echo "wait $i failed"
    $CRI rm $id >/dev/null || echo "rm $i failed"
    echo "started $i"
done
"#,
        name = pod.name,
        log_dir = pod.log_dir,
        cgroup = pod.cgroup_parent,
        mounts_outside = mounts_outside(),
    );
    let out = cd.sh(&script, b"", Duration::from_secs(3600)).unwrap();
    assert_ok(&out, "the 50 container starts");
    let text_out = out.stdout_text();
    let started = text_out
        .lines()
        .filter(|l| l.starts_with("started "))
        .count();
    let failures: Vec<&str> = text_out.lines().filter(|l| l.contains(" failed")).collect();
    assert!(
        started == STARTS && failures.is_empty(),
        "{started} of {STARTS} rounds, failures: {failures:?}"
    );

    let counts = cd
        .cri(&[
            "exec-sync",
            &attacker,
            "--",
            "sh",
            "-c",
            "echo planted $(cat /tmp/planted) refused $(cat /tmp/refused); \
             head -n 20 /tmp/planted-list 2>/dev/null",
        ])
        .unwrap();
    let counts = text(&counts["stdout"]).trim().to_string();
    let numbers: Vec<u64> = counts
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{counts}");
    println!("attacker: {counts} (during {STARTS} container starts)");
    assert!(numbers[1] > 0, "the attacker never tried: {counts}");
    assert_eq!(
        numbers[0], 0,
        "the guest planted links or directories in the share's tree: {counts}"
    );

    // Nothing outside the pod's private tree changed.
    let before: BTreeSet<&str> = before.lines().collect();
    let appeared: BTreeSet<&str> = text_out
        .lines()
        .filter_map(|l| l.strip_prefix("outside "))
        .filter(|m| !before.contains(m))
        .collect();
    assert!(
        appeared.is_empty(),
        "mounts appeared outside the pod's tree: {appeared:?}"
    );
    let canary = sh_ok(
        &cd,
        &format!(
            "cat {canary_dir}/canary; ls -A {canary_dir}; \
             awk '{{print $5}}' /proc/self/mountinfo | grep -c ^{canary_dir} || true"
        ),
    );
    assert_eq!(canary, "intact\ncanary\n0\n", "the canary changed");

    cd.cri(&["stop", "--grace", "0", &attacker]).unwrap();
    cd.cri(&["stopp", &pod_id]).unwrap();
    cd.cri(&["rmp", &pod_id]).unwrap();
    cd.assert_nothing_left();
}

/// Issue 21 item 3: a read-only volume whose host directory has a mount
/// under it is read-only in the guest all the way down, and the host's
/// side of a volume bind is `nosuid,nodev`.
#[test]
fn a_read_only_volume_with_a_submount_is_read_only_all_the_way_down_kata() {
    let cd = containerd();
    let volume = format!("{}/ro-volume", cd.dir().display());
    sh_ok(
        &cd,
        &format!(
            "set -e; mkdir -p {volume}/sub; mount -t tmpfs sub {volume}/sub; \
             echo top > {volume}/top; echo below > {volume}/sub/below"
        ),
    );
    let pod = cd.pod("readonly", KATA_HANDLER);
    let pod_id = cd.run_pod(&pod).unwrap();
    let mount = format!("{volume}:/data:ro");
    let reader = cd
        .create_container(
            &pod_id,
            &pod,
            "reader",
            &["--mount", &mount],
            &["sh", "-c", "sleep 100000"],
        )
        .unwrap();
    cd.cri(&["start", &reader]).unwrap();
    let probe = cd
        .cri(&[
            "exec-sync",
            &reader,
            "--",
            "sh",
            "-c",
            "cat /data/top /data/sub/below; \
             for f in /data/new /data/sub/new /data/top /data/sub/below; do \
                 if (echo x >> $f) 2>/dev/null; then echo \"wrote $f\"; fi; done; \
             rm -f /data/sub/below 2>/dev/null && echo removed; echo end",
        ])
        .unwrap();
    assert_eq!(
        text(&probe["stdout"]),
        "top\nbelow\nend\n",
        "the read-only volume was written to: {probe}"
    );
    // On the host: untouched, and its binds in the pod's tree restricted.
    let state = format!("{KATA_STATE_ROOT}/k8s.io/{pod_id}");
    // The volume's bind and its submount, in the private tree and in the
    // guest's view of it: `MOUNT_POINT OPTIONS` lines.
    let host_side = sh_ok(
        &cd,
        &format!(
            "set -e; cat {volume}/top {volume}/sub/below; ls -A {volume} {volume}/sub; \
             n=$(cd {state}/mounts/{reader}/mounts && for n in *; do if [ -e $n/top ]; then echo $n; fi; done); \
             for tree in mounts shared; do for m in $n $n/sub; do \
                 p={state}/$tree/{reader}/mounts/$m; \
                 awk -v p=$p '$5 == p {{print \"mount \" $5 \" \" $6}}' /proc/self/mountinfo; \
             done; done"
        ),
    );
    let mut lines = host_side.lines();
    assert_eq!(
        lines.by_ref().take(2).collect::<Vec<_>>(),
        ["top", "below"],
        "{host_side}"
    );
    let options: Vec<&str> = host_side
        .lines()
        .filter_map(|l| l.strip_prefix("mount "))
        .collect();
    assert_eq!(options.len(), 4, "the volume's mounts: {host_side}");
    for mount in &options {
        let flags = mount.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            flags.starts_with("ro,") && flags.contains("nosuid") && flags.contains("nodev"),
            "a mount of the read-only volume is not ro,nosuid,nodev: {mount}\n{host_side}"
        );
    }
    assert!(
        !host_side.contains("\nnew\n"),
        "a file appeared on the host: {host_side}"
    );
    cd.cri(&["stop", "--grace", "0", &reader]).unwrap();
    cd.cri(&["stopp", &pod_id]).unwrap();
    cd.cri(&["rmp", &pod_id]).unwrap();
    sh_ok(&cd, &format!("umount {volume}/sub"));
    cd.assert_nothing_left();
}

/// Issue 21 item 4: `microvm run`'s state directory is made fresh and
/// private: a directory another user pre-planted where the old naming
/// (`$TMPDIR/microvm-<pid>-0`) put it, with `vmm.log` a symlink to that
/// user's file and a `vsock.sock`, is not used (the pid is known before
/// `microvm` runs: it is its wrapper's, which execs it), and the one it
/// makes is root's alone.
#[test]
fn microvm_runs_state_dir_cannot_be_pre_planted() {
    let microvm = workspace_binary("microvm").unwrap().display().to_string();
    let script = format!(
        r#"set -eu
t=$(mktemp -d); chmod 1777 $t; export TMPDIR=$t MICROVM_AGENT_TIMEOUT=120
trap 'rm -rf $t' EXIT
victim=$t/victim; setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "echo victim > $victim"
mkfifo $t/go
# The wrapper's pid is microvm's (exec): known before it runs.
sh -c 'read x < "$0"; exec "$@"' $t/go {microvm} run --memory 256 -- sh -c 'sleep 8' &
run=$!
setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \
    "mkdir -m 777 $t/microvm-$run-0 && ln -s $victim $t/microvm-$run-0/vmm.log && touch $t/microvm-$run-0/vsock.sock"
echo go > $t/go
for i in $(seq 1 300); do
    dir=$(ls -d $t/microvm-$run-* 2>/dev/null | grep -v -- "-0$" || true)
    [ -n "$dir" ] && [ -e $dir/vmm.log ] && break
    sleep 0.1
done
echo "dir $dir"
echo "planted-dir $(ls -d $t/microvm-$run-0 2>/dev/null || echo none)"
stat -c 'mode %A owner %U' $dir
if setpriv --reuid=65534 --regid=65534 --clear-groups ls $dir >/dev/null 2>&1; then echo "nobody lists it"; fi
wait $run; echo "run $?"
echo "victim $(cat $victim)"
echo "left $(ls -A $t | grep -v -e '^victim$' -e '^go$' -e "^microvm-$run-0$" | wc -l)"
"#
    );
    let out = host()
        .run(&["sh", "-c", &script], b"", Duration::from_secs(600))
        .unwrap();
    assert_ok(&out, "microvm run with planted state directories");
    let stdout = out.stdout_text();
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("dir "))
        .unwrap_or_default();
    assert!(!dir.is_empty() && !dir.ends_with("-0"), "{stdout}");
    assert!(
        !stdout.contains("planted-dir none"),
        "the planted directory is gone: {stdout}"
    );
    assert!(stdout.contains("mode drwx------ owner root\n"), "{stdout}");
    assert!(!stdout.contains("nobody lists it"), "{stdout}");
    assert!(stdout.contains("run 0\n"), "{stdout}");
    assert!(
        stdout.contains("victim victim\n"),
        "the planted vmm.log was written through: {stdout}"
    );
    assert!(stdout.contains("left 0\n"), "{stdout}");
}
