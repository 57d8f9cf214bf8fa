//! Offloads through the driver harness: what a guest that negotiated
//! checksum and segmentation offloads hands the device, and what reaches
//! the host side (and back).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::harness::DriverHarness;
use super::offload::csum;
use super::offload::headers::testing::{fill_l4_checksum, frame, l4_checksum_ok};
use super::offload::headers::{self, Ip, IPPROTO_TCP, IPPROTO_UDP};
use super::offload::{
    VirtioNetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use super::tests::{collect_used, config, SocketBackend, FEATURES};
use super::*;

const TX_OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_USO;

fn device(features: u64) -> (DriverHarness, UnixDatagram, Arc<QueuePairCounters>) {
    let (b, peer) = SocketBackend::pair();
    let net = Net::new(config("netoff", true), vec![b]).unwrap();
    let counters = net.counters()[0].clone();
    let mut h = DriverHarness::new(net);
    h.start(features, 3, 256);
    (h, peer, counters)
}

fn payload(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + seed * 13) as u8).collect()
}

/// A GSO frame as Linux hands it over: NEEDS_CSUM, the transport checksum
/// field holding the pseudo-header sum (for length 0), `hdr_len` only a hint.
fn gso_frame(ip: Ip, proto: u8, gso_type: u8, mss: u16, data: &[u8]) -> ([u8; 12], Vec<u8>) {
    let mut f = frame(ip, proto, false, data);
    let l = headers::parse(&f).unwrap();
    let at = l.l4 + l.csum_offset();
    let pseudo = csum::fold(l.pseudo_sum(&f, 0));
    f[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len: 128,
        gso_size: mss,
        csum_start: l.l4 as u16,
        csum_offset: l.csum_offset() as u16,
        num_buffers: 0,
    };
    (hdr.to_bytes(), f)
}

fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = peer.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

/// Checks every wire frame and returns the payload they carry, in order.
fn check_segments(segs: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut joined = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        assert!(seg.len() <= max_len, "segment {i}: {} bytes", seg.len());
        let l = headers::parse(seg).expect("TCP or UDP");
        if l.ip == Ip::V4 {
            assert_eq!(csum::fold(csum::add(0, &seg[l.l3..l.l4])), 0xffff);
        }
        assert!(l4_checksum_ok(seg), "segment {i} checksum");
        joined.extend_from_slice(&seg[l.end..]);
    }
    joined
}

#[test]
fn gso_frames_leave_as_checksummed_wire_frames_carrying_the_whole_payload() {
    let (mut h, peer, counters) = device(FEATURES | TX_OFFLOADS);
    let cases = [
        (Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 65_000),
        (Ip::V6, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV6, 1428, 40_000),
        (Ip::V4, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4, 1472, 8_192),
        (Ip::V6, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4, 1452, 20_000),
    ];
    let mut segments = 0;
    for (n, &(ip, proto, gso_type, mss, len)) in cases.iter().enumerate() {
        let data = payload(len, n);
        let (hdr, f) = gso_frame(ip, proto, gso_type, mss, &data);
        assert!(h.queue_tx_frame_with_header(1, hdr, &f));
        h.kick(1);
        assert_eq!(
            collect_used(&mut h, 1, 1).len(),
            1,
            "case {n}: chain returned"
        );
        let segs = recv_all(&peer);
        assert_eq!(segs.len(), len.div_ceil(usize::from(mss)), "case {n}");
        assert_eq!(check_segments(&segs, 1514), data, "case {n}");
        segments += segs.len() as u64;
    }
    let c = counters.snapshot();
    assert_eq!((c.tx_gso_frames, c.tx_gso_segments), (4, segments), "{c}");
    assert_eq!((c.tx_packets, c.tx_dropped), (segments, 0), "{c}");
}

