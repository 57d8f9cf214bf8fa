//! Device-logic tests: the driver harness against `Net`, with a datagram
//! socket pair as the host side (frames keep their boundaries, as on a NIC).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use super::harness::DriverHarness;
use super::*;
use crate::bus::BusDevice;
use vm_memory::{Bytes, GuestAddress};

/// The host side of one queue pair over a datagram socket.
pub(super) struct SocketBackend {
    sock: UnixDatagram,
    buf: Box<[u8; 65536]>,
    pending: Option<usize>,
    /// Frames transmit accepts per call before claiming the ring is full.
    tx_room: usize,
    /// Takes checksums left to the host side, and fills them itself.
    host_csum: bool,
    /// How far into a frame such a checksum field may end (AF_XDP: the
    /// frame's first descriptor).
    csum_reach: usize,
}

impl SocketBackend {
    pub(super) fn pair() -> (Box<dyn NetBackend>, UnixDatagram) {
        Self::pair_taking_csum(false)
    }

    /// As [`SocketBackend::pair`], but taking the checksums the device
    /// leaves to the host side (as AF_XDP TX metadata does), filling them
    /// as a NIC would.
    pub(super) fn pair_with_host_csum() -> (Box<dyn NetBackend>, UnixDatagram) {
        Self::pair_taking_csum(true)
    }

    /// As [`SocketBackend::pair_with_host_csum`], taking only checksum
    /// fields that end within `reach` bytes of the frame's start.
    pub(super) fn pair_with_host_csum_reach(reach: usize) -> (Box<dyn NetBackend>, UnixDatagram) {
        Self::pair_taking_csum_within(true, reach)
    }

    fn pair_taking_csum(host_csum: bool) -> (Box<dyn NetBackend>, UnixDatagram) {
        Self::pair_taking_csum_within(host_csum, usize::MAX)
    }

    fn pair_taking_csum_within(
        host_csum: bool,
        csum_reach: usize,
    ) -> (Box<dyn NetBackend>, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let backend = SocketBackend {
            sock: a,
            buf: Box::new([0; 65536]),
            pending: None,
            tx_room: usize::MAX,
            host_csum,
            csum_reach,
        };
        (Box::new(backend), b)
    }

    /// A backend over `sock` that takes `tx_room` frames per transmit call.
    pub(super) fn with_tx_room(sock: UnixDatagram, tx_room: usize) -> Box<dyn NetBackend> {
        Box::new(SocketBackend {
            sock,
            buf: Box::new([0; 65536]),
            pending: None,
            tx_room,
            host_csum: false,
            csum_reach: usize::MAX,
        })
    }
}

impl NetBackend for SocketBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        let mut taken = 0;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.sock.recv(&mut self.buf[..]) {
                    Ok(len) => len,
                    Err(_) => return taken,
                },
            };
            if !deliver(&self.buf[..len]) {
                self.pending = Some(len);
                return taken;
            }
            self.pending = None;
            taken += 1;
        }
    }

    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        let mut frame = [0u8; 2048];
        let mut sent = 0;
        while sent < self.tx_room {
            match fill(&mut frame) {
                Some(TxFrame { len, csum }) => {
                    // As a NIC would: finish what was left to it.
                    if let Some(c) = csum {
                        assert!(self.host_csum, "checksum left to a backend that takes none");
                        let end = usize::from(c.start) + usize::from(c.offset) + 2;
                        assert!(end <= self.csum_reach, "checksum field ends at {end}");
                        offload::gso::fill_partial_csum(
                            &mut frame[..len],
                            usize::from(c.start),
                            usize::from(c.offset),
                        )
                        .expect("a checksum request inside the frame");
                    }
                    // The socket is non-blocking (for receive); a full
                    // peer only slows the test down, it loses nothing.
                    while let Err(e) = self.sock.send(&frame[..len]) {
                        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    sent += 1;
                }
                None => return (sent, false),
            }
        }
        (sent, true)
    }

    fn tx_checksum_offload(&self) -> bool {
        self.host_csum
    }

    fn tx_checksum_reach(&self) -> usize {
        self.csum_reach
    }
}

pub(super) const MAC: [u8; 6] = [0x02, 0x58, 0x53, 0x4b, 0x00, 0x01];
pub(super) const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CTRL_VQ
    | VIRTIO_NET_F_MQ
    | VIRTIO_RING_F_EVENT_IDX;

