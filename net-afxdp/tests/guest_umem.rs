//! `umem=guest`: a NIC whose queues share one UMEM over memory the caller
//! owns (guest RAM followed by the queues' own frames), on real veth pairs.
//! The copy path runs in the queues' windows; guest memory is registered
//! but never written by it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use net_afxdp::testbed::{test_frame, PacketSocket, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, GatherRequest, UmemRegion, XskQueue};

const SECOND: Duration = Duration::from_secs(1);
const GUEST_BYTES: usize = 4 << 20;
const CANARY: u8 = 0xa5;
/// From the minimum through one and several UMEM frames to 9000 MTU.
const JUMBO_SIZES: [usize; 9] = [60, 1514, 3840, 3841, 4096, 4097, 8192, 8193, 9014];

/// A region of `GUEST_BYTES` "guest RAM" (all `CANARY`) and an area for
/// `config`'s queues. Never unmapped, as UmemRegion requires.
fn region_for(config: &AfXdpConfig) -> UmemRegion {
    let (ptr, len) = guest_mapping(config.queue_umem_bytes() as usize);
    // SAFETY: the mapping is never unmapped; the test reads guest memory
    // only after the sockets are gone, and through volatile reads.
    unsafe { UmemRegion::new(ptr, len, GUEST_BYTES, GUEST_BYTES) }.unwrap()
}

/// A fresh mapping of `GUEST_BYTES` of canary and `area` bytes after it.
fn guest_mapping(area: usize) -> (*mut u8, usize) {
    let len = GUEST_BYTES + area;
    let ptr = anonymous_mapping(len);
    // SAFETY: the mapping's first GUEST_BYTES, ours alone so far.
    unsafe { std::ptr::write_bytes(ptr, CANARY, GUEST_BYTES) };
    (ptr, len)
}

/// A veth pair with `queues` queues (MTU `mtu` on both ends): end `a`
/// opened `umem=guest` (native mode) on a fresh region, end `b` plainly.
struct GuestPair {
    /// Held: dropping it removes the pair and its namespace.
    _pair: VethPair,
    a: AfXdpNic,
    b: AfXdpNic,
    region: UmemRegion,
    a_mac: [u8; 6],
    b_mac: [u8; 6],
}

fn guest_pair(queues: u32, mtu: u32) -> GuestPair {
    let pair = VethPair::new(queues).unwrap();
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", &mtu.to_string()])
            .unwrap();
    }
    let config: AfXdpConfig = format!("ifname={},queues={queues},mode=native,umem=guest", pair.a)
        .parse()
        .unwrap();
    let region = region_for(&config);
    let a = open_on(&pair, &config, region);
    let b = open(
        &pair,
        &format!("ifname={},queues={queues},mode=native", pair.b),
    )
    .unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    GuestPair {
        _pair: pair,
        a,
        b,
        region,
        a_mac,
        b_mac,
    }
}

/// Guest memory bytes that are no longer the canary.
fn guest_bytes_touched(region: &UmemRegion) -> usize {
    let ptr = region.as_ptr();
    (0..region.guest_len())
        // SAFETY: inside the region's mapping, which is never unmapped.
        .filter(|&i| unsafe { ptr.add(i).read_volatile() } != CANARY)
        .count()
}

fn open_on(pair: &VethPair, config: &AfXdpConfig, region: UmemRegion) -> AfXdpNic {
    pair.run(|| AfXdpNic::open_on(config, Some(region)))
        .expect("entering the test namespace")
        .unwrap_or_else(|e| panic!("open {}: {e}", config.ifname))
}

fn mixed_frames(dst: [u8; 6], src: [u8; 6], count: usize, tag: u64) -> Vec<Vec<u8>> {
    let sizes = [60, 64, 65, 128, 511, 1000, 1514];
    (0..count)
        .map(|i| test_frame(dst, src, (tag << 32) | i as u64, sizes[i % sizes.len()]))
        .collect()
}

