//! The microvm virtual machine monitor: one KVM microVM per process.
//!
//! - [`kvm`]: opening `/dev/kvm`, refusing PVM hosts with kernels that cannot run there;
//! - [`layout`]: where everything lives in guest-physical memory;
//! - [`memory`]: guest RAM, 2 MiB-aligned host mappings registered as KVM slots;
//! - [`boot`]: loading the kernel, initramfs, command line and zero page;
//! - [`arch`]: the x86_64 boot state (registers, page tables, CPUID, MSRs, MP table);
//! - [`vcpu`]: vCPU creation and run loops;
//! - [`devices`]: serial console, i8042 (reset), virtio-mmio devices (vsock, fs, net);
//! - [`jail`]: confining the VMM process (namespaces, root, capabilities, seccomp);
//! - [`vm`]: building a VM from a [`vm::VmConfig`] and running it to its end;
//! - `fuzzing` (feature `fuzz`, and in tests): the fuzz targets' harnesses.

pub mod arch;
pub mod boot;
pub mod devices;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzzing;
pub mod jail;
pub mod kvm;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod vcpu;
pub mod vm;

pub use devices::virtio::net::{NetConfig, TapSource};

static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Milliseconds since the process started (its first call, which `main`
/// makes first thing), for the start-up steps logged at debug level. A
/// jailed VMM counts from its supervisor's start: the fork keeps the value.
pub fn startup_ms() -> f64 {
    STARTED
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
        * 1e3
}
pub use vm::{Console, FsConfig, VmConfig, VsockConfig};