#[test]
fn needs_csum_frames_leave_with_their_checksum_filled() {
    let (mut h, peer, counters) = device(FEATURES | VIRTIO_NET_F_CSUM);
    for (ip, proto) in [(Ip::V4, IPPROTO_TCP), (Ip::V6, IPPROTO_UDP)] {
        let (mut hdr, f) = gso_frame(ip, proto, 0, 0, &payload(1001, 3));
        // Not GSO: the pseudo-header sum covers this frame's length.
        let l = headers::parse(&f).unwrap();
        let mut f = f;
        let at = l.l4 + l.csum_offset();
        let pseudo = csum::fold(l.pseudo_sum(&f, f.len() - l.l4));
        f[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        hdr[1] = 0;
        assert!(h.queue_tx_frame_with_header(1, hdr, &f));
        h.kick(1);
        let got = recv_all(&peer);
        assert_eq!(got.len(), 1);
        assert!(l4_checksum_ok(&got[0]));
        let mut want = f.clone();
        fill_l4_checksum(&mut want);
        assert_eq!(got[0], want);
    }
    assert_eq!(counters.snapshot().tx_csum_filled, 2);
}

#[test]
fn offload_requests_the_driver_did_not_negotiate_are_dropped_and_counted() {
    let (mut h, peer, counters) = device(FEATURES);
    let (hdr, f) = gso_frame(
        Ip::V4,
        IPPROTO_TCP,
        VIRTIO_NET_HDR_GSO_TCPV4,
        1448,
        &payload(5000, 1),
    );
    assert!(h.queue_tx_frame_with_header(1, hdr, &f));
    let mut csum_only = hdr;
    csum_only[1] = 0;
    assert!(h.queue_tx_frame_with_header(1, csum_only, &f[..1000]));
    // A plain frame still goes out.
    let plain = frame(Ip::V4, IPPROTO_UDP, false, b"plain");
    assert!(h.queue_tx_frame_with_header(1, [0; 12], &plain));
    h.kick(1);
    assert_eq!(collect_used(&mut h, 1, 3).len(), 3);
    assert_eq!(recv_all(&peer), vec![plain]);
    let c = counters.snapshot();
    assert_eq!((c.tx_offload_errors, c.tx_dropped), (2, 2), "{c}");
}

#[test]
fn gso_frames_too_big_for_the_mtu_or_spoofed_are_dropped_whole() {
    let (mut h, peer, counters) = device(FEATURES | TX_OFFLOADS);
    // Segments of 3000 bytes do not fit an MTU of 1500.
    let (hdr, f) = gso_frame(
        Ip::V4,
        IPPROTO_TCP,
        VIRTIO_NET_HDR_GSO_TCPV4,
        3000,
        &payload(9000, 2),
    );
    assert!(h.queue_tx_frame_with_header(1, hdr, &f));
    let (hdr, mut f) = gso_frame(
        Ip::V4,
        IPPROTO_TCP,
        VIRTIO_NET_HDR_GSO_TCPV4,
        1448,
        &payload(9000, 2),
    );
    f[11] ^= 1; // someone else's source MAC
    assert!(h.queue_tx_frame_with_header(1, hdr, &f));
    h.kick(1);
    assert_eq!(collect_used(&mut h, 1, 2).len(), 2);
    assert!(recv_all(&peer).is_empty());
    let c = counters.snapshot();
    assert_eq!((c.tx_dropped_oversize, c.tx_dropped_spoofed), (1, 1), "{c}");
}

#[test]
fn gso_segments_wait_for_host_room_and_arrive_in_order() {
    let (a, peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend = SocketBackend::with_tx_room(a, 5);
    let net = Net::new(config("netoff", true), vec![backend]).unwrap();
    let counters = net.counters()[0].clone();
    let mut h = DriverHarness::new(net);
    h.start(FEATURES | TX_OFFLOADS, 3, 256);
    let mut want = Vec::new();
    for n in 0..4 {
        let data = payload(30_000 + n, n);
        let (hdr, f) = gso_frame(Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 1448, &data);
        assert!(h.queue_tx_frame_with_header(1, hdr, &f));
        want.extend_from_slice(&data);
    }
    h.kick(1);
    assert_eq!(collect_used(&mut h, 1, 4).len(), 4);
    let segs = recv_all(&peer);
    assert_eq!(check_segments(&segs, 1514), want);
    let c = counters.snapshot();
    assert!(c.tx_ring_full >= 4, "{c}");
}

/// Receives `f` from the peer; returns the header and frame the guest got.
fn receive(h: &mut DriverHarness, peer: &UnixDatagram, f: &[u8]) -> (VirtioNetHdr, Vec<u8>) {
    h.post_rx_buffers(0, 1);
    h.kick(0);
    peer.send(f).unwrap();
    let used = collect_used(h, 0, 1);
    assert_eq!(used.len(), 1);
    let (id, len) = used[0];
    let mut got = Vec::new();
    h.rx_frame(0, id, len, &mut got);
    (VirtioNetHdr::from_bytes(&h.rx_header(0, id)), got)
}

/// A frame from a sender that left its checksum to the device.
fn partial(ip: Ip, proto: u8) -> Vec<u8> {
    let mut f = frame(ip, proto, false, &payload(1200, 9));
    let l = headers::parse(&f).unwrap();
    let at = l.l4 + l.csum_offset();
    let pseudo = csum::fold(l.pseudo_sum(&f, f.len() - l.l4));
    f[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    f
}

#[test]
fn frames_whose_sender_left_the_checksum_to_the_device_arrive_completed() {
    for guest_csum in [false, true] {
        let features = FEATURES
            | if guest_csum {
                VIRTIO_NET_F_GUEST_CSUM
            } else {
                0
            };
        let (mut h, peer, counters) = device(features);
        for (ip, proto) in [
            (Ip::V4, IPPROTO_TCP),
            (Ip::V6, IPPROTO_TCP),
            (Ip::V4, IPPROTO_UDP),
        ] {
            let f = partial(ip, proto);
            let (hdr, got) = receive(&mut h, &peer, &f);
            assert!(l4_checksum_ok(&got), "{ip:?} {proto}");
            let mut want = f.clone();
            fill_l4_checksum(&mut want);
            assert_eq!(got, want);
            let valid = if guest_csum {
                VIRTIO_NET_HDR_F_DATA_VALID
            } else {
                0
            };
            assert_eq!(hdr.flags, valid, "guest_csum {guest_csum}");
            assert_eq!(hdr.num_buffers, 1);
        }
        assert_eq!(counters.snapshot().rx_csum_completed, 3);
    }
}

#[test]
fn valid_frames_are_marked_and_corrupt_frames_reach_the_guest_unmarked_and_unchanged() {
    let (mut h, peer, counters) = device(FEATURES | VIRTIO_NET_F_GUEST_CSUM);
    let mut good = frame(Ip::V4, IPPROTO_TCP, false, &payload(800, 4));
    fill_l4_checksum(&mut good);
    let (hdr, got) = receive(&mut h, &peer, &good);
    assert_eq!(
        (hdr.flags, got),
        (VIRTIO_NET_HDR_F_DATA_VALID, good.clone())
    );
    let mut bad = good.clone();
    bad[500] ^= 0x04;
    let (hdr, got) = receive(&mut h, &peer, &bad);
    assert_eq!((hdr.flags, got), (0, bad));
    let other = super::tests::frame(7, 300);
    let (hdr, got) = receive(&mut h, &peer, &other);
    assert_eq!((hdr.flags, got), (0, other));
    let c = counters.snapshot();
    assert_eq!((c.rx_csum_verified, c.rx_csum_bad), (1, 1), "{c}");
}

#[test]
fn the_guest_switches_checksum_marking_through_the_control_queue() {
    let features = FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_CTRL_GUEST_OFFLOADS;
    let (mut h, peer, _) = device(features);
    let mut good = frame(Ip::V6, IPPROTO_UDP, false, &payload(100, 5));
    fill_l4_checksum(&mut good);
    let set = |bits: u64| {
        let mut cmd = vec![5u8, 0];
        cmd.extend_from_slice(&bits.to_le_bytes());
        cmd
    };
    let timeout = Duration::from_secs(5);
    assert_eq!(h.send_ctrl(2, &set(0), timeout), Some(0), "offloads off");
    assert_eq!(receive(&mut h, &peer, &good).0.flags, 0);
    // A frame left for the device is still completed: the guest could not
    // check it otherwise.
    let (_, got) = receive(&mut h, &peer, &partial(Ip::V4, IPPROTO_TCP));
    assert!(l4_checksum_ok(&got));
    assert_eq!(
        h.send_ctrl(2, &set(VIRTIO_NET_F_GUEST_CSUM), timeout),
        Some(0)
    );
    assert_eq!(
        receive(&mut h, &peer, &good).0.flags,
        VIRTIO_NET_HDR_F_DATA_VALID
    );
    // Offloads that were not negotiated, a short command: refused.
    assert_eq!(h.send_ctrl(2, &set(1 << 7), timeout), Some(1));
    assert_eq!(h.send_ctrl(2, &[5, 0, 1, 0], timeout), Some(1));
    assert_eq!(
        receive(&mut h, &peer, &good).0.flags,
        VIRTIO_NET_HDR_F_DATA_VALID
    );
}

#[test]
fn without_ctrl_guest_offloads_the_command_is_refused() {
    let (mut h, _peer, _) = device(FEATURES | VIRTIO_NET_F_GUEST_CSUM);
    let mut cmd = vec![5u8, 0];
    cmd.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(h.send_ctrl(2, &cmd, Duration::from_secs(5)), Some(1));
}
