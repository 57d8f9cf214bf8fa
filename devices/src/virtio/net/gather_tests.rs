//! Transmit from guest memory (`umem=guest`) through the driver harness,
//! against a backend that sends gathered frames over a datagram socket and
//! says they are done only when the test lets it: chains held until then,
//! returned in order, given up on when the link goes down; what cannot be
//! gathered copied. (The real AF_XDP backend's test is vmm's afxdp_tests.)

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::harness::{DriverHarness, MEM_SIZE};
use super::tests::{collect_used, config, frame, FEATURES};
use super::*;

/// What the test sees of the backend, and how it lets frames complete.
#[derive(Default)]
struct Host {
    /// Tokens sent and not yet let through, oldest first.
    sent: VecDeque<u64>,
    /// Tokens let through, for take_completed.
    done: VecDeque<u64>,
    /// Frames sent from guest memory (with pieces) and copied (head only).
    gathered: usize,
    /// Pieces of each frame sent from guest memory, in order.
    pieces_per_frame: Vec<usize>,
    copied: usize,
    /// Refuse every piece: the device must copy.
    refuse_pieces: bool,
    /// Calls to disarm_unsent_gathers, and the chains held at each.
    disarmed: Vec<usize>,
    /// Takes checksums left to it (as AF_XDP TX metadata), filling them
    /// as a NIC would.
    host_csum: bool,
    /// Frames read from guest memory since the last token: a chain's
    /// frames must end with one.
    untokened: usize,
    /// Frames transmit_gather still takes before its ring is full (None:
    /// no limit).
    room: Option<usize>,
}

impl Host {
    /// Lets the oldest `n` tokens' frames complete.
    fn complete(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(t) = self.sent.pop_front() {
                self.done.push_back(t);
            }
        }
    }
}

struct GatherBackend {
    sock: UnixDatagram,
    mem: GuestMemoryMmap,
    host: Arc<Mutex<Host>>,
    max_piece: usize,
}

/// Pieces a frame may have behind its head (as the AF_XDP backend's).
const MAX_PIECES: usize = 15;

/// Fills what was left to the host side, as a NIC would.
fn finish_csum(host: &Host, frame: &mut [u8], csum: Option<CsumRequest>) {
    if let Some(c) = csum {
        assert!(host.host_csum, "checksum left to a backend that takes none");
        offload::gso::fill_partial_csum(frame, usize::from(c.start), usize::from(c.offset))
            .expect("a checksum request inside the frame");
    }
}

/// Pieces as guest ranges (the backend reads them back through vm-memory).
struct Pieces<'a> {
    mem: &'a GuestMemoryMmap,
    ranges: Vec<(GuestAddress, usize)>,
    max_piece: usize,
    refuse: bool,
}

impl TxPieces for Pieces<'_> {
    fn push(&mut self, addr: usize, len: usize) -> bool {
        if self.refuse || len > self.max_piece || len == 0 || self.ranges.len() == MAX_PIECES {
            return false;
        }
        // Host address back to a guest address: it must lie in guest RAM.
        for region in self.mem.iter() {
            let base = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            if (base..base + region.len() as usize).contains(&addr) {
                assert!(
                    addr + len <= base + region.len() as usize,
                    "a piece across a region's end"
                );
                let at = region.start_addr().0 + (addr - base) as u64;
                self.ranges.push((GuestAddress(at), len));
                return true;
            }
        }
        panic!("a piece outside guest memory: {addr:#x}");
    }

    fn clear(&mut self) {
        self.ranges.clear();
    }
}

