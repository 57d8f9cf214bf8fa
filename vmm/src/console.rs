//! Feeds host stdin to the guest's serial port from the main thread's
//! event loop, watching for the QEMU-style escape `Ctrl-A x` that ends the
//! VM. No thread blocks on stdin: it is read when epoll says it is readable,
//! through a non-blocking descriptor of its own.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use devices::legacy::SerialConsole;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

const ESCAPE: u8 = 0x01; // Ctrl-A

/// Opens stdin again as a file description of our own, non-blocking: the
/// one on fd 0 is shared with stdout (a terminal opened once) and with
/// whoever started us, and O_NONBLOCK set there would make their reads,
/// and our own writes to stdout, fail with EAGAIN. `None` when stdin is
/// closed or cannot be opened again (a socket); the guest then gets no
/// input.
pub fn open_stdin() -> Option<File> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/proc/self/fd/0")
    {
        Ok(file) => Some(file),
        Err(e) => {
            log::debug!("stdin cannot be opened for the console ({e}); the guest gets no input");
            None
        }
    }
}

/// The console's input, an event-manager subscriber of the main loop:
/// stdin (when readable) and the UART's "receive FIFO emptied" event. While
/// the FIFO is full, stdin is left out of the loop and what was read waits
/// here; at EOF or on an error it leaves the loop for good, so a closed
/// pipe or a hung-up terminal never makes the loop spin.
pub struct ConsoleInput<'a> {
    input: Option<&'a File>,
    serial: &'a Mutex<SerialConsole>,
    /// Signalled by the UART when the guest emptied its receive FIFO.
    room: &'a EventFd,
    /// Only on a raw terminal: from a pipe, Ctrl-A is just a byte.
    watch_escape: bool,
    escape_pending: bool,
    /// Read from stdin, not yet taken by the UART.
    pending: Vec<u8>,
    /// Whether stdin is registered with the loop.
    polled: bool,
    /// Called once on `Ctrl-A x`.
    quit: Box<dyn FnMut() + 'a>,
}

impl<'a> ConsoleInput<'a> {
    const STDIN: u32 = 0;
    const ROOM: u32 = 1;

    pub fn new(
        input: Option<&'a File>,
        serial: &'a Mutex<SerialConsole>,
        room: &'a EventFd,
        watch_escape: bool,
        quit: Box<dyn FnMut() + 'a>,
    ) -> Self {
        Self {
            input,
            serial,
            room,
            watch_escape,
            escape_pending: false,
            pending: Vec::new(),
            polled: false,
            quit,
        }
    }

    fn poll_stdin(&mut self, ops: &mut EventOps, on: bool) {
        let Some(input) = self.input else { return };
        if on == self.polled {
            return;
        }
        let events = Events::with_data(input, Self::STDIN, EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.polled = on,
            Err(e) => {
                // A regular file or /dev/null cannot be polled (EPERM).
                log::debug!("stdin cannot be watched ({e:?}); the guest gets no more input");
                self.input = None;
                self.polled = false;
            }
        }
    }

    /// Stops reading stdin for good.
    fn close_stdin(&mut self, ops: &mut EventOps) {
        self.poll_stdin(ops, false);
        self.input = None;
    }

    /// Hands what is pending to the UART as far as its FIFO takes it;
    /// stdin is read again only once nothing is pending.
    fn feed(&mut self, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            let taken = self
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(&self.pending);
            self.pending.drain(..taken);
        }
        let drained = self.pending.is_empty();
        self.poll_stdin(ops, drained);
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let Some(mut input) = self.input else { return };
        let mut buf = [0u8; 256];
        let n = match input.read(&mut buf) {
            Ok(0) => {
                log::debug!("stdin: end of input");
                self.close_stdin(ops);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::warn!("stdin: {e}; guest input stops");
                self.close_stdin(ops);
                return;
            }
        };
        let input = &buf[..n];
        if self.watch_escape && saw_quit_escape(input, &mut self.escape_pending) {
            self.close_stdin(ops);
            (self.quit)();
            return;
        }
        self.pending.extend_from_slice(input);
        self.feed(ops);
    }
}

impl MutEventSubscriber for ConsoleInput<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(self.room, Self::ROOM, EventSet::IN)) {
            log::warn!("console: cannot watch the UART ({e:?}); the guest gets no input");
            self.input = None;
            return;
        }
        self.poll_stdin(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            // Readable, at its end (EPOLLHUP) or failed: a read tells which.
            Self::STDIN => self.read_stdin(ops),
            Self::ROOM => {
                let _ = self.room.read();
                self.feed(ops);
            }
            _ => {}
        }
    }
}

