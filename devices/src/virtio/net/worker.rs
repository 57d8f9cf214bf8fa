//! The IO thread of one queue pair: moves frames between the guest's RX/TX
//! virtqueues and a [`NetBackend`], many frames per wake-up, one interrupt
//! per batch. Queue pair 0's thread also serves the control queue.
//!
//! The guest is untrusted. Work per wake-up is bounded (at most a queue's
//! worth of chains per queue, then the other queues and the stop event get
//! their turn), chains longer than the queue are dropped, and a queue the
//! device cannot use (an avail index more than the queue size ahead, an
//! avail ring that is not there, a chain head outside the queue) stops this
//! worker's serving and puts the device into DEVICE_NEEDS_RESET; reset and
//! exit keep working.

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{CsumRequest, GatherFrame, NetBackend, TxFrame, TxPieces};
use super::counters::{add, QueuePairCounters};
use super::guest_copy;
use super::link::{LinkState, MAC_TABLE_MAX};
use super::offload::gso::{self, Segmenter, MAX_HEADERS};
use super::offload::headers::Ip;
use super::offload::rx::{self as rx_csum, RxChecksum};
use super::offload::{
    OffloadError, RxOffloads, TxOffloads, VirtioNetHdr, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use super::rx::{self, OpenFlow, RxError, RxFrameWriter, Segment, VNET_RESERVE};
use super::tx_gather::{self, HeldChains, GATHER_MIN_FRAME};
use crate::virtio::{Interrupt, INTERRUPT_USED_RING};

/// `virtio_net_hdr_v1`: what precedes every frame on both queues.
pub const NET_HDR_LEN: usize = 12;
/// Shortest frame worth sending: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// The longest frame a TX chain may carry: a 64 KiB GSO frame and its headers.
const MAX_TX_FRAME: usize = 65_536 + MAX_HEADERS;

const VIRTIO_NET_CTRL_RX: u8 = 0;
const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
const VIRTIO_NET_CTRL_MAC: u8 = 1;
const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_GUEST_OFFLOADS: u8 = 5;
const VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET: u8 = 0;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// class, command, then the largest command data we read: two MAC tables
/// (a 4-byte count and 6 bytes per address) at full size. Longer commands
/// are only MAC tables larger than ours, and are treated as such.
const CTRL_COMMAND_MAX: usize = 2 + 2 * (4 + 6 * MAC_TABLE_MAX);
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_CTRL_QUEUE: u64 = 4;
const TOKEN_WAKE: u64 = 5;
/// How long transmit waits for room before it kicks the backend again.
const TX_RETRY: Duration = Duration::from_millis(1);

pub(crate) struct ControlQueue {
    pub queue: Queue,
    pub event: EventFd,
    pub max_pairs: u16,
    /// Whether VIRTIO_NET_F_MQ was negotiated (VQ_PAIRS_SET allowed).
    pub mq: bool,
    /// Whether VIRTIO_NET_F_CTRL_RX was negotiated (receive mode and MAC
    /// table commands allowed).
    pub rx_mode: bool,
    /// The receive offloads (feature bits) the driver negotiated and may
    /// switch with VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, if it negotiated
    /// VIRTIO_NET_F_CTRL_GUEST_OFFLOADS; else 0.
    pub guest_offloads_allowed: u64,
    /// Each pair's wake-up, written when the number of active pairs
    /// changes so that a pair that stops being used drains its backend.
    pub wakers: Vec<EventFd>,
}

/// What the guest may transmit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxPolicy {
    pub mac: [u8; 6],
    /// The MTU plus an Ethernet header with a VLAN tag.
    pub max_frame: usize,
    /// Only frames with the guest's own source MAC go out.
    pub spoof_check: bool,
}

impl TxPolicy {
    /// Why `frame` may not go out, if it may not.
    fn refuse(&self, frame: &[u8]) -> Option<TxRefusal> {
        self.refuse_len(frame.len())
            .or_else(|| self.refuse_source(frame))
    }

    fn refuse_len(&self, len: usize) -> Option<TxRefusal> {
        (len > self.max_frame).then_some(TxRefusal::Oversize)
    }

    /// The same for a GSO frame: its headers, and its longest segment.
    fn refuse_gso(&self, headers: &[u8], seg: &Segmenter) -> Option<TxRefusal> {
        if seg.segment_len(0) > self.max_frame {
            return Some(TxRefusal::Oversize);
        }
        self.refuse_source(headers)
    }

    fn refuse_source(&self, frame: &[u8]) -> Option<TxRefusal> {
        if self.spoof_check && frame.get(6..12) != Some(&self.mac[..]) {
            return Some(TxRefusal::Spoofed);
        }
        None
    }
}

enum TxRefusal {
    Oversize,
    Spoofed,
}

/// Why a TX chain was returned unsent.
enum TxDrop {
    Chain(ChainError),
    Offload(OffloadError),
    Refused(TxRefusal),
}

impl From<ChainError> for TxDrop {
    fn from(e: ChainError) -> Self {
        Self::Chain(e)
    }
}

impl From<OffloadError> for TxDrop {
    fn from(e: OffloadError) -> Self {
        Self::Offload(e)
    }
}

fn count_tx_drop(counters: &QueuePairCounters, drop: &TxDrop) {
    add(&counters.tx_dropped, 1);
    match drop {
        TxDrop::Chain(ChainError::TooLong) => add(&counters.tx_chains_too_long, 1),
        TxDrop::Chain(_) => {}
        TxDrop::Offload(e) => {
            add(&counters.tx_offload_errors, 1);
            crate::log_ratelimited!(log::Level::Debug, "virtio-net: TX frame dropped: {e}");
        }
        TxDrop::Refused(TxRefusal::Oversize) => add(&counters.tx_dropped_oversize, 1),
        TxDrop::Refused(TxRefusal::Spoofed) => add(&counters.tx_dropped_spoofed, 1),
    }
}

/// Counts a checksum the device took on: filled here, or left to the host.
fn count_tx_csum(counters: &QueuePairCounters, frame: &TxFrame) {
    if frame.csum.is_some() {
        add(&counters.tx_csum_offloaded, 1);
    } else {
        add(&counters.tx_csum_filled, 1);
    }
}

/// A guest TX frame as it lies in guest memory: the virtio-net header,
/// then the frame's pieces. Gathered once per chain and read from as
/// often as segmentation needs; its storage is reserved once per worker.
pub(crate) struct TxChain {
    hdr: VirtioNetHdr,
    pieces: Vec<(GuestAddress, usize)>,
    len: usize,
    /// The piece the last read started in, and that piece's offset in the
    /// frame: segments are read in order, so the next read starts there
    /// rather than walking the pieces from the first again.
    cursor: (usize, usize),
}

impl TxChain {
    pub fn with_capacity(descriptors: usize) -> Self {
        Self {
            hdr: VirtioNetHdr::default(),
            pieces: Vec::with_capacity(descriptors),
            len: 0,
            cursor: (0, 0),
        }
    }

    /// Reads the header and records where the frame lies; at most
    /// `max_descs` descriptors, at most [`MAX_TX_FRAME`] bytes.
    fn gather(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        max_descs: usize,
    ) -> Result<(), ChainError> {
        self.pieces.clear();
        self.len = 0;
        self.cursor = (0, 0);
        let mut hdr = [0u8; NET_HDR_LEN];
        let mut hdr_len = 0usize;
        for (i, desc) in chain.enumerate() {
            if i == max_descs {
                return Err(ChainError::TooLong);
            }
            if desc.is_write_only() {
                return Err(ChainError::Bad);
            }
            let mut addr = desc.addr();
            let mut len = desc.len() as usize;
            if hdr_len < NET_HDR_LEN && len > 0 {
                let n = (NET_HDR_LEN - hdr_len).min(len);
                if !guest_copy::read(mem, addr, &mut hdr[hdr_len..hdr_len + n]) {
                    return Err(ChainError::Bad);
                }
                hdr_len += n;
                len -= n;
                addr = addr.checked_add(n as u64).ok_or(ChainError::Bad)?;
            }
            if len == 0 {
                continue;
            }
            self.len = self
                .len
                .checked_add(len)
                .filter(|&l| l <= MAX_TX_FRAME)
                .ok_or(ChainError::TooBig)?;
            // Fewer pieces than max_descs: never grows past its reservation.
            self.pieces.push((addr, len));
        }
        if hdr_len < NET_HDR_LEN || self.len < MIN_FRAME_LEN {
            return Err(ChainError::Runt);
        }
        self.hdr = VirtioNetHdr::from_bytes(&hdr);
        Ok(())
    }

