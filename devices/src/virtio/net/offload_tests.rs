//! Offloads through the driver harness: what a guest that negotiated
//! checksum and segmentation offloads hands the device, and what reaches
//! the host side (and back).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::harness::DriverHarness;
use super::offload::csum;
use super::offload::headers::testing::{fill_l4_checksum, frame, l4_checksum_ok, leave_partial};
use super::offload::headers::{self, Ip, IPPROTO_TCP, IPPROTO_UDP};
use super::offload::{
    VirtioNetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use super::tests::{collect_used, config, recv_all, two_pairs_flooded, SocketBackend, FEATURES};
use super::*;

const TX_OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_USO;

fn device(features: u64) -> (DriverHarness, UnixDatagram, Arc<QueuePairCounters>) {
    device_on(features, SocketBackend::pair())
}

fn device_on(
    features: u64,
    (b, peer): (Box<dyn NetBackend>, UnixDatagram),
) -> (DriverHarness, UnixDatagram, Arc<QueuePairCounters>) {
    let net = Net::new(config("netoff", true), vec![b]).unwrap();
    let counters = net.counters()[0].clone();
    let mut h = DriverHarness::new(net);
    h.start(features, 3, 256);
    (h, peer, counters)
}

pub(super) fn payload(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + seed * 13) as u8).collect()
}

