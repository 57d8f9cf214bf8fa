//! The Internet checksum (RFC 1071) as TCP, UDP and IPv4 use it: a
//! one's-complement sum of big-endian 16-bit words.
//!
//! Sums are kept wide (`u64`) while adding and folded to 16 bits at the
//! end. Adding big-endian 32-bit words gives the same folded result as
//! adding 16-bit words (2^16 is 1 modulo 2^16 - 1), and takes half the
//! steps; a `u64` cannot overflow on any frame we handle.

/// Adds `data` to `sum`. `data` must start at an even offset from where
/// the checksum starts; an odd last byte is padded with zero, as RFC 1071
/// says, so only the last piece of a sum may have an odd length.
#[inline]
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut rest = chunks.remainder();
    if rest.len() >= 4 {
        sum += u64::from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]));
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        sum += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a wide sum to 16 bits with end-around carries.
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The value to store in a checksum field: the complement of the folded
/// sum, with 0 sent as 0xffff (the same value in one's complement; UDP
/// reserves 0 for "no checksum").
#[inline]
pub fn finish(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

/// The sum of the IPv4 pseudo-header (RFC 793/768).
pub fn pseudo_v4(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    add(add(0, src), dst) + u64::from(proto) + l4_len as u64
}

/// The sum of the IPv6 pseudo-header (RFC 8200 8.1).
pub fn pseudo_v6(src: &[u8], dst: &[u8], next_header: u8, l4_len: usize) -> u64 {
    add(add(0, src), dst) + u64::from(next_header) + l4_len as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 as written: 16-bit words, carries folded at every step.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = data.get(i + 1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
            sum = (sum & 0xffff) + (sum >> 16);
            i += 2;
        }
        sum as u16
    }

    /// A small deterministic generator: the tests need no rand crate.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// One's complement has two zeros; compare values, not representations.
    fn same(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }

    #[test]
    fn matches_the_reference_on_random_data_of_every_length() {
        for len in 0..2100 {
            let data = bytes(len as u64 + 7, len);
            let fast = fold(add(0, &data));
            let slow = reference(&data);
            assert!(same(fast, slow), "len {len}: {fast:#x} vs {slow:#x}");
        }
        for seed in 0..200 {
            let data = bytes(seed, 65_535);
            assert!(same(fold(add(0, &data)), reference(&data)), "seed {seed}");
        }
    }

    #[test]
    fn all_ones_and_all_zeros() {
        assert_eq!(fold(add(0, &[0xff; 65_536])), 0xffff);
        assert_eq!(fold(add(0, &[0; 100])), 0);
        assert_eq!(finish(add(0, &[0; 100])), 0xffff);
    }

    #[test]
    fn sums_of_even_pieces_add_up() {
        let data = bytes(99, 3001);
        let whole = fold(add(0, &data));
        let pieces = fold(add(
            add(add(0, &data[..1000]), &data[1000..2002]),
            &data[2002..],
        ));
        assert!(same(whole, pieces));
    }

    #[test]
    fn a_stored_checksum_verifies() {
        // RFC 1071's example words, then the checksum over them appended.
        let mut data = vec![0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &data)), 0xddf2);
        let c = finish(add(0, &data));
        data.extend_from_slice(&c.to_be_bytes());
        assert_eq!(fold(add(0, &data)), 0xffff);
    }
}