    /// Copies the frame's bytes from `offset` into all of `dst`.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.for_each_range(offset, dst.len(), |addr, n| {
            let ok = guest_copy::read(mem, addr, &mut dst[done..done + n]);
            done += n;
            ok
        })
    }

    /// Pushes the frame's `len` bytes from `offset` as pieces of guest
    /// memory; false when they cannot all go out from where they lie.
    fn push_pieces(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: usize,
        len: usize,
        max_piece: usize,
        pieces: &mut dyn TxPieces,
    ) -> bool {
        self.for_each_range(offset, len, |addr, n| {
            tx_gather::push_guest_range(mem, addr, n, max_piece, pieces)
        })
        .is_ok()
    }

    /// The most pieces of guest memory, each at most `max_piece` bytes,
    /// that one of `seg`'s segments' payloads lies in (as `push_pieces`
    /// cuts them), plus one for a guest region that may end inside.
    fn most_pieces_per_segment(&self, seg: &Segmenter, max_piece: usize) -> usize {
        let max_piece = max_piece.max(1);
        let mut most = 0;
        // The first descriptor the current segment may lie in, and where
        // it starts in the frame (segments come in order).
        let (mut first, mut first_start) = (0usize, 0usize);
        for i in 0..seg.segments() {
            let (at, len) = seg.payload(i);
            let end = at + len;
            while let Some(&(_, n)) = self.pieces.get(first) {
                if first_start + n > at {
                    break;
                }
                first_start += n;
                first += 1;
            }
            let mut count = 0;
            let mut start = first_start;
            for &(_, n) in self.pieces.iter().skip(first) {
                if start >= end {
                    break;
                }
                count += (end.min(start + n) - at.max(start)).div_ceil(max_piece);
                start += n;
            }
            most = most.max(count);
        }
        most + 1
    }

    /// Calls `f` on each stretch of guest memory holding the frame's `len`
    /// bytes from `offset`, in order, until it returns false.
    fn for_each_range(
        &mut self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize) -> bool,
    ) -> Result<(), ChainError> {
        if offset < self.cursor.1 {
            self.cursor = (0, 0);
        }
        let (first, mut piece_start) = self.cursor;
        let mut done = 0usize;
        for (i, &(addr, piece_len)) in self.pieces.iter().enumerate().skip(first) {
            if done == len {
                break;
            }
            let skip = offset.saturating_sub(piece_start);
            if skip >= piece_len {
                piece_start += piece_len;
                continue;
            }
            if done == 0 {
                self.cursor = (i, piece_start);
            }
            let n = (piece_len - skip).min(len - done);
            let from = addr.checked_add(skip as u64).ok_or(ChainError::Bad)?;
            if !f(from, n) {
                return Err(ChainError::Bad);
            }
            done += n;
            piece_start += piece_len;
        }
        if done < len {
            return Err(ChainError::Bad);
        }
        Ok(())
    }
}

/// A GSO frame part way through segmentation: its chain goes back to the
/// guest once the last segment is out.
struct PendingGso {
    head: u16,
    seg: Segmenter,
    next: usize,
    /// Its segments' payloads go out from guest memory (`umem=guest`): the
    /// chain is held until the last segment's token comes back.
    gathered: bool,
}

/// The first thing a TX chain turns into.
enum TxStart {
    /// A whole frame, already in the host buffer.
    Frame(TxFrame),
    /// A GSO frame: segments follow, one per host buffer.
    Gso(Segmenter),
}

/// Reads a TX chain: a plain frame goes into `buf` (checksum filled if
/// asked, or left to the host side within `host_csum_reach`), a GSO frame is
/// planned, its headers kept in `headers`.
#[allow(clippy::too_many_arguments)]
fn start_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut TxChain,
    headers: &mut [u8; MAX_HEADERS],
    buf: &mut [u8],
    max_descs: usize,
    offloads: TxOffloads,
    policy: &TxPolicy,
    host_csum_reach: usize,
) -> Result<TxStart, TxDrop> {
    if let Some(seg) = plan_tx_chain(mem, chain, frame, headers, max_descs, offloads, policy)? {
        return Ok(TxStart::Gso(seg));
    }
    copy_tx_frame(mem, frame, buf, policy, host_csum_reach).map(TxStart::Frame)
}

/// Reads a TX chain's header and where its frame lies; plans a GSO
/// frame's segmentation (its headers kept in `headers`). None: a plain
/// frame.
fn plan_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut TxChain,
    headers: &mut [u8; MAX_HEADERS],
    max_descs: usize,
    offloads: TxOffloads,
    policy: &TxPolicy,
) -> Result<Option<Segmenter>, TxDrop> {
    frame.gather(mem, chain, max_descs)?;
    let hdr = frame.hdr;
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !offloads.csum {
        return Err(OffloadError::NotNegotiated.into());
    }
    if !gso::is_gso(&hdr) {
        return Ok(None);
    }
    let n = frame.len.min(MAX_HEADERS);
    frame.read(mem, 0, &mut headers[..n])?;
    let seg = Segmenter::new(&hdr, offloads, &headers[..n], frame.len)?;
    if let Some(refusal) = policy.refuse_gso(&headers[..n], &seg) {
        return Err(TxDrop::Refused(refusal));
    }
    Ok(Some(seg))
}

/// Copies a plain frame into `buf`: its checksum filled if asked, or left
/// to the host side where its field ends within `host_csum_reach` bytes
/// (0: the host side takes none).
fn copy_tx_frame(
    mem: &GuestMemoryMmap,
    frame: &mut TxChain,
    buf: &mut [u8],
    policy: &TxPolicy,
    host_csum_reach: usize,
) -> Result<TxFrame, TxDrop> {
    let hdr = frame.hdr;
    // Before the buffer's own limit, so that an oversize frame counts as one.
    if let Some(refusal) = policy.refuse_len(frame.len) {
        return Err(TxDrop::Refused(refusal));
    }
    let out = buf.get_mut(..frame.len).ok_or(ChainError::TooBig)?;
    frame.read(mem, 0, out)?;
    if let Some(refusal) = policy.refuse(out) {
        return Err(TxDrop::Refused(refusal));
    }
    let mut csum = None;
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        if start + offset + 2 <= host_csum_reach {
            // The kernel checks the same bounds, but would drop the frame
            // without telling us why.
            gso::check_partial_csum(out.len(), start, offset)?;
            csum = Some(CsumRequest {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
            });
        } else {
            gso::fill_partial_csum(out, start, offset)?;
        }
    }
    Ok(TxFrame {
        len: frame.len,
        csum,
    })
}

/// Describes a plain frame to be sent from guest memory: its first bytes
/// copied into `head` (the MACs the policy checks and, for a checksum left
/// to the host side, up to the checksum field, which the kernel wants in
/// the first descriptor), the rest as pieces. Ok(None): it cannot go out
/// that way (pieces refused, or a checksum field too deep for the head);
/// copy it.
fn gather_tx_frame(
    mem: &GuestMemoryMmap,
    frame: &mut TxChain,
    head: &mut [u8],
    pieces: &mut dyn TxPieces,
    policy: &TxPolicy,
    max_piece: usize,
) -> Result<Option<GatherFrame>, TxDrop> {
    let hdr = frame.hdr;
    if let Some(refusal) = policy.refuse_len(frame.len) {
        return Err(TxDrop::Refused(refusal));
    }
    let mut head_len = MIN_FRAME_LEN;
    let mut csum = None;
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        gso::check_partial_csum(frame.len, start, offset)?;
        head_len = head_len.max(start + offset + 2);
        csum = Some(CsumRequest {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
        });
    }
    let Some(out) = head.get_mut(..head_len) else {
        return Ok(None);
    };
    frame.read(mem, 0, out)?;
    if let Some(refusal) = policy.refuse_source(out) {
        return Err(TxDrop::Refused(refusal));
    }
    pieces.clear();
    if !frame.push_pieces(mem, head_len, frame.len - head_len, max_piece, pieces) {
        pieces.clear();
        return Ok(None);
    }
    Ok(Some(GatherFrame {
        head_len,
        csum,
        token: None,
    }))
}

/// Writes segment `i` of a GSO frame into `buf`: the payload straight
/// from guest memory, then its headers; the transport checksum is filled,
/// or left to the host side with `host_csum`.
fn write_segment(
    mem: &GuestMemoryMmap,
    frame: &mut TxChain,
    headers: &[u8],
    seg: &Segmenter,
    i: usize,
    buf: &mut [u8],
    host_csum: bool,
) -> Result<TxFrame, ChainError> {
    let len = seg.segment_len(i);
    let out = buf.get_mut(..len).ok_or(ChainError::TooBig)?;
    let (at, _) = seg.payload(i);
    frame.read(mem, at, &mut out[seg.header_len()..])?;
    seg.finish_segment(i, headers, out, host_csum);
    let (start, offset) = seg.csum_request();
    Ok(TxFrame {
        len,
        // Both below MAX_HEADERS, so they fit.
        csum: host_csum.then_some(CsumRequest {
            start: start as u16,
            offset: offset as u16,
        }),
    })
}

/// Transmit state of one queue pair, reserved once.
pub(crate) struct TxState {
    pub offloads: TxOffloads,
    frame: TxChain,
    headers: Box<[u8; MAX_HEADERS]>,
    pending: Option<PendingGso>,
    /// `umem=guest`: chains sent from guest memory, not yet returned.
    held: HeldChains,
}

impl TxState {
    pub fn new(offloads: TxOffloads, queue_size: u16) -> Self {
        Self {
            offloads,
            frame: TxChain::with_capacity(usize::from(queue_size)),
            headers: Box::new([0; MAX_HEADERS]),
            pending: None,
            held: HeldChains::new(queue_size),
        }
    }
}

/// The receive offloads in force: negotiated, then changed by the guest
/// through VIRTIO_NET_CTRL_GUEST_OFFLOADS (a feature-bit mask, shared by
/// every pair).
pub(crate) fn rx_offloads(guest_offloads: &AtomicU64) -> RxOffloads {
    let bits = guest_offloads.load(Ordering::SeqCst);
    let csum = bits & super::VIRTIO_NET_F_GUEST_CSUM != 0;
    // Coalesced frames carry NEEDS_CSUM: only for a guest that takes it.
    RxOffloads {
        csum,
        tso4: csum && bits & super::VIRTIO_NET_F_GUEST_TSO4 != 0,
        tso6: csum && bits & super::VIRTIO_NET_F_GUEST_TSO6 != 0,
    }
}

/// Receive state of one queue pair, reserved once.
pub(crate) struct RxState {
    writer: RxFrameWriter,
    /// The merged frame being written, if any (only within one batch).
    open: Option<OpenFlow>,
    /// Where a packet longer than the MTU is cut into wire frames, one at a
    /// time (sized once, at the first such packet).
    split: Vec<u8>,
}

