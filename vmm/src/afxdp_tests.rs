//! The virtio-net device on a real AF_XDP socket with `umem=guest`: the
//! driver harness plays the guest on guest memory registered as the
//! socket's UMEM, a veth pair in a namespace of its own carries the frames
//! (root needed), a packet socket on the peer end sees them.

use std::time::{Duration, Instant};

use devices::virtio::net::harness::{DriverHarness, MEM_SIZE};
use devices::virtio::net::{
    Net, NetBackend, NetConfig, NetLink, QueuePairCounters, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
};
use devices::virtio::VIRTIO_F_VERSION_1;
use net_afxdp::testbed::{fold, ones_sum, PacketSocket, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, NicOwner};
use vm_memory::{Bytes, GuestAddress};

use super::XskBackend;
use crate::vm::create_guest_memory;

const QUEUE_SIZE: u16 = 256;
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;

struct GatherSetup {
    pair: VethPair,
    harness: DriverHarness,
    counters: std::sync::Arc<QueuePairCounters>,
    link: NetLink,
    peer: PacketSocket,
    mac: [u8; 6],
    peer_mac: [u8; 6],
    _owner: NicOwner,
}

/// The device with `umem=guest` on end `a` of a fresh veth pair, guest
/// memory being the harness's; checksums and TSO offered. With transmit
/// checksumming off on `a` the kernel completes checksums asked for
/// through TX metadata itself, so the peer sees them whole.
fn gather_setup() -> GatherSetup {
    gather_setup_mtu(1500)
}

/// [`gather_setup`] with both ends of the pair and the device at `mtu`.
fn gather_setup_mtu(mtu: u16) -> GatherSetup {
    let pair = VethPair::for_test(1);
    pair.transmit_checksumming_off(&pair.a)
        .expect("transmit checksumming off");
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", &mtu.to_string()])
            .expect("set the MTU");
    }
    let config: AfXdpConfig = format!("ifname={},mode=native,umem=guest", pair.a)
        .parse()
        .expect("config");
    let (mem, mapping) =
        create_guest_memory(MEM_SIZE as u64, None, config.queue_umem_bytes()).expect("memory");
    let region = mapping.expect("one mapping").region(0).expect("region");
    let nic = pair
        .run(|| AfXdpNic::open_on(&config, Some(region)))
        .expect("enter netns")
        .expect("open the NIC with umem=guest");
    let (owner, mut queues) = nic.into_parts();
    let backend = XskBackend::new(queues.remove(0), Some(region));
    assert!(
        backend.tx_gather_piece_max().is_some(),
        "umem=guest: the backend sends from guest memory"
    );
    assert!(
        backend.tx_checksum_offload(),
        "needs AF_XDP TX metadata (Linux 6.8+)"
    );
    let (mac, peer_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let net = Net::new(
        NetConfig {
            id: "gather".into(),
            mac,
            mtu,
            spoof_check: true,
            on_thread_start: None,
        },
        vec![Box::new(backend)],
    )
    .expect("device");
    let counters = net.counters()[0].clone();
    let link = net.link();
    let mut harness = DriverHarness::with_memory(net, mem);
    harness.start(
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4,
        2,
        QUEUE_SIZE,
    );
    let peer = pair
        .run(|| PacketSocket::open(&pair.b))
        .expect("enter netns")
        .expect("packet socket");
    GatherSetup {
        pair,
        harness,
        counters,
        link,
        peer,
        mac,
        peer_mac,
        _owner: owner,
    }
}

/// The IPv4 pseudo-header sum of an Ethernet/IPv4 frame's transport part.
fn pseudo_v4(frame: &[u8]) -> u64 {
    let l4_len = frame.len() - 34;
    ones_sum(0, &frame[26..34]) + u64::from(frame[23]) + l4_len as u64
}

/// Whether an Ethernet/IPv4 frame's header and transport checksums verify.
fn checksums_ok(frame: &[u8]) -> bool {
    fold(ones_sum(0, &frame[14..34])) == 0xffff
        && fold(ones_sum(pseudo_v4(frame), &frame[34..])) == 0xffff
}

