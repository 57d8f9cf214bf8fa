//! The receive side of a queue pair's IO thread: frames from the backend
//! into guest RX buffers, one buffer chain per frame or, with
//! VIRTIO_NET_F_MRG_RXBUF, as many as a frame needs; and receive
//! coalescing (GRO) for guests with GUEST_TSO4/6: in-order TCP segments of
//! one flow that arrive in one batch become one large frame, headers
//! fixed up and handed over as a GSO frame, written straight into guest
//! buffers as they come. Nothing waits for a later batch.
//!
//! A frame becomes visible to the guest in one step: all of its chains
//! are written to the used ring first, then the used index moves once, so
//! a driver polling concurrently never sees part of a merged frame.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::guest_copy;
use super::offload::csum;
use super::offload::gso::MAX_HEADERS;
use super::offload::headers::{self, Ip, Layout, IPPROTO_TCP};
use super::offload::rx::RxChecksum;
use super::offload::{
    VirtioNetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use super::worker::NET_HDR_LEN;

/// Most buffer chains one frame may take (MRG_RXBUF): a 64 KiB frame in
/// Linux's smallest mergeable buffers needs about 44.
pub(crate) const RX_CHAINS_MAX: usize = 64;
/// Descriptors reserved for one frame's chains: enough for the usual
/// (Linux's mergeable buffers have one each, its big buffers 19). More
/// grow the list, up to RX_CHAINS_MAX chains of a queue's worth each.
const RX_DESCS_RESERVED: usize = 256;
/// The largest merged TCP frame's IP datagram, as GRO makes them.
const GRO_MAX_IP_LEN: usize = 65_535;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_ACK: u8 = 0x10;
/// Virtqueue used ring: flags and index, then 8-byte elements.
const USED_RING_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

#[derive(Debug)]
pub(crate) enum RxError {
    /// The guest has no (more) buffers: the frame waits, nothing is lost.
    NoBuffers,
    /// The frame does not fit the buffers the guest gives for one frame.
    TooBig,
    /// The queue cannot be used any more.
    Queue(virtio_queue::Error),
}

/// Where writing stands: enough to give back what was taken since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    chains: usize,
    bad: usize,
    descs: usize,
    popped: usize,
    desc: usize,
    off: usize,
    len: usize,
}

/// Writes one frame into guest RX buffers. Its storage is reserved once
/// per worker; the datapath allocates nothing.
pub(crate) struct RxFrameWriter {
    /// MRG_RXBUF: a frame may span several chains.
    mergeable: bool,
    /// The frame's chains: head, and index of its first descriptor in `descs`.
    chains: Vec<(u16, usize)>,
    /// Unusable chains met on the way (readable descriptors, outside guest
    /// memory, too long): returned with length 0 when the frame is done.
    bad: Vec<u16>,
    /// Descriptors of every chain of the frame, in order: (address, length).
    descs: Vec<(GuestAddress, usize)>,
    /// Chains taken from the avail ring for this frame, good and bad.
    popped: usize,
    /// Write position: descriptor index and offset in it.
    desc: usize,
    off: usize,
    /// Bytes of the frame so far, the reserved header room included.
    len: usize,
    /// The guest had buffers, but not enough for the frame at hand.
    starved: bool,
}

impl RxFrameWriter {
    pub fn new(mergeable: bool) -> Self {
        Self {
            mergeable,
            chains: Vec::with_capacity(RX_CHAINS_MAX),
            bad: Vec::with_capacity(RX_CHAINS_MAX),
            descs: Vec::with_capacity(RX_DESCS_RESERVED),
            popped: 0,
            desc: 0,
            off: 0,
            len: 0,
            starved: false,
        }
    }

    /// Records that the guest's buffers did not hold the frame at hand
    /// (they were given back): waiting for "any buffer" would spin.
    pub fn set_starved(&mut self) {
        self.starved = true;
    }

    pub fn take_starved(&mut self) -> bool {
        std::mem::take(&mut self.starved)
    }

    pub fn mark(&self) -> Mark {
        Mark {
            chains: self.chains.len(),
            bad: self.bad.len(),
            descs: self.descs.len(),
            popped: self.popped,
            desc: self.desc,
            off: self.off,
            len: self.len,
        }
    }

