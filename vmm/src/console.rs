//! Feeds host stdin to the guest's serial port, watching for the QEMU-style
//! escape `Ctrl-A x` that ends the VM.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::SerialConsole;
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, SeccompError, ThreadKind};

const ESCAPE: u8 = 0x01; // Ctrl-A

/// Starts the stdin reader thread, under `filter` if given. It ends at EOF
/// on stdin; at VM exit it is simply abandoned (it may be blocked in read).
pub fn spawn_stdin_reader(
    serial: Arc<Mutex<SerialConsole>>,
    quit: EventFd,
    watch_escape: bool,
    filter: Option<Arc<BpfProgram>>,
) -> Result<(), SeccompError> {
    seccomp::spawn_filtered(
        "xskvm-stdin".into(),
        ThreadKind::Console,
        filter,
        move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            let mut escape_pending = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("stdin: {e}; guest input stops");
                        return;
                    }
                };
                let input = &buf[..n];
                if watch_escape && saw_quit_escape(input, &mut escape_pending) {
                    if let Err(e) = quit.write(1) {
                        log::error!("cannot signal quit: {e}");
                    }
                    return;
                }
                feed(&serial, input);
            }
        },
    )?;
    Ok(())
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

/// Hands bytes to the UART as its FIFO drains; the guest reads at its pace.
fn feed(serial: &Mutex<SerialConsole>, mut input: &[u8]) {
    while !input.is_empty() {
        let taken = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(input);
        input = &input[taken..];
        if taken == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
