//! The i8042 keyboard controller, kept for one job: the guest's reset line
//! (`reboot=k` writes 0xFE to port 0x64).

use vm_superio::I8042Device;

use crate::bus::{read_byte_register, write_byte_register, BusDevice};
use crate::trigger::EventTrigger;

/// Ports 0x60 (data, offset 0) and 0x64 (command, offset 4).
pub struct I8042 {
    device: I8042Device<EventTrigger>,
}

impl I8042 {
    /// `reset` is signalled when the guest pulses the CPU reset line.
    pub fn new(reset: EventTrigger) -> Self {
        Self {
            device: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_byte_register(offset, data, |reg| self.device.read(reg));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_byte_register(offset, data, |reg, value| {
            if let Err(e) = self.device.write(reg, value) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        });
    }

    fn reset(&mut self) {
        self.device = I8042Device::new(self.device.reset_evt().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn cpu_reset_command_signals_reset() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventTrigger::new(evt.try_clone().unwrap()));
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        dev.reset();
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1, "a reset device keeps its line");
    }
}