    /// Gives back every chain taken since `mark` (they stay available for
    /// the next frame) and writes from there again.
    pub fn rewind(&mut self, queue: &mut Queue, mark: Mark) {
        for _ in mark.popped..self.popped {
            queue.go_to_previous_position();
        }
        self.chains.truncate(mark.chains);
        self.bad.truncate(mark.bad);
        self.descs.truncate(mark.descs);
        self.popped = mark.popped;
        self.desc = mark.desc;
        self.off = mark.off;
        self.len = mark.len;
    }

    /// Starts a frame in a new chain, leaving `reserve` bytes at its start
    /// for the headers written by [`RxFrameWriter::finish`]; that room must
    /// lie in the first chain.
    pub fn begin(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        reserve: usize,
        max_descs: usize,
    ) -> Result<(), RxError> {
        self.chains.clear();
        self.bad.clear();
        self.descs.clear();
        self.popped = 0;
        self.desc = 0;
        self.off = 0;
        self.len = 0;
        loop {
            self.next_chain(queue, mem, max_descs)?;
            let room: usize = self.descs.iter().map(|d| d.1).sum();
            if room >= reserve {
                break;
            }
            // Too small even for the headers: unusable as a first buffer.
            let Some((head, _)) = self.chains.pop() else {
                continue;
            };
            self.bad.push(head);
            self.descs.clear();
        }
        self.skip(reserve);
        Ok(())
    }

    /// Moves the write position `n` bytes on within the current chain.
    fn skip(&mut self, mut n: usize) {
        while n > 0 && self.desc < self.descs.len() {
            let step = (self.descs[self.desc].1 - self.off).min(n);
            n -= step;
            self.off += step;
            self.len += step;
            if self.off == self.descs[self.desc].1 {
                self.desc += 1;
                self.off = 0;
            }
        }
    }

    /// Takes the next usable chain from the avail ring; unusable ones are
    /// kept aside (returned with length 0 later).
    fn next_chain(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        max_descs: usize,
    ) -> Result<(), RxError> {
        loop {
            if self.chains.len() + self.bad.len() >= RX_CHAINS_MAX {
                return Err(RxError::TooBig);
            }
            let size = queue.size();
            let mut iter = queue.iter(mem).map_err(RxError::Queue)?;
            let Some(chain) = iter.next() else {
                return Err(RxError::NoBuffers);
            };
            self.popped += 1;
            let head = chain.head_index();
            if head >= size {
                return Err(RxError::Queue(virtio_queue::Error::InvalidDescriptorIndex));
            }
            let first = self.descs.len();
            let mut usable = true;
            for (i, desc) in chain.enumerate() {
                let len = desc.len() as usize;
                if i == max_descs || !desc.is_write_only() || !mem.check_range(desc.addr(), len) {
                    usable = false;
                    break;
                }
                if len > 0 {
                    self.descs.push((desc.addr(), len));
                }
            }
            if usable && self.descs.len() > first {
                self.chains.push((head, first));
                return Ok(());
            }
            self.descs.truncate(first);
            self.bad.push(head);
        }
    }

    /// Appends `data` to the frame, taking further chains as needed (with
    /// MRG_RXBUF; without, a frame that outgrows its chain is TooBig).
    pub fn write(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        mut data: &[u8],
        max_descs: usize,
    ) -> Result<(), RxError> {
        while !data.is_empty() {
            if self.desc == self.descs.len() {
                if !self.mergeable {
                    return Err(RxError::TooBig);
                }
                self.next_chain(queue, mem, max_descs)?;
            }
            let (addr, len) = self.descs[self.desc];
            let n = (len - self.off).min(data.len());
            let at = addr.checked_add(self.off as u64).ok_or(RxError::TooBig)?;
            // The range was checked when the chain was taken.
            if !guest_copy::write(mem, at, &data[..n]) {
                return Err(RxError::TooBig);
            }
            data = &data[n..];
            self.off += n;
            self.len += n;
            if self.off == len {
                self.desc += 1;
                self.off = 0;
            }
        }
        Ok(())
    }

