//! AF_XDP backend for xskvm: moves Ethernet frames between xskvm and a
//! host interface through AF_XDP sockets. It knows nothing of virtio; the
//! virtio-net device copies between guest memory and the frames this
//! crate hands out.
//!
//! # Pieces
//!
//! - `bpf/xsk_redirect.bpf.c`, built with clang into a libbpf-rs skeleton
//!   at compile time: redirects a frame received on queue *i* to the
//!   socket in `xsks_map[i]`, passes everything else to the kernel.
//! - [`AfXdpConfig`]: the options, with QEMU `-netdev af-xdp` semantics
//!   (`ifname=IF[,queues=N][,start-queue=M][,mode=native|skb]
//!   [,force-copy=on][,inhibit=on][,sock-fds=a:b][,filter-fds=c:t:f][,map-path=PATH]
//!   [,map-start-index=N]`), parsed with
//!   [`AfXdpConfig::parse`] or [`AfXdpConfig::parse_allowing`] (which hands
//!   keys the caller owns, like `mac`, back instead of rejecting them).
//! - [`AfXdpNic::open`]: checks the interface and queue range, creates (or
//!   adopts, with `sock-fds`) one AF_XDP socket per queue, attaches the
//!   program with a BPF link (native first, skb as fallback, unless
//!   `inhibit=on`; another program already attached is never replaced),
//!   raises RLIMIT_MEMLOCK, registers one UMEM per queue, binds with
//!   need-wakeup and fills the XSKMAP. Any error leaves nothing attached.
//! - [`AfXdpNic::into_parts`] → [`NicOwner`] (holds the link; its drop —
//!   or the process dying, even by SIGKILL — detaches the program) and one
//!   [`XskQueue`] per queue, each `Send`, for one IO thread each.
//!
//! # Datapath (per queue, no allocation, no locks)
//!
//! ```no_run
//! # use net_afxdp::{AfXdpConfig, AfXdpNic};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config: AfXdpConfig = "ifname=veth0,queues=2".parse()?;
//! let (owner, queues) = AfXdpNic::open(&config)?.into_parts();
//! for mut q in queues {
//!     std::thread::spawn(move || loop {
//!         // Block until frames arrive (or use q.fd() with epoll).
//!         let _ = q.poll(true, false, None);
//!         // Up to 64 frames; the closure copies each into a guest buffer
//!         // and returns false when it has no buffer left (that frame and
//!         // the rest stay queued). Frames go back to the fill ring in bulk.
//!         q.rx_batch(64, |frame| { let _ = frame; true });
//!         // Copy up to 64 frames into free UMEM frames; one kick at most.
//!         let done = q.tx_batch(64, |buf| { buf[..60].fill(0); Some(60) });
//!         if done.kick_pending { q.kick_tx(); }
//!     });
//! }
//! # drop(owner); Ok(()) }
//! ```
//!
//! - [`XskQueue::fd`]: poll/epoll it; readable = frames in the rx ring,
//!   writable = tx ring at most half full (in copy mode a poll also
//!   drives pending transmissions).
//! - [`XskQueue::rx_batch`]: frames as `&[u8]` to a closure, recycled to
//!   the fill ring in bulk afterwards; the driver is woken only when it
//!   asked (need-wakeup).
//! - [`XskQueue::tx_batch`]: the closure writes into `&mut [u8]` (one UMEM
//!   frame, [`XskQueue::frame_size`] bytes) and returns the length; all
//!   frames are submitted together with at most one `sendto` kick. It
//!   reclaims completions itself when short of frames; [`TxBatch`] says
//!   whether it ran out of frames or the kernel left frames for another
//!   kick ([`XskQueue::kick_tx`]).
//! - [`XskQueue::reclaim`]: completion ring → free frames, in bulk.
//! - Counters: [`XskQueue::counters`] / [`XskQueue::stats_handle`] (for
//!   another thread) give packets, bytes, batches, kicks, wake-ups, and
//!   the kernel's drops by cause ([`XdpStatistics`]: rx_dropped,
//!   rx_ring_full, rx_fill_ring_empty_descs, invalid descriptors).
//!
//! # Frames and memory
//!
//! Each queue has its own UMEM: [`UmemConfig`] (default 2048 receive +
//! 2048 transmit frames of 4096 bytes = 16 MiB, locked). The receive pool
//! cycles fill → rx → caller → fill, the transmit pool free → tx →
//! completion → free; the rings are as large as their pool, so rings never
//! overflow — when the caller is slow, the kernel counts the drop as
//! `rx_fill_ring_empty_descs`/`rx_dropped`. A ledger records the owner of
//! every frame and checks every address the kernel returns, so no frame
//! is leaked or handed out twice ([`XskQueue::frame_accounting`]).
//! Received frames start 256 bytes into their UMEM frame, so the largest
//! receivable frame is `frame_size - 256` (3840 by default).
//!
//! # Privileges
//!
//! Creating AF_XDP sockets needs CAP_NET_RAW; loading and attaching the
//! program CAP_BPF + CAP_NET_ADMIN (or CAP_SYS_ADMIN); registering the
//! UMEM needs RLIMIT_MEMLOCK room or CAP_IPC_LOCK. Without any of them,
//! a privileged helper uses [`PreparedSockets::create`] and passes the
//! sockets to xskvm, which opens with `inhibit=on,sock-fds=a:b`; with them
//! the program's receive filter maps ([`RxFilterMaps::raw_fds`], adopted
//! with `filter-fds=c:t:f`), so the unprivileged side keeps the filter.
//!
//! `sock-fds` sockets must be fresh (created, optionally SO_BINDTODEVICE,
//! put in the XSKMAP — nothing more): xskvm registers the UMEM, sizes and
//! maps the rings and binds them itself.
//!
//! With `inhibit=on,map-path=PATH[,map-start-index=N]` the NIC loads no
//! program: after binding, it puts queue i's socket at key N+i of the
//! XSKMAP pinned at PATH (BPF_OBJ_GET then a map update: on Linux 6.5 and
//! later these need only read/write access to the pinned file, even with
//! `kernel.unprivileged_bpf_disabled`; the sockets still need
//! CAP_NET_RAW). A key that already holds a socket is refused. The
//! [`NicOwner`] deletes its keys when dropped, and holds duplicates of
//! the sockets until then, so no key is emptied (and possibly taken by
//! someone else) earlier.
//!
//! # Limits worth knowing
//!
//! - The completion ring has no poll event. When every transmit frame is
//!   in flight, POLLOUT is reported at once (the tx ring is empty), so a
//!   waiting IO thread spins until completions arrive. In copy mode they
//!   arrive within the kick, so this only matters for zero-copy drivers.
//! - Copy mode transmits at most 32 frames per kick before Linux 6.17
//!   (`XDP_MAX_TX_SKB_BUDGET`, set to the ring size where available);
//!   [`TxBatch::kick_pending`] then asks for another kick.
//! - Frames longer than one UMEM frame (`frame_size - 256` received) need
//!   multi-buffer sockets (`XDP_USE_SG`, Linux 6.6+): they are bound so
//!   when the interface's MTU asks for it ([`NicInfo::multi_buffer`]).
//!   Received, such a frame is put together in a buffer of the queue (one
//!   copy); transmitted, it is written into a slot of consecutive UMEM
//!   frames and sent as one descriptor per frame. Without multi-buffer
//!   (older kernels, or the MTU raised after the NIC was opened) longer
//!   frames are dropped by the kernel and counted in `rx_dropped`.
//! - veth in skb mode reports the sender's transmit queue j+1 as receive
//!   queue j (generic XDP reads the skb's queue mapping as a recorded
//!   receive queue); native mode maps transmit queue j to receive queue j.
//!
//! [`testbed`] holds the veth/namespace helpers the tests and the
//! `xsk-bench` binary use.