/// The device tests' configuration: thread names `xskvm-{id}-q{pair}`.
pub(super) fn config(id: &str, spoof_check: bool) -> NetConfig {
    NetConfig {
        id: id.into(),
        mac: MAC,
        mtu: 1500,
        spoof_check,
        on_thread_start: None,
    }
}

fn net(backends: Vec<Box<dyn NetBackend>>) -> (Net, Vec<Arc<QueuePairCounters>>) {
    let net = Net::new(config("nettest", true), backends).unwrap();
    let counters = net.counters().to_vec();
    (net, counters)
}

/// A peer sending its frames over and over on a second queue pair, which
/// the guest uses (VQ_PAIRS_SET 2), until dropped.
pub(super) struct Flood {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _peer0: UnixDatagram,
}

/// A device of two queue pairs made by `make` from their backends,
/// started with `features` and both pairs in use; the second pair's peer
/// floods it with `frames`.
pub(super) fn two_pairs_flooded(
    make: impl FnOnce(Vec<Box<dyn NetBackend>>) -> Net,
    features: u64,
    frames: Vec<Vec<u8>>,
) -> (DriverHarness, Flood) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (b0, peer0) = SocketBackend::pair();
    let (b1, peer1) = SocketBackend::pair();
    let mut h = DriverHarness::new(make(vec![b0, b1]));
    h.start(features, 5, 256);
    assert_eq!(h.set_queue_pairs(4, 2, Duration::from_secs(5)), Some(0));
    let stop = Arc::new(AtomicBool::new(false));
    peer1
        .set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for f in &frames {
                    let _ = peer1.send(f);
                }
            }
        })
    };
    let flood = Flood {
        stop,
        thread: Some(thread),
        _peer0: peer0,
    };
    (h, flood)
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(super) fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (seq as usize * 7 + i) as u8;
    }
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Waits until `queue` returns `n` used entries in total.
pub(super) fn collect_used(h: &mut DriverHarness, queue: usize, n: usize) -> Vec<(u16, u32)> {
    let mut used = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while used.len() < n && Instant::now() < deadline {
        h.take_used(queue, &mut used);
        if used.len() < n {
            h.wait_interrupt(Duration::from_millis(50));
            h.ack_interrupt();
        }
    }
    used
}

#[test]
fn offers_features_and_config() {
    let (b, _peer) = SocketBackend::pair();
    let (dev, _) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    let offered = h.device_features();
    assert_eq!(offered & FEATURES, FEATURES);
    let mut config = [0u8; 12];
    h.transport
        .read(crate::virtio::mmio::REG_CONFIG, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "one pair");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500);
}

#[test]
fn transmits_frames_byte_for_byte_with_batched_interrupts() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    for seq in 0..100u32 {
        assert!(h.queue_tx_frame(1, &frame(seq, 60 + seq as usize * 10)));
    }
    h.kick(1);
    let mut buf = [0u8; 4096];
    for seq in 0..100u32 {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &frame(seq, 60 + seq as usize * 10)[..],
            "frame {seq}"
        );
    }
    let used = collect_used(&mut h, 1, 100);
    assert_eq!(used.len(), 100);
    let c = counters[0].snapshot();
    assert_eq!(c.tx_packets, 100);
    assert!(c.tx_batches < 100, "frames were batched: {c}");
    assert!(c.interrupts <= c.tx_batches + 1, "{c}");
}

#[test]
fn receives_frames_into_guest_buffers() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    assert_eq!(h.post_rx_buffers(0, 128), 128);
    h.kick(0);
    for seq in 0..50u32 {
        peer.send(&frame(seq, 1514)).unwrap();
    }
    let used = collect_used(&mut h, 0, 50);
    assert_eq!(used.len(), 50);
    let mut got = Vec::new();
    for (seq, &(id, len)) in used.iter().enumerate() {
        assert_eq!(len as usize, NET_HDR_LEN + 1514);
        h.rx_frame(0, id, len, &mut got);
        assert_eq!(got, frame(seq as u32, 1514), "frame {seq}");
    }
    assert_eq!(counters[0].snapshot().rx_packets, 50);
}

