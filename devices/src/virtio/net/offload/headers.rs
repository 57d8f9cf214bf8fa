//! Finding the IP and transport headers of an Ethernet frame: what
//! segmentation and checksum work need to know, and nothing more.

pub const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers we step over (hop-by-hop, routing, destination
/// options); a fragment header or anything else ends the walk.
const IPV6_EXT_HOP_BY_HOP: u8 = 0;
const IPV6_EXT_ROUTING: u8 = 43;
const IPV6_EXT_DEST_OPTS: u8 = 60;
/// Extension headers we are willing to walk: bounds the work a frame can cause.
const IPV6_EXT_MAX: usize = 4;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ip {
    V4,
    V6,
}

/// Where the headers of a TCP or UDP frame lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ip: Ip,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP or UDP header.
    pub l4: usize,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// End of the transport header: where the payload starts.
    pub end: usize,
}

impl Layout {
    /// Offset of the transport checksum field from the transport header.
    pub fn csum_offset(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            16
        } else {
            6
        }
    }

    /// The pseudo-header sum for a transport segment of `l4_len` bytes.
    pub fn pseudo_sum(&self, frame: &[u8], l4_len: usize) -> u64 {
        match self.ip {
            Ip::V4 => super::csum::pseudo_v4(
                &frame[self.l3 + 12..self.l3 + 16],
                &frame[self.l3 + 16..self.l3 + 20],
                self.proto,
                l4_len,
            ),
            Ip::V6 => super::csum::pseudo_v6(
                &frame[self.l3 + 8..self.l3 + 24],
                &frame[self.l3 + 24..self.l3 + 40],
                self.proto,
                l4_len,
            ),
        }
    }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
}