/// An Ethernet/IPv4 frame (no options) of protocol `proto` with transport
/// part `l4`, the IP header checksum filled.
fn ipv4_frame(dst: [u8; 6], src: [u8; 6], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[
        0x12, 0x34, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ]);
    let c = !fold(ones_sum(0, &f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(l4);
    f
}

/// A virtio-net header asking the device to finish the checksum from byte
/// 34 (the transport header) at `csum_offset`, with GSO if `gso_size` > 0.
fn hdr(csum_offset: u16, gso_size: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = NEEDS_CSUM;
    if gso_size > 0 {
        h[1] = GSO_TCPV4;
        h[2..4].copy_from_slice(&66u16.to_le_bytes());
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    }
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

/// Stores the pseudo-header sum in the transport checksum field at
/// `34 + csum_offset`, as a guest leaving the checksum to the device does.
fn leave_partial(frame: &mut [u8], csum_offset: usize) {
    let at = 34 + csum_offset;
    let partial = fold(pseudo_v4(frame));
    frame[at..at + 2].copy_from_slice(&partial.to_be_bytes());
}

/// An Ethernet/IPv4/TCP frame (timestamps option, PSH) carrying `data`,
/// its checksum left partial, as a guest hands a TSO frame over.
fn tcp_frame(dst: [u8; 6], src: [u8; 6], data: &[u8]) -> Vec<u8> {
    let mut tcp = vec![
        0x9c, 0x42, 0x14, 0x51, 0, 0, 0x10, 0, 0, 0, 0, 1, 0x80, 0x18, 1, 0xf5,
    ];
    tcp.extend_from_slice(&[0, 0, 0, 0, 1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8]);
    tcp.extend_from_slice(data);
    let mut f = ipv4_frame(dst, src, 6, &tcp);
    leave_partial(&mut f, 16);
    f
}

/// Frames from `src` the peer receives until `count` came or 2 s passed.
fn frames_from(peer: &PacketSocket, src: [u8; 6], count: usize) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv(&mut buf, left).expect("recv") {
            Some(n) if buf[6..12] == src && buf[12..14] == [0x08, 0x00] => {
                got.push(buf[..n].to_vec())
            }
            Some(_) => continue,
            None => break,
        }
    }
    got
}

/// Used TX entries until `count` came or 2 s passed.
fn used_tx(h: &mut DriverHarness, count: usize) -> Vec<(u16, u32)> {
    let mut used = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while used.len() < count && Instant::now() < deadline {
        h.take_used(1, &mut used);
        std::thread::sleep(Duration::from_millis(1));
    }
    used
}

/// A plain UDP frame, a short one and a 20 KB TCP TSO frame from the
/// driver: the first and the TSO frame's segments go out from guest
/// memory (their headers and checksum requests in the socket's own
/// frames), the short one copied; the peer gets them byte for byte with
/// checksums the kernel completed, and every chain comes back to the used
/// ring once the kernel is done with it.
#[test]
fn umem_guest_transmit_sends_from_guest_memory() {
    let mut s = gather_setup();
    let (mac, peer) = (s.mac, s.peer_mac);

    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut udp = vec![0x9c, 0x40, 0x13, 0x88];
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&payload);
    let mut plain = ipv4_frame(peer, mac, 17, &udp);
    leave_partial(&mut plain, 6);

    let short = ipv4_frame(
        peer,
        mac,
        17,
        &[0x9c, 0x41, 0x13, 0x88, 0, 12, 0, 0, 1, 2, 3, 4],
    );

    let mss = 1448usize;
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 13 + 1) as u8).collect();
    let tso = tcp_frame(peer, mac, &data);

    let h = &mut s.harness;
    assert!(h.queue_tx_frame_with_header(1, hdr(6, 0), &plain));
    assert!(h.queue_tx_frame(1, &short));
    assert!(h.queue_tx_frame_with_header(1, hdr(16, mss as u16), &tso));
    h.kick(1);

    let segments = data.len().div_ceil(mss);
    let got = frames_from(&s.peer, mac, 2 + segments);
    assert_eq!(got.len(), 2 + segments, "frames at the peer");
    let mut want_plain = plain.clone();
    want_plain[40..42].fill(0);
    let mut got_plain = got[0].clone();
    assert!(
        checksums_ok(&got_plain),
        "UDP checksum completed by the kernel"
    );
    got_plain[40..42].fill(0);
    assert_eq!(got_plain, want_plain, "the plain frame, byte for byte");
    assert_eq!(got[1], short, "the short frame");
    let mut joined = Vec::new();
    for (i, seg) in got[2..].iter().enumerate() {
        assert!(checksums_ok(seg), "segment {i}: checksums");
        assert_eq!(seg[..14], tso[..14], "segment {i}: link header");
        let seq = u32::from_be_bytes(seg[38..42].try_into().unwrap());
        assert_eq!(
            seq,
            0x1000 + (i * mss) as u32,
            "segment {i}: sequence number"
        );
        let psh = seg[47] & 0x08 != 0;
        assert_eq!(psh, i + 1 == segments, "segment {i}: PSH only on the last");
        joined.extend_from_slice(&seg[66..]);
    }
    assert_eq!(joined, data, "the TSO payload, in order");

    let used = used_tx(&mut s.harness, 3);
    assert_eq!(used.len(), 3, "every chain back in the used ring: {used:?}");
    let c = s.counters.snapshot();
    assert_eq!(
        c.tx_gathered_frames,
        1 + segments as u64,
        "sent from guest memory: the plain frame and every segment ({c})"
    );
    assert_eq!(
        (c.tx_packets, c.tx_dropped),
        (2 + segments as u64, 0),
        "{c}"
    );
    assert_eq!(c.tx_gather_abandoned, 0);
    drop(s.pair);
}