mod config;
mod error;
mod gather;
mod nic;
mod program;
mod queue;
mod ring;
mod shared_umem;
mod sys;
pub mod testbed;
mod umem;
mod xskmap;

pub use config::{AfXdpConfig, CallerOptions, TxChecksum, UmemConfig, XdpMode, OPTION_KEYS};
pub use error::{ConfigError, Error, Result};
pub use gather::{GatherLimits, GatherPieces, GatherRequest};
pub use nic::{AfXdpNic, NicInfo, NicOwner, PreparedSockets, LINK_HEADER_LEN};
pub use program::{
    attached_program, AttachedProgram, RxFilter, RxFilterConfig, RxFilterMaps, XdpAttachment,
    XdpProgram, RX_FILTER_TABLE_MAX,
};
pub use queue::{
    CounterSnapshot, QueueCounters, QueueStats, QueueStatsHandle, Readiness, TxBatch, TxRequest,
    XdpStatistics, XskQueue,
};
pub use shared_umem::{
    tx_checksum_request, RxDesc, SharedUmem, SharedUmemQueue, TxDesc, TxMetadata, TX_METADATA_LEN,
    XDP_PACKET_HEADROOM,
};
pub use umem::{FrameAccounting, UmemRegion};

/// Capability numbers (linux/capability.h) that opening a NIC takes:
/// CAP_NET_ADMIN (attach), CAP_NET_RAW (AF_XDP sockets), CAP_IPC_LOCK
/// (UMEM not charged to RLIMIT_MEMLOCK), CAP_PERFMON and CAP_BPF (load the
/// program and create its maps). A process that keeps only these can
/// still open (or reopen) a NIC.
pub const OPEN_CAPABILITIES: [u32; 5] = [12, 13, 14, 38, 39];

/// Raises RLIMIT_MEMLOCK by `bytes` (what UMEMs about to be registered
/// lock), never to unlimited; for a privileged helper preparing the
/// limit an unprivileged xskvm inherits. Returns whether the limit now
/// leaves that room (false: no CAP_SYS_RESOURCE to go past the hard limit).
pub fn raise_memlock(bytes: u64) -> bool {
    sys::raise_memlock(bytes)
}

/// The interface index of `ifname` in the calling thread's network
/// namespace.
pub fn ifindex(ifname: &str) -> Option<u32> {
    sys::ifindex(ifname)
}

/// Whether interface `ifname` is up with its link running, in the calling
/// thread's network namespace (false where there is no such interface).
pub fn has_carrier(ifname: &str) -> bool {
    sys::is_running(ifname)
}
