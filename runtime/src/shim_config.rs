//! The shim's configuration file, found like Kata's: the runtime option
//! `ConfigPath` (containerd's `[...runtimes.kata.options] ConfigPath = …`,
//! or `ctr run --runtime-config-path`), else `$MICROVM_CONFIG`, else
//! `/etc/microvm/configuration.toml` if it exists; without one the
//! built-in defaults apply (1 vCPU, 256 MiB, assets from the build tree or
//! /usr/share/microvm).
//!
//! ```toml
//! [runtime]
//! log_level = "info"      # the shim's log (containerd's log): error … trace
//!
//! [hypervisor]
//! kernel = "/usr/share/microvm/vmlinux"
//! initrd = "/usr/share/microvm/microvm-initramfs.cpio"
//! vmm = "/usr/bin/microvm-vmm"
//! vcpus = 1
//! memory_mib = 256        # the pod's overhead is this plus the VMM (~10 MiB)
//! console = "/var/log/microvm/console.log"   # the guest's serial console
//! kernel_params = ""
//! jail = true             # confine the VMM (namespaces, root, capabilities)
//! seccomp = true          # the VMM's per-thread system call allow-lists
//!
//! [agent]
//! timeout_secs = 30       # how long the guest agent may take to answer
//! unresponsive_secs = 30  # a running guest that leaves a health check
//!                         # unanswered this long is stuck: its VM is killed
//!                         # and its containers exit 255 (0: never)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::SandboxConfig;

pub const DEFAULT_PATH: &str = "/etc/microvm/configuration.toml";
/// Guest memory when the file says nothing (containers need more than the
/// bare `microvm run` default).
pub const DEFAULT_MEMORY_MIB: u32 = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub hypervisor: Hypervisor,
    #[serde(default)]
    pub agent: Agent,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    pub log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hypervisor {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u32>,
    pub console: Option<PathBuf>,
    pub kernel_params: Option<String>,
    pub jail: Option<bool>,
    pub seccomp: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub timeout_secs: Option<u64>,
    pub unresponsive_secs: Option<u64>,
}

/// Parses the file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the configuration {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("configuration {}: {e}", path.display()))
}

