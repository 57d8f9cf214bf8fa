//! The host side of a virtio-net device's link: whether the guest sees its
//! link up, and new backends when the host NIC comes back after it was
//! deleted. The VMM's NIC watcher drives it through [`NetLink`] from its
//! own thread; the device and its IO threads read it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use super::NetBackend;
use crate::virtio::{Interrupt, INTERRUPT_CONFIG_CHANGE};

/// Most addresses a MAC filter table holds; a guest that lists more gets
/// more than it asked for (all unicast, or all multicast).
pub const MAC_TABLE_MAX: usize = 64;

/// Which frames the guest wants (VIRTIO_NET_F_CTRL_RX): besides unicast to
/// its own MAC and broadcast, which it always gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxMode {
    pub mac: [u8; 6],
    pub promisc: bool,
    pub all_multi: bool,
    /// Multicast only to the addresses in the table (once the driver set a
    /// table; before that, all multicast).
    pub multicast_by_table: bool,
    /// Extra unicast and multicast addresses, the first `table_len`.
    pub table: [[u8; 6]; MAC_TABLE_MAX],
    pub table_len: usize,
    /// The driver listed more unicast (multicast) addresses than the table
    /// holds: all unicast (multicast) frames are delivered.
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
}

impl RxMode {
    /// What a device delivers before its driver says otherwise.
    pub fn default_for(mac: [u8; 6]) -> Self {
        Self {
            mac,
            promisc: false,
            all_multi: false,
            multicast_by_table: false,
            table: [[0; 6]; MAC_TABLE_MAX],
            table_len: 0,
            unicast_overflow: false,
            multicast_overflow: false,
        }
    }

    pub fn table(&self) -> &[[u8; 6]] {
        &self.table[..self.table_len.min(MAC_TABLE_MAX)]
    }
}

/// Where the receive filter is enforced on the host (the XDP program).
pub trait RxFilterSink: Send + Sync {
    fn apply(&self, mode: &RxMode);
}

/// What a running device needs to tell its driver and workers of a change.
pub(crate) struct ActiveLink {
    pub interrupt: Arc<Interrupt>,
    /// One per queue pair: wakes its worker to look again.
    pub wakers: Vec<EventFd>,
    /// The driver negotiated VIRTIO_NET_F_STATUS: it reads the link state
    /// on a configuration-change interrupt.
    pub status_negotiated: bool,
}

pub(crate) struct LinkState {
    up: AtomicBool,
    /// Bumped on every change the driver can see in the config space.
    generation: AtomicU32,
    active: Mutex<Option<ActiveLink>>,
    /// A new backend per pair, taken by its worker (or the next activation).
    replacements: Vec<Mutex<Option<Box<dyn NetBackend>>>>,
    rx_mode: Mutex<RxMode>,
    rx_filter: Mutex<Option<Arc<dyn RxFilterSink>>>,
}

impl LinkState {
    pub fn new(pairs: usize, mac: [u8; 6]) -> Self {
        Self {
            up: AtomicBool::new(true),
            generation: AtomicU32::new(0),
            active: Mutex::new(None),
            replacements: (0..pairs).map(|_| Mutex::new(None)).collect(),
            rx_mode: Mutex::new(RxMode::default_for(mac)),
            rx_filter: Mutex::new(None),
        }
    }

    /// Changes the receive mode and has the host enforce it.
    pub fn update_rx_mode(&self, change: impl FnOnce(&mut RxMode)) {
        let mode = {
            let mut mode = self.rx_mode.lock().unwrap_or_else(PoisonError::into_inner);
            change(&mut mode);
            *mode
        };
        self.apply_rx_mode(&mode);
    }

    /// Back to the mode of a device without a driver (on reset).
    pub fn reset_rx_mode(&self) {
        self.update_rx_mode(|mode| *mode = RxMode::default_for(mode.mac));
    }

    fn apply_rx_mode(&self, mode: &RxMode) {
        let sink = self
            .rx_filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(sink) = sink {
            sink.apply(mode);
        }
    }

    fn rx_mode(&self) -> RxMode {
        *self.rx_mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn set_active(&self, active: Option<ActiveLink>) {
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = active;
    }

    /// The replacement backend for `pair`, if one came.
    pub fn take_replacement(&self, pair: usize) -> Option<Box<dyn NetBackend>> {
        self.replacements
            .get(pair)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn wake_workers(&self, active: &ActiveLink) {
        for waker in &active.wakers {
            if let Err(e) = waker.write(1) {
                crate::error_ratelimited!("virtio-net: cannot wake a queue pair: {e}");
            }
        }
    }
}

/// A handle on a device's link for the VMM: cheap to clone, usable from
/// any thread.
#[derive(Clone)]
pub struct NetLink(pub(crate) Arc<LinkState>);

impl NetLink {
    /// Sets the link state the guest sees; returns whether it changed. A
    /// change raises a configuration-change interrupt (for a driver that
    /// negotiated STATUS) and wakes the IO threads: while the link is down
    /// they drop and count what the guest transmits instead of retrying.
    pub fn set_up(&self, up: bool) -> bool {
        let state = &self.0;
        if state.up.swap(up, Ordering::AcqRel) == up {
            return false;
        }
        state.generation.fetch_add(1, Ordering::AcqRel);
        let active = state.active.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(active) = active.as_ref() {
            if active.status_negotiated {
                if let Err(e) = active.interrupt.signal(INTERRUPT_CONFIG_CHANGE) {
                    log::error!("virtio-net: cannot raise the interrupt: {e}");
                }
            }
            state.wake_workers(active);
        }
        true
    }

    pub fn is_up(&self) -> bool {
        self.0.is_up()
    }

    /// Where the guest's receive mode is enforced from now on; applies the
    /// current mode at once. Call it again (with a new sink, or the same
    /// after it changed where it writes) to re-apply.
    pub fn set_rx_filter(&self, sink: Arc<dyn RxFilterSink>) {
        *self
            .0
            .rx_filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sink);
        self.0.apply_rx_mode(&self.0.rx_mode());
    }

    /// The receive mode the guest asked for.
    pub fn rx_mode(&self) -> RxMode {
        self.0.rx_mode()
    }

    /// How many queue pairs (backends) the device has.
    pub fn queue_pairs(&self) -> usize {
        self.0.replacements.len()
    }

    /// Hands every queue pair a new backend (one per pair, in order), as
    /// after the host NIC was deleted and created again. The old ones are
    /// dropped once each worker has switched. Gives the backends back if
    /// their number is not the device's.
    pub fn replace_backends(
        &self,
        backends: Vec<Box<dyn NetBackend>>,
    ) -> Result<(), Vec<Box<dyn NetBackend>>> {
        let state = &self.0;
        if backends.len() != state.replacements.len() {
            return Err(backends);
        }
        for (slot, backend) in state.replacements.iter().zip(backends) {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(backend);
        }
        let active = state.active.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(active) = active.as_ref() {
            state.wake_workers(active);
        }
        Ok(())
    }
}
