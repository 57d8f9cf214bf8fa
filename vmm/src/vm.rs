//! Builds a VM from a [`VmConfig`] and runs it to the end.
//!
//! Everything that depends only on the user's input (memory size, kernel,
//! initramfs) is checked and loaded before KVM is opened, so bad input gets
//! its own error on any host.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use devices::legacy::{AcpiSleepControl, SerialConsole, I8042};
use devices::virtio::mmio::REG_QUEUE_NOTIFY;
use devices::virtio::net::{Net, NetBackend, NetConfig, NetLink, QueuePairCounters};
use devices::virtio::MmioTransport;
use devices::{Bus, BusBuilder, EventTrigger, MmioSlot, ResourceAllocator};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{write_acpi_tables, AcpiPlatform};
use crate::afxdp::XdpRxFilter;
use crate::api::{ApiListener, ApiServer, NicStatus, VmStatus};
use crate::boot::GuestImage;
use crate::cli::HugePageSize;
use crate::cpu::InitialState;
use crate::event_loop::{MainLoop, VmReset};
use crate::layout::*;
use crate::net::MacAddr;
use crate::nic_watch::{GuestLink, ModeInfo, NicMode, NicWatcher, WatchedNic, XskStats};
use crate::privileges::{self, CapabilityMode};
use crate::seccomp::{self, Filters, SeccompMode, ThreadKind};
use crate::terminal::RawTerminal;
use crate::vcpu::{
    install_kick_handler, PauseControl, StartGate, StopReport, Vcpu, VcpuExitCounters,
};
use crate::{console, cpu, VmmError};

/// Smallest guest xskvm accepts: room for a kernel and its early allocations.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Signals that end the VM cleanly.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    /// `--memory ...,hugepages=on`: hugepages of this size back guest RAM.
    pub hugepages: Option<HugePageSize>,
    pub vcpus: u32,
    pub kvm_device: PathBuf,
    pub nets: Vec<NetDevice>,
    pub seccomp: SeccompMode,
    /// `--api-socket`: where to serve the API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// `--name`: the `vm` label of the metrics.
    pub name: String,
    /// `--capabilities`: what xskvm keeps once the guest runs.
    pub capabilities: CapabilityMode,
    /// Guest memory made before the NICs were opened (they register it
    /// with `umem=guest`); None: [`Vm::build`] makes it.
    pub guest_memory: Option<GuestRam>,
}

/// Guest RAM made ahead of the VM, and the one host mapping it lies in
/// when `umem=guest` NICs register it as their UMEM.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub umem: Option<UmemMapping>,
}

/// Guest RAM's regions one after another in one host mapping, followed by
/// the area the `umem=guest` NICs' queues keep their own frames in. The
/// mapping is never unmapped: sockets registered on it may outlive any
/// owner xskvm could give it (it goes with the process).
#[derive(Debug, Clone, Copy)]
pub struct UmemMapping {
    ptr: *mut u8,
    len: usize,
    ram_len: usize,
}

// SAFETY: the mapping lives for the rest of the process (above); the value
// only describes it.
unsafe impl Send for UmemMapping {}
// SAFETY: as above.
unsafe impl Sync for UmemMapping {}

impl UmemMapping {
    /// The whole mapping as one NIC's UMEM, its queues' frames from
    /// `area_offset` bytes into the area after guest RAM on.
    pub fn region(&self, area_offset: u64) -> Result<net_afxdp::UmemRegion, VmmError> {
        let start = usize::try_from(area_offset)
            .ok()
            .and_then(|o| o.checked_add(self.ram_len))
            .filter(|&s| s < self.len)
            .ok_or_else(|| VmmError::Net("umem=guest: the queue area is too small".into()))?;
        // SAFETY: a read-write mapping of this process that is never
        // unmapped (UmemMapping); guest RAM in it is reached only through
        // vm-memory's volatile accessors, which tolerate the kernel writing
        // it.
        unsafe { net_afxdp::UmemRegion::new(self.ptr, self.len, self.ram_len, start) }
            .map_err(|e| VmmError::Net(format!("umem=guest: guest memory cannot be a UMEM: {e}")))
    }
}

/// A virtio-net device to attach, with its backends already open.
pub struct NetDevice {
    pub config: NetConfig,
    /// One per queue pair.
    pub backends: Vec<Box<dyn NetBackend>>,
    /// The host NIC behind the backends: followed while the guest runs
    /// and kept (with our XDP program) until the device is gone.
    pub host: NetHost,
}

/// What the NIC watcher needs of a device's host side.
pub struct NetHost {
    pub af_xdp: net_afxdp::AfXdpConfig,
    /// With `umem=guest`: the region its sockets register, again after
    /// the interface comes back.
    pub umem: Option<net_afxdp::UmemRegion>,
    pub owner: net_afxdp::NicOwner,
    pub mtu: Option<u32>,
    /// One per queue, for the API's AF_XDP statistics.
    pub xsk_stats: Vec<net_afxdp::QueueStatsHandle>,
}