#[test]
fn frames_wait_for_guest_buffers_and_none_are_lost() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    h.post_rx_buffers(0, 4);
    h.kick(0);
    for seq in 0..20u32 {
        peer.send(&frame(seq, 100)).unwrap();
    }
    // Read each batch right away: the harness reuses buffers.
    let mut frames = Vec::new();
    let mut read_batch = |h: &mut DriverHarness, used: Vec<(u16, u32)>| {
        for (id, len) in used {
            let mut got = Vec::new();
            h.rx_frame(0, id, len, &mut got);
            frames.push(got);
        }
    };
    let used = collect_used(&mut h, 0, 4);
    assert_eq!(used.len(), 4);
    read_batch(&mut h, used);
    // The worker must now sleep, not spin, until buffers come.
    std::thread::sleep(Duration::from_millis(100));
    assert!(counters[0].snapshot().rx_no_buffer_waits >= 1);
    for _ in 0..4 {
        h.post_rx_buffers(0, 4);
        h.kick(0);
        let used = collect_used(&mut h, 0, 4);
        read_batch(&mut h, used);
    }
    assert_eq!(frames.len(), 20);
    for (seq, got) in frames.iter().enumerate() {
        assert_eq!(
            got,
            &frame(seq as u32, 100),
            "frame {seq} in order, none lost"
        );
    }
}

#[test]
fn two_queue_pairs_carry_their_own_traffic() {
    let (b0, peer0) = SocketBackend::pair();
    let (b1, peer1) = SocketBackend::pair();
    let (dev, counters) = net(vec![b0, b1]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 5, 256);
    assert_eq!(h.set_queue_pairs(4, 2, Duration::from_secs(5)), Some(0));
    h.queue_tx_frame(1, &frame(1, 64));
    h.queue_tx_frame(3, &frame(3, 64));
    h.kick(1);
    h.kick(3);
    let mut buf = [0u8; 2048];
    let n = peer0.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(1, 64)[..]);
    let n = peer1.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(3, 64)[..]);
    h.post_rx_buffers(2, 8);
    h.kick(2);
    peer1.send(&frame(9, 80)).unwrap();
    let used = collect_used(&mut h, 2, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(counters[0].snapshot().tx_packets, 1);
    assert_eq!(counters[1].snapshot().tx_packets, 1);
    assert_eq!(counters[1].snapshot().rx_packets, 1);
    assert_eq!(counters[0].snapshot().rx_packets, 0);
}

#[test]
fn control_queue_accepts_valid_pair_counts_only() {
    let (b0, _p0) = SocketBackend::pair();
    let (b1, _p1) = SocketBackend::pair();
    let (dev, _) = net(vec![b0, b1]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 5, 64);
    for (pairs, expect) in [(2u16, 0u8), (3, 1), (0, 1), (1, 0)] {
        let ack = h.set_queue_pairs(4, pairs, Duration::from_secs(5));
        assert_eq!(ack, Some(expect), "pairs {pairs}");
    }
}

/// Sends `seq` from `peer` and says whether it reached RX queue `queue`
/// (which has buffers posted) within a short wait.
fn arrives(h: &mut DriverHarness, peer: &UnixDatagram, queue: usize, seq: u32) -> bool {
    peer.send(&frame(seq, 80)).unwrap();
    let mut used = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(300);
    while used.is_empty() && Instant::now() < deadline {
        h.take_used(queue, &mut used);
        std::thread::sleep(Duration::from_millis(2));
    }
    h.post_rx_buffers(queue, used.len());
    used.iter().any(|&(id, len)| {
        let mut got = Vec::new();
        h.rx_frame(queue, id, len, &mut got);
        got == frame(seq, 80)
    })
}

#[test]
fn vq_pairs_set_decides_which_pairs_receive_and_the_rest_is_counted() {
    let (b0, peer0) = SocketBackend::pair();
    let (b1, peer1) = SocketBackend::pair();
    let (dev, counters) = net(vec![b0, b1]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 5, 256);
    h.post_rx_buffers(0, 16);
    h.post_rx_buffers(2, 16);
    h.kick(0);
    h.kick(2);
    // Before VQ_PAIRS_SET only the first pair is in use (virtio 5.1.6.5.5).
    assert!(arrives(&mut h, &peer0, 0, 1));
    assert!(!arrives(&mut h, &peer1, 2, 2), "pair 1 is not in use yet");
    assert_eq!(counters[1].snapshot().rx_dropped_inactive, 1);
    assert_eq!(h.set_queue_pairs(4, 2, Duration::from_secs(5)), Some(0));
    assert!(arrives(&mut h, &peer1, 2, 3), "pair 1 in use");
    assert_eq!(h.set_queue_pairs(4, 1, Duration::from_secs(5)), Some(0));
    assert!(!arrives(&mut h, &peer1, 2, 4), "pair 1 given up");
    assert!(arrives(&mut h, &peer0, 0, 5));
    let c = counters[1].snapshot();
    assert_eq!((c.rx_packets, c.rx_dropped_inactive), (1, 2), "{c}");
}

