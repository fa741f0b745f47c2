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
//! default_maxvcpus = 0    # the most vCPUs a pod's VM gets, whatever its
//!                         # limits ask (0: the host's CPUs, at most 32)
//! default_maxmemory = 0   # the most MiB a pod's VM gets (0: the host's RAM)
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
    /// Kata's name: the most vCPUs a VM gets (0 or absent: see [`Sizing`]).
    pub default_maxvcpus: Option<u32>,
    /// Kata's name: the most memory a VM gets, MiB (0 or absent: the host's).
    pub default_maxmemory: Option<u32>,
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

/// The most vCPUs the VMM takes (its MP table's limit, `vmm`'s
/// `mptable::MAX_CPUS`).
pub const VMM_MAX_VCPUS: u8 = 32;

/// The largest VM a pod gets, whatever its sizing annotations or limits
/// ask: `default_maxvcpus` and `default_maxmemory`, each at most what the
/// host has (and the VMM takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    pub max_memory_mib: u32,
    pub max_vcpus: u8,
}

/// What the host has: its RAM in MiB and its CPUs.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub memory_mib: u32,
    pub cpus: usize,
}

impl Host {
    /// This host: `MemTotal` of /proc/meminfo, the CPUs this process may use.
    pub fn this() -> Self {
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
            })
            .unwrap_or(u64::MAX);
        Self {
            memory_mib: u32::try_from(memory_kib / 1024).unwrap_or(u32::MAX),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl Sizing {
    /// The maxima of `hypervisor` on `host`: 0 or absent means the host's.
    pub fn new(hypervisor: &Hypervisor, host: Host) -> Self {
        let host_cpus = u8::try_from(host.cpus)
            .unwrap_or(u8::MAX)
            .clamp(1, VMM_MAX_VCPUS);
        let max_vcpus = match hypervisor.default_maxvcpus {
            Some(n) if n > 0 => u8::try_from(n).unwrap_or(u8::MAX).min(host_cpus),
            _ => host_cpus,
        };
        let max_memory_mib = match hypervisor.default_maxmemory {
            Some(n) if n > 0 => n.min(host.memory_mib),
            _ => host.memory_mib,
        };
        Self {
            max_memory_mib,
            max_vcpus,
        }
    }
}

/// The pod's VM configuration: the configuration file's settings (the file
/// `option` names, else the one [`find`] finds) over the defaults; sets the
/// shim's log level. With the largest VM a pod may get on `host`.
pub fn sandbox_config(
    option: Option<&Path>,
    host: Host,
) -> Result<(SandboxConfig, Sizing), String> {
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
    let sizing = Sizing::new(&h, host);
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
    Ok((config, sizing))
}

/// Grows a pod's VM by its workload, as Kata's static sandbox sizing does:
/// the configured size is what the guest itself needs, the containers'
/// limits come on top; then clamps both to `sizing` (a pod asking for
/// 7 TiB or 64 CPUs gets the maxima, and starts). Returns what was
/// clamped, for the shim's log.
pub fn size_for_workload(
    config: &mut SandboxConfig,
    workload: crate::shim::spec::PodWorkload,
    sizing: Sizing,
) -> Vec<String> {
    let mut clamped = Vec::new();
    let memory_mib = config.memory_mib.saturating_add(workload.memory_mib);
    config.memory_mib = memory_mib.min(sizing.max_memory_mib);
    if config.memory_mib < memory_mib {
        clamped.push(format!(
            "memory {memory_mib} MiB clamped to default_maxmemory {} MiB",
            sizing.max_memory_mib
        ));
    }
    let cpus = u32::from(config.cpus).saturating_add(workload.vcpus);
    config.cpus = cpus.min(u32::from(sizing.max_vcpus)).max(1) as u8;
    if u32::from(config.cpus) < cpus {
        clamped.push(format!(
            "{cpus} vCPUs clamped to default_maxvcpus {}",
            sizing.max_vcpus
        ));
    }
    clamped
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
        let roomy = Sizing {
            max_memory_mib: 1 << 20,
            max_vcpus: 8,
        };
        assert!(size_for_workload(&mut config, workload, roomy).is_empty());
        assert_eq!((config.memory_mib, config.cpus), (768, 3));
        let clamped = size_for_workload(
            &mut config,
            workload,
            Sizing {
                max_memory_mib: 1000,
                max_vcpus: 4,
            },
        );
        assert_eq!((config.memory_mib, config.cpus), (1000, 4));
        assert_eq!(
            clamped,
            [
                "memory 1280 MiB clamped to default_maxmemory 1000 MiB",
                "5 vCPUs clamped to default_maxvcpus 4"
            ]
        );
    }

    #[test]
    fn huge_limits_are_clamped_to_the_configured_maxima() {
        let mut config =
            SandboxConfig::with_assets(Some("/k".into()), Some("/i".into()), Some("/v".into()))
                .unwrap();
        config.memory_mib = 256;
        config.cpus = 1;
        // limits.memory: 7Ti, limits.cpu: 64.
        let workload = PodWorkload {
            memory_mib: 7 << 20,
            vcpus: 64,
        };
        let host = Host {
            memory_mib: 16 << 10,
            cpus: 96,
        };
        let defaults = Sizing::new(&Hypervisor::default(), host);
        assert_eq!(
            defaults,
            Sizing {
                max_memory_mib: 16 << 10,
                max_vcpus: VMM_MAX_VCPUS
            },
            "the host's RAM; its CPUs, at most what the VMM takes"
        );
        let clamped = size_for_workload(&mut config, workload, defaults);
        assert_eq!((config.memory_mib, config.cpus), (16 << 10, 32));
        assert_eq!(clamped.len(), 2, "{clamped:?}");
        // Configured maxima, themselves at most the host's.
        let file: ConfigFile =
            toml::from_str("[hypervisor]\ndefault_maxvcpus = 4\ndefault_maxmemory = 2048\n")
                .unwrap();
        let sizing = Sizing::new(&file.hypervisor, host);
        assert_eq!((sizing.max_memory_mib, sizing.max_vcpus), (2048, 4));
        // The shipped configuration names them, 0: the host's.
        let shipped: ConfigFile =
            toml::from_str(include_str!("../../deploy/configuration.toml")).unwrap();
        assert_eq!(Sizing::new(&shipped.hypervisor, host), defaults);
        let file: ConfigFile =
            toml::from_str("[hypervisor]\ndefault_maxvcpus = 300\ndefault_maxmemory = 99999999\n")
                .unwrap();
        let sizing = Sizing::new(
            &file.hypervisor,
            Host {
                memory_mib: 4096,
                cpus: 2,
            },
        );
        assert_eq!((sizing.max_memory_mib, sizing.max_vcpus), (4096, 2));
        // The host's own figures are read.
        let this = Host::this();
        assert!(this.memory_mib > 0 && this.memory_mib < u32::MAX && this.cpus >= 1);
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