impl RxState {
    /// `mergeable`: VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub fn new(mergeable: bool) -> Self {
        Self {
            writer: RxFrameWriter::new(mergeable),
            open: None,
            split: Vec::new(),
        }
    }
}

pub(crate) struct QueuePairWorker {
    pub tx_policy: TxPolicy,
    pub tx_state: TxState,
    pub rx_state: RxState,
    /// Feature bits of the receive offloads the guest has on.
    pub guest_offloads: Arc<AtomicU64>,
    /// This pair's index: it receives for the guest only while it is below
    /// `active_pairs`.
    pub pair: usize,
    /// Pairs the guest uses: 1 after activation, then what VQ_PAIRS_SET
    /// says. The device must not fill receive queues beyond them (virtio
    /// 1.2 5.1.6.5.5); frames that arrive there are dropped and counted.
    pub active_pairs: Arc<super::pairs::ActivePairs>,
    /// Link state and replacement backends from the VMM's NIC watcher;
    /// `wake` is signalled when either changes.
    pub link: Arc<LinkState>,
    pub wake: EventFd,
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_event: EventFd,
    pub tx_event: EventFd,
    pub ctrl: Option<ControlQueue>,
    pub backend: Box<dyn NetBackend>,
    pub interrupt: Arc<Interrupt>,
    pub counters: Arc<QueuePairCounters>,
    pub stop: EventFd,
}

#[derive(Debug)]
enum ChainError {
    /// Descriptors outside guest memory, or the wrong direction.
    Bad,
    /// The frame does not fit (TX: the host buffer; RX: the guest chain).
    TooBig,
    /// Not even an Ethernet header.
    Runt,
    /// More descriptors than the queue has entries.
    TooLong,
}

/// Why a worker stopped serving before it was told to stop.
#[derive(Debug, thiserror::Error)]
enum WorkerFault {
    #[error("{queue} queue unusable: {reason}")]
    Queue { queue: &'static str, reason: String },
    #[error("event loop failed: {0}")]
    Io(#[from] std::io::Error),
}

impl WorkerFault {
    fn queue(queue: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Queue {
            queue,
            reason: reason.to_string(),
        }
    }
}

/// What a bounded pass over one queue left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Nothing left to do until the next event.
    Done,
    /// The budget ran out with work left: come back after the other queues.
    MoreWork,
    /// TX: the backend is out of room. RX: the guest has no buffers.
    Blocked,
}

/// The next available chain, or why the queue cannot be used. Unlike
/// `pop_descriptor_chain` this tells "nothing available" apart from "the
/// driver broke the ring", which must not be retried forever. (The ring
/// itself is always readable: the transport checked at DRIVER_OK that it
/// lies in guest memory, and an avail ring left at 0 is refused by iter.)
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    name: &'static str,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, WorkerFault> {
    let size = queue.size();
    let mut iter = queue.iter(mem).map_err(|e| WorkerFault::queue(name, e))?;
    match iter.next() {
        Some(chain) if chain.head_index() < size => Ok(Some(chain)),
        Some(chain) => Err(WorkerFault::queue(
            name,
            format!(
                "chain head {} outside a queue of {size}",
                chain.head_index()
            ),
        )),
        None => Ok(None),
    }
}

/// A TX loop's "re-enable notifications, did more come?". A ring that
/// said so last time and yielded nothing since is broken (e.g. an avail
/// ring overlapping the used ring, whose flags the notification switches
/// rewrite): looking again would spin for ever.
#[derive(Default)]
struct Recheck {
    announced: bool,
}

impl Recheck {
    /// `took`: whether chains were taken since the last call.
    fn more(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        took: bool,
    ) -> Result<bool, WorkerFault> {
        if self.announced && !took {
            return Err(WorkerFault::queue(
                "tx",
                "the avail ring announced chains it does not hold",
            ));
        }
        self.announced = more_after_enable(queue, mem, "tx")?;
        Ok(self.announced)
    }
}

/// Re-enables notifications; true if chains arrived meanwhile.
fn more_after_enable(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    name: &'static str,
) -> Result<bool, WorkerFault> {
    queue
        .enable_notification(mem)
        .map_err(|e| WorkerFault::queue(name, e))
}

/// One TX pass over the queue, shared by the copy and the gather ways of
/// sending.
struct TxPass<'a> {
    mem: &'a GuestMemoryMmap,
    tx: &'a mut Queue,
    counters: &'a QueuePairCounters,
    policy: &'a TxPolicy,
    state: &'a mut TxState,
    /// Host frames sent (or chains dropped) per pass.
    budget: usize,
    taken: usize,
    /// Chains taken from the ring, for the recheck.
    popped: usize,
    /// Bytes of the frames handed over in this batch.
    bytes: u64,
    /// How far into a frame the host side fills a checksum field; 0 where
    /// it fills none (the device does).
    host_csum_reach: usize,
    fault: Option<WorkerFault>,
    /// Gathering: the longest piece of guest memory the backend takes.
    max_piece: usize,
    /// Gathering: the most pieces a frame may have behind its head.
    max_pieces: usize,
    /// Gathering: the next chain or segment does not fit a head; the
    /// batch ends and the copy way sends it.
    copy_next: bool,
}

impl<'a> TxPass<'a> {
    fn used(&mut self, head: u16) -> bool {
        if let Err(e) = self.tx.add_used(self.mem, head, 0) {
            self.fault = Some(WorkerFault::queue("tx", e));
            return false;
        }
        true
    }