#[test]
fn without_mq_the_second_pair_drops_and_counts_its_frames() {
    let (b0, peer0) = SocketBackend::pair();
    let (b1, peer1) = SocketBackend::pair();
    let (dev, counters) = net(vec![b0, b1]);
    let mut h = DriverHarness::new(dev);
    // rx0, tx0, control: a driver that knows one pair only.
    h.start(FEATURES & !VIRTIO_NET_F_MQ, 3, 256);
    h.post_rx_buffers(0, 16);
    h.kick(0);
    for seq in 0..10 {
        peer1.send(&frame(seq, 80)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters[1].snapshot().rx_dropped_inactive < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(counters[1].snapshot().rx_dropped_inactive, 10);
    assert!(arrives(&mut h, &peer0, 0, 99));
}

#[test]
fn reset_mid_traffic_then_restart() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    h.post_rx_buffers(0, 16);
    h.kick(0);
    for seq in 0..100u32 {
        h.queue_tx_frame(1, &frame(seq, 64));
        if seq % 10 == 0 {
            h.kick(1);
        }
    }
    h.reset();
    assert_eq!(h.status(), 0);
    // Drain what reached the peer before the reset.
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    while peer.recv(&mut buf).is_ok() {}
    peer.set_nonblocking(false).unwrap();

    h.start(FEATURES, 3, 256);
    h.post_rx_buffers(0, 16);
    h.kick(0);
    h.queue_tx_frame(1, &frame(7777, 64));
    h.kick(1);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(7777, 64)[..]);
    peer.send(&frame(8888, 64)).unwrap();
    let used = collect_used(&mut h, 0, 1);
    let mut got = Vec::new();
    h.rx_frame(0, used[0].0, used[0].1, &mut got);
    assert_eq!(got, frame(8888, 64));
    assert!(counters[0].snapshot().tx_packets >= 1);
}

#[test]
fn malformed_chains_are_dropped_without_harm() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    // TX: buffer outside guest memory; a write-only descriptor; a runt; a loop.
    h.queue_raw_chain(1, &[(0x20_0000, 12, 0), (1 << 40, 100, 0)]);
    h.queue_raw_chain(1, &[(0x20_0000, 12, 0), (0x20_1000, 100, 2)]);
    h.queue_raw_chain(1, &[(0x20_0000, 12, 0), (0x20_1000, 4, 0)]);
    h.queue_looping_chain(1);
    h.queue_tx_frame(1, &frame(5, 64));
    h.kick(1);
    let mut buf = [0u8; 2048];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        &frame(5, 64)[..],
        "the good frame still goes out"
    );
    let used = collect_used(&mut h, 1, 5);
    assert_eq!(used.len(), 5, "every chain is returned");
    assert_eq!(counters[0].snapshot().tx_dropped, 4);

    // RX: a read-only buffer, a buffer outside memory, a too-small buffer.
    h.queue_raw_chain(0, &[(0x20_2000, 2048, 0)]);
    h.queue_raw_chain(0, &[(1 << 40, 2048, 2)]);
    h.queue_raw_chain(0, &[(0x20_3000, 20, 2)]);
    h.kick(0);
    for seq in 0..3 {
        peer.send(&frame(seq, 100)).unwrap();
    }
    let used = collect_used(&mut h, 0, 3);
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|&(_, len)| len == 0));
    let c = counters[0].snapshot();
    assert_eq!((c.rx_bad_descriptors, c.rx_dropped_too_big), (2, 1), "{c}");
    assert_eq!(h.status() & 64, 0, "no needs-reset for dropped chains");
}

