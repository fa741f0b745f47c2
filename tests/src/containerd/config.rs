//! What a private containerd is given: its `config.toml`, and the pause
//! image CRI uses for pod sandboxes.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};

use crate::{artifact, target_dir};

/// containerd's `config.toml` (version 2) for an instance in `dir`: root,
/// state, sockets and the opt plugin's directory inside it; CRI with
/// `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE), the
/// imported pause image, no AppArmor, a stream server on a free port,
/// CNI configuration from `dir/cni` (empty unless the instance has pod
/// networking: see `network.rs`),
/// and the runtime handlers `runc` (io.containerd.runc.v2, the default) and
/// `kata` (io.containerd.kata.v2, with the runtime option `ConfigPath` =
/// `kata_config` when given).
pub fn config_toml(dir: &Path, debug: bool, kata_config: Option<&str>) -> String {
    let d = dir.display();
    let level = if debug { "debug" } else { "info" };
    let kata_options = kata_config
        .map(|path| {
            format!(
                "\n    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata.options]\n      ConfigPath = \"{path}\"\n"
            )
        })
        .unwrap_or_default();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters and tracing the tests never use: less to load under TCG.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "{level}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "{RUNC_RUNTIME}"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
      runtime_type = "{KATA_RUNTIME}"
      pod_annotations = ["io.katacontainers.*"]
      privileged_without_host_devices = true
{kata_options}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
    )
}

/// `text` (a version 2 configuration without `root`, `state`, `[grpc]` or
/// `[ttrpc]`) made the configuration of an instance in `dir`: its root,
/// state and sockets there.
pub(crate) fn private(dir: &Path, text: &str) -> String {
    let d = dir.display();
    format!(
        "root = \"{d}/root\"\nstate = \"{d}/state\"\n{}\n\n[grpc]\n  address = \"{d}/containerd.sock\"\n\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
        text.trim_end()
    )
}

/// The runc shim's runtime name (`ctr run --runtime`).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Our shim's runtime name: containerd runs `containerd-shim-kata-v2`.
pub const KATA_RUNTIME: &str = "io.containerd.kata.v2";
/// The busybox test image (`build/busybox-oci.tar`, Cmd `/bin/sh`), in the
/// instance's namespace and in `k8s.io`.
pub const IMAGE: &str = "docker.io/library/busybox-test:latest";
pub(crate) const IMAGE_BASE: &str = "docker.io/library/busybox-test";
/// CRI's sandbox image: busybox with Cmd `/bin/sleep 2147483647`, so CRI
/// never pulls.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";
pub(crate) const PAUSE_BASE: &str = "registry.k8s.io/pause";

/// Bumped when the pause image's recipe changes.
const PAUSE_RECIPE: u32 = 1;

/// The pause image as an OCI archive tagged `3.6`, made with umoci from the
/// busybox test image, cached in `target/microvm-containerd/` under a name
/// derived from the test image's bytes (a new name for new content, so a
/// test host that read an older one over 9p never sees stale data).
pub fn pause_archive() -> Result<PathBuf> {
    let layout = artifact("busybox-oci")?;
    let archive = artifact("busybox-oci.tar")?;
    let bytes =
        std::fs::read(&archive).with_context(|| format!("reading {}", archive.display()))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (PAUSE_RECIPE, bytes).hash(&mut hasher);
    let cache = target_dir().join("microvm-containerd");
    let out = cache.join(format!("pause-{:016x}.tar", hasher.finish()));
    if out.is_file() {
        return Ok(out);
    }
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let work = cache.join(format!(
        "pause-tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let result = build_pause(&layout, &work, &out);
    let _ = std::fs::remove_dir_all(&work);
    result.with_context(|| format!("making the pause image {}", out.display()))?;
    Ok(out)
}

fn build_pause(layout: &Path, work: &Path, out: &Path) -> Result<()> {
    let copy = work.join("layout");
    std::fs::create_dir_all(work)?;
    let copy_s = copy.display().to_string();
    let tagged = format!("{copy_s}:latest");
    let tar = work.join("pause.tar");
    let steps: [&[&str]; 6] = [
        &["cp", "-a", &layout.display().to_string(), &copy_s],
        &[
            "umoci",
            "config",
            "--image",
            &tagged,
            "--tag",
            "3.6",
            "--config.cmd",
            "/bin/sleep",
            "--config.cmd",
            "2147483647",
        ],
        &["umoci", "rm", "--image", &tagged],
        &["umoci", "gc", "--layout", &copy_s],
        // umoci writes blobs 0600.
        &["chmod", "-R", "a+rX", &copy_s],
        &["tar", "-C", &copy_s, "-cf", &tar.display().to_string(), "."],
    ];
    for step in steps {
        let output = Command::new(step[0])
            .args(&step[1..])
            .output()
            .with_context(|| format!("running {} (apt-get install umoci)", step[0]))?;
        if !output.status.success() {
            bail!(
                "{} failed ({}): {}",
                step.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    std::fs::rename(&tar, out).with_context(|| format!("moving the archive to {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_everything_in_the_instance_directory() {
        let toml = config_toml(Path::new("/tmp/x"), false, Some("/etc/m.toml"));
        for line in [
            "root = \"/tmp/x/root\"",
            "address = \"/tmp/x/containerd.sock\"",
        ] {
            assert!(toml.contains(line), "{line} in {toml}");
        }
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains("runtime_type = \"io.containerd.kata.v2\""));
    }
}
