//! Sleep control register of a hardware-reduced ACPI platform (ACPI 6.x,
//! 4.8.3.7): the guest powers off by writing SLP_TYP=S5 with SLP_EN set.

use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::trigger::EventTrigger;

/// The SLP_TYP value the DSDT's `\_S5_` package announces for soft-off.
pub const SLEEP_TYPE_S5: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// One byte register; signals `poweroff` on an S5 request, ignores other
/// sleep states (the VM cannot suspend).
pub struct AcpiSleepControl {
    poweroff: EventTrigger,
}

impl AcpiSleepControl {
    pub fn new(poweroff: EventTrigger) -> Self {
        Self { poweroff }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN == 0 {
            return;
        }
        if sleep_type == SLEEP_TYPE_S5 {
            if let Err(e) = self.poweroff.trigger() {
                log::error!("acpi: cannot signal power-off: {e}");
            }
        } else {
            crate::warn_ratelimited!(
                "acpi: guest asked for sleep state S{sleep_type}, not supported"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn only_s5_with_enable_powers_off() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = AcpiSleepControl::new(EventTrigger::new(evt.try_clone().unwrap()));
        dev.write(0, &[SLEEP_TYPE_S5 << SLP_TYP_SHIFT]); // SLP_EN clear
        dev.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]); // S3
        assert!(evt.read().is_err());
        dev.write(0, &[(SLEEP_TYPE_S5 << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
