//! Transmit checksums left to the kernel through AF_XDP TX metadata
//! (`XDP_TXMD_FLAGS_CHECKSUM`), on a real veth pair.
//!
//! A veth hands a CHECKSUM_PARTIAL frame to its peer as it is, so the peer
//! would see only the pseudo-header sum; with `TxChecksum::KernelSoftware`
//! (`XDP_UMEM_TX_SW_CSUM`) the kernel completes the checksum at transmit,
//! which makes what our metadata asked for visible and checkable.

mod common;

use std::time::Duration;

use common::*;
use net_afxdp::{AfXdpConfig, TxChecksum, TxRequest};

const UDP_CSUM_AT: usize = 14 + 20 + 6;

/// An IPv4/UDP frame from `src` to `dst` with `payload_len` bytes, its UDP
/// checksum field holding the pseudo-header sum only (CHECKSUM_PARTIAL),
/// and the checksum it must end up with.
fn partial_udp_frame(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> (Vec<u8>, u16) {
    let udp_len = 8 + payload_len;
    let mut f = Vec::with_capacity(14 + 20 + udp_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + udp_len) as u16;
    let (saddr, daddr) = ([10, 99, 0, 1], [10, 99, 0, 2]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&saddr);
    ip[16..20].copy_from_slice(&daddr);
    let c = !fold(ones_sum(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&saddr);
    pseudo[4..8].copy_from_slice(&daddr);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let pseudo_sum = ones_sum(0, &pseudo);
    let want = match !fold(ones_sum(pseudo_sum, &f[34..])) {
        0 => 0xffff,
        c => c,
    };
    f[UDP_CSUM_AT..UDP_CSUM_AT + 2].copy_from_slice(&fold(pseudo_sum).to_be_bytes());
    (f, want)
}

/// At MTU 1500, every frame asking for its UDP checksum arrives with
/// exactly the checksum the reference computes (the kernel computing it
/// at transmit, `XDP_UMEM_TX_SW_CSUM`). At MTU 9000 (multi-buffer: the
/// metadata on the first of several descriptors, room for it in front of
/// each) the frames go out as CHECKSUM_PARTIAL, which a veth passes on
/// untouched: they arrive whole, pseudo-header sum in place, none refused.
/// (`XDP_UMEM_TX_SW_CSUM` sums only the first descriptor of a
/// multi-buffer frame, as of Linux 6.18, so it cannot check those.)
#[test]
fn the_kernel_fills_the_checksums_tx_metadata_asks_for() {
    require_root!();
    init_log();
    for mtu in [1500, 9000] {
        let pair = net_afxdp::testbed::VethPair::new(1).unwrap();
        for dev in [&pair.a, &pair.b] {
            pair.ip(&["link", "set", dev, "mtu", &mtu.to_string()])
                .unwrap();
        }
        let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
        let peer = packet_socket(&pair, &pair.b);
        let mut config: AfXdpConfig = format!("ifname={},mode=native", pair.a).parse().unwrap();
        config.tx_checksum = if mtu == 1500 {
            TxChecksum::KernelSoftware
        } else {
            TxChecksum::Kernel
        };
        let mut nic = open_config(&pair, &config).unwrap();
        assert!(nic.info().tx_checksum, "Linux >= 6.8 runs these tests");
        let q = &mut nic.queues_mut()[0];
        assert!(q.tx_checksum());
        let lengths: &[usize] = if mtu == 1500 {
            &[1, 18, 19, 100, 1001, 1472]
        } else {
            &[1, 1472, 4000, 4100, 8971, 8972]
        };
        let frames: Vec<(Vec<u8>, u16)> = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| partial_udp_frame(b_mac, a_mac, len, i as u8))
            .collect();
        let mut next = 0;
        while next < frames.len() {
            q.tx_batch(64, |buf| {
                let (f, _) = frames.get(next)?;
                buf[..f.len()].copy_from_slice(f);
                next += 1;
                Some(TxRequest {
                    len: f.len(),
                    csum: Some((34, 6)),
                })
            });
        }
        wait_completions(q);
        let mut buf = vec![0u8; 65536];
        for (i, (sent, want)) in frames.iter().enumerate() {
            let got = loop {
                let n = peer
                    .recv(&mut buf, Duration::from_secs(5))
                    .unwrap()
                    .unwrap_or_else(|| panic!("MTU {mtu}: frame {i} never arrived"));
                if buf[12..14] == [0x08, 0x00] && buf[23] == 17 {
                    break buf[..n].to_vec();
                }
            };
            assert_eq!(got.len(), sent.len(), "MTU {mtu}: frame {i}");
            assert_eq!(got[..UDP_CSUM_AT], sent[..UDP_CSUM_AT], "frame {i}");
            assert!(
                got[UDP_CSUM_AT + 2..] == sent[UDP_CSUM_AT + 2..],
                "frame {i} payload"
            );
            let csum = u16::from_be_bytes([got[UDP_CSUM_AT], got[UDP_CSUM_AT + 1]]);
            if mtu == 1500 {
                assert_eq!(csum, *want, "frame {i} ({} payload bytes)", lengths[i]);
            } else {
                assert_eq!(got, *sent, "frame {i} ({} payload bytes)", lengths[i]);
            }
        }
        let k = q.xdp_statistics().unwrap();
        assert_eq!(k.tx_invalid_descs, 0, "{k:?}");
        assert_no_leak(q);
    }
}

/// `tx-csum=vmm`: no TX metadata, and a frame that still asks for a
/// checksum is refused (counted) rather than sent unfinished.
#[test]
fn without_tx_metadata_a_checksum_request_is_refused() {
    require_root!();
    init_log();
    let pair = net_afxdp::testbed::VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let mut nic = open(&pair, &format!("ifname={},tx-csum=vmm", pair.a)).unwrap();
    assert!(!nic.info().tx_checksum);
    let q = &mut nic.queues_mut()[0];
    assert!(!q.tx_checksum());
    let (f, _) = partial_udp_frame(b_mac, a_mac, 100, 0);
    let mut once = Some(f);
    let batch = q.tx_batch(4, |buf| {
        let f = once.take()?;
        buf[..f.len()].copy_from_slice(&f);
        Some(TxRequest {
            len: f.len(),
            csum: Some((34, 6)),
        })
    });
    assert_eq!(batch.sent, 0);
    assert_eq!(q.counters().snapshot().tx_invalid_len, 1);
    assert_no_leak(q);
}

/// Regression: with multi-buffer, the kernel reads a checksum request's
/// field from the frame's first descriptor and fails the send with EINVAL,
/// without consuming the descriptor, when it lies beyond it; every later
/// send then failed on that same descriptor (transmit dead until the
/// socket closed). Such a request is refused and counted; the frames
/// after it go out.
#[test]
fn a_checksum_field_beyond_the_first_descriptor_is_refused_not_left_blocking_the_ring() {
    require_root!();
    init_log();
    let pair = net_afxdp::testbed::VethPair::new(1).unwrap();
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", "9000"]).unwrap();
    }
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={},mode=native", pair.a)).unwrap();
    assert!(nic.info().tx_checksum, "Linux >= 6.8 runs these tests");
    let q = &mut nic.queues_mut()[0];
    let reach = q.tx_checksum_reach();
    assert!(reach < 8000, "the first descriptor holds {reach} bytes");
    let (deep, _) = partial_udp_frame(b_mac, a_mac, 8000, 1);
    let (next, _) = partial_udp_frame(b_mac, a_mac, 100, 2);
    // The field 2 bytes past the first descriptor, then exactly at its end.
    let requests = [
        (deep.clone(), (reach as u16 - 6, 6)),
        (deep.clone(), (reach as u16 - 8, 6)),
        (next.clone(), (34, 6)),
    ];
    let mut i = 0;
    let batch = q.tx_batch(8, |buf| {
        let (f, csum) = requests.get(i)?;
        i += 1;
        buf[..f.len()].copy_from_slice(f);
        Some(TxRequest {
            len: f.len(),
            csum: Some(*csum),
        })
    });
    assert_eq!(batch.sent, 2, "{batch:?}");
    assert_eq!(q.counters().snapshot().tx_invalid_len, 1);
    wait_completions(q);
    let mut buf = vec![0u8; 65536];
    let mut lengths = Vec::new();
    while lengths.len() < 2 {
        let n = peer
            .recv(&mut buf, Duration::from_secs(5))
            .unwrap()
            .unwrap_or_else(|| panic!("only {lengths:?} arrived"));
        if buf[12..14] == [0x08, 0x00] && buf[23] == 17 {
            lengths.push(n);
        }
    }
    assert_eq!(lengths, [deep.len(), next.len()]);
    let k = q.xdp_statistics().unwrap();
    assert_eq!(k.tx_invalid_descs, 0, "{k:?}");
    assert_no_leak(q);
}