    /// Writes `parts` at the frame's start (the reserved room), then makes
    /// the frame visible: its chains' used entries first, then the used
    /// index once. Unusable chains met on the way go back with length 0.
    /// Returns the number of chains the frame took.
    pub fn finish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        parts: &[&[u8]],
    ) -> Result<usize, RxError> {
        let mut at = 0usize;
        for part in parts {
            self.write_at(mem, at, part)?;
            at += part.len();
        }
        for &head in &self.bad {
            queue.add_used(mem, head, 0).map_err(RxError::Queue)?;
        }
        let n = self.chains.len();
        // Bytes written into each chain: all of it for those before the
        // write position, up to it for the last.
        let mut remaining = self.len;
        let lens = (0..n).map(|k| {
            let first = self.chains[k].1;
            let end = self.chains.get(k + 1).map_or(self.descs.len(), |c| c.1);
            let room: usize = self.descs[first..end].iter().map(|d| d.1).sum();
            let used = room.min(remaining);
            remaining -= used;
            used as u32
        });
        if n == 1 {
            let len = lens.last().unwrap_or(0);
            queue
                .add_used(mem, self.chains[0].0, len)
                .map_err(RxError::Queue)?;
        } else if n > 1 {
            // All but the last entry straight into the ring, not yet
            // visible; add_used writes the last one and moves the index past
            // them all at once.
            let ring = GuestAddress(queue.used_ring());
            let size = queue.size();
            let next = queue.next_used();
            let mut last_len = 0;
            for (k, len) in lens.enumerate() {
                if k + 1 == n {
                    last_len = len;
                    break;
                }
                let slot = u64::from(next.wrapping_add(k as u16) % size);
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&u32::from(self.chains[k].0).to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                let addr = ring
                    .checked_add(USED_RING_HEADER + slot * USED_ELEMENT)
                    .ok_or(RxError::Queue(virtio_queue::Error::AddressOverflow))?;
                mem.write_slice(&elem, addr)
                    .map_err(|e| RxError::Queue(virtio_queue::Error::GuestMemory(e)))?;
            }
            queue.set_next_used(next.wrapping_add(n as u16 - 1));
            queue
                .add_used(mem, self.chains[n - 1].0, last_len)
                .map_err(RxError::Queue)?;
        }
        self.chains.clear();
        self.bad.clear();
        self.descs.clear();
        self.popped = 0;
        Ok(n)
    }

    /// Returns every chain taken for this frame to the guest with length 0
    /// (a frame that cannot be delivered, dropped).
    pub fn discard(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), RxError> {
        // In the order `finish` uses: unusable chains first.
        for &head in &self.bad {
            queue.add_used(mem, head, 0).map_err(RxError::Queue)?;
        }
        for &(head, _) in &self.chains {
            queue.add_used(mem, head, 0).map_err(RxError::Queue)?;
        }
        self.chains.clear();
        self.bad.clear();
        self.descs.clear();
        self.popped = 0;
        Ok(())
    }

    /// Chains met that could not be used, so far in this frame.
    pub fn bad_chains(&self) -> usize {
        self.bad.len()
    }

    /// Usable chains the frame has taken so far.
    pub fn chains(&self) -> usize {
        self.chains.len()
    }

    /// The position of a writer with nothing taken: rewinding there gives
    /// back everything since [`RxFrameWriter::begin`].
    pub fn start_mark() -> Mark {
        Mark {
            chains: 0,
            bad: 0,
            descs: 0,
            popped: 0,
            desc: 0,
            off: 0,
            len: 0,
        }
    }

    /// Writes `data` at frame offset `at` (within what was written or reserved).
    fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        mut at: usize,
        mut data: &[u8],
    ) -> Result<(), RxError> {
        for &(addr, len) in &self.descs {
            if data.is_empty() {
                break;
            }
            if at >= len {
                at -= len;
                continue;
            }
            let n = (len - at).min(data.len());
            let to = addr.checked_add(at as u64).ok_or(RxError::TooBig)?;
            if !guest_copy::write(mem, to, &data[..n]) {
                return Err(RxError::TooBig);
            }
            data = &data[n..];
            at = 0;
        }
        if data.is_empty() {
            Ok(())
        } else {
            Err(RxError::TooBig)
        }
    }
}

/// A TCP segment that may be coalesced: plain TCP over IPv4 (no IP
/// options) or IPv6 (no extension headers), ACK with or without PSH, some
/// payload, checksum verified, no Ethernet padding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    layout: Layout,
    seq: u32,
    psh: bool,
    payload: usize,
}