    /// The next chain from the ring, counted; None at the end or a fault.
    fn pop(&mut self) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
        let mem = self.mem;
        match next_chain(self.tx, mem, "tx") {
            Ok(Some(chain)) => {
                // Counted once taken: a look at an empty ring used up the
                // budget of a one-entry queue, and every pass then asked
                // for another at once (the IO thread spun).
                self.taken += 1;
                self.popped += 1;
                Some(chain)
            }
            Ok(None) => None,
            Err(e) => {
                self.fault = Some(e);
                None
            }
        }
    }

    /// Puts the chain just taken back, for the copy way.
    fn unpop(&mut self) {
        self.tx.go_to_previous_position();
        self.taken -= 1;
        self.popped -= 1;
        self.copy_next = true;
    }

    /// Hands the chains whose tokens came back to the used ring.
    fn return_completed(&mut self, backend: &mut dyn NetBackend) {
        if let Err(e) = return_completed(backend, &mut self.state.held, self.tx, self.mem) {
            self.fault = Some(e);
        }
    }

    /// The copy way: the next frame or segment written into `buf`.
    fn next_copied(&mut self, buf: &mut [u8]) -> Option<TxFrame> {
        loop {
            if self.taken >= self.budget || self.fault.is_some() {
                return None;
            }
            if self.state.pending.is_some() {
                if let Some(out) = self.next_copied_segment(buf) {
                    return Some(out);
                }
                continue;
            }
            let offloads = self.state.offloads;
            let (mem, budget, policy, host_csum_reach) =
                (self.mem, self.budget, self.policy, self.host_csum_reach);
            let chain = self.pop()?;
            let head = chain.head_index();
            let TxState { frame, headers, .. } = &mut *self.state;
            let start = start_tx_chain(
                mem,
                chain,
                frame,
                headers,
                buf,
                budget,
                offloads,
                policy,
                host_csum_reach,
            );
            if let Ok(TxStart::Gso(seg)) = start {
                add(&self.counters.tx_gso_frames, 1);
                self.state.pending = Some(PendingGso {
                    head,
                    seg,
                    next: 0,
                    gathered: false,
                });
                // Its segments count against the budget, not the chain.
                self.taken -= 1;
                continue;
            }
            if !self.used(head) {
                return None;
            }
            match start {
                Ok(TxStart::Frame(out)) => {
                    if self.state.frame.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                        count_tx_csum(self.counters, &out);
                    }
                    self.bytes += out.len as u64;
                    return Some(out);
                }
                Ok(TxStart::Gso(_)) => {}
                Err(drop) => count_tx_drop(self.counters, &drop),
            }
        }
    }

    /// The next segment of the pending GSO frame, copied into `buf`; None
    /// when it was dropped.
    fn next_copied_segment(&mut self, buf: &mut [u8]) -> Option<TxFrame> {
        let TxState {
            frame,
            headers,
            pending,
            ..
        } = &mut *self.state;
        let p = pending.as_mut()?;
        self.taken += 1;
        let i = p.next;
        p.next += 1;
        let result = write_segment(
            self.mem,
            frame,
            &headers[..],
            &p.seg,
            i,
            buf,
            self.host_csum_reach > 0,
        );
        if p.next == p.seg.segments() || result.is_err() {
            let head = p.head;
            *pending = None;
            if !self.used(head) {
                return None;
            }
        }
        match result {
            Ok(out) => {
                add(&self.counters.tx_gso_segments, 1);
                count_tx_csum(self.counters, &out);
                self.bytes += out.len as u64;
                Some(out)
            }
            // The guest changed its chain under us; the rest of the frame
            // is gone with it.
            Err(e) => {
                count_tx_drop(self.counters, &TxDrop::Chain(e));
                None
            }
        }
    }

    /// The gather way: the next frame or segment as a head written into
    /// `head` and pieces of guest memory; short frames, and those that
    /// cannot go out from where they lie, copied into `head` whole.
    fn next_gathered(&mut self, head: &mut [u8], pieces: &mut dyn TxPieces) -> Option<GatherFrame> {
        loop {
            if self.taken >= self.budget || self.fault.is_some() || self.copy_next {
                return None;
            }
            pieces.clear();
            if let Some(p) = &self.state.pending {
                if !p.gathered {
                    if p.seg.segment_len(p.next) > head.len() {
                        self.copy_next = true;
                        return None;
                    }
                    if let Some(out) = self.next_copied_segment(head) {
                        return Some(copied(out));
                    }
                    continue;
                }
                if let Some(out) = self.next_gathered_segment(head, pieces) {
                    return Some(out);
                }
                continue;
            }
            let offloads = self.state.offloads;
            let (mem, budget, policy, host_csum_reach) =
                (self.mem, self.budget, self.policy, self.host_csum_reach);
            let chain = self.pop()?;
            let chain_head = chain.head_index();
            let TxState {
                frame,
                headers,
                held,
                ..
            } = &mut *self.state;
            let seg = match plan_tx_chain(mem, chain, frame, headers, budget, offloads, policy) {
                Ok(seg) => seg,
                Err(drop) => {
                    count_tx_drop(self.counters, &drop);
                    if !self.used(chain_head) {
                        return None;
                    }
                    continue;
                }
            };
            if let Some(seg) = seg {
                add(&self.counters.tx_gso_frames, 1);
                // The kernel sums each segment over its pieces; without
                // that, segments are copied (and summed here).
                // A segment too long for the head has nowhere to go if
                // its pieces are refused: gather those only where no
                // segment needs more pieces than a frame may have.
                let seg_len = seg.segment_len(0);
                let gathered = host_csum_reach > 0
                    && held.has_room()
                    && seg_len >= GATHER_MIN_FRAME
                    && (seg_len <= head.len()
                        || frame.most_pieces_per_segment(&seg, self.max_piece) <= self.max_pieces);
                self.state.pending = Some(PendingGso {
                    head: chain_head,
                    seg,
                    next: 0,
                    gathered,
                });
                self.taken -= 1;
                continue;
            }
            let needs_csum = frame.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
            if frame.len >= GATHER_MIN_FRAME
                && held.has_room()
                && (host_csum_reach > 0 || !needs_csum)
            {
                match gather_tx_frame(mem, frame, head, pieces, policy, self.max_piece) {
                    Ok(Some(mut out)) => {
                        out.token = Some(held.hold(chain_head));
                        if needs_csum {
                            add(&self.counters.tx_csum_offloaded, 1);
                        }
                        add(&self.counters.tx_gathered_frames, 1);
                        self.bytes += frame.len as u64;
                        return Some(out);
                    }
                    Ok(None) => {}
                    Err(drop) => {
                        count_tx_drop(self.counters, &drop);
                        if !self.used(chain_head) {
                            return None;
                        }
                        continue;
                    }
                }
            }
            if frame.len > head.len() {
                self.unpop();
                return None;
            }
            let result = copy_tx_frame(mem, frame, head, policy, host_csum_reach);
            if !self.used(chain_head) {
                return None;
            }
            match result {
                Ok(out) => {
                    if needs_csum {
                        count_tx_csum(self.counters, &out);
                    }
                    self.bytes += out.len as u64;
                    return Some(copied(out));
                }
                Err(drop) => count_tx_drop(self.counters, &drop),
            }
        }
    }

    /// The next segment of a pending GSO frame sent from guest memory: its
    /// headers in `head`, its payload as pieces (copied behind the headers
    /// where the backend refuses them). The last segment carries the
    /// chain's token; a segment that cannot go out ends the frame, and the
    /// token then goes alone (the backend hands back a token of a frame it
    /// refuses in its turn).
    fn next_gathered_segment(
        &mut self,
        head: &mut [u8],
        pieces: &mut dyn TxPieces,
    ) -> Option<GatherFrame> {
        let TxState {
            frame,
            headers,
            pending,
            held,
            ..
        } = &mut *self.state;
        let p = pending.as_mut()?;
        self.taken += 1;
        let i = p.next;
        p.next += 1;
        let hl = p.seg.header_len();
        let (at, len) = p.seg.payload(i);
        let (start, offset) = p.seg.csum_request();
        let mut out = None;
        if let Some(h) = head.get_mut(..hl) {
            p.seg.finish_segment_headers(i, &headers[..], h);
            if frame.push_pieces(self.mem, at, len, self.max_piece, pieces) {
                add(&self.counters.tx_gathered_frames, 1);
                out = Some(GatherFrame {
                    head_len: hl,
                    csum: None,
                    token: None,
                });
            } else {
                pieces.clear();
                out = write_segment(self.mem, frame, &headers[..], &p.seg, i, head, true)
                    .ok()
                    .map(copied);
            }
        }
        let last = p.next == p.seg.segments() || out.is_none();
        if last {
            let token = held.hold(p.head);
            *pending = None;
            out = Some(match out {
                Some(out) => GatherFrame {
                    token: Some(token),
                    ..out
                },
                None => {
                    count_tx_drop(self.counters, &TxDrop::Chain(ChainError::Bad));
                    pieces.clear();
                    GatherFrame {
                        head_len: 0,
                        csum: None,
                        token: Some(token),
                    }
                }
            });
        }
        let mut out = out?;
        if out.head_len > 0 {
            add(&self.counters.tx_gso_segments, 1);
            add(&self.counters.tx_csum_offloaded, 1);
            // Both below MAX_HEADERS, so they fit.
            out.csum = Some(CsumRequest {
                start: start as u16,
                offset: offset as u16,
            });
            self.bytes += (hl + len) as u64;
        }
        Some(out)
    }
}

