//! One AF_XDP socket bound to one device queue, with its own UMEM and
//! rings: the object a virtio-net IO thread owns and drives.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::{TxChecksum, UmemConfig};
use crate::error::{Error, Result, PRIVILEGE_HINT};
use crate::gather::{Entry, GatherLimits, GatherPieces, GatherRequest, InFlight};
use crate::ring::{Ring, RingOffsets};
use crate::shared_umem::{tx_checksum_request, TX_METADATA_LEN};
use crate::sys;
use crate::umem::{FrameAccounting, FrameLedger, UmemArea, UmemRegion};

/// Counters of one queue, updated once per batch by the queue's thread and
/// readable from any thread (relaxed atomics: each is exact on its own,
/// a set read together is not a snapshot of one instant).
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Frames handed to the `rx_batch` callback and taken by it.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// `rx_batch` calls that found at least one frame.
    pub rx_batches: AtomicU64,
    /// `recvfrom` wake-ups of the driver after refilling (need-wakeup).
    pub rx_wakeups: AtomicU64,
    /// rx descriptors pointing at frames the kernel did not own or outside
    /// the frame; skipped (should stay 0).
    pub rx_bad_descs: AtomicU64,
    /// Multi-buffer packets longer than the queue takes: dropped.
    pub rx_too_long: AtomicU64,
    /// Frames put in the tx ring.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// `tx_batch` calls that queued at least one frame.
    pub tx_batches: AtomicU64,
    /// `sendto` kicks.
    pub tx_kicks: AtomicU64,
    /// Kicks where the kernel stopped early (EAGAIN/EBUSY/ENOBUFS: device
    /// queue busy, peer full); frames stay queued for the next kick.
    pub tx_kick_busy: AtomicU64,
    /// Kicks that failed otherwise (e.g. ENETDOWN: interface down).
    pub tx_kick_errors: AtomicU64,
    /// Transmit frames the kernel has completed.
    pub tx_completions: AtomicU64,
    /// Frames the fill callback returned with length 0 or longer than the
    /// buffer: not sent.
    pub tx_invalid_len: AtomicU64,
    /// Completion ring entries that were not frames in flight (should
    /// stay 0).
    pub tx_bad_completions: AtomicU64,
    /// `tx_batch` calls that stopped because no transmit frame was free.
    pub tx_out_of_room: AtomicU64,
    /// Gathered frames made to read no guest memory while still in the tx
    /// ring ([`XskQueue::disarm_unsent_gathers`]).
    pub tx_gather_disarmed: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    if n != 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The kernel's per-socket drop counters (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XdpStatistics {
    /// Received frames dropped for other reasons (e.g. no fill ring
    /// entry in copy mode, frame longer than the UMEM frame).
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Received frames dropped because the rx ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    /// Times the kernel found the tx ring empty when woken.
    pub tx_ring_empty_descs: u64,
}

impl From<libc::xdp_statistics> for XdpStatistics {
    fn from(s: libc::xdp_statistics) -> Self {
        XdpStatistics {
            rx_dropped: s.rx_dropped,
            rx_invalid_descs: s.rx_invalid_descs,
            tx_invalid_descs: s.tx_invalid_descs,
            rx_ring_full: s.rx_ring_full,
            rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs,
            tx_ring_empty_descs: s.tx_ring_empty_descs,
        }
    }
}

/// Plain copy of [`QueueCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_batches: u64,
    pub rx_wakeups: u64,
    pub rx_bad_descs: u64,
    pub rx_too_long: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_batches: u64,
    pub tx_kicks: u64,
    pub tx_kick_busy: u64,
    pub tx_kick_errors: u64,
    pub tx_completions: u64,
    pub tx_invalid_len: u64,
    pub tx_bad_completions: u64,
    pub tx_out_of_room: u64,
    pub tx_gather_disarmed: u64,
}

impl QueueCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            rx_batches: r(&self.rx_batches),
            rx_wakeups: r(&self.rx_wakeups),
            rx_bad_descs: r(&self.rx_bad_descs),
            rx_too_long: r(&self.rx_too_long),
            tx_packets: r(&self.tx_packets),
            tx_bytes: r(&self.tx_bytes),
            tx_batches: r(&self.tx_batches),
            tx_kicks: r(&self.tx_kicks),
            tx_kick_busy: r(&self.tx_kick_busy),
            tx_kick_errors: r(&self.tx_kick_errors),
            tx_completions: r(&self.tx_completions),
            tx_invalid_len: r(&self.tx_invalid_len),
            tx_bad_completions: r(&self.tx_bad_completions),
            tx_out_of_room: r(&self.tx_out_of_room),
            tx_gather_disarmed: r(&self.tx_gather_disarmed),
        }
    }
}

/// Our counters plus the kernel's drop counters for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub queue_id: u32,
    pub counters: CounterSnapshot,
    /// None once the queue is gone (or if the getsockopt failed).
    pub kernel: Option<XdpStatistics>,
}

/// A cloneable, `Send + Sync` view of one queue's statistics for another
/// thread (metrics, monitor). Holds no reference that keeps the socket
/// open: once the queue is dropped, `kernel` reads as None.
#[derive(Debug, Clone)]
pub struct QueueStatsHandle {
    queue_id: u32,
    counters: Arc<QueueCounters>,
    fd: Weak<OwnedFd>,
}

impl QueueStatsHandle {
    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    pub fn snapshot(&self) -> QueueStats {
        QueueStats {
            queue_id: self.queue_id,
            counters: self.counters.snapshot(),
            kernel: self
                .fd
                .upgrade()
                .and_then(|fd| xdp_statistics(fd.as_raw_fd()).ok()),
        }
    }
}

pub(crate) fn xdp_statistics(fd: RawFd) -> io::Result<XdpStatistics> {
    sys::getsockopt::<libc::xdp_statistics>(fd, libc::SOL_XDP, libc::XDP_STATISTICS)
        .map(|(s, _)| s.into())
}

/// What [`XskQueue::tx_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxBatch {
    /// Frames queued for transmission.
    pub sent: usize,
    /// It stopped because no transmit frame was free while the callback
    /// might have had more: wait for completions (the frames in flight
    /// come back via [`XskQueue::reclaim`], which `tx_batch` calls itself).
    pub out_of_room: bool,
    /// The kernel stopped before the tx ring was empty (device queue busy,
    /// peer full, link down): call [`XskQueue::kick_tx`] again later (on
    /// POLLOUT, which in copy mode itself drives transmission, or on the
    /// next batch).
    pub kick_pending: bool,
}

/// Readiness from [`XskQueue::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Frames wait in the rx ring.
    pub readable: bool,
    /// The tx ring is at most half full.
    pub writable: bool,
    /// POLLERR/POLLHUP: e.g. the interface went away.
    pub error: bool,
}

