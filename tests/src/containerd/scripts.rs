//! The shell scripts that start, inspect and tear down a private containerd
//! where VMs run (inside the test host on PVM machines). Each runs as
//! `env VAR=… sh -c SCRIPT`, with these variables:
//!
//! - `D`: the instance's directory (config, root, state, socket, logs);
//! - `NAME`: its unique name, also its cgroup (`/sys/fs/cgroup/$NAME`);
//! - `NS`: its ctr namespace;
//! - `CRI`: the CRI client binary;
//! - `SHIM_STATE`: where our shim keeps its pods (`/run/microvm`), as
//!   `$SHIM_STATE/NAMESPACE/POD`;
//! - `SANDBOXES`: once containerd's log is gone, the CRI sandbox ids it
//!   had made (before, they are read from the log);
//! - `NETNS`: with pod networking, containerd's network namespace's name
//!   (`/run/netns/$NETNS`), else empty;
//! - `POD_NETNS`: the network namespaces (paths) of the pods the tests
//!   made, space-separated.
//!
//! Processes belong to an instance when their command line, environment or
//! working directory names a path under `$D` (containerd, its shims and
//! whatever they start without clearing both), or when they are in its
//! cgroup. Our shim's pod directories belong to it when they are in its ctr
//! namespace or named after one of its CRI sandboxes.

