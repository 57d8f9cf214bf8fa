//! Frames through real veth pairs: tx to the peer, rx from the peer, per
//! queue steering, drops when the receiver is slow, frame accounting.

mod common;

use std::time::Duration;

use common::*;
use net_afxdp::testbed::{test_frame_seq, VethPair};
use net_afxdp::{AfXdpConfig, UmemConfig, XdpMode};

const SECOND: Duration = Duration::from_secs(1);

/// Frame lengths from the minimum to a full 1500-MTU frame.
fn mixed_frames(dst: [u8; 6], src: [u8; 6], count: usize, tag: u64) -> Vec<Vec<u8>> {
    let sizes = [60, 64, 65, 128, 511, 1000, 1514];
    (0..count)
        .map(|i| test_frame(dst, src, (tag << 32) | i as u64, sizes[i % sizes.len()]))
        .collect()
}

fn tx_reaches_peer(mode: &str) {
    init_log();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={},mode={mode}", pair.a)).unwrap();
    let q = &mut nic.queues_mut()[0];
    let frames = mixed_frames(b_mac, a_mac, 300, 0);
    tx_all(q, &frames);
    let got = packet_frames(&peer, frames.len(), 5 * SECOND);
    assert_eq!(
        got.len(),
        frames.len(),
        "frames lost between the socket and the peer"
    );
    for (i, (sent, received)) in frames.iter().zip(&got).enumerate() {
        assert_eq!(sent, received, "frame {i} differs");
    }
    let c = q.counters().snapshot();
    assert_eq!(c.tx_packets, 300);
    assert_eq!(c.tx_completions, 300);
    assert_eq!(
        c.tx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert!(
        c.tx_kicks >= 1 && c.tx_kicks <= c.tx_batches + c.tx_kick_busy,
        "{c:?}"
    );
    assert_no_leak(q);
}

#[test]
fn tx_reaches_peer_byte_for_byte_native() {
    require_root!();
    tx_reaches_peer("native");
}

#[test]
fn tx_reaches_peer_byte_for_byte_skb() {
    require_root!();
    tx_reaches_peer("skb");
}

fn rx_from_peer(mode: &str) {
    init_log();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={},mode={mode}", pair.a)).unwrap();
    assert_eq!(
        nic.info().attach_mode,
        Some(if mode == "skb" {
            XdpMode::Skb
        } else {
            XdpMode::Native
        })
    );
    let frames = mixed_frames(a_mac, b_mac, 300, 0);
    let q = &mut nic.queues_mut()[0];
    // Interleave sending and receiving so nothing is dropped for lack of
    // fill ring entries (that case has its own test).
    let mut got = Vec::new();
    for chunk in frames.chunks(50) {
        for f in chunk {
            peer.send(f).unwrap();
        }
        got.extend(rx_frames(q, chunk.len(), 5 * SECOND));
    }
    assert_eq!(got.len(), frames.len());
    for (i, (sent, received)) in frames.iter().zip(&got).enumerate() {
        assert_eq!(sent, received, "frame {i} differs");
    }
    let c = q.counters().snapshot();
    assert_eq!(c.rx_packets, 300);
    assert_eq!(
        c.rx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    let k = q.xdp_statistics().unwrap();
    assert_eq!(
        (k.rx_dropped, k.rx_ring_full, k.rx_invalid_descs),
        (0, 0, 0),
        "{k:?}"
    );
    assert_no_leak(q);
}

#[test]
fn rx_from_peer_packet_socket_native() {
    require_root!();
    rx_from_peer("native");
}

#[test]
fn rx_from_peer_packet_socket_skb() {
    require_root!();
    rx_from_peer("skb");
}

/// Each of two queues gets only the traffic for its queue. On veth the
/// receive queue is the sender's transmit queue, so the peer sends with
/// its own AF_XDP socket on a chosen queue.
#[test]
fn two_queues_each_get_their_own_traffic_native() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let mut a = open(&pair, &format!("ifname={},queues=2,mode=native", pair.a)).unwrap();
    let mut b = open(&pair, &format!("ifname={},queues=2,mode=native", pair.b)).unwrap();
    assert_eq!(a.info().queue_ids, vec![0, 1]);
    for j in 0..2u64 {
        tx_all(
            &mut b.queues_mut()[j as usize],
            &mixed_frames(a_mac, b_mac, 100, j + 1),
        );
        tx_all(
            &mut a.queues_mut()[j as usize],
            &mixed_frames(b_mac, a_mac, 100, j + 11),
        );
    }
    for j in 0..2u64 {
        let got = rx_frames(&mut a.queues_mut()[j as usize], 100, 5 * SECOND);
        assert_eq!(by_tag(&got), [(j + 1, 100)].into(), "A queue {j}");
        let got = rx_frames(&mut b.queues_mut()[j as usize], 100, 5 * SECOND);
        assert_eq!(by_tag(&got), [(j + 11, 100)].into(), "B queue {j}");
    }
    // Nothing strayed onto the other queue afterwards either.
    for q in a.queues_mut().iter_mut().chain(b.queues_mut()) {
        assert!(rx_frames(q, 1, Duration::from_millis(100)).is_empty());
        assert_no_leak(q);
    }
}

/// In skb (generic XDP) mode veth reports the skb's queue mapping minus
/// one as the receive queue: the peer's transmit queue j+1 lands on
/// receive queue j. So the pair gets 3 queues and the peer uses
/// start-queue=1.
#[test]
fn two_queues_each_get_their_own_traffic_skb() {
    require_root!();
    init_log();
    let pair = VethPair::new(3).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let mut a = open(&pair, &format!("ifname={},queues=2,mode=skb", pair.a)).unwrap();
    let mut b = open(
        &pair,
        &format!("ifname={},queues=2,start-queue=1,mode=skb", pair.b),
    )
    .unwrap();
    assert_eq!(b.info().queue_ids, vec![1, 2]);
    for j in 0..2u64 {
        tx_all(
            &mut b.queues_mut()[j as usize],
            &mixed_frames(a_mac, b_mac, 100, j + 1),
        );
    }
    for j in 0..2u64 {
        let got = rx_frames(&mut a.queues_mut()[j as usize], 100, 5 * SECOND);
        assert_eq!(by_tag(&got), [(j + 1, 100)].into(), "A queue {j}");
    }
    for q in a.queues_mut().iter_mut().chain(b.queues_mut()) {
        assert!(rx_frames(q, 1, Duration::from_millis(100)).is_empty());
        assert_no_leak(q);
    }
}

#[test]
fn default_mode_attaches_native_on_veth() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let nic = open(&pair, &format!("ifname={}", pair.a)).unwrap();
    assert_eq!(nic.info().attach_mode, Some(XdpMode::Native));
    let p = pair
        .xdp_program(&pair.a)
        .unwrap()
        .expect("program attached");
    assert_eq!((p.mode, p.name.as_str()), ("native", "xskvm_redirect"));
    assert_eq!(Some(p.id), nic.info().program_id);
    assert_eq!(nic.info().zero_copy, vec![false], "veth has no zero-copy");
    drop(nic);
    assert_eq!(wait_no_xdp(&pair, &pair.a), None, "drop must detach");
}