/// A GSO frame as Linux hands it over: NEEDS_CSUM, the transport checksum
/// field holding the pseudo-header sum (for length 0), `hdr_len` only a hint.
pub(super) fn gso_frame(
    ip: Ip,
    proto: u8,
    gso_type: u8,
    mss: u16,
    data: &[u8],
) -> ([u8; 12], Vec<u8>) {
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

/// Checks every wire frame and returns the payload they carry, in order.
pub(super) fn check_segments(segs: &[Vec<u8>], max_len: usize) -> Vec<u8> {
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
        let (mut hdr, mut f) = gso_frame(ip, proto, 0, 0, &payload(1001, 3));
        // Not GSO: the pseudo-header sum covers this frame's length.
        leave_partial(&mut f);
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

/// A host side that takes checksums (AF_XDP TX metadata): the device
/// leaves every NEEDS_CSUM frame's and every segment's checksum to it
/// (pseudo-header sum in the field, start and offset passed on), and
/// once the host side fills them the frames are exactly the ones the
/// software path sends; a request outside the frame is still refused.
#[test]
fn checksums_go_to_a_host_side_that_takes_them_and_come_out_the_same() {
    let (mut h, peer, counters) =
        device_on(FEATURES | TX_OFFLOADS, SocketBackend::pair_with_host_csum());
    let (mut sw, sw_peer, _) = device(FEATURES | TX_OFFLOADS);
    let mut frames = Vec::new();
    for (n, (ip, proto, gso_type, mss)) in [
        (Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4, 1448),
        (Ip::V6, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV6, 1428),
        (Ip::V4, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4, 1472),
    ]
    .into_iter()
    .enumerate()
    {
        frames.push(gso_frame(ip, proto, gso_type, mss, &payload(20_000, n)));
        let (mut hdr, mut f) = gso_frame(ip, proto, 0, 0, &payload(1001, n));
        leave_partial(&mut f);
        hdr[1] = 0;
        frames.push((hdr, f));
    }
    for (hdr, f) in &frames {
        assert!(h.queue_tx_frame_with_header(1, *hdr, f));
        assert!(sw.queue_tx_frame_with_header(1, *hdr, f));
        h.kick(1);
        sw.kick(1);
        assert_eq!(collect_used(&mut h, 1, 1).len(), 1);
        assert_eq!(collect_used(&mut sw, 1, 1).len(), 1);
        let got = recv_all(&peer);
        assert!(!got.is_empty());
        check_segments(&got, 1514);
        assert_eq!(got, recv_all(&sw_peer), "same wire frames either way");
    }
    let c = counters.snapshot();
    assert_eq!(c.tx_csum_filled, 0, "{c}");
    assert_eq!(c.tx_csum_offloaded, c.tx_packets, "{c}");
    // csum_offset beyond the frame: refused here, not handed on.
    let (mut hdr, f) = gso_frame(Ip::V4, IPPROTO_UDP, 0, 0, &payload(100, 9));
    hdr[1] = 0;
    hdr[8..10].copy_from_slice(&5000u16.to_le_bytes());
    assert!(h.queue_tx_frame_with_header(1, hdr, &f));
    h.kick(1);
    assert_eq!(collect_used(&mut h, 1, 1).len(), 1);
    assert!(recv_all(&peer).is_empty());
    assert_eq!(counters.snapshot().tx_offload_errors, 1);
}

/// Regression: a host side reads a checksum request's field only so far
/// into the frame (AF_XDP: the first descriptor, one UMEM frame; a field
/// beyond it failed the send and blocked the socket's transmit ring). The
/// device fills such a checksum itself and leaves the others to the host.
#[test]
fn a_checksum_field_beyond_the_host_sides_reach_is_filled_by_the_device() {
    let (mut h, peer, counters) = device_on(
        FEATURES | TX_OFFLOADS,
        SocketBackend::pair_with_host_csum_reach(100),
    );
    let (mut sw, sw_peer, _) = device(FEATURES | TX_OFFLOADS);
    let (mut hdr, mut f) = gso_frame(Ip::V4, IPPROTO_UDP, 0, 0, &payload(1001, 3));
    leave_partial(&mut f);
    hdr[1] = 0;
    let mut deep = hdr;
    // Summed from byte 200 on, the result at 206: ends past the reach.
    deep[6..8].copy_from_slice(&200u16.to_le_bytes());
    deep[8..10].copy_from_slice(&6u16.to_le_bytes());
    for header in [deep, hdr] {
        assert!(h.queue_tx_frame_with_header(1, header, &f));
        assert!(sw.queue_tx_frame_with_header(1, header, &f));
    }
    h.kick(1);
    sw.kick(1);
    assert_eq!(collect_used(&mut h, 1, 2).len(), 2);
    assert_eq!(collect_used(&mut sw, 1, 2).len(), 2);
    let got = recv_all(&peer);
    assert_eq!(got.len(), 2);
    assert_eq!(got, recv_all(&sw_peer), "same wire frames either way");
    assert_ne!(got[0][206..208], f[206..208], "the deep field was filled");
    let c = counters.snapshot();
    assert_eq!((c.tx_csum_filled, c.tx_csum_offloaded), (1, 1), "{c}");
    assert_eq!(c.tx_offload_errors, 0, "{c}");
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
    leave_partial(&mut f);
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

const GRO: u64 = VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_CTRL_GUEST_OFFLOADS;

/// In-order segments of one TCP flow, `mss` payload bytes each (the last
/// shorter), checksums filled or left partial as a local sender does.
fn flow(ip: Ip, port: u16, seq0: u32, data: &[u8], mss: usize, partial_csum: bool) -> Vec<Vec<u8>> {
    data.chunks(mss)
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = frame(ip, IPPROTO_TCP, false, chunk);
            let l = headers::parse(&f).unwrap();
            f[l.l4..l.l4 + 2].copy_from_slice(&port.to_be_bytes());
            let seq = seq0.wrapping_add((i * mss) as u32);
            f[l.l4 + 4..l.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            f[l.l4 + 13] = 0x10; // ACK
            if partial_csum {
                leave_partial(&mut f);
            } else {
                fill_l4_checksum(&mut f);
            }
            f
        })
        .collect()
}

/// A frame as the guest gets it: its virtio-net header and bytes,
/// gathered from `num_buffers` used buffers.
struct Received {
    hdr: VirtioNetHdr,
    frame: Vec<u8>,
}

/// Sends `frames` while the guest has no buffers (so that they wait and
/// arrive as one batch), then posts `buffers` of `size` bytes; returns
/// what the guest received once `expect` frames are there (or 5 s passed).
fn receive_batch(
    h: &mut DriverHarness,
    peer: &UnixDatagram,
    frames: &[Vec<u8>],
    (buffers, size): (usize, u32),
    expect: usize,
) -> Vec<Received> {
    for f in frames {
        peer.send(f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.post_rx_buffers_sized(0, buffers, size), buffers);
    h.kick(0);
    let mut used = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while out.len() < expect && std::time::Instant::now() < deadline {
        h.take_used(0, &mut used);
        h.wait_interrupt(Duration::from_millis(20));
        h.ack_interrupt();
        out.extend(assemble(h, &mut used));
    }
    out
}

/// Complete frames from the front of `used` (each `num_buffers` entries).
fn assemble(h: &DriverHarness, used: &mut Vec<(u16, u32)>) -> Vec<Received> {
    let mut out = Vec::new();
    while let Some(&(id, len)) = used.first() {
        let first = h.rx_buffer(0, id, len);
        let hdr = VirtioNetHdr::from_bytes(first[..12].try_into().unwrap());
        let n = usize::from(hdr.num_buffers);
        assert!(n >= 1, "num_buffers 0");
        if used.len() < n {
            break;
        }
        let mut frame = first[12..].to_vec();
        for &(id, len) in &used[1..n] {
            frame.extend_from_slice(&h.rx_buffer(0, id, len));
        }
        used.drain(..n);
        out.push(Received { hdr, frame });
    }
    out
}

/// Undoes GRO: the payload of a received frame, after checking its
/// headers (and completing a partial checksum, as the guest's stack may).
fn payload_of(r: &Received) -> Vec<u8> {
    let mut f = r.frame.clone();
    let l = headers::parse(&f).expect("TCP");
    if l.ip == Ip::V4 {
        assert_eq!(
            csum::fold(csum::add(0, &f[l.l3..l.l4])),
            0xffff,
            "IPv4 header checksum"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([f[l.l3 + 2], f[l.l3 + 3]])),
            f.len() - l.l3
        );
    } else {
        assert_eq!(
            usize::from(u16::from_be_bytes([f[l.l3 + 4], f[l.l3 + 5]])),
            f.len() - l.l3 - 40
        );
    }
    if r.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        assert_eq!(usize::from(r.hdr.csum_start), l.l4);
        assert_eq!(r.hdr.csum_offset, 16);
        super::offload::gso::fill_partial_csum(&mut f, l.l4, 16).unwrap();
    } else {
        assert_eq!(r.hdr.flags, VIRTIO_NET_HDR_F_DATA_VALID);
    }
    assert!(l4_checksum_ok(&f), "TCP checksum");
    f[l.end..].to_vec()
}

#[test]
fn in_order_tcp_segments_of_one_batch_reach_the_guest_as_one_gso_frame() {
    // Segments as long as MTU 1500 allows (TCP with 12 bytes of options).
    for (ip, gso_type, mss) in [
        (Ip::V4, VIRTIO_NET_HDR_GSO_TCPV4, 1448),
        (Ip::V6, VIRTIO_NET_HDR_GSO_TCPV6, 1428),
    ] {
        for partial_csum in [false, true] {
            let (mut h, peer, counters) = device(FEATURES | GRO);
            let data = payload(20 * mss + 500, 3);
            let frames = flow(ip, 40000, 7, &data, mss, partial_csum);
            let got = receive_batch(&mut h, &peer, &frames, (64, 2048), 1);
            assert_eq!(got.len(), 1, "{ip:?}: one merged frame");
            let r = &got[0];
            assert_eq!(r.hdr.gso_type, gso_type);
            assert_eq!(usize::from(r.hdr.gso_size), mss);
            assert_eq!(
                usize::from(r.hdr.hdr_len),
                headers::parse(&r.frame).unwrap().end
            );
            assert!(r.hdr.num_buffers > 1);
            assert_eq!(payload_of(r), data);
            let c = counters.snapshot();
            assert_eq!(
                (c.rx_gro_frames, c.rx_gro_segments, c.rx_packets),
                (1, 21, 21),
                "{c}"
            );
        }
    }
}

/// A host stack's whole GSO packet (generic XDP hands those to AF_XDP in
/// skb mode): longer than the MTU, it reaches a guest that takes GSO
/// frames as one frame cut at the MTU's segment size; a guest that does
/// not gets it cut into wire frames (below), and the frame after it still
/// arrives.
#[test]
fn a_tcp_packet_longer_than_the_mtu_reaches_the_guest_only_as_a_gso_frame() {
    for (ip, gso_type, l3_l4) in [
        (Ip::V4, VIRTIO_NET_HDR_GSO_TCPV4, 20 + 32),
        (Ip::V6, VIRTIO_NET_HDR_GSO_TCPV6, 40 + 32),
    ] {
        for partial_csum in [false, true] {
            let (mut h, peer, counters) = device(FEATURES | GRO);
            let data = payload(20_000, 5);
            let big = flow(ip, 40000, 7, &data, data.len(), partial_csum).remove(0);
            let got = receive_batch(&mut h, &peer, &[big], (64, 2048), 1);
            assert_eq!(got.len(), 1, "{ip:?}");
            let r = &got[0];
            assert_eq!(r.hdr.gso_type, gso_type);
            assert_eq!(usize::from(r.hdr.gso_size), 1500 - l3_l4, "MTU 1500");
            assert_eq!(payload_of(r), data);
            assert_eq!(counters.snapshot().rx_dropped_too_big, 0);
        }
    }
    // The stream's last bytes with FIN: still one GSO frame, FIN kept.
    let (mut h, peer, _) = device(FEATURES | GRO);
    let data = payload(9_000, 8);
    let mut big = flow(Ip::V4, 40000, 7, &data, data.len(), false).remove(0);
    let l = headers::parse(&big).unwrap();
    big[l.l4 + 13] |= 0x01;
    fill_l4_checksum(&mut big);
    let got = receive_batch(&mut h, &peer, &[big], (64, 2048), 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(got[0].frame[l.l4 + 13] & 0x01, 0x01, "FIN kept");
    assert_eq!(payload_of(&got[0]), data);
}

/// The same packet for a guest that takes no GSO frames (a router or an
/// XDP guest turns them off; Linux without GUEST_TSO): cut here into wire
/// frames at the MTU, as the kernel's software GSO would, each with its own
/// checksum, in order; a packet whose checksum fails is still dropped.
#[test]
fn a_tcp_packet_longer_than_the_mtu_is_cut_for_a_guest_without_gso() {
    for (ip, l3_l4) in [(Ip::V4, 20 + 32), (Ip::V6, 40 + 32)] {
        for partial_csum in [false, true] {
            for features in [
                FEATURES | VIRTIO_NET_F_MRG_RXBUF,
                FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_MRG_RXBUF,
                FEATURES,
            ] {
                let (mut h, peer, counters) = device(features);
                let data = payload(20_000, 6);
                let mut big = flow(ip, 40000, 7, &data, data.len(), partial_csum).remove(0);
                let l = headers::parse(&big).unwrap();
                big[l.l4 + 13] |= 0x08 | 0x01; // PSH, FIN: on the last only
                if partial_csum {
                    leave_partial(&mut big);
                } else {
                    fill_l4_checksum(&mut big);
                }
                let small = flow(ip, 40001, 9, &payload(500, 1), 500, false).remove(0);
                let mss = 1500 - l3_l4;
                let n = data.len().div_ceil(mss);
                let got = receive_batch(&mut h, &peer, &[big, small.clone()], (64, 2048), n + 1);
                assert_eq!(got.len(), n + 1, "{ip:?} {features:#x}");
                let mut joined = Vec::new();
                for (i, r) in got[..n].iter().enumerate() {
                    assert_eq!(r.hdr.gso_type, 0, "no GSO frame for this guest");
                    assert!(r.frame.len() <= 1514, "{} bytes", r.frame.len());
                    assert!(l4_checksum_ok(&r.frame), "segment {i}'s checksum");
                    let seq = u32::from_be_bytes(r.frame[l.l4 + 4..l.l4 + 8].try_into().unwrap());
                    assert_eq!(seq, 7 + (i * mss) as u32);
                    let flags = r.frame[l.l4 + 13];
                    let last = i + 1 == n;
                    assert_eq!(flags & 0x09 != 0, last, "PSH/FIN on segment {i}");
                    let valid = features & VIRTIO_NET_F_GUEST_CSUM != 0;
                    assert_eq!(
                        r.hdr.flags,
                        if valid {
                            VIRTIO_NET_HDR_F_DATA_VALID
                        } else {
                            0
                        }
                    );
                    joined.extend_from_slice(&r.frame[l.end..]);
                }
                assert_eq!(joined, data);
                assert_eq!(got[n].frame, small);
                let c = counters.snapshot();
                assert_eq!(c.rx_dropped_too_big, 0, "{c}");
                assert_eq!(
                    (c.rx_gso_split, c.rx_gso_split_segments),
                    (1, n as u64),
                    "{c}"
                );
                assert_eq!(c.rx_packets, n as u64 + 1, "{c}");
            }
        }
    }
    // A packet whose checksum fails (not a sender's partial one) is not
    // made valid by cutting: dropped and counted, as before.
    let (mut h, peer, counters) = device(FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    let mut big = flow(Ip::V4, 40000, 7, &payload(9_000, 3), 9_000, false).remove(0);
    let last = big.len() - 1;
    big[last] ^= 0xff;
    let small = flow(Ip::V4, 40001, 9, &payload(500, 1), 500, false).remove(0);
    let got = receive_batch(&mut h, &peer, &[big, small.clone()], (64, 2048), 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, small);
    assert_eq!(counters.snapshot().rx_dropped_too_big, 1);
}

/// A driver that keeps a small, fixed pool of receive buffers posted (iPXE
/// keeps 8, Zephyr 4; the spec asks no driver to fill its ring) and takes
/// no GSO frames: a packet cut into more wire frames than the pool holds
/// goes out as far as the buffers reach, the rest dropped and counted, and
/// the frames behind it still arrive (waiting for buffers that never come
/// would stall the queue for good).
#[test]
fn a_packet_cut_into_more_frames_than_a_small_pool_holds_does_not_stall_receive() {
    let (mut h, peer, counters) = device(FEATURES);
    let data = payload(20_000, 2);
    let big = flow(Ip::V4, 40000, 7, &data, data.len(), false).remove(0);
    let small = flow(Ip::V4, 40001, 9, &payload(500, 1), 500, false).remove(0);
    peer.send(&big).unwrap();
    peer.send(&small).unwrap();
    // The driver: 8 buffers, each posted again as soon as it comes back.
    assert_eq!(h.post_rx_buffers_sized(0, 8, 2048), 8);
    h.kick(0);
    let mut used = Vec::new();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !got.contains(&small) && std::time::Instant::now() < deadline {
        h.take_used(0, &mut used);
        for r in assemble(&h, &mut used) {
            got.push(r.frame);
            h.post_rx_buffers_sized(0, 1, 2048);
        }
        h.kick_if_needed(0);
        h.wait_interrupt(Duration::from_millis(20));
        h.ack_interrupt();
    }
    let c = counters.snapshot();
    assert!(
        got.contains(&small),
        "receive stalled behind the packet: {c}"
    );
    let n = data.len().div_ceil(1500 - 52) as u64;
    assert_eq!(
        got.len() as u64,
        8 + 1,
        "as many wire frames as buffers, then the next frame"
    );
    assert_eq!(
        (c.rx_gso_split_segments, c.rx_gso_split_dropped),
        (n, n - 8),
        "{c}"
    );
    // The first 8 in order, as cut.
    let l = headers::parse(&got[0]).unwrap();
    let joined: Vec<u8> = got[..8].iter().flat_map(|f| f[l.end..].to_vec()).collect();
    assert_eq!(joined, data[..joined.len()]);
}

/// A GSO packet whose flags keep it from being handed on whole (CWR: the
/// guest's GRO would not merge over it either) is cut too; a guest that
/// takes GSO frames gets the CWR segment alone, the rest merged again.
#[test]
fn a_long_tcp_packet_with_cwr_reaches_a_gso_guest_whole() {
    let (mut h, peer, counters) = device(FEATURES | GRO);
    let data = payload(20_000, 4);
    let mut big = flow(Ip::V4, 40000, 7, &data, data.len(), true).remove(0);
    let l = headers::parse(&big).unwrap();
    big[l.l4 + 13] |= 0x80; // CWR
    leave_partial(&mut big);
    let got = receive_batch(&mut h, &peer, &[big], (64, 2048), 2);
    assert_eq!(got.len(), 2, "{}", counters.snapshot());
    assert_eq!(got[0].frame[l.l4 + 13] & 0x80, 0x80, "CWR on the first");
    assert_eq!(got[1].frame[l.l4 + 13] & 0x80, 0, "and only there");
    assert_eq!(got[1].hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
    let mut joined = payload_of(&got[0]);
    joined.extend_from_slice(&payload_of(&got[1]));
    assert_eq!(joined, data);
    assert_eq!(counters.snapshot().rx_dropped_too_big, 0);
}

#[test]
fn segments_out_of_order_of_other_flows_or_pushed_end_the_merged_frame() {
    let (mut h, peer, counters) = device(FEATURES | GRO);
    let a = payload(6 * 1000, 1);
    let b = payload(4 * 1000, 2);
    let fa = flow(Ip::V4, 40000, 100, &a, 1000, false);
    let fb = flow(Ip::V4, 40001, 900, &b, 1000, false);
    let mut pushed = fa[2].clone();
    let l = headers::parse(&pushed).unwrap();
    pushed[l.l4 + 13] |= 0x08; // PSH ends the merged frame after it
    fill_l4_checksum(&mut pushed);
    // a0 a1 a2(PSH) a3 a4 | b0 b1 | a5 | b3 (b2 missing: out of order) | a UDP frame
    let mut udp = frame(Ip::V4, IPPROTO_UDP, false, b"not tcp");
    fill_l4_checksum(&mut udp);
    let frames = vec![
        fa[0].clone(),
        fa[1].clone(),
        pushed,
        fa[3].clone(),
        fa[4].clone(),
        fb[0].clone(),
        fb[1].clone(),
        fa[5].clone(),
        fb[3].clone(),
        udp.clone(),
    ];
    let got = receive_batch(&mut h, &peer, &frames, (64, 2048), 6);
    let sizes: Vec<usize> = got.iter().map(|r| r.frame.len()).collect();
    assert_eq!(got.len(), 6, "frames as the guest got them: {sizes:?}");
    assert_eq!(payload_of(&got[0]), a[..3000]);
    assert_eq!(payload_of(&got[1]), a[3000..5000]);
    assert_eq!(payload_of(&got[2]), b[..2000]);
    assert_eq!(payload_of(&got[3]), a[5000..]);
    assert_eq!(payload_of(&got[4]), b[3000..]);
    assert_eq!(got[5].frame, udp);
    let c = counters.snapshot();
    assert_eq!((c.rx_gro_frames, c.rx_gro_segments), (3, 7), "{c}");
}

#[test]
fn frames_spread_over_small_mergeable_buffers_arrive_whole() {
    let (mut h, peer, _) = device(FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    let frames: Vec<Vec<u8>> = (0..10u32).map(|i| super::tests::frame(i, 1514)).collect();
    let got = receive_batch(&mut h, &peer, &frames, (60, 512), 10);
    assert_eq!(got.len(), 10);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.hdr.num_buffers, 3, "1526 bytes in 512-byte buffers");
        assert_eq!(r.frame, frames[i], "frame {i}");
    }
}

#[test]
fn without_mergeable_buffers_a_merged_frame_stays_within_one_chain() {
    let features = FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4;
    let (mut h, peer, counters) = device(features);
    let data = payload(10 * 500, 4);
    let frames = flow(Ip::V4, 40000, 1, &data, 500, false);
    let got = receive_batch(&mut h, &peer, &frames, (32, 2048), 4);
    // 2048 - 12 - 66 bytes of room: three 500-byte segments per chain.
    let mut joined = Vec::new();
    for r in &got {
        assert_eq!(r.hdr.num_buffers, 1);
        assert!(r.frame.len() + 12 <= 2048);
        joined.extend_from_slice(&payload_of(r));
    }
    assert_eq!(joined, data);
    assert_eq!(got.len(), 4, "3 + 3 + 3 + 1 segments");
    // The lone last segment is delivered as it came.
    assert_eq!(counters.snapshot().rx_gro_segments, 9);
}

#[test]
fn coalescing_stops_when_the_guest_turns_it_off() {
    let (mut h, peer, counters) = device(FEATURES | GRO);
    let mut cmd = vec![5u8, 0];
    cmd.extend_from_slice(&VIRTIO_NET_F_GUEST_CSUM.to_le_bytes());
    assert_eq!(h.send_ctrl(2, &cmd, Duration::from_secs(5)), Some(0));
    let data = payload(5 * 1448, 5);
    let frames = flow(Ip::V4, 40000, 1, &data, 1448, true);
    let got = receive_batch(&mut h, &peer, &frames, (32, 2048), 5);
    assert_eq!(got.len(), 5);
    for (r, f) in got.iter().zip(&frames) {
        assert_eq!(r.hdr.gso_type, 0);
        assert_eq!(r.hdr.flags, VIRTIO_NET_HDR_F_DATA_VALID);
        assert!(l4_checksum_ok(&r.frame), "completed, not merged");
        assert_eq!(r.frame.len(), f.len());
    }
    assert_eq!(counters.snapshot().rx_gro_frames, 0);
}

#[test]
fn a_merged_frame_waits_for_buffers_and_loses_nothing() {
    // Fewer buffers than the batch needs: the rest of the flow waits for
    // the guest's next buffers, and every byte arrives once, in order.
    let (mut h, peer, _) = device(FEATURES | GRO);
    let data = payload(40 * 1448, 6);
    for f in flow(Ip::V4, 40000, 1, &data, 1448, false) {
        peer.send(&f).unwrap();
    }
    let mut used = Vec::new();
    let mut joined = Vec::new();
    let mut frames = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while joined.len() < data.len() && std::time::Instant::now() < deadline {
        if h.post_rx_buffers_sized(0, 8, 2048) > 0 {
            h.kick(0);
        }
        h.wait_interrupt(Duration::from_millis(50));
        h.ack_interrupt();
        h.take_used(0, &mut used);
        for r in assemble(&h, &mut used) {
            joined.extend(payload_of(&r));
            frames += 1;
        }
    }
    assert_eq!(joined.len(), data.len());
    assert_eq!(joined, data);
    assert!(frames >= 4, "8 buffers of 2 KiB per merged frame: {frames}");
}

/// A small deterministic generator: the tests need no rand crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random traffic (three TCP flows over IPv4 and IPv6 with full-size and
/// short segments, gaps, repeats, PSH, valid and partial checksums, and
/// frames that are not TCP) into buffers of random sizes, mergeable or
/// not: whatever the device merges, each flow's bytes reach the guest
/// exactly as sent, in order, in frames whose headers and checksums hold,
/// and everything else arrives unchanged and in order.
#[test]
fn coalescing_keeps_every_flows_bytes_in_order_whatever_arrives() {
    let mut merged = 0;
    for round in 0..200u64 {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((round + 1) * 0x1234_5678));
        let mergeable = round % 3 != 2;
        let mut features =
            FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6;
        if mergeable {
            features |= VIRTIO_NET_F_MRG_RXBUF;
        }
        let (mut h, peer, counters) = device(features);
        let ips = [Ip::V4, Ip::V6, Ip::V4];
        let mut next_seq = [1000u32, 5_000_000, u32::MAX - 20_000];
        let mut sent: Vec<Vec<u8>> = vec![Vec::new(); 3];
        let mut others = Vec::new();
        let frames = 60 + rng.below(120) as usize;
        let mut wire = Vec::with_capacity(frames);
        for i in 0..frames {
            if rng.below(12) == 0 {
                let other = super::tests::frame(i as u32, 60 + rng.below(1400) as usize);
                wire.push(other.clone());
                others.push(other);
                continue;
            }
            let f = rng.below(3) as usize;
            let len = if rng.below(4) == 0 {
                1 + rng.below(1447) as usize
            } else {
                1448 - if ips[f] == Ip::V6 { 20 } else { 0 }
            };
            let seq = match rng.below(16) {
                0 => next_seq[f].wrapping_add(1000),       // a gap
                1 => next_seq[f].wrapping_sub(len as u32), // a repeat
                _ => next_seq[f],
            };
            next_seq[f] = seq.wrapping_add(len as u32);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut seg = flow(
                ips[f],
                40000 + f as u16,
                seq,
                &data,
                1448,
                rng.below(2) == 0,
            )
            .remove(0);
            if rng.below(10) == 0 {
                let l = headers::parse(&seg).unwrap();
                seg[l.l4 + 13] |= 0x08; // PSH
                fill_l4_checksum(&mut seg);
            }
            wire.push(seg);
            sent[f].extend_from_slice(&data);
        }
        let total: usize = sent.iter().map(Vec::len).sum();
        let mut got: Vec<Vec<u8>> = vec![Vec::new(); 3];
        let mut got_others = Vec::new();
        let mut used = Vec::new();
        let mut to_send = wire.iter().peekable();
        peer.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while (got.iter().map(Vec::len).sum::<usize>() < total || got_others.len() < others.len())
            && std::time::Instant::now() < deadline
        {
            // As much as the device's socket takes, then the guest's turn.
            while let Some(f) = to_send.peek() {
                if peer.send(f).is_err() {
                    break;
                }
                to_send.next();
            }
            let size = [512u32, 1024, 1600, 2048][rng.below(4) as usize];
            let size = if mergeable { size } else { 2048 };
            if h.post_rx_buffers_sized(0, 1 + rng.below(16) as usize, size) > 0 {
                h.kick(0);
            }
            h.wait_interrupt(Duration::from_millis(2));
            h.ack_interrupt();
            h.take_used(0, &mut used);
            for r in assemble(&h, &mut used) {
                match headers::parse(&r.frame).filter(|l| l.proto == IPPROTO_TCP) {
                    Some(l) => {
                        let port = u16::from_be_bytes([r.frame[l.l4], r.frame[l.l4 + 1]]);
                        got[usize::from(port - 40000)].extend(payload_of(&r));
                    }
                    None => got_others.push(r.frame),
                }
            }
        }
        for f in 0..3 {
            assert!(
                got[f] == sent[f],
                "round {round}: flow {f}: {} of {} bytes, or out of order",
                got[f].len(),
                sent[f].len()
            );
        }
        assert_eq!(got_others, others, "round {round}");
        let c = counters.snapshot();
        assert_eq!(
            c.rx_dropped_too_big + c.rx_bad_descriptors,
            0,
            "round {round}: {c}"
        );
        merged += c.rx_gro_frames;
    }
    assert!(
        merged > 200,
        "the rounds merged {merged} frames: coalescing went untested"
    );
}

/// A frame dropped for being too big is not a received packet.
#[test]
fn a_frame_dropped_as_too_big_is_not_counted_received() {
    let (mut h, peer, counters) = device(FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    let big = super::tests::frame(1, 3000);
    let small = super::tests::frame(2, 100);
    let got = receive_batch(&mut h, &peer, &[big, small], (8, 2048), 1);
    assert_eq!(got.len(), 1);
    let c = counters.snapshot();
    assert_eq!(c.rx_dropped_too_big, 1, "{c}");
    assert_eq!((c.rx_packets, c.rx_bytes), (1, 100), "{c}");
    assert_eq!(c.rx_batch_frames, 1, "{c}");
}

/// Coalescing stops at a FIN, as GRO does: what follows a FIN is never
/// folded into the frame that carries it.
#[test]
fn coalescing_does_not_merge_past_a_fin() {
    let (mut h, peer, counters) = device(FEATURES | GRO);
    let data = payload(2000, 3);
    let mut frames = flow(Ip::V4, 40000, 7, &data, 1000, false);
    for f in &mut frames {
        let l = headers::parse(f).unwrap();
        f[l.l4 + 13] |= 0x01; // FIN
        fill_l4_checksum(f);
    }
    let got = receive_batch(&mut h, &peer, &frames, (64, 2048), 2);
    assert_eq!(got.len(), 2, "merged past a FIN");
    assert_eq!(counters.snapshot().rx_gro_segments, 0);
}

/// A segment whose IPv4 header checksum fails is not merged (the merged
/// frame's header gets a fresh checksum, which would hide the damage): it
/// reaches the guest as it came, for the guest to drop.
#[test]
fn a_segment_with_a_bad_ipv4_header_checksum_is_not_merged() {
    let (mut h, peer, _counters) = device(FEATURES | GRO);
    let data = payload(3000, 3);
    let mut frames = flow(Ip::V4, 40000, 7, &data, 1000, false);
    let l = headers::parse(&frames[0]).unwrap();
    // The IPv4 ID, which the TCP checksum does not cover.
    frames[0][l.l3 + 4] ^= 0x40;
    let bad = frames[0].clone();
    let got = receive_batch(&mut h, &peer, &frames, (64, 2048), 2);
    assert_eq!(got[0].frame, bad, "the damaged segment as it came");
    assert_eq!(got[0].hdr.gso_type, 0);
    assert_eq!(
        got[1].hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4,
        "the rest merged"
    );
}

/// The guest turns its receive offloads off (VIRTIO_NET_CTRL_GUEST_OFFLOADS,
/// as XDP in a Linux guest does): once the command is answered no pair
/// hands over a GSO frame or a checksum mark. Pair 1's IO thread, busy
/// coalescing a flood when the command is answered on pair 0's, went on
/// with the offloads it read at the start of its pass.
#[test]
fn no_gso_frame_reaches_the_guest_after_it_turned_its_offloads_off() {
    let data = payload(1448 * 2000, 3);
    let segments = flow(Ip::V4, 40000, 7, &data, 1448, false);
    let (mut h, flood) = two_pairs_flooded(
        |b| Net::new(config("offoff", true), b).unwrap(),
        FEATURES | GRO,
        segments,
    );
    // Frames (and those with offloads) among used entries `from..to`;
    // frames are published whole, each num_buffers entries long.
    let frames_between = |h: &DriverHarness, from: u16, to: u16| -> (usize, usize) {
        let (mut k, mut frames, mut offloaded) = (from, 0, 0);
        while k != to {
            let (id, _) = h.used_entry(2, k);
            let hdr = VirtioNetHdr::from_bytes(&h.rx_header(2, id));
            frames += 1;
            if hdr.gso_type != 0 || hdr.flags != 0 {
                offloaded += 1;
            }
            k = k.wrapping_add(hdr.num_buffers.max(1));
        }
        (frames, offloaded)
    };
    let command = |bits: u64| -> Vec<u8> {
        let mut c = vec![5u8, 0];
        c.extend_from_slice(&bits.to_le_bytes());
        c
    };
    let on = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6;
    let mut late = Vec::new();
    let mut coalesced_before = 0;
    for _ in 0..5 {
        assert_eq!(
            h.send_ctrl(4, &command(on), Duration::from_secs(5)),
            Some(0)
        );
        let mut used = Vec::new();
        h.take_used(2, &mut used);
        let start = h.used_idx(2);
        h.post_rx_buffers(2, 256);
        h.kick(2);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(h.send_ctrl(4, &command(0), Duration::from_secs(5)), Some(0));
        let at_answer = h.used_idx(2);
        std::thread::sleep(Duration::from_millis(100));
        let end = h.used_idx(2);
        coalesced_before += frames_between(&h, start, at_answer).1;
        late.push(frames_between(&h, at_answer, end).1);
    }
    drop(flood);
    assert!(
        late.iter().all(|&n| n == 0),
        "frames with offloads after the guest turned them off, per round: {late:?}"
    );
    assert!(
        coalesced_before > 0,
        "nothing was coalesced: the test proves nothing"
    );
}
