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

pub use testbed::{test_frame, write_test_frame};

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