impl Segment {
    pub fn of(frame: &[u8], layout: Option<Layout>, checksum: RxChecksum) -> Option<Self> {
        let l = layout?;
        if l.proto != IPPROTO_TCP
            || !matches!(checksum, RxChecksum::Valid | RxChecksum::Completed { .. })
        {
            return None;
        }
        let ip_len = match l.ip {
            // The header checksum verified, as GRO does: a merged frame's
            // header gets a fresh one, which would hide a damaged header.
            Ip::V4
                if l.l4 == l.l3 + 20 && csum::fold(csum::add(0, &frame[l.l3..l.l4])) == 0xffff =>
            {
                usize::from(u16::from_be_bytes([frame[l.l3 + 2], frame[l.l3 + 3]]))
            }
            Ip::V6 if l.l4 == l.l3 + 40 => {
                40 + usize::from(u16::from_be_bytes([frame[l.l3 + 4], frame[l.l3 + 5]]))
            }
            _ => return None,
        };
        let flags = frame[l.l4 + 13];
        if l.l3 + ip_len != frame.len()
            // FIN may end a segment (a host's GSO packet often carries the
            // stream's last bytes); a flow never merges past it:
            // continues() wants the first segment's flags but PSH, and
            // nothing after a FIN.
            || flags & !(TCP_FLAG_ACK | TCP_FLAG_PSH | TCP_FLAG_FIN) != 0
            || flags & TCP_FLAG_ACK == 0
            || frame.len() == l.end
        {
            return None;
        }
        Some(Self {
            layout: l,
            seq: u32::from_be_bytes([
                frame[l.l4 + 4],
                frame[l.l4 + 5],
                frame[l.l4 + 6],
                frame[l.l4 + 7],
            ]),
            psh: flags & TCP_FLAG_PSH != 0,
            payload: frame.len() - l.end,
        })
    }

    pub fn ip(&self) -> Ip {
        self.layout.ip
    }

    pub fn header_len(&self) -> usize {
        self.layout.end
    }

    /// Where the IP header starts.
    pub fn l3(&self) -> usize {
        self.layout.l3
    }
}

/// A merged frame being written: the first segment's headers (kept here
/// and written last, with lengths and flags fixed), where the flow goes on.
pub(crate) struct OpenFlow {
    layout: Layout,
    headers: [u8; MAX_HEADERS],
    next_seq: u32,
    mss: usize,
    payload: usize,
    segments: usize,
    psh: bool,
}

impl OpenFlow {
    /// Opens a flow with `frame`'s headers (the checksum repair, if any,
    /// already applied to `frame_headers`). `mss_cap`: the largest segment
    /// the guest's MTU allows; a longer first segment (a whole GSO packet)
    /// makes the flow a GSO frame of segments that size.
    pub fn new(seg: &Segment, frame_headers: &[u8], mss_cap: usize) -> Self {
        let mut headers = [0u8; MAX_HEADERS];
        headers[..seg.layout.end].copy_from_slice(&frame_headers[..seg.layout.end]);
        Self {
            layout: seg.layout,
            headers,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            mss: seg.payload.min(mss_cap).max(1),
            payload: seg.payload,
            segments: 1,
            psh: seg.psh,
        }
    }

    /// Whether `seg` (in `frame`) continues this flow in order and may be
    /// merged: same addresses, ports, ack, options and IP fields GRO
    /// compares; no bigger than the first; the flow not ended by PSH, FIN
    /// or a short segment; the result within an IP datagram's 64 KiB.
    pub fn continues(&self, seg: &Segment, frame: &[u8]) -> bool {
        let l = &self.layout;
        if seg.layout != *l
            || seg.seq != self.next_seq
            || seg.payload > self.mss
            || self.psh
            || self.headers[l.l4 + 13] & TCP_FLAG_FIN != 0
            || self.payload < self.mss * self.segments
            || l.end - l.l3 + self.payload + seg.payload > GRO_MAX_IP_LEN
        {
            return false;
        }
        let h = &self.headers;
        // Ethernet, then the IP header but its length, id and checksum.
        let ip_same = match l.ip {
            Ip::V4 => {
                frame[..l.l3 + 2] == h[..l.l3 + 2]
                    && frame[l.l3 + 6..l.l3 + 10] == h[l.l3 + 6..l.l3 + 10]
                    && frame[l.l3 + 12..l.l4] == h[l.l3 + 12..l.l4]
            }
            Ip::V6 => {
                frame[..l.l3 + 4] == h[..l.l3 + 4] && frame[l.l3 + 6..l.l4] == h[l.l3 + 6..l.l4]
            }
        };
        // Ports, ack, data offset and flags but PSH, options.
        ip_same
            && frame[l.l4..l.l4 + 4] == h[l.l4..l.l4 + 4]
            && frame[l.l4 + 8..l.l4 + 13] == h[l.l4 + 8..l.l4 + 13]
            && frame[l.l4 + 13] & !TCP_FLAG_PSH == h[l.l4 + 13] & !TCP_FLAG_PSH
            && frame[l.l4 + 20..l.end] == h[l.l4 + 20..l.end]
    }

