//! The guest-physical memory map, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (left zero)
//! 0x0000_0500  GDT (4 entries), then an empty IDT at 0x520
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four PDs (identity map, 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  end of low RAM in the e820 map (EBDA and above reserved)
//! 0x000e_0000  ACPI: RSDP, then XSDT, FADT, MADT, DSDT (up to 0x10_0000)
//! 0x0010_0000  bzImage protected-mode kernel (ELF vmlinux loads at its p_paddr, 16 MiB on Debian)
//!   ...        RAM; the initramfs sits at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio slots from 0xd000_0000, I/O APIC, local APIC
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```
//! Port I/O: COM1 0x3f8 (IRQ 4), i8042 0x60/0x64, ACPI sleep control 0x3c0.

/// GDT for the 64-bit boot protocol.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux `boot_params` structure.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories follow the PDPT, mapping the first 4 GiB.
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Kernel command line capacity, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the Extended BIOS Data Area: where usable low RAM ends.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the BIOS read-only area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where the bzImage protected-mode code goes, and the lowest address a kernel may load at.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole below 4 GiB; RAM never overlaps it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Window for virtio-mmio device slots, inside the hole.
pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
pub const DEVICE_MMIO_END: u64 = 0xfe00_0000;
/// Size of one virtio-mmio device's register window.
pub const DEVICE_MMIO_SLOT_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS; put them just below the local APIC range end.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// RAM above the hole starts here.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 data port; its command port is at +4.
pub const I8042_PORT_BASE: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// Hardware-reduced ACPI sleep control register (the FADT points here).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;

/// GSIs handed to virtio-mmio devices: the I/O APIC pins above the legacy
/// ones, but for the last.
pub const DEVICE_IRQ_FIRST: u32 = 5;
pub const DEVICE_IRQ_LAST: u32 = 22;
/// The ACPI Generic Event Device's interrupt: the power button.
pub const POWER_BUTTON_IRQ: u32 = 23;

// The fixed areas must not overlap; checked when the crate compiles.
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + 4 * 8);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ACPI_START >= EBDA_START && ACPI_END <= HIMEM_START);
    assert!(DEVICE_MMIO_START >= MMIO_HOLE_START && DEVICE_MMIO_END <= IOAPIC_START);
};

/// Guest RAM regions for `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![(0, low)];
    if size > low {
        regions.push((HIGH_RAM_START, size - low));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![
                (0, MMIO_HOLE_START),
                (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }
}