/// How a VM ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    PowerOff,
    Reset,
    Signal(i32),
    /// The user typed the console escape (Ctrl-A x).
    Quit,
    /// `vm.shutdown` pressed the power button and the guest did not
    /// power off within the timeout it gave: stopped by us.
    ShutdownTimeout,
}

/// Runs the VM until it ends; `Err` for bad input, host failures and guest crashes.
pub fn run(config: VmConfig) -> Result<VmExit, VmmError> {
    Vm::build(config)?.run()
}

/// A VM built and ready to run: guest memory loaded, KVM VM, devices and
/// vCPUs created; no thread started yet.
pub struct Vm {
    filters: Filters,
    capabilities: CapabilityMode,
    vcpus: Vec<Vcpu>,
    /// The NICs' host sides, for the watcher started by [`Vm::run`].
    watched: Vec<WatchedNic>,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialConsole>>,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    /// Signalled by the UART when the guest emptied its receive FIFO.
    input_room: EventFd,
    report: Arc<StopReport>,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseControl>,
    /// Raises the ACPI power button (a GED interrupt).
    power_button: EventFd,
    status: Arc<VmStatus>,
    api: Option<ApiListener>,
    memory: u64,
    kernel: PathBuf,
    /// What a reboot reloads into guest memory.
    image: GuestImage,
    virtio_mmio: Vec<MmioSlot>,
    /// The interrupt controllers and PIT as created, for a reboot.
    irqchip: IrqchipState,
    /// Last: the devices above hold its memory and eventfds registered with it.
    kvm_vm: KvmVm,
}

/// The KVM VM and the memory it maps; fields drop in this order, so the
/// VM is gone before its memory is unmapped.
struct KvmVm {
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    /// Registered as a UMEM (`umem=guest`): the kernel holds its pages.
    mem_pinned: bool,
}

/// The in-kernel PICs, I/O APIC and PIT before the guest ran.
struct IrqchipState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl IrqchipState {
    fn capture(vm: &VmFd) -> Result<Self, VmmError> {
        let err = |what| move |source| VmmError::Kvm { what, source };
        let chips = [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]
        .into_iter()
        .map(|chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(err("report the interrupt controller state"))
        })
        .collect::<Result<_, _>>()?;
        let pit = vm.get_pit2().map_err(err("report the PIT state"))?;
        Ok(Self { chips, pit })
    }

    fn restore(&self, vm: &VmFd) -> Result<(), VmmError> {
        let err = |what| move |source| VmmError::Kvm { what, source };
        for chip in &self.chips {
            vm.set_irqchip(chip)
                .map_err(err("reset the interrupt controllers"))?;
        }
        vm.set_pit2(&self.pit).map_err(err("reset the PIT"))
    }
}

/// A reboot through the API, done on the main thread while the vCPUs are
/// parked: the same VM, memory and devices (so the NICs' XDP program and
/// AF_XDP sockets, which xskvm could not open again without privileges,
/// stay as they are), put back in their state before the first boot.
struct InPlaceReset<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mem_pinned: bool,
    image: &'a mut GuestImage,
    irqchip: &'a IrqchipState,
    pio: &'a Bus,
    mmio: &'a Bus,
    virtio_mmio: &'a [MmioSlot],
    vcpus: u8,
    /// The boot vCPU's entry point as first loaded: its reset registers
    /// start there.
    entry: u64,
}

impl VmReset for InPlaceReset<'_> {
    fn reset(&mut self) -> Result<(), VmmError> {
        // Devices first: their threads stop writing guest memory.
        self.pio.reset_devices();
        self.mmio.reset_devices();
        clear_guest_memory(self.mem, self.mem_pinned)?;
        let boot = self.image.load(self.mem)?;
        if boot.entry.raw_value() != self.entry {
            return Err(VmmError::Reboot(format!(
                "the kernel's entry point moved ({:#x}, was {:#x}): was the kernel file rewritten?",
                boot.entry.raw_value(),
                self.entry
            )));
        }
        write_acpi_tables(
            self.mem,
            &AcpiPlatform {
                vcpus: self.vcpus,
                virtio_mmio: self.virtio_mmio,
                power_button_irq: POWER_BUTTON_IRQ,
            },
        )?;
        self.irqchip.restore(self.vm)
    }
}

