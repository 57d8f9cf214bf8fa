//! Virtio devices and their MMIO transport (virtio 1.2, "modern" only).

pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// Interrupt causes in the transport's InterruptStatus register.
pub const INTERRUPT_USED_RING: u32 = 0x1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// Feature bit every modern device offers and every modern driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("queue {0} is not usable: bad size or addresses outside guest memory")]
    InvalidQueue(usize),
    #[error("cannot start the device: {0}")]
    Activate(String),
}

/// A virtio device as the transport sees it: identity, features, config
/// space, and activation with the queues the driver set up.
pub trait VirtioDevice: Send {
    /// Virtio device id (1 = network).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn device_features(&self) -> u64;
    /// Features the driver accepted (a subset of the offer, checked by the transport).
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Changes the device made to its config space on its own (the link
    /// state, say); added to the transport's ConfigGeneration.
    fn config_generation(&self) -> u32 {
        0
    }
    /// The driver is ready: start serving the queues.
    fn activate(&mut self, resources: ActivateResources) -> Result<(), VirtioError>;
    /// The driver reset the device: stop serving and drop the queues.
    fn reset(&mut self);
}

/// What a device gets on activation.
pub struct ActivateResources {
    pub mem: GuestMemoryMmap,
    /// One per queue, in queue order; only ready queues are valid.
    pub queues: Vec<Queue>,
    /// Signalled when the driver notifies the matching queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: std::sync::Arc<Interrupt>,
}

/// The device's interrupt line plus the status register that says why it
/// fired, and the device's way to tell the transport it needs a reset.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: EventFd,
    /// Set by a device thread that found a queue it cannot serve; the
    /// transport shows it as DEVICE_NEEDS_RESET until the driver resets.
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// `line` is an irqfd (or any eventfd in tests).
    pub fn new(line: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The device cannot go on without a reset (virtio 1.2 section 2.1.2):
    /// sets DEVICE_NEEDS_RESET and raises a configuration-change interrupt.
    pub fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.store(true, Ordering::Release);
        self.signal(INTERRUPT_CONFIG_CHANGE)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Raises the line with `cause` set in the status register.
    pub fn signal(&self, cause: u32) -> std::io::Result<()> {
        self.status.fetch_or(cause, Ordering::AcqRel);
        self.line.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn acknowledge(&self, causes: u32) {
        self.status.fetch_and(!causes, Ordering::AcqRel);
    }

    /// Back to the reset state: no cause pending, no reset needed.
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    pub fn line(&self) -> &EventFd {
        &self.line
    }
}
