//! Emulated devices of xskvm and the buses that route guest accesses to them.
//!
//! Devices here know nothing about KVM: a vCPU thread decodes an exit into a
//! bus access ([`bus::Bus`]), and devices signal interrupts or VM-level events
//! through eventfds and [`trigger::EventTrigger`]s the VMM wires up.

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod resources;
pub mod trigger;
pub mod virtio;

pub use bus::{Bus, BusBuilder, BusDevice, BusError};
pub use resources::{MmioSlot, ResourceAllocator, ResourceError};
pub use trigger::EventTrigger;
