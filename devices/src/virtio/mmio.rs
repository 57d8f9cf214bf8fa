//! The virtio-mmio transport (virtio 1.2 section 4.2, version 2 register
//! layout). It owns the negotiation and queue-setup state; the device gets
//! its queues once the driver sets DRIVER_OK.
//!
//! A misbehaving driver never gets a panic or a memory access outside guest
//! RAM out of this: writes in the wrong state are ignored (and logged), bad
//! queues at DRIVER_OK put the device into DEVICE_NEEDS_RESET.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateResources, Interrupt, VirtioDevice, INTERRUPT_CONFIG_CHANGE, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b53_5800; // "\0XSK"

// Register offsets (virtio_bindings::virtio_mmio has the same values);
// public for drivers in tests and the harness.
pub const REG_MAGIC_VALUE: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
/// Queue notifications: the VMM normally catches these with an ioeventfd.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
/// Shared memory region length (virtio 1.2 4.2.2): the device has none.
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

// Device status bits (virtio 1.2 section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// The register window of one virtio device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// `interrupt_line` is the device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt_line: EventFd,
    ) -> std::io::Result<Self> {
        let queues = new_queues(device.queue_max_sizes())?;
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(interrupt_line)),
            queues,
            queue_events,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The notification eventfd of each queue, to register as ioeventfds
    /// on [`REG_QUEUE_NOTIFY`] with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn status(&self) -> u32 {
        self.status | self.device_needs_reset()
    }

    /// DEVICE_NEEDS_RESET if a device thread asked for it (a queue it
    /// cannot serve); the driver sees it until it resets the device.
    fn device_needs_reset(&self) -> u32 {
        if self.interrupt.needs_reset() {
            STATUS_DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only while the driver sets up the
    /// device: after FEATURES_OK, before DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0
    }

    fn features_writable(&self) -> bool {
        self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC_VALUE => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            // "A length of -1" for a region that does not exist (4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            _ => {
                crate::log_ratelimited!(
                    log::Level::Debug,
                    "virtio-mmio: read of unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if !self.features_writable() {
                    crate::warn_ratelimited!(
                        "virtio-mmio: driver features written in status {:#x}; ignored",
                        self.status
                    );
                    return;
                }
                let value = u64::from(value);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            REG_QUEUE_NOTIFY => {
                // Without an ioeventfd the notification arrives here.
                match self.queue_events.get(value as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            crate::error_ratelimited!(
                                "virtio-mmio: cannot forward a queue notification: {e}"
                            );
                        }
                    }
                    None => {
                        crate::warn_ratelimited!(
                            "virtio-mmio: notify for queue {value}, which does not exist"
                        )
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            _ => crate::log_ratelimited!(
                log::Level::Debug,
                "virtio-mmio: write of {value:#x} to unknown register {offset:#x}"
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_setup_allowed() {
            crate::warn_ratelimited!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let Some(queue) = self.selected_queue() else {
            crate::warn_ratelimited!(
                "virtio-mmio: queue register {offset:#x} written for a queue that does not exist"
            );
            return;
        };
        // virtio-queue's setters log at error level on bad values; the
        // try_ forms let us log (rate-limited) ourselves. A refused value
        // leaves the queue as it was, and invalid queues are caught at
        // DRIVER_OK.
        let with_low = |addr: u64| (addr & !0xffff_ffff) | u64::from(value);
        let with_high = |addr: u64| (addr & 0xffff_ffff) | (u64::from(value) << 32);
        let result = match offset {
            REG_QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| queue.try_set_size(size)),
            REG_QUEUE_READY => {
                queue.set_ready(value == 1);
                Ok(())
            }
            REG_QUEUE_DESC_LOW => {
                queue.try_set_desc_table_address(GuestAddress(with_low(queue.desc_table())))
            }
            REG_QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(GuestAddress(with_high(queue.desc_table())))
            }
            REG_QUEUE_AVAIL_LOW => {
                queue.try_set_avail_ring_address(GuestAddress(with_low(queue.avail_ring())))
            }
            REG_QUEUE_AVAIL_HIGH => {
                queue.try_set_avail_ring_address(GuestAddress(with_high(queue.avail_ring())))
            }
            REG_QUEUE_USED_LOW => {
                queue.try_set_used_ring_address(GuestAddress(with_low(queue.used_ring())))
            }
            REG_QUEUE_USED_HIGH => {
                queue.try_set_used_ring_address(GuestAddress(with_high(queue.used_ring())))
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            crate::warn_ratelimited!(
                "virtio-mmio: queue {} register {offset:#x} = {value:#x} refused: {e}",
                self.queue_sel
            );
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        self.status |= self.device_needs_reset();
        // DEVICE_NEEDS_RESET is the device's to set (section 2.1.2): a
        // driver's write neither sets nor clears it.
        let value =
            (value & !STATUS_DEVICE_NEEDS_RESET) | (self.status & STATUS_DEVICE_NEEDS_RESET);
        // The driver only ever adds bits (section 3.1.1); anything else is a bug.
        if value & self.status != self.status {
            crate::warn_ratelimited!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            crate::warn_ratelimited!(
                "virtio-mmio: driver features {:#x} are not acceptable (offered {:#x}); FEATURES_OK refused",
                self.driver_features,
                self.device.device_features()
            );
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(self.driver_features);
            let event_idx = self.driver_features
                & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                != 0;
            for queue in &mut self.queues {
                queue.set_event_idx(event_idx);
            }
        }
        if added & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        if let Err(e) = self.try_activate() {
            crate::warn_ratelimited!("virtio-mmio: {e}; device needs reset");
            self.needs_reset();
        }
    }

    fn try_activate(&mut self) -> Result<(), super::VirtioError> {
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(super::VirtioError::InvalidQueue(index));
            }
        }
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| super::VirtioError::Activate(e.to_string()))?;
        self.device.activate(ActivateResources {
            mem: self.mem.clone(),
            queues: self
                .queues
                .iter()
                .map(copy_queue)
                .collect::<Result<_, _>>()
                .map_err(|e| super::VirtioError::Activate(e.to_string()))?,
            queue_events,
            interrupt: self.interrupt.clone(),
        })?;
        self.active = true;
        Ok(())
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal(INTERRUPT_CONFIG_CHANGE) {
            crate::error_ratelimited!("virtio-mmio: cannot raise the interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        // Drain notifications that raced with the reset.
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }
}

/// A queue with the same configuration (virtio-queue's Queue is not Clone;
/// the transport keeps its copy for register reads and the next activation).
fn copy_queue(queue: &Queue) -> std::io::Result<Queue> {
    let mut copy = new_queues(&[queue.max_size()])?.remove(0);
    copy.set_size(queue.size());
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (low, high) = split(queue.desc_table());
    copy.set_desc_table_address(low, high);
    let (low, high) = split(queue.avail_ring());
    copy.set_avail_ring_address(low, high);
    let (low, high) = split(queue.used_ring());
    copy.set_used_ring_address(low, high);
    copy.set_event_idx(queue.event_idx_enabled());
    copy.set_ready(queue.ready());
    Ok(copy)
}

fn new_queues(max_sizes: &[u16]) -> std::io::Result<Vec<Queue>> {
    max_sizes
        .iter()
        .map(|&max| {
            Queue::new(max).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {max}: {e:?}"),
                )
            })
        })
        .collect()
}