/// Zeroes guest memory as a power cycle would, by dropping its pages
/// (anonymous private mappings read back as zeros); the RSS shrinks too.
/// Memory registered as a UMEM (`pinned`) is written with zeros instead:
/// the kernel keeps the pages it pinned, and dropping them would leave the
/// guest on fresh pages the sockets do not see.
fn clear_guest_memory(mem: &GuestMemoryMmap, pinned: bool) -> Result<(), VmmError> {
    if pinned {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        for region in mem.iter() {
            let mut at = 0;
            while at < region.len() {
                let n = (region.len() - at).min(ZEROS.len() as u64) as usize;
                region
                    .write_slice(&ZEROS[..n], vm_memory::MemoryRegionAddress(at))
                    .map_err(|e| VmmError::Reboot(format!("clearing guest memory: {e}")))?;
                at += n as u64;
            }
        }
        return Ok(());
    }
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::Reboot(format!("guest memory: {e}")))?;
        let len = usize::try_from(region.len())
            .map_err(|_| VmmError::Reboot("guest memory region too large".into()))?;
        // SAFETY: the range is exactly one of `mem`'s anonymous private
        // mappings; no vCPU runs and no device thread is active (both were
        // stopped before), and guest memory is only ever accessed through
        // vm-memory's volatile accessors, never held as Rust references.
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(VmmError::Io {
                what: "cannot clear guest memory",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Port I/O devices and the eventfds through which they end the VM.
struct LegacyDevices {
    pio: Bus,
    serial: Arc<Mutex<SerialConsole>>,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    input_room: EventFd,
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

fn new_eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(EFD_NONBLOCK).map_err(io_err("cannot create an eventfd"))
}

fn clone_eventfd(evt: &EventFd) -> Result<EventFd, VmmError> {
    evt.try_clone().map_err(io_err("cannot clone an eventfd"))
}

impl Vm {
    /// Builds everything a guest needs, in order: input checks, guest
    /// memory with the kernel and ACPI tables, KVM, devices, vCPUs.
    pub fn build(mut config: VmConfig) -> Result<Self, VmmError> {
        let vcpu_count = check_config(&config)?;
        let filters = Filters::new(config.seccomp)?;
        // Early: a path in use is the user's mistake, reported before KVM.
        let api = config
            .api_socket
            .as_deref()
            .map(ApiListener::bind)
            .transpose()?;
        let (mem, mem_pinned) = match config.guest_memory.take() {
            Some(ram) => (ram.mem, ram.umem.is_some()),
            None => (
                create_guest_memory(config.memory, config.hugepages, 0)?.0,
                false,
            ),
        };
        if let Some(page) = config.hugepages {
            log::info!(
                "guest memory: {} MiB on {page} hugepages",
                config.memory >> 20
            );
        }
        let mut image =
            GuestImage::open(&config.kernel, config.initrd.as_deref(), &config.cmdline)?;
        let boot = image.load(&mem)?;
        let mut allocator = device_allocator();
        let virtio_mmio: Vec<MmioSlot> = config
            .nets
            .iter()
            .map(|_| allocator.allocate())
            .collect::<Result<_, _>>()?;
        write_acpi_tables(
            &mem,
            &AcpiPlatform {
                vcpus: vcpu_count,
                virtio_mmio: &virtio_mmio,
                power_button_irq: POWER_BUTTON_IRQ,
            },
        )?;

        let kvm = open_kvm(&config)?;
        let max_vcpus = kvm.get_max_vcpus().min(254) as u32;
        if config.vcpus > max_vcpus {
            return Err(VmmError::TooManyVcpus {
                requested: config.vcpus,
                max: max_vcpus,
            });
        }
        let vm = create_vm(&kvm, &mem)?;
        let irqchip = IrqchipState::capture(&vm)?;
        let legacy = create_legacy_devices(&vm)?;
        let power_button =
            irq_eventfd(&vm, POWER_BUTTON_IRQ, "connect the power button interrupt")?;
        let mut mmio = BusBuilder::new();
        let mut watched = Vec::new();
        let mut nics = Vec::new();
        for (net, slot) in config.nets.drain(..).zip(&virtio_mmio) {
            let (watch, status) =
                attach_net_device(&vm, &mem, &mut mmio, *slot, net, &filters, vcpu_count)?;
            watched.push(watch);
            nics.push(status);
        }
        let mmio = mmio.build();

        let report = Arc::new(StopReport::new(new_eventfd()?));
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseControl::default());
        let exits: Vec<Arc<VcpuExitCounters>> = (0..vcpu_count).map(|_| Arc::default()).collect();
        let vcpus = create_vcpus(&kvm, &vm, vcpu_count, boot.entry, |index, fd, initial| {
            Vcpu {
                index,
                fd,
                initial,
                pio: legacy.pio.clone(),
                mmio: mmio.clone(),
                report: report.clone(),
                stop: stop.clone(),
                pause: pause.clone(),
                exits: exits[usize::from(index)].clone(),
            }
        })?;
        let status = Arc::new(
            VmStatus::new(
                config.name,
                config.memory,
                config.kernel.clone(),
                nics,
                exits,
            )
            .with_hugepages(config.hugepages.map(HugePageSize::bytes)),
        );
        Ok(Self {
            filters,
            capabilities: config.capabilities,
            vcpus,
            watched,
            pio: legacy.pio,
            mmio,
            serial: legacy.serial,
            reset_evt: legacy.reset_evt,
            poweroff_evt: legacy.poweroff_evt,
            input_room: legacy.input_room,
            report,
            stop,
            pause,
            power_button,
            status,
            api,
            memory: config.memory,
            kernel: config.kernel,
            image,
            virtio_mmio,
            irqchip,
            kvm_vm: KvmVm {
                vm,
                _kvm: kvm,
                mem,
                mem_pinned,
            },
        })
    }

    /// Starts the vCPUs and the threads around them, waits until something
    /// ends the VM, then stops everything.
    pub fn run(self) -> Result<VmExit, VmmError> {
        // Bindings drop in reverse order: the KVM VM last, as in `Vm`.
        let Vm {
            kvm_vm,
            filters,
            capabilities,
            vcpus,
            mut watched,
            pio,
            mmio,
            serial,
            reset_evt,
            poweroff_evt,
            input_room,
            report,
            stop,
            pause,
            power_button,
            status,
            api,
            memory,
            kernel,
            mut image,
            virtio_mmio,
            irqchip,
        } = self;
        let vcpu_count = vcpus.len();
        let boot_entry = vcpus.first().map_or(0, |v| v.initial.rip());
        // Stop signals go to a signalfd read by this thread alone; block them
        // before any thread starts so that every thread inherits the mask.
        let signals = block_stop_signals().map_err(io_err("cannot set up signal handling"))?;
        // Setup is done (NICs, /dev/kvm, guest memory): give up privilege
        // before any thread starts, as threads take their creator's
        // capabilities. Only the NIC watcher may keep some, to reopen a NIC.
        let reopen = watched.iter().any(|nic| nic.config.sock_fds.is_none());
        let keep = privileges::kept(capabilities, reopen);
        if let Some(keep) = keep {
            privileges::restrict(keep)?;
            for nic in &mut watched {
                nic.can_reopen = !keep.is_empty();
            }
        }
        // After the mask: a stop signal must never reach it.
        let nic_watcher = NicWatcher::start(watched, filters.nic_watch.clone());
        if let Some(keep) = keep {
            if !keep.is_empty() {
                privileges::drop_all_in_this_thread()?;
            }
            log::info!(
                "capabilities dropped; no_new_privs set; the NIC watcher keeps: {}",
                privileges::names(keep)
            );
        }
        let (action_tx, action_rx) = mpsc::channel();
        let api_wake = new_eventfd()?;
        let api_server = match api {
            Some(listener) => {
                log::info!("API on {}", listener.path().display());
                Some(ApiServer::start(
                    listener,
                    status.clone(),
                    action_tx,
                    clone_eventfd(&api_wake)?,
                    filters.api.clone(),
                )?)
            }
            None => None,
        };
        install_kick_handler().map_err(io_err("cannot install the vCPU kick handler"))?;
        let raw_terminal = RawTerminal::enable(std::io::stdin().as_fd())
            .map_err(io_err("cannot put the terminal in raw mode"))?;
        // Read by the main loop; opened before this thread's filter.
        let stdin = console::open_stdin();

        // Each vCPU installs its filter as it starts and waits at the gate;
        // this thread installs its own last (threads inherit filters), then
        // lets the guest run.
        let gate = Arc::new(StartGate::default());
        let mut handles = Vec::with_capacity(vcpus.len());
        let mut started = Ok(());
        for vcpu in vcpus {
            match vcpu.spawn(filters.vcpu.clone(), gate.clone()) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    started = Err(e);
                    break;
                }
            }
        }
        if started.is_ok() {
            started = seccomp::install(ThreadKind::Main, filters.main.as_deref());
        }
        gate.open(started.is_ok());
        if let Err(e) = started {
            stop.store(true, Ordering::Release);
            for handle in handles {
                handle.stop(Duration::from_secs(1));
            }
            return Err(e.into());
        }
        log::info!(
            "guest started: {} vCPU(s), {} MiB, kernel {}",
            vcpu_count,
            memory >> 20,
            kernel.display()
        );

        let outcome = MainLoop {
            reset: &reset_evt,
            poweroff: &poweroff_evt,
            stdin: stdin.as_ref(),
            serial: &serial,
            input_room: &input_room,
            watch_escape: raw_terminal.is_some(),
            report: &report,
            signals: &signals,
            api_wake: &api_wake,
            actions: &action_rx,
            handles: &handles,
            pause: &pause,
            status: &status,
            power_button: &power_button,
            vm_reset: &mut InPlaceReset {
                vm: &kvm_vm.vm,
                mem: &kvm_vm.mem,
                mem_pinned: kvm_vm.mem_pinned,
                image: &mut image,
                irqchip: &irqchip,
                pio: &pio,
                mmio: &mmio,
                virtio_mmio: &virtio_mmio,
                vcpus: vcpu_count as u8,
                entry: boot_entry,
            },
        }
        .run();
        stop.store(true, Ordering::Release);
        // Parked vCPUs see the stop flag once released.
        pause.resume();
        // No more actions: a request the API thread still waits on is
        // answered "stopping" when its channel goes.
        drop(action_rx);
        drop(api_server);
        for handle in handles {
            handle.stop(Duration::from_secs(2));
        }
        drop(raw_terminal);
        // Devices (and their IO threads) go before what keeps their backends alive.
        drop(pio);
        drop(mmio);
        drop(nic_watcher);
        drop(kvm_vm);
        outcome
    }
}