/// What setting up one socket needs.
pub(crate) struct QueueSetup<'a> {
    pub ifname: &'a str,
    pub ifindex: u32,
    pub queue_id: u32,
    pub umem: UmemConfig,
    /// XDP_COPY, or 0 to let the kernel try zero-copy first.
    pub copy_flag: u16,
    /// For the memlock error message.
    pub total_queues: u32,
    /// The socket came from sock-fds (changes the EBUSY messages).
    pub adopted: bool,
    /// The longest frame this queue must carry each way (the interface's
    /// MTU plus link headers). Above what one UMEM frame holds, the socket
    /// binds with `XDP_USE_SG` (multi-buffer) where the kernel allows it.
    pub max_frame: u32,
    /// The longest frame the socket may receive (at least `max_frame`):
    /// more in skb mode, where generic XDP hands over whole GSO and GRO
    /// packets (up to 64 KiB) rather than wire frames.
    pub max_rx_frame: u32,
    /// Who fills checksums left open on transmit.
    pub tx_checksum: TxChecksum,
    /// `umem=guest`: the queue's frames are a window of this region,
    /// which the NIC's sockets share as one UMEM.
    pub guest: Option<GuestUmemSetup<'a>>,
    /// The fill ring stays empty until the first receive (see
    /// [`crate::AfXdpNic::reopen_on`]).
    pub defer_fill: bool,
}

/// Where a queue of a `umem=guest` NIC finds its frames and its UMEM.
pub(crate) struct GuestUmemSetup<'a> {
    pub region: UmemRegion,
    /// The queue's window (its frames) starts here in the region.
    pub window: u64,
    /// Unset for the first queue, which registers the region; the others
    /// bind to its socket (`XDP_SHARED_UMEM`) and take its mode.
    pub share: Option<SharedWith<'a>>,
}

/// The first queue of a `umem=guest` NIC, as the others need it.
pub(crate) struct SharedWith<'a> {
    pub fd: BorrowedFd<'a>,
    pub multi_buffer: bool,
    /// Bound with `XDP_USE_SG` (sharing sockets take the first one's mode).
    pub sg: bool,
    pub tx_metadata: bool,
}

/// Where a transmit frame starts in its buffer when TX metadata is on:
/// the metadata right in front of it, inside the same UMEM frame.
const TX_DATA_OFFSET: usize = 32;

/// What a transmit callback wrote: its length, and whether the kernel
/// should fill a TCP/UDP checksum (CHECKSUM_PARTIAL: the sum from
/// `csum_start` to the end stored at `csum_start + csum_offset`, the field
/// holding the pseudo-header sum). A plain length converts into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRequest {
    pub len: usize,
    /// `(csum_start, csum_offset)`; only on a queue with
    /// [`XskQueue::tx_checksum`], else the frame is dropped as invalid.
    pub csum: Option<(u16, u16)>,
}

impl From<usize> for TxRequest {
    fn from(len: usize) -> Self {
        TxRequest { len, csum: None }
    }
}

/// Descriptors one packet may use: copy mode takes at most
/// `MAX_SKB_FRAGS + 1` (18 with the default 17 frags) per transmitted
/// packet; 16 keeps to a power of two below that on every kernel.
pub const MAX_DESCS_PER_FRAME: u32 = 16;

/// One AF_XDP socket, bound to `(ifindex, queue_id)`, with its own UMEM
/// and four rings. `Send`, not `Sync`: move it to the thread that serves
/// the queue pair.
///
/// No method allocates; batches are bounded by the caller's `max`.
pub struct XskQueue {
    queue_id: u32,
    frame_size: u32,
    zero_copy: bool,
    /// Frames longer than one UMEM frame span several descriptors (the
    /// MTU needs it; the socket is bound with `XDP_USE_SG`).
    multi_buffer: bool,
    /// Bound with `XDP_USE_SG` (for the MTU, or with `umem=guest` for
    /// frames gathered from several guest buffers).
    sg: bool,
    /// Where the queue's frames start in the registered UMEM: 0 for a UMEM
    /// of its own, its window's offset with `umem=guest`. The ledger and
    /// `umem` count from the window; the rings from the UMEM's start.
    umem_base: u64,
    /// Unaligned chunk mode (`umem=guest`): received descriptors carry the
    /// data's offset in their top 16 bits.
    unaligned: bool,
    /// `umem=guest`: every descriptor handed to the kernel, for matching
    /// completions by order ([`XskQueue::tx_gather`] sends from guest
    /// memory, which cannot be matched by address).
    in_flight: Option<InFlight>,
    /// `umem=guest`: guest memory is `[0, guest_len)` of the UMEM, the only
    /// part [`XskQueue::tx_gather`] pieces may point into.
    guest_len: u64,
    /// The pieces a `tx_gather` callback fills (kept to reuse).
    pieces: GatherPieces,
    /// The UMEM has TX metadata room: the kernel fills checksums asked for.
    tx_metadata: bool,
    /// Where a received packet of several descriptors is put together
    /// (allocated once; empty without multi-buffer).
    rx_gather: Vec<u8>,
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    ledger: FrameLedger,
    kick_pending: bool,
    counters: Arc<QueueCounters>,
    // Dropped after the rings (which are its mappings) and before the
    // UMEM it registered.
    fd: Arc<OwnedFd>,
    umem: UmemArea,
}

impl std::fmt::Debug for XskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskQueue")
            .field("queue_id", &self.queue_id)
            .field("fd", &self.fd.as_raw_fd())
            .field("zero_copy", &self.zero_copy)
            .field("frame_size", &self.frame_size)
            .field("multi_buffer", &self.multi_buffer)
            .finish_non_exhaustive()
    }
}

impl XskQueue {
    /// Registers a UMEM on `fd`, creates and maps the rings, fills the
    /// fill ring and binds to the queue with need-wakeup.
    pub(crate) fn setup(fd: OwnedFd, s: &QueueSetup<'_>) -> Result<XskQueue> {
        let q = s.queue_id;
        let sock_err = |op: &'static str| {
            move |source: io::Error| Error::Socket {
                op,
                queue: q,
                source,
            }
        };
        let adopted_busy = |what: &str| Error::BadSockFd {
            fd: fd.as_raw_fd(),
            reason: format!(
                "already has {what} (it was set up or bound by someone else); sock-fds sockets \
                 must be fresh: created and put in the XSKMAP, nothing more"
            ),
        };