/// Finds `Ctrl-A x`, which may span reads. Bytes are forwarded as they
/// come, so a lone Ctrl-A still reaches the guest.
fn saw_quit_escape(input: &[u8], pending: &mut bool) -> bool {
    for &b in input {
        if *pending && b == b'x' {
            return true;
        }
        *pending = b == ESCAPE;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::Write;

    use devices::EventTrigger;
    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn escape_x_quits_even_across_reads() {
        let mut pending = false;
        assert!(!saw_quit_escape(b"ab\x01", &mut pending));
        assert!(saw_quit_escape(b"x", &mut pending));
        let mut pending = false;
        assert!(saw_quit_escape(b"ls\x01x", &mut pending));
    }

    #[test]
    fn other_bytes_do_not_quit() {
        let mut pending = false;
        assert!(!saw_quit_escape(b"x\r", &mut pending));
        assert!(!saw_quit_escape(b"\x01", &mut pending));
        assert!(!saw_quit_escape(b"yx", &mut pending));
    }

    /// A UART whose "room" eventfd the console input watches.
    struct Uart {
        serial: Mutex<SerialConsole>,
        room: EventFd,
        irq: EventFd,
    }

    fn uart() -> Uart {
        let room = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = SerialConsole::with_input_room(
            EventTrigger::new(irq.try_clone().unwrap()),
            Box::new(std::io::sink()),
            Some(EventTrigger::new(room.try_clone().unwrap())),
        );
        Uart {
            serial: Mutex::new(serial),
            room,
            irq,
        }
    }

    impl Uart {
        /// What the guest reads from the receive FIFO, as a driver would.
        fn drain(&self) -> Vec<u8> {
            use devices::BusDevice;
            let mut serial = self.serial.lock().unwrap();
            let mut out = Vec::new();
            loop {
                let mut lsr = [0u8];
                serial.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    return out;
                }
                let mut byte = [0u8];
                serial.read(0, &mut byte);
                out.push(byte[0]);
            }
        }
    }

    /// Runs the loop until it has nothing to do within 50 ms; returns how
    /// many times it dispatched events (a spinning source never stops).
    fn settle<T: MutEventSubscriber>(manager: &mut EventManager<T>) -> usize {
        let mut dispatched = 0;
        for _ in 0..100 {
            match manager.run_with_timeout(50).unwrap() {
                0 => return dispatched,
                n => dispatched += n,
            }
        }
        panic!("the loop never went idle: it spins");
    }

    fn pipe_input() -> (File, std::io::PipeWriter) {
        let (reader, writer) = std::io::pipe().unwrap();
        // As open_stdin gives it: non-blocking.
        let file = File::from(std::os::fd::OwnedFd::from(reader));
        // SAFETY: F_SETFL on a descriptor this test owns.
        let rc = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::F_SETFL,
                libc::O_NONBLOCK,
            )
        };
        assert_eq!(rc, 0);
        (file, writer)
    }

    #[test]
    fn input_waits_for_a_full_fifo_and_eof_does_not_spin() {
        let uart = uart();
        let (input, mut writer) = pipe_input();
        let mut manager = EventManager::<ConsoleInput<'_>>::new().unwrap();
        manager.add_subscriber(ConsoleInput::new(
            Some(&input),
            &uart.serial,
            &uart.room,
            false,
            Box::new(|| panic!("no escape from a pipe")),
        ));
        // More than the FIFO holds, with a Ctrl-A x that is just bytes here.
        let text: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).chain(*b"\x01x").collect();
        writer.write_all(&text).unwrap();
        settle(&mut manager);
        let mut seen = uart.drain();
        assert!(
            !seen.is_empty() && seen.len() < text.len(),
            "{}",
            seen.len()
        );
        // Each time the guest empties the FIFO, more comes.
        while seen.len() < text.len() {
            settle(&mut manager);
            let more = uart.drain();
            assert!(!more.is_empty(), "stuck at {} bytes", seen.len());
            seen.extend(more);
        }
        assert_eq!(seen, text);
        let _ = uart.irq.read();
        // The end of the pipe: handled once, then stdin leaves the loop.
        drop(writer);
        assert!(settle(&mut manager) >= 1);
        assert_eq!(settle(&mut manager), 0, "nothing left to wake the loop");
    }

    #[test]
    fn dev_null_and_a_missing_stdin_are_no_input() {
        let uart = uart();
        let null = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/null")
            .unwrap();
        for input in [Some(&null), None] {
            let mut manager = EventManager::<ConsoleInput<'_>>::new().unwrap();
            manager.add_subscriber(ConsoleInput::new(
                input,
                &uart.serial,
                &uart.room,
                true,
                Box::new(|| panic!("no input, no escape")),
            ));
            assert_eq!(settle(&mut manager), 0);
        }
        assert!(uart.drain().is_empty());
    }

    #[test]
    fn ctrl_a_x_on_a_terminal_quits_and_stops_reading() {
        let uart = uart();
        let (input, mut writer) = pipe_input();
        let quits = Cell::new(0);
        let mut manager = EventManager::<ConsoleInput<'_>>::new().unwrap();
        manager.add_subscriber(ConsoleInput::new(
            Some(&input),
            &uart.serial,
            &uart.room,
            true,
            Box::new(|| quits.set(quits.get() + 1)),
        ));
        writer.write_all(b"ls\x01").unwrap();
        settle(&mut manager);
        writer.write_all(b"x; more").unwrap();
        settle(&mut manager);
        assert_eq!(quits.get(), 1);
        assert_eq!(uart.drain(), b"ls\x01", "what came before the escape");
        // The guest emptied the FIFO: one wake-up for that.
        assert_eq!(settle(&mut manager), 1);
        writer.write_all(b"ignored").unwrap();
        assert_eq!(settle(&mut manager), 0, "stdin is no longer read");
        assert!(uart.drain().is_empty());
    }
}