/// Hands the held chains whose tokens `backend` gave back to the used ring.
fn return_completed(
    backend: &mut dyn NetBackend,
    held: &mut HeldChains,
    tx: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<(), WorkerFault> {
    let mut fault = None;
    backend.take_completed(&mut |token| {
        if let Some(head) = held.release(token) {
            if let Err(e) = tx.add_used(mem, head, 0) {
                fault = Some(WorkerFault::queue("tx", e));
            }
        }
    });
    fault.map_or(Ok(()), Err)
}

/// A frame copied whole into the head.
fn copied(frame: TxFrame) -> GatherFrame {
    GatherFrame {
        head_len: frame.len,
        csum: frame.csum,
        token: None,
    }
}

impl QueuePairWorker {
    /// Serves the queues until `stop` is signalled; returns the backend so
    /// that a reset device can start again. A broken queue or a panic puts
    /// the device into DEVICE_NEEDS_RESET; the thread then only waits for
    /// `stop`, and the backend still comes back.
    pub fn run(mut self) -> Box<dyn NetBackend> {
        // The worker owns everything the closure touches; after a panic it
        // is only asked for its backend and dropped.
        let fault = match catch_unwind(AssertUnwindSafe(|| self.event_loop())) {
            Ok(Ok(())) => {
                if let Some(report) = self.backend.report() {
                    log::debug!("virtio-net queue pair {}: host side: {report}", self.pair);
                }
                // A reset: the guest takes back the chains still held.
                self.backend.disarm_unsent_gathers();
                return self.backend;
            }
            Ok(Err(fault)) => fault.to_string(),
            Err(_) => "the IO thread panicked".to_string(),
        };
        crate::error_ratelimited!("virtio-net: {fault}; device needs reset");
        add(&self.counters.queue_errors, 1);
        if let Err(e) = self.interrupt.signal_needs_reset() {
            crate::error_ratelimited!("virtio-net: cannot raise the interrupt: {e}");
        }
        wait_readable(&self.stop);
        self.backend.disarm_unsent_gathers();
        self.backend
    }

    fn event_loop(&mut self) -> Result<(), WorkerFault> {
        let epoll = Epoll::new()?;
        let add_fd = |fd: i32, token: u64, events: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add_fd(self.rx_event.as_raw_fd(), TOKEN_RX_QUEUE, EventSet::IN)?;
        add_fd(self.tx_event.as_raw_fd(), TOKEN_TX_QUEUE, EventSet::IN)?;
        add_fd(self.stop.as_raw_fd(), TOKEN_STOP, EventSet::IN)?;
        add_fd(self.backend.fd(), TOKEN_BACKEND, EventSet::IN)?;
        add_fd(self.wake.as_raw_fd(), TOKEN_WAKE, EventSet::IN)?;
        if let Some(ctrl) = &self.ctrl {
            add_fd(ctrl.event.as_raw_fd(), TOKEN_CTRL_QUEUE, EventSet::IN)?;
        }
        // Backend interest: IN unless the guest has no RX buffers (the frames
        // wait and we would spin), OUT only while transmit is out of room.
        let mut interest = EventSet::IN;
        // Frames or chains may already be waiting from before activation.
        let mut tx = Pass::MoreWork;
        let mut rx = Pass::MoreWork;
        let mut ctrl = Pass::MoreWork;
        let mut tx_retry_at: Option<Instant> = None;
        // The last transmit pass was woken by room, yet blocked and
        // achieved nothing.
        let mut tx_stalled = false;
        let mut tx_woken_by_room = false;
        // Chains held for frames sent from guest memory: their completions
        // raise no event here (a NIC's come after the send, later), so
        // look again on a short timer while any are held.
        let mut tx_held_check_at: Option<Instant> = None;

        let mut events = [EpollEvent::default(); 8];
        loop {
            // While transmit is out of room, also retry on a short timer: in
            // copy mode the kernel only moves the AF_XDP TX ring when kicked,
            // and a kick refused as busy is not always followed by POLLOUT.
            let timeout = if tx == Pass::MoreWork || rx == Pass::MoreWork || ctrl == Pass::MoreWork
            {
                0
            } else if let Some(at) = tx_retry_at.or(tx_held_check_at) {
                at.saturating_duration_since(Instant::now())
                    .as_millis()
                    .max(1) as i32
            } else {
                -1
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_TX_QUEUE => {
                        let _ = self.tx_event.read();
                        add(&self.counters.tx_notifications, 1);
                        // While out of room the chains wait for POLLOUT or
                        // the retry timer, not for the guest.
                        if tx == Pass::Done {
                            tx = Pass::MoreWork;
                        }
                    }
                    TOKEN_RX_QUEUE => {
                        let _ = self.rx_event.read();
                        add(&self.counters.rx_notifications, 1);
                        rx = Pass::MoreWork;
                    }
                    TOKEN_BACKEND => {
                        let ready = event.event_set();
                        if ready.contains(EventSet::OUT) {
                            tx = Pass::MoreWork;
                            tx_woken_by_room = true;
                        }
                        if ready.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP)
                            && rx == Pass::Done
                        {
                            rx = Pass::MoreWork;
                        }
                    }
                    TOKEN_CTRL_QUEUE => {
                        if let Some(c) = &self.ctrl {
                            let _ = c.event.read();
                        }
                        ctrl = Pass::MoreWork;
                    }
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        if let Some(new) = self.link.take_replacement(self.pair) {
                            // The host NIC came back: serve the new socket.
                            // The old one's frames are done or gone.
                            let mut old = std::mem::replace(&mut self.backend, new);
                            self.retire_backend(old.as_mut())?;
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                old.fd(),
                                EpollEvent::default(),
                            );
                            epoll.ctl(
                                ControlOperation::Add,
                                self.backend.fd(),
                                EpollEvent::new(interest, TOKEN_BACKEND),
                            )?;
                        }
                        // Pairs in use or link state changed: look again.
                        rx = Pass::MoreWork;
                        tx = Pass::MoreWork;
                    }
                    _ => {}
                }
            }
            if tx == Pass::Blocked && tx_retry_at.is_some_and(|at| Instant::now() >= at) {
                add(&self.counters.tx_retries, 1);
                tx = Pass::MoreWork;
            }
            if tx == Pass::Done && tx_held_check_at.is_some_and(|at| Instant::now() >= at) {
                add(&self.counters.tx_gather_waits, 1);
                tx = Pass::MoreWork;
            }
            // One bounded pass over each queue with work, then back to
            // epoll: the stop event and the other queues are never starved.
            if tx == Pass::MoreWork {
                let mark = (
                    self.counters.tx_packets.load(Ordering::Relaxed),
                    self.tx.next_used(),
                );
                let woken_by_room = std::mem::take(&mut tx_woken_by_room);
                tx = self.process_tx()?;
                // Woken because the backend turned writable, yet blocked
                // without sending or returning anything: it may stay
                // writable and still refuse (a kick the kernel turned down),
                // so its fd is no signal until the retry timer has fired.
                tx_stalled = tx == Pass::Blocked
                    && woken_by_room
                    && mark
                        == (
                            self.counters.tx_packets.load(Ordering::Relaxed),
                            self.tx.next_used(),
                        );
                tx_retry_at = (tx == Pass::Blocked).then(|| Instant::now() + TX_RETRY);
                tx_held_check_at = (tx == Pass::Done && !self.tx_state.held.is_empty())
                    .then(|| Instant::now() + TX_RETRY);
            }
            if rx == Pass::MoreWork {
                rx = self.process_rx()?;
            }
            if ctrl == Pass::MoreWork {
                ctrl = self.process_ctrl()?;
            }
            let mut wanted = EventSet::empty();
            if rx != Pass::Blocked {
                wanted |= EventSet::IN;
            }
            if tx == Pass::Blocked && !tx_stalled {
                wanted |= EventSet::OUT;
            }
            if wanted != interest {
                epoll.ctl(
                    ControlOperation::Modify,
                    self.backend.fd(),
                    EpollEvent::new(wanted, TOKEN_BACKEND),
                )?;
                interest = wanted;
            }
        }
    }

    /// Moves up to a queue's worth of TX frames into the backend, in
    /// batches: whole frames, and the segments of GSO frames (a GSO frame
    /// may span passes; its chain is returned after its last segment).
    /// Where the backend sends from guest memory (`umem=guest`), chains it
    /// still reads are held and returned as their completions come back,
    /// at the start of each pass and after each batch.
    fn process_tx(&mut self) -> Result<Pass, WorkerFault> {
        // A pair the guest never set up (no MQ, or fewer pairs) has no queues.
        if !self.tx.ready() {
            return Ok(Pass::Done);
        }
        if !self.link.is_up() {
            return self.drop_tx();
        }
        let used_before = self.tx.next_used();
        let max_piece = self.backend.tx_gather_piece_max();
        let budget = usize::from(self.tx.size());
        let mut pass = TxPass {
            mem: &self.mem,
            tx: &mut self.tx,
            counters: &self.counters,
            policy: &self.tx_policy,
            budget,
            state: &mut self.tx_state,
            taken: 0,
            popped: 0,
            bytes: 0,
            // Checksums the guest leaves to the device go on to the kernel
            // where it takes them (AF_XDP TX metadata), else are filled here.
            host_csum_reach: if self.backend.tx_checksum_offload() {
                self.backend.tx_checksum_reach()
            } else {
                0
            },
            fault: None,
            max_piece: max_piece.unwrap_or(0),
            max_pieces: self.backend.tx_gather_max_pieces(),
            copy_next: false,
        };
        let backend = &mut self.backend;
        let gathering = max_piece.is_some();
        if gathering {
            pass.return_completed(backend.as_mut());
        }
        let mut recheck = Recheck::default();
        let mut popped_at_look = pass.popped;
        let result = loop {
            if pass.fault.is_some() {
                break Pass::Done;
            }
            if let Err(e) = pass.tx.disable_notification(pass.mem) {
                pass.fault = Some(WorkerFault::queue("tx", e));
                break Pass::Done;
            }
            pass.bytes = 0;
            let (sent, out_of_room) = if !gathering {
                backend.transmit(&mut |buf: &mut [u8]| pass.next_copied(buf))
            } else if !pass.copy_next {
                backend.transmit_gather(&mut |head: &mut [u8], pieces: &mut dyn TxPieces| {
                    pass.next_gathered(head, pieces)
                })
            } else {
                // What does not fit a head goes the copy way: the chain (or
                // the GSO frame) that did not, then back to gathering.
                pass.copy_next = false;
                let mut produced = false;
                backend.transmit(&mut |buf: &mut [u8]| {
                    if produced && pass.state.pending.is_none() {
                        return None;
                    }
                    let frame = pass.next_copied(buf);
                    produced |= frame.is_some();
                    frame
                })
            };
            if sent > 0 {
                add(&pass.counters.tx_packets, sent as u64);
                add(&pass.counters.tx_bytes, pass.bytes);
                add(&pass.counters.tx_batch_frames, sent as u64);
                add(&pass.counters.tx_batches, 1);
            }
            if gathering {
                pass.return_completed(backend.as_mut());
            }
            if pass.fault.is_some() {
                break Pass::Done;
            }
            if out_of_room {
                // Chains stay in the ring; the backend's fd turns writable when
                // there is room, and the guest need not notify meanwhile.
                add(&pass.counters.tx_ring_full, 1);
                break Pass::Blocked;
            }
            if pass.copy_next {
                continue;
            }
            if pass.taken >= pass.budget || pass.state.pending.is_some() {
                break Pass::MoreWork;
            }
            // Chains taken since the last look: a chain may be taken in a
            // gather batch and sent in the copy batch after it.
            let took = pass.popped > popped_at_look;
            popped_at_look = pass.popped;
            match recheck.more(pass.tx, pass.mem, took) {
                Ok(true) => {}
                Ok(false) => break Pass::Done,
                Err(e) => {
                    pass.fault = Some(e);
                    break Pass::Done;
                }
            }
        };
        let fault = pass.fault.take();
        // Return what was used before a fault, then report it.
        signal_used(
            &mut self.tx,
            used_before,
            &self.mem,
            &self.interrupt,
            &self.counters,
        );
        match fault {
            Some(fault) => Err(fault),
            None => Ok(result),
        }
    }

    /// Returns the chains whose tokens the old backend gave back, then
    /// gives up on the rest.
    fn retire_backend(&mut self, old: &mut dyn NetBackend) -> Result<(), WorkerFault> {
        let used_before = self.tx.next_used();
        let result = return_completed(old, &mut self.tx_state.held, &mut self.tx, &self.mem);
        old.disarm_unsent_gathers();
        signal_used(
            &mut self.tx,
            used_before,
            &self.mem,
            &self.interrupt,
            &self.counters,
        );
        result?;
        self.abandon_held_tx()
    }

    /// Returns every chain held for frames sent from guest memory: the
    /// backend that reads them is gone, or the link is down. Their tokens
    /// are ignored if they still come.
    fn abandon_held_tx(&mut self) -> Result<(), WorkerFault> {
        if self.tx_state.held.is_empty() {
            return Ok(());
        }
        // Before the guest has the buffers back: what the kernel has not
        // read yet would otherwise be read later, whatever they hold then.
        self.backend.disarm_unsent_gathers();
        let used_before = self.tx.next_used();
        let mut returned = 0u64;
        for head in self.tx_state.held.abandon() {
            self.tx
                .add_used(&self.mem, head, 0)
                .map_err(|e| WorkerFault::queue("tx", e))?;
            returned += 1;
        }
        add(&self.counters.tx_gather_abandoned, returned);
        signal_used(
            &mut self.tx,
            used_before,
            &self.mem,
            &self.interrupt,
            &self.counters,
        );
        Ok(())
    }

    /// Delivers up to a queue's worth of waiting frames into guest RX
    /// buffers, coalescing TCP segments where the guest takes GSO frames.
    fn process_rx(&mut self) -> Result<Pass, WorkerFault> {
        if !self.rx.ready() || !self.active_pairs.begin_receive(self.pair) {
            return Ok(self.drop_rx());
        }
        let result = self.receive_pass();
        self.active_pairs.end_receive(self.pair);
        result
    }

    /// [`Self::process_rx`] on a pair the guest uses.
    fn receive_pass(&mut self) -> Result<Pass, WorkerFault> {
        let offloads = rx_offloads(&self.guest_offloads);
        let Self {
            mem,
            rx,
            backend,
            counters,
            rx_state,
            tx_policy,
            ..
        } = self;
        let max_frame = tx_policy.max_frame;
        let RxState {
            writer,
            open,
            split,
        } = rx_state;
        let budget = usize::from(rx.size());
        let used_before = rx.next_used();
        let mut taken = 0usize;
        // Looks at the ring after running out of buffers: a guest that
        // posts unusable chains one at a time (returned at once, taking no
        // frame) would otherwise keep this pass going without end.
        let mut looks = 0usize;
        let mut fault = None;
        let pass = loop {
            let mut no_buffer = false;
            let mut bytes = 0u64;
            let mut dropped = 0u64;
            // Wire frames cut from packets beyond the MTU, past the first.
            let mut cut = 0u64;
            let delivered = backend.receive(&mut |frame: &[u8]| {
                if taken == budget || fault.is_some() {
                    return false;
                }
                let result = match split_plan(frame, offloads, max_frame) {
                    Some(plan) => deliver_split(
                        mem, rx, writer, open, frame, &plan, split, offloads, counters, budget,
                        max_frame,
                    ),
                    None => deliver_frame(
                        mem, rx, writer, open, frame, offloads, counters, budget, max_frame,
                    )
                    .map(|()| (1, frame.len() as u64)),
                };
                match result {
                    // A packet cut into wire frames none of which reached
                    // the guest counts as dropped.
                    Ok((0, _)) => {
                        taken += 1;
                        dropped += 1;
                        true
                    }
                    Ok((frames, frame_bytes)) => {
                        taken += 1;
                        cut += frames as u64 - 1;
                        bytes += frame_bytes;
                        true
                    }
                    Err(RxError::NoBuffers) => {
                        no_buffer = true;
                        false
                    }
                    // Dropped and counted (rx_dropped_too_big).
                    Err(RxError::TooBig) => {
                        taken += 1;
                        dropped += 1;
                        true
                    }
                    Err(RxError::Queue(e)) => {
                        fault = Some(WorkerFault::queue("rx", e));
                        false
                    }
                }
            });
            // Nothing waits for a later batch: a merged frame goes now.
            if let Err(e) = close_flow(mem, rx, writer, open, offloads, counters) {
                fault.get_or_insert(WorkerFault::queue("rx", format!("{e:?}")));
            }
            let received = (delivered as u64).saturating_sub(dropped) + cut;
            if received > 0 {
                add(&counters.rx_packets, received);
                add(&counters.rx_bytes, bytes);
                add(&counters.rx_batch_frames, received);
                add(&counters.rx_batches, 1);
            }
            if fault.is_some() {
                break Pass::Done;
            }
            if taken == budget {
                break Pass::MoreWork;
            }
            if !no_buffer {
                break Pass::Done;
            }
            // Out of guest buffers: ask for a notification, then look again
            // in case buffers arrived before the request was visible.
            let more = if writer.take_starved() {
                rx::wait_for_more_buffers(rx, mem).map_err(|e| WorkerFault::queue("rx", e))?
            } else {
                more_after_enable(rx, mem, "rx")?
            };
            if !more {
                add(&counters.rx_no_buffer_waits, 1);
                break Pass::Blocked;
            }
            looks += 1;
            if looks == budget {
                break Pass::MoreWork;
            }
        };
        // Unusable chains returned empty are used entries too; a frame over
        // several buffers counts whole (signal_used goes by the index).
        signal_used(
            &mut self.rx,
            used_before,
            &self.mem,
            &self.interrupt,
            &self.counters,
        );
        match fault {
            Some(fault) => Err(fault),
            None => Ok(pass),
        }
    }

    /// While the host link is down: returns up to a queue's worth of TX
    /// chains unsent, counted, rather than retrying a NIC that is not there.
    fn drop_tx(&mut self) -> Result<Pass, WorkerFault> {
        self.abandon_held_tx()?;
        let used_before = self.tx.next_used();
        let budget = usize::from(self.tx.size());
        let mut dropped = 0usize;
        if let Some(p) = self.tx_state.pending.take() {
            // A GSO chain part way out: its segments sent from guest
            // memory are held nowhere (a chain is held from its last one
            // on), so what the kernel has not read of them is disarmed
            // here, before the guest has its buffers back.
            self.backend.disarm_unsent_gathers();
            self.tx
                .add_used(&self.mem, p.head, 0)
                .map_err(|e| WorkerFault::queue("tx", e))?;
            dropped += 1;
        }
        let mut recheck = Recheck::default();
        let mut fault = None;
        let pass = loop {
            self.tx
                .disable_notification(&self.mem)
                .map_err(|e| WorkerFault::queue("tx", e))?;
            let dropped_before = dropped;
            while dropped < budget {
                let Some(chain) = next_chain(&mut self.tx, &self.mem, "tx")? else {
                    break;
                };
                self.tx
                    .add_used(&self.mem, chain.head_index(), 0)
                    .map_err(|e| WorkerFault::queue("tx", e))?;
                dropped += 1;
            }
            if dropped == budget {
                break Pass::MoreWork;
            }
            match recheck.more(&mut self.tx, &self.mem, dropped > dropped_before) {
                Ok(true) => {}
                Ok(false) => break Pass::Done,
                Err(e) => {
                    fault = Some(e);
                    break Pass::Done;
                }
            }
        };
        if dropped > 0 {
            add(&self.counters.tx_dropped_link_down, dropped as u64);
            signal_used(
                &mut self.tx,
                used_before,
                &self.mem,
                &self.interrupt,
                &self.counters,
            );
        }
        match fault {
            Some(fault) => Err(fault),
            None => Ok(pass),
        }
    }

    /// Drops (and counts) up to a queue's worth of frames that arrived for
    /// a pair the guest does not use: they must not wait in the backend to
    /// reach the guest stale, or fill its ring unnoticed.
    fn drop_rx(&mut self) -> Pass {
        let budget = usize::from(super::QUEUE_SIZE);
        let mut dropped = 0usize;
        let mut more = false;
        self.backend.receive(&mut |_frame: &[u8]| {
            if dropped == budget {
                more = true;
                return false;
            }
            dropped += 1;
            true
        });
        if dropped > 0 {
            add(&self.counters.rx_dropped_inactive, dropped as u64);
            crate::log_ratelimited!(
                log::Level::Info,
                "virtio-net: frames arrive on queue pair {} which the guest does not use; \
                 dropped and counted (give the guest as many pairs as the NIC has queues)",
                self.pair
            );
        }
        if more {
            Pass::MoreWork
        } else {
            Pass::Done
        }
    }

    /// Answers up to a queue's worth of control commands.
    fn process_ctrl(&mut self) -> Result<Pass, WorkerFault> {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Ok(Pass::Done);
        };
        let mem = &self.mem;
        let budget = usize::from(ctrl.queue.size());
        let used_before = ctrl.queue.next_used();
        let mut pass = Pass::Done;
        // Counts commands only: looking again after enabling notifications
        // must not step over the budget check.
        let mut taken = 0usize;
        loop {
            let chain = match next_chain(&mut ctrl.queue, mem, "control")? {
                Some(chain) => chain,
                // With EVENT_IDX the driver notifies only past avail_event:
                // publish it (by enabling notifications), then look again
                // for commands that came meanwhile.
                None if more_after_enable(&mut ctrl.queue, mem, "control")? => continue,
                None => break,
            };
            let head = chain.head_index();
            let allowed = CtrlAllowed {
                max_pairs: ctrl.max_pairs,
                mq: ctrl.mq,
                rx_mode: ctrl.rx_mode,
                guest_offloads: ctrl.guest_offloads_allowed,
            };
            let (used, effect) = handle_ctrl_chain(mem, chain, allowed, budget);
            // Applied before the ack: the guest may rely on the change once
            // it sees the command used.
            match effect {
                Some(CtrlEffect::Pairs(pairs)) => {
                    let pairs = usize::from(pairs);
                    self.active_pairs.set(pairs);
                    // No pair dropped here may fill its queue once the
                    // command is answered (5.1.6.5.5).
                    self.active_pairs.await_receives_from(pairs, "VQ_PAIRS_SET");
                    for waker in &ctrl.wakers {
                        if let Err(e) = waker.write(1) {
                            crate::error_ratelimited!("virtio-net: cannot wake a queue pair: {e}");
                        }
                    }
                }
                Some(CtrlEffect::GuestOffloads(bits)) => {
                    self.guest_offloads.store(bits, Ordering::SeqCst);
                    // The other pairs read the offloads once per receive
                    // pass: the passes that may still hand over GSO frames
                    // or checksum marks end before the answer.
                    self.active_pairs
                        .await_receives_from(1, "GUEST_OFFLOADS_SET");
                }
                Some(CtrlEffect::Promisc(on)) => self.link.update_rx_mode(|m| m.promisc = on),
                Some(CtrlEffect::AllMulti(on)) => self.link.update_rx_mode(|m| m.all_multi = on),
                Some(CtrlEffect::MacTable(table)) => self.link.update_rx_mode(|m| {
                    m.table = table.addresses;
                    m.table_len = table.len;
                    m.unicast_overflow = table.unicast_overflow;
                    m.multicast_overflow = table.multicast_overflow;
                    m.multicast_by_table = true;
                }),
                None => {}
            }
            ctrl.queue
                .add_used(mem, head, used)
                .map_err(|e| WorkerFault::queue("control", e))?;
            taken += 1;
            if taken >= budget {
                pass = Pass::MoreWork;
                break;
            }
        }
        signal_used(
            &mut ctrl.queue,
            used_before,
            mem,
            &self.interrupt,
            &self.counters,
        );
        Ok(pass)
    }
}