/// An eventfd that raises interrupt `gsi` in the guest when written.
fn irq_eventfd(vm: &VmFd, gsi: u32, what: &'static str) -> Result<EventFd, VmmError> {
    let event = new_eventfd()?;
    vm.register_irqfd(&event, gsi)
        .map_err(|source| VmmError::Kvm { what, source })?;
    Ok(event)
}

/// COM1, the i8042 (its reset line) and the ACPI sleep control register
/// (power-off), on a new port I/O bus.
fn create_legacy_devices(vm: &VmFd) -> Result<LegacyDevices, VmmError> {
    let serial_irq = irq_eventfd(vm, SERIAL_IRQ, "connect the serial interrupt")?;
    let reset_evt = new_eventfd()?;
    let poweroff_evt = new_eventfd()?;
    let input_room = new_eventfd()?;
    let serial = Arc::new(Mutex::new(SerialConsole::with_input_room(
        EventTrigger::new(serial_irq),
        Box::new(std::io::stdout()),
        Some(EventTrigger::new(clone_eventfd(&input_room)?)),
    )));
    let mut pio = BusBuilder::new();
    pio.insert(
        serial.clone(),
        u64::from(SERIAL_PORT_BASE),
        u64::from(SERIAL_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(EventTrigger::new(clone_eventfd(
            &reset_evt,
        )?)))),
        u64::from(I8042_PORT_BASE),
        u64::from(I8042_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiSleepControl::new(EventTrigger::new(
            clone_eventfd(&poweroff_evt)?,
        )))),
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        1,
    )?;
    Ok(LegacyDevices {
        pio: pio.build(),
        serial,
        reset_evt,
        poweroff_evt,
        input_room,
    })
}