/// Jumbo frame lengths around the UMEM frame (4096) and up to MTU 9000.
const JUMBO_SIZES: [usize; 9] = [60, 1514, 3840, 3841, 4096, 4097, 8192, 8193, 9014];

/// veth at MTU 9000 on both ends: the program (frags-aware) attaches in
/// the mode asked for, the socket binds multi-buffer, and frames of every
/// length up to 9014 bytes go both ways byte for byte, in order.
fn jumbo_frames_both_ways(mode: &str) {
    init_log();
    let pair = VethPair::new(1).unwrap();
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", "9000"]).unwrap();
    }
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={},mode={mode}", pair.a)).unwrap();
    let info = nic.info().clone();
    assert_eq!(info.mtu, Some(9000));
    assert!(info.multi_buffer, "{info:?}");
    assert!(info.max_frame >= 9018, "{info:?}");
    let q = &mut nic.queues_mut()[0];
    assert!(q.is_multi_buffer());

    let frames: Vec<Vec<u8>> = (0..90)
        .map(|i| test_frame(b_mac, a_mac, i as u64, JUMBO_SIZES[i % JUMBO_SIZES.len()]))
        .collect();
    tx_all(q, &frames);
    let got = packet_frames(&peer, frames.len(), 5 * SECOND);
    assert_eq!(got.len(), frames.len(), "frames lost on the way out");
    for (i, (sent, received)) in frames.iter().zip(&got).enumerate() {
        assert_eq!(sent.len(), received.len(), "frame {i} length");
        assert!(sent == received, "frame {i} ({} bytes) differs", sent.len());
    }
    let c = q.counters().snapshot();
    assert_eq!(c.tx_packets, frames.len() as u64);
    assert_eq!(
        c.tx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );

    let frames: Vec<Vec<u8>> = (0..90)
        .map(|i| {
            test_frame(
                a_mac,
                b_mac,
                1000 + i as u64,
                JUMBO_SIZES[i % JUMBO_SIZES.len()],
            )
        })
        .collect();
    let mut got = Vec::new();
    for chunk in frames.chunks(30) {
        for f in chunk {
            peer.send(f).unwrap();
        }
        got.extend(rx_frames(q, chunk.len(), 5 * SECOND));
    }
    assert_eq!(got.len(), frames.len(), "frames lost on the way in");
    for (i, (sent, received)) in frames.iter().zip(&got).enumerate() {
        assert_eq!(sent.len(), received.len(), "frame {i} length");
        assert!(sent == received, "frame {i} ({} bytes) differs", sent.len());
    }
    let c = q.counters().snapshot();
    assert_eq!((c.rx_packets, c.rx_too_long, c.rx_bad_descs), (90, 0, 0));
    let k = q.xdp_statistics().unwrap();
    assert_eq!(
        (k.rx_dropped, k.rx_invalid_descs, k.tx_invalid_descs),
        (0, 0, 0),
        "{k:?}"
    );
    assert_no_leak(q);
}

