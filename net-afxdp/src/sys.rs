//! Thin, checked wrappers around the syscalls the backend uses outside the
//! rings: interface lookup, channel count, socket options, rlimits.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `XDP_MAX_TX_SKB_BUDGET` (Linux 6.17+): descriptors one copy-mode
/// `sendto` may transmit. Not in the libc crate yet.
pub(crate) const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GCHANNELS: u32 = 0x3c;

pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The interface index of `name` in the caller's network namespace.
pub(crate) fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The running kernel's version as (major, minor), from uname(2).
pub(crate) fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we own.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let release: String = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    parse_kernel_version(&release)
}

/// "6.12.48+deb13-cloud-amd64" -> (6, 12).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Runs a `SIOCGIF*` request for interface `name` on a throwaway socket
/// and returns the filled ifreq. Uses the calling thread's network
/// namespace (sysfs would show the namespace it was mounted in).
fn interface_request(name: &str, request: libc::c_ulong) -> Option<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a socket we own from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: the SIOCGIF* requests read the NUL-terminated name and
    // write one member of the union in the ifreq we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut ifr) };
    (ret == 0).then_some(ifr)
}

/// Whether interface `name` is a loopback (IFF_LOOPBACK).
pub(crate) fn is_loopback(name: &str) -> bool {
    interface_request(name, libc::SIOCGIFFLAGS).is_some_and(|ifr| {
        // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
        (i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & libc::IFF_LOOPBACK) != 0
    })
}

/// Whether interface `name` is up with its link running (IFF_RUNNING,
/// the flag rtnetlink's link messages carry), asked in the calling
/// thread's network namespace, which sysfs need not show.
pub(crate) fn is_running(name: &str) -> bool {
    interface_request(name, libc::SIOCGIFFLAGS).is_some_and(|ifr| {
        // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
        (i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & libc::IFF_RUNNING) != 0
    })
}

/// The MTU of interface `name`.
pub(crate) fn interface_mtu(name: &str) -> Option<u32> {
    interface_request(name, libc::SIOCGIFMTU).and_then(|ifr| {
        // SAFETY: SIOCGIFMTU filled in the mtu member of the union.
        u32::try_from(unsafe { ifr.ifr_ifru.ifru_mtu }).ok()
    })
}

#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Receive queues of the interface: ETHTOOL_GCHANNELS (rx + combined),
/// else the `queues/rx-*` entries in sysfs (only trusted when sysfs shows
/// this namespace's device, i.e. its ifindex matches). None: unknown.
pub(crate) fn rx_queue_count(name: &str, index: u32) -> Option<u32> {
    ethtool_rx_queues(name).or_else(|| sysfs_rx_queues(name, index))
}

fn ethtool_rx_queues(name: &str) -> Option<u32> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut channels = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let mut ifr = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut channels as *mut EthtoolChannels).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in ifr
        .name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq whose data points at a live
    // ethtool_channels for the duration of the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) };
    if ret < 0 {
        return None;
    }
    let n = channels.rx_count + channels.combined_count;
    (n > 0).then_some(n)
}

fn sysfs_rx_queues(name: &str, index: u32) -> Option<u32> {
    let dir = format!("/sys/class/net/{name}");
    let sys_index: u32 = std::fs::read_to_string(format!("{dir}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if sys_index != index {
        return None; // sysfs belongs to another network namespace
    }
    let n = std::fs::read_dir(format!("{dir}/queues"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    (n > 0).then_some(n as u32)
}

/// RLIMIT_MEMLOCK soft limit in bytes (None: unlimited).
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: lim is writable storage for one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, lim.as_mut_ptr()) } != 0 {
        return Some(0);
    }
    // SAFETY: getrlimit succeeded and filled it.
    let lim = unsafe { lim.assume_init() };
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Raises RLIMIT_MEMLOCK by `needed` bytes (the UMEMs about to be
/// registered), not more: the soft limit up to the hard one needs no
/// privilege; beyond it both limits go up, which needs CAP_SYS_RESOURCE.
/// Failure is not an error: with CAP_IPC_LOCK the kernel does not charge
/// UMEMs at all, and registration reports a limit that is too low.
/// Returns whether the soft limit now leaves `needed` more bytes (or is
/// unlimited).
pub(crate) fn raise_memlock(needed: u64) -> bool {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: lim is writable storage for one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, lim.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: filled by getrlimit.
    let lim = unsafe { lim.assume_init() };
    let Some(new) = memlock_for(lim, needed) else {
        return true;
    };
    // SAFETY: valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } == 0 {
        log::debug!(
            "af-xdp: RLIMIT_MEMLOCK raised by {needed} bytes to {}",
            new.rlim_cur
        );
        return true;
    }
    // Without CAP_SYS_RESOURCE: as far as the hard limit goes.
    let to_hard = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: valid rlimit struct.
    let raised = lim.rlim_cur < lim.rlim_max
        && unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &to_hard) } == 0;
    log::debug!(
        "af-xdp: cannot raise RLIMIT_MEMLOCK by {needed} bytes (soft {}, hard {}){}",
        lim.rlim_cur,
        lim.rlim_max,
        if raised {
            "; raised to the hard limit"
        } else {
            ""
        }
    );
    false
}