#[test]
fn full_host_tx_ring_keeps_chains_waiting() {
    let (a, peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend = SocketBackend {
        sock: a,
        buf: Box::new([0; 65536]),
        pending: None,
        tx_room: 3,
        host_csum: false,
        csum_reach: usize::MAX,
    };
    let (dev, counters) = net(vec![Box::new(backend)]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    for seq in 0..10u32 {
        h.queue_tx_frame(1, &frame(seq, 64));
    }
    h.kick(1);
    let mut buf = [0u8; 2048];
    for seq in 0..10u32 {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &frame(seq, 64)[..]);
    }
    assert!(counters[0].snapshot().tx_ring_full >= 3);
}

fn read_status_word(h: &mut DriverHarness) -> u16 {
    let mut status = [0u8; 2];
    h.transport
        .read(crate::virtio::mmio::REG_CONFIG + 6, &mut status);
    u16::from_le_bytes(status)
}

fn config_generation(h: &mut DriverHarness) -> u32 {
    let mut data = [0u8; 4];
    h.transport
        .read(crate::virtio::mmio::REG_CONFIG_GENERATION, &mut data);
    u32::from_le_bytes(data)
}

#[test]
fn host_link_down_reaches_the_guest_and_tx_is_returned_not_retried() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let link = dev.link();
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    assert_eq!(read_status_word(&mut h), 1);
    let generation = config_generation(&mut h);
    while h.irq.read().is_ok() {}
    h.ack_interrupt();

    assert!(link.set_up(false));
    assert!(!link.set_up(false), "no change, no second interrupt");
    assert!(h.wait_interrupt(Duration::from_secs(2)));
    assert_ne!(
        h.ack_interrupt() & crate::virtio::INTERRUPT_CONFIG_CHANGE,
        0
    );
    assert_eq!(read_status_word(&mut h), 0, "VIRTIO_NET_S_LINK_UP cleared");
    assert_ne!(config_generation(&mut h), generation);

    for seq in 0..10 {
        h.queue_tx_frame(1, &frame(seq, 64));
    }
    h.kick(1);
    assert_eq!(collect_used(&mut h, 1, 10).len(), 10, "chains come back");
    let deadline = Instant::now() + Duration::from_secs(2);
    while counters[0].snapshot().tx_dropped_link_down < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = counters[0].snapshot();
    assert_eq!((c.tx_dropped_link_down, c.tx_packets), (10, 0), "{c}");
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    assert!(peer.recv(&mut buf).is_err(), "nothing sent while down");
    peer.set_nonblocking(false).unwrap();

    assert!(link.set_up(true));
    assert!(h.wait_interrupt(Duration::from_secs(2)));
    assert_eq!(read_status_word(&mut h), 1);
    h.queue_tx_frame(1, &frame(77, 64));
    h.kick(1);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(77, 64)[..], "traffic resumes");
}

#[test]
fn replaced_backends_carry_the_traffic_from_then_on() {
    let (old, old_peer) = SocketBackend::pair();
    let (dev, _) = net(vec![old]);
    let link = dev.link();
    let mut h = DriverHarness::new(dev);
    // Replaced while the device is not running: the activation takes it.
    let (first, first_peer) = SocketBackend::pair();
    assert!(link.replace_backends(vec![first]).is_ok());
    h.start(FEATURES, 3, 256);
    h.post_rx_buffers(0, 8);
    h.kick(0);
    let mut buf = [0u8; 2048];
    h.queue_tx_frame(1, &frame(1, 64));
    h.kick(1);
    let n = first_peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(1, 64)[..]);

    // Replaced while running: the worker switches.
    let (second, second_peer) = SocketBackend::pair();
    assert!(link.replace_backends(vec![second]).is_ok());
    let (extra, _) = SocketBackend::pair();
    let (extra2, _) = SocketBackend::pair();
    assert!(
        link.replace_backends(vec![extra, extra2]).is_err(),
        "one per pair"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = 0;
    loop {
        h.queue_tx_frame(1, &frame(2, 64));
        h.kick(1);
        second_peer
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        if let Ok(n) = second_peer.recv(&mut buf) {
            assert_eq!(&buf[..n], &frame(2, 64)[..]);
            break;
        }
        sent += 1;
        assert!(Instant::now() < deadline, "never switched ({sent} frames)");
        let mut used = Vec::new();
        h.take_used(1, &mut used);
    }
    second_peer.send(&frame(3, 80)).unwrap();
    let used = collect_used(&mut h, 0, 1);
    let mut got = Vec::new();
    h.rx_frame(0, used[0].0, used[0].1, &mut got);
    assert_eq!(got, frame(3, 80));
    old_peer.set_nonblocking(true).unwrap();
    assert!(
        old_peer.recv(&mut buf).is_err(),
        "the first backend got nothing"
    );
}

/// `frame(seq, len)` with another source MAC.
fn frame_from(src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = frame(seq, len);
    f[6..12].copy_from_slice(&src);
    f
}

fn net_with(
    spoof_check: bool,
    backends: Vec<Box<dyn NetBackend>>,
) -> (Net, Arc<QueuePairCounters>) {
    let net = Net::new(config("nettx", spoof_check), backends).unwrap();
    let counters = net.counters()[0].clone();
    (net, counters)
}