impl NetBackend for GatherBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn receive(&mut self, _deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        0
    }

    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        let mut buf = vec![0u8; 16_384];
        let mut sent = 0;
        while let Some(f) = fill(&mut buf) {
            let mut host = self.host.lock().unwrap();
            finish_csum(&host, &mut buf[..f.len], f.csum);
            self.sock.send(&buf[..f.len]).unwrap();
            host.copied += 1;
            sent += 1;
        }
        (sent, false)
    }

    fn tx_gather_piece_max(&self) -> Option<usize> {
        Some(self.max_piece)
    }

    fn tx_gather_max_pieces(&self) -> usize {
        MAX_PIECES
    }

    fn tx_checksum_offload(&self) -> bool {
        self.host.lock().unwrap().host_csum
    }

    fn transmit_gather(&mut self, fill: &mut GatherFill<'_>) -> (usize, bool) {
        let mut head = vec![0u8; 2048];
        let mut sent = 0;
        loop {
            let (refuse, room) = {
                let host = self.host.lock().unwrap();
                (host.refuse_pieces, host.room)
            };
            if room == Some(0) {
                return (sent, true);
            }
            let mut pieces = Pieces {
                mem: &self.mem,
                ranges: Vec::new(),
                max_piece: self.max_piece,
                refuse,
            };
            let Some(f) = fill(&mut head, &mut pieces) else {
                return (sent, false);
            };
            let mut out = head[..f.head_len].to_vec();
            for &(at, len) in &pieces.ranges {
                let start = out.len();
                out.resize(start + len, 0);
                self.mem.read_slice(&mut out[start..], at).unwrap();
            }
            let mut host = self.host.lock().unwrap();
            finish_csum(&host, &mut out, f.csum);
            if let Some(room) = host.room.as_mut() {
                *room -= 1;
            }
            if pieces.ranges.is_empty() {
                host.copied += 1;
            } else {
                host.gathered += 1;
                host.pieces_per_frame.push(pieces.ranges.len());
            }
            // A GSO frame's segments but the last carry no token: the
            // last one's comes back once they are all done (in order).
            match f.token {
                Some(t) => {
                    host.sent.push_back(t);
                    host.untokened = 0;
                }
                None if !pieces.ranges.is_empty() => host.untokened += 1,
                None => {}
            }
            self.sock.send(&out).unwrap();
            sent += 1;
        }
    }

    fn take_completed(&mut self, done: &mut dyn FnMut(u64)) -> usize {
        let mut host = self.host.lock().unwrap();
        let n = host.done.len();
        for t in host.done.drain(..) {
            done(t);
        }
        n
    }

    fn disarm_unsent_gathers(&mut self) -> usize {
        let mut host = self.host.lock().unwrap();
        let held = host.sent.len();
        host.disarmed.push(held);
        0
    }
}

struct Setup {
    h: DriverHarness,
    peer: UnixDatagram,
    host: Arc<Mutex<Host>>,
    counters: Arc<QueuePairCounters>,
    link: NetLink,
}

fn setup(mtu: u16, max_piece: usize) -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let (a, peer) = UnixDatagram::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let host = Arc::new(Mutex::new(Host::default()));
    let backend = GatherBackend {
        sock: a,
        mem: mem.clone(),
        host: host.clone(),
        max_piece,
    };
    let net = Net::new(
        NetConfig {
            mtu,
            ..config("gather", true)
        },
        vec![Box::new(backend)],
    )
    .unwrap();
    let counters = net.counters()[0].clone();
    let link = net.link();
    let mut h = DriverHarness::with_memory(net, mem);
    h.start(FEATURES, 3, 256);
    Setup {
        h,
        peer,
        host,
        counters,
        link,
    }
}

/// [`setup`] with checksum and TSO offloads negotiated; `host_csum`: the
/// backend takes the checksums left to it (as with AF_XDP TX metadata).
fn setup_tso(mtu: u16, max_piece: usize, host_csum: bool) -> Setup {
    let mut s = setup(mtu, max_piece);
    // Before the driver starts again: the IO thread reads it per pass.
    s.host.lock().unwrap().host_csum = host_csum;
    s.h.reset();
    s.h.start(
        FEATURES | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4,
        3,
        256,
    );
    s
}

fn recv(peer: &UnixDatagram) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    let n = peer.recv(&mut buf).expect("a frame at the peer");
    buf.truncate(n);
    buf
}

/// Used entries that come within `wait`.
fn used_within(h: &mut DriverHarness, wait: Duration) -> Vec<(u16, u32)> {
    let mut used = Vec::new();
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        h.take_used(1, &mut used);
        std::thread::sleep(Duration::from_millis(2));
    }
    used
}