/// Frames `got` as `sent`, in order; says where they part (never prints
/// the frames).
fn assert_frames(got: &[Vec<u8>], sent: &[Vec<u8>], what: &str) {
    assert_eq!(got.len(), sent.len(), "{what}: frames lost");
    if let Some(i) = (0..sent.len()).find(|&i| got[i] != sent[i]) {
        panic!(
            "{what}: frame {i} differs ({} bytes sent, {} received)",
            sent[i].len(),
            got[i].len()
        );
    }
}

/// Test frames from any of `queues`, until `count` or 5 s.
fn rx_any(queues: &mut [XskQueue], count: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + 5 * SECOND;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        for q in queues.iter_mut() {
            got.extend(rx_frames(q, count - got.len(), Duration::from_millis(10)));
        }
    }
    got
}

/// Both queues of a `umem=guest` NIC send to and receive from a plain
/// NIC, byte for byte, each on its own queue; nothing is written into
/// guest memory; closing and opening again on the same region works (what
/// a NIC that comes back after `ip link del` does). In skb mode veth
/// reports the peer's transmit queue j+1 as receive queue j (see
/// datapath.rs), so the peer has a third queue there.
fn two_queues_on_guest_memory(mode: &str) {
    init_log();
    let skb = mode == "skb";
    let pair = VethPair::new(3).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let config: AfXdpConfig = format!("ifname={},queues=2,mode={mode},umem=guest", pair.a)
        .parse()
        .unwrap();
    assert!(config.guest_umem);
    let region = region_for(&config);
    let mut b = open(&pair, &format!("ifname={},queues=3,mode={mode}", pair.b)).unwrap();
    for round in 0..2u64 {
        let mut a = open_on(&pair, &config, region);
        assert!(a.info().guest_umem, "{:?}", a.info());
        for j in 0..2usize {
            let tag = round * 100 + j as u64;
            let sent = mixed_frames(b_mac, a_mac, 100, tag + 1);
            tx_all(&mut a.queues_mut()[j], &sent);
            let got = rx_any(b.queues_mut(), sent.len());
            assert_frames(&got, &sent, &format!("A queue {j} to B, round {round}"));

            let sent = mixed_frames(a_mac, b_mac, 100, tag + 11);
            tx_all(&mut b.queues_mut()[if skb { j + 1 } else { j }], &sent);
            let got = rx_frames(&mut a.queues_mut()[j], 100, 5 * SECOND);
            assert_frames(&got, &sent, &format!("B to A queue {j}, round {round}"));
        }
        for q in a.queues_mut().iter_mut() {
            assert!(rx_frames(q, 1, Duration::from_millis(100)).is_empty());
            assert_no_leak(q);
            let k = q.xdp_statistics().unwrap();
            assert_eq!(
                (k.rx_dropped, k.rx_invalid_descs, k.tx_invalid_descs),
                (0, 0, 0),
                "{k:?}"
            );
        }
        drop(a);
        assert_eq!(
            guest_bytes_touched(&region),
            0,
            "the copy path wrote into guest memory (round {round})"
        );
    }
}

#[test]
fn two_queues_on_guest_memory_native() {
    require_root!();
    two_queues_on_guest_memory("native");
}

#[test]
fn two_queues_on_guest_memory_skb() {
    require_root!();
    two_queues_on_guest_memory("skb");
}

