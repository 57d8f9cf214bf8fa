//! Blocking waits of the VMM's helper threads (API, interface watcher):
//! their work arrives on one descriptor, their stop event on another.

use std::os::fd::RawFd;

/// Blocks until `work` is readable or `stop` is signalled, whichever comes
/// first (interrupted waits are retried). `Ok(true)`: stop.
pub fn until_work_or_stop(work: RawFd, stop: RawFd) -> std::io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: work,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(fds[1].revents != 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn tells_work_from_stop() {
        let work = EventFd::new(EFD_NONBLOCK).unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        work.write(1).unwrap();
        assert!(!until_work_or_stop(work.as_raw_fd(), stop.as_raw_fd()).unwrap());
        stop.write(1).unwrap();
        assert!(until_work_or_stop(work.as_raw_fd(), stop.as_raw_fd()).unwrap());
    }
}