/// Attaches one `--net` device at `slot` and returns what the NIC watcher
/// needs of it.
fn attach_net_device(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut BusBuilder,
    slot: MmioSlot,
    mut net: NetDevice,
    filters: &Filters,
    vcpu_count: u8,
) -> Result<(WatchedNic, NicStatus), VmmError> {
    net.config.on_thread_start = filters.net_io_hook();
    if net.backends.len() > usize::from(vcpu_count) {
        // Linux uses min(queue pairs, CPUs) pairs; frames the NIC puts
        // on the other queues cannot reach the guest (an AF_XDP socket
        // receives from its own queue only) and are dropped, counted.
        log::warn!(
            "{}: {} queues but {vcpu_count} vCPU(s): a Linux guest uses {vcpu_count} queue \
             pair(s), and frames on the other queues are dropped (counted as \
             rx_dropped_inactive); use queues={vcpu_count}, or steer the NIC's traffic \
             to those queues (ethtool -L/-X)",
            net.config.id,
            net.backends.len(),
        );
    }
    let id = net.config.id.clone();
    let (mac, mtu) = (net.config.mac, net.config.mtu);
    let (link, counters) = attach_virtio_net(vm, mem, mmio, slot, net.config, net.backends)?;
    // Our program's filter, or the helper's program's (filter-fds=).
    let rx_filter = match net.host.owner.rx_filter() {
        Some(maps) => {
            let maps = maps.try_clone().map_err(|e| VmmError::Net(e.to_string()))?;
            let filter = Arc::new(XdpRxFilter::new(id.clone(), Some(maps)));
            link.set_rx_filter(filter.clone());
            Some(filter)
        }
        None => {
            log::info!(
                "{id}: inhibit=on without filter-fds: no filter maps of a program, so no MAC \
                 filtering"
            );
            None
        }
    };
    let link = Arc::new(GuestLink::new(link));
    let xsk_stats = Arc::new(XskStats::new(net.host.xsk_stats));
    let info = net.host.owner.info();
    let mode = Arc::new(NicMode::new(ModeInfo::of(info)));
    let status = NicStatus {
        id: id.clone(),
        ifname: info.ifname.clone(),
        queue_ids: info.queue_ids.clone(),
        mode: mode.clone(),
        mac: MacAddr(mac).to_string(),
        mtu,
        guest_umem: info.guest_umem,
        tx_gather: net.host.af_xdp.tx_gather,
        link: link.clone(),
        counters,
        xsk_stats: xsk_stats.clone(),
        rx_filter: rx_filter.clone(),
    };
    // libbpf learns the number of possible CPUs (for per-CPU maps) from
    // sysfs on its first call, which the API thread's filter would not
    // allow: make that call here, before any filter.
    if let Some(filter) = &rx_filter {
        let _ = filter.filtered_frames(info.queue_ids.first().copied().unwrap_or(0));
    }
    let watched = WatchedNic {
        rx_filter,
        id,
        ifindex: Some(info.ifindex),
        umem: net.host.umem,
        config: net.host.af_xdp,
        owner: Some(net.host.owner),
        can_reopen: true,
        reopen_refusal_logged: false,
        link,
        xsk_stats,
        mode,
        mtu: net.host.mtu,
    };
    Ok((watched, status))
}