/// Two `umem=guest` NICs on one guest's memory (as xskvm sets up two
/// `--net ...,umem=guest`): each registers the whole mapping, each keeps
/// its frames in its own part of the area after guest RAM, and both carry
/// traffic at once without touching guest memory or each other.
#[test]
fn two_nics_share_one_guest_memory() {
    require_root!();
    init_log();
    let pairs = [VethPair::new(1).unwrap(), VethPair::new(1).unwrap()];
    let configs: Vec<AfXdpConfig> = pairs
        .iter()
        .map(|p| {
            format!("ifname={},mode=native,umem=guest", p.a)
                .parse()
                .unwrap()
        })
        .collect();
    let area_a = configs[0].queue_umem_bytes() as usize;
    let (ptr, len) = guest_mapping(area_a + configs[1].queue_umem_bytes() as usize);
    // SAFETY: as in region_for.
    let regions = [GUEST_BYTES, GUEST_BYTES + area_a]
        .map(|area_start| unsafe { UmemRegion::new(ptr, len, GUEST_BYTES, area_start) }.unwrap());
    let mut nics: Vec<AfXdpNic> = (0..2)
        .map(|i| open_on(&pairs[i], &configs[i], regions[i]))
        .collect();
    let mut peers: Vec<AfXdpNic> = pairs
        .iter()
        .map(|p| open(p, &format!("ifname={},mode=native", p.b)).unwrap())
        .collect();
    let macs: Vec<([u8; 6], [u8; 6])> = pairs
        .iter()
        .map(|p| (p.mac(&p.a).unwrap(), p.mac(&p.b).unwrap()))
        .collect();
    // Both NICs send before either side receives: their frames are out at
    // the same time.
    let out: Vec<Vec<Vec<u8>>> = (0..2)
        .map(|i| mixed_frames(macs[i].1, macs[i].0, 200, 1 + i as u64))
        .collect();
    let back: Vec<Vec<Vec<u8>>> = (0..2)
        .map(|i| mixed_frames(macs[i].0, macs[i].1, 200, 11 + i as u64))
        .collect();
    for i in 0..2 {
        tx_all(&mut nics[i].queues_mut()[0], &out[i]);
        tx_all(&mut peers[i].queues_mut()[0], &back[i]);
    }
    for i in 0..2 {
        let got = rx_frames(&mut peers[i].queues_mut()[0], 200, 5 * SECOND);
        assert_frames(&got, &out[i], &format!("NIC {i} to its peer"));
        let got = rx_frames(&mut nics[i].queues_mut()[0], 200, 5 * SECOND);
        assert_frames(&got, &back[i], &format!("peer to NIC {i}"));
        assert_no_leak(&nics[i].queues()[0]);
    }
    // The second NIC sends from guest memory, never from the first one's
    // area, which lies between guest memory and its own.
    let q = &mut nics[1].queues_mut()[0];
    for (offset, sent) in [(GUEST_BYTES as u64 + 0x100, 0), (0x100, 1)] {
        let mut once = false;
        let batch = q.tx_gather(1, |_, pieces| {
            if std::mem::replace(&mut once, true) {
                return None;
            }
            pieces.push(offset, 60);
            Some(GatherRequest::default())
        });
        assert_eq!(batch.sent, sent, "a piece at {offset:#x}");
    }
    drop(nics);
    assert_eq!(guest_bytes_touched(&regions[0]), 0);
}

/// Jumbo frames on a `umem=guest` NIC: the second queue shares the first
/// one's multi-buffer binding.
#[test]
fn jumbo_frames_on_guest_memory() {
    require_root!();
    init_log();
    let GuestPair {
        mut a,
        mut b,
        region,
        a_mac,
        b_mac,
        ..
    } = guest_pair(2, 9000);
    assert!(a.info().multi_buffer, "{:?}", a.info());
    for j in 0..2usize {
        assert!(a.queues()[j].is_multi_buffer(), "queue {j}");
        let sent: Vec<Vec<u8>> = (0..30)
            .map(|i| {
                test_frame(
                    b_mac,
                    a_mac,
                    (j as u64) << 32 | i,
                    JUMBO_SIZES[i as usize % JUMBO_SIZES.len()],
                )
            })
            .collect();
        tx_all(&mut a.queues_mut()[j], &sent);
        let got = rx_frames(&mut b.queues_mut()[j], sent.len(), 5 * SECOND);
        assert_frames(&got, &sent, &format!("A queue {j} to B"));

        let sent: Vec<Vec<u8>> = (0..30)
            .map(|i| {
                test_frame(
                    a_mac,
                    b_mac,
                    (j as u64 + 10) << 32 | i,
                    JUMBO_SIZES[i as usize % JUMBO_SIZES.len()],
                )
            })
            .collect();
        tx_all(&mut b.queues_mut()[j], &sent);
        let got = rx_frames(&mut a.queues_mut()[j], sent.len(), 5 * SECOND);
        assert_frames(&got, &sent, &format!("B queue {j} to A"));
        assert_no_leak(&a.queues()[j]);
    }
    drop(a);
    assert_eq!(guest_bytes_touched(&region), 0);
}