/// Sends `frames` from the guest; returns what reached the peer.
fn send_and_collect(
    h: &mut DriverHarness,
    peer: &UnixDatagram,
    frames: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    for f in frames {
        assert!(h.queue_tx_frame(1, f));
    }
    h.kick(1);
    assert_eq!(collect_used(h, 1, frames.len()).len(), frames.len());
    recv_all(peer)
}

/// Every frame the peer receives until 300 ms pass without one.
pub(super) fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = peer.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

#[test]
fn spoofed_and_oversize_frames_are_dropped_and_counted() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net_with(true, vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    let other = [0x02, 0, 0, 0, 0, 0x99];
    let frames = [
        frame(1, 64),
        frame_from(other, 2, 64),
        frame(3, 1500 + 18),
        frame(4, 1500 + 19),
        frame(5, 64),
    ];
    let got = send_and_collect(&mut h, &peer, &frames);
    assert_eq!(
        got,
        vec![frames[0].clone(), frames[2].clone(), frames[4].clone()]
    );
    let c = counters.snapshot();
    assert_eq!(
        (
            c.tx_packets,
            c.tx_dropped,
            c.tx_dropped_spoofed,
            c.tx_dropped_oversize
        ),
        (3, 2, 1, 1),
        "{c}"
    );
}

#[test]
fn spoof_check_off_lets_any_source_mac_out() {
    let (b, peer) = SocketBackend::pair();
    let (dev, counters) = net_with(false, vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    let frames = [frame_from([0x02, 0, 0, 0, 0, 0x42], 1, 64), frame(2, 64)];
    assert_eq!(send_and_collect(&mut h, &peer, &frames), frames.to_vec());
    assert_eq!(counters.snapshot().tx_dropped_spoofed, 0);
}

/// Records every receive mode the device asks the host to enforce.
#[derive(Default)]
struct RecordingFilter(std::sync::Mutex<Vec<RxMode>>);

impl RxFilterSink for RecordingFilter {
    fn apply(&self, mode: &RxMode) {
        self.0.lock().unwrap().push(*mode);
    }
}

impl RecordingFilter {
    fn last(&self) -> RxMode {
        *self.0.lock().unwrap().last().expect("a mode was applied")
    }
}

fn mac_table_command(unicast: &[[u8; 6]], multicast: &[[u8; 6]]) -> Vec<u8> {
    let mut cmd = vec![1u8, 0]; // VIRTIO_NET_CTRL_MAC, MAC_TABLE_SET
    for table in [unicast, multicast] {
        cmd.extend_from_slice(&(table.len() as u32).to_le_bytes());
        for mac in table {
            cmd.extend_from_slice(mac);
        }
    }
    cmd
}

#[test]
fn receive_mode_commands_reach_the_host_filter() {
    let (b, _peer) = SocketBackend::pair();
    let (dev, _) = net(vec![b]);
    let link = dev.link();
    let filter = Arc::new(RecordingFilter::default());
    link.set_rx_filter(filter.clone());
    assert_eq!(filter.last(), RxMode::default_for(MAC), "applied at once");
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES | VIRTIO_NET_F_CTRL_RX, 3, 64);
    let wait = Duration::from_secs(5);

    assert_eq!(h.send_ctrl(2, &[0, 0, 1], wait), Some(0), "promisc on");
    assert!(filter.last().promisc);
    assert_eq!(h.send_ctrl(2, &[0, 1, 1], wait), Some(0), "allmulti on");
    assert!(filter.last().all_multi && filter.last().promisc);
    assert_eq!(h.send_ctrl(2, &[0, 0, 0], wait), Some(0), "promisc off");
    assert!(!filter.last().promisc);

    let uni = [[0x02, 1, 2, 3, 4, 5]];
    let multi = [[0x33, 0x33, 0, 0, 0, 1], [0x01, 0, 0x5e, 0, 0, 1]];
    assert_eq!(
        h.send_ctrl(2, &mac_table_command(&uni, &multi), wait),
        Some(0)
    );
    let mode = filter.last();
    assert!(mode.multicast_by_table);
    assert_eq!(mode.table(), &[uni[0], multi[0], multi[1]]);
    assert!(!mode.unicast_overflow && !mode.multicast_overflow);

    // More multicast addresses than the table holds: all multicast.
    let many: Vec<[u8; 6]> = (0..70u8).map(|i| [0x33, 0x33, 0, 0, 1, i]).collect();
    assert_eq!(
        h.send_ctrl(2, &mac_table_command(&uni, &many), wait),
        Some(0)
    );
    let mode = filter.last();
    assert!(
        mode.multicast_overflow && !mode.unicast_overflow,
        "{mode:?}"
    );
    assert_eq!(mode.table().len(), MAC_TABLE_MAX);

    // Malformed: a count beyond the data; a bad length for promisc.
    let mut bad = mac_table_command(&uni, &multi);
    bad[2] = 9;
    let before = filter.0.lock().unwrap().len();
    assert_eq!(h.send_ctrl(2, &bad, wait), Some(1));
    assert_eq!(h.send_ctrl(2, &[0, 0, 1, 1], wait), Some(1));
    assert_eq!(filter.0.lock().unwrap().len(), before, "nothing applied");

    // A reset goes back to the default mode.
    h.reset();
    assert_eq!(filter.last(), RxMode::default_for(MAC));
}