#[test]
fn jumbo_frames_both_ways_native() {
    require_root!();
    jumbo_frames_both_ways("native");
}

#[test]
fn jumbo_frames_both_ways_skb() {
    require_root!();
    jumbo_frames_both_ways("skb");
}

/// skb mode (generic XDP) hands the socket whole GSO/GRO packets, not
/// wire frames: at MTU 1500 the socket still binds multi-buffer and takes
/// frames up to 64 KiB whole. Here the MTU is raised under it (skb mode
/// allows that) and a 9000-byte frame arrives in one piece, the next one
/// after it.
#[test]
fn skb_mode_takes_frames_longer_than_the_mtu_whole() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={},mode=skb", pair.a)).unwrap();
    assert_eq!(nic.info().attach_mode, Some(XdpMode::Skb));
    assert!(nic.info().multi_buffer);
    assert!(nic.info().max_frame >= 1518);
    let q = &mut nic.queues_mut()[0];
    assert!(q.max_rx_frame() >= 65_536 + 14, "{}", q.max_rx_frame());
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", "9000"]).unwrap();
    }
    let frames = [
        test_frame(a_mac, b_mac, 1, 9014),
        test_frame(a_mac, b_mac, 2, 3840),
    ];
    for f in &frames {
        peer.send(f).unwrap();
    }
    let got = rx_frames(q, 2, SECOND);
    assert_eq!(seqs(&got), vec![1, 2]);
    assert!(got[0] == frames[0] && got[1] == frames[1]);
    assert_eq!(q.xdp_statistics().unwrap().rx_dropped, 0);
    assert_no_leak(q);
}