/// Creates and configures `count` vCPUs (the first one to boot at
/// `entry`); `wrap` gives each its place in the VM.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u8,
    entry: GuestAddress,
    wrap: impl Fn(u8, VcpuFd, InitialState) -> Vcpu,
) -> Result<Vec<Vcpu>, VmmError> {
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmmError::Kvm {
            what: "report its supported CPUID",
            source,
        })?;
    let msr_indices = kvm.get_msr_index_list().map_err(|source| VmmError::Kvm {
        what: "list the MSRs it saves",
        source,
    })?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VmmError::Kvm {
                what: "create a vCPU",
                source,
            })?;
        let mut cpuid = supported_cpuid.clone();
        cpu::patch_cpuid(&mut cpuid, index, count);
        cpu::configure_vcpu(&fd, &cpuid, index)?;
        if index == 0 {
            cpu::configure_boot_vcpu(&fd, entry.raw_value())?;
        }
        let initial = InitialState::capture(&fd, index, msr_indices.as_slice())?;
        vcpus.push(wrap(index, fd, initial));
    }
    Ok(vcpus)
}

/// Puts a virtio-net device behind a virtio-mmio window: registers on the
/// MMIO bus, an irqfd for its interrupt, an ioeventfd per queue.
fn attach_virtio_net(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut BusBuilder,
    slot: MmioSlot,
    config: NetConfig,
    backends: Vec<Box<dyn NetBackend>>,
) -> Result<(NetLink, Vec<Arc<QueuePairCounters>>), VmmError> {
    let id = config.id.clone();
    let net = Net::new(config, backends)
        .map_err(|e| VmmError::VirtioDevice(id.clone(), e.to_string()))?;
    let link = net.link();
    let counters = net.counters().to_vec();
    let irq = irq_eventfd(vm, slot.irq, "connect a virtio interrupt")?;
    let transport = MmioTransport::new(Box::new(net), mem.clone(), irq)
        .map_err(|e| VmmError::VirtioDevice(id.clone(), e.to_string()))?;
    for (index, event) in transport.queue_events().iter().enumerate() {
        vm.register_ioevent(
            event,
            &IoEventAddress::Mmio(slot.base + REG_QUEUE_NOTIFY),
            index as u32,
        )
        .map_err(|source| VmmError::Kvm {
            what: "register a queue notification ioeventfd",
            source,
        })?;
    }
    mmio.insert(Arc::new(Mutex::new(transport)), slot.base, slot.len)?;
    log::info!("{id}: virtio-mmio at {:#x}, IRQ {}", slot.base, slot.irq);
    Ok((link, counters))
}

/// Checks everything about `config` that needs neither KVM nor the NICs;
/// returns the vCPU count. `run` calls it too.
pub fn check_config(config: &VmConfig) -> Result<u8, VmmError> {
    if config.memory < MIN_MEMORY_MIB << 20 {
        return Err(VmmError::MemoryTooSmall {
            got: config.memory,
            min: MIN_MEMORY_MIB,
        });
    }
    if let Some(host) = host_memory() {
        if config.memory > host {
            return Err(VmmError::MemoryTooLarge {
                requested_mib: config.memory >> 20,
                host_mib: host >> 20,
            });
        }
    }
    // Memory made already (umem=guest) holds its pages: nothing to check.
    if let (Some(page), None) = (config.hugepages, &config.guest_memory) {
        check_hugepages(config.memory, page)?;
    }
    if config.vcpus == 0 {
        return Err(VmmError::NoVcpus);
    }
    // APIC ids are 8 bits and the I/O APIC takes the one after the last vCPU.
    let vcpus = u8::try_from(config.vcpus)
        .ok()
        .filter(|&n| n < u8::MAX)
        .ok_or(VmmError::TooManyVcpus {
            requested: config.vcpus,
            max: 254,
        })?;
    crate::boot::check_inputs(&config.kernel, config.initrd.as_deref())?;
    if let Some(path) = &config.api_socket {
        // (A stale socket is fine: bind replaces it.)
        crate::api::ApiListener::check(path)?;
    }
    Ok(vcpus)
}

/// The MMIO slots and interrupt lines devices are given, in order.
fn device_allocator() -> ResourceAllocator {
    ResourceAllocator::new(
        (DEVICE_MMIO_START, DEVICE_MMIO_END),
        DEVICE_MMIO_SLOT_SIZE,
        (DEVICE_IRQ_FIRST, DEVICE_IRQ_LAST),
    )
}