#[test]
fn receive_mode_commands_need_ctrl_rx() {
    let (b, _peer) = SocketBackend::pair();
    let (dev, _) = net(vec![b]);
    let filter = Arc::new(RecordingFilter::default());
    dev.link().set_rx_filter(filter.clone());
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 64);
    let wait = Duration::from_secs(5);
    assert_eq!(h.send_ctrl(2, &[0, 0, 1], wait), Some(1));
    assert_eq!(filter.0.lock().unwrap().len(), 1, "only the initial mode");
    assert!(h.device_features() & VIRTIO_NET_F_CTRL_RX != 0, "offered");
}

/// A backend whose ring is always full and whose fd never turns writable
/// (a pipe's read end): only the retry timer wakes the IO thread.
struct AlwaysFull {
    reader: std::fs::File,
    /// Kept open: without a writer the read end would report a hang-up.
    _writer: std::fs::File,
}

impl NetBackend for AlwaysFull {
    fn fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }
    fn receive(&mut self, _deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        0
    }
    fn transmit(&mut self, _fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        (0, true)
    }
}

/// Without EVENT_IDX a transmit pass that used no chain raised an
/// interrupt anyway, and while the host ring is full the pass repeats every
/// millisecond: ~1000 interrupts a second announcing nothing.
#[test]
fn a_blocked_tx_queue_raises_no_interrupts_without_used_entries() {
    let mut fds = [0; 2];
    // SAFETY: two ints for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and each is owned once.
    let (r, w) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let (dev, counters) = net(vec![Box::new(AlwaysFull {
        reader: r,
        _writer: w,
    })]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES & !VIRTIO_RING_F_EVENT_IDX, 3, 256);
    h.queue_tx_frame(1, &frame(1, 64));
    h.kick(1);
    std::thread::sleep(Duration::from_millis(100));
    let before = counters[0].snapshot();
    std::thread::sleep(Duration::from_millis(500));
    let after = counters[0].snapshot();
    let mut used = Vec::new();
    h.take_used(1, &mut used);
    assert!(used.is_empty());
    assert!(
        after.tx_retries > before.tx_retries + 100,
        "the retry timer ran: {after}"
    );
    assert!(
        after.interrupts - before.interrupts <= 1,
        "{} interrupts in 500 ms with no used entry: {after}",
        after.interrupts - before.interrupts
    );
}