/// The layout of a TCP or UDP frame over IPv4 or IPv6 (with up to two
/// VLAN tags), or None for anything else: other protocols, IPv4
/// fragments, truncated headers.
pub fn parse(frame: &[u8]) -> Option<Layout> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = ETH_HLEN;
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16(frame, l3 + 2)?;
        l3 += 4;
    }
    let (ip, l4, proto) = match ethertype {
        ETH_P_IPV4 => {
            let ver_ihl = *frame.get(l3)?;
            let ihl = usize::from(ver_ihl & 0x0f) * 4;
            if ver_ihl >> 4 != 4 || ihl < 20 || frame.len() < l3 + ihl {
                return None;
            }
            // More fragments, or an offset: not a whole transport segment.
            if be16(frame, l3 + 6)? & 0x3fff != 0 {
                return None;
            }
            (Ip::V4, l3 + ihl, frame[l3 + 9])
        }
        ETH_P_IPV6 => {
            if frame.get(l3)? >> 4 != 6 || frame.len() < l3 + IPV6_HLEN {
                return None;
            }
            let mut next = frame[l3 + 6];
            let mut at = l3 + IPV6_HLEN;
            let mut walked = 0;
            while matches!(
                next,
                IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS
            ) {
                walked += 1;
                if walked > IPV6_EXT_MAX {
                    return None;
                }
                next = *frame.get(at)?;
                at += (usize::from(*frame.get(at + 1)?) + 1) * 8;
            }
            (Ip::V6, at, next)
        }
        _ => return None,
    };
    let end = match proto {
        IPPROTO_TCP => {
            let off = usize::from(frame.get(l4 + 12)? >> 4) * 4;
            if off < TCP_MIN_HLEN {
                return None;
            }
            l4 + off
        }
        IPPROTO_UDP => l4 + UDP_HLEN,
        _ => return None,
    };
    if frame.len() < end {
        return None;
    }
    Some(Layout {
        ip,
        l3,
        l4,
        proto,
        end,
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Frames for the offload tests, built field by field.
    use super::*;

    pub const SRC_V4: [u8; 4] = [10, 0, 0, 2];
    pub const DST_V4: [u8; 4] = [10, 0, 0, 1];
    pub const SRC_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    pub const DST_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    /// Ethernet + IP + TCP (with 12 bytes of options, as Linux sends with
    /// timestamps) or UDP, lengths and IPv4 header checksum filled in, the
    /// transport checksum left 0.
    pub fn frame(ip: Ip, proto: u8, vlan: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0x58, 0x53, 0x4b, 0, 0x01];
        if vlan {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x05]);
        }
        let l4_hlen = if proto == IPPROTO_TCP { 32 } else { UDP_HLEN };
        let l4_len = l4_hlen + payload.len();
        match ip {
            Ip::V4 => {
                f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let l3 = f.len();
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
                f.extend_from_slice(&SRC_V4);
                f.extend_from_slice(&DST_V4);
                let c = super::super::csum::finish(super::super::csum::add(0, &f[l3..]));
                f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            }
            Ip::V6 => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(l4_len as u16).to_be_bytes());
                f.extend_from_slice(&[proto, 64]);
                f.extend_from_slice(&SRC_V6);
                f.extend_from_slice(&DST_V6);
            }
        }
        if proto == IPPROTO_TCP {
            f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]); // ports 40000 -> 5201
            f.extend_from_slice(&1_000_000u32.to_be_bytes()); // seq
            f.extend_from_slice(&77u32.to_be_bytes()); // ack
            f.extend_from_slice(&[0x80, 0x18, 0x01, 0xf5, 0, 0, 0, 0]); // ACK|PSH
            f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8]); // timestamps
        } else {
            f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend_from_slice(payload);
        f
    }

    /// Whether the transport checksum of a whole frame verifies.
    pub fn l4_checksum_ok(frame: &[u8]) -> bool {
        let l = parse(frame).expect("a TCP or UDP frame");
        let sum = l.pseudo_sum(frame, frame.len() - l.l4);
        super::super::csum::fold(super::super::csum::add(sum, &frame[l.l4..])) == 0xffff
    }

    /// Leaves the transport checksum as a CHECKSUM_PARTIAL sender does (a
    /// guest with NEEDS_CSUM, a veth peer with offloads): the folded
    /// pseudo-header sum. Returns the field's offset.
    pub fn leave_partial(frame: &mut [u8]) -> usize {
        let l = parse(frame).expect("a TCP or UDP frame");
        let at = l.l4 + l.csum_offset();
        let pseudo = super::super::csum::fold(l.pseudo_sum(frame, frame.len() - l.l4));
        frame[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        at
    }

    /// Sets the transport checksum of a whole frame.
    pub fn fill_l4_checksum(frame: &mut [u8]) {
        let l = parse(frame).expect("a TCP or UDP frame");
        let at = l.l4 + l.csum_offset();
        frame[at..at + 2].fill(0);
        let sum = l.pseudo_sum(frame, frame.len() - l.l4);
        let c = super::super::csum::finish(super::super::csum::add(sum, &frame[l.l4..]));
        frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::testing::frame;
    use super::*;

    #[test]
    fn finds_tcp_and_udp_over_both_ip_versions_with_and_without_vlan() {
        for vlan in [false, true] {
            let v = if vlan { 4 } else { 0 };
            let l = parse(&frame(Ip::V4, IPPROTO_TCP, vlan, b"x")).unwrap();
            assert_eq!((l.ip, l.l3, l.l4, l.end), (Ip::V4, 14 + v, 34 + v, 66 + v));
            let l = parse(&frame(Ip::V6, IPPROTO_UDP, vlan, b"x")).unwrap();
            assert_eq!((l.ip, l.l3, l.l4, l.end), (Ip::V6, 14 + v, 54 + v, 62 + v));
        }
    }

    #[test]
    fn refuses_fragments_other_protocols_and_truncated_headers() {
        let mut f = frame(Ip::V4, IPPROTO_TCP, false, b"abc");
        f[20] |= 0x20; // more fragments
        assert_eq!(parse(&f), None);
        let mut f = frame(Ip::V4, IPPROTO_TCP, false, b"abc");
        f[23] = 1; // ICMP
        assert_eq!(parse(&f), None);
        let f = frame(Ip::V6, IPPROTO_TCP, false, b"");
        for cut in 0..f.len() {
            assert_eq!(parse(&f[..cut]), None, "cut at {cut}");
        }
        let mut f = frame(Ip::V4, IPPROTO_TCP, false, b"");
        f[46] = 0x40; // data offset 16 bytes: shorter than a TCP header
        assert_eq!(parse(&f), None);
    }

    #[test]
    fn steps_over_ipv6_extension_headers_but_not_forever() {
        let base = frame(Ip::V6, IPPROTO_UDP, false, b"payload");
        // Insert a hop-by-hop header (8 bytes) before UDP.
        let mut f = base[..54].to_vec();
        f[20] = IPV6_EXT_HOP_BY_HOP;
        f.extend_from_slice(&[IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&base[54..]);
        let l = parse(&f).unwrap();
        assert_eq!((l.l4, l.proto), (62, IPPROTO_UDP));
        // A chain of hop-by-hop headers longer than we walk.
        let mut f = base[..54].to_vec();
        f[20] = IPV6_EXT_HOP_BY_HOP;
        for _ in 0..10 {
            f.extend_from_slice(&[IPV6_EXT_HOP_BY_HOP, 0, 0, 0, 0, 0, 0, 0]);
        }
        f.extend_from_slice(&base[54..]);
        assert_eq!(parse(&f), None);
    }
}