#[test]
fn gathered_chains_return_only_when_the_host_side_is_done_and_in_order() {
    let mut s = setup(1500, 700);
    let frames: Vec<Vec<u8>> = (0..3).map(|seq| frame(seq, 1500)).collect();
    for f in &frames {
        assert!(s.h.queue_tx_frame(1, f));
    }
    s.h.kick(1);
    for f in &frames {
        assert_eq!(&recv(&s.peer), f, "byte for byte");
    }
    // Sent, but the host side still reads them: nothing comes back.
    assert!(used_within(&mut s.h, Duration::from_millis(50)).is_empty());
    assert_eq!(s.host.lock().unwrap().gathered, 3);

    s.host.lock().unwrap().complete(1);
    let first = used_within(&mut s.h, Duration::from_millis(100));
    assert_eq!(first.len(), 1, "only the completed chain: {first:?}");
    s.host.lock().unwrap().complete(2);
    let rest = collect_used(&mut s.h, 1, 2);
    assert_eq!(rest.len(), 2);
    let c = s.counters.snapshot();
    assert_eq!(
        (c.tx_packets, c.tx_gathered_frames, c.tx_dropped),
        (3, 3, 0),
        "{c}"
    );
    assert!(c.tx_gather_waits > 0, "completions found on the timer: {c}");
    assert_eq!(c.tx_gather_abandoned, 0);
    // Behind a 14-byte head, 1486 bytes in pieces of at most 700 (the
    // backend refuses longer ones): three each.
    assert_eq!(s.host.lock().unwrap().pieces_per_frame, vec![3, 3, 3]);
}

#[test]
fn short_frames_and_frames_whose_pieces_are_refused_are_copied() {
    let mut s = setup(1500, 4000);
    let short = frame(1, 100);
    assert!(s.h.queue_tx_frame(1, &short));
    s.h.kick(1);
    assert_eq!(recv(&s.peer), short);
    assert_eq!(
        collect_used(&mut s.h, 1, 1).len(),
        1,
        "a copied chain at once"
    );

    s.host.lock().unwrap().refuse_pieces = true;
    let long = frame(2, 1500);
    assert!(s.h.queue_tx_frame(1, &long));
    s.h.kick(1);
    assert_eq!(recv(&s.peer), long);
    assert_eq!(
        collect_used(&mut s.h, 1, 1).len(),
        1,
        "a copied chain at once"
    );
    let host = s.host.lock().unwrap();
    assert_eq!((host.gathered, host.copied), (0, 2));
    assert!(host.sent.is_empty(), "no token for copied frames");
    drop(host);
    // A copied chain is used before its batch is counted.
    let c = counters_when(&s.counters, |c| c.tx_packets == 2);
    assert_eq!((c.tx_packets, c.tx_gathered_frames), (2, 0), "{c}");
}

