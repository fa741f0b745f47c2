//! The shim's configuration file, found like Kata's: `$MICROVM_CONFIG`,
//! else `/etc/microvm/configuration.toml` if it exists; without one the
//! built-in defaults apply (1 vCPU, 256 MiB, assets from the build tree or
//! /usr/share/microvm).
//!
//! ```toml
//! [hypervisor]
//! kernel = "/usr/share/microvm/vmlinux"
//! initrd = "/usr/share/microvm/microvm-initramfs.cpio"
//! vmm = "/usr/bin/microvm-vmm"
//! vcpus = 1
//! memory_mib = 256        # the pod's overhead is this plus the VMM (~10 MiB)
//! console = "/var/log/microvm/console.log"   # the guest's serial console
//! kernel_params = ""
//!
//! [agent]
//! timeout_secs = 30       # how long the guest agent may take to answer
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
    pub hypervisor: Hypervisor,
    #[serde(default)]
    pub agent: Agent,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub timeout_secs: Option<u64>,
}

/// Parses the file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the configuration {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("configuration {}: {e}", path.display()))
}

/// The configuration file in effect, if any.
pub fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MICROVM_CONFIG") {
        return Some(PathBuf::from(path));
    }
    Path::new(DEFAULT_PATH)
        .is_file()
        .then(|| PathBuf::from(DEFAULT_PATH))
}

/// `config` with the configuration file's settings applied.
pub fn apply(mut config: SandboxConfig) -> Result<SandboxConfig, String> {
    config.memory_mib = DEFAULT_MEMORY_MIB;
    let Some(path) = find() else {
        return Ok(config);
    };
    let file = load(&path)?;
    let h = file.hypervisor;
    if let Some(kernel) = h.kernel {
        config.kernel = kernel;
    }
    if let Some(initrd) = h.initrd {
        config.initrd = initrd;
    }
    if let Some(vmm) = h.vmm {
        config.vmm = vmm;
    }
    if let Some(vcpus) = h.vcpus {
        config.cpus = vcpus;
    }
    if let Some(memory) = h.memory_mib {
        config.memory_mib = memory;
    }
    config.console = h.console.or(config.console);
    if let Some(params) = h.kernel_params {
        config.extra_cmdline = params;
    }
    if let Some(secs) = file.agent.timeout_secs {
        config.agent_timeout = Duration::from_secs(secs);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_and_unknown_keys_are_named() {
        let file: ConfigFile = toml::from_str(
            "[hypervisor]\nvcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\n[agent]\ntimeout_secs = 9\n",
        )
        .unwrap();
        assert_eq!(file.hypervisor.vcpus, Some(2));
        assert_eq!(file.hypervisor.memory_mib, Some(512));
        assert_eq!(file.agent.timeout_secs, Some(9));
        let err = toml::from_str::<ConfigFile>("[hypervisor]\nmemory = 1\n").unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }
}
