//! x86_64 boot state: what the boot vCPU's registers, page tables and the
//! firmware tables look like when the kernel's 64-bit entry point runs.

pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod regs;

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("writing {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM refused {what}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs do not fit the MP table (at most {max})", max = mptable::MAX_CPUS)]
    TooManyCpus(u8),
    #[error("building {what}: {reason}")]
    Build { what: &'static str, reason: String },
}