/// Whether `nets` virtio-net devices get MMIO slots and interrupt lines,
/// as [`Vm::build`] hands them out: checked before any NIC is opened.
pub fn check_net_count(nets: usize) -> Result<(), VmmError> {
    let mut allocator = device_allocator();
    for _ in 0..nets {
        allocator.allocate()?;
    }
    Ok(())
}

/// MemTotal from /proc/meminfo, if readable.
fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Hugepages of `size` the host has free and not promised to anyone
/// (`free_hugepages - resv_hugepages`); `None` where the kernel offers no
/// such pages (no sysfs directory for them).
fn available_hugepages(size: HugePageSize) -> Option<u64> {
    let dir = Path::new("/sys/kernel/mm/hugepages").join(size.sysfs_name());
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages").unwrap_or(0)))
}

/// Refuses hugepage-backed memory the host cannot give, before any NIC is
/// touched (`mmap` would refuse too, later and less clearly).
fn check_hugepages(size: u64, page: HugePageSize) -> Result<(), VmmError> {
    let needed = size.div_ceil(page.bytes());
    if available_hugepages(page).is_some_and(|available| available >= needed) {
        return Ok(());
    }
    Err(hugepages_short(size, page))
}

/// The error for a host short of the hugepages `size` bytes of guest RAM
/// need, with what it has.
fn hugepages_short(size: u64, page: HugePageSize) -> VmmError {
    VmmError::HugePages {
        needed: size.div_ceil(page.bytes()),
        page,
        available: available_hugepages(page),
    }
}

/// Bytes of the one mapping of guest RAM and an area of `umem_area` bytes
/// after it (`umem=guest`): what each such NIC's registration locks.
pub fn umem_mapping_len(size: u64, hugepages: Option<HugePageSize>, umem_area: u64) -> u64 {
    let page = hugepages.map_or(4096, |p| p.bytes());
    (size + umem_area).next_multiple_of(page)
}