/// The receiver does not read: the fill ring runs empty and the rx ring
/// holds every receive frame. The kernel counts the rest as dropped; once
/// the receiver reads, frames flow again and none was lost or duplicated.
#[test]
fn slow_receiver_drops_are_counted_and_nothing_leaks() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut config: AfXdpConfig = format!("ifname={},mode=native", pair.a).parse().unwrap();
    config.umem = UmemConfig {
        frame_size: 2048,
        rx_frames: 64,
        tx_frames: 64,
    };
    let mut nic = open_config(&pair, &config).unwrap();
    let q = &mut nic.queues_mut()[0];
    for i in 0..300 {
        peer.send(&test_frame(a_mac, b_mac, i, 60)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let k = q.xdp_statistics().unwrap();
    // Copy mode: the kernel counts a frame with no fill entry as
    // rx_dropped and each empty look at the fill ring as
    // rx_fill_ring_empty_descs. The rx ring is as large as the receive
    // pool, so it never overflows by itself.
    assert_eq!(k.rx_dropped + k.rx_ring_full, 300 - 64, "{k:?}");
    assert!(k.rx_fill_ring_empty_descs >= 300 - 64, "{k:?}");
    let got = rx_frames(q, 300, Duration::from_millis(300));
    assert_eq!(
        seqs(&got),
        (0..64).collect::<Vec<_>>(),
        "the first 64 frames, in order"
    );
    // Reading as they come: all arrive, once each, in order.
    let mut after = Vec::new();
    for i in 1000..1100 {
        peer.send(&test_frame(a_mac, b_mac, i, 60)).unwrap();
        let sent = (i - 999) as usize;
        if sent.is_multiple_of(32) || sent == 100 {
            after.extend(seqs(&rx_frames(q, sent - after.len(), SECOND)));
        }
    }
    assert_eq!(after, (1000..1100).collect::<Vec<_>>());
    assert_eq!(
        q.xdp_statistics().unwrap().rx_dropped,
        300 - 64,
        "no drops once reading"
    );
    assert_no_leak(q);
    let a = q.frame_accounting().unwrap();
    assert_eq!(
        a.rx_in_kernel, 64,
        "the whole receive pool is back in the kernel: {a:?}"
    );
}

/// A callback that cannot take a frame leaves it (and the rest) queued.
#[test]
fn refused_frames_stay_queued_in_order() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={}", pair.a)).unwrap();
    let q = &mut nic.queues_mut()[0];
    for i in 0..10 {
        peer.send(&test_frame(a_mac, b_mac, i, 60)).unwrap();
    }
    assert!(q.poll(true, false, Some(SECOND)).unwrap().readable);
    std::thread::sleep(Duration::from_millis(50));
    let mut first = Vec::new();
    let taken = q.rx_batch(64, |f| {
        if first.len() == 3 {
            return false;
        }
        first.push(test_frame_seq(f).unwrap());
        true
    });
    assert_eq!((taken, first), (3, vec![0, 1, 2]));
    assert!(q.rx_ready());
    assert_eq!(seqs(&rx_frames(q, 7, SECOND)), (3..10).collect::<Vec<_>>());
    assert_eq!(q.counters().snapshot().rx_packets, 10);
    assert_no_leak(q);
}

/// More frames than the transmit pool: the batch stops with out_of_room,
/// the frames come back as completions, and bad lengths are dropped
/// without using up a frame.
#[test]
fn tx_runs_out_of_frames_then_recovers() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut config: AfXdpConfig = format!("ifname={}", pair.a).parse().unwrap();
    config.umem.tx_frames = 8;
    let mut nic = open_config(&pair, &config).unwrap();
    let q = &mut nic.queues_mut()[0];
    let mut seq = 0;
    let r = q.tx_batch(32, |buf| {
        write_test_frame(&mut buf[..100], b_mac, a_mac, seq);
        seq += 1;
        Some(100)
    });
    assert_eq!(r.sent, 8);
    assert!(r.out_of_room);
    wait_completions(q);
    assert_eq!(q.tx_free(), 8);
    // Length 0 and longer than the frame are refused; the frame is reused.
    let frame_size = q.frame_size() as usize;
    let mut lens = vec![0, frame_size + 1, 60].into_iter();
    let r = q.tx_batch(8, |buf| {
        let len = lens.next()?;
        if len <= buf.len() {
            write_test_frame(&mut buf[..len.max(22)], b_mac, a_mac, seq);
        }
        Some(len)
    });
    assert_eq!((r.sent, r.out_of_room), (1, false));
    wait_completions(q);
    let c = q.counters().snapshot();
    assert_eq!(
        (c.tx_packets, c.tx_invalid_len, c.tx_out_of_room),
        (9, 2, 1)
    );
    assert_eq!(packet_frames(&peer, 9, 2 * SECOND).len(), 9);
    assert_no_leak(q);
}