/// A frame whose bytes lie in 16 guest buffers after its link header: with
/// the head the device writes that would be 17 descriptors, one more than
/// a frame may have, which the socket refuses (and the frame is lost); the
/// backend must refuse the 16th piece instead, so the device copies the
/// frame. (Regression: it took 16 pieces, and the frame never arrived.)
#[test]
fn a_frame_in_as_many_pieces_as_a_frame_may_have_descriptors_is_copied_not_lost() {
    let mut s = gather_setup();
    let (mac, peer) = (s.mac, s.peer_mac);
    let payload: Vec<u8> = (0..1440u32).map(|i| (i * 11 + 5) as u8).collect();
    let mut udp = vec![0x9c, 0x40, 0x13, 0x88];
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&payload);
    let frame = ipv4_frame(peer, mac, 17, &udp);
    // The virtio-net header and the link header in one buffer, then 16
    // buffers for the rest, each at a distance from the last (not
    // contiguous, so each is a piece of its own).
    const AT: u64 = 0x200_0000;
    let mut at = AT;
    let mut descs = Vec::new();
    let mut first = vec![0u8; 12];
    first.extend_from_slice(&frame[..14]);
    s.harness.mem.write_slice(&first, GuestAddress(at)).unwrap();
    descs.push((at, first.len() as u32, 0));
    let rest = &frame[14..];
    let chunk = rest.len().div_ceil(16);
    for piece in rest.chunks(chunk) {
        at += 0x1000;
        s.harness.mem.write_slice(piece, GuestAddress(at)).unwrap();
        descs.push((at, piece.len() as u32, 0));
    }
    assert_eq!(descs.len(), 17);
    s.harness.queue_raw_chain(1, &descs);
    s.harness.kick(1);
    let got = frames_from(&s.peer, mac, 1);
    assert!(
        got.len() == 1 && got[0] == frame,
        "the frame arrives whole: {} frames arrived",
        got.len()
    );
    assert_eq!(used_tx(&mut s.harness, 1).len(), 1);
    // A copied chain is used before its batch is counted.
    let deadline = Instant::now() + Duration::from_secs(2);
    while s.counters.snapshot().tx_packets == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let c = s.counters.snapshot();
    assert_eq!((c.tx_packets, c.tx_gathered_frames), (1, 0), "copied: {c}");
}

/// Regression: chains held for frames sent from guest memory went back to
/// the guest when the link went down while their descriptors still waited
/// in the socket's tx ring (the kernel consumes nothing while the
/// interface is down); when it came back the kernel read those buffers,
/// which the guest had reused meanwhile, and sent what it found under a
/// checksum it made itself. Now nothing the guest wrote after getting its
/// buffers back leaves, and the frame sent next goes out whole.
#[test]
fn chains_returned_on_link_down_are_not_read_when_the_link_returns() {
    let mut s = gather_setup();
    let (mac, peer) = (s.mac, s.peer_mac);
    let udp_frame = |seed: u32| {
        let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7 + seed) as u8).collect();
        let mut udp = vec![0x9c, 0x40, 0x13, 0x88];
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&payload);
        let mut f = ipv4_frame(peer, mac, 17, &udp);
        leave_partial(&mut f, 6);
        f
    };
    s.pair.ip(&["link", "set", &s.pair.a, "down"]).unwrap();
    const AT: u64 = 0x200_0000;
    let data_at = |i: u64| AT + i * 0x1_0000 + 0x100;
    for i in 0..3u64 {
        let f = udp_frame(i as u32);
        s.harness
            .mem
            .write_slice(&hdr(6, 0), GuestAddress(AT + i * 0x1_0000))
            .unwrap();
        s.harness
            .mem
            .write_slice(&f, GuestAddress(data_at(i)))
            .unwrap();
        s.harness.queue_raw_chain(
            1,
            &[(AT + i * 0x1_0000, 12, 0), (data_at(i), f.len() as u32, 0)],
        );
    }
    s.harness.kick(1);
    let deadline = Instant::now() + Duration::from_secs(2);
    while s.counters.snapshot().tx_gathered_frames < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut used = Vec::new();
    s.harness.take_used(1, &mut used);
    assert!(used.is_empty(), "held while the kernel has not sent them");
    assert!(s.link.set_up(false));
    assert_eq!(used_tx(&mut s.harness, 3).len(), 3, "back on link down");
    // The guest reuses its buffers.
    for i in 0..3u64 {
        s.harness
            .mem
            .write_slice(&[0xee; 1442], GuestAddress(data_at(i)))
            .unwrap();
    }
    s.pair.ip(&["link", "set", &s.pair.a, "up"]).unwrap();
    assert!(s.link.set_up(true));
    let next = udp_frame(9);
    assert!(s.harness.queue_tx_frame_with_header(1, hdr(6, 0), &next));
    s.harness.kick(1);
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = s
            .peer
            .recv(&mut buf, Duration::from_secs(5))
            .expect("recv")
            .expect("the frame sent after the link came back never arrived");
        let f = &buf[..n];
        if f[6..12] != mac {
            continue;
        }
        assert!(
            !f.windows(8).any(|w| w == [0xee; 8]),
            "a frame of {n} bytes carried what the guest wrote after getting its buffers back"
        );
        if f[12..14] == [0x08, 0x00] && f[42..] == next[42..] {
            assert!(checksums_ok(f));
            break;
        }
    }
    assert_eq!(used_tx(&mut s.harness, 1).len(), 1);
    let c = s.counters.snapshot();
    assert_eq!(c.tx_gather_abandoned, 3, "{c}");
}