/// A NIC opened again with `umem=guest` takes the same windows of the
/// region as the sockets it replaces, which may still hold frames unread:
/// it gives the kernel no frame before its first receive, so nothing new
/// is written over those until its user has switched to it.
#[test]
fn a_reopened_nic_gives_the_kernel_no_frame_before_its_first_receive() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let config: AfXdpConfig = format!("ifname={},queues=1,mode=native,umem=guest", pair.a)
        .parse()
        .unwrap();
    let region = region_for(&config);
    let mut a = pair
        .run(|| AfXdpNic::reopen_on(&config, Some(region)))
        .unwrap()
        .unwrap();
    let mut b = open(&pair, &format!("ifname={},queues=1,mode=native", pair.b)).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let area = |region: &UmemRegion| -> Vec<u8> {
        let ptr = region.as_ptr();
        (region.area_start()..region.len())
            // SAFETY: inside the region's mapping, which is never unmapped.
            .map(|i| unsafe { ptr.add(i).read_volatile() })
            .collect()
    };
    let before = area(&region);
    let early: Vec<Vec<u8>> = (0..20).map(|i| test_frame(a_mac, b_mac, i, 300)).collect();
    tx_all(&mut b.queues_mut()[0], &early);
    std::thread::sleep(Duration::from_millis(100));
    let k = a.queues()[0].xdp_statistics().unwrap();
    assert!(k.rx_dropped >= 20, "frames went into the window: {k:?}");
    assert!(
        area(&region) == before,
        "the kernel wrote into the queue's window"
    );
    // The first receive gives the kernel its frames.
    let got = rx_frames(&mut a.queues_mut()[0], 1, Duration::from_millis(50));
    assert!(got.is_empty());
    let later: Vec<Vec<u8>> = (100..120)
        .map(|i| test_frame(a_mac, b_mac, i, 300))
        .collect();
    tx_all(&mut b.queues_mut()[0], &later);
    let got = rx_frames(&mut a.queues_mut()[0], later.len(), 5 * SECOND);
    assert_frames(&got, &later, "after the first receive");
}

/// The region must come exactly with `umem=guest`, with room for the
/// queues' frames.
#[test]
fn guest_memory_must_match_the_option() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let guest: AfXdpConfig = format!("ifname={},umem=guest", pair.a).parse().unwrap();
    let own: AfXdpConfig = format!("ifname={}", pair.a).parse().unwrap();
    let region = region_for(&guest);
    let open_err = |config: &AfXdpConfig, region: Option<UmemRegion>| {
        pair.run(|| AfXdpNic::open_on(config, region))
            .expect("entering the test namespace")
            .expect_err("must be refused")
            .to_string()
    };
    let e = open_err(&guest, None);
    assert!(e.contains("no guest memory was given"), "{e}");
    let e = open_err(&own, Some(region));
    assert!(e.contains("without umem=guest"), "{e}");
    // A region whose area holds one queue, for a config with two.
    let two: AfXdpConfig = format!("ifname={},queues=2,umem=guest", pair.a)
        .parse()
        .unwrap();
    let e = open_err(&two, Some(region));
    assert!(e.contains("the queues need"), "{e}");
    // Nothing stayed attached after the refusals.
    assert_eq!(wait_no_xdp(&pair, &pair.a), None);
}

/// Writes `bytes` at `offset` of the region's guest memory.
fn guest_write(region: &UmemRegion, offset: usize, bytes: &[u8]) {
    assert!(offset + bytes.len() <= region.guest_len());
    // SAFETY: inside guest memory of a mapping that is never unmapped; no
    // socket writes guest memory (the copy path keeps to its window).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.as_ptr().add(offset), bytes.len())
    };
}

/// A snapshot of guest memory.
fn guest_bytes(region: &UmemRegion) -> Vec<u8> {
    let mut v = vec![0u8; region.guest_len()];
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(region.as_ptr(), v.as_mut_ptr(), v.len()) };
    v
}