    /// Takes `seg` (its payload already written): the newest window counts.
    pub fn merge(&mut self, seg: &Segment, frame: &[u8]) {
        let l4 = self.layout.l4;
        self.headers[l4 + 14..l4 + 16].copy_from_slice(&frame[l4 + 14..l4 + 16]);
        self.next_seq = self.next_seq.wrapping_add(seg.payload as u32);
        self.payload += seg.payload;
        self.segments += 1;
        self.psh |= seg.psh;
    }

    pub fn segments(&self) -> usize {
        self.segments
    }

    /// The headers to write in front of the merged payload, and the
    /// virtio-net header. One segment goes as it came (checksum valid);
    /// several become a GSO frame whose checksum the guest may leave
    /// partial (NEEDS_CSUM, the field holding the pseudo-header sum), as
    /// Linux's own GRO hands them on.
    pub fn finish(&mut self, data_valid: bool, num_buffers: u16) -> (VirtioNetHdr, &[u8]) {
        let l = self.layout;
        let mut vnet = VirtioNetHdr {
            num_buffers,
            ..Default::default()
        };
        if self.segments == 1 && self.payload <= self.mss {
            if data_valid {
                vnet.flags = VIRTIO_NET_HDR_F_DATA_VALID;
            }
            return (vnet, &self.headers[..l.end]);
        }
        let h = &mut self.headers;
        match l.ip {
            Ip::V4 => {
                let total = (l.end - l.l3 + self.payload) as u16;
                h[l.l3 + 2..l.l3 + 4].copy_from_slice(&total.to_be_bytes());
                h[l.l3 + 10..l.l3 + 12].fill(0);
                let c = csum::finish(csum::add(0, &h[l.l3..l.l4]));
                h[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
                vnet.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
            }
            Ip::V6 => {
                let len = (l.end - l.l3 - 40 + self.payload) as u16;
                h[l.l3 + 4..l.l3 + 6].copy_from_slice(&len.to_be_bytes());
                vnet.gso_type = VIRTIO_NET_HDR_GSO_TCPV6;
            }
        }
        if self.psh {
            h[l.l4 + 13] |= TCP_FLAG_PSH;
        }
        let pseudo = csum::fold(l.pseudo_sum(&h[..], l.end - l.l4 + self.payload));
        h[l.l4 + 16..l.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        vnet.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vnet.hdr_len = l.end as u16;
        vnet.gso_size = self.mss as u16;
        vnet.csum_start = l.l4 as u16;
        vnet.csum_offset = 16;
        (vnet, &self.headers[..l.end])
    }
}

/// The guest has buffers, but not enough for the waiting frame: asks to
/// be notified when it adds more (with EVENT_IDX, once the avail index
/// passes where it is now, not merely where the device stands), then
/// looks once more. True if more came meanwhile.
pub(crate) fn wait_for_more_buffers(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    use std::sync::atomic::{fence, Ordering};
    let seen = queue.avail_idx(mem, Ordering::Acquire)?;
    queue.enable_notification(mem)?;
    if queue.event_idx_enabled() {
        // avail_event sits after the used ring's elements.
        let at = GuestAddress(queue.used_ring())
            .checked_add(USED_RING_HEADER + u64::from(queue.size()) * USED_ELEMENT)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(seen.0.to_le(), at, Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire)? != seen)
}

/// The layout of a frame, for [`Segment::of`].
pub(crate) fn layout(frame: &[u8]) -> Option<Layout> {
    headers::parse(frame)
}

/// Bytes reserved at the start of a frame for the virtio-net header.
pub(crate) const VNET_RESERVE: usize = NET_HDR_LEN;
