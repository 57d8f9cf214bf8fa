//! `umem=guest`: a NIC whose queues share one UMEM over memory the caller
//! owns (guest RAM followed by the queues' own frames), on real veth pairs.
//! The copy path runs in the queues' windows; guest memory is registered
//! but never written by it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use net_afxdp::testbed::{test_frame, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, UmemRegion, XskQueue};

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
    unsafe { UmemRegion::new(ptr, len, GUEST_BYTES) }.unwrap()
}

/// A fresh mapping of `GUEST_BYTES` of canary and `area` bytes after it.
fn guest_mapping(area: usize) -> (*mut u8, usize) {
    let len = GUEST_BYTES + area;
    // SAFETY: a fresh anonymous mapping, checked below.
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
    assert_ne!(ptr, libc::MAP_FAILED);
    // SAFETY: the mapping's first GUEST_BYTES, ours alone so far.
    unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), CANARY, GUEST_BYTES) };
    (ptr.cast(), len)
}

/// Guest memory bytes that are no longer the canary.
fn guest_bytes_touched(region: &UmemRegion) -> usize {
    let ptr = region.as_ptr();
    (0..GUEST_BYTES.min(region.area_start()))
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
        .map(|area_start| unsafe { UmemRegion::new(ptr, len, area_start) }.unwrap());
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
    drop(nics);
    assert_eq!(guest_bytes_touched(&regions[0]), 0);
}

/// Jumbo frames on a `umem=guest` NIC: the second queue shares the first
/// one's multi-buffer binding.
#[test]
fn jumbo_frames_on_guest_memory() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", "9000"]).unwrap();
    }
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let config: AfXdpConfig = format!("ifname={},queues=2,mode=native,umem=guest", pair.a)
        .parse()
        .unwrap();
    let region = region_for(&config);
    let mut a = open_on(&pair, &config, region);
    let mut b = open(&pair, &format!("ifname={},queues=2,mode=native", pair.b)).unwrap();
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
