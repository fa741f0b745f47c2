//! `microvm install`: puts the runtime where containerd and users find it.
//!
//! Copies the binaries (`microvm`, `microvm-vmm`, `containerd-shim-kata-v2`,
//! found next to the running `microvm`) into a bin directory on PATH, the
//! guest assets (kernel, initramfs, default rootfs, found as
//! [`crate::config`] finds them) into the share directory, writes the
//! configuration file naming them (unless one exists), and prints the
//! containerd stanza for runtime `kata`, or adds it to containerd's
//! configuration when asked to ([`containerd`]).

pub mod containerd;

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{self, INITRD_FILE, KERNEL_FILE, ROOTFS_DIR, VMM_BINARY};

/// The binaries installed, from the directory of the running `microvm`.
pub const BINARIES: [&str; 3] = ["microvm", VMM_BINARY, "containerd-shim-kata-v2"];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Asset(#[from] config::AssetMissing),
    #[error(transparent)]
    Containerd(#[from] containerd::ContainerdConfigError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// Where things go.
#[derive(Debug, Clone)]
pub struct InstallPaths {
    pub bin_dir: PathBuf,
    pub share_dir: PathBuf,
    /// The configuration file written (kept if it exists).
    pub config_file: PathBuf,
    /// containerd's configuration, to which runtime `kata` is added (see
    /// [`containerd`]); `None` only prints the stanza.
    pub containerd_config: Option<PathBuf>,
}

impl Default for InstallPaths {
    fn default() -> Self {
        InstallPaths {
            bin_dir: "/usr/local/bin".into(),
            share_dir: "/usr/share/microvm".into(),
            config_file: crate::shim_config::DEFAULT_PATH.into(),
            containerd_config: None,
        }
    }
}

/// What [`install`] did, for the user.
#[derive(Debug, Default)]
pub struct InstallReport {
    pub copied: Vec<PathBuf>,
    /// The configuration file was there already and was kept.
    pub config_kept: bool,
    /// What was done to containerd's configuration (which then needs a
    /// restart of containerd), if one was named.
    pub containerd_edit: Option<containerd::Edit>,
    /// What containerd's configuration needs: runtimes `runc` and `kata`.
    pub stanza: String,
}

/// Installs from the directory `from_bin` (the running binary's).
pub fn install(from_bin: &Path, paths: &InstallPaths) -> Result<InstallReport, InstallError> {
    let mut report = InstallReport::default();
    let sources = Sources::find(from_bin)?;
    for dir in [&paths.bin_dir, &paths.share_dir] {
        fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    }
    for (name, source) in BINARIES.iter().zip(&sources.binaries) {
        let target = paths.bin_dir.join(name);
        copy_file(source, &target)?;
        report.copied.push(target);
    }
    for (source, name) in [
        (&sources.kernel, KERNEL_FILE),
        (&sources.initrd, INITRD_FILE),
    ] {
        let target = paths.share_dir.join(name);
        copy_file(source, &target)?;
        report.copied.push(target);
    }
    let rootfs = paths.share_dir.join(ROOTFS_DIR);
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).map_err(io_error("replacing", &rootfs))?;
    }
    copy_tree(&sources.rootfs, &rootfs)?;
    report.copied.push(rootfs);

    report.config_kept = paths.config_file.exists();
    if !report.config_kept {
        if let Some(dir) = paths.config_file.parent() {
            fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        }
        fs::write(&paths.config_file, configuration_toml(paths))
            .map_err(io_error("writing", &paths.config_file))?;
    }

    report.stanza = containerd::full_stanza(&paths.config_file);
    if let Some(file) = &paths.containerd_config {
        report.containerd_edit = Some(containerd::add_kata(file, &paths.config_file)?);
    }
    Ok(report)
}

/// What gets installed, from where.
struct Sources {
    binaries: Vec<PathBuf>,
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
}

impl Sources {
    fn find(from_bin: &Path) -> Result<Sources, InstallError> {
        let mut binaries = Vec::new();
        for name in BINARIES {
            let path = from_bin.join(name);
            if !path.is_file() {
                return Err(InstallError::Invalid(format!(
                    "{} is missing: build the workspace first (cargo build --release)",
                    path.display()
                )));
            }
            binaries.push(path);
        }
        Ok(Sources {
            binaries,
            kernel: config::default_kernel()?,
            initrd: config::default_initrd()?,
            rootfs: config::default_rootfs()?,
        })
    }
}

