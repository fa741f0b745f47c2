//! The CPUID a vCPU sees: what KVM supports on this host, with the topology
//! (APIC IDs, logical CPU count) and the hypervisor bit filled in.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`.
/// `tsc_deadline`: KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER),
/// which KVM leaves for the VMM to announce; without it the guest calibrates
/// its APIC timer at boot.
pub fn patch_for_vcpu(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | ((index as u32) << 24) | ((count as u32) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
                // EDX: this CPU's x2APIC ID.
                entry.edx = index as u32;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn sets_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        patch_for_vcpu(&mut cpuid, 3, 4, true);
        let leaves = cpuid.as_slice();
        assert_eq!(leaves[0].ebx, 0x0304_0800);
        assert_ne!(leaves[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaves[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(leaves[0].edx & EDX_HTT, 0);
        assert_eq!(leaves[1].edx, 3);
    }
}
