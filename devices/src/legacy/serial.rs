//! 16550 UART (vm-superio) on a port bus, wired to a host byte stream.

use std::io::Write;

use vm_superio::{serial::SerialEvents, Serial, Trigger};

use crate::bus::{read_byte_register, write_byte_register, BusDevice};
use crate::trigger::EventTrigger;

/// The modem control register's offset (bit 4: loopback).
const MODEM_CONTROL: u8 = 4;

/// The guest console: a 16550 whose output goes to `out` and whose input is
/// fed with [`SerialConsole::enqueue_input`].
pub struct SerialConsole {
    uart: Serial<EventTrigger, InputRoom, Box<dyn Write + Send>>,
    /// The interrupt line again, for the UART a reset builds.
    irq: EventTrigger,
    room: InputRoom,
    /// Input was refused although the FIFO had room (the guest had the
    /// UART in loopback): the feeder waits for a room signal, which a
    /// change of the modem control register then gives.
    refused: bool,
}

/// Signals when the guest has read every byte of the receive FIFO, so that
/// whoever feeds input (without a thread that could wait) sends more.
#[derive(Clone, Default)]
pub struct InputRoom(Option<EventTrigger>);

impl InputRoom {
    fn signal(&self) {
        if let Some(trigger) = &self.0 {
            if let Err(e) = trigger.trigger() {
                log::warn!("serial: cannot signal input room: {e}");
            }
        }
    }
}

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.signal();
    }
}

impl SerialConsole {
    /// `irq` is signalled on each interrupt-worthy UART event.
    pub fn new(irq: EventTrigger, out: Box<dyn Write + Send>) -> Self {
        Self::with_input_room(irq, out, None)
    }

    /// As [`Self::new`]; `room` (if any) is signalled when the guest has
    /// emptied the receive FIFO, and after a reset.
    pub fn with_input_room(
        irq: EventTrigger,
        out: Box<dyn Write + Send>,
        room: Option<EventTrigger>,
    ) -> Self {
        let room = InputRoom(room);
        Self {
            uart: Serial::with_events(irq.clone(), room.clone(), out),
            irq,
            room,
            refused: false,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the
    /// receive FIFO (the caller retries the rest later).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        let taken = match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        };
        self.refused = taken == 0;
        taken
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_byte_register(offset, data, |reg| self.uart.read(reg));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_byte_register(offset, data, |reg, value| {
            if let Err(e) = self.uart.write(reg, value) {
                // Host stdout closed or full: the guest keeps running, output is lost.
                log::debug!("serial: write failed: {e:?}");
            }
            // The modem control register (loopback on or off): input
            // refused in loopback may be taken now.
            if reg == MODEM_CONTROL && std::mem::take(&mut self.refused) {
                self.room.signal();
            }
        });
    }

    /// A UART in its power-on state (vm-superio has no reset), writing to
    /// the same output; input not yet read by the guest is dropped.
    fn reset(&mut self) {
        let placeholder = Serial::with_events(
            self.irq.clone(),
            InputRoom::default(),
            Box::new(std::io::sink()) as Box<_>,
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        self.uart = Serial::with_events(self.irq.clone(), self.room.clone(), old.into_writer());
        // An empty FIFO, though no read emptied it: input waiting for room
        // would wait forever otherwise.
        self.refused = false;
        self.room.signal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_host_and_receives_input() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut serial = SerialConsole::new(
            EventTrigger::new(irq.try_clone().unwrap()),
            Box::new(sink.clone()),
        );
        for b in b"hi" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        // Enable the received-data interrupt, then feed input.
        serial.write(1, &[0x01]);
        assert_eq!(serial.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0u8];
        serial.read(0, &mut byte);
        assert_eq!(byte[0], b'o');
    }

    #[test]
    fn input_room_is_signalled_when_the_guest_empties_the_fifo_and_on_reset() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let room = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::with_input_room(
            EventTrigger::new(irq),
            Box::new(Sink::default()),
            Some(EventTrigger::new(room.try_clone().unwrap())),
        );
        let fifo = serial.input_room();
        let input = vec![b'a'; fifo + 10];
        assert_eq!(
            serial.enqueue_input(&input),
            fifo,
            "a full FIFO takes no more"
        );
        assert_eq!(serial.enqueue_input(&input[fifo..]), 0);
        let mut byte = [0u8];
        for _ in 0..fifo - 1 {
            serial.read(0, &mut byte);
        }
        assert!(room.read().is_err(), "not empty yet");
        serial.read(0, &mut byte);
        assert_eq!(room.read().unwrap(), 1, "emptied");
        assert_eq!(serial.enqueue_input(&input[fifo..]), 10);
        serial.reset();
        assert_eq!(room.read().unwrap(), 1, "emptied by the reset");
        assert_eq!(serial.input_room(), fifo);
    }

    #[test]
    fn reset_clears_registers_and_input_and_keeps_the_output() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut serial = SerialConsole::new(
            EventTrigger::new(irq.try_clone().unwrap()),
            Box::new(sink.clone()),
        );
        serial.write(7, &[0x5a]); // scratch register
        serial.write(1, &[0x01]);
        assert_eq!(serial.enqueue_input(b"left"), 4);
        serial.reset();
        let mut reg = [0u8];
        serial.read(7, &mut reg);
        assert_eq!(reg[0], 0, "scratch back to its reset value");
        serial.read(1, &mut reg);
        assert_eq!(reg[0], 0, "interrupts disabled");
        serial.read(5, &mut reg);
        assert_eq!(reg[0] & 1, 0, "no input left");
        serial.write(0, b"!");
        assert_eq!(&*sink.0.lock().unwrap(), b"!");
        let _ = irq.read();
        serial.write(1, &[0x02]);
        assert!(irq.read().is_ok(), "the interrupt line still works");
    }

    /// Input offered while the guest has the UART in loopback (Linux's
    /// 8250 driver sets it for a moment when it probes and starts the
    /// port) is refused though the FIFO has room; the feeder then waits for
    /// a room signal, which used to come only when a guest read emptied the
    /// FIFO: console input stopped until the guest happened to read.
    #[test]
    fn input_refused_in_loopback_is_asked_for_again_when_loopback_ends() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let room = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::with_input_room(
            EventTrigger::new(irq),
            Box::new(Sink::default()),
            Some(EventTrigger::new(room.try_clone().unwrap())),
        );
        serial.write(4, &[0x10]); // MCR: loopback
        assert_eq!(serial.enqueue_input(b"typed"), 0, "refused in loopback");
        assert!(serial.input_room() > 0);
        assert!(room.read().is_err(), "no room signal yet");
        serial.write(4, &[0x0b]); // MCR: DTR, RTS, OUT2; loopback off
        assert!(
            room.read().is_ok(),
            "the feeder is asked for its input again"
        );
        assert_eq!(serial.enqueue_input(b"typed"), 5);
    }
}