/// With EVENT_IDX a driver that parks used_event far ahead (Linux while
/// NAPI polls with callbacks off) is not interrupted (virtio 1.2 2.7.10),
/// frames spread over several mergeable buffers included; the ring's
/// interrupt flag without EVENT_IDX likewise.
#[test]
fn receive_interrupts_follow_what_the_driver_asked_for() {
    for (size, what) in [
        (2048u32, "one chain per frame"),
        (256, "several chains per frame"),
    ] {
        for event_idx in [true, false] {
            let (b, peer) = SocketBackend::pair();
            let (dev, counters) = net(vec![b]);
            let mut h = DriverHarness::new(dev);
            let features = FEATURES | VIRTIO_NET_F_MRG_RXBUF;
            h.start(
                if event_idx {
                    features
                } else {
                    features & !VIRTIO_RING_F_EVENT_IDX
                },
                3,
                256,
            );
            assert_eq!(h.post_rx_buffers_sized(0, 128, size), 128);
            let avail = h.avail_ring_addr(0);
            if event_idx {
                // used_event: interrupt me when the used index passes 0x8000.
                h.mem
                    .write_obj(0x8000u16, GuestAddress(avail + 4 + 256 * 2))
                    .unwrap();
            } else {
                // VRING_AVAIL_F_NO_INTERRUPT.
                h.mem.write_obj(1u16, GuestAddress(avail)).unwrap();
            }
            h.kick(0);
            std::thread::sleep(Duration::from_millis(50));
            let before = counters[0].snapshot().interrupts;
            for seq in 0..10u32 {
                peer.send(&frame(seq, 1000)).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            let c = counters[0].snapshot();
            assert_eq!(c.rx_packets, 10, "{what}: {c}");
            assert_eq!(
                c.interrupts - before,
                0,
                "{what}, EVENT_IDX {event_idx}: interrupts the driver did not ask for"
            );
        }
    }
}

/// virtio 1.2 5.1.6.5.5: once VQ_PAIRS_SET is in a used buffer the device
/// must not put packets on receive queues beyond the new count. Pair 1's
/// IO thread, busy with a flood when the command is answered, went on
/// filling receiveq2 for the rest of its pass (up to 256 frames).
#[test]
fn no_frame_reaches_a_dropped_pair_after_vq_pairs_set_is_answered() {
    let (mut h, flood) = two_pairs_flooded(|b| net(b).0, FEATURES, vec![frame(7, 1500)]);
    std::thread::sleep(Duration::from_millis(100));
    const CMD: u64 = 0x3f0_0000;
    const ACK: u64 = CMD + 0x1_0000;
    let mut late = Vec::new();
    for _ in 0..5 {
        let ctrl_before = h.used_idx(4);
        h.post_rx_buffers(2, 256);
        h.kick(2);
        // VQ_PAIRS_SET 1, answered while pair 1 is busy.
        h.mem
            .write_slice(&[4u8, 0, 1, 0], GuestAddress(CMD))
            .unwrap();
        h.queue_raw_chain(
            4,
            &[(CMD, 4, 0), (ACK, 1, super::harness::VIRTQ_DESC_F_WRITE)],
        );
        h.kick(4);
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.used_idx(4) == ctrl_before && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        let at_answer = h.used_idx(2);
        std::thread::sleep(Duration::from_millis(100));
        late.push(h.used_idx(2).wrapping_sub(at_answer));
        let mut used = Vec::new();
        h.take_used(2, &mut used);
        h.take_used(4, &mut used);
        assert_eq!(h.set_queue_pairs(4, 2, Duration::from_secs(5)), Some(0));
    }
    drop(flood);
    assert!(
        late.iter().all(|&n| n == 0),
        "frames put on receiveq2 after VQ_PAIRS_SET 1 was answered, per round: {late:?}"
    );
}

/// A frame longer than the MTU is counted as oversize even when it is also
/// longer than the host side's buffer (it was a plain drop then).
#[test]
fn an_oversize_frame_longer_than_the_host_buffer_counts_as_oversize() {
    let (b, _peer) = SocketBackend::pair();
    let (dev, counters) = net(vec![b]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    // MTU 1500; the test backend's buffer is 2048 bytes.
    assert!(h.queue_tx_frame_with_header(1, [0; NET_HDR_LEN], &frame(1, 3000)));
    h.kick(1);
    assert_eq!(collect_used(&mut h, 1, 1).len(), 1);
    let c = counters[0].snapshot();
    assert_eq!((c.tx_dropped, c.tx_dropped_oversize), (1, 1), "{c}");
}

/// A backend that reports no room while its fd stays writable (an AF_XDP
/// socket whose kick the kernel refused, EAGAIN/EBUSY, with its ring less
/// than half full): the IO thread must not spin on the writable fd.
struct FullButWritable {
    sock: UnixDatagram,
    /// Kept open: the socket stays writable while its peer exists.
    _peer: UnixDatagram,
}

impl NetBackend for FullButWritable {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn receive(&mut self, _deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        0
    }
    fn transmit(&mut self, _fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        (0, true)
    }
}

#[test]
fn a_transmit_that_makes_no_progress_on_a_writable_backend_does_not_spin() {
    let (a, b) = UnixDatagram::pair().unwrap();
    let (dev, counters) = net(vec![Box::new(FullButWritable { sock: a, _peer: b })]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    h.queue_tx_frame(1, &frame(1, 64));
    h.kick(1);
    std::thread::sleep(Duration::from_millis(100));
    let before = counters[0].snapshot();
    std::thread::sleep(Duration::from_millis(500));
    let after = counters[0].snapshot();
    let passes = after.tx_ring_full - before.tx_ring_full;
    // The retry timer (1 ms) sets the pace: ~500 passes, not a spin.
    assert!(
        passes < 2_000,
        "{passes} transmit passes in 500 ms: {after}"
    );
    assert!(passes > 50, "it still retries: {after}");
}