impl BusDevice for MmioTransport {
    /// As if the driver wrote 0 to the status register: the device stops
    /// serving its queues (joining its threads) and forgets the driver.
    fn reset(&mut self) {
        MmioTransport::reset(self);
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::warn_ratelimited!(
                "virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & STATUS_DRIVER_OK != 0 || self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - REG_CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::warn_ratelimited!(
                "virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            crate::warn_ratelimited!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record {
        acked: u64,
        activations: usize,
        resets: usize,
        config: [u8; 8],
    }

    struct Dummy(Arc<Mutex<Record>>);

    const DUMMY_FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b101;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn device_features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn set_acked_features(&mut self, features: u64) {
            self.0.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let rec = self.0.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = rec.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut rec = self.0.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = rec.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn activate(
            &mut self,
            resources: ActivateResources,
        ) -> Result<(), super::super::VirtioError> {
            assert_eq!(resources.queues.len(), 2);
            assert!(resources.queues[0].ready());
            self.0.lock().unwrap().activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    const MEM_SIZE: usize = 1 << 20;

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>, EventFd) {
        let record = Arc::new(Mutex::new(Record::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(Dummy(record.clone())),
            mem,
            irq.try_clone().unwrap(),
        )
        .unwrap();
        (t, record, irq)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, features as u32);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        write(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write(t, REG_QUEUE_SEL, index);
        write(t, REG_QUEUE_NUM, 256);
        write(t, REG_QUEUE_DESC_LOW, base as u32);
        write(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
        write(t, REG_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        write(t, REG_QUEUE_AVAIL_HIGH, 0);
        write(t, REG_QUEUE_USED_LOW, (base + 0x2000) as u32);
        write(t, REG_QUEUE_USED_HIGH, 0);
        write(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = transport();
        assert_eq!(read(&mut t, REG_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 1);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 256);
        write(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0, "no third queue");
    }

    #[test]
    fn full_negotiation_activates_the_device() {
        let (mut t, record, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b1);
        assert_eq!(
            read(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        assert_eq!(record.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b1);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        assert_eq!(record.lock().unwrap().activations, 1);
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 1);

        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0, "queues reset");
    }

    #[test]
    fn a_vm_reset_stops_the_active_device_like_a_driver_reset() {
        let (mut t, record, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b1);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        BusDevice::reset(&mut t);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0, "queues reset");
        // The next boot's driver negotiates from scratch.
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b1);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        assert_eq!(record.lock().unwrap().activations, 2);
        // An inactive device is not reset again.
        write(&mut t, REG_STATUS, 0);
        BusDevice::reset(&mut t);
        assert_eq!(record.lock().unwrap().resets, 2);
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let (mut t, record, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        write(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 0b1);
        assert_eq!(
            read(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            0,
            "legacy driver"
        );
        assert_eq!(record.lock().unwrap().acked, 0);
    }

    #[test]
    fn writes_in_the_wrong_state_are_ignored() {
        let (mut t, record, _) = transport();
        // Queue setup before FEATURES_OK.
        setup_queue(&mut t, 0, 0x1_0000);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
        // Features before DRIVER.
        write(&mut t, REG_DRIVER_FEATURES, 0b1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // Features after FEATURES_OK.
        write(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write(&mut t, REG_DRIVER_FEATURES, 0b101);
        assert_eq!(record.lock().unwrap().acked, VIRTIO_F_VERSION_1);
        // Clearing status bits without a reset.
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Narrow and unaligned register accesses.
        let mut byte = [0xffu8; 1];
        t.read(REG_MAGIC_VALUE, &mut byte);
        assert_eq!(byte, [0]);
        t.write(REG_STATUS + 1, &[0, 0, 0, 0]);
        t.write(REG_STATUS, &[0]);
        assert_ne!(read(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn queue_outside_guest_memory_needs_reset() {
        let (mut t, record, irq) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, MEM_SIZE as u64 + 0x10_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(record.lock().unwrap().activations, 0);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        write(&mut t, REG_INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
        // Recovery: reset and set up properly.
        write(&mut t, REG_STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(record.lock().unwrap().activations, 1);
    }

    #[test]
    fn the_driver_cannot_set_device_needs_reset() {
        let (mut t, record, _) = transport();
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET,
        );
        assert_eq!(read(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        assert_eq!(
            record.lock().unwrap().activations,
            1,
            "queue setup was allowed"
        );
    }

    #[test]
    fn bad_queue_size_and_selector_are_harmless() {
        let (mut t, record, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1_0000);
        write(&mut t, REG_QUEUE_NUM, 1000); // not a power of two, above max
        write(&mut t, REG_QUEUE_SEL, 99);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_READY, 1);
        write(&mut t, REG_QUEUE_NOTIFY, 99);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(record.lock().unwrap().activations, 1);
    }

    #[test]
    fn mmio_notify_reaches_the_queue_event() {
        let (mut t, _, _) = transport();
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err());
    }

    #[test]
    fn config_space_round_trip_bumps_generation() {
        let (mut t, _, _) = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let generation = read(&mut t, REG_CONFIG_GENERATION);
        t.write(REG_CONFIG + 2, &[0xab, 0xcd]);
        let mut data = [0u8; 4];
        t.read(REG_CONFIG, &mut data);
        assert_eq!(data, [0, 0, 0xab, 0xcd]);
        assert_ne!(read(&mut t, REG_CONFIG_GENERATION), generation);
    }

    /// virtio 1.2 4.2.2: the length of a shared memory region that does not
    /// exist reads as -1 (it read 0, a region of no bytes).
    #[test]
    fn no_shared_memory_region_reads_as_length_minus_one() {
        let (mut t, _, _) = transport();
        write(&mut t, 0x0ac, 0); // SHMSel
        assert_eq!(read(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(read(&mut t, REG_SHM_LEN_HIGH), u32::MAX);
    }
}
