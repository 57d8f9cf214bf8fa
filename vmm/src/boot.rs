//! Puts a Linux kernel, its initramfs and command line into guest memory and
//! fills the Linux x86 64-bit boot protocol structures (boot_params, page
//! tables, GDT) that the boot vCPU starts from.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::layout::*;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// The loader id for "undefined" boot loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Highest address an initramfs may end at when the kernel does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// The 64-bit entry point of a bzImage sits 0x200 bytes into its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: neither an x86-64 ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {reason}")]
    LoadKernel { path: PathBuf, reason: String },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x} after the \
         kernel (ends at {kernel_end:#x}); give the guest more --memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot structures to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Where the boot vCPU starts and what it needs.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub entry: GuestAddress,
}

/// `boot_params` wrapped so vm-memory can copy it.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParams(boot_params);
// SAFETY: boot_params is a packed C struct of plain integers; any byte pattern is valid.
unsafe impl ByteValued for BootParams {}

/// A loaded kernel: its 64-bit entry, where it ends, and its setup header
/// (bzImage only) to start `boot_params` from.
struct LoadedKernel {
    entry: GuestAddress,
    end: u64,
    params: boot_params,
}

/// What a guest boots from: the kernel and initramfs files, kept open so
/// that a VM reset reloads them on the main thread, whose seccomp filter
/// lets it read and seek open files but open none.
pub struct GuestImage {
    kernel_path: PathBuf,
    kernel: File,
    format: KernelFormat,
    initrd: Option<Initrd>,
    cmdline: String,
}

struct Initrd {
    path: PathBuf,
    file: File,
    size: u64,
}

impl GuestImage {
    /// Opens the files and checks the kernel's format and the command line.
    pub fn open(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> Result<Self, BootError> {
        let (kernel_file, format) = open_kernel(kernel)?;
        let initrd = initrd
            .map(|path| {
                let read_err = |source| BootError::ReadInitrd {
                    path: path.to_owned(),
                    source,
                };
                let file = File::open(path).map_err(read_err)?;
                let size = file.metadata().map_err(read_err)?.len();
                Ok::<_, BootError>(Initrd {
                    path: path.to_owned(),
                    file,
                    size,
                })
            })
            .transpose()?;
        build_cmdline(cmdline)?;
        Ok(Self {
            kernel_path: kernel.to_owned(),
            kernel: kernel_file,
            format,
            initrd,
            cmdline: cmdline.to_owned(),
        })
    }

    /// Loads everything into `mem` (again after a reset: the same open
    /// files, read from the start) and returns the boot vCPU's entry point.
    pub fn load(&mut self, mem: &GuestMemoryMmap) -> Result<BootInfo, BootError> {
        let loaded = load_kernel(mem, &self.kernel_path, &mut self.kernel, &self.format)?;
        let mut params = loaded.params;

        let cmdline = build_cmdline(&self.cmdline)?;
        load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
        let cmdline_len = cmdline
            .as_cstring()
            .map_err(|e| BootError::Cmdline(e.to_string()))?
            .as_bytes()
            .len();
        params.hdr.cmd_line_ptr = CMDLINE_START as u32;
        params.hdr.cmdline_size = cmdline_len as u32;

        if let Some(initrd) = &mut self.initrd {
            let (addr, size) = load_initrd(mem, initrd, loaded.end, &params)?;
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }

        params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        if params.hdr.kernel_alignment == 0 {
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
        params.acpi_rsdp_addr = ACPI_START;
        fill_e820(mem, &mut params);
        mem.write_obj(BootParams(params), GuestAddress(ZERO_PAGE_START))?;

        write_page_tables(mem)?;
        write_gdt(mem)?;
        Ok(BootInfo {
            entry: loaded.entry,
        })
    }
}

/// Opens and loads everything once; returns the boot vCPU's entry point.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    GuestImage::open(kernel, initrd, cmdline)?.load(mem)
}

fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(text)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline)
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    format: &KernelFormat,
) -> Result<LoadedKernel, BootError> {
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::OpenKernel {
            path: path.to_owned(),
            source,
        })?;
    let load_error = |e: linux_loader::loader::Error| BootError::LoadKernel {
        path: path.to_owned(),
        reason: match e {
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
            | linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
            ) => "the kernel does not fit in guest memory; give the guest more --memory".into(),
            other => other.to_string(),
        },
    };

    match format {
        KernelFormat::Elf => {
            let result =
                Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(load_error)?;
            Ok(LoadedKernel {
                entry: result.kernel_load,
                end: result.kernel_end,
                params: boot_params::default(),
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_error)?;
            let mut params = boot_params::default();
            if let Some(hdr) = result.setup_header {
                params.hdr = hdr;
            }
            // The decompressor unpacks to the kernel's preferred address and needs
            // init_size bytes there; keep the initramfs clear of all of it.
            let decompress_end = params
                .hdr
                .pref_address
                .max(HIMEM_START)
                .saturating_add(u64::from(params.hdr.init_size));
            Ok(LoadedKernel {
                entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: result.kernel_end.max(decompress_end),
                params,
            })
        }
    }
}

/// Opens a kernel image and tells its format; anything else is an error.
fn open_kernel(path: &Path) -> Result<(File, KernelFormat), BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    match detect_format(&mut file).map_err(open_err)? {
        Some(format) => Ok((file, format)),
        None => Err(BootError::NotAKernel {
            path: path.to_owned(),
        }),
    }
}