/// The parts go to their threads; the stats handle reads from another;
/// dropping the owner detaches the program while the queues live on.
#[test]
fn queues_run_on_their_own_threads_and_the_owner_detaches() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let nic = open(&pair, &format!("ifname={},queues=2", pair.a)).unwrap();
    let mut peer = open(&pair, &format!("ifname={},queues=2,mode=native", pair.b)).unwrap();
    let (owner, queues) = nic.into_parts();
    let handles: Vec<_> = queues.iter().map(|q| q.stats_handle()).collect();
    let threads: Vec<_> = queues
        .into_iter()
        .map(|mut q| std::thread::spawn(move || (rx_frames(&mut q, 50, 5 * SECOND).len(), q)))
        .collect();
    for j in 0..2u64 {
        tx_all(
            &mut peer.queues_mut()[j as usize],
            &mixed_frames(a_mac, b_mac, 50, j),
        );
    }
    let queues: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (j, (n, _)) in queues.iter().enumerate() {
        assert_eq!(*n, 50);
        let s = handles[j].snapshot();
        assert_eq!((s.queue_id, s.counters.rx_packets), (j as u32, 50));
        assert!(s.kernel.is_some());
    }
    drop(owner);
    assert_eq!(wait_no_xdp(&pair, &pair.a), None);
    drop(queues);
    assert!(
        handles[0].snapshot().kernel.is_none(),
        "socket closed with its queue"
    );
}

/// Which of `dsts` (one test frame each, from the peer) reach the socket.
fn delivered(
    nic: &mut net_afxdp::AfXdpNic,
    peer: &net_afxdp::testbed::PacketSocket,
    src: [u8; 6],
    dsts: &[[u8; 6]],
) -> Vec<[u8; 6]> {
    for (i, dst) in dsts.iter().enumerate() {
        peer.send(&test_frame(*dst, src, i as u64, 100)).unwrap();
    }
    let got = rx_frames(&mut nic.queues_mut()[0], dsts.len(), SECOND / 2);
    got.iter()
        .map(|f| <[u8; 6]>::try_from(&f[..6]).unwrap())
        .collect()
}

/// The program's receive filter: the guest's unicast, broadcast and
/// multicast go to the socket; other unicast passes to the host stack
/// and is counted; promiscuous mode and the MAC table widen it.
#[test]
fn rx_filter_keeps_other_unicast_from_the_guest_and_counts_it() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let b_mac = pair.mac(&pair.b).unwrap();
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={},mode=native", pair.a)).unwrap();
    let program = nic.owner().attachment().unwrap().program();
    let maps = program.rx_filter().try_clone().unwrap();
    let guest = [0x02, 0x58, 0x53, 0, 0, 1];
    let other = [0x02, 0x58, 0x53, 0, 0, 2];
    let listed = [0x02, 0x58, 0x53, 0, 0, 3];
    let bcast = [0xff; 6];
    let mdns = [0x01, 0x00, 0x5e, 0, 0, 0xfb];
    let all_nodes = [0x33, 0x33, 0, 0, 0, 1];
    let all = [guest, other, listed, bcast, mdns, all_nodes];

    // Not yet enabled: everything goes to the socket.
    assert_eq!(delivered(&mut nic, &peer, b_mac, &all), all);

    let mut config = net_afxdp::RxFilterConfig {
        mac: guest,
        enabled: 1,
        ..Default::default()
    };
    maps.set(&config, &[]).unwrap();
    assert_eq!(
        delivered(&mut nic, &peer, b_mac, &all),
        [guest, bcast, mdns, all_nodes]
    );
    assert_eq!(maps.filtered_frames(0), 2, "other and listed counted");

    config.multicast_by_table = 1;
    maps.set(&config, &[listed, all_nodes]).unwrap();
    assert_eq!(
        delivered(&mut nic, &peer, b_mac, &all),
        [guest, listed, bcast, all_nodes]
    );
    assert_eq!(maps.filtered_frames(0), 4);

    // A smaller table replaces the old one.
    maps.set(&config, &[mdns]).unwrap();
    assert_eq!(
        delivered(&mut nic, &peer, b_mac, &all),
        [guest, bcast, mdns]
    );

    config.promisc = 1;
    maps.set(&config, &[]).unwrap();
    assert_eq!(delivered(&mut nic, &peer, b_mac, &all), all);
    let too_many = vec![[0x02, 0, 0, 0, 0, 0]; net_afxdp::RX_FILTER_TABLE_MAX + 1];
    assert!(maps.set(&config, &too_many).is_err());
}
