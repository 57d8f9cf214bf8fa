//! Pieces shared by vmm's unit tests.

use std::os::fd::{AsRawFd, RawFd};

use devices::virtio::net::{NetBackend, TxFrame};
use vmm_sys_util::eventfd::EventFd;

/// A NIC backend that moves nothing: for tests of what surrounds a NIC.
pub struct IdleBackend(EventFd);

impl IdleBackend {
    pub fn boxed() -> Box<dyn NetBackend> {
        Box::new(Self(EventFd::new(0).expect("eventfd")))
    }
}

impl NetBackend for IdleBackend {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn receive(&mut self, _deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        0
    }

    fn transmit(&mut self, _fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        (0, false)
    }
}
