//! Offloads done in the IO thread for the guest: checksums and
//! segmentation of what it transmits, checksum verification (and
//! completion) of what it receives. AF_XDP has no GSO and copies frames
//! anyway, so the IO thread does this work where it is cheapest: on data
//! it is already touching, instead of the guest doing it per 1500 bytes.

pub mod csum;
pub mod gso;
pub mod headers;
pub mod rx;

/// `virtio_net_hdr_v1` flags.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `virtio_net_hdr_v1` gso types.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `virtio_net_hdr_v1` (virtio 1.2 5.1.6), little-endian in guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    pub const LEN: usize = 12;

    pub fn from_bytes(b: &[u8; Self::LEN]) -> Self {
        let word = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
            num_buffers: word(10),
        }
    }

    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// The transmit offloads the driver negotiated: what its frames may ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// VIRTIO_NET_F_CSUM: NEEDS_CSUM frames.
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4 / TSO6 / ECN / USO.
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
    pub uso: bool,
}

/// The receive offloads the driver negotiated: what we may hand it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxOffloads {
    /// VIRTIO_NET_F_GUEST_CSUM: frames may be marked DATA_VALID or NEEDS_CSUM.
    pub csum: bool,
    /// VIRTIO_NET_F_GUEST_TSO4 / TSO6: TCP segments may be coalesced into
    /// GSO frames (GRO), over IPv4 / IPv6.
    pub tso4: bool,
    pub tso6: bool,
}

/// Why a transmitted frame's offload request cannot be honoured; the frame is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("checksum request outside the frame")]
    BadChecksumRequest,
    #[error("offload not negotiated")]
    NotNegotiated,
    #[error("segmentation asked for a frame that is not TCP/UDP of the right IP version")]
    NotSegmentable,
    #[error("segment size 0")]
    NoSegmentSize,
    #[error("segments longer than an IP datagram")]
    SegmentTooLong,
}