/// Blocks until `fd` is readable (the stop event), however long that is.
fn wait_readable(event: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n > 0
            || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
        {
            return;
        }
    }
}

/// Raises the used-ring interrupt.
fn raise(interrupt: &Interrupt, counters: &QueuePairCounters) {
    if let Err(e) = interrupt.signal(INTERRUPT_USED_RING) {
        crate::error_ratelimited!("virtio-net: cannot raise the interrupt: {e}");
    }
    add(&counters.interrupts, 1);
}

/// Raises the interrupt if the driver wants one (EVENT_IDX decides).
fn signal_used(
    queue: &mut Queue,
    used_before: u16,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    counters: &QueuePairCounters,
) {
    // Nothing new in the used ring: no interrupt. (Without EVENT_IDX
    // virtio-queue says "notify" every time, and a transmit queue waiting
    // for room looks again every millisecond.)
    let used_now = queue.next_used();
    if used_now == used_before {
        return;
    }
    match driver_wants_interrupt(queue, mem, used_before, used_now) {
        Ok(true) => raise(interrupt, counters),
        Ok(false) => {}
        Err(e) => {
            crate::warn_ratelimited!("virtio-net: cannot read the notification state: {e}");
            raise(interrupt, counters);
        }
    }
}

/// Whether the driver asked to hear of the used entries from `before` to
/// `now` (virtio 1.2 2.7.10): with EVENT_IDX, whether they pass its
/// used_event; without, unless it set VIRTQ_AVAIL_F_NO_INTERRUPT. Decided
/// here rather than by virtio-queue, which counts only entries add_used
/// wrote (a frame over several buffers writes all but its last itself) and
/// ignores the flag.
fn driver_wants_interrupt(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    before: u16,
    now: u16,
) -> Result<bool, virtio_queue::Error> {
    // Resets virtio-queue's count of entries added (its answer is ours
    // only as far as it goes), and orders the used index's store before
    // the loads below.
    let _ = queue.needs_notification(mem)?;
    let avail = GuestAddress(queue.avail_ring());
    let load = |offset: u64| -> Result<u16, virtio_queue::Error> {
        let at = avail
            .checked_add(offset)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(virtio_queue::Error::GuestMemory)
    };
    if queue.event_idx_enabled() {
        // used_event sits after the avail ring's entries.
        let used_event = load(4 + 2 * u64::from(queue.size()))?;
        Ok(now.wrapping_sub(used_event).wrapping_sub(1) < now.wrapping_sub(before))
    } else {
        const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
        Ok(load(0)? & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
    }
}

/// Delivers one frame from the backend: merged into the open flow if it
/// continues it, else as a frame of its own (which may open a flow).
#[allow(clippy::too_many_arguments)]
fn deliver_frame(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    w: &mut RxFrameWriter,
    open: &mut Option<OpenFlow>,
    frame: &[u8],
    offloads: RxOffloads,
    counters: &QueuePairCounters,
    max_descs: usize,
    max_frame: usize,
) -> Result<(), RxError> {
    let layout = rx::layout(frame);
    let gro = offloads.tso4 || offloads.tso6;
    let check = rx_csum::check_with(frame, layout, offloads.csum || gro);
    let seg = Segment::of(frame, layout, check).filter(|s| match s.ip() {
        Ip::V4 => offloads.tso4,
        Ip::V6 => offloads.tso6,
    });
    // Frames beyond the MTU (a host stack's whole GSO packet, as generic
    // XDP hands them over) reach the guest only as GSO frames cut at the
    // MTU; anything else that long the guest may not be given.
    if frame.len() > max_frame && seg.is_none() {
        add(&counters.rx_dropped_too_big, 1);
        return Err(RxError::TooBig);
    }
    if let (Some(flow), Some(s)) = (open.as_mut(), seg.as_ref()) {
        if flow.continues(s, frame) {
            let mark = w.mark();
            match w.write(queue, mem, &frame[s.header_len()..], max_descs) {
                Ok(()) => {
                    flow.merge(s, frame);
                    count_rx_checksum(counters, check);
                    return Ok(());
                }
                Err(RxError::Queue(e)) => return Err(RxError::Queue(e)),
                // No room left for it: the merged frame ends here.
                Err(_) => w.rewind(queue, mark),
            }
        }
    }
    close_flow(mem, queue, w, open, offloads, counters)?;
    let (repair, valid) = match check {
        RxChecksum::Valid => (None, true),
        RxChecksum::Completed { at, value } => (Some((at, value)), true),
        RxChecksum::Invalid | RxChecksum::Unchecked => (None, false),
    };
    if let Some(s) = seg {
        // Open a flow: its headers are written when it closes.
        let end = s.header_len();
        let mut headers = [0u8; MAX_HEADERS];
        headers[..end].copy_from_slice(&frame[..end]);
        if let Some((at, value)) = repair.filter(|&(at, _)| at + 2 <= end) {
            headers[at..at + 2].copy_from_slice(&value);
        }
        let started = w
            .begin(queue, mem, VNET_RESERVE + end, max_descs)
            .and_then(|()| w.write(queue, mem, &frame[end..], max_descs));
        if let Err(e) = started {
            return rx_failed(mem, queue, w, e, counters);
        }
        count_rx_checksum(counters, check);
        // A segment beyond the MTU (a whole GSO packet) is cut at the
        // MTU's segment size; one within it sets the size itself.
        let mss_cap = if frame.len() > max_frame {
            max_frame
                .saturating_sub(super::ETHERNET_VLAN_HEADER_LEN)
                .saturating_sub(end - s.l3())
                .max(1)
        } else {
            usize::MAX
        };
        *open = Some(OpenFlow::new(&s, &headers, mss_cap));
        return Ok(());
    }
    let written = w
        .begin(queue, mem, VNET_RESERVE, max_descs)
        .and_then(|()| match repair {
            Some((at, value)) => {
                w.write(queue, mem, &frame[..at], max_descs)?;
                w.write(queue, mem, &value, max_descs)?;
                w.write(queue, mem, &frame[at + 2..], max_descs)
            }
            None => w.write(queue, mem, frame, max_descs),
        });
    if let Err(e) = written {
        return rx_failed(mem, queue, w, e, counters);
    }
    let hdr = VirtioNetHdr {
        flags: if offloads.csum && valid {
            VIRTIO_NET_HDR_F_DATA_VALID
        } else {
            0
        },
        num_buffers: w.chains() as u16,
        ..Default::default()
    };
    add(&counters.rx_bad_descriptors, w.bad_chains() as u64);
    w.finish(queue, mem, &[&hdr.to_bytes()])?;
    count_rx_checksum(counters, check);
    Ok(())
}

fn count_rx_checksum(counters: &QueuePairCounters, check: RxChecksum) {
    match check {
        RxChecksum::Valid => add(&counters.rx_csum_verified, 1),
        RxChecksum::Completed { .. } => add(&counters.rx_csum_completed, 1),
        RxChecksum::Invalid => add(&counters.rx_csum_bad, 1),
        RxChecksum::Unchecked => {}
    }
}

/// How to cut `frame` into wire frames for the guest, where it is a TCP
/// packet longer than the MTU (a host stack's GSO packet, as generic XDP
/// hands them over) that the guest cannot take whole: it did not negotiate
/// GSO frames for its IP version, or the packet's flags keep it from being
/// one (CWR). As the kernel's software GSO would; a packet whose checksum
/// fails (rather than being left partial by its sender) is not cut, so
/// that no segment of it gets a fresh, valid checksum.
fn split_plan(frame: &[u8], offloads: RxOffloads, max_frame: usize) -> Option<Segmenter> {
    if frame.len() <= max_frame {
        return None;
    }
    let layout = rx::layout(frame)?;
    if layout.proto != super::offload::headers::IPPROTO_TCP {
        return None;
    }
    let ip_len = match layout.ip {
        Ip::V4 => usize::from(u16::from_be_bytes([
            frame[layout.l3 + 2],
            frame[layout.l3 + 3],
        ])),
        Ip::V6 => {
            40 + usize::from(u16::from_be_bytes([
                frame[layout.l3 + 4],
                frame[layout.l3 + 5],
            ]))
        }
    };
    // ACK, PSH, FIN, CWR, ECE: what a GSO packet may carry (no URG, whose
    // pointer would need fixing per segment).
    const SPLITTABLE_FLAGS: u8 = 0x10 | 0x08 | 0x01 | 0x80 | 0x40;
    let flags = frame[layout.l4 + 13];
    if layout.l3 + ip_len != frame.len() || flags & !SPLITTABLE_FLAGS != 0 {
        return None;
    }
    let check = rx_csum::check_with(frame, Some(layout), true);
    if !matches!(check, RxChecksum::Valid | RxChecksum::Completed { .. }) {
        return None;
    }
    let whole = Segment::of(frame, Some(layout), check).is_some_and(|s| match s.ip() {
        Ip::V4 => offloads.tso4,
        Ip::V6 => offloads.tso6,
    });
    if whole {
        return None;
    }
    let mss = max_frame
        .checked_sub(super::ETHERNET_VLAN_HEADER_LEN + layout.end - layout.l3)
        .filter(|&mss| mss > 0)?;
    let ecn = if flags & 0x80 != 0 {
        super::offload::VIRTIO_NET_HDR_GSO_ECN
    } else {
        0
    };
    let hdr = VirtioNetHdr {
        gso_type: ecn
            | match layout.ip {
                Ip::V4 => super::offload::VIRTIO_NET_HDR_GSO_TCPV4,
                Ip::V6 => super::offload::VIRTIO_NET_HDR_GSO_TCPV6,
            },
        gso_size: u16::try_from(mss).ok()?,
        ..Default::default()
    };
    let all = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
        uso: false,
    };
    Segmenter::new(&hdr, all, &frame[..layout.end], frame.len()).ok()
}

