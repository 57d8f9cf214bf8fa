//! Architectural state of each vCPU before it first runs: CPUID, MSRs, the
//! local APIC's LINT pins, and for the boot vCPU the 64-bit long-mode
//! registers the Linux boot protocol expects.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::VcpuFd;

use crate::boot::{
    gdt_entry_to_segment, GDT_CODE_SELECTOR, GDT_DATA_SELECTOR, GDT_TABLE, GDT_TSS_SELECTOR,
};
use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot set CPUID of vCPU {index}: {source}")]
    SetCpuid {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set MSRs of vCPU {index}: {source}")]
    SetMsrs {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set registers of vCPU {index}: {source}")]
    SetRegisters {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot program the local APIC of vCPU {index}: {source}")]
    Lapic {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("cannot {what} of vCPU {index}: {source}")]
    State {
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
}

/// MSRs not to write back on a reset: writing one makes KVM store the wall
/// clock at the address written (0 would land on guest address 0). The
/// guest sets them again when it wants the clock.
const MSR_KVM_WALL_CLOCK: u32 = 0x11;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;

/// A vCPU's architectural state as configured, captured before it first
/// runs and written back when the VM is reset in place: a reset must also
/// undo what the guest set that KVM keeps across an INIT (the kvmclock,
/// steal-time and async page fault MSRs point into the old guest's memory,
/// and KVM would go on writing there).
#[derive(Clone)]
pub struct InitialState {
    index: u8,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    /// None where KVM has no XCRs (no XSAVE).
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

impl InitialState {
    /// Reads the state of `vcpu`, which has not run yet; `msr_indices` is
    /// KVM's list of the MSRs it saves and restores.
    pub fn capture(vcpu: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, CpuError> {
        let err = |what| {
            move |source| CpuError::State {
                what,
                index,
                source,
            }
        };
        let mut events = vcpu
            .get_vcpu_events()
            .map_err(err("read the pending events"))?;
        // On restore: clear a pending NMI and set the SIPI vector too.
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        let indices: Vec<u32> = msr_indices
            .iter()
            .copied()
            .filter(|&i| i != MSR_KVM_WALL_CLOCK && i != MSR_KVM_WALL_CLOCK_NEW)
            .collect();
        Ok(Self {
            index,
            mp_state: vcpu.get_mp_state().map_err(err("read the MP state"))?,
            regs: vcpu.get_regs().map_err(err("read the registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(err("read the special registers"))?,
            fpu: vcpu.get_fpu().map_err(err("read the FPU state"))?,
            xcrs: vcpu.get_xcrs().ok(),
            debugregs: vcpu
                .get_debug_regs()
                .map_err(err("read the debug registers"))?,
            lapic: vcpu.get_lapic().map_err(err("read the local APIC"))?,
            msrs: msr_batches(&indices, |entries| {
                let mut msrs = Msrs::from_entries(entries).map_err(CpuError::MsrList)?;
                let read = vcpu.get_msrs(&mut msrs).map_err(err("read MSRs"))?;
                Ok((msrs.as_slice()[..read].to_vec(), read))
            })?,
            events,
        })
    }

    /// The entry point the boot vCPU starts at.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// Writes the captured state back (in the order KVM needs: the APIC
    /// base in the special registers before the APIC, the APIC before the
    /// TSC deadline MSR, pending events last).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), CpuError> {
        let index = self.index;
        let err = |what| {
            move |source| CpuError::State {
                what,
                index,
                source,
            }
        };
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("reset the MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(err("reset the registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(err("reset the special registers"))?;
        vcpu.set_fpu(&self.fpu).map_err(err("reset the FPU"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(err("reset the XCRs"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(err("reset the debug registers"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(err("reset the local APIC"))?;
        let mut refused = 0;
        msr_batches(&self.msrs, |entries| {
            let msrs = Msrs::from_entries(entries).map_err(CpuError::MsrList)?;
            let written = vcpu.set_msrs(&msrs).map_err(err("reset MSRs"))?;
            refused += usize::from(written < entries.len());
            Ok((Vec::new(), written))
        })?;
        if refused > 0 {
            // Some MSRs are read-only once a vCPU ran (VMX capabilities);
            // they cannot have changed.
            log::debug!("vCPU {index}: KVM refused {refused} MSR(s) on reset");
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("reset the pending events"))
    }
}

/// Runs `op` over `items` in batches KVM takes; `op` returns how many of
/// the batch it handled; KVM stops at the first MSR it refuses, so that
/// one is skipped and the rest tried again. Returns what `op` collected.
fn msr_batches<I>(
    items: &[I],
    mut op: impl FnMut(&[kvm_msr_entry]) -> Result<(Vec<kvm_msr_entry>, usize), CpuError>,
) -> Result<Vec<kvm_msr_entry>, CpuError>
where
    I: Copy + Into<MsrEntry>,
{
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let batch: Vec<kvm_msr_entry> = rest
            .iter()
            .take(KVM_MAX_MSR_ENTRIES)
            .map(|&i| i.into().0)
            .collect();
        let (got, done) = op(&batch)?;
        out.extend(got);
        // Past the ones done and, if it stopped early, the one refused.
        let step = if done < batch.len() { done + 1 } else { done };
        rest = &rest[step.min(rest.len())..];
    }
    Ok(out)
}

/// An MSR index (to read) or a full entry (to write).
pub struct MsrEntry(kvm_msr_entry);

impl From<u32> for MsrEntry {
    fn from(index: u32) -> Self {
        Self(kvm_msr_entry {
            index,
            ..Default::default()
        })
    }
}

impl From<kvm_msr_entry> for MsrEntry {
    fn from(entry: kvm_msr_entry) -> Self {
        Self(entry)
    }
}

const CPUID_HYPERVISOR: u32 = 1 << 31; // leaf 1 ECX
const CPUID_HTT: u32 = 1 << 28; // leaf 1 EDX
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Adapts KVM's supported CPUID to vCPU `index` of `count`: one package,
/// one core per vCPU, APIC id = index (as the MADT says).
pub fn patch_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    // Bits of the APIC id that number cores: ceil(log2(count)).
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                entry.ecx |= CPUID_HYPERVISOR;
                if count > 1 {
                    entry.edx |= CPUID_HTT;
                } else {
                    entry.edx &= !CPUID_HTT;
                }
            }
            0x4 => {
                // Intel: cores per package - 1 in EAX[31:26].
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                let (shift, cpus, level) = match entry.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (core_bits, count, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = cpus;
                entry.ecx = (level << 8) | (entry.index & 0xff);
                entry.edx = apic_id;
            }
            0x8000_0008 => {
                // AMD: NC (cores - 1) and the APIC id width.
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            0x8000_001e => {
                entry.eax = apic_id;
                entry.ebx = (entry.ebx & !0xffff) | apic_id; // one thread per core
                entry.ecx &= !0xff; // node 0
            }
            _ => {}
        }
    }
}

/// MSR values Linux expects from a boot loader (zeroed syscall MSRs, a
/// write-back default memory type).
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WRBACK: u64 = 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// CPUID, MSRs, FPU and LAPIC: state every vCPU needs.
pub fn configure_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, index: u8) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|source| CpuError::SetCpuid { index, source })?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(CpuError::MsrList)?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|source| CpuError::SetMsrs { index, source })?;
    if written != entries.len() {
        // KVM stops at the first MSR it rejects; the rest stay at reset values.
        log::warn!(
            "vCPU {index}: KVM accepted {written} of {} boot MSRs (first refused: {:#x})",
            entries.len(),
            entries[written].index
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|source| CpuError::SetRegisters { index, source })?;

    configure_lapic(vcpu).map_err(|source| CpuError::Lapic { index, source })
}

/// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as on a PC.
fn configure_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

/// Long mode with paging on the identity map, entry at `entry` with
/// `rsi` pointing at boot_params: the 64-bit Linux boot protocol.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    let index = 0;
    let err = |source| CpuError::SetRegisters { index, source };
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err)?;

    const X86_CR0_PE: u64 = 0x1;
    const X86_CR0_PG: u64 = 0x8000_0000;
    const X86_CR4_PAE: u64 = 0x20;
    const EFER_LME: u64 = 0x100;
    const EFER_LMA: u64 = 0x400;
    let mut sregs = vcpu.get_sregs().map_err(err)?;
    let segment = |selector: u16| -> kvm_segment {
        gdt_entry_to_segment(GDT_TABLE[usize::from(selector >> 3)], selector)
    };
    let code = segment(GDT_CODE_SELECTOR);
    let data = segment(GDT_DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT_TABLE) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_beef,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_carries_apic_id_and_topology() {
        let mut cpuid = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        patch_cpuid(&mut cpuid, 2, 3);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 3, "logical CPUs");
        assert_eq!(e[0].ebx & 0xffff, 0xbeef, "other bits kept");
        assert_ne!(e[0].edx & CPUID_HTT, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (0, 1, 2));
        assert_eq!(
            (e[2].eax, e[2].ebx, e[2].ecx >> 8),
            (2, 3, TOPOLOGY_LEVEL_CORE)
        );
        assert_eq!(e[3].ecx & 0xff, 2);
    }

    #[test]
    fn msr_batches_skip_what_kvm_refuses_and_respect_its_limit() {
        let indices: Vec<u32> = (0..600).collect();
        let mut batches = Vec::new();
        let got = msr_batches(&indices, |entries| {
            batches.push(entries.len());
            // A KVM that refuses MSR 300: it reads up to it and stops.
            let done = entries
                .iter()
                .position(|e| e.index == 300)
                .unwrap_or(entries.len());
            let read: Vec<_> = entries[..done]
                .iter()
                .map(|e| kvm_msr_entry {
                    data: u64::from(e.index) * 2,
                    ..*e
                })
                .collect();
            Ok((read, done))
        })
        .unwrap();
        assert_eq!(got.len(), 599);
        assert!(got
            .iter()
            .all(|e| e.index != 300 && e.data == u64::from(e.index) * 2));
        assert!(batches.iter().all(|&n| n <= KVM_MAX_MSR_ENTRIES));
        assert!(msr_batches::<u32>(&[], |_| unreachable!())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 1)]).unwrap();
        patch_cpuid(&mut cpuid, 0, 1);
        assert_eq!(cpuid.as_slice()[0].edx & CPUID_HTT, 0);
        assert_eq!(cpuid.as_slice()[1].eax, 0, "no core bits for one CPU");
    }
}