/// At MTU 9000 a TSO frame over many guest buffers (more than its
/// segments could take as pieces) goes out the copy way, every segment
/// whole, and its chain comes back.
#[test]
fn a_jumbo_tso_frame_over_many_buffers_goes_out_whole() {
    let mut s = gather_setup_mtu(9000);
    let (mac, peer) = (s.mac, s.peer_mac);
    let mss = 8948usize;
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 13 + 1) as u8).collect();
    let tso = tcp_frame(peer, mac, &data);
    assert!(s
        .harness
        .queue_tx_frame_with_header(1, hdr(16, mss as u16), &tso));
    s.harness.kick(1);
    let segments = data.len().div_ceil(mss);
    let got = frames_from(&s.peer, mac, segments);
    assert_eq!(got.len(), segments, "{}", s.counters.snapshot());
    let mut joined = Vec::new();
    for (i, seg) in got.iter().enumerate() {
        assert!(checksums_ok(seg), "segment {i}: checksums");
        joined.extend_from_slice(&seg[66..]);
    }
    assert_eq!(joined, data);
    assert_eq!(used_tx(&mut s.harness, 1).len(), 1);
}

/// 200 such frames back to back, the ring full of them: every chain comes
/// back, nothing is dropped, the queue never breaks (it once took a chain
/// sent the copy way for a broken avail ring).
#[test]
fn jumbo_tso_frames_back_to_back_all_come_back() {
    let mut s = gather_setup_mtu(9000);
    let (mac, peer) = (s.mac, s.peer_mac);
    let mss = 8948usize;
    let data: Vec<u8> = (0..60_000u32).map(|i| (i * 13 + 1) as u8).collect();
    let tso = tcp_frame(peer, mac, &data);
    let mut sent = 0;
    let mut used = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while used.len() < 200 && Instant::now() < deadline {
        while sent < 200
            && s.harness
                .queue_tx_frame_with_header(1, hdr(16, mss as u16), &tso)
        {
            sent += 1;
        }
        s.harness.kick(1);
        std::thread::sleep(Duration::from_millis(5));
        s.harness.take_used(1, &mut used);
    }
    let c = s.counters.snapshot();
    assert_eq!(used.len(), 200, "{c}");
    assert_eq!((c.tx_dropped, c.queue_errors), (0, 0), "{c}");
}

/// Regression: from the moment a NIC's sockets entered our program's
/// XSKMAP until the device was attached (and for as long as the NIC was
/// only prepared, as by `xskvm-net-helper`), the program's filter was off
/// and every frame on the NIC's queues went to the sockets, the host's own
/// unicast included. A NIC opened for a guest now passes other unicast to
/// the host from the start.
#[test]
fn a_nic_opened_for_a_guest_filters_by_its_mac_from_the_start() {
    let pair = VethPair::for_test(1);
    let guest = [0x02, 0x58, 0x53, 0, 0, 1];
    let spec: crate::net::NetSpec =
        format!("af-xdp,ifname={},mode=native,mac=02:58:53:00:00:01", pair.a)
            .parse()
            .expect("spec");
    let device = pair
        .run(|| super::open_net_device(0, &spec, None))
        .expect("enter netns")
        .expect("open the NIC");
    let filter = device.host.owner.rx_filter().expect("our program's filter");
    let peer = pair
        .run(|| PacketSocket::open(&pair.b))
        .expect("enter netns")
        .expect("packet socket");
    let (host, peer_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    assert_eq!(
        net_afxdp::testbed::filtered_after_sending(
            &peer,
            filter,
            peer_mac,
            &[host, guest, [0xff; 6], host],
            2
        )
        .expect("send"),
        2,
        "the host's two frames pass to the host stack, the guest's and broadcast do not"
    );
}