/// Delivers `frame` cut as `plan` says, in order, each wire frame with its
/// checksum filled. The packet waits while the guest has no buffers; with
/// some, it goes out as far as they reach and the rest is dropped and
/// counted (as a NIC's full ring drops), never delivered twice: waiting
/// for as many buffers as it has wire frames would stall the queue for
/// good behind a driver that keeps fewer posted (iPXE keeps 8). Returns
/// the wire frames delivered and their bytes.
#[allow(clippy::too_many_arguments)]
fn deliver_split(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    w: &mut RxFrameWriter,
    open: &mut Option<OpenFlow>,
    frame: &[u8],
    plan: &Segmenter,
    scratch: &mut Vec<u8>,
    offloads: RxOffloads,
    counters: &QueuePairCounters,
    max_descs: usize,
    max_frame: usize,
) -> Result<(usize, u64), RxError> {
    if scratch.len() < max_frame {
        scratch.resize(max_frame, 0);
    }
    let headers = &frame[..plan.header_len()];
    let mut bytes = 0u64;
    let mut delivered = 0usize;
    for i in 0..plan.segments() {
        let len = plan.segment_len(i);
        let (at, n) = plan.payload(i);
        let seg = &mut scratch[..len];
        seg[plan.header_len()..].copy_from_slice(&frame[at..at + n]);
        plan.finish_segment(i, headers, seg, false);
        match deliver_frame(
            mem, queue, w, open, seg, offloads, counters, max_descs, max_frame,
        ) {
            Ok(()) => {
                delivered += 1;
                bytes += len as u64;
            }
            Err(RxError::Queue(e)) => return Err(RxError::Queue(e)),
            Err(RxError::NoBuffers) if i == 0 => return Err(RxError::NoBuffers),
            // Dropped and counted (rx_dropped_too_big).
            Err(RxError::TooBig) => {}
            Err(RxError::NoBuffers) => {
                add(&counters.rx_gso_split_dropped, (plan.segments() - i) as u64);
                // The packet is done with: nothing of it waits for buffers.
                w.take_starved();
                break;
            }
        }
    }
    add(&counters.rx_gso_split, 1);
    add(&counters.rx_gso_split_segments, plan.segments() as u64);
    Ok((delivered, bytes))
}

