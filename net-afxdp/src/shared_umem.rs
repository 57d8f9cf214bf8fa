//! A UMEM over memory the caller owns (for `umem=guest`: the guest's RAM),
//! in unaligned chunk mode, shared by one socket per queue
//! (`XDP_SHARED_UMEM`, each socket with its own fill and completion ring).
//!
//! Unlike [`crate::XskQueue`] nothing here owns or copies frames: the
//! caller hands the kernel offsets into its region (fill ring, tx ring) and
//! gets them back (rx ring, completion ring); which offsets it may hand out
//! is its business. The kernel checks every offset against the region, so
//! it only ever reads or writes inside it. What the kernel does with the
//! offsets (where received bytes land, what it refuses) is pinned by the
//! tests in `tests/shared_umem.rs`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::error::{Error, Result, PRIVILEGE_HINT};
use crate::nic::new_xsk_socket;
use crate::queue::XdpStatistics;
use crate::ring::{Ring, RingOffsets};
use crate::sys;

/// Where received bytes start, after the chunk's start and the UMEM's
/// headroom: the kernel's `XDP_PACKET_HEADROOM`.
pub const XDP_PACKET_HEADROOM: u32 = 256;

/// Chunk sizes the kernel takes in unaligned mode.
const CHUNK_SIZES: std::ops::RangeInclusive<u32> = 2048..=4096;

/// The registered region and the socket it was registered on.
#[derive(Debug)]
pub struct SharedUmem {
    /// Registered the UMEM; bound by the first queue, referred to by the
    /// others (`sxdp_shared_umem_fd`).
    owner: Arc<OwnedFd>,
    owner_bound: bool,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    /// Room for `struct xsk_tx_metadata` in front of a descriptor; 0: none.
    tx_metadata_len: u32,
}

/// One received descriptor: the frame's bytes are at `chunk + offset`
/// for `len` bytes (`chunk` is the fill-ring address plus the headroom).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxDesc {
    pub chunk: u64,
    pub offset: u64,
    pub len: u32,
    /// More descriptors of the same frame follow (multi-buffer).
    pub more: bool,
}

impl RxDesc {
    /// Offset of the first received byte in the region.
    pub fn data(&self) -> u64 {
        self.chunk + self.offset
    }
}

/// One descriptor to transmit: `len` bytes at offset `addr` of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxDesc {
    pub addr: u64,
    pub len: u32,
    /// More descriptors of the same frame follow (a socket bound
    /// multi-buffer).
    pub more: bool,
    /// The frame's first descriptor, with `struct xsk_tx_metadata` (a
    /// checksum request) in the [`TX_METADATA_LEN`] bytes in front of
    /// `addr` (a UMEM registered with TX metadata).
    pub metadata: bool,
}

impl TxDesc {
    /// A whole frame in one descriptor, without metadata.
    pub fn new(addr: u64, len: u32) -> TxDesc {
        TxDesc {
            addr,
            len,
            more: false,
            metadata: false,
        }
    }
}

/// Bytes of `struct xsk_tx_metadata` in front of a transmit descriptor
/// that carries one (flags; csum_start, csum_offset; launch_time).
pub const TX_METADATA_LEN: u32 = 24;

/// `struct xsk_tx_metadata` asking the kernel to fill the checksum of the
/// bytes from `csum_start` (counted from the frame's first byte) to the
/// frame's end into `csum_start + csum_offset`.
pub fn tx_checksum_request(csum_start: u16, csum_offset: u16) -> [u8; TX_METADATA_LEN as usize] {
    let mut meta = [0u8; TX_METADATA_LEN as usize];
    meta[..8].copy_from_slice(&u64::from(libc::XDP_TXMD_FLAGS_CHECKSUM).to_ne_bytes());
    meta[8..10].copy_from_slice(&csum_start.to_ne_bytes());
    meta[10..12].copy_from_slice(&csum_offset.to_ne_bytes());
    meta
}

/// TX metadata for a [`SharedUmem`]: room for a checksum request in front
/// of every descriptor that says so (registered the Linux 6.11+ way, with
/// `XDP_UMEM_TX_METADATA_LEN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMetadata {
    /// None: the kernel sends what it is given.
    Off,
    /// Checksums filled by the device, or by the kernel when the device
    /// cannot. (Not `XDP_UMEM_TX_SW_CSUM`: with multi-buffer, 6.18 sums
    /// only a frame's first descriptor there.)
    Checksum,
}

