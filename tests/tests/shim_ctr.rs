//! `containerd-shim-kata-v2` under a real containerd (Debian's 1.6), driven
//! by `ctr` as a user would, with runc through the same containerd as the
//! control. containerd runs inside the KVM test host on PVM machines, on a
//! tmpfs of its own (overlayfs cannot stack on the test host's overlay
//! root), with its own root, state and socket.

use std::time::Duration;

use microvm_tests::{artifact, vm_host, workspace_binary, ExitStatus, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

const TIMEOUT: Duration = Duration::from_secs(600);

/// Starts a private containerd in `$R`, imports the busybox test image as
/// `$img`, runs `body`, then stops containerd and reports leftovers.
fn with_containerd(body: &str) -> microvm_tests::Output {
    let shim_dir = workspace_binary("containerd-shim-kata-v2")
        .unwrap()
        .parent()
        .unwrap()
        .display()
        .to_string();
    let image = artifact("busybox-oci.tar").unwrap().display().to_string();
    let script = format!(
        r#"set -u
export PATH={shim_dir}:$PATH MICROVM_AGENT_TIMEOUT=120
command -v containerd >/dev/null || {{ echo "containerd is not installed (Debian package containerd)" >&2; exit 90; }}
R=$(mktemp -d /tmp/containerd-XXXXXX); mount -t tmpfs tmpfs $R
cat > $R/config.toml <<C
version = 2
root = "$R/root"
state = "$R/state"
[grpc]
  address = "$R/c.sock"
[ttrpc]
  address = "$R/c.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
C
containerd --config $R/config.toml > $R/containerd.log 2>&1 &
cpid=$!
for i in $(seq 1 300); do ctr -a $R/c.sock version >/dev/null 2>&1 && break; sleep 0.2; done
ctr -a $R/c.sock image import --base-name docker.io/library/busybox-test {image} >/dev/null
img=docker.io/library/busybox-test:latest
c="ctr -a $R/c.sock"
{body}
kill $cpid; wait $cpid
echo "leftover processes: $(ps -eo args | grep -E '^[^ ]*(containerd-shim-kata-v2|microvm-vmm)' | wc -l)"
echo "leftover mounts: $(grep -c -E ' /run/microvm/' /proc/self/mountinfo)"
echo "leftover pods: $(ls /run/microvm/default 2>/dev/null | wc -l)"
umount -R $R; rmdir $R
"#
    );
    host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap()
}

#[test]
fn ctr_run_in_a_microvm_prints_and_passes_the_exit_code_like_runc() {
    let out = with_containerd(
        r#"$c run --rm --runtime io.containerd.runc.v2 $img runc-1 sh -c 'echo hi; exit 3'; echo "runc rc=$?"
$c run --rm --runtime io.containerd.kata.v2 $img kata-1 sh -c 'echo hi; echo "kernel $(uname -r)"; echo "boot $(cat /proc/sys/kernel/random/boot_id)"; exit 3'; echo "kata rc=$?"
echo "host kernel $(uname -r)"
echo "host boot $(cat /proc/sys/kernel/random/boot_id)""#,
    );
    let (stdout, stderr) = (out.stdout_text(), out.stderr_text());
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let field = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label:?} in:\n{stdout}\nstderr: {stderr}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("runc rc="), "3", "{stdout}");
    assert_eq!(field("kata rc="), "3", "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("hi\n").count(), 2, "{stdout}");
    assert_ne!(
        field("kernel "),
        field("host kernel "),
        "ran in the guest kernel"
    );
    assert_ne!(
        field("boot "),
        field("host boot "),
        "ran in another machine"
    );
    assert_eq!(field("leftover processes:"), "0", "{stdout}");
    assert_eq!(field("leftover mounts:"), "0", "{stdout}");
    assert_eq!(field("leftover pods:"), "0", "{stdout}");
}