/// How a test frame is laid out for `tx_gather`: bytes in the head, then
/// pieces of guest memory (at their offsets).
struct Layout {
    head: usize,
    pieces: Vec<(usize, usize)>,
}

/// Frames sent from guest memory (no head; a head and one piece; several
/// pieces at odd offsets, across page boundaries), interleaved with frames
/// of the copy path on the same queue, reach the peer byte for byte and in
/// order; every token comes back once, in order; refused requests send
/// nothing and return their tokens in turn; guest memory is only read.
/// Both queues, the second on the first one's UMEM.
#[test]
fn frames_gathered_from_guest_memory_reach_the_peer_and_tokens_return_in_order() {
    require_root!();
    init_log();
    let GuestPair {
        mut a,
        mut b,
        region,
        a_mac,
        b_mac,
        ..
    } = guest_pair(2, 1500);
    // What a caller may push: pieces of a chunk less the TX metadata, as
    // many as a frame may have descriptors less one for a head.
    let limits = a.queues()[0].gather_piece_limits().expect("multi-buffer");
    assert_eq!(limits.max_pieces, 15);
    assert!(limits.piece_ok(limits.min_offset, limits.max_len as u32));
    assert!(!limits.piece_ok(limits.min_offset, limits.max_len as u32 + 1));
    let layouts = [
        Layout {
            head: 0,
            pieces: vec![(0x1000, 60)],
        },
        Layout {
            head: 14,
            pieces: vec![(0x2003, 1500)],
        },
        Layout {
            head: 0,
            pieces: vec![(0x2ff1, 300), (0x5001, 1000), (0x7fff, 214)],
        },
        Layout {
            head: 42,
            pieces: vec![(0x9e00, 900), (0xa200, 572)],
        },
        Layout {
            head: 64,
            pieces: vec![],
        },
        Layout {
            head: 0,
            pieces: vec![(0xc001, 700), (0xdfff, 1), (0xf000, 600), (0x18, 100)],
        },
    ];
    for j in 0..2usize {
        let queue = &mut a.queues_mut()[j];
        assert!(queue.is_sg(), "umem=guest binds XDP_USE_SG");
        assert!(
            queue.tx_checksum(),
            "the refusals below assume TX metadata (Linux 6.8+)"
        );
        let mut expected = Vec::new();
        let mut tokens = Vec::new();
        let mut sent_tokens = Vec::new();
        for round in 0..3u64 {
            // One batch of gathered frames, then copy-path frames.
            let frames: Vec<Vec<u8>> = layouts
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let len = l.head + l.pieces.iter().map(|p| p.1).sum::<usize>();
                    test_frame(b_mac, a_mac, (j as u64) << 40 | round << 32 | i as u64, len)
                })
                .collect();
            for (l, f) in layouts.iter().zip(&frames) {
                let mut at = l.head;
                for &(offset, len) in &l.pieces {
                    guest_write(&region, offset, &f[at..at + len]);
                    at += len;
                }
            }
            let before = guest_bytes(&region);
            let mut next = 0usize;
            let batch = queue.tx_gather(64, |head, pieces| {
                let (l, f) = (layouts.get(next)?, &frames[next]);
                head[..l.head].copy_from_slice(&f[..l.head]);
                for &(offset, len) in &l.pieces {
                    assert!(pieces.push(offset as u64, len as u32));
                }
                let token = round * 100 + next as u64;
                next += 1;
                Some(GatherRequest {
                    head_len: l.head,
                    csum: None,
                    token: Some(token),
                })
            });
            assert_eq!(
                batch.sent,
                layouts.len(),
                "{batch:?} {:?}",
                queue.counters().snapshot()
            );
            sent_tokens.extend((0..layouts.len() as u64).map(|i| round * 100 + i));
            expected.extend(frames);
            let copied = mixed_frames(b_mac, a_mac, 20, 50 + round + 10 * j as u64);
            tx_all(queue, &copied);
            expected.extend(copied);
            // Refused: a piece reaching past guest memory, one longer than a
            // UMEM frame less the TX metadata, an empty piece, a checksum
            // without a head, a piece with no room for TX metadata in
            // front (both as the kernel has them with TX metadata; each
            // with a good piece after it, which must not go either).
            // (head length, pieces, checksum request)
            type Request = (usize, Vec<(u64, u32)>, Option<(u16, u16)>);
            let bad: [Request; 5] = [
                (0, vec![(region.guest_len() as u64 - 10, 60)], None),
                (0, vec![(0x1001, 4073), (0x3000, 60)], None),
                (14, vec![(0x1000, 0), (0x3000, 60)], None),
                (0, vec![(0x1000, 60)], Some((34, 6))),
                (0, vec![(0x17, 60), (0x3000, 60)], None),
            ];
            let mut k = 0;
            let batch = queue.tx_gather(64, |_, pieces| {
                let (head_len, list, csum) = bad.get(k)?;
                for &(offset, len) in list {
                    pieces.push(offset, len);
                }
                k += 1;
                Some(GatherRequest {
                    head_len: *head_len,
                    csum: *csum,
                    token: Some(1000 + round * 10 + k as u64),
                })
            });
            assert_eq!(batch.sent, 0, "refused requests are not sent");
            sent_tokens.extend((1..=5).map(|k| 1000 + round * 10 + k));
            // A request of a token alone (a chain whose frames went out
            // another way) sends nothing, is no error, and its token comes
            // back in its turn.
            let mut once = Some(2000 + round);
            let batch = queue.tx_gather(64, |_, _| {
                Some(GatherRequest {
                    head_len: 0,
                    csum: None,
                    token: Some(once.take()?),
                })
            });
            assert_eq!(batch.sent, 0, "a token alone is not a frame");
            sent_tokens.push(2000 + round);
            assert_eq!(guest_bytes(&region), before, "guest memory was written");
        }
        let got = rx_frames(&mut b.queues_mut()[j], expected.len(), 5 * SECOND);
        assert_frames(&got, &expected, &format!("queue {j}"));
        let deadline = Instant::now() + 5 * SECOND;
        while tokens.len() < sent_tokens.len() && Instant::now() < deadline {
            queue_take(&mut a.queues_mut()[j], &mut tokens);
        }
        assert_eq!(tokens, sent_tokens, "queue {j}: tokens in order, each once");
        let q = &a.queues()[j];
        assert_eq!(q.tx_descs_in_flight(), 0);
        assert_no_leak(q);
        let c = q.counters().snapshot();
        assert_eq!(c.tx_invalid_len, 15, "{c:?}");
        let k = q.xdp_statistics().unwrap();
        assert_eq!(k.tx_invalid_descs, 0, "{k:?}");
    }
}