/// The limits that leave `needed` more bytes lockable, or None when
/// nothing needs to change.
fn memlock_for(lim: libc::rlimit, needed: u64) -> Option<libc::rlimit> {
    if lim.rlim_cur == libc::RLIM_INFINITY || needed == 0 {
        return None;
    }
    let target = lim.rlim_cur.saturating_add(needed);
    Some(libc::rlimit {
        rlim_cur: target,
        rlim_max: if lim.rlim_max == libc::RLIM_INFINITY {
            lim.rlim_max
        } else {
            lim.rlim_max.max(target)
        },
    })
}

pub(crate) fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// setsockopt with a byte-string value (e.g. SO_BINDTODEVICE).
pub(crate) fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: value is a live byte slice of the given length.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// getsockopt into a T; returns the value and the length the kernel wrote.
pub(crate) fn getsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<(T, usize)> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value is writable storage of len bytes.
    cvt(unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) })?;
    // SAFETY: zero-initialised, then (partly) written by the kernel; T is
    // a plain C struct/integer for which all-zero bytes are valid.
    Ok((unsafe { value.assume_init() }, len as usize))
}

/// The address family of socket `fd` (SO_DOMAIN).
pub(crate) fn socket_domain(fd: RawFd) -> io::Result<libc::c_int> {
    getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map(|(v, _)| v)
}

/// Whether `fd` is an open descriptor of this process.
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0
}

/// Kicks the kernel to transmit what is in the tx ring.
pub(crate) fn kick_tx(fd: RawFd) -> io::Result<()> {
    // SAFETY: a zero-length sendto with no buffers or address.
    let ret = unsafe {
        libc::sendto(
            fd,
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Wakes the driver to refill from the fill ring (need-wakeup on fill).
pub(crate) fn wake_rx(fd: RawFd) -> io::Result<()> {
    // SAFETY: a zero-length recvfrom with no buffers or address.
    let ret = unsafe {
        libc::recvfrom(
            fd,
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// poll(2) on one fd; returns the revents (0 on timeout).
pub(crate) fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret >= 0 {
            return Ok(if ret == 0 { 0 } else { pfd.revents });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(
            parse_kernel_version("6.12.48+deb13-cloud-amd64"),
            Some((6, 12))
        );
        assert_eq!(parse_kernel_version("6.1.0-40-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("5.15"), Some((5, 15)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(kernel_version().is_some());
    }

    #[test]
    fn loopback_lookup_and_unknown_interface() {
        assert_eq!(ifindex("lo"), Some(1));
        assert_eq!(ifindex("no-such-if-xyz"), None);
        assert_eq!(ifindex("bad\0name"), None);
    }

    #[test]
    fn socket_domain_tells_families_apart() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(socket_domain(a.as_raw_fd()).unwrap(), libc::AF_UNIX);
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            socket_domain(file.as_raw_fd()).unwrap_err().raw_os_error(),
            Some(libc::ENOTSOCK)
        );
        assert!(fd_is_open(file.as_raw_fd()));
        assert!(!fd_is_open(100_000));
    }
}

#[cfg(test)]
mod memlock_tests {
    use super::*;

    fn lim(cur: u64, max: u64) -> libc::rlimit {
        libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        }
    }

    #[test]
    fn memlock_goes_up_by_what_is_needed_only() {
        let inf = libc::RLIM_INFINITY;
        let new = memlock_for(lim(8 << 20, 64 << 20), 16 << 20).unwrap();
        assert_eq!((new.rlim_cur, new.rlim_max), (24 << 20, 64 << 20));
        let new = memlock_for(lim(8 << 20, 8 << 20), 16 << 20).unwrap();
        assert_eq!(
            (new.rlim_cur, new.rlim_max),
            (24 << 20, 24 << 20),
            "hard too"
        );
        let new = memlock_for(lim(8 << 20, inf), 16 << 20).unwrap();
        assert_eq!((new.rlim_cur, new.rlim_max), (24 << 20, inf));
        assert!(
            memlock_for(lim(inf, inf), 16 << 20).is_none(),
            "unlimited stays"
        );
        assert!(memlock_for(lim(8 << 20, inf), 0).is_none());
    }
}
