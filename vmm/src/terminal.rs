//! Raw mode for the host terminal while the guest owns it, restored on every
//! exit path (normal return, error, panic).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

/// The settings to restore; global so that the panic hook can reach them.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin in raw mode if it is a terminal; restores it on drop.
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    pub fn enable(stdin: BorrowedFd<'_>) -> std::io::Result<Option<Self>> {
        let fd = stdin.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a valid terminal and `original` a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at column 0.
        raw.c_oflag = original.c_oflag;
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(original);
        install_panic_restore();
        Ok(Some(Self { _private: () }))
    }
}

fn restore() {
    if let Some(original) = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take() {
        // SAFETY: restores settings read from this same terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

fn install_panic_restore() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}
