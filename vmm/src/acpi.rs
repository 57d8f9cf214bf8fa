//! ACPI tables that let an unmodified distribution kernel find the
//! platform: RSDP -> XSDT -> {FADT -> DSDT, MADT}, all in the BIOS area at
//! [`ACPI_START`]. The platform is hardware-reduced: no PM timer, no GPEs,
//! power-off through the FADT's sleep control register.
//!
//! Debian kernels lack `VIRTIO_MMIO_CMDLINE_DEVICES`, so each virtio-mmio
//! device is announced in the DSDT as an `LNRO0005` device instead.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::MmioSlot;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use devices::legacy::SLEEP_TYPE_S5;

const OEM_ID: [u8; 6] = *b"XSKVM ";
const OEM_TABLE_ID: [u8; 8] = *b"XSKVMVM ";
const OEM_REVISION: u32 = 1;
const TABLE_ALIGN: u64 = 16;

/// IA-PC boot architecture flags: no VGA, no CMOS RTC (we emulate neither,
/// and telling the kernel saves it probing for them).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes, more than the {room} bytes reserved for them")]
    TooLarge { needed: u64, room: u64 },
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// What the tables describe.
pub struct AcpiPlatform<'a> {
    pub vcpus: u8,
    pub virtio_mmio: &'a [MmioSlot],
    /// The GSI whose edge is a press of the power button.
    pub power_button_irq: u32,
}

/// Builds the tables and writes them to guest memory; returns the RSDP address.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    platform: &AcpiPlatform<'_>,
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);

    let dsdt = bytes_of(&build_dsdt(platform.virtio_mmio, platform.power_button_irq));
    let dsdt_addr = next;
    next = align(next + dsdt.len() as u64);

    let fadt = bytes_of(&build_fadt(dsdt_addr));
    let fadt_addr = next;
    next = align(next + fadt.len() as u64);

    let madt = bytes_of(&build_madt(platform.vcpus));
    let madt_addr = next;
    next = align(next + madt.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = next;
    next += xsdt.len() as u64;

    if next > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: next - ACPI_START,
            room: ACPI_END - ACPI_START,
        });
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, table) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn build_fadt(dsdt_addr: u64) -> impl Aml {
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_CONTROL_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.finalize()
}

fn build_madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The I/O APIC's id follows the CPUs' so that no APIC ids collide.
    madt.add_structure(IoApic::new(vcpus, IOAPIC_START as u32, 0));
    madt
}

fn build_dsdt(virtio_mmio: &[MmioSlot], power_button_irq: u32) -> Sdt {
    let com1 = Com1;
    let power_button = PowerButton {
        irq: power_button_irq,
    };
    let mmio_devices: Vec<VirtioMmioDevice> = virtio_mmio
        .iter()
        .enumerate()
        .map(|(index, slot)| VirtioMmioDevice { index, slot: *slot })
        .collect();
    let mut sb_children: Vec<&dyn Aml> = vec![&com1, &power_button];
    sb_children.extend(mmio_devices.iter().map(|d| d as &dyn Aml));

    // \_S5_ gives the SLP_TYP value the guest writes to power off.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLEEP_TYPE_S5, &0u8, &0u8, &0u8]),
    );
    let mut body = Vec::new();
    aml::Scope::new("\\_SB_".into(), sb_children).to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt
}

/// The power button of a hardware-reduced platform (which has no fixed
/// power button event): a control-method button (`PNP0C0C`, as the FADT's
/// PWR_BUTTON flag says) notified by a Generic Event Device (`ACPI0013`)
/// whose one interrupt means "pressed". Linux's button driver turns the
/// notification into a KEY_POWER input event; the guest's userspace
/// decides what to do with it (power off, usually).
struct PowerButton {
    irq: u32,
}

impl Aml for PowerButton {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        aml::Device::new(
            "PWRB".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
            ],
        )
        .to_aml_bytes(sink);
        // _EVT gets the GSI that fired; this GED has only the one.
        let button = aml::Path::new("\\_SB_.PWRB");
        // 0x80: "the button was pressed" (ACPI 6.5, 4.8.2.2.1.1).
        let notify_button = aml::Notify::new(&button, &0x80u8);
        aml::Device::new(
            "GED_".into(),
            vec![
                &aml::Name::new("_HID".into(), &"ACPI0013"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                        true, true, false, false, self.irq,
                    )]),
                ),
                &aml::Method::new("_EVT".into(), 1, true, vec![&notify_button]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// COM1 as a PNP0501 UART with its ports and IRQ.
struct Com1;

impl Aml for Com1 {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let port = SERIAL_PORT_BASE;
        let len = SERIAL_PORT_LEN as u8;
        aml::Device::new(
            "COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(port, port, 1, len),
                        &aml::Interrupt::new(true, true, false, false, SERIAL_IRQ),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// A virtio-mmio transport as the Linux `virtio-mmio` platform driver's ACPI
/// match (`LNRO0005`) expects: one register window, one edge interrupt.
struct VirtioMmioDevice {
    index: usize,
    slot: MmioSlot,
}

impl Aml for VirtioMmioDevice {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let name = format!("V{:03X}", self.index);
        // Slots come from a window below 4 GiB, so they fit Memory32Fixed.
        let base = self.slot.base as u32;
        let len = self.slot.len as u32;
        let uid = self.index as u32;
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base, len),
                        &aml::Interrupt::new(true, true, false, false, self.slot.irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn tables_chain_together_with_valid_checksums() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let slots = [
            MmioSlot {
                base: DEVICE_MMIO_START,
                len: 0x1000,
                irq: 5,
            },
            MmioSlot {
                base: DEVICE_MMIO_START + 0x1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let rsdp = write_acpi_tables(
            &mem,
            &AcpiPlatform {
                vcpus: 2,
                virtio_mmio: &slots,
                power_button_irq: POWER_BUTTON_IRQ,
            },
        )
        .unwrap();
        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]) && checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());

        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|&a| read_table(&mem, a)[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);

        let fadt = read_table(&mem, entries[0]);
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"LNRO0005"));
        assert!(contains(b"V000") && contains(b"V001") && contains(b"COM1"));
        assert!(contains(b"_S5_"));

        let madt = read_table(&mem, entries[1]);
        assert!(checksum_ok(&madt));
        // Header (44) + 2 local APICs (8 each) + I/O APIC (12).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
    }

    #[test]
    fn too_many_devices_do_not_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let slots: Vec<MmioSlot> = (0..2000)
            .map(|i| MmioSlot {
                base: DEVICE_MMIO_START + i * 0x1000,
                len: 0x1000,
                irq: 5,
            })
            .collect();
        let err = write_acpi_tables(
            &mem,
            &AcpiPlatform {
                vcpus: 1,
                virtio_mmio: &slots,
                power_button_irq: POWER_BUTTON_IRQ,
            },
        )
        .unwrap_err();
        assert!(matches!(err, AcpiError::TooLarge { .. }));
    }

    #[test]
    fn dsdt_has_a_power_button_behind_a_generic_event_device() {
        let dsdt = bytes_of(&build_dsdt(&[], POWER_BUTTON_IRQ));
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PWRB") && has(b"GED_") && has(b"_EVT"));
        assert!(has(b"ACPI0013\0"), "GED _HID as a string");
        // Interrupt descriptor (0x89) with the power button's GSI.
        let irq = POWER_BUTTON_IRQ.to_le_bytes();
        assert!(dsdt.windows(9).any(|w| w[0] == 0x89 && w[5..9] == irq));
    }
}
