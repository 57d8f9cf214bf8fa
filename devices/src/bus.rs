//! Address-range dispatch of port I/O and MMIO accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes within its address range.
///
/// `offset` is relative to the base the device was inserted at. Reads fill
/// `data` completely; devices answer unknown registers rather than fail,
/// since a guest may probe anything.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Back to the state the device had when the VM was built (the VM is
    /// reset; no vCPU runs meanwhile). Stateless devices keep the default.
    fn reset(&mut self) {}
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Routes accesses by address. Cheap to clone: each vCPU thread holds one.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by base address; ranges never overlap, so the entry with the
    // greatest base <= addr is the only candidate.
    devices: Arc<BTreeMap<u64, Entry>>,
}

/// Builds a [`Bus`]; the finished bus is immutable, so vCPUs need no lock on it.
#[derive(Default)]
pub struct BusBuilder {
    devices: BTreeMap<u64, Entry>,
}

impl BusBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&other, _)) = self.devices.range(..end).next_back().filter(|(b, e)| {
            // The closest device below `end` overlaps if it ends after `base`.
            **b + e.len > base
        }) {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    pub fn build(self) -> Bus {
        Bus {
            devices: Arc::new(self.devices),
        }
    }
}

impl Bus {
    /// Resets every device on the bus, in address order.
    pub fn reset_devices(&self) {
        for entry in self.devices.values() {
            lock(&entry.device).reset();
        }
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, &entry.device))
    }

    /// Reads from the device at `addr`; returns false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// For devices with byte-wide registers: `read` answers the register at
/// `offset` into the first byte; wider accesses read zeros beyond it.
pub fn read_byte_register(offset: u64, data: &mut [u8], read: impl FnOnce(u8) -> u8) {
    data.fill(0);
    if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
        *first = read(reg);
    }
}

/// For devices with byte-wide registers: `write(reg, value)` gets the
/// first byte written; wider accesses drop the rest.
pub fn write_byte_register(offset: u64, data: &[u8], write: impl FnOnce(u8, u8)) {
    if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
        write(reg, value);
    }
}

fn lock<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    // A device whose lock was poisoned panicked mid-access; its state is
    // still memory-safe, and stopping the guest over it helps nobody.
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        resets: usize,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.last_write = None;
        }
    }

    #[test]
    fn reset_devices_reaches_every_device_once() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut builder = BusBuilder::new();
        builder.insert(a.clone(), 0x10, 1).unwrap();
        builder.insert(b.clone(), 0x20, 1).unwrap();
        let bus = builder.build();
        assert!(bus.write(0x10, &[1]));
        bus.clone().reset_devices();
        for device in [&a, &b] {
            let device = device.lock().unwrap();
            assert_eq!((device.resets, &device.last_write), (1, &None));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut builder = BusBuilder::new();
        builder.insert(a.clone(), 0x3f8, 8).unwrap();
        builder.insert(b.clone(), 0x400, 4).unwrap();
        let bus = builder.build();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fb, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.write(0x402, &[7, 8]));
        assert_eq!(b.lock().unwrap().last_write, Some((2, vec![7, 8])));
        assert!(a.lock().unwrap().last_write.is_none());
        assert!(!bus.read(0x400 + 4, &mut data));
        assert!(!bus.write(0x3f7, &[0]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut builder = BusBuilder::new();
        builder.insert(d.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            builder.insert(d.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert!(matches!(
            builder.insert(d.clone(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            builder.insert(d.clone(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            builder.insert(d.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        builder.insert(d, 0x110, 1).unwrap();
    }
}