/// Checks that the kernel is a kernel and the initramfs can be read, so
/// that bad paths are reported before anything else is set up.
pub fn check_inputs(kernel: &Path, initrd: Option<&Path>) -> Result<(), BootError> {
    open_kernel(kernel)?;
    if let Some(path) = initrd {
        File::open(path).map_err(|source| BootError::ReadInitrd {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells an x86-64 ELF from a bzImage by their magic numbers.
fn detect_format<F: Read + Seek>(file: &mut F) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    const EM_X86_64: u16 = 62;
    const ELFCLASS64: u8 = 2;
    if n >= 20
        && head[..4] == *b"\x7fELF"
        && head[4] == ELFCLASS64
        && u16::from_le_bytes([head[18], head[19]]) == EM_X86_64
    {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The end of RAM below 4 GiB (guest memory always starts at 0).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_HOLE_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// Puts the initramfs as high in low RAM as the kernel allows, page aligned.
fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut Initrd,
    kernel_end: u64,
    params: &boot_params,
) -> Result<(u64, u64), BootError> {
    let Initrd { path, file, size } = initrd;
    let (path, size) = (path.as_path(), *size);
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let addr_max = match params.hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        max => u64::from(max),
    };
    let limit = low_ram_end(mem).min(addr_max + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => read_err(source),
            other => BootError::GuestMemory(other),
        })?;
    Ok((addr, size))
}

fn fill_e820(mem: &GuestMemoryMmap, params: &mut boot_params) {
    let mut entries = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push((start, end - start));
        }
    }
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = entries.len().min(params.e820_table.len()) as u8;
}

/// Identity-maps the first 4 GiB with 2 MiB pages: enough for the kernel,
/// boot_params, command line and initramfs until the kernel builds its own.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * PAGE_SIZE;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))?;
        for entry in 0..512u64 {
            let phys = (gib << 30) | (entry << 21);
            mem.write_obj(phys | PRESENT_RW | HUGE, GuestAddress(pd + entry * 8))?;
        }
    }
    Ok(())
}

/// GDT selectors the boot vCPU's segments use.
pub const GDT_CODE_SELECTOR: u16 = 0x08;
pub const GDT_DATA_SELECTOR: u16 = 0x10;
pub const GDT_TSS_SELECTOR: u16 = 0x18;

/// Null, 64-bit code, data and TSS descriptors (flags, base, limit).
pub const GDT_TABLE: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Encodes a segment descriptor from packed access/flags bits, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register value that loads GDT `entry` through `selector`.
pub fn gdt_entry_to_segment(entry: u64, selector: u16) -> kvm_bindings::kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_bindings::kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT_TABLE.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn guest_mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_regions(size)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn detects_formats_by_magic() {
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[18] = 62;
        assert_eq!(
            detect_format(&mut Cursor::new(elf.clone())).unwrap(),
            Some(KernelFormat::Elf)
        );
        elf[18] = 3; // i386
        assert_eq!(detect_format(&mut Cursor::new(elf)).unwrap(), None);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_format(&mut Cursor::new(bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            detect_format(&mut Cursor::new(b"#!/bin/sh\n".to_vec())).unwrap(),
            None
        );
    }

    #[test]
    fn gdt_entries_match_the_boot_protocol() {
        assert_eq!(GDT_TABLE[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_TABLE[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_TABLE[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_is_64_bit_flat() {
        let cs = gdt_entry_to_segment(GDT_TABLE[1], GDT_CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let tss = gdt_entry_to_segment(GDT_TABLE[3], GDT_TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_, tss.unusable), (0, 0xb, 0));
    }

    #[test]
    fn e820_skips_legacy_area_and_mmio_hole() {
        let mem = guest_mem(4 << 30);
        let mut params = boot_params::default();
        fill_e820(&mem, &mut params);
        let table: Vec<(u64, u64)> = params.e820_table[..params.e820_entries as usize]
            .iter()
            .map(|e| (e.addr, e.size))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_HOLE_START - HIMEM_START),
                (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START),
            ]
        );
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = guest_mem(64 << 20);
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        let last_pd = pdpte3 & !0xfff;
        let last: u64 = mem.read_obj(GuestAddress(last_pd + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, (4 << 30) - (2 << 20));
    }

    #[test]
    fn initrd_goes_high_and_too_large_is_an_error() {
        let dir = std::env::temp_dir().join(format!("xskvm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
        let mem = guest_mem(64 << 20);
        let params = boot_params::default();
        let mut initrd = Initrd {
            file: File::open(&path).unwrap(),
            path,
            size: 10_000,
        };
        let (addr, size) = load_initrd(&mem, &mut initrd, 0x200_0000, &params).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20 && addr + size > (64 << 20) - 2 * PAGE_SIZE);
        let byte: u8 = mem.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(byte, 0x5a);

        // A reset loads it again from the same open file.
        mem.write_slice(&[0; 10_000], GuestAddress(addr)).unwrap();
        assert_eq!(
            load_initrd(&mem, &mut initrd, 0x200_0000, &params).unwrap(),
            (addr, size)
        );
        let bytes: [u8; 2] = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(bytes, [0x5a; 2]);
        let byte: u8 = mem.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(byte, 0x5a);

        let err = load_initrd(&mem, &mut initrd, (64 << 20) - 4096, &params).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("xskvm-boot-k-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kernel");
        std::fs::write(&path, b"this is not a kernel").unwrap();
        let mem = guest_mem(64 << 20);
        let err = load_guest(&mem, &path, None, "console=ttyS0").unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let missing = dir.join("missing");
        let err = load_guest(&mem, &missing, None, "console=ttyS0").unwrap_err();
        assert!(matches!(err, BootError::OpenKernel { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