fn queue_take(q: &mut XskQueue, tokens: &mut Vec<u64>) {
    if q.take_completed(&mut |t| tokens.push(t)) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One queue `umem=guest` on end `a` of a fresh pair whose transmit
/// checksumming is off, so the kernel completes the checksums TX metadata
/// asks for and the packet socket on `b` sees them whole.
struct ChecksummingPair {
    pair: VethPair,
    a: AfXdpNic,
    region: UmemRegion,
    peer: PacketSocket,
    a_mac: [u8; 6],
    b_mac: [u8; 6],
}

fn checksumming_pair() -> ChecksummingPair {
    let pair = VethPair::new(1).unwrap();
    pair.transmit_checksumming_off(&pair.a).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let config: AfXdpConfig = format!("ifname={},mode=native,umem=guest", pair.a)
        .parse()
        .unwrap();
    let region = region_for(&config);
    let a = open_on(&pair, &config, region);
    let peer = packet_socket(&pair, &pair.b);
    assert!(
        a.queues()[0].tx_checksum(),
        "needs AF_XDP TX metadata (Linux 6.8+)"
    );
    ChecksummingPair {
        pair,
        a,
        region,
        peer,
        a_mac,
        b_mac,
    }
}

/// A gathered frame with a checksum request: the head (link, IPv4 and UDP
/// headers, the request in front) in the queue's own frame, the payload
/// in guest memory at an odd offset across a page; it arrives whole, its
/// UDP checksum summed over both (by the kernel, transmit checksumming
/// off on the veth, as in shared_umem.rs).
#[test]
fn a_gathered_frame_with_a_checksum_request_arrives_summed() {
    require_root!();
    init_log();
    let ChecksummingPair {
        pair: _pair,
        mut a,
        region,
        peer,
        a_mac,
        b_mac,
    } = checksumming_pair();
    let q = &mut a.queues_mut()[0];
    let payload: Vec<u8> = (0..1401u32).map(|i| (i * 13 + 5) as u8).collect();
    let header = udp_header(b_mac, a_mac, payload.len());
    guest_write(&region, 0x3f01, &payload);
    let mut once = false;
    let batch = q.tx_gather(1, |head, pieces| {
        if std::mem::replace(&mut once, true) {
            return None;
        }
        head[..header.len()].copy_from_slice(&header);
        pieces.push(0x3f01, payload.len() as u32);
        Some(GatherRequest {
            head_len: header.len(),
            csum: Some((34, 6)),
            token: Some(7),
        })
    });
    assert_eq!(batch.sent, 1);
    let frame = first_ipv4_frame_from(&peer, a_mac);
    assert_eq!(frame.len(), header.len() + payload.len());
    assert_eq!(frame[..40], header[..40]);
    assert_eq!(frame[42..], payload[..]);
    assert!(udp_checksum_ok(&frame), "bad UDP checksum");
    let mut tokens = Vec::new();
    let deadline = Instant::now() + 2 * SECOND;
    while tokens.is_empty() && Instant::now() < deadline {
        queue_take(q, &mut tokens);
    }
    assert_eq!(tokens, vec![7]);
}

/// Regression: frames gathered from guest memory that were still in the
/// tx ring when their chains went back to the guest (link down, where the
/// kernel consumes nothing; a device reset) were sent later, reading what
/// the guest had put in those buffers since, under a checksum the kernel
/// made over it. Disarmed, they read no guest memory and go out as junk no
/// stack takes; their completions still come in order, and frames sent
/// after them go out whole.
#[test]
fn frames_left_in_the_tx_ring_read_no_guest_memory_once_disarmed() {
    require_root!();
    init_log();
    let ChecksummingPair {
        pair,
        mut a,
        region,
        peer,
        a_mac,
        b_mac,
    } = checksumming_pair();
    let q = &mut a.queues_mut()[0];
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7 + 1) as u8).collect();
    let header = udp_header(b_mac, a_mac, payload.len());
    let at = |i: usize| 0x10000 + i * 0x1000;
    const FRAMES: usize = 4;
    for i in 0..=FRAMES {
        guest_write(&region, at(i), &payload);
    }
    let gather = |q: &mut XskQueue, frames: std::ops::Range<usize>| {
        let mut next = frames.start;
        q.tx_gather(frames.len(), |head, pieces| {
            if next == frames.end {
                return None;
            }
            head[..header.len()].copy_from_slice(&header);
            pieces.push(at(next) as u64, 700);
            pieces.push(at(next) as u64 + 700, 700);
            next += 1;
            Some(GatherRequest {
                head_len: header.len(),
                csum: Some((34, 6)),
                token: Some(next as u64),
            })
        })
    };
    pair.ip(&["link", "set", &pair.a, "down"]).unwrap();
    let batch = gather(q, 0..FRAMES);
    assert_eq!(batch.sent, FRAMES);
    assert!(
        batch.kick_pending,
        "the interface is down: nothing consumed"
    );
    assert_eq!(q.disarm_unsent_gathers(), FRAMES);
    assert_eq!(q.counters().snapshot().tx_gather_disarmed, FRAMES as u64);
    // The guest has its buffers back and reuses them.
    for i in 0..FRAMES {
        guest_write(&region, at(i), &[0xee; 1400]);
    }
    pair.ip(&["link", "set", &pair.a, "up"]).unwrap();
    let mut tokens = Vec::new();
    let deadline = Instant::now() + 5 * SECOND;
    while tokens.len() < FRAMES && Instant::now() < deadline {
        q.kick_tx();
        queue_take(q, &mut tokens);
    }
    assert_eq!(tokens, [1, 2, 3, 4], "completions in order");
    assert_eq!(gather(q, FRAMES..FRAMES + 1).sent, 1);
    // Everything from the guest's MAC until the frame sent last.
    let mut buf = vec![0u8; 65536];
    let mut junk = 0;
    loop {
        let n = peer
            .recv(&mut buf, 5 * SECOND)
            .unwrap()
            .expect("the frame sent after the link came back never arrived");
        let f = &buf[..n];
        if f[6..12] != a_mac {
            continue;
        }
        assert!(
            !f.windows(8).any(|w| w == [0xee; 8]),
            "a frame of {n} bytes carried what the guest wrote after getting its buffers back"
        );
        match [f[12], f[13]] {
            [0x88, 0xb5] => {
                assert_eq!(n, header.len() + 2, "the head and a byte per piece");
                junk += 1;
            }
            [0x08, 0x00] => {
                assert_eq!(f[42..], payload[..], "the frame sent after");
                assert!(udp_checksum_ok(f));
                break;
            }
            // The interface's own (IPv6 neighbour discovery on link up).
            _ => {}
        }
    }
    assert_eq!(junk, FRAMES);
    let deadline = Instant::now() + 2 * SECOND;
    while tokens.len() <= FRAMES && Instant::now() < deadline {
        queue_take(q, &mut tokens);
    }
    assert_eq!(tokens, [1, 2, 3, 4, 5]);

    // The link up, and one kick reading at most 32 descriptors (Linux's
    // default, as before 6.17; xskvm sets the ring size where it may),
    // which ends 12 frames of 3 inside the 11th: its head and first piece
    // are read; disarmed, it ends shorter than its IP header says.
    let budget: libc::c_int = 32;
    // SAFETY: a valid socket and option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            q.fd(),
            libc::SOL_XDP,
            9, // XDP_MAX_TX_SKB_BUDGET
            (&budget as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "XDP_MAX_TX_SKB_BUDGET (Linux 6.17+)");
    const MORE: usize = 12;
    for i in 0..MORE {
        guest_write(&region, at(i), &payload);
    }
    let batch = gather(q, 0..MORE);
    assert_eq!(batch.sent, MORE);
    assert!(batch.kick_pending, "a kick reads at most 32 descriptors");
    assert_eq!(
        q.disarm_unsent_gathers(),
        2,
        "the 11th frame in part, the 12th"
    );
    for i in 0..MORE {
        guest_write(&region, at(i), &[0xee; 1400]);
    }
    tokens.clear();
    let deadline = Instant::now() + 5 * SECOND;
    while tokens.len() < MORE && Instant::now() < deadline {
        q.kick_tx();
        queue_take(q, &mut tokens);
    }
    assert_eq!(tokens, (1..=MORE as u64).collect::<Vec<_>>());
    let (mut whole, mut short, mut junk) = (0, 0, 0);
    while whole + short + junk < MORE {
        let n = peer
            .recv(&mut buf, 5 * SECOND)
            .unwrap()
            .unwrap_or_else(|| panic!("{whole} whole, {short} short, {junk} junk frames"));
        let f = &buf[..n];
        if f[6..12] != a_mac {
            continue;
        }
        assert!(!f.windows(8).any(|w| w == [0xee; 8]), "{n} bytes");
        match [f[12], f[13]] {
            [0x88, 0xb5] => junk += 1,
            [0x08, 0x00] if f[42..] == payload[..] => whole += 1,
            [0x08, 0x00] => {
                let ip_len = usize::from(u16::from_be_bytes([f[16], f[17]]));
                assert_eq!(n, header.len() + 700 + 1);
                assert!(n < 14 + ip_len, "{n} bytes, IP length {ip_len}");
                short += 1;
            }
            _ => {}
        }
    }
    assert_eq!((whole, short, junk), (10, 1, 1));
    assert_eq!(q.tx_descs_in_flight(), 0);
    assert_no_leak(q);
    let k = q.xdp_statistics().unwrap();
    assert_eq!(k.tx_invalid_descs, 0, "{k:?}");
}