/// The configuration file for installed assets: every setting, with the
/// defaults, so it documents itself.
pub fn configuration_toml(paths: &InstallPaths) -> String {
    let share = paths.share_dir.display();
    let bin = paths.bin_dir.display();
    format!(
        r#"# microvm's configuration (containerd-shim-kata-v2 reads it for every pod).
# Found as: containerd's runtime option ConfigPath, else $MICROVM_CONFIG,
# else /etc/microvm/configuration.toml.

[runtime]
# The shim's log level (its lines go to containerd's log): error, warn, info, debug, trace.
log_level = "info"

[hypervisor]
kernel = "{share}/{KERNEL_FILE}"
initrd = "{share}/{INITRD_FILE}"
vmm = "{bin}/{VMM_BINARY}"
vcpus = 1
# Guest memory. A pod costs this plus the VMM's own ~10 MiB: set the
# RuntimeClass's overhead.podFixed.memory to memory_mib + 16 MiB.
memory_mib = {memory}
# The largest VM a pod gets, whatever its containers' limits ask (the shim
# clamps to these and logs it): vCPUs (0: the host's CPUs, at most 32) and
# MiB (0: the host's RAM).
default_maxvcpus = 0
default_maxmemory = 0
# The guest's serial console, for debugging (one file per host; off by default).
# console = "/var/log/microvm-console.log"
# Extra guest kernel command line.
kernel_params = ""

[agent]
# How long the guest agent may take to answer once the VMM runs.
timeout_secs = 30
# A running guest whose agent leaves a health check (asked every 5 s)
# unanswered this long is stuck: its VM is killed and its containers exit
# with status 255. 0: never.
unresponsive_secs = 30
"#,
        memory = crate::shim_config::DEFAULT_MEMORY_MIB,
    )
}

fn copy_file(source: &Path, target: &Path) -> Result<(), InstallError> {
    // Write beside and rename: a running binary is replaced, not changed.
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = target.with_file_name(format!(".{name}.installing"));
    fs::copy(source, &temporary).map_err(io_error("copying to", &temporary))?;
    let mode = fs::metadata(source)
        .map_err(io_error("reading", source))?
        .permissions()
        .mode();
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(io_error("setting the mode of", &temporary))?;
    fs::rename(&temporary, target).map_err(io_error("installing", target))
}

/// Copies a directory tree: directories, regular files and symlinks with
/// their modes (a rootfs has nothing else that matters to a container).
fn copy_tree(source: &Path, target: &Path) -> Result<(), InstallError> {
    let meta = fs::symlink_metadata(source).map_err(io_error("reading", source))?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        let link = fs::read_link(source).map_err(io_error("reading the link", source))?;
        symlink(link, target).map_err(io_error("creating the link", target))
    } else if kind.is_dir() {
        fs::create_dir(target).map_err(io_error("creating", target))?;
        for entry in fs::read_dir(source).map_err(io_error("listing", source))? {
            let entry = entry.map_err(io_error("listing", source))?;
            copy_tree(&entry.path(), &target.join(entry.file_name()))?;
        }
        fs::set_permissions(target, meta.permissions())
            .map_err(io_error("setting the mode of", target))
    } else if kind.is_file() {
        fs::copy(source, target).map_err(io_error("copying to", target))?;
        Ok(())
    } else {
        tracing::warn!(
            "not copying {} (not a file, directory or link)",
            source.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stanza_and_the_configuration_parse() {
        let paths = InstallPaths {
            bin_dir: "/opt/m/bin".into(),
            share_dir: "/opt/m/share".into(),
            config_file: "/opt/m/etc/configuration.toml".into(),
            containerd_config: None,
        };
        let file: crate::shim_config::ConfigFile =
            toml::from_str(&configuration_toml(&paths)).unwrap();
        assert_eq!(
            file.hypervisor.kernel,
            Some(PathBuf::from("/opt/m/share/vmlinux"))
        );
        assert_eq!(file.runtime.log_level.as_deref(), Some("info"));
        assert_eq!(file.agent.unresponsive_secs, Some(30));
        let stanza: toml::Value =
            toml::from_str(&containerd::full_stanza(&paths.config_file)).unwrap();
        let kata =
            &stanza["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["kata"];
        assert_eq!(kata["runtime_type"].as_str(), Some("io.containerd.kata.v2"));
        assert_eq!(
            kata["options"]["ConfigPath"].as_str(),
            Some("/opt/m/etc/configuration.toml")
        );
    }

    /// deploy/ holds what `microvm install` writes and prints with the
    /// default paths, so the two cannot drift apart (`MICROVM_BLESS=1`
    /// rewrites deploy/ from the code).
    #[test]
    fn deploy_holds_the_default_stanza_and_configuration() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let paths = InstallPaths::default();
        let expected = [
            ("configuration.toml", configuration_toml(&paths)),
            (
                "containerd-kata.toml",
                format!(
                    "{}{}",
                    containerd::HEADER,
                    containerd::full_stanza(&paths.config_file)
                ),
            ),
        ];
        for (name, text) in expected {
            let path = deploy.join(name);
            if std::env::var_os("MICROVM_BLESS").is_some() {
                fs::write(&path, &text).unwrap();
            }
            let found = fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                found,
                text,
                "{} is stale: MICROVM_BLESS=1 cargo test -p runtime",
                path.display()
            );
        }
    }

    #[test]
    fn a_tree_is_copied_with_links_and_modes() {
        let dir = std::env::temp_dir().join(format!("microvm-install-test-{}", std::process::id()));
        let source = dir.join("src");
        fs::create_dir_all(source.join("bin")).unwrap();
        fs::write(source.join("bin/busybox"), b"x").unwrap();
        fs::set_permissions(
            source.join("bin/busybox"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        symlink("busybox", source.join("bin/sh")).unwrap();
        copy_tree(&source, &dir.join("dst")).unwrap();
        assert_eq!(
            fs::read_link(dir.join("dst/bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
        let mode = fs::metadata(dir.join("dst/bin/busybox"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        fs::remove_dir_all(&dir).unwrap();
    }
}