/// The configuration file in effect, if any: `option` (the runtime
/// option `ConfigPath`) first.
pub fn find(option: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = option {
        return Some(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("MICROVM_CONFIG") {
        return Some(PathBuf::from(path));
    }
    Path::new(DEFAULT_PATH)
        .is_file()
        .then(|| PathBuf::from(DEFAULT_PATH))
}

/// The `ConfigPath` of containerd's runtime options
/// (`runtimeoptions.v1.Options`: `type_url` = 1, `config_path` = 2), if
/// `type_url` names them and it is set.
pub fn config_path_option(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>, String> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    let mut input = protobuf::CodedInputStream::from_bytes(value);
    let bad = |e: protobuf::Error| format!("runtime options ({type_url}): {e}");
    let mut config_path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        if tag == (2 << 3) | 2 {
            config_path = Some(input.read_string().map_err(bad)?);
        } else {
            let wire_type = protobuf::rt::WireType::new(tag & 7).ok_or_else(|| {
                format!("runtime options ({type_url}): bad wire type in tag {tag}")
            })?;
            input.skip_field(wire_type).map_err(bad)?;
        }
    }
    Ok(config_path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

/// The pod's VM configuration: the configuration file's settings (the file
/// `option` names, else the one [`find`] finds) over the defaults; sets the
/// shim's log level.
pub fn sandbox_config(option: Option<&Path>) -> Result<SandboxConfig, String> {
    let file = match find(option) {
        Some(path) => {
            let file = load(&path)?;
            if let Some(level) = &file.runtime.log_level {
                let level: log::LevelFilter = level.parse().map_err(|_| {
                    format!(
                        "configuration {}: log_level {level:?} is not one of off, error, warn, info, debug, trace",
                        path.display()
                    )
                })?;
                log::set_max_level(level);
            }
            file
        }
        None => ConfigFile::default(),
    };
    let h = file.hypervisor;
    let mut config = SandboxConfig::with_assets(h.kernel, h.initrd, h.vmm).map_err(|e| {
        format!(
            "{e} (or set it in {})",
            find(option)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
                .display()
        )
    })?;
    config.memory_mib = h.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    if let Some(vcpus) = h.vcpus {
        config.cpus = vcpus;
    }
    config.console = h.console.or(config.console);
    if let Some(params) = h.kernel_params {
        config.extra_cmdline = params;
    }
    if let Some(jail) = h.jail {
        config.jail = jail;
    }
    if h.seccomp == Some(false) {
        config.seccomp = crate::config::Seccomp::Off;
    }
    if let Some(secs) = file.agent.timeout_secs {
        config.agent_timeout = Duration::from_secs(secs);
    }
    if let Some(secs) = file.agent.unresponsive_secs {
        config.agent_unresponsive = crate::config::unresponsive_limit(secs);
    }
    Ok(config)
}

/// Grows a pod's VM by its workload, as Kata's static sandbox sizing does:
/// the configured size is what the guest itself needs, the containers'
/// limits come on top (memory in full; vCPUs up to `host_cpus`, as more
/// vCPUs than host CPUs only add contention).
pub fn size_for_workload(
    config: &mut SandboxConfig,
    workload: crate::shim::spec::PodWorkload,
    host_cpus: usize,
) {
    config.memory_mib = config.memory_mib.saturating_add(workload.memory_mib);
    let cpus = u32::from(config.cpus).saturating_add(workload.vcpus);
    let limit = u32::try_from(host_cpus)
        .unwrap_or(u32::MAX)
        .clamp(1, u32::from(u8::MAX));
    config.cpus = cpus.min(limit.max(u32::from(config.cpus))) as u8;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::spec::PodWorkload;

    #[test]
    fn a_pods_workload_is_added_to_its_vm() {
        let mut config =
            SandboxConfig::with_assets(Some("/k".into()), Some("/i".into()), Some("/v".into()))
                .unwrap();
        config.memory_mib = 256;
        config.cpus = 1;
        let workload = PodWorkload {
            memory_mib: 512,
            vcpus: 2,
        };
        size_for_workload(&mut config, workload, 8);
        assert_eq!((config.memory_mib, config.cpus), (768, 3));
        // No more vCPUs than the host has, but never fewer than configured.
        size_for_workload(&mut config, workload, 4);
        assert_eq!((config.memory_mib, config.cpus), (1280, 4));
        config.cpus = 2;
        size_for_workload(&mut config, PodWorkload::default(), 1);
        assert_eq!((config.memory_mib, config.cpus), (1280, 2));
    }

    #[test]
    fn a_full_file_parses_and_unknown_keys_are_named() {
        let file: ConfigFile = toml::from_str(
            "[hypervisor]\nvcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\n[agent]\ntimeout_secs = 9\nunresponsive_secs = 0\n",
        )
        .unwrap();
        assert_eq!(file.hypervisor.vcpus, Some(2));
        assert_eq!(file.hypervisor.memory_mib, Some(512));
        assert_eq!(file.agent.timeout_secs, Some(9));
        assert_eq!(file.agent.unresponsive_secs, Some(0));
        let err = toml::from_str::<ConfigFile>("[hypervisor]\nmemory = 1\n").unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn the_config_path_runtime_option_is_decoded() {
        // type_url = "runtimeoptions.v1.Options", config_path = "/etc/m.toml"
        let mut value = vec![0x0a, 25];
        value.extend_from_slice(b"runtimeoptions.v1.Options");
        value.extend_from_slice(&[0x12, 11]);
        value.extend_from_slice(b"/etc/m.toml");
        assert_eq!(
            config_path_option("runtimeoptions.v1.Options", &value).unwrap(),
            Some(PathBuf::from("/etc/m.toml"))
        );
        assert_eq!(config_path_option("runc.v1.Options", &value).unwrap(), None);
        let err = config_path_option("runtimeoptions.v1.Options", &[0x12, 40, b'/']).unwrap_err();
        assert!(err.contains("runtime options"), "{err}");
    }
}