impl SharedUmem {
    /// Registers `[ptr, ptr + len)` as a UMEM of `chunk_size`-byte chunks
    /// (2048..=4096) in unaligned mode: fill addresses and transmit
    /// descriptors may start anywhere, and received bytes land at the fill
    /// address + `headroom` + [`XDP_PACKET_HEADROOM`].
    ///
    /// # Safety
    /// `ptr` must be page-aligned and `[ptr, ptr + len)` a read-write
    /// mapping of this process that stays mapped until this value and every
    /// [`SharedUmemQueue`] bound to it are dropped: the kernel reads and
    /// writes it meanwhile, whatever Rust thinks of that memory. The caller
    /// must access it only in ways that tolerate concurrent writes (as
    /// vm-memory's volatile accessors do for guest memory).
    pub unsafe fn register(
        ptr: *mut u8,
        len: usize,
        chunk_size: u32,
        headroom: u32,
        tx_metadata: TxMetadata,
    ) -> Result<SharedUmem> {
        let bad = |what: String| Error::Io {
            op: "registering a shared UMEM",
            source: io::Error::new(io::ErrorKind::InvalidInput, what),
        };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if ptr.is_null()
            || !(ptr as usize).is_multiple_of(page)
            || len == 0
            || !len.is_multiple_of(page)
        {
            return Err(bad(format!(
                "region {ptr:p}+{len:#x} is not whole pages ({page} bytes)"
            )));
        }
        if !CHUNK_SIZES.contains(&chunk_size) {
            return Err(bad(format!(
                "chunk size {chunk_size} is outside {CHUNK_SIZES:?}"
            )));
        }
        if headroom + XDP_PACKET_HEADROOM >= chunk_size {
            return Err(bad(format!(
                "headroom {headroom} leaves no room in a {chunk_size}-byte chunk"
            )));
        }
        let fd = new_xsk_socket()?;
        let (metadata_flags, tx_metadata_len) = match tx_metadata {
            TxMetadata::Off => (0, 0),
            TxMetadata::Checksum => (libc::XDP_UMEM_TX_METADATA_LEN, TX_METADATA_LEN),
        };
        let reg = libc::xdp_umem_reg {
            addr: ptr as u64,
            len: len as u64,
            chunk_size,
            headroom,
            flags: libc::XDP_UMEM_UNALIGNED_CHUNK_FLAG | metadata_flags,
            tx_metadata_len,
        };
        if let Err(source) = sys::setsockopt(fd.as_fd(), libc::SOL_XDP, libc::XDP_UMEM_REG, &reg) {
            return Err(match source.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::ENOMEM) => Error::Memlock {
                    needed_kib: len as u64 / 1024,
                    queues: 1,
                    limit_kib: sys::memlock_limit().map(|b| b / 1024),
                    guest_memory: true,
                },
                Some(libc::EPERM) => Error::PermissionDenied {
                    action: "registering the UMEM",
                    hint: PRIVILEGE_HINT,
                    source,
                },
                _ => Error::Io {
                    op: "registering a shared UMEM (XDP_UMEM_REG, unaligned chunks)",
                    source,
                },
            });
        }
        Ok(SharedUmem {
            owner: Arc::new(fd),
            owner_bound: false,
            len: len as u64,
            chunk_size,
            headroom,
            tx_metadata_len,
        })
    }

    /// Bytes in the region.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn headroom(&self) -> u32 {
        self.headroom
    }

    /// Whether the kernel takes `desc`: non-empty, inside the region, at
    /// most one chunk long less the TX metadata length (if the UMEM has
    /// TX metadata), with room for the metadata in front inside the region
    /// (whether it says it has some or not). Check before [`SharedUmemQueue::transmit`]:
    /// the kernel counts a refused descriptor in `tx_invalid_descs` and,
    /// depending on its version, returns it on the completion ring or not.
    pub fn tx_desc_ok(&self, desc: &TxDesc) -> bool {
        // With TX metadata registered, the kernel wants room for it in
        // front of every descriptor, and counts it in the chunk.
        let metadata_ok = (!desc.metadata || self.tx_metadata_len > 0)
            && desc.addr >= u64::from(self.tx_metadata_len);
        metadata_ok
            && desc.len > 0
            && desc.len <= self.chunk_size - self.tx_metadata_len
            && desc
                .addr
                .checked_add(u64::from(desc.len))
                .is_some_and(|end| end <= self.len)
    }

    /// The longest frame one fill address takes in one descriptor.
    pub fn rx_frame_room(&self) -> u32 {
        self.chunk_size - self.headroom - XDP_PACKET_HEADROOM
    }
}

