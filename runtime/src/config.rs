//! Where the runtime finds its pieces (guest kernel, initramfs, VMM binary)
//! and how big a VM it starts.
//!
//! Assets are looked up, first match wins: the explicit option, then the
//! `MICROVM_KERNEL` / `MICROVM_INITRD` / `MICROVM_VMM` environment variables,
//! then the `build/` directory of the source tree the binary was built in
//! (where `scripts/setup.sh` puts them), then `/usr/share/microvm/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::network::NetDevices;

pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "microvm-initramfs.cpio";
pub const VMM_BINARY: &str = "microvm-vmm";
pub const ROOTFS_DIR: &str = "busybox-rootfs";
const SHARE_DIR: &str = "/usr/share/microvm";

/// How long a running guest may leave the agent's health check unanswered
/// by default: far beyond what a busy but working guest needs.
pub const DEFAULT_AGENT_UNRESPONSIVE: Duration = Duration::from_secs(30);

/// The health-check limit for a setting in seconds: 0 turns it off.
pub fn unresponsive_limit(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

#[derive(Debug)]
pub struct SandboxConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vmm: PathBuf,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Guest serial console: `None` discards it.
    pub console: Option<PathBuf>,
    pub extra_cmdline: String,
    /// How long the guest agent may take to answer after the VMM starts.
    pub agent_timeout: Duration,
    /// How long a running guest may leave a health check unanswered before
    /// it counts as stuck and its VM is killed (see [`crate::health`]);
    /// `None`: never. `MICROVM_AGENT_UNRESPONSIVE` (seconds, 0 for never),
    /// else [`DEFAULT_AGENT_UNRESPONSIVE`].
    pub agent_unresponsive: Option<Duration>,
    /// A host directory the guest sees over virtio-fs (tag `microvm`).
    pub shared_dir: Option<PathBuf>,
    /// Host paths bind-mounted into the shared directory (which defaults to
    /// `shared/` in the sandbox's state directory), in the VMM's own mount
    /// namespace: they vanish with the VMM, however it ends.
    pub shared_binds: Vec<SharedBind>,
    /// Where the sandbox keeps its state (sockets, logs, the shared
    /// directory); a fresh directory under the temp dir when `None`. It is
    /// removed when the sandbox ends.
    pub state_dir: Option<PathBuf>,
    /// Make the shared directory a shared mount in our mount namespace, so
    /// that what is mounted under it later (a container's rootfs, by the
    /// containerd shim) also appears in the VMM's namespace and so in the
    /// guest.
    pub late_mounts: bool,
    /// Confine the VMM (`microvm-vmm --jail`: its own PID, mount, network,
    /// IPC and UTS namespaces, a root holding only the shares, only the
    /// file server's capabilities). On unless `MICROVM_JAIL=off` or the
    /// configuration's `[hypervisor] jail = false` (for debugging and
    /// benchmarks).
    pub jail: bool,
    /// The VMM's per-thread seccomp allow-lists (`microvm-vmm --seccomp`):
    /// `MICROVM_SECCOMP=off|log`, `[hypervisor] seccomp = false`, `microvm
    /// run --seccomp off`.
    pub seccomp: Seccomp,
    /// The cgroup the VMM runs in (see [`crate::cgroup`]): the sandbox's
    /// `linux.cgroupsPath` for a pod, else `/microvm/<name>` made for it
    /// and removed when it ends.
    pub cgroup_path: Option<String>,
    /// The guest NICs (virtio-net on taps, see [`crate::network`]).
    /// [`crate::sandbox::Sandbox::start`] takes the taps out and hands them
    /// to the VMM, which then holds the only copy: a tap lives exactly as
    /// long as its VMM.
    pub net: NetDevices,
}

pub use protocols::vmm::Seccomp;

/// A host path shown in the sandbox's shared directory.
#[derive(Debug, Clone)]
pub struct SharedBind {
    pub source: PathBuf,
    /// Relative path inside the shared directory.
    pub target: PathBuf,
    /// Show `source` read-only under a writable overlay (upper layer on a
    /// tmpfs of the VMM's): for rootfs that others share, such as cached
    /// images and the default rootfs, which a container must not change.
    pub copy_on_write: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("no {what} found (looked in: {looked}); {hint}")]
pub struct AssetMissing {
    pub what: &'static str,
    pub looked: String,
    pub hint: &'static str,
}