/// Guest RAM of `size` bytes (on hugepages of `hugepages`), and with
/// `umem_area` > 0 an area of that many bytes after it for `umem=guest`
/// NICs' queues: then all of it is one host mapping ([`UmemMapping`]), in
/// which the guest's regions lie one after another.
pub fn create_guest_memory(
    size: u64,
    hugepages: Option<HugePageSize>,
    umem_area: u64,
) -> Result<(GuestMemoryMmap, Option<UmemMapping>), VmmError> {
    let err = |reason: String| VmmError::GuestMemory {
        size_mib: size >> 20,
        reason,
    };
    let ranges = ram_regions(size)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| err("size does not fit this host's address space".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Private hugetlb pages are reserved at mmap (no MAP_NORESERVE), so a
    // host that runs short fails now, not with SIGBUS mid-run.
    let flags = |page: Option<HugePageSize>| match page {
        Some(page) => {
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_HUGETLB
                | ((page.shift() as i32) << libc::MAP_HUGE_SHIFT)
        }
        None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    };
    let mmap_err = |e: std::io::Error, total: u64| match hugepages {
        Some(page) if e.raw_os_error() == Some(libc::ENOMEM) => hugepages_short(total, page),
        Some(page) => err(format!("{page} hugepages: {e}")),
        None => err(e.to_string()),
    };
    if umem_area > 0 {
        let total = umem_mapping_len(size, hugepages, umem_area);
        if let Some(page) = hugepages {
            // The user's check counted guest RAM alone.
            check_hugepages(total, page)?;
        }
        let len = usize::try_from(total)
            .map_err(|_| err("size does not fit this host's address space".into()))?;
        // SAFETY: a fresh anonymous mapping, no MAP_FIXED; it is never
        // unmapped (UmemMapping).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags(hugepages),
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(mmap_err(std::io::Error::last_os_error(), total));
        }
        let ptr = ptr.cast::<u8>();
        let mut offset = 0usize;
        let mut regions = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            // SAFETY: [ptr + offset, + len) lies inside the mapping made
            // above (the ranges add up to `size` < total), which stays
            // mapped for the life of the process.
            let mut mapping = unsafe {
                MmapRegion::build_raw(
                    ptr.add(offset),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags(hugepages),
                )
            }
            .map_err(|e| err(e.to_string()))?;
            mapping.set_hugetlbfs(hugepages.is_some());
            regions.push(
                GuestRegionMmap::new(mapping, start)
                    .ok_or_else(|| err("region past the end of the address space".into()))?,
            );
            offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?;
        return Ok((
            mem,
            Some(UmemMapping {
                ptr,
                len,
                ram_len: offset,
            }),
        ));
    }
    let Some(page) = hugepages else {
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| err(e.to_string()))?;
        return Ok((mem, None));
    };
    let regions = ranges
        .into_iter()
        .map(|(start, len)| {
            let mut mapping = MmapRegion::build(
                None,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags(Some(page)),
            )
            .map_err(|e| match e {
                vm_memory::mmap::MmapRegionError::Mmap(e) => mmap_err(e, size),
                e => err(format!("{page} hugepages: {e}")),
            })?;
            mapping.set_hugetlbfs(true);
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| err("region past the end of the address space".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?;
    Ok((mem, None))
}

fn open_kvm(config: &VmConfig) -> Result<Kvm, VmmError> {
    let path = config.kvm_device.clone();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmmError::NoKvm { path: path.clone() })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| match source.errno() {
        libc::ENOENT => VmmError::NoKvm { path: path.clone() },
        libc::EACCES | libc::EPERM => VmmError::KvmPermission { path: path.clone() },
        _ => VmmError::KvmOpen {
            path: path.clone(),
            source,
        },
    })?;
    for (cap, name) in [
        (
            Cap::Irqchip,
            "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
        ),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmmError> {
    let kvm_err = |what| move |source| VmmError::Kvm { what, source };
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel interrupt controller"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("create the in-kernel PIT"))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::GuestMemory {
                size_mib: region.len() >> 20,
                reason: e.to_string(),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives
        // the VM (both are dropped when `run` returns, the VM first).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(vm)
}

/// Blocks the stop signals in this thread (and threads it starts) and
/// returns a signalfd that reports them.
fn block_stop_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
    }
    // SAFETY: valid set pointer; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: -1 asks for a new signalfd; `set` is valid.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugepages_beyond_what_the_host_has_are_refused_with_the_way_to_reserve_them() {
        // No host has 2^20 hugepages of 2 MiB (2 TiB) or 1 GiB free.
        for page in [HugePageSize::Size2M, HugePageSize::Size1G] {
            let size = page.bytes() << 20;
            let e = check_hugepages(size, page).unwrap_err();
            let VmmError::HugePages {
                needed, available, ..
            } = &e
            else {
                panic!("{e:?}");
            };
            assert_eq!(*needed, 1 << 20);
            assert!(available.is_none_or(|n| n < 1 << 20));
            let text = e.to_string();
            assert!(
                text.contains(&format!(
                    "/sys/kernel/mm/hugepages/{}/nr_hugepages",
                    page.sysfs_name()
                )),
                "{text}"
            );
        }
    }

    /// `umem=guest`: both RAM regions (below the MMIO hole and above 4
    /// GiB) lie back to back in one mapping, the queues' area after them,
    /// out of the guest's reach; a NIC's region starts its area where it
    /// is told and must fit.
    #[test]
    fn guest_memory_for_umem_guest_is_one_mapping_with_the_area_after_it() {
        let size = MMIO_HOLE_START + (16 << 20);
        let area = 3 << 20;
        let (mem, umem) = create_guest_memory(size, None, area).unwrap();
        let umem = umem.expect("one mapping");
        assert_eq!((umem.ram_len as u64, umem.len as u64), (size, size + area));
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0x1122_3344u32, GuestAddress(HIGH_RAM_START))
            .unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress(MMIO_HOLE_START - 4))
            .unwrap();
        // SAFETY: both inside the mapping, which is never unmapped.
        let (high, low) = unsafe {
            (
                umem.ptr
                    .add(MMIO_HOLE_START as usize)
                    .cast::<u32>()
                    .read_volatile(),
                umem.ptr
                    .add(MMIO_HOLE_START as usize - 4)
                    .cast::<u32>()
                    .read_volatile(),
            )
        };
        assert_eq!((high, low), (0x1122_3344, 0x5566_7788));
        // The guest's address space ends with its RAM.
        let end = HIGH_RAM_START + (16 << 20);
        assert!(mem.write_obj(1u8, GuestAddress(end)).is_err());
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_HOLE_START)).is_err());

        let region = umem.region(1 << 20).unwrap();
        assert_eq!(region.len() as u64, size + area);
        assert_eq!(region.area_start() as u64, size + (1 << 20));
        assert_eq!(region.guest_len() as u64, size);
        assert!(umem.region(area).is_err(), "an area offset past the end");
    }

    /// Registered memory is cleared by writing zeros: every byte of guest
    /// RAM reads 0 afterwards, and the queues' area is left alone.
    #[test]
    fn pinned_guest_memory_is_cleared_by_writing_zeros() {
        let (mem, umem) = create_guest_memory(8 << 20, None, 1 << 20).unwrap();
        let umem = umem.unwrap();
        for at in [0u64, 4095, 64 << 10, (8 << 20) - 1] {
            mem.write_obj(0xffu8, GuestAddress(at)).unwrap();
        }
        // SAFETY: the first byte of the area, inside the mapping.
        unsafe { umem.ptr.add(8 << 20).write_volatile(0xee) };
        clear_guest_memory(&mem, true).unwrap();
        let mut buf = vec![0xaau8; 8 << 20];
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // SAFETY: as above.
        assert_eq!(unsafe { umem.ptr.add(8 << 20).read_volatile() }, 0xee);
    }

    #[test]
    fn guest_memory_without_hugepages_covers_the_ram_regions() {
        let (mem, umem) = create_guest_memory(64 << 20, None, 0).unwrap();
        assert!(umem.is_none());
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 64 << 20);
    }
}
