//! Eventfd-backed trigger for vm-superio devices and VM-level events.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Signals an [`EventFd`]; used both as an interrupt line (registered as a
/// KVM irqfd) and as a VM event (reset, power-off) the VMM waits on.
/// Clones share the eventfd: a device rebuilt on a VM reset keeps its line
/// without a system call (the main thread's seccomp filter allows no dup).
#[derive(Debug, Clone)]
pub struct EventTrigger(Arc<EventFd>);

impl EventTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(Arc::new(evt))
    }

    /// A trigger on a duplicate of the eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self::new)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
