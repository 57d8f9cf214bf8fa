//! Legacy PC devices: the COM1 UART, the i8042 reset line and the ACPI
//! sleep-control register of the hardware-reduced platform.

mod acpi_sleep;
mod i8042;
mod serial;

pub use acpi_sleep::{AcpiSleepControl, SLEEP_TYPE_S5};
pub use i8042::I8042;
pub use serial::SerialConsole;