/// Shell functions shared by the scripts.
const COMMON: &str = r#"
S=$D/containerd.sock
# A live process (zombies are not).
alive() { [ -r "/proc/$1/stat" ] && ! sed 's/.*) //' "/proc/$1/stat" | grep -q '^Z'; }
# The cgroup directories named $NAME: one on cgroup v2, one per controller on v1.
cgroups() { for base in /sys/fs/cgroup /sys/fs/cgroup/*; do [ -d "$base/$NAME" ] && echo "$base/$NAME"; done; return 0; }
containerd_pid() { cat "$D/containerd.pid" 2>/dev/null || true; }
# The live processes of this instance, except this script's process group and,
# with "running", containerd itself.
ours() {
    me=$(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3)
    cd_pid=none; [ "${1:-}" = running ] && cd_pid=$(containerd_pid)
    {
        grep -lsF "$D/" /proc/[0-9]*/cmdline /proc/[0-9]*/environ | cut -d/ -f3
        ls -l /proc/[0-9]*/cwd 2>/dev/null | grep -F -- "-> $D/" | sed 's#.*/proc/\([0-9]*\)/cwd.*#\1#'
        for cg in $(cgroups); do find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null; done
    } | sort -un | while read -r p; do
        [ "$p" = "$cd_pid" ] && continue
        alive "$p" || continue
        pg=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f3)
        [ "$pg" = "$me" ] && continue
        echo "$p"
    done
}
# The CRI sandboxes this containerd made.
sandboxes() {
    if [ -f "$D/containerd.log" ]; then
        grep -o 'returns sandbox id \\"[0-9a-f]*' "$D/containerd.log" | grep -o '[0-9a-f]*$'
    else
        for id in $SANDBOXES; do echo "$id"; done
    fi
    return 0
}
# Our shim's pod directories of this instance.
shim_dirs() {
    for pod in "$SHIM_STATE/$NS"/* $(sandboxes | sed "s#^#$SHIM_STATE/k8s.io/#"); do
        [ -e "$pod" ] && echo "$pod"
    done
    return 0
}
# Mount points under $D or mounts whose source or options name $D (overlays
# over its snapshots), and mounts in our shim's pod directories; deepest first.
our_mounts() {
    {
        grep -F "$D/" /proc/self/mountinfo | cut -d' ' -f5
        for pod in $(shim_dirs); do cut -d' ' -f5 /proc/self/mountinfo | grep -F "$pod/"; done
    } | sort -ru
}
"#;

/// Writes stdin to `$D/config.toml`, starts containerd in its own session
/// (in the cgroup `$NAME/containerd` on cgroup v2) with `$SHIM_PATH` first
/// on its PATH, waits up to `$WAIT` seconds for it to answer, and imports
/// `$IMAGE_TAR` into `$NS` and `k8s.io` and `$PAUSE_TAR` into `k8s.io`.
pub fn start() -> String {
    format!(
        "{COMMON}{}",
        r#"
set -eu
for tool in containerd ctr; do
    command -v $tool >/dev/null || { echo "$tool is not installed (Debian package containerd; scripts/setup.sh installs it)" >&2; exit 1; }
done
mkdir -p "$D/root" "$D/state" "$D/cni" "$D/opt" "$D/logs"
cat > "$D/config.toml"
in_netns=""
if [ -n "$NETNS" ]; then
    for tool in ip nsenter tc; do
        command -v $tool >/dev/null || { echo "$tool is not installed (Debian packages iproute2, util-linux)" >&2; exit 1; }
    done
    for plugin in bridge host-local loopback; do
        [ -x "/usr/lib/cni/$plugin" ] || { echo "/usr/lib/cni/$plugin is missing (Debian package containernetworking-plugins; scripts/setup.sh installs it)" >&2; exit 1; }
    done
    ip netns add "$NETNS"
    ip -n "$NETNS" link set lo up
    mkdir -p "$D/ipam"
    printf '%s\n' "$CNI_CONFLIST" > "$D/cni/10-microvm.conflist"
    # Not `ip netns exec`: it would also give containerd a mount namespace
    # of its own, hiding its mounts from the scripts.
    in_netns="nsenter --net=/run/netns/$NETNS"
fi
cg=""
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg=/sys/fs/cgroup/$NAME/containerd
    mkdir -p "$cg"
fi
PATH="$SHIM_PATH:$PATH" setsid sh -c '
    echo $$ > "$D/containerd.pid"
    [ -z "$1" ] || echo $$ > "$1/cgroup.procs"
    exec $2 containerd --config "$D/config.toml"' sh "$cg" "$in_netns" </dev/null >"$D/containerd.log" 2>&1 &
tries=$((WAIT * 10))
until ctr -a "$S" version >/dev/null 2>&1; do
    pid=$(containerd_pid)
    if [ -n "$pid" ] && ! alive "$pid"; then
        echo "containerd exited at start; its log:" >&2; tail -n 40 "$D/containerd.log" >&2; exit 1
    fi
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then
        echo "containerd did not answer within $WAIT s; its log:" >&2; tail -n 40 "$D/containerd.log" >&2; exit 1
    fi
    sleep 0.1
done
ctr -a "$S" -n "$NS" images import --base-name "$IMAGE_BASE" "$IMAGE_TAR" >/dev/null
ctr -a "$S" -n k8s.io images import --base-name "$IMAGE_BASE" "$IMAGE_TAR" >/dev/null
ctr -a "$S" -n k8s.io images import --base-name "$PAUSE_BASE" "$PAUSE_TAR" >/dev/null
echo "containerd pid $(containerd_pid)"
"#
    )
}

/// Prints one `LEFTOVER <what>: <details>` line per thing of this instance
/// still there. With `$RUNNING=1` containerd itself, its directory and its
/// cgroups `containerd` and `pods` are expected; its tasks and containers
/// are not.
pub fn leftovers() -> String {
    format!(
        "{COMMON}{}",
        r#"
set -u
if [ "$RUNNING" = 1 ]; then
    alive "$(containerd_pid)" || echo "LEFTOVER containerd: it is not running (it died?)"
    for ns in "$NS" k8s.io; do
        for t in $(ctr -a "$S" -n "$ns" tasks ls -q 2>/dev/null); do echo "LEFTOVER task: $ns/$t"; done
        for c in $(ctr -a "$S" -n "$ns" containers ls -q 2>/dev/null); do echo "LEFTOVER container: $ns/$c"; done
    done
    running=running
else
    running=""
    [ -e "$D" ] && echo "LEFTOVER directory: $D"
fi
for p in $(ours $running); do
    echo "LEFTOVER process: $p $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-300)"
done
our_mounts | while read -r m; do echo "LEFTOVER mount: $m"; done
for cg in $(cgroups); do
    if [ "$RUNNING" = 1 ]; then
        # runc leaves the parents of container cgroups; containers' own are leftovers.
        find "$cg" -mindepth 1 -maxdepth 1 -type d ! -name containerd ! -name pods
        [ -d "$cg/pods" ] && find "$cg/pods" -mindepth 1 -type d
    else
        echo "$cg"
    fi | while read -r c; do echo "LEFTOVER cgroup: $c"; done
done
[ -n "$(ls -A "/run/containerd/runc/$NS" 2>/dev/null)" ] && echo "LEFTOVER runc state: /run/containerd/runc/$NS/*"
if [ -n "$NETNS" ]; then
    if [ "$RUNNING" = 1 ]; then
        # The pods' ends of their veths, and taps, in containerd's netns.
        ip -n "$NETNS" -o link show 2>/dev/null | while read -r _ link _; do
            link=${link%:}; link=${link%%@*}
            case "$link" in
                tap*_mvm) echo "LEFTOVER tap in containerd's netns: $link" ;;
                veth*) echo "LEFTOVER veth in containerd's netns: $link" ;;
            esac
        done
        # host-local keeps one file per reserved address, named after it.
        for f in "$D/ipam/"*/*; do
            [ -f "$f" ] || continue
            case "${f##*/}" in lock | last_reserved_ip.*) continue ;; esac
            echo "LEFTOVER IPAM reservation: ${f##*/} for $(head -n 1 "$f")"
        done
    elif [ -e "/run/netns/$NETNS" ]; then
        echo "LEFTOVER network namespace: /run/netns/$NETNS"
    fi
    for ns in $POD_NETNS; do
        [ -e "$ns" ] || continue
        echo "LEFTOVER pod network namespace: $ns"
        nsenter --net="$ns" ip -o link show 2>/dev/null | grep -o 'tap[^:@ ]*_mvm' | sed "s#^#LEFTOVER tap in $ns: #"
        nsenter --net="$ns" tc qdisc show 2>/dev/null | grep -F ingress | sed "s#^#LEFTOVER qdisc in $ns: #"
    done
    for id in $(sandboxes); do
        for f in /var/lib/cni/results/*-"$id"-*; do
            [ -e "$f" ] && echo "LEFTOVER CNI result cache: $f"
        done
    done
fi
for pod in $(shim_dirs); do echo "LEFTOVER shim state: $pod"; done
# Shim sockets nobody listens on (any instance's: their names are hashes).
# Checked twice, a second apart, to let a shim that is closing finish.
# /proc/net/unix lists the sockets of one network namespace: shims of
# instances with pod networking listen in containerd's, so every network
# namespace's list counts (read through one process in each).
listening() {
    find /proc/[0-9]*/ns -maxdepth 1 -name net -printf '%l %h\n' 2>/dev/null | sort -u -k1,1 |
        while read -r _ ns; do [ -z "$ns" ] || cat "${ns%/ns}/net/unix" 2>/dev/null; done
}
stale() {
    for s in /run/containerd/s/*; do
        [ -S "$s" ] && ! grep -q " $s\$" /proc/net/unix && echo "$s"
    done
    return 0
}
# Of these, those not listened on in any network namespace.
stale_everywhere() {
    candidates=$(stale)
    [ -n "$candidates" ] || return 0
    all=$(listening)
    for s in $candidates; do
        printf '%s\n' "$all" | grep -q " $s\$" || echo "$s"
    done
    return 0
}
first=$(stale_everywhere)
if [ -n "$first" ]; then
    sleep 1
    for s in $(stale_everywhere); do
        case "$first" in *"$s"*) echo "LEFTOVER socket without a listener: $s" ;; esac
    done
fi
exit 0
"#
    )
}

/// Tears the instance down whatever its state: removes every CRI pod and
/// every task and container (gracefully, through containerd), stops
/// containerd (SIGTERM, then SIGKILL after `$WAIT` s), kills what is left of
/// its processes and cgroups, unmounts what is mounted under or over `$D`,
/// and removes `$D`, its runc state and its cgroups. Prints `WARNING: …`
/// lines for what went wrong.
pub fn stop() -> String {
    format!(
        "{COMMON}{}",
        r#"
set -u
pid=$(containerd_pid)
if [ -n "$pid" ] && alive "$pid"; then
    timeout 600 "$CRI" --socket "$S" rm-all >/dev/null || echo "WARNING: removing the CRI pods failed"
    for ns in "$NS" k8s.io; do
        C="ctr -a $S -n $ns"
        for t in $($C tasks ls -q 2>/dev/null); do $C tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
        for t in $($C tasks ls -q 2>/dev/null); do
            $C tasks rm -f "$t" >/dev/null 2>&1 || echo "WARNING: ctr tasks rm -f $ns/$t failed"
        done
        for c in $($C containers ls -q 2>/dev/null); do
            $C containers rm "$c" >/dev/null 2>&1 || echo "WARNING: ctr containers rm $ns/$c failed"
        done
    done
    kill -TERM "$pid"
    tries=$((WAIT * 10))
    while alive "$pid" && [ "$tries" -gt 0 ]; do sleep 0.1; tries=$((tries - 1)); done
    if alive "$pid"; then echo "WARNING: containerd ignored SIGTERM for $WAIT s"; kill -KILL "$pid"; fi
fi
for p in $(ours); do
    echo "WARNING: killing $p $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-200)"
    kill -KILL "$p" 2>/dev/null
done
for cg in $(cgroups); do
    if [ -f "$cg/cgroup.kill" ]; then echo 1 > "$cg/cgroup.kill"; fi
done
# Killed processes take a while to leave (under TCG especially).
in_cgroups() { for cg in $(cgroups); do find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null; done; }
tries=$((WAIT * 10))
while [ -n "$(in_cgroups)" ] && [ "$tries" -gt 0 ]; do sleep 0.1; tries=$((tries - 1)); done
for m in $(our_mounts); do
    umount "$m" 2>/dev/null || umount -l "$m" || echo "WARNING: cannot unmount $m"
done
for id in $(sandboxes); do
    echo "SANDBOX $id"
    for f in /var/lib/cni/results/*-"$id"-*; do
        [ -e "$f" ] && { echo "WARNING: removing CNI's cached $f"; rm -f "$f"; }
    done
done
for ns in $POD_NETNS; do
    [ -e "$ns" ] || continue
    echo "WARNING: removing the pod network namespace $ns"
    umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null
    rm -f "$ns" || echo "WARNING: cannot remove $ns"
done
if [ -n "$NETNS" ] && [ -e "/run/netns/$NETNS" ]; then
    ip netns del "$NETNS" || echo "WARNING: cannot delete the network namespace $NETNS"
fi
for pod in $(shim_dirs); do
    echo "WARNING: removing the shim's $pod"
    rm -rf "$pod" || echo "WARNING: cannot remove $pod"
done
rmdir "$SHIM_STATE/$NS" 2>/dev/null
rm -rf "$D" || echo "WARNING: cannot remove $D"
rmdir "$(dirname "$D")" 2>/dev/null
rm -rf "/run/containerd/runc/$NS"
for cg in $(cgroups); do
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || echo "WARNING: cannot remove the cgroup $cg"
done
exit 0
"#
    )
}