/// The counters once `done` holds of them, or after 2 s.
fn counters_when(
    counters: &QueuePairCounters,
    done: impl Fn(&CountersSnapshot) -> bool,
) -> CountersSnapshot {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let c = counters.snapshot();
        if done(&c) || Instant::now() >= deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A jumbo frame the backend will not take as pieces and that does not
/// fit a head goes the copy way whole, between gathered frames.
#[test]
fn a_frame_too_long_for_a_head_goes_the_copy_way_between_gathered_ones() {
    let mut s = setup(9000, 1000);
    let frames = [frame(1, 1500), frame(2, 6000), frame(3, 1500)];
    // Before the chains are there: the IO thread may look at any time.
    s.host.lock().unwrap().refuse_pieces = true;
    // The 6000-byte frame over three 2 KiB slots (the harness's buffers).
    for f in &frames {
        assert!(s.h.queue_tx_frame_with_header(1, [0; NET_HDR_LEN], f));
    }
    s.h.kick(1);
    for f in &frames {
        assert_eq!(&recv(&s.peer), f);
    }
    assert_eq!(collect_used(&mut s.h, 1, 3).len(), 3);
    let host = s.host.lock().unwrap();
    assert_eq!(
        (host.gathered, host.copied),
        (0, 3),
        "all copied, one by transmit"
    );
    drop(host);

    // Now taken as pieces: all three from guest memory, in order.
    s.host.lock().unwrap().refuse_pieces = false;
    for f in &frames {
        assert!(s.h.queue_tx_frame_with_header(1, [0; NET_HDR_LEN], f));
    }
    s.h.kick(1);
    for f in &frames {
        assert_eq!(&recv(&s.peer), f);
    }
    s.host.lock().unwrap().complete(3);
    assert_eq!(collect_used(&mut s.h, 1, 3).len(), 3);
    let c = s.counters.snapshot();
    assert_eq!((c.tx_packets, c.tx_gathered_frames), (6, 3), "{c}");
}

/// Link down: held chains come back at once (their frames are gone with
/// the link), and their tokens, should they still come, return nothing
/// twice.
#[test]
fn link_down_returns_held_chains_and_ignores_their_late_tokens() {
    let mut s = setup(1500, 4000);
    for seq in 0..4 {
        assert!(s.h.queue_tx_frame(1, &frame(seq, 1000)));
    }
    s.h.kick(1);
    for _ in 0..4 {
        recv(&s.peer);
    }
    assert!(used_within(&mut s.h, Duration::from_millis(30)).is_empty());
    assert!(s.link.set_up(false));
    let used = collect_used(&mut s.h, 1, 4);
    assert_eq!(
        used.len(),
        4,
        "held chains returned when the link went down"
    );
    let c = counters_when(&s.counters, |c| c.tx_gather_abandoned == 4);
    assert_eq!(c.tx_gather_abandoned, 4, "{c}");
    // Whatever the host side had not read yet reads no guest memory now.
    assert_eq!(s.host.lock().unwrap().disarmed, [4]);

    s.host.lock().unwrap().complete(4);
    assert!(s.link.set_up(true));
    assert!(
        used_within(&mut s.h, Duration::from_millis(50)).is_empty(),
        "late tokens return nothing"
    );
    // And the queue works on.
    let f = frame(9, 1000);
    assert!(s.h.queue_tx_frame(1, &f));
    s.h.kick(1);
    assert_eq!(recv(&s.peer), f);
    s.host.lock().unwrap().complete(1);
    assert_eq!(collect_used(&mut s.h, 1, 1).len(), 1);
}

/// A TSO chain part way out from guest memory (the host ring filled after
/// 3 of its 10 segments) is held nowhere yet, since a chain is held from its
/// last segment on. When the link goes down it goes back to the guest, and
/// what the host side has not read of it must first be disarmed, or the
/// kernel sends what the guest writes into the buffer next.
#[test]
fn link_down_disarms_a_tso_chain_sent_in_part_before_returning_it() {
    use super::offload::headers::{Ip, IPPROTO_TCP};
    use super::offload::VIRTIO_NET_HDR_GSO_TCPV4;
    use super::offload_tests::{gso_frame, payload};
    let mut s = setup_tso(1500, 4000, true);
    s.host.lock().unwrap().room = Some(3);
    let data = payload(14_480, 1);
    let (hdr, f) = gso_frame(Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 1448, &data);
    assert!(s.h.queue_tx_frame_with_header(1, hdr, &f));
    s.h.kick(1);
    for _ in 0..3 {
        recv(&s.peer);
    }
    assert_eq!(s.host.lock().unwrap().gathered, 3);
    assert!(used_within(&mut s.h, Duration::from_millis(30)).is_empty());
    // (The set-up's reset disarmed once already.)
    let before = s.host.lock().unwrap().disarmed.len();
    assert!(s.link.set_up(false));
    assert_eq!(
        collect_used(&mut s.h, 1, 1).len(),
        1,
        "the chain comes back"
    );
    assert!(
        s.host.lock().unwrap().disarmed.len() > before,
        "the chain went back to the guest while 3 of its segments in the host ring still \
         read its buffer"
    );
}

/// A reset while chains are held forgets them (the driver resets its
/// rings); their tokens, coming to the next activation's IO thread on the
/// same backend, return nothing, and that thread's own chains come back.
#[test]
fn a_reset_forgets_held_chains_and_their_late_tokens_return_nothing() {
    let mut s = setup(1500, 4000);
    for seq in 0..3 {
        assert!(s.h.queue_tx_frame(1, &frame(seq, 1000)));
    }
    s.h.kick(1);
    for _ in 0..3 {
        recv(&s.peer);
    }
    assert!(used_within(&mut s.h, Duration::from_millis(30)).is_empty());
    s.h.reset();
    assert_eq!(
        s.host.lock().unwrap().disarmed,
        [3],
        "the guest has its buffers back"
    );
    s.h.start(FEATURES, 3, 256);
    s.host.lock().unwrap().complete(3);
    let f = frame(7, 1000);
    assert!(s.h.queue_tx_frame(1, &f));
    s.h.kick(1);
    assert_eq!(recv(&s.peer), f);
    assert!(
        used_within(&mut s.h, Duration::from_millis(50)).is_empty(),
        "the old chains' tokens return nothing on the new rings"
    );
    s.host.lock().unwrap().complete(1);
    let used = collect_used(&mut s.h, 1, 1);
    assert_eq!(used.len(), 1, "{used:?}");
    std::thread::sleep(Duration::from_millis(20));
    let mut more = Vec::new();
    s.h.take_used(1, &mut more);
    assert!(more.is_empty(), "one used entry only: {more:?}");
}

/// Regression: a TSO segment too long for a head whose pieces the backend
/// refused (more than a frame may have) had no way out, and it and the
/// rest of its frame were dropped. A GSO chain whose segments are longer
/// than a head and could need that many pieces now goes the copy way.
#[test]
fn jumbo_segments_that_could_need_too_many_pieces_go_the_copy_way() {
    use super::offload::headers::{Ip, IPPROTO_TCP};
    use super::offload::VIRTIO_NET_HDR_GSO_TCPV4;
    use super::offload_tests::{check_segments, gso_frame, payload};
    let mut s = setup_tso(9000, 500, true);
    let data = payload(30_000, 1);
    let (hdr, f) = gso_frame(Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 8948, &data);
    // Over 15 of the harness's 2 KiB slots, pieces of at most 500 bytes:
    // a segment would need 19.
    assert!(s.h.queue_tx_frame_with_header(1, hdr, &f));
    s.h.kick(1);
    let segs: Vec<Vec<u8>> = (0..4).map(|_| recv(&s.peer)).collect();
    assert_eq!(check_segments(&segs, 9014), data);
    assert_eq!(collect_used(&mut s.h, 1, 1).len(), 1);
    let c = counters_when(&s.counters, |c| c.tx_gso_segments == 4);
    assert_eq!(
        (c.tx_gso_segments, c.tx_dropped, c.tx_gathered_frames),
        (4, 0, 0),
        "{c}"
    );

    // Jumbo segments in few enough pieces still go out from guest memory:
    // each of these lies in four or five of the 2 KiB slots.
    let mut s = setup_tso(9000, 4000, true);
    let data = payload(30_000, 3);
    let (hdr, f) = gso_frame(Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 8948, &data);
    assert!(s.h.queue_tx_frame_with_header(1, hdr, &f));
    s.h.kick(1);
    let segs: Vec<Vec<u8>> = (0..4).map(|_| recv(&s.peer)).collect();
    assert_eq!(check_segments(&segs, 9014), data);
    s.host.lock().unwrap().complete(1);
    assert_eq!(collect_used(&mut s.h, 1, 1).len(), 1);
    let c = counters_when(&s.counters, |c| c.tx_gathered_frames == 4);
    assert_eq!((c.tx_gathered_frames, c.tx_dropped), (4, 0), "{c}");

    // Segments that fit a head go out from guest memory in any case.
    let data = payload(10_000, 2);
    let (hdr, f) = gso_frame(Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 1448, &data);
    assert!(s.h.queue_tx_frame_with_header(1, hdr, &f));
    s.h.kick(1);
    let segs: Vec<Vec<u8>> = (0..7).map(|_| recv(&s.peer)).collect();
    assert_eq!(check_segments(&segs, 1514), data);
    s.host.lock().unwrap().complete(1);
    assert_eq!(collect_used(&mut s.h, 1, 1).len(), 1);
    let c = counters_when(&s.counters, |c| c.tx_gathered_frames == 4 + 7);
    assert_eq!((c.tx_gathered_frames, c.tx_dropped), (4 + 7, 0), "{c}");
    assert_eq!(s.host.lock().unwrap().untokened, 0);
}

/// Regression: GSO chains the device does not gather (here: no checksums
/// taken by the host side) whose segments are too long for a head go the
/// copy way in a batch of their own; the IO thread counted that batch as
/// taking no chain after the ring had announced one, took the avail ring
/// for broken and put the device into DEVICE_NEEDS_RESET (two such
/// frames were enough).
#[test]
fn jumbo_tso_chains_the_copy_way_do_not_fault_the_queue() {
    use super::offload::headers::{Ip, IPPROTO_TCP};
    use super::offload::VIRTIO_NET_HDR_GSO_TCPV4;
    use super::offload_tests::{check_segments, gso_frame, payload};
    let mut s = setup_tso(9000, 4000, false);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| payload(20_000, i)).collect();
    for data in &frames {
        let (hdr, f) = gso_frame(Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 8948, data);
        assert!(s.h.queue_tx_frame_with_header(1, hdr, &f));
    }
    s.h.kick(1);
    for data in &frames {
        let segs: Vec<Vec<u8>> = (0..3).map(|_| recv(&s.peer)).collect();
        assert_eq!(&check_segments(&segs, 9014), data);
    }
    assert_eq!(collect_used(&mut s.h, 1, 3).len(), 3);
    let c = counters_when(&s.counters, |c| c.tx_gso_segments == 9);
    assert_eq!((c.tx_gso_segments, c.queue_errors), (9, 0), "{c}");
}
