//! vCPUs: configuring each for the 64-bit boot and running it on its own
//! thread, dispatching port I/O and MMIO exits to the buses.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, msr, regs, ArchError};
use crate::devices::bus::Bus;

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off (reboot, poweroff, triple fault, panic with panic=-1).
    GuestStopped(String),
    /// KVM could not go on running the guest.
    Failed(String),
}

/// Shared by the vCPUs and the main thread: the first exit wins.
pub struct ExitSignal {
    pub event: EventFd,
    reason: Mutex<Option<VmExit>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(0)?,
            reason: Mutex::new(None),
        })
    }

    pub fn signal(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
        }
        let _ = self.event.write(1);
    }

    /// Waits up to `timeout` for the VM's end, without taking the event.
    pub fn wait_for(&self, timeout: std::time::Duration) {
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.event),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one pollfd we own.
        unsafe { libc::poll(&mut poll, 1, ms) };
    }

    /// Blocks until a vCPU (or a device) ends the VM.
    pub fn wait(&self) -> VmExit {
        let _ = self.event.read();
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| VmExit::GuestStopped("reset".into()))
    }
}

/// Creates vCPU `index` of `count` in the state the kernel's 64-bit entry expects.
pub fn create(kvm: &Kvm, vm: &VmFd, index: u8, count: u8, entry: u64) -> Result<VcpuFd, ArchError> {
    let kvm_err = |what| move |source| ArchError::Kvm { what, source };
    let vcpu = vm
        .create_vcpu(index as u64)
        .map_err(kvm_err("creating a vCPU"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("reading the supported CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    cpuid::patch_for_vcpu(&mut cpuid, index, count, tsc_deadline);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
    vcpu.set_msrs(&msr::boot_msrs())
        .map_err(kvm_err("setting MSRs"))?;
    regs::setup_regs(&vcpu, entry)?;
    regs::setup_sregs(&vcpu)?;
    regs::setup_fpu(&vcpu)?;
    regs::setup_lint(&vcpu)?;
    Ok(vcpu)
}

/// Runs a vCPU until the guest stops or KVM fails, then signals `exit`.
pub fn run(mut vcpu: VcpuFd, index: u8, pio: Arc<Bus>, mmio: Arc<Bus>, exit: Arc<ExitSignal>) {
    let reason = loop {
        crate::jail::test_violation(crate::jail::ThreadKind::Vcpu);
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(port as u64, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(port as u64, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => break VmExit::GuestStopped(format!("vCPU {index} halted")),
            Ok(VcpuExit::Shutdown) => break VmExit::GuestStopped("triple fault / reset".into()),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                break VmExit::GuestStopped(format!("system event {kind}"));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break VmExit::Failed(format!(
                    "KVM could not enter vCPU {index} (hardware reason {reason:#x}, cpu {cpu})"
                ));
            }
            Ok(VcpuExit::InternalError) => {
                break VmExit::Failed(format!(
                    "KVM internal error on vCPU {index} (an instruction KVM could not emulate)"
                ));
            }
            Ok(other) => crate::guest_debug!("vCPU {index}: unhandled exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break VmExit::Failed(format!("running vCPU {index}: {e}")),
        }
    };
    tracing::debug!("vCPU {index} stopped: {reason:?}");
    exit.signal(reason);
}
