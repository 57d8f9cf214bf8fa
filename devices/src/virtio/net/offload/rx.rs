//! Receive checksums: what the IO thread can tell the guest about a frame
//! it received, and the one repair it makes.
//!
//! A local sender with transmit checksum offload (a veth peer, by
//! default) hands its frames over as CHECKSUM_PARTIAL: through XDP they
//! reach the AF_XDP socket with the transport checksum field holding only
//! the pseudo-header sum. Such a frame does not verify, but its field
//! equals the folded pseudo-header sum; the IO thread completes it, as a
//! NIC would. A frame that is simply corrupt does not match that pattern
//! (but for a 1 in 65,536 chance) and reaches the guest unchanged.

use super::csum;
use super::headers::{self, Ip, IPPROTO_UDP};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxChecksum {
    /// The transport checksum verifies (or IPv4 UDP sent without one).
    Valid,
    /// The sender left the checksum to the device: store `value` at
    /// `at` (an offset into the frame) and the frame verifies.
    Completed { at: usize, value: [u8; 2] },
    /// The checksum does not verify: the guest must see it and drop it.
    Invalid,
    /// Not a frame we check (not TCP/UDP, a fragment, truncated), or not
    /// looked at because nobody would use the answer.
    Unchecked,
}

/// Checks the transport checksum of `frame`. With `verify` false only a
/// frame whose field holds the pseudo-header sum is summed (to repair it);
/// the guest verifies the others itself.
#[cfg(test)]
pub fn check(frame: &[u8], verify: bool) -> RxChecksum {
    check_with(frame, headers::parse(frame), verify)
}

/// [`check`] with the frame's layout already parsed.
pub fn check_with(frame: &[u8], layout: Option<headers::Layout>, verify: bool) -> RxChecksum {
    let Some(l) = layout else {
        return RxChecksum::Unchecked;
    };
    // The IP header says where the segment ends: short frames carry
    // Ethernet padding that is not part of it.
    let ip_end = match l.ip {
        Ip::V4 => l.l3 + usize::from(u16::from_be_bytes([frame[l.l3 + 2], frame[l.l3 + 3]])),
        Ip::V6 => l.l3 + 40 + usize::from(u16::from_be_bytes([frame[l.l3 + 4], frame[l.l3 + 5]])),
    };
    if ip_end > frame.len() || ip_end < l.end {
        return RxChecksum::Unchecked;
    }
    let at = l.l4 + l.csum_offset();
    let field = u16::from_be_bytes([frame[at], frame[at + 1]]);
    if l.proto == IPPROTO_UDP && field == 0 {
        return match l.ip {
            Ip::V4 => RxChecksum::Valid,
            // IPv6 requires a UDP checksum: the guest decides.
            Ip::V6 => RxChecksum::Unchecked,
        };
    }
    let l4_len = ip_end - l.l4;
    let pseudo = l.pseudo_sum(frame, l4_len);
    let partial = field == csum::fold(pseudo);
    if !verify && !partial {
        return RxChecksum::Unchecked;
    }
    let sum = csum::add(0, &frame[l.l4..ip_end]);
    if csum::fold(sum + pseudo) == 0xffff {
        RxChecksum::Valid
    } else if partial {
        // The field already holds the pseudo-header sum: the complement
        // of the whole segment's sum is the checksum.
        RxChecksum::Completed {
            at,
            value: csum::finish(sum).to_be_bytes(),
        }
    } else {
        RxChecksum::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::super::headers::testing::{fill_l4_checksum, frame, l4_checksum_ok, leave_partial};
    use super::super::headers::{IPPROTO_TCP, IPPROTO_UDP};
    use super::*;

    fn cases() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for ip in [Ip::V4, Ip::V6] {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                for len in [0, 1, 5, 1000, 1447] {
                    let payload: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
                    out.push(frame(ip, proto, len % 2 == 1, &payload));
                }
            }
        }
        out
    }

    #[test]
    fn valid_frames_verify_and_are_left_alone_without_verify() {
        for mut f in cases() {
            fill_l4_checksum(&mut f);
            assert_eq!(check(&f, true), RxChecksum::Valid);
            assert_eq!(check(&f, false), RxChecksum::Unchecked);
        }
    }

    #[test]
    fn partial_frames_are_completed_whether_or_not_the_guest_wants_verification() {
        for mut f in cases() {
            let at = leave_partial(&mut f);
            for verify in [true, false] {
                let RxChecksum::Completed { at: got, value } = check(&f, verify) else {
                    panic!("not completed: {:?}", check(&f, verify));
                };
                assert_eq!(got, at);
                let mut fixed = f.clone();
                fixed[at..at + 2].copy_from_slice(&value);
                assert!(l4_checksum_ok(&fixed));
            }
        }
    }

    #[test]
    fn corrupt_frames_stay_corrupt() {
        for mut f in cases() {
            fill_l4_checksum(&mut f);
            let last = f.len() - 1;
            f[last] ^= 0x10; // one payload (or header) bit flipped in transit
            assert_eq!(check(&f, true), RxChecksum::Invalid);
            assert_eq!(check(&f, false), RxChecksum::Unchecked);
            // A corrupted partial frame is still repaired: as a NIC would,
            // since only the sender's own checksum could have caught it.
        }
    }

    #[test]
    fn ethernet_padding_is_not_summed_and_truncated_frames_are_not_checked() {
        let mut f = frame(Ip::V4, IPPROTO_UDP, false, b"hi");
        fill_l4_checksum(&mut f);
        let mut padded = f.clone();
        padded.resize(60, 0xaa);
        assert_eq!(check(&padded, true), RxChecksum::Valid);
        assert_eq!(check(&f[..f.len() - 1], true), RxChecksum::Unchecked);
    }

    #[test]
    fn udp_without_checksum() {
        let f = frame(Ip::V4, IPPROTO_UDP, false, b"no checksum");
        assert_eq!(check(&f, true), RxChecksum::Valid);
        let f = frame(Ip::V6, IPPROTO_UDP, false, b"no checksum");
        assert_eq!(check(&f, true), RxChecksum::Unchecked);
    }

    #[test]
    fn non_ip_frames_are_unchecked() {
        let mut f = frame(Ip::V4, IPPROTO_TCP, false, b"x");
        f[12] = 0x88;
        f[13] = 0xb5;
        assert_eq!(check(&f, true), RxChecksum::Unchecked);
    }
}