/// A frame could not be written: without buffers it waits (what was taken
/// goes back, but for unusable chains, which are returned); too big, it is
/// dropped and its chains returned empty.
fn rx_failed(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    w: &mut RxFrameWriter,
    e: RxError,
    counters: &QueuePairCounters,
) -> Result<(), RxError> {
    match e {
        RxError::NoBuffers if w.chains() == 0 => {
            add(&counters.rx_bad_descriptors, w.bad_chains() as u64);
            w.discard(queue, mem)?;
            Err(RxError::NoBuffers)
        }
        RxError::NoBuffers => {
            w.rewind(queue, RxFrameWriter::start_mark());
            w.set_starved();
            Err(RxError::NoBuffers)
        }
        RxError::TooBig => {
            add(&counters.rx_dropped_too_big, 1);
            add(&counters.rx_bad_descriptors, w.bad_chains() as u64);
            w.discard(queue, mem)?;
            Err(RxError::TooBig)
        }
        RxError::Queue(e) => Err(RxError::Queue(e)),
    }
}

/// Hands the open merged frame, if any, to the guest.
fn close_flow(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    w: &mut RxFrameWriter,
    open: &mut Option<OpenFlow>,
    offloads: RxOffloads,
    counters: &QueuePairCounters,
) -> Result<(), RxError> {
    let Some(mut flow) = open.take() else {
        return Ok(());
    };
    let segments = flow.segments();
    let (vnet, headers) = flow.finish(offloads.csum, w.chains() as u16);
    add(&counters.rx_bad_descriptors, w.bad_chains() as u64);
    w.finish(queue, mem, &[&vnet.to_bytes(), headers])?;
    if segments > 1 {
        add(&counters.rx_gro_frames, 1);
        add(&counters.rx_gro_segments, segments as u64);
    }
    Ok(())
}

/// Which control commands the negotiated features allow.
#[derive(Debug, Clone, Copy)]
struct CtrlAllowed {
    max_pairs: u16,
    mq: bool,
    rx_mode: bool,
    /// Receive offload bits the guest may switch (0: the command is refused).
    guest_offloads: u64,
}

/// A MAC filter table as VIRTIO_NET_CTRL_MAC_TABLE_SET sets it.
struct MacTable {
    addresses: [[u8; 6]; MAC_TABLE_MAX],
    len: usize,
    unicast_overflow: bool,
    multicast_overflow: bool,
}

/// What an accepted control command changes.
enum CtrlEffect {
    Pairs(u16),
    GuestOffloads(u64),
    Promisc(bool),
    AllMulti(bool),
    MacTable(Box<MacTable>),
}

/// Answers one control command; returns the bytes written (the ack) and
/// what the command changes, if it was accepted.
fn handle_ctrl_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    allowed: CtrlAllowed,
    max_descs: usize,
) -> (u32, Option<CtrlEffect>) {
    let mut command = [0u8; CTRL_COMMAND_MAX];
    let mut command_len = 0usize;
    let mut truncated = false;
    let mut ack_addr = None;
    for desc in chain.take(max_descs) {
        if desc.is_write_only() {
            // The ack is one byte: only a buffer with room for it will do.
            if desc.len() > 0 {
                ack_addr.get_or_insert(desc.addr());
            }
            continue;
        }
        let len = desc.len() as usize;
        let n = len.min(command.len() - command_len);
        truncated |= n < len;
        if n > 0
            && mem
                .read_slice(&mut command[command_len..command_len + n], desc.addr())
                .is_ok()
        {
            command_len += n;
        }
    }
    let effect = parse_ctrl_command(&command[..command_len], truncated, allowed);
    let status = if effect.is_some() {
        VIRTIO_NET_OK
    } else {
        VIRTIO_NET_ERR
    };
    let written = match ack_addr {
        Some(addr) if mem.write_obj(status, addr).is_ok() => 1,
        _ => 0,
    };
    (written, effect)
}

/// The effect of an acceptable command; None for anything refused.
fn parse_ctrl_command(command: &[u8], truncated: bool, allowed: CtrlAllowed) -> Option<CtrlEffect> {
    let (&class, rest) = command.split_first()?;
    let (&cmd, data) = rest.split_first()?;
    match (class, cmd) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if allowed.mq => {
            let pairs = u16::from_le_bytes(data.try_into().ok()?);
            (1..=allowed.max_pairs)
                .contains(&pairs)
                .then_some(CtrlEffect::Pairs(pairs))
        }
        (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET)
            if allowed.guest_offloads != 0 =>
        {
            // Only offloads that were negotiated may be switched on (5.1.6.5.6.1).
            let bits = u64::from_le_bytes(data.try_into().ok()?);
            (bits & !allowed.guest_offloads == 0).then_some(CtrlEffect::GuestOffloads(bits))
        }
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI)
            if allowed.rx_mode =>
        {
            let [on] = <[u8; 1]>::try_from(data).ok()?;
            let on = on != 0;
            Some(if cmd == VIRTIO_NET_CTRL_RX_PROMISC {
                CtrlEffect::Promisc(on)
            } else {
                CtrlEffect::AllMulti(on)
            })
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if allowed.rx_mode => {
            parse_mac_tables(data, truncated).map(|t| CtrlEffect::MacTable(Box::new(t)))
        }
        _ => None,
    }
}

/// Two `virtio_net_ctrl_mac` tables, unicast then multicast. A command cut
/// short by our buffer can only be tables larger than ours.
fn parse_mac_tables(mut data: &[u8], truncated: bool) -> Option<MacTable> {
    let mut table = MacTable {
        addresses: [[0; 6]; MAC_TABLE_MAX],
        len: 0,
        unicast_overflow: false,
        multicast_overflow: false,
    };
    for multicast in [false, true] {
        let Some((count, rest)) = data.split_first_chunk::<4>() else {
            if truncated {
                table.unicast_overflow |= !multicast;
                table.multicast_overflow = true;
                return Some(table);
            }
            return None;
        };
        let count = u32::from_le_bytes(*count) as usize;
        let Some(bytes) = count.checked_mul(6).filter(|&b| b <= rest.len()) else {
            if truncated {
                table.unicast_overflow |= !multicast;
                table.multicast_overflow = true;
                return Some(table);
            }
            return None;
        };
        for mac in rest[..bytes].chunks_exact(6) {
            match table.addresses.get_mut(table.len) {
                Some(slot) => {
                    slot.copy_from_slice(mac);
                    table.len += 1;
                }
                None if multicast => table.multicast_overflow = true,
                None => table.unicast_overflow = true,
            }
        }
        data = &rest[bytes..];
    }
    Some(table)
}