/// One queue's socket on a [`SharedUmem`]: its own four rings.
#[derive(Debug)]
pub struct SharedUmemQueue {
    queue_id: u32,
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    // Dropped after the rings (its mappings); the UMEM stays registered
    // while any socket on it is open (the kernel holds it).
    fd: Arc<OwnedFd>,
}

impl SharedUmemQueue {
    /// Binds a socket on `umem` to `(ifindex, queue_id)` in copy mode, with
    /// rings of `ring_size` entries (a power of two). The first queue binds
    /// the socket that registered the UMEM; later ones a new socket that
    /// shares it (and its mode). `multi_buffer`: frames may take several
    /// descriptors (`XDP_USE_SG`, Linux 6.6+; first queue only decides).
    pub fn bind(
        umem: &mut SharedUmem,
        ifindex: u32,
        queue_id: u32,
        ring_size: u32,
        multi_buffer: bool,
    ) -> Result<SharedUmemQueue> {
        let sock_err = |op: &'static str| {
            move |source: io::Error| Error::Socket {
                op,
                queue: queue_id,
                source,
            }
        };
        let first = !umem.owner_bound;
        let fd = if first {
            umem.owner.clone()
        } else {
            Arc::new(new_xsk_socket()?)
        };
        for (opt, op) in [
            (libc::XDP_UMEM_FILL_RING, "setting the fill ring size"),
            (
                libc::XDP_UMEM_COMPLETION_RING,
                "setting the completion ring size",
            ),
            (libc::XDP_RX_RING, "setting the rx ring size"),
            (libc::XDP_TX_RING, "setting the tx ring size"),
        ] {
            sys::setsockopt(fd.as_fd(), libc::SOL_XDP, opt, &ring_size).map_err(sock_err(op))?;
        }
        let (off, _) = sys::getsockopt::<libc::xdp_mmap_offsets>(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
        )
        .map_err(sock_err("reading the ring offsets (XDP_MMAP_OFFSETS)"))?;
        let fill = Ring::<u64>::map(
            fd.as_fd(),
            libc::XDP_UMEM_PGOFF_FILL_RING,
            ring_size,
            off.fr.into(),
        )
        .map_err(sock_err("mapping the fill ring"))?;
        let comp = Ring::<u64>::map(
            fd.as_fd(),
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
            ring_size,
            off.cr.into(),
        )
        .map_err(sock_err("mapping the completion ring"))?;
        let rx = Ring::<libc::xdp_desc>::map(
            fd.as_fd(),
            libc::XDP_PGOFF_RX_RING as u64,
            ring_size,
            RingOffsets::from(off.rx),
        )
        .map_err(sock_err("mapping the rx ring"))?;
        let tx = Ring::<libc::xdp_desc>::map(
            fd.as_fd(),
            libc::XDP_PGOFF_TX_RING as u64,
            ring_size,
            RingOffsets::from(off.tx),
        )
        .map_err(sock_err("mapping the tx ring"))?;
        // A socket sharing the UMEM takes its mode from the first one and
        // may name no mode flags of its own (EINVAL).
        let (flags, shared_fd) = if first {
            let sg = if multi_buffer { libc::XDP_USE_SG } else { 0 };
            (libc::XDP_USE_NEED_WAKEUP | libc::XDP_COPY | sg, 0)
        } else {
            (libc::XDP_SHARED_UMEM, umem.owner.as_raw_fd() as u32)
        };
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue_id,
            sxdp_shared_umem_fd: shared_fd,
        };
        // SAFETY: addr is a valid sockaddr_xdp of the given length.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_xdp).cast(),
                std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        sys::cvt(ret).map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => Error::QueueBusy {
                ifname: format!("ifindex {ifindex}"),
                queue: queue_id,
            },
            _ => Error::Socket {
                op: "binding a socket on a shared UMEM",
                queue: queue_id,
                source,
            },
        })?;
        if first {
            umem.owner_bound = true;
        }
        Ok(SharedUmemQueue {
            queue_id,
            fill,
            comp,
            rx,
            tx,
            fd,
        })
    }

    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// The socket, for the XSKMAP and for polling.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Gives the kernel the chunks at `addrs` to receive into; returns how
    /// many fit in the fill ring (the rest are not posted).
    pub fn post_fill(&mut self, addrs: &[u64]) -> usize {
        let want = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
        let n = self.fill.prod_free(want).min(want);
        for (i, &addr) in addrs.iter().take(n as usize).enumerate() {
            self.fill.prod_write(i as u32, addr);
        }
        self.fill.prod_submit(n);
        if n > 0 && self.fill.needs_wakeup() {
            let _ = sys::wake_rx(self.fd.as_raw_fd());
        }
        n as usize
    }

    /// Takes up to `out.len()` received descriptors; returns how many.
    pub fn receive(&mut self, out: &mut [RxDesc]) -> usize {
        let n = self
            .rx
            .cons_available(u32::try_from(out.len()).unwrap_or(u32::MAX));
        for (i, slot) in out.iter_mut().take(n as usize).enumerate() {
            let d = self.rx.cons_read(i as u32);
            // Unaligned mode: the chunk in the low 48 bits, the offset of
            // the data in it above them.
            *slot = RxDesc {
                chunk: d.addr & libc::XSK_UNALIGNED_BUF_ADDR_MASK,
                offset: d.addr >> libc::XSK_UNALIGNED_BUF_OFFSET_SHIFT,
                len: d.len,
                more: d.options & libc::XDP_PKT_CONTD != 0,
            };
        }
        self.rx.cons_release(n);
        n as usize
    }

    /// Queues `descs` for transmission (as many as fit in the tx ring) and
    /// wakes the kernel; returns how many were queued. Each comes back
    /// through [`SharedUmemQueue::completions`] once the kernel is done
    /// with its bytes, in the order queued; match completions to buffers
    /// by that order: Linux 6.18's copy mode returns an odd address with
    /// bit 0 clear.
    pub fn transmit(&mut self, descs: &[TxDesc]) -> usize {
        let want = u32::try_from(descs.len()).unwrap_or(u32::MAX);
        let n = self.tx.prod_free(want).min(want);
        for (i, d) in descs.iter().take(n as usize).enumerate() {
            self.tx.prod_write(
                i as u32,
                libc::xdp_desc {
                    addr: d.addr,
                    len: d.len,
                    options: if d.more { libc::XDP_PKT_CONTD } else { 0 }
                        | if d.metadata { libc::XDP_TX_METADATA } else { 0 },
                },
            );
        }
        self.tx.prod_submit(n);
        if self.tx.needs_wakeup() {
            // Busy or not, what is left goes with the next kick.
            let _ = sys::kick_tx(self.fd.as_raw_fd());
        }
        n as usize
    }

    /// Wakes the kernel for what is still in the tx ring.
    pub fn kick_tx(&mut self) {
        if self.tx.needs_wakeup() {
            let _ = sys::kick_tx(self.fd.as_raw_fd());
        }
    }

    /// Takes up to `out.len()` completed transmit addresses; returns how
    /// many.
    pub fn completions(&mut self, out: &mut [u64]) -> usize {
        let n = self
            .comp
            .cons_available(u32::try_from(out.len()).unwrap_or(u32::MAX));
        for (i, slot) in out.iter_mut().take(n as usize).enumerate() {
            *slot = self.comp.cons_read(i as u32);
        }
        self.comp.cons_release(n);
        n as usize
    }

    /// The kernel's counters for this socket (`XDP_STATISTICS`).
    pub fn statistics(&self) -> io::Result<XdpStatistics> {
        crate::queue::xdp_statistics(self.fd.as_raw_fd())
    }
}