/// The source tree's `build/` directory, if this binary runs from
/// `<tree>/target/<profile>/`.
fn source_build_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let tree = exe.parent()?.parent()?.parent()?;
    Some(tree.join("build"))
}

fn find_asset(
    env: &str,
    file: &str,
    what: &'static str,
    hint: &'static str,
) -> Result<PathBuf, AssetMissing> {
    find_asset_where(env, file, what, hint, Path::is_file)
}

fn find_asset_where(
    env: &str,
    file: &str,
    what: &'static str,
    hint: &'static str,
    usable: fn(&Path) -> bool,
) -> Result<PathBuf, AssetMissing> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os(env) {
        candidates.push(PathBuf::from(path));
    } else {
        if let Some(dir) = source_build_dir() {
            candidates.push(dir.join(file));
        }
        candidates.push(Path::new(SHARE_DIR).join(file));
    }
    candidates
        .iter()
        .find(|p| usable(p))
        .cloned()
        .ok_or_else(|| AssetMissing {
            what,
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            hint,
        })
}

pub fn default_kernel() -> Result<PathBuf, AssetMissing> {
    find_asset(
        "MICROVM_KERNEL",
        KERNEL_FILE,
        "guest kernel",
        "run scripts/setup.sh or pass --kernel",
    )
}

/// The container rootfs used when the user names no image: busybox.
pub fn default_rootfs() -> Result<PathBuf, AssetMissing> {
    find_asset_where(
        "MICROVM_ROOTFS",
        ROOTFS_DIR,
        "default container rootfs",
        "run scripts/setup.sh or pass --rootfs/--image",
        Path::is_dir,
    )
}

pub fn default_initrd() -> Result<PathBuf, AssetMissing> {
    find_asset(
        "MICROVM_INITRD",
        INITRD_FILE,
        "guest initramfs",
        "run scripts/setup.sh or pass --initrd",
    )
}

/// The VMM binary: `MICROVM_VMM`, else next to this executable, else on PATH.
pub fn default_vmm() -> Result<PathBuf, AssetMissing> {
    if let Some(path) = std::env::var_os("MICROVM_VMM") {
        return Ok(PathBuf::from(path));
    }
    let mut candidates: Vec<PathBuf> = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(VMM_BINARY)))
        .into_iter()
        .collect();
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|dir| dir.join(VMM_BINARY)));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(AssetMissing {
            what: "microvm-vmm binary",
            looked: "next to this program and on PATH".into(),
            hint: "build the workspace (cargo build) or set MICROVM_VMM",
        })
}

impl SandboxConfig {
    /// The defaults: 1 vCPU, 128 MiB, no console, assets found as above.
    pub fn with_defaults(
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
    ) -> Result<Self, AssetMissing> {
        Self::with_assets(kernel, initrd, None)
    }

    /// The defaults, with the assets given looked up no further.
    pub fn with_assets(
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        vmm: Option<PathBuf>,
    ) -> Result<Self, AssetMissing> {
        let seconds = |name: &str| -> Option<u64> { std::env::var(name).ok()?.parse().ok() };
        let agent_timeout = Duration::from_secs(seconds("MICROVM_AGENT_TIMEOUT").unwrap_or(30));
        let agent_unresponsive = unresponsive_limit(
            seconds("MICROVM_AGENT_UNRESPONSIVE").unwrap_or(DEFAULT_AGENT_UNRESPONSIVE.as_secs()),
        );
        Ok(Self {
            kernel: match kernel {
                Some(path) => path,
                None => default_kernel()?,
            },
            initrd: match initrd {
                Some(path) => path,
                None => default_initrd()?,
            },
            vmm: match vmm {
                Some(path) => path,
                None => default_vmm()?,
            },
            cpus: 1,
            memory_mib: 128,
            console: None,
            extra_cmdline: String::new(),
            agent_timeout,
            agent_unresponsive,
            shared_dir: None,
            shared_binds: Vec::new(),
            state_dir: None,
            late_mounts: false,
            jail: !matches!(
                std::env::var("MICROVM_JAIL").as_deref(),
                Ok("off" | "0" | "false")
            ),
            seccomp: std::env::var("MICROVM_SECCOMP")
                .ok()
                .and_then(|text| text.parse().ok())
                .unwrap_or(Seccomp::On),
            cgroup_path: None,
            net: NetDevices::default(),
        })
    }
}
