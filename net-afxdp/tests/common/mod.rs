//! Helpers shared by the veth integration tests.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use net_afxdp::testbed::{self, test_frame_seq, PacketSocket, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, Error, XskQueue};

/// Fails, with the reason, when not root: the tests need veth pairs,
/// namespaces and AF_XDP sockets, and a test that cannot run where it
/// should must not count as passed. CI runs as root.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            net_afxdp::testbed::is_root(),
            "{}: AF_XDP veth tests need root (veth pairs, namespaces, AF_XDP sockets): \
             run them as root, e.g. sudo -E cargo test -p net-afxdp",
            module_path!()
        );
    };
}

pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Opens a NIC from an option string inside the pair's namespace.
pub fn open(pair: &VethPair, options: &str) -> Result<AfXdpNic, Error> {
    let config: AfXdpConfig = options.parse()?;
    open_config(pair, &config)
}

pub fn open_config(pair: &VethPair, config: &AfXdpConfig) -> Result<AfXdpNic, Error> {
    pair.run(|| AfXdpNic::open(config))
        .expect("entering the test namespace")
}

pub fn packet_socket(pair: &VethPair, dev: &str) -> PacketSocket {
    pair.run(|| PacketSocket::open(dev))
        .expect("entering the test namespace")
        .expect("AF_PACKET socket")
}

/// Receives test frames on `q` until `count` arrived or `timeout` passed;
/// returns them in arrival order (other frames are ignored).
pub fn rx_frames(q: &mut XskQueue, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        q.rx_batch(64, |f| {
            if test_frame_seq(f).is_some() {
                got.push(f.to_vec());
            }
            true
        });
        if got.len() < count {
            let _ = q.poll(true, false, Some(Duration::from_millis(20)));
        }
    }
    got
}

/// Receives test frames on a packet socket until `count` or timeout.
pub fn packet_frames(s: &PacketSocket, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match s.recv(&mut buf, left) {
            Ok(Some(n)) if test_frame_seq(&buf[..n]).is_some() => got.push(buf[..n].to_vec()),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("packet socket recv: {e}"),
        }
    }
    got
}

/// Transmits all `frames` on `q` (several batches if needed) and waits
/// until the kernel has completed them.
pub fn tx_all(q: &mut XskQueue, frames: &[Vec<u8>]) {
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while next < frames.len() {
        assert!(
            Instant::now() < deadline,
            "transmit stalled at {next}/{}",
            frames.len()
        );
        let r = q.tx_batch(64, |buf| {
            let f = frames.get(next)?;
            buf[..f.len()].copy_from_slice(f);
            next += 1;
            Some(f.len())
        });
        if r.kick_pending || r.out_of_room {
            q.kick_tx();
            let _ = q.poll(false, true, Some(Duration::from_millis(10)));
        }
    }
    wait_completions(q);
}

/// Kicks and reclaims until no transmit frame is in flight.
pub fn wait_completions(q: &mut XskQueue) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.tx_in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} frames never completed",
            q.tx_in_flight()
        );
        if q.tx_kick_pending() {
            q.kick_tx();
        }
        q.reclaim();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Asserts the frame ledger is consistent and every transmit frame is back.
pub fn assert_no_leak(q: &XskQueue) {
    let a = q
        .frame_accounting()
        .unwrap_or_else(|e| panic!("frame ledger broken: {e}"));
    assert_eq!(a.tx_in_kernel, 0, "transmit frames still out: {a:?}");
    assert_eq!(
        a.rx_in_kernel + a.rx_recycling,
        a.total - a.tx_free,
        "{a:?}"
    );
    let c = q.counters().snapshot();
    assert_eq!(c.rx_bad_descs, 0);
    assert_eq!(c.tx_bad_completions, 0);
}

/// Sequence numbers of test frames, by frame.
pub fn seqs(frames: &[Vec<u8>]) -> Vec<u64> {
    frames.iter().filter_map(|f| test_frame_seq(f)).collect()
}

/// Counts frames per "sender tag" (upper 32 bits of the sequence number).
pub fn by_tag(frames: &[Vec<u8>]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for s in seqs(frames) {
        *m.entry(s >> 32).or_insert(0) += 1;
    }
    m
}

/// Waits until `dev` in the pair has no XDP program (link release may
/// lag a process exit slightly).
pub fn wait_no_xdp(pair: &VethPair, dev: &str) -> Option<net_afxdp::AttachedProgram> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let p = pair.xdp_program(dev).expect("namespace");
        if p.is_none() || Instant::now() > deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub use testbed::{fold, ones_sum, test_frame, write_test_frame};

/// Mounts bpffs on /sys/fs/bpf unless it is there (it is not by default
/// on every host).
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return;
    }
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .unwrap();
    assert!(status.success(), "mounting bpffs on /sys/fs/bpf failed");
}

/// A pinned object in bpffs, unpinned on drop.
pub struct Pin(pub String);

impl Pin {
    pub fn new(fd: i32) -> Pin {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        ensure_bpffs();
        let path = format!(
            "/sys/fs/bpf/xskvm-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        testbed::pin_object(fd, &path).unwrap_or_else(|e| panic!("pinning at {path}: {e}"));
        Pin(path)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An Ethernet + IPv4 + UDP header for `payload` bytes, its UDP checksum
/// field holding the pseudo-header sum (what a checksum request expects).
pub fn udp_header(dst: [u8; 6], src: [u8; 6], payload: usize) -> Vec<u8> {
    let (saddr, daddr) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let udp_len = (8 + payload) as u16;
    let mut h = Vec::new();
    h.extend_from_slice(&dst);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&saddr);
    ip.extend_from_slice(&daddr);
    let ip_check = !fold(ones_sum(0, &ip));
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    h.extend_from_slice(&ip);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&saddr);
    pseudo.extend_from_slice(&daddr);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    h.extend_from_slice(&[0x04, 0xd2, 0x16, 0x2e]);
    h.extend_from_slice(&udp_len.to_be_bytes());
    h.extend_from_slice(&fold(ones_sum(0, &pseudo)).to_be_bytes());
    h
}

/// Whether the UDP checksum of an Ethernet + IPv4 + UDP frame verifies.
pub fn udp_checksum_ok(frame: &[u8]) -> bool {
    let udp = &frame[34..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[26..34]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    fold(ones_sum(ones_sum(0, &pseudo), udp)) == 0xffff
}

/// A fresh anonymous read-write mapping of `len` bytes, never unmapped
/// (what a UMEM region over caller memory must be).
pub fn anonymous_mapping(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping, no MAP_FIXED; checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap of {len} bytes");
    ptr.cast()
}

/// The first IPv4 frame from `src` that `peer` receives within 2 s (for
/// frames that are not test frames, which `packet_frames` skips).
pub fn first_ipv4_frame_from(peer: &PacketSocket, src: [u8; 6]) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv(&mut buf, left).unwrap() {
            Some(n) if buf[6..12] == src && buf[12..14] == [0x08, 0x00] => {
                return buf[..n].to_vec()
            }
            Some(_) => continue,
            None => panic!("the frame did not reach the peer"),
        }
    }
}
