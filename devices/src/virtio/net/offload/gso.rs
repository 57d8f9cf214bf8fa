//! Transmit offloads: filling a checksum the guest left to the device
//! (NEEDS_CSUM), and cutting a GSO frame (TSO over IPv4 or IPv6, USO) into
//! wire frames, each with headers fixed up and its own checksum.
//!
//! The segmenter never holds the payload: the IO thread copies each
//! segment's payload straight from guest memory into a host transmit
//! buffer, and the segmenter writes the headers in front of it.

use super::csum;
use super::headers::{self, Ip, Layout, IPPROTO_TCP, IPPROTO_UDP};
use super::{
    OffloadError, TxOffloads, VirtioNetHdr, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
};

const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// Headers of a GSO frame that the segmenter reads: Ethernet, two VLAN
/// tags, IPv6 with a few extension headers, TCP with options.
pub const MAX_HEADERS: usize = 256;

/// Fills the checksum of a NEEDS_CSUM frame: the one's-complement sum from
/// `csum_start` to the end (the field holds the pseudo-header sum, as the
/// guest leaves it) is stored at `csum_start + csum_offset`.
pub fn fill_partial_csum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), OffloadError> {
    let at = check_partial_csum(frame.len(), csum_start, csum_offset)?;
    let c = csum::finish(csum::add(0, &frame[csum_start..]));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Checks that a checksum request fits a frame of `len` bytes, past the
/// Ethernet header (a checksum stored there would overwrite the MAC
/// addresses after spoof-check looked at them); returns where the
/// checksum is stored.
pub fn check_partial_csum(
    len: usize,
    csum_start: usize,
    csum_offset: usize,
) -> Result<usize, OffloadError> {
    if csum_start < headers::ETH_HLEN {
        return Err(OffloadError::BadChecksumRequest);
    }
    csum_start
        .checked_add(csum_offset)
        .filter(|&at| len >= 2 && at <= len - 2)
        .ok_or(OffloadError::BadChecksumRequest)
}

/// Whether a frame needs segmenting, given its header.
pub fn is_gso(hdr: &VirtioNetHdr) -> bool {
    hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE
}

/// How one GSO frame is cut into wire frames.
#[derive(Debug, Clone, Copy)]
pub struct Segmenter {
    layout: Layout,
    /// Payload bytes per segment (the last may have fewer).
    mss: usize,
    /// Payload bytes in the whole frame.
    payload: usize,
    segments: usize,
}

impl Segmenter {
    /// Plans the segmentation of a frame of `frame_len` bytes whose first
    /// bytes are `headers` (at least its headers, up to [`MAX_HEADERS`]).
    /// The guest's `hdr_len` is only a hint (Linux sends the linear part's
    /// length there), so the headers are parsed, not trusted.
    pub fn new(
        hdr: &VirtioNetHdr,
        offloads: TxOffloads,
        headers: &[u8],
        frame_len: usize,
    ) -> Result<Self, OffloadError> {
        let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let layout = headers::parse(headers).ok_or(OffloadError::NotSegmentable)?;
        let allowed = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_TCPV4 => {
                if layout.ip != Ip::V4 || layout.proto != IPPROTO_TCP {
                    return Err(OffloadError::NotSegmentable);
                }
                offloads.tso4 && (!ecn || offloads.ecn)
            }
            VIRTIO_NET_HDR_GSO_TCPV6 => {
                if layout.ip != Ip::V6 || layout.proto != IPPROTO_TCP {
                    return Err(OffloadError::NotSegmentable);
                }
                offloads.tso6 && (!ecn || offloads.ecn)
            }
            VIRTIO_NET_HDR_GSO_UDP_L4 => {
                if layout.proto != IPPROTO_UDP {
                    return Err(OffloadError::NotSegmentable);
                }
                offloads.uso && !ecn
            }
            _ => false,
        };
        if !allowed {
            return Err(OffloadError::NotNegotiated);
        }
        let mss = usize::from(hdr.gso_size);
        if mss == 0 {
            return Err(OffloadError::NoSegmentSize);
        }
        let payload = frame_len
            .checked_sub(layout.end)
            .ok_or(OffloadError::NotSegmentable)?;
        // IPv4's total length (IPv6's payload length plus its header) must
        // hold a segment: a bigger one would be sent with a wrapped length.
        if layout.end - layout.l3 + mss.min(payload) > usize::from(u16::MAX) {
            return Err(OffloadError::SegmentTooLong);
        }
        Ok(Self {
            layout,
            mss,
            payload,
            segments: payload.div_ceil(mss).max(1),
        })
    }

    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Length of the headers repeated in every segment.
    pub fn header_len(&self) -> usize {
        self.layout.end
    }

    /// Where segment `i`'s payload lies in the original frame, and its length.
    pub fn payload(&self, i: usize) -> (usize, usize) {
        let start = i * self.mss;
        let len = self.mss.min(self.payload - start.min(self.payload));
        (self.layout.end + start, len)
    }

    /// Length of segment `i` on the wire.
    pub fn segment_len(&self, i: usize) -> usize {
        self.layout.end + self.payload(i).1
    }

    /// Completes segment `i` in `seg` (exactly [`Self::segment_len`]
    /// bytes, payload already at [`Self::header_len`]): copies the
    /// original `headers` in front, fixes lengths, IPv4 id and header
    /// checksum, TCP sequence number and flags, and fills the transport
    /// checksum — or, with `leave_partial`, only its pseudo-header sum,
    /// for the host side to finish (as a NIC does a CHECKSUM_PARTIAL
    /// frame).
    pub fn finish_segment(&self, i: usize, headers: &[u8], seg: &mut [u8], leave_partial: bool) {
        let l = &self.layout;
        let pseudo = self.fix_headers(i, headers, seg, seg.len());
        let at = l.l4 + l.csum_offset();
        let c = if leave_partial {
            csum::fold(pseudo)
        } else {
            seg[at..at + 2].fill(0);
            csum::finish(csum::add(pseudo, &seg[l.l4..]))
        };
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// Writes segment `i`'s headers alone into `out` (exactly
    /// [`Self::header_len`] bytes), as [`Self::finish_segment`] with
    /// `leave_partial` would: for a segment whose payload goes out from
    /// where it lies, the host side summing it.
    pub fn finish_segment_headers(&self, i: usize, headers: &[u8], out: &mut [u8]) {
        let l = &self.layout;
        let pseudo = self.fix_headers(i, headers, out, self.segment_len(i));
        let at = l.l4 + l.csum_offset();
        out[at..at + 2].copy_from_slice(&csum::fold(pseudo).to_be_bytes());
    }

    /// Copies the original headers into `seg` and fixes them up for
    /// segment `i` of `seg_len` bytes; returns its pseudo-header sum.
    fn fix_headers(&self, i: usize, headers: &[u8], seg: &mut [u8], seg_len: usize) -> u64 {
        let l = &self.layout;
        let last = i + 1 == self.segments;
        seg[..l.end].copy_from_slice(&headers[..l.end]);
        let l4_len = seg_len - l.l4;
        match l.ip {
            Ip::V4 => {
                let total = (seg_len - l.l3) as u16;
                seg[l.l3 + 2..l.l3 + 4].copy_from_slice(&total.to_be_bytes());
                let id = u16::from_be_bytes([seg[l.l3 + 4], seg[l.l3 + 5]]).wrapping_add(i as u16);
                seg[l.l3 + 4..l.l3 + 6].copy_from_slice(&id.to_be_bytes());
                seg[l.l3 + 10..l.l3 + 12].fill(0);
                let c = csum::finish(csum::add(0, &seg[l.l3..l.l4]));
                seg[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
            }
            Ip::V6 => {
                let payload_len = (seg_len - l.l3 - 40) as u16;
                seg[l.l3 + 4..l.l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
            }
        }
        if l.proto == IPPROTO_TCP {
            let seq =
                u32::from_be_bytes([seg[l.l4 + 4], seg[l.l4 + 5], seg[l.l4 + 6], seg[l.l4 + 7]])
                    .wrapping_add((i * self.mss) as u32);
            seg[l.l4 + 4..l.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if !last {
                seg[l.l4 + 13] &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
            }
            if i > 0 {
                seg[l.l4 + 13] &= !TCP_FLAG_CWR;
            }
        } else {
            seg[l.l4 + 4..l.l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        l.pseudo_sum(seg, l4_len)
    }

    /// Where the transport checksum of every segment starts, and where it
    /// is stored relative to that.
    pub fn csum_request(&self) -> (usize, usize) {
        (self.layout.l4, self.layout.csum_offset())
    }
}

#[cfg(test)]
mod tests {
    use super::super::headers::testing::{fill_l4_checksum, frame, l4_checksum_ok, leave_partial};
    use super::*;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
        uso: true,
    };

    fn hdr(gso_type: u8, gso_size: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: 1,
            gso_type,
            gso_size,
            ..Default::default()
        }
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// Cuts `big` as the worker does: payload first, then the headers.
    fn segment(s: &Segmenter, big: &[u8]) -> Vec<Vec<u8>> {
        (0..s.segments())
            .map(|i| {
                let mut seg = vec![0u8; s.segment_len(i)];
                let (at, len) = s.payload(i);
                seg[s.header_len()..].copy_from_slice(&big[at..at + len]);
                s.finish_segment(i, big, &mut seg, false);
                seg
            })
            .collect()
    }

    fn tcp_seq(f: &[u8], l4: usize) -> u32 {
        u32::from_be_bytes(f[l4 + 4..l4 + 8].try_into().unwrap())
    }

    #[test]
    fn tso4_segments_carry_the_payload_in_order_with_fixed_headers() {
        let data = payload(65_000);
        let mut big = frame(Ip::V4, IPPROTO_TCP, false, &data);
        big[47] |= TCP_FLAG_FIN | TCP_FLAG_CWR; // ACK|PSH|FIN|CWR on the GSO frame
        let s = Segmenter::new(&hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448), ALL, &big, big.len()).unwrap();
        assert_eq!(s.segments(), 65_000usize.div_ceil(1448));
        let segs = segment(&s, &big);
        let mut joined = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            assert!(seg.len() <= 14 + 1500, "segment {i} is {} bytes", seg.len());
            assert_eq!(
                usize::from(u16::from_be_bytes([seg[16], seg[17]])),
                seg.len() - 14
            );
            assert_eq!(
                u16::from_be_bytes([seg[18], seg[19]]),
                0x1234u16.wrapping_add(i as u16)
            );
            assert_eq!(
                csum::fold(csum::add(0, &seg[14..34])),
                0xffff,
                "IPv4 header checksum"
            );
            assert!(l4_checksum_ok(seg), "TCP checksum of segment {i}");
            assert_eq!(tcp_seq(seg, 34), 1_000_000 + (i * 1448) as u32);
            let flags = seg[47];
            assert_eq!(flags & TCP_FLAG_FIN != 0, last, "FIN only on the last");
            assert_eq!(flags & TCP_FLAG_PSH != 0, last, "PSH only on the last");
            assert_eq!(flags & TCP_FLAG_CWR != 0, i == 0, "CWR only on the first");
            assert_eq!(&seg[34 + 20..66], &big[54..66], "options copied");
            joined.extend_from_slice(&seg[66..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn tso6_with_vlan_and_uso_over_both_versions() {
        let data = payload(20_000);
        let big = frame(Ip::V6, IPPROTO_TCP, true, &data);
        let s = Segmenter::new(&hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1428), ALL, &big, big.len()).unwrap();
        let mut joined = Vec::new();
        for seg in segment(&s, &big) {
            let l = headers::parse(&seg).unwrap();
            assert_eq!(
                usize::from(u16::from_be_bytes([seg[22], seg[23]])),
                seg.len() - l.l3 - 40
            );
            assert!(l4_checksum_ok(&seg));
            joined.extend_from_slice(&seg[l.end..]);
        }
        assert_eq!(joined, data);
        for ip in [Ip::V4, Ip::V6] {
            let big = frame(ip, IPPROTO_UDP, false, &data);
            let s = Segmenter::new(&hdr(VIRTIO_NET_HDR_GSO_UDP_L4, 8000), ALL, &big, big.len())
                .unwrap();
            assert_eq!(s.segments(), 3);
            let mut joined = Vec::new();
            for seg in segment(&s, &big) {
                let l = headers::parse(&seg).unwrap();
                let udp_len = u16::from_be_bytes([seg[l.l4 + 4], seg[l.l4 + 5]]);
                assert_eq!(usize::from(udp_len), seg.len() - l.l4);
                assert!(l4_checksum_ok(&seg));
                joined.extend_from_slice(&seg[l.end..]);
            }
            assert_eq!(joined, data);
        }
    }

    /// Segments left partial (pseudo-header sum only, for the kernel to
    /// finish) come out exactly as the software-filled ones once the sum
    /// from `csum_start` is stored at `csum_offset`, as the host side does;
    /// their headers written alone are the same bytes.
    #[test]
    fn segments_left_partial_complete_to_the_software_checksums() {
        for (ip, proto, gso) in [
            (Ip::V4, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4),
            (Ip::V6, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV6),
            (Ip::V4, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4),
            (Ip::V6, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4),
        ] {
            let data = payload(10_001);
            let big = frame(ip, proto, true, &data);
            let s = Segmenter::new(&hdr(gso, 1400), ALL, &big, big.len()).unwrap();
            let want = segment(&s, &big);
            let (start, offset) = s.csum_request();
            for (i, want) in want.iter().enumerate() {
                let mut seg = vec![0u8; s.segment_len(i)];
                let (at, len) = s.payload(i);
                seg[s.header_len()..].copy_from_slice(&big[at..at + len]);
                s.finish_segment(i, &big, &mut seg, true);
                // The headers alone, for a payload sent from where it lies.
                let mut headers = vec![0xaau8; s.header_len()];
                s.finish_segment_headers(i, &big, &mut headers);
                assert_eq!(headers[..], seg[..s.header_len()], "segment {i} headers");
                assert!(!l4_checksum_ok(&seg), "left partial, not complete");
                fill_partial_csum(&mut seg, start, offset).unwrap();
                assert_eq!(&seg, want, "{ip:?} proto {proto} segment {i}");
            }
        }
    }

    #[test]
    fn a_frame_that_fits_one_segment_is_sent_whole() {
        let big = frame(Ip::V4, IPPROTO_TCP, false, &payload(100));
        let s = Segmenter::new(&hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448), ALL, &big, big.len()).unwrap();
        let segs = segment(&s, &big);
        assert_eq!(segs.len(), 1);
        let mut want = big.clone();
        fill_l4_checksum(&mut want);
        assert_eq!(segs[0], want);
    }

    #[test]
    fn refuses_what_was_not_negotiated_or_does_not_match() {
        let v4 = frame(Ip::V4, IPPROTO_TCP, false, &payload(3000));
        let v6 = frame(Ip::V6, IPPROTO_TCP, false, &payload(3000));
        let udp = frame(Ip::V4, IPPROTO_UDP, false, &payload(3000));
        let none = TxOffloads::default();
        let new = |h: VirtioNetHdr, o, f: &[u8]| Segmenter::new(&h, o, f, f.len()).err();
        use OffloadError::*;
        assert_eq!(
            new(hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448), none, &v4),
            Some(NotNegotiated)
        );
        assert_eq!(
            new(hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448), ALL, &v6),
            Some(NotSegmentable)
        );
        assert_eq!(
            new(hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1448), ALL, &v4),
            Some(NotSegmentable)
        );
        assert_eq!(
            new(hdr(VIRTIO_NET_HDR_GSO_UDP_L4, 1448), ALL, &v4),
            Some(NotSegmentable)
        );
        assert_eq!(
            new(hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448), ALL, &udp),
            Some(NotSegmentable)
        );
        assert_eq!(
            new(hdr(VIRTIO_NET_HDR_GSO_TCPV4, 0), ALL, &v4),
            Some(NoSegmentSize)
        );
        assert_eq!(
            new(hdr(3, 1448), ALL, &udp),
            Some(NotNegotiated),
            "UFO is not offered"
        );
        let no_ecn = TxOffloads { ecn: false, ..ALL };
        let ecn = VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN;
        assert_eq!(new(hdr(ecn, 1448), no_ecn, &v4), Some(NotNegotiated));
        assert!(new(hdr(ecn, 1448), ALL, &v4).is_none());
        // Headers cut short of the frame's own: not segmentable.
        assert_eq!(
            Segmenter::new(
                &hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448),
                ALL,
                &v4[..40],
                v4.len()
            )
            .err(),
            Some(NotSegmentable)
        );
    }

    #[test]
    fn partial_checksums_are_filled_like_the_kernel_does() {
        for (ip, proto) in [
            (Ip::V4, IPPROTO_TCP),
            (Ip::V6, IPPROTO_TCP),
            (Ip::V4, IPPROTO_UDP),
            (Ip::V6, IPPROTO_UDP),
        ] {
            for len in [0, 1, 2, 1399, 1400] {
                let mut f = frame(ip, proto, false, &payload(len));
                leave_partial(&mut f);
                let l = headers::parse(&f).unwrap();
                fill_partial_csum(&mut f, l.l4, l.csum_offset()).unwrap();
                assert!(l4_checksum_ok(&f), "{ip:?} {proto} len {len}");
            }
        }
        let mut f = vec![0u8; 60];
        assert_eq!(
            fill_partial_csum(&mut f, 50, 9),
            Err(OffloadError::BadChecksumRequest)
        );
        assert_eq!(fill_partial_csum(&mut f, 58, 0), Ok(()));
        assert_eq!(
            fill_partial_csum(&mut f, 59, 0),
            Err(OffloadError::BadChecksumRequest)
        );
        assert_eq!(
            fill_partial_csum(&mut f, usize::MAX, 1),
            Err(OffloadError::BadChecksumRequest)
        );
    }

    /// A checksum that starts inside the Ethernet header would be written
    /// over the MAC addresses after the source MAC was checked (found by
    /// fuzzing: a guest could get past spoof-check this way, in software
    /// and through the kernel's TX metadata alike).
    #[test]
    fn a_checksum_request_inside_the_ethernet_header_is_refused() {
        let mut f = vec![0u8; 60];
        for (start, offset) in [(0, 6), (0, 8), (6, 0), (8, 2), (13, 0)] {
            assert_eq!(
                check_partial_csum(f.len(), start, offset),
                Err(OffloadError::BadChecksumRequest),
                "csum_start {start}, csum_offset {offset}"
            );
            assert_eq!(
                fill_partial_csum(&mut f, start, offset),
                Err(OffloadError::BadChecksumRequest)
            );
        }
        assert_eq!(f, vec![0u8; 60], "nothing written");
        assert_eq!(
            check_partial_csum(f.len(), headers::ETH_HLEN, 0),
            Ok(headers::ETH_HLEN)
        );
    }

    /// At an MTU near 64 KiB a segment the MTU allows can be longer than
    /// an IP datagram: refused, rather than sent with its IPv4 total length
    /// wrapped (65,539 written as 3).
    #[test]
    fn segments_longer_than_an_ip_datagram_are_refused() {
        let data = vec![7u8; 65_600];
        let big = frame(Ip::V4, IPPROTO_TCP, false, &data);
        let l = headers::parse(&big).unwrap();
        let header = l.end - l.l3;
        let most = usize::from(u16::MAX) - header;
        let seg = |gso_size: usize| {
            Segmenter::new(
                &hdr(VIRTIO_NET_HDR_GSO_TCPV4, gso_size as u16),
                ALL,
                &big[..l.end],
                big.len(),
            )
        };
        assert_eq!(seg(most + 1).unwrap_err(), OffloadError::SegmentTooLong);
        let s = seg(most).unwrap();
        assert_eq!(s.segment_len(0) - l.l3, usize::from(u16::MAX));
    }
}
