//! Test and benchmark support, not used by the datapath: veth pairs in
//! throwaway network namespaces, running code inside a namespace, raw
//! packet sockets, capability and rlimit changes for privilege tests.
//! Everything here needs root and the `ip` tool (iproute2).

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::program::{attached_program, AttachedProgram, RxFilterMaps};
use crate::sys;

/// Whether the process runs as root (the AF_XDP tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into the named network namespace
/// (`/run/netns/NAME`, as created by `ip netns add`).
pub fn enter_netns(name: &str) -> io::Result<()> {
    let path = CString::new(format!("/run/netns/{name}")).map_err(io::Error::other)?;
    // SAFETY: path is NUL-terminated; the fd is owned right below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fd is a network namespace file.
    sys::cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// Runs `f` on a new thread inside network namespace `netns` (namespaces
/// are per thread; the caller's thread is left alone).
pub fn in_netns<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> io::Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(netns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread in the namespace panicked"))?
    })
}

/// A veth pair `a` <-> `b`, both ends up, in a network namespace of its
/// own with IPv6 off (so no router solicitations or MLD reports show up
/// as stray frames). Names are unique per process and call, so tests can
/// run in parallel. Dropping it deletes the namespace and the pair.
#[derive(Debug)]
pub struct VethPair {
    pub netns: String,
    pub a: String,
    pub b: String,
}

impl VethPair {
    /// `queues` rx and tx queues on each end.
    /// For a test: a fresh pair with `queues` queues, or a failure that
    /// says the test needs root (never a silent skip).
    pub fn for_test(queues: u32) -> VethPair {
        assert!(
            is_root(),
            "this test needs root (a veth pair in a namespace, AF_XDP, rtnetlink): run it as root"
        );
        VethPair::new(queues).expect("veth pair")
    }

    pub fn new(queues: u32) -> io::Result<VethPair> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}x{n}", std::process::id());
        let pair = VethPair {
            netns: format!("xsk-{id}"),
            a: format!("xa{id}"),
            b: format!("xb{id}"),
        };
        ip(&["netns", "add", &pair.netns])?;
        // From here on Drop cleans up whatever was created.
        let q = queues.to_string();
        let sysctl = |key: &str| {
            Command::new("ip")
                .args(["netns", "exec", &pair.netns, "sysctl", "-qw", key])
                .status()
        };
        sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
        ip(&[
            "-n",
            &pair.netns,
            "link",
            "add",
            &pair.a,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            &pair.b,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ])?;
        for dev in [&pair.a, &pair.b] {
            ip(&["-n", &pair.netns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// Runs `ip -n NETNS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside the pair's namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        in_netns(&self.netns, f)
    }

    /// The XDP program attached to `dev`, if any.
    pub fn xdp_program(&self, dev: &str) -> io::Result<Option<AttachedProgram>> {
        self.run(|| sys::ifindex(dev).and_then(attached_program))
    }

    /// MAC address of `dev` (from `ip -br link`: sysfs shows the
    /// namespace that mounted it, not this one).
    /// `ethtool -K DEV tx off` in the pair's namespace: the kernel then
    /// makes checksums asked for through AF_XDP TX metadata itself, on the
    /// way out, so the peer sees them whole.
    pub fn transmit_checksumming_off(&self, dev: &str) -> io::Result<()> {
        let status = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "ethtool",
                "-K",
                dev,
                "tx",
                "off",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| io::Error::other(format!("running ethtool (install ethtool): {e}")))?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "ethtool -K {dev} tx off: {status}"
            )));
        }
        Ok(())
    }

    pub fn mac(&self, dev: &str) -> io::Result<[u8; 6]> {
        let out = self.ip(&["-br", "link", "show", "dev", dev])?;
        out.split_whitespace()
            .nth(2)
            .and_then(parse_mac)
            .ok_or_else(|| io::Error::other(format!("no MAC for {dev} in {out:?}")))
    }
}

/// The one's-complement sum of `data` (big-endian 16-bit words, an odd
/// last byte padded with zero) added to `sum`, unfolded: RFC 1071 word by
/// word, the reference the tests check checksums against.
pub fn ones_sum(mut sum: u64, data: &[u8]) -> u64 {
    for pair in data.chunks(2) {
        sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    sum
}

/// `sum` folded to 16 bits.
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.netns]) {
            eprintln!("testbed: removing namespace {}: {e}", self.netns);
        }
    }
}

/// EtherType of test frames (IEEE "local experimental"), so that nothing
/// else on the link is mistaken for them.
pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// A test frame: `dst`, `src`, [`TEST_ETHERTYPE`], then `len - 14` payload
/// bytes derived from `seq` (the first 8 are `seq` itself).
pub fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(22)];
    write_test_frame(&mut f, dst, src, seq);
    f
}