        let umem_len = s.umem.bytes() as usize;
        let umem = match &s.guest {
            Some(g) => UmemArea::window(&g.region, g.window as usize, umem_len),
            None => UmemArea::new(umem_len).map_err(|source| Error::Io {
                op: "mapping the UMEM",
                source,
            })?,
        };
        // What is registered: the queue's own area, or the whole region
        // (guest RAM and every queue's window) in unaligned chunk mode, so
        // that buffers may later start anywhere in guest memory.
        let (reg_addr, reg_len, reg_flags) = match &s.guest {
            Some(g) => (
                g.region.addr(),
                g.region.len() as u64,
                libc::XDP_UMEM_UNALIGNED_CHUNK_FLAG,
            ),
            None => (umem.addr(), umem.len() as u64, 0),
        };
        let register = |flags: u32, tx_metadata_len: u32| {
            let reg = libc::xdp_umem_reg {
                addr: reg_addr,
                len: reg_len,
                chunk_size: s.umem.frame_size,
                headroom: 0,
                flags: flags | reg_flags,
                tx_metadata_len,
            };
            sys::setsockopt(fd.as_fd(), libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)
        };
        let share = s.guest.as_ref().and_then(|g| g.share.as_ref());
        // TX metadata (checksum requests) since Linux 6.8; 6.11 and later
        // ignore its length without XDP_UMEM_TX_METADATA_LEN. Older kernels
        // would silently ignore the length and then refuse every
        // descriptor asking for metadata: go by the version.
        let version = sys::kernel_version().unwrap_or((0, 0));
        let mut tx_metadata = match share {
            // The first queue's registration decided.
            Some(first) => first.tx_metadata,
            None => s.tx_checksum != TxChecksum::Caller && version >= (6, 8),
        };
        let mut result = Ok(());
        if share.is_some() {
            // Registered by the first queue.
        } else if tx_metadata {
            let mut flags = 0;
            if version >= (6, 11) {
                flags |= libc::XDP_UMEM_TX_METADATA_LEN;
            }
            if s.tx_checksum == TxChecksum::KernelSoftware {
                flags |= libc::XDP_UMEM_TX_SW_CSUM;
            }
            result = register(flags, TX_METADATA_LEN);
            if let Err(e) = &result {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    log::debug!("af-xdp: queue {q}: UMEM with TX metadata refused ({e}); checksums stay with the caller");
                    tx_metadata = false;
                }
            }
        }
        if !tx_metadata && share.is_none() {
            result = register(0, 0);
        }
        if let Err(source) = result {
            return Err(match source.raw_os_error() {
                // xdp_umem_account_pages: over RLIMIT_MEMLOCK without CAP_IPC_LOCK.
                Some(libc::ENOBUFS) | Some(libc::ENOMEM) => Error::Memlock {
                    needed_kib: match &s.guest {
                        Some(g) => g.region.len() as u64 / 1024,
                        None => s.umem.bytes() * u64::from(s.total_queues) / 1024,
                    },
                    queues: s.total_queues,
                    limit_kib: sys::memlock_limit().map(|b| b / 1024),
                    guest_memory: s.guest.is_some(),
                },
                Some(libc::EBUSY) if s.adopted => adopted_busy("a UMEM"),
                Some(libc::EPERM) => Error::PermissionDenied {
                    action: "registering the UMEM",
                    hint: PRIVILEGE_HINT,
                    source,
                },
                _ => Error::Socket {
                    op: "registering the UMEM (XDP_UMEM_REG)",
                    queue: q,
                    source,
                },
            });
        }
        let rings = [
            (
                libc::XDP_UMEM_FILL_RING,
                s.umem.rx_frames,
                "setting the fill ring size",
            ),
            (
                libc::XDP_UMEM_COMPLETION_RING,
                s.umem.tx_frames,
                "setting the completion ring size",
            ),
            (
                libc::XDP_RX_RING,
                s.umem.rx_frames,
                "setting the rx ring size",
            ),
            (
                libc::XDP_TX_RING,
                s.umem.tx_frames,
                "setting the tx ring size",
            ),
        ];
        for (opt, size, op) in rings {
            if let Err(e) = sys::setsockopt(fd.as_fd(), libc::SOL_XDP, opt, &size) {
                return Err(match e.raw_os_error() {
                    Some(libc::EBUSY) | Some(libc::EINVAL) if s.adopted => adopted_busy("rings"),
                    _ => sock_err(op)(e),
                });
            }
        }
        // Copy mode sends at most this many frames per kick (default 32);
        // allow the whole ring so one kick flushes a batch. Linux < 6.17
        // lacks the option: then a big batch may need a second kick,
        // which tx_batch reports as kick_pending.
        if s.umem.tx_frames >= 32 {
            if let Err(e) = sys::setsockopt(
                fd.as_fd(),
                libc::SOL_XDP,
                sys::XDP_MAX_TX_SKB_BUDGET,
                &s.umem.tx_frames,
            ) {
                log::debug!("af-xdp: queue {q}: XDP_MAX_TX_SKB_BUDGET not set ({e}); copy mode sends 32 frames per kick");
            }
        }
        let (off, len) = sys::getsockopt::<libc::xdp_mmap_offsets>(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
        )
        .map_err(sock_err("reading the ring offsets (XDP_MMAP_OFFSETS)"))?;
        if len < std::mem::size_of::<libc::xdp_mmap_offsets>() {
            // Pre-5.4 kernels have no flags field, hence no need-wakeup.
            return Err(Error::Socket {
                op: "reading the ring offsets",
                queue: q,
                source: io::Error::other(
                    "kernel too old: no need-wakeup support (needs Linux 5.4+)",
                ),
            });
        }
        let fill = Ring::<u64>::map(
            fd.as_fd(),
            libc::XDP_UMEM_PGOFF_FILL_RING,
            s.umem.rx_frames,
            off.fr.into(),
        )
        .map_err(sock_err("mapping the fill ring"))?;
        let comp = Ring::<u64>::map(
            fd.as_fd(),
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
            s.umem.tx_frames,
            off.cr.into(),
        )
        .map_err(sock_err("mapping the completion ring"))?;
        let rx = Ring::<libc::xdp_desc>::map(
            fd.as_fd(),
            libc::XDP_PGOFF_RX_RING as u64,
            s.umem.rx_frames,
            RingOffsets::from(off.rx),
        )
        .map_err(sock_err("mapping the rx ring"))?;
        let tx = Ring::<libc::xdp_desc>::map(
            fd.as_fd(),
            libc::XDP_PGOFF_TX_RING as u64,
            s.umem.tx_frames,
            RingOffsets::from(off.tx),
        )
        .map_err(sock_err("mapping the tx ring"))?;

        // A frame longer than one UMEM frame takes several descriptors:
        // transmit slots of that many consecutive frames (a power of two,
        // so slots tile the pool) hold one frame each, contiguously.
        let want_sg = s.max_frame.max(s.max_rx_frame) > s.umem.max_rx_frame();
        let slot_frames = if s.max_frame > s.umem.max_rx_frame() {
            // Each frame may lose TX_DATA_OFFSET to TX metadata.
            s.max_frame
                .div_ceil(s.umem.frame_size - TX_DATA_OFFSET as u32)
                .next_power_of_two()
                .min(MAX_DESCS_PER_FRAME)
                .min(s.umem.tx_frames / 2)
        } else {
            1
        };
        let want_sg = share.map_or(want_sg, |first| first.multi_buffer);
        let slot_frames = if want_sg { slot_frames } else { 1 };
        // umem=guest binds XDP_USE_SG whatever the MTU: a frame sent from
        // guest memory takes one descriptor per guest buffer.
        let bind_sg = share.map_or(want_sg || s.guest.is_some(), |first| first.sg);
        let mut queue = XskQueue {
            queue_id: q,
            frame_size: s.umem.frame_size,
            zero_copy: false,
            multi_buffer: want_sg,
            sg: bind_sg,
            umem_base: s.guest.as_ref().map_or(0, |g| g.window),
            unaligned: s.guest.is_some(),
            // Everything between the tx ring and the completion ring: both
            // as large as the transmit pool.
            in_flight: s
                .guest
                .as_ref()
                .map(|_| InFlight::new(2 * s.umem.tx_frames as usize)),
            guest_len: s.guest.as_ref().map_or(0, |g| g.region.guest_len() as u64),
            pieces: GatherPieces::default(),
            tx_metadata,
            rx_gather: Vec::new(),
            fill,
            comp,
            rx,
            tx,
            ledger: FrameLedger::new(
                s.umem.frame_size,
                s.umem.rx_frames,
                s.umem.tx_frames,
                slot_frames,
            ),
            kick_pending: false,
            counters: Arc::new(QueueCounters::default()),
            fd: Arc::new(fd),
            umem,
        };
        // The whole receive pool goes to the kernel before bind, so no
        // frame arriving right after bind finds the fill ring empty; or,
        // deferred, at the first receive.
        if !s.defer_fill {
            queue.refill();
        }

        let bind = |flags: u16| {
            // A socket sharing the UMEM takes its mode (copy, need-wakeup,
            // multi-buffer) from the first and may name none (EINVAL).
            let (flags, shared_fd) = match share {
                Some(first) => (libc::XDP_SHARED_UMEM, first.fd.as_raw_fd() as u32),
                None => (libc::XDP_USE_NEED_WAKEUP | s.copy_flag | flags, 0),
            };
            let addr = libc::sockaddr_xdp {
                sxdp_family: libc::AF_XDP as u16,
                sxdp_flags: flags,
                sxdp_ifindex: s.ifindex,
                sxdp_queue_id: q,
                sxdp_shared_umem_fd: shared_fd,
            };
            // SAFETY: addr is a valid sockaddr_xdp of the given length.
            let ret = unsafe {
                libc::bind(
                    queue.fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_xdp).cast(),
                    std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if ret < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let mut bound = bind(if bind_sg { libc::XDP_USE_SG } else { 0 });
        if bind_sg && share.is_none() {
            if let Err(e) = &bound {
                // Linux < 6.6 knows no XDP_USE_SG (EINVAL); a zero-copy
                // driver without multi-buffer refuses it (EOPNOTSUPP).
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) {
                    if want_sg {
                        log::warn!(
                            "af-xdp: {} queue {q}: no multi-buffer AF_XDP here (XDP_USE_SG: {e}; \
                             needs Linux 6.6+ and, for zero-copy, driver support): frames are \
                             limited to {} bytes",
                            s.ifname,
                            s.umem.max_rx_frame()
                        );
                    } else {
                        log::info!(
                            "af-xdp: {} queue {q}: no multi-buffer AF_XDP here (XDP_USE_SG: \
                             {e}): a frame sent from guest memory is one descriptor",
                            s.ifname
                        );
                    }
                    queue.multi_buffer = false;
                    queue.sg = false;
                    queue.ledger.set_tx_slot_frames(1);
                    bound = bind(0);
                }
            }
        }
        if let Err(source) = bound {
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => Error::QueueBusy {
                    ifname: s.ifname.to_string(),
                    queue: q,
                },
                Some(libc::ENODEV) => Error::NoSuchInterface {
                    ifname: s.ifname.to_string(),
                },
                _ => Error::Socket {
                    op: "binding the socket to the queue",
                    queue: q,
                    source,
                },
            });
        }
        queue.zero_copy = sys::getsockopt::<libc::xdp_options>(
            queue.fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_OPTIONS,
        )
        .map(|(o, _)| o.flags & libc::XDP_OPTIONS_ZEROCOPY != 0)
        .unwrap_or(false);
        if queue.multi_buffer {
            queue.rx_gather = vec![0; queue.max_frame().max(s.max_rx_frame) as usize];
        }
        Ok(queue)
    }

    /// Bound with `XDP_USE_SG`: frames longer than one UMEM frame are
    /// sent and received as several descriptors.
    pub fn is_multi_buffer(&self) -> bool {
        self.multi_buffer
    }

    /// Bound with `XDP_USE_SG`: [`XskQueue::tx_gather`] may send a frame as
    /// several descriptors.
    pub fn is_sg(&self) -> bool {
        self.sg
    }

    /// The kernel fills the transmit checksums a [`TxRequest`] asks for.
    pub fn tx_checksum(&self) -> bool {
        self.tx_metadata
    }

    /// How far into a frame a checksum request's field may end: the kernel
    /// reads it from the frame's first descriptor (one UMEM frame less the
    /// TX metadata in front) and fails the send without consuming the
    /// descriptor when it lies beyond.
    pub fn tx_checksum_reach(&self) -> usize {
        self.frame_size as usize - self.tx_data_offset()
    }

    /// Where a transmit frame starts in its slot.
    fn tx_data_offset(&self) -> usize {
        if self.tx_metadata {
            TX_DATA_OFFSET
        } else {
            0
        }
    }

    /// The longest frame this queue carries each way: one UMEM frame less
    /// the receive headroom, or with multi-buffer a transmit slot.
    pub fn max_frame(&self) -> u32 {
        if self.multi_buffer {
            self.tx_buffer_len() as u32
        } else {
            self.frame_size - crate::config::XDP_PACKET_HEADROOM
        }
    }

    /// The longest frame this queue receives whole (longer ones are
    /// dropped and counted in `rx_too_long`, or by the kernel).
    pub fn max_rx_frame(&self) -> u32 {
        if self.multi_buffer {
            self.rx_gather.len() as u32
        } else {
            self.frame_size - crate::config::XDP_PACKET_HEADROOM
        }
    }

    /// Length of the buffer `tx_batch` hands to its callback.
    pub fn tx_buffer_len(&self) -> usize {
        (self.frame_size as usize - self.tx_data_offset()) * self.ledger.tx_slot_frames() as usize
    }

    /// The device queue this socket is bound to.
    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// Whether the kernel runs this socket in zero-copy mode.
    pub fn is_zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// UMEM frame size.
    pub fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// The socket, for poll/epoll: readable when frames wait in the rx
    /// ring, writable when the tx ring is at most half full.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The shared counters (same object the stats handle reads).
    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    /// A handle for reading this queue's statistics from another thread.
    pub fn stats_handle(&self) -> QueueStatsHandle {
        QueueStatsHandle {
            queue_id: self.queue_id,
            counters: Arc::clone(&self.counters),
            fd: Arc::downgrade(&self.fd),
        }
    }

    /// Our counters and the kernel's drop counters.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            queue_id: self.queue_id,
            counters: self.counters.snapshot(),
            kernel: self.xdp_statistics().ok(),
        }
    }

    /// The kernel's drop counters (`XDP_STATISTICS`).
    pub fn xdp_statistics(&self) -> io::Result<XdpStatistics> {
        xdp_statistics(self.fd.as_raw_fd())
    }

    /// True when received frames wait in the rx ring.
    pub fn rx_ready(&self) -> bool {
        self.rx.cons_has_entries()
    }

    /// Offers up to `max` received frames, oldest first, to `deliver`, then
    /// gives the frames back to the fill ring in one go. `deliver` returns
    /// false when it cannot take a frame (e.g. no guest buffer): that frame
    /// and the ones after it stay queued for the next call. The slice is
    /// only valid during the call. Returns the number of frames taken.
    ///
    /// With multi-buffer, a frame of several descriptors is put together
    /// in a buffer of the queue's own first (one copy; the kernel never
    /// places the pieces next to each other).
    pub fn rx_batch<F>(&mut self, max: usize, mut deliver: F) -> usize
    where
        F: FnMut(&[u8]) -> bool,
    {
        let want = u32::try_from(max).unwrap_or(u32::MAX);
        // Multi-buffer: look at the whole ring, so a frame's last pieces
        // are never cut off by `max` (the kernel publishes whole frames).
        let avail = if self.multi_buffer {
            self.rx.cons_available(self.rx.size())
        } else {
            self.rx.cons_available(want)
        };
        let frame_size = u64::from(self.frame_size);
        let mut pos = 0u32;
        let mut taken = 0u32;
        let mut bad = 0u32;
        let mut too_long = 0u64;
        let mut bytes = 0u64;
        while pos < avail && taken < want {
            let desc = self.rx_desc(pos);
            if desc.options & libc::XDP_PKT_CONTD == 0 {
                let Some(base) = self.ledger.check_rx(desc.addr) else {
                    // Not a frame we gave the kernel: skip it, reuse nothing.
                    bad += 1;
                    pos += 1;
                    continue;
                };
                if desc.addr - base + u64::from(desc.len) > frame_size {
                    self.ledger.rx_done(base);
                    bad += 1;
                    pos += 1;
                    continue;
                }
                let frame = self.umem.slice(desc.addr, desc.len as usize);
                if !deliver(frame) {
                    break;
                }
                self.ledger.rx_done(base);
                pos += 1;
                taken += 1;
                bytes += u64::from(desc.len);
                continue;
            }
            // A frame in several pieces: find its end, check every piece.
            let mut end = pos;
            let mut len = 0usize;
            let mut valid = true;
            loop {
                if end == avail {
                    // Not published whole (the kernel does not do that):
                    // leave it for the next call.
                    break;
                }
                let d = self.rx_desc(end);
                end += 1;
                match self.ledger.check_rx(d.addr) {
                    Some(base) if d.addr - base + u64::from(d.len) <= frame_size => {}
                    _ => valid = false,
                }
                len += d.len as usize;
                if d.options & libc::XDP_PKT_CONTD == 0 {
                    break;
                }
            }
            let last = self.rx.cons_read(end - 1);
            if last.options & libc::XDP_PKT_CONTD != 0 {
                break;
            }
            if valid && len <= self.rx_gather.len() {
                let mut at = 0;
                for i in pos..end {
                    let d = self.rx_desc(i);
                    let piece = self.umem.slice(d.addr, d.len as usize);
                    self.rx_gather[at..at + piece.len()].copy_from_slice(piece);
                    at += piece.len();
                }
                if !deliver(&self.rx_gather[..len]) {
                    break;
                }
                taken += 1;
                bytes += len as u64;
            } else if valid {
                too_long += 1;
            } else {
                bad += end - pos;
            }
            for i in pos..end {
                if let Some(base) = self.ledger.check_rx(self.rx_desc(i).addr) {
                    self.ledger.rx_done(base);
                }
            }
            pos = end;
        }
        self.rx.cons_release(pos);
        self.refill();
        if taken > 0 {
            add(&self.counters.rx_packets, u64::from(taken));
            add(&self.counters.rx_bytes, bytes);
            add(&self.counters.rx_batches, 1);
        }
        add(&self.counters.rx_bad_descs, u64::from(bad));
        add(&self.counters.rx_too_long, too_long);
        taken as usize
    }

    /// The rx descriptor at `pos`, its address made an offset into the
    /// queue's own frames (one no frame of ours has fails the ledger's
    /// check: it wraps to far beyond the window).
    fn rx_desc(&self, pos: u32) -> libc::xdp_desc {
        let mut d = self.rx.cons_read(pos);
        if self.unaligned {
            // The fill address we gave, the data's offset above it on top.
            d.addr = (d.addr & libc::XSK_UNALIGNED_BUF_ADDR_MASK)
                + (d.addr >> libc::XSK_UNALIGNED_BUF_OFFSET_SHIFT);
        }
        d.addr = d.addr.wrapping_sub(self.umem_base);
        d
    }

    /// Puts consumed receive frames back in the fill ring (bulk) and wakes
    /// the driver if it asked for that.
    fn refill(&mut self) {
        let want = self.ledger.recycle_len() as u32;
        if want == 0 {
            return;
        }
        let n = want.min(self.fill.prod_free(want));
        for i in 0..n {
            if let Some(addr) = self.ledger.pop_recycle() {
                self.fill.prod_write(i, addr + self.umem_base);
            }
        }
        self.fill.prod_submit(n);
        if n > 0 && self.fill.needs_wakeup() {
            // Only zero-copy drivers set the flag: they stop polling an
            // empty fill ring and must be told it has entries again.
            let _ = sys::wake_rx(self.fd.as_raw_fd());
            add(&self.counters.rx_wakeups, 1);
        }
    }

    /// Lets `fill` write up to `max` frames into free transmit buffers
    /// (each [`XskQueue::tx_buffer_len`] bytes; return `Some(len)` to send
    /// the first `len` bytes, `None` when there is nothing more to send),
    /// then submits them with at most one kick. A length of 0 or beyond the
    /// buffer drops that frame (counted in `tx_invalid_len`). Reclaims
    /// completions itself when short of frames. With multi-buffer, a frame
    /// longer than one UMEM frame goes out as several descriptors.
    pub fn tx_batch<F, R>(&mut self, max: usize, mut fill: F) -> TxBatch
    where
        F: FnMut(&mut [u8]) -> Option<R>,
        R: Into<TxRequest>,
    {
        if max == 0 {
            return TxBatch {
                kick_pending: self.kick_pending,
                ..TxBatch::default()
            };
        }
        let want = u32::try_from(max).unwrap_or(u32::MAX);
        if (self.ledger.free_slots() as u32) < want {
            self.reclaim();
        }
        let free = self.ledger.free_slots() as u32;
        let slot_frames = self.ledger.tx_slot_frames();
        // The tx ring is as large as the transmit pool, so it has a slot
        // for every descriptor of every free buffer; min() only guards the
        // invariant.
        let room = want
            .min(free)
            .min(self.tx.prod_free(want.min(free) * slot_frames) / slot_frames);
        let frame_size = self.frame_size as usize;
        let data_offset = self.tx_data_offset();
        // With TX metadata the kernel wants its room in front of every
        // descriptor, not only the first: each UMEM frame carries
        // `per_frame` bytes from `data_offset` on.
        let per_frame = frame_size - data_offset;
        let buffer_len = per_frame * slot_frames as usize;
        let mut sent = 0u32;
        let mut descs = 0u32;
        let mut calls = 0u32;
        let mut invalid = 0u64;
        let mut bytes = 0u64;
        let mut caller_done = false;
        while calls < room {
            let Some(addr) = self.ledger.peek_free() else {
                break;
            };
            // On a shared UMEM every descriptor is recorded for the
            // completions; checked before the callback takes its frame.
            if self
                .in_flight
                .as_ref()
                .is_some_and(|f| !f.room(slot_frames as usize))
            {
                self.reclaim();
                if self
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| !f.room(slot_frames as usize))
                {
                    break;
                }
            }
            calls += 1;
            let filled = fill(self.umem.slice_mut(addr + data_offset as u64, buffer_len));
            let Some(request) = filled.map(Into::into) else {
                caller_done = true;
                break;
            };
            let TxRequest { len, csum } = request;
            // A checksum field beyond the first descriptor would fail the
            // send and stay at the ring's head, blocking every later frame.
            let csum_ok = csum.is_none_or(|(start, offset)| {
                self.tx_metadata
                    && usize::from(start) + usize::from(offset) + 2 <= per_frame.min(len)
            });
            if len == 0 || len > buffer_len || !csum_ok {
                invalid += 1;
                continue;
            }
            let mut options = 0;
            if let Some((csum_start, csum_offset)) = csum {
                // struct xsk_tx_metadata right in front of the frame.
                let meta = tx_checksum_request(csum_start, csum_offset);
                let at = addr + (data_offset as u64 - u64::from(TX_METADATA_LEN));
                self.umem.slice_mut(at, meta.len()).copy_from_slice(&meta);
                options = libc::XDP_TX_METADATA;
            }
            // One descriptor per UMEM frame the data touches.
            let pieces = len.div_ceil(per_frame) as u32;
            if data_offset > 0 && pieces > 1 {
                // The callback wrote one contiguous frame; open a gap of
                // `data_offset` in front of each later piece (last first).
                let slot = self.umem.slice_mut(addr, frame_size * slot_frames as usize);
                for i in (1..pieces as usize).rev() {
                    let from = data_offset + i * per_frame;
                    let to = (from + per_frame).min(data_offset + len);
                    slot.copy_within(from..to, i * frame_size + data_offset);
                }
            }
            self.ledger.pop_free(pieces);
            for i in 0..pieces {
                let from = i as usize * frame_size + data_offset;
                let to = from + per_frame.min(len - i as usize * per_frame);
                let mut piece_options = if i + 1 < pieces {
                    libc::XDP_PKT_CONTD
                } else {
                    0
                };
                if i == 0 {
                    piece_options |= options;
                }
                self.tx.prod_write(
                    descs,
                    libc::xdp_desc {
                        addr: self.umem_base + addr + from as u64,
                        len: (to - from) as u32,
                        options: piece_options,
                    },
                );
                if let Some(in_flight) = self.in_flight.as_mut() {
                    in_flight.push(Entry::Own);
                }
                descs += 1;
            }
            sent += 1;
            bytes += len as u64;
        }
        self.tx.prod_submit(descs);
        let out_of_room = !caller_done && calls == room && room < want;
        self.end_tx_batch(sent, bytes, invalid, out_of_room)
    }

    /// After a batch went into the tx ring: one kick, the counters, what
    /// the caller needs to know.
    fn end_tx_batch(&mut self, sent: u32, bytes: u64, invalid: u64, out_of_room: bool) -> TxBatch {
        if sent > 0 || self.kick_pending {
            self.kick();
        }
        if out_of_room {
            // Copy mode completes most frames inside the kick; collect
            // them now so the caller's retry finds room.
            self.reclaim();
            add(&self.counters.tx_out_of_room, 1);
        }
        if sent > 0 {
            add(&self.counters.tx_packets, u64::from(sent));
            add(&self.counters.tx_bytes, bytes);
            add(&self.counters.tx_batches, 1);
        }
        add(&self.counters.tx_invalid_len, invalid);
        TxBatch {
            sent: sent as usize,
            out_of_room,
            kick_pending: self.kick_pending,
        }
    }

    /// `umem=guest`: sends up to `max` frames whose bytes lie (mostly) in
    /// guest memory. `fill` gets a head buffer of the queue's own (one UMEM
    /// frame, for headers the caller rewrites, with room for a checksum
    /// request in front) and an empty [`GatherPieces`] to push the frame's
    /// guest-memory pieces into (offsets in the shared UMEM, each at most
    /// one UMEM frame long, less the TX metadata's 24 bytes where the queue
    /// has them, which must also lie in front of every piece); it returns
    /// a [`GatherRequest`], or None when
    /// it has nothing more. The frame goes out as the head (if any)
    /// followed by the pieces, several descriptors only with multi-buffer.
    /// A request that breaks those rules (a piece outside guest memory,
    /// empty or too long, too many descriptors, a checksum without a head)
    /// is not sent and counted in `tx_invalid_len`; its token still comes
    /// back, in order. A request with neither head nor pieces carries
    /// only its token (no error). Tokens come back through
    /// [`XskQueue::take_completed`]. Guest memory is only read. On a queue
    /// without a shared UMEM nothing is sent and `fill` is not called.
    pub fn tx_gather<F>(&mut self, max: usize, mut fill: F) -> TxBatch
    where
        F: FnMut(&mut [u8], &mut GatherPieces) -> Option<GatherRequest>,
    {
        if max == 0 || self.in_flight.is_none() {
            return TxBatch {
                kick_pending: self.kick_pending,
                ..TxBatch::default()
            };
        }
        let want = u32::try_from(max).unwrap_or(u32::MAX);
        if (self.ledger.free_slots() as u32) < want {
            self.reclaim();
        }
        let data_offset = self.tx_data_offset();
        let head_room = self.frame_size as usize - data_offset;
        let max_descs = if self.sg { MAX_DESCS_PER_FRAME } else { 1 };
        let mut pieces = std::mem::take(&mut self.pieces);
        let mut sent = 0u32;
        let mut descs = 0u32;
        let mut calls = 0u32;
        let mut invalid = 0u64;
        let mut bytes = 0u64;
        let mut caller_done = false;
        let mut out_of_room = false;
        // Room for the largest frame: a head, its pieces and a token.
        let worst = max_descs + 1;
        let room = |q: &mut XskQueue, descs: u32| {
            q.ledger.peek_free().is_some()
                && q.tx.prod_free(descs + worst) >= descs + worst
                && q.in_flight
                    .as_ref()
                    .is_some_and(|f| f.room(worst as usize + 1))
        };
        // Pieces are checked exactly as the kernel checks them.
        let limits = self.gather_limits();
        while calls < want {
            if !room(self, descs) {
                self.reclaim();
                if !room(self, descs) {
                    out_of_room = true;
                    break;
                }
            }
            let Some(addr) = self.ledger.peek_free() else {
                break;
            };
            calls += 1;
            pieces.clear();
            let head = self.umem.slice_mut(addr + data_offset as u64, head_room);
            let Some(request) = fill(head, &mut pieces) else {
                caller_done = true;
                break;
            };
            let count = u32::from(request.head_len > 0) + pieces.len() as u32;
            let Some(in_flight) = self.in_flight.as_mut() else {
                break;
            };
            if count == 0 && request.csum.is_none() {
                // A token alone: the caller's chain ended without a frame
                // of its own here (its frames went out another way). No
                // error; the token comes back in its turn.
                if let Some(token) = request.token {
                    in_flight.push(Entry::Token(token));
                }
                continue;
            }
            let valid = (1..=max_descs).contains(&count)
                && request.head_len <= head_room
                && (request.csum.is_none() || (request.head_len > 0 && self.tx_metadata))
                && pieces
                    .as_slice()
                    .iter()
                    .all(|&(offset, len)| limits.piece_ok(offset, len));
            if !valid {
                invalid += 1;
                if let Some(token) = request.token {
                    in_flight.push(Entry::Token(token));
                }
                continue;
            }
            if request.head_len > 0 {
                let mut options = 0;
                if let Some((csum_start, csum_offset)) = request.csum {
                    let meta = tx_checksum_request(csum_start, csum_offset);
                    let at = addr + (data_offset as u64 - u64::from(TX_METADATA_LEN));
                    self.umem.slice_mut(at, meta.len()).copy_from_slice(&meta);
                    options = libc::XDP_TX_METADATA;
                }
                if !pieces.is_empty() {
                    options |= libc::XDP_PKT_CONTD;
                }
                self.ledger.pop_free(1);
                self.tx.prod_write(
                    descs,
                    libc::xdp_desc {
                        addr: self.umem_base + addr + data_offset as u64,
                        len: request.head_len as u32,
                        options,
                    },
                );
                in_flight.push(Entry::Own);
                descs += 1;
                bytes += request.head_len as u64;
            }
            let last = pieces.len();
            for (i, &(offset, len)) in pieces.as_slice().iter().enumerate() {
                self.tx.prod_write(
                    descs,
                    libc::xdp_desc {
                        addr: offset,
                        len,
                        options: if i + 1 < last { libc::XDP_PKT_CONTD } else { 0 },
                    },
                );
                in_flight.push(Entry::Guest);
                descs += 1;
                bytes += u64::from(len);
            }
            if let Some(token) = request.token {
                in_flight.push(Entry::Token(token));
            }
            sent += 1;
        }
        self.pieces = pieces;
        self.tx.prod_submit(descs);
        if let Some(in_flight) = self.in_flight.as_mut() {
            // Tokens of refused frames with nothing before them.
            in_flight.release_tokens();
        }
        self.end_tx_batch(sent, bytes, invalid, out_of_room && !caller_done)
    }

    /// `umem=guest`: makes the frames still waiting in the tx ring (not
    /// yet read by the kernel) read no guest memory. Called before their
    /// chains go back to the guest without their completions (link down:
    /// the kernel consumes nothing while the interface is down; a device
    /// reset): the kernel would otherwise read those buffers later, after
    /// the guest reused them, and send what it finds. Each such piece
    /// becomes one byte of the queue's own; a head the kernel has not read
    /// loses its checksum request and its EtherType (0x88b5, local
    /// experimental), so the frame goes out as junk no stack takes; a frame
    /// whose head the kernel already read ends shorter than its IP header
    /// says, which IP drops. Every descriptor stays, so completions still
    /// match by order. Copy mode only (a zero-copy driver reads the ring at
    /// any time; gathering is refused there). Returns the frames changed.
    pub fn disarm_unsent_gathers(&mut self) -> usize {
        if self.in_flight.is_none() || self.zero_copy {
            return 0;
        }
        let n = self.tx.prod_outstanding();
        let data_offset = self.tx_data_offset() as u64;
        let blank = self.umem_base + data_offset;
        let is_guest = |d: &libc::xdp_desc| d.addr < self.guest_len;
        let mut changed = 0;
        let mut start = 0u32;
        while start < n {
            // The frame's descriptors: up to the first without CONTD (the
            // first may continue a frame whose head the kernel has read).
            let mut end = start;
            while end + 1 < n
                && self.tx.prod_read_unconsumed(end).options & libc::XDP_PKT_CONTD != 0
            {
                end += 1;
            }
            let gathered = (start..=end).any(|i| is_guest(&self.tx.prod_read_unconsumed(i)));
            if gathered {
                for i in start..=end {
                    let mut d = self.tx.prod_read_unconsumed(i);
                    if is_guest(&d) {
                        d.addr = blank;
                        d.len = 1;
                    } else if let Some(at) = d.addr.checked_sub(self.umem_base) {
                        // A head (a gathered frame's only own descriptor).
                        d.options &= !libc::XDP_TX_METADATA;
                        if d.len >= 14 {
                            self.umem
                                .slice_mut(at + 12, 2)
                                .copy_from_slice(&[0x88, 0xb5]);
                        }
                    }
                    // SAFETY: copy mode (checked above): the kernel reads
                    // the tx ring only inside this queue's own kicks.
                    unsafe { self.tx.prod_rewrite_unconsumed(i, d) };
                }
                changed += 1;
            }
            start = end + 1;
        }
        add(&self.counters.tx_gather_disarmed, changed as u64);
        changed
    }

    /// `umem=guest`: what the pieces of guest memory in a
    /// [`XskQueue::tx_gather`] frame may be; None on a queue without a
    /// shared UMEM, or without multi-buffer (then a frame is one
    /// descriptor, and a head and a piece are two).
    pub fn gather_piece_limits(&self) -> Option<GatherLimits> {
        (self.in_flight.is_some() && self.sg).then(|| self.gather_limits())
    }

    fn gather_limits(&self) -> GatherLimits {
        // With TX metadata registered every descriptor has room for it in
        // front, metadata asked for or not.
        let metadata = if self.tx_metadata {
            u64::from(TX_METADATA_LEN)
        } else {
            0
        };
        let max_descs = if self.sg { MAX_DESCS_PER_FRAME } else { 1 };
        GatherLimits {
            min_offset: metadata,
            max_len: u64::from(self.frame_size) - metadata,
            guest_len: self.guest_len,
            max_pieces: max_descs as usize - 1,
        }
    }

    /// `umem=guest`: hands `f` the tokens of [`XskQueue::tx_gather`]
    /// frames the kernel is done with (collecting completions first),
    /// oldest first. Returns how many.
    pub fn take_completed(&mut self, f: &mut dyn FnMut(u64)) -> usize {
        self.reclaim();
        self.in_flight
            .as_mut()
            .map_or(0, |in_flight| in_flight.take_done(f))
    }

    /// `umem=guest`: descriptors (of the queue's own frames and of guest
    /// memory) handed to the kernel and not yet completed.
    pub fn tx_descs_in_flight(&self) -> usize {
        self.in_flight.as_ref().map_or(0, InFlight::descs)
    }

    /// Wakes the kernel to transmit what is in the tx ring, if it asked to
    /// be woken (always in copy mode). Returns whether frames are still
    /// waiting for another kick.
    pub fn kick_tx(&mut self) -> bool {
        self.kick();
        self.kick_pending
    }

    /// Whether the last kick left frames in the tx ring.
    pub fn tx_kick_pending(&self) -> bool {
        self.kick_pending
    }

    fn kick(&mut self) {
        if !self.tx.needs_wakeup() {
            self.kick_pending = false;
            return;
        }
        add(&self.counters.tx_kicks, 1);
        match sys::kick_tx(self.fd.as_raw_fd()) {
            Ok(()) => self.kick_pending = false,
            Err(e) => {
                let busy = matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ENOBUFS)
                );
                add(
                    if busy {
                        &self.counters.tx_kick_busy
                    } else {
                        &self.counters.tx_kick_errors
                    },
                    1,
                );
                self.kick_pending = self.tx.prod_outstanding() > 0;
            }
        }
    }

    /// Moves completed transmit frames back to the free stack. Returns how
    /// many came back.
    pub fn reclaim(&mut self) -> usize {
        let n = self.comp.cons_available(self.comp.size());
        let mut bad = 0u64;
        for i in 0..n {
            let addr = self.comp.cons_read(i).wrapping_sub(self.umem_base);
            // By order on a shared UMEM: the oldest descriptor is done.
            let own = match self.in_flight.as_mut().map(InFlight::complete_one) {
                None | Some(Some(Entry::Own)) => true,
                Some(Some(_)) => false,
                Some(None) => {
                    bad += 1;
                    continue;
                }
            };
            if own && !self.ledger.tx_completed(addr) {
                bad += 1;
            }
        }
        self.comp.cons_release(n);
        add(&self.counters.tx_completions, u64::from(n) - bad);
        add(&self.counters.tx_bad_completions, bad);
        n as usize
    }

    /// Transmit buffers (of [`XskQueue::tx_buffer_len`]) free right now
    /// (without reclaiming).
    pub fn tx_free(&self) -> usize {
        self.ledger.free_slots()
    }

    /// Transmit frames handed to the kernel and not yet reclaimed (whole
    /// buffers: with multi-buffer, a buffer counts until all its
    /// descriptors are back).
    pub fn tx_in_flight(&self) -> usize {
        self.ledger.tx_frames_out()
    }

    /// Waits up to `timeout` (None: forever) for the socket to become
    /// readable (`rx`) and/or writable (`tx`). In copy mode a poll with
    /// frames in the tx ring also transmits them.
    pub fn poll(&self, rx: bool, tx: bool, timeout: Option<Duration>) -> io::Result<Readiness> {
        let mut events = 0;
        if rx {
            events |= libc::POLLIN;
        }
        if tx {
            events |= libc::POLLOUT;
        }
        let ms = match timeout {
            None => -1,
            Some(t) => t.as_millis().min(i32::MAX as u128) as i32,
        };
        let revents = sys::poll_one(self.fd.as_raw_fd(), events, ms)?;
        Ok(Readiness {
            readable: revents & libc::POLLIN != 0,
            writable: revents & libc::POLLOUT != 0,
            error: revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0,
        })
    }

    /// Frame counts by owner; Err describes any inconsistency (a frame
    /// leaked or listed twice), which would be a bug.
    pub fn frame_accounting(&self) -> Result<FrameAccounting, String> {
        self.ledger.accounting()
    }
}

impl AsRawFd for XskQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for XskQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn queue_and_handles_cross_threads() {
        assert_send::<XskQueue>();
        assert_send::<QueueStatsHandle>();
        fn assert_sync<T: Sync>() {}
        assert_sync::<QueueStatsHandle>();
    }

    #[test]
    fn counters_snapshot_reads_every_field() {
        let c = QueueCounters::default();
        add(&c.rx_packets, 3);
        add(&c.tx_kick_busy, 2);
        add(&c.tx_out_of_room, 0);
        let s = c.snapshot();
        assert_eq!((s.rx_packets, s.tx_kick_busy, s.tx_out_of_room), (3, 2, 0));
    }
}