/// Writes a [`test_frame`] into `buf` (its whole length).
pub fn write_test_frame(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], seq: u64) {
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    buf[14..22].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in buf[22..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
}

/// The sequence number of a test frame, None for anything else.
pub fn test_frame_seq(frame: &[u8]) -> Option<u64> {
    if frame.len() < 22 || frame[12..14] != TEST_ETHERTYPE.to_be_bytes() {
        return None;
    }
    Some(u64::from_le_bytes(frame[14..22].try_into().ok()?))
}

/// Sends `peer` a [`test_frame`] from `src` to each of `dsts`, then waits
/// (at most 2 s) until `filter` has passed `expected` frames of queue 0
/// to the host stack; returns how many it has.
pub fn filtered_after_sending(
    peer: &PacketSocket,
    filter: &RxFilterMaps,
    src: [u8; 6],
    dsts: &[[u8; 6]],
    expected: u64,
) -> io::Result<u64> {
    for (seq, dst) in dsts.iter().enumerate() {
        peer.send(&test_frame(*dst, src, seq as u64, 100))?;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while filter.filtered_frames(0) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(filter.filtered_frames(0))
}

/// An AF_PACKET socket on one interface: sends raw frames, receives the
/// frames arriving on it (not the ones it sends). Create it inside the
/// interface's namespace; use it from anywhere.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketSocket {
    pub fn open(ifname: &str) -> io::Result<PacketSocket> {
        let ifindex = sys::ifindex(ifname)
            .ok_or_else(|| io::Error::other(format!("no interface {ifname}")))?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; checked.
        let fd = sys::cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            )
        })?;
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Room for bursts of test frames (the default buffer holds ~150).
        let rcvbuf: libc::c_int = 32 << 20;
        sys::setsockopt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf)?;
        let addr = sockaddr_ll(ifindex, proto);
        // SAFETY: addr is a valid sockaddr_ll of the given length.
        sys::cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket { fd, ifindex })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let addr = sockaddr_ll(self.ifindex, 0);
        // SAFETY: frame and addr are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Next incoming frame within `timeout`; None on timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = sys::poll_one(self.fd.as_raw_fd(), libc::POLLIN, left.as_millis() as i32)?;
            if ready == 0 {
                return Ok(None);
            }
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and from are writable for their lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(n as usize));
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn sockaddr_ll(ifindex: u32, proto_be: u16) -> libc::sockaddr_ll {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto_be;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr
}

/// Capability numbers for [`limit_capabilities`].
pub mod cap {
    pub const NET_ADMIN: u32 = 12;
    pub const NET_RAW: u32 = 13;
    pub const IPC_LOCK: u32 = 14;
    pub const SYS_ADMIN: u32 = 21;
    pub const SYS_RESOURCE: u32 = 24;
    pub const PERFMON: u32 = 38;
    pub const BPF: u32 = 39;
}

/// Reduces the calling thread's effective, permitted and inheritable
/// capabilities to `keep` (capabilities are per thread).
pub fn limit_capabilities(keep: &[u32]) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut data = [Data::default(); 2];
    for &c in keep {
        let d = &mut data[(c / 32) as usize];
        d.effective |= 1 << (c % 32);
        d.permitted |= 1 << (c % 32);
    }
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: header and a two-element data array as capset(2) v3 expects.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the BPF object `fd` (a map, say) at `path` in bpffs, as a loader
/// that shares its XSKMAP with `map-path=` would.
pub fn pin_object(fd: RawFd, path: &str) -> io::Result<()> {
    let path = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: fd is a BPF object fd; path is NUL-terminated.
    let ret = unsafe { libbpf_sys::bpf_obj_pin(fd, path.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(())
}

/// Sets RLIMIT_MEMLOCK (soft and hard) to `bytes`.
pub fn set_memlock_limit(bytes: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: valid rlimit.
    sys::cvt(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) }).map(drop)
}

/// Makes `socket(AF_XDP, ...)` fail with EAFNOSUPPORT in the calling
/// thread (a seccomp filter, per thread): what a kernel built without
/// CONFIG_XDP_SOCKETS answers. The thread keeps the filter until it ends.
pub fn simulate_kernel_without_af_xdp() -> io::Result<()> {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    const LD_ABS_W: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    let f = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    // seccomp_data: nr at 0, arch at 4, args[0] (low half) at 16.
    let filter = [
        f(LD_ABS_W, 0, 0, 4),
        f(JEQ_K, 0, 5, AUDIT_ARCH),
        f(LD_ABS_W, 0, 0, 0),
        f(JEQ_K, 0, 3, libc::SYS_socket as u32),
        f(LD_ABS_W, 0, 0, 16),
        f(JEQ_K, 0, 1, libc::AF_XDP as u32),
        f(RET_K, 0, 0, RET_ERRNO | libc::EAFNOSUPPORT as u32),
        f(RET_K, 0, 0, RET_ALLOW),
    ];
    let prog = SockFprog {
        len: filter.len() as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: prog points to a valid classic BPF program for the duration
    // of the call (the kernel copies it); no flags, so only this thread.
    sys::cvt(unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frames_round_trip() {
        let f = test_frame([1; 6], [2; 6], 77, 64);
        assert_eq!(f.len(), 64);
        assert_eq!(test_frame_seq(&f), Some(77));
        assert_eq!(test_frame_seq(&f[..20]), None);
        assert_eq!(parse_mac("02:00:0a:ff:10:01"), Some([2, 0, 10, 255, 16, 1]));
        assert_eq!(parse_mac("02:00"), None);
    }
}
