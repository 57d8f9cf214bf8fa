//! UMEM: the packet buffer area shared with the kernel, and the ledger that
//! says who owns each frame.
//!
//! Frames are split once into two pools. The receive pool (`rx_frames`)
//! circulates fill ring → kernel → rx ring → caller → fill ring; the
//! transmit pool (`tx_frames`) circulates free stack → tx ring → kernel →
//! completion ring → free stack. The rings are sized to their pool, so a
//! producer ring always has room for every frame of its pool and neither
//! side can ever be short of slots — only of frames.

use std::io;
use std::ptr::NonNull;

/// One frame's owner. Every address the kernel hands back is checked
/// against this, so a frame can neither leak nor be handed out twice
/// without it showing up in [`FrameAccounting`] / the `bad_addrs` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Owner {
    /// In the transmit free stack, ours to write.
    Free,
    /// Given to the kernel for receiving (fill ring, or in the rx ring).
    KernelRx,
    /// Given to the kernel for transmitting (tx or completion ring).
    KernelTx,
    /// Received and consumed, waiting for room in the fill ring.
    Recycling,
}

/// Frame counts by owner, from [`crate::XskQueue::frame_accounting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameAccounting {
    /// All frames in the UMEM.
    pub total: u32,
    /// Transmit frames free for the caller to fill (whole free slots).
    pub tx_free: u32,
    /// Transmit frames in slots that are out: sent (tx or completion
    /// ring), or unused parts of a slot whose other frames are.
    pub tx_in_kernel: u32,
    /// Receive frames in the fill or rx ring.
    pub rx_in_kernel: u32,
    /// Receive frames consumed and waiting to go back to the fill ring.
    pub rx_recycling: u32,
}

/// Memory the caller owns that every queue of one NIC registers as its
/// UMEM (`umem=guest`): guest RAM in `[0, guest_len)`, then (from
/// `area_start` on, after other NICs' areas if there are several) the
/// queues' own frames, queue `i`'s [`crate::AfXdpConfig::umem`] bytes at
/// `area_start + i * bytes_per_queue`. The kernel may read and write all
/// of it; the queues touch only their own frames in the area, and send
/// from guest memory only inside `[0, guest_len)`.
#[derive(Debug, Clone, Copy)]
pub struct UmemRegion {
    ptr: NonNull<u8>,
    len: usize,
    guest_len: usize,
    area_start: usize,
}

// SAFETY: a description of memory that lives for the rest of the process
// (UmemRegion::new's contract); who writes which part is coordinated by
// the queues' ledgers and, for guest RAM, by the guest and vm-memory.
unsafe impl Send for UmemRegion {}
// SAFETY: as above; the value itself is immutable.
unsafe impl Sync for UmemRegion {}

impl UmemRegion {
    /// Describes `[ptr, ptr + len)`: guest memory its first `guest_len`
    /// bytes, the queues' area from `area_start` on.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must be a read-write private or shared mapping of
    /// this process that is never unmapped or remapped while the process
    /// lives (sockets registered on it, and frames they return, may
    /// outlive any owner the caller could name), and everything else that
    /// touches it must tolerate the kernel writing it at any time (as
    /// vm-memory's volatile accessors do for guest memory).
    pub unsafe fn new(
        ptr: *mut u8,
        len: usize,
        guest_len: usize,
        area_start: usize,
    ) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let ptr = NonNull::new(ptr)
            .filter(|p| (p.as_ptr() as usize).is_multiple_of(page))
            .ok_or_else(|| io::Error::other("a UMEM region must start on a page"))?;
        if !len.is_multiple_of(page)
            || !area_start.is_multiple_of(page)
            || area_start >= len
            || guest_len > area_start
        {
            return Err(io::Error::other(format!(
                "a UMEM region is whole pages with guest memory first and its queue area \
                 inside ({len:#x} bytes, guest memory {guest_len:#x}, area from {area_start:#x})"
            )));
        }
        Ok(UmemRegion {
            ptr,
            len,
            guest_len,
            area_start,
        })
    }

    /// Bytes in the region (what registering it locks).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where this NIC's queues' area starts.
    pub fn area_start(&self) -> usize {
        self.area_start
    }

    /// Bytes of guest memory at the region's start.
    pub fn guest_len(&self) -> usize {
        self.guest_len
    }

    /// The region's first byte (guest RAM's, with `umem=guest`).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

/// The packet area a queue owns frames in: a mapping of its own, or its
/// window of a [`UmemRegion`]. Registered with the kernel by the socket
/// code.
#[derive(Debug)]
pub(crate) struct UmemArea {
    ptr: NonNull<u8>,
    len: usize,
    /// Unmapped on drop; false for a window of someone else's region.
    owned: bool,
}

// SAFETY: plain memory owned by this struct; access is coordinated by the
// ledger (one owner per frame) and the rings' acquire/release protocol.
unsafe impl Send for UmemArea {}

impl UmemArea {
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous private mapping; populated up front so
        // the datapath never page-faults on first touch of a frame.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(UmemArea {
            ptr,
            len,
            owned: true,
        })
    }

    /// The `len` bytes of `region` from `offset` on (checked by the
    /// caller to lie inside the region's area).
    pub(crate) fn window(region: &UmemRegion, offset: usize, len: usize) -> Self {
        debug_assert!(offset >= region.area_start && offset + len <= region.len);
        // SAFETY: inside the region (checked by the caller), which stays
        // mapped for the life of the process (UmemRegion::new's contract).
        let ptr = unsafe { region.ptr.add(offset) };
        UmemArea {
            ptr,
            len,
            owned: false,
        }
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The bytes at `[addr, addr + len)`, which the caller owns (checked
    /// by the ledger and the bounds check in the queue).
    pub(crate) fn slice(&self, addr: u64, len: usize) -> &[u8] {
        debug_assert!(addr as usize + len <= self.len);
        // SAFETY: in bounds (checked by the caller against the frame);
        // the frame is ours, so the kernel does not write it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(addr as usize), len) }
    }

    /// Mutable view of a frame the caller owns exclusively.
    pub(crate) fn slice_mut(&mut self, addr: u64, len: usize) -> &mut [u8] {
        debug_assert!(addr as usize + len <= self.len);
        // SAFETY: in bounds; the frame is free (ledger), so neither the
        // kernel nor any other slice touches it; &mut self prevents aliasing.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(addr as usize), len) }
    }
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // SAFETY: our own mapping. Dropped after the socket (field order in
        // XskQueue), so the kernel has released the pages by now; even if
        // not, the kernel holds its own page references.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Who owns each frame, plus the transmit free stack and the receive
/// recycle backlog. All storage is allocated once, up front.
///
/// The transmit pool is handed out in slots of `tx_slot_frames`
/// consecutive frames (a power of two; 1 unless frames longer than one
/// UMEM frame are sent as several descriptors, multi-buffer). A slot is
/// one contiguous piece of the UMEM; it goes back to the free stack when
/// the kernel has completed every frame of it that was sent.
#[derive(Debug)]
pub(crate) struct FrameLedger {
    frame_shift: u32,
    owner: Box<[Owner]>,
    rx_frames: u32,
    tx_frames: u32,
    tx_slot_frames: u32,
    /// Per transmit slot: frames sent and not yet completed.
    slot_outstanding: Box<[u8]>,
    /// Transmit slots we may fill (slot base addresses).
    free: Vec<u64>,
    /// Received frames to give back to the fill ring (base addresses).
    recycle: Vec<u64>,
}

impl FrameLedger {
    /// Frames `0..rx_frames` form the receive pool (initially `Recycling`,
    /// i.e. waiting to be put in the fill ring), the rest the transmit pool,
    /// in slots of `tx_slot_frames` (a power of two dividing `tx_frames`,
    /// at most 128).
    pub(crate) fn new(
        frame_size: u32,
        rx_frames: u32,
        tx_frames: u32,
        tx_slot_frames: u32,
    ) -> Self {
        debug_assert!(frame_size.is_power_of_two());
        debug_assert!(tx_slot_frames.is_power_of_two() && tx_slot_frames <= 128);
        debug_assert!(tx_frames.is_multiple_of(tx_slot_frames));
        let total = rx_frames + tx_frames;
        let mut owner = vec![Owner::Free; total as usize].into_boxed_slice();
        let mut recycle = Vec::with_capacity(rx_frames as usize);
        for (i, o) in owner.iter_mut().enumerate().take(rx_frames as usize) {
            *o = Owner::Recycling;
            recycle.push((i as u64) << frame_size.trailing_zeros());
        }
        let mut ledger = FrameLedger {
            frame_shift: frame_size.trailing_zeros(),
            owner,
            rx_frames,
            tx_frames,
            tx_slot_frames,
            slot_outstanding: Box::default(),
            free: Vec::new(),
            recycle,
        };
        ledger.set_tx_slot_frames(tx_slot_frames);
        ledger
    }

    /// Regroups the transmit pool into slots of `frames` frames. Only
    /// while no transmit frame is out (set-up).
    pub(crate) fn set_tx_slot_frames(&mut self, frames: u32) {
        debug_assert!(
            self.free.len() as u32 * self.tx_slot_frames == self.tx_frames || self.free.is_empty()
        );
        self.tx_slot_frames = frames;
        let slots = self.tx_frames / frames;
        self.slot_outstanding = vec![0; slots as usize].into_boxed_slice();
        // Reversed so that pop() hands out the lowest slot first.
        self.free = (0..slots)
            .rev()
            .map(|s| u64::from(self.rx_frames + s * frames) << self.frame_shift)
            .collect();
    }

    /// Frames per transmit slot.
    pub(crate) fn tx_slot_frames(&self) -> u32 {
        self.tx_slot_frames
    }

    /// The transmit slot holding frame index `i`.
    fn slot_of(&self, i: usize) -> usize {
        (i - self.rx_frames as usize) / self.tx_slot_frames as usize
    }

    /// The frame index of a UMEM address (any offset inside the frame).
    fn index(&self, addr: u64) -> Option<usize> {
        let i = (addr >> self.frame_shift) as usize;
        (i < self.owner.len()).then_some(i)
    }

    pub(crate) fn frame_base(&self, addr: u64) -> u64 {
        addr >> self.frame_shift << self.frame_shift
    }

    // ---- receive pool ----

    /// A frame the kernel put in the rx ring; Some(base) if it really was
    /// given to the kernel for receiving.
    pub(crate) fn check_rx(&self, addr: u64) -> Option<u64> {
        let i = self.index(addr)?;
        (self.owner[i] == Owner::KernelRx).then(|| self.frame_base(addr))
    }

    /// The caller is done with a received frame: queue it for the fill ring.
    pub(crate) fn rx_done(&mut self, base: u64) {
        if let Some(i) = self.index(base) {
            self.owner[i] = Owner::Recycling;
            self.recycle.push(base);
        }
    }

    pub(crate) fn recycle_len(&self) -> usize {
        self.recycle.len()
    }

    /// Takes the next frame to put in the fill ring.
    pub(crate) fn pop_recycle(&mut self) -> Option<u64> {
        let base = self.recycle.pop()?;
        if let Some(i) = self.index(base) {
            self.owner[i] = Owner::KernelRx;
        }
        Some(base)
    }

    // ---- transmit pool ----

    /// Transmit slots free right now.
    pub(crate) fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Transmit frames handed to the kernel and not yet completed, counted
    /// by whole slots (a slot is out until all its sent frames are back).
    pub(crate) fn tx_frames_out(&self) -> usize {
        self.tx_frames as usize - self.free.len() * self.tx_slot_frames as usize
    }

    /// The free slot `pop_free` would return next.
    pub(crate) fn peek_free(&self) -> Option<u64> {
        self.free.last().copied()
    }

    /// Hands the next free slot to the kernel, `frames` (1..=slot size) of
    /// its frames from the start. Returns the slot base.
    pub(crate) fn pop_free(&mut self, frames: u32) -> Option<u64> {
        debug_assert!((1..=self.tx_slot_frames).contains(&frames));
        let base = *self.free.last()?;
        let first = self.index(base)?;
        let frames = frames.clamp(1, self.tx_slot_frames) as usize;
        let slot = self.slot_of(first);
        self.free.pop();
        for o in &mut self.owner[first..first + frames] {
            *o = Owner::KernelTx;
        }
        self.slot_outstanding[slot] = frames as u8;
        Some(base)
    }

    /// The kernel completed a transmit frame; false if it was not one we
    /// gave it (then it is not reused). The slot is free again once every
    /// frame sent from it is back.
    pub(crate) fn tx_completed(&mut self, addr: u64) -> bool {
        let Some(i) = self.index(addr) else {
            return false;
        };
        if self.owner[i] != Owner::KernelTx {
            return false;
        }
        self.owner[i] = Owner::Free;
        let slot = self.slot_of(i);
        self.slot_outstanding[slot] -= 1;
        if self.slot_outstanding[slot] == 0 {
            let first = self.rx_frames as u64 + slot as u64 * u64::from(self.tx_slot_frames);
            self.free.push(first << self.frame_shift);
        }
        true
    }

    /// Counts frames by owner and checks that they add up: every frame in
    /// exactly one place, the free stack and backlog matching the owners.
    pub(crate) fn accounting(&self) -> Result<FrameAccounting, String> {
        let mut a = FrameAccounting {
            total: self.owner.len() as u32,
            ..Default::default()
        };
        let mut problems = Vec::new();
        for o in self.owner.iter() {
            match o {
                Owner::Free | Owner::KernelTx => {}
                Owner::KernelRx => a.rx_in_kernel += 1,
                Owner::Recycling => a.rx_recycling += 1,
            }
        }
        // Transmit pool, slot by slot: a free slot's frames are all free;
        // an out slot has as many frames with the kernel as it recorded.
        let k = self.tx_slot_frames as usize;
        let mut free_slot = vec![false; self.slot_outstanding.len()];
        for &base in &self.free {
            match self.index(base) {
                Some(i)
                    if i >= self.rx_frames as usize
                        && (i - self.rx_frames as usize).is_multiple_of(k) =>
                {
                    let s = self.slot_of(i);
                    if free_slot[s] {
                        problems.push(format!("transmit slot {s} listed free twice"));
                    }
                    free_slot[s] = true;
                }
                _ => problems.push(format!(
                    "{base:#x} in the free stack is not a transmit slot"
                )),
            }
        }
        for (s, &is_free) in free_slot.iter().enumerate() {
            let first = self.rx_frames as usize + s * k;
            let with_kernel = self.owner[first..first + k]
                .iter()
                .filter(|o| **o == Owner::KernelTx)
                .count();
            if self.owner[first..first + k]
                .iter()
                .any(|o| !matches!(o, Owner::Free | Owner::KernelTx))
            {
                problems.push(format!("transmit slot {s} holds receive frames"));
            }
            if is_free {
                a.tx_free += k as u32;
                if with_kernel != 0 {
                    problems.push(format!(
                        "free transmit slot {s} has {with_kernel} frames with the kernel"
                    ));
                }
            } else {
                a.tx_in_kernel += k as u32;
                if with_kernel != usize::from(self.slot_outstanding[s]) || with_kernel == 0 {
                    problems.push(format!(
                        "transmit slot {s}: {with_kernel} frames with the kernel, {} recorded",
                        self.slot_outstanding[s]
                    ));
                }
            }
        }
        if a.rx_recycling as usize != self.recycle.len() {
            problems.push(format!(
                "{} frames marked recycling but the backlog holds {}",
                a.rx_recycling,
                self.recycle.len()
            ));
        }
        if a.rx_in_kernel + a.rx_recycling != self.rx_frames {
            problems.push(format!(
                "receive pool: {} in kernel + {} recycling != {}",
                a.rx_in_kernel, a.rx_recycling, self.rx_frames
            ));
        }
        let mut seen = vec![false; self.owner.len()];
        for &base in self.recycle.iter() {
            match self.index(base) {
                Some(i) if !seen[i] => seen[i] = true,
                Some(i) => problems.push(format!("frame {i} listed twice")),
                None => problems.push(format!("address {base:#x} outside the UMEM")),
            }
        }
        if problems.is_empty() {
            Ok(a)
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_start_split_and_accounted() {
        let l = FrameLedger::new(4096, 8, 4, 1);
        let a = l.accounting().unwrap();
        assert_eq!(a.total, 12);
        assert_eq!(a.rx_recycling, 8);
        assert_eq!(a.tx_free, 4);
        assert_eq!(l.peek_free(), Some(8 * 4096));
    }

    #[test]
    fn frames_move_between_owners_and_are_never_handed_out_twice() {
        let mut l = FrameLedger::new(2048, 4, 4, 1);
        // Fill ring gets the whole receive pool.
        let mut fill = Vec::new();
        while let Some(a) = l.pop_recycle() {
            fill.push(a);
        }
        assert_eq!(fill.len(), 4);
        // An rx descriptor points 256 bytes into a frame (XDP headroom).
        let base = l.check_rx(fill[0] + 256).unwrap();
        assert_eq!(base, fill[0]);
        l.rx_done(base);
        // Delivered twice by a confused kernel: rejected the second time.
        assert_eq!(l.check_rx(fill[0] + 256), None);
        // A transmit-pool frame cannot come back through the rx ring.
        assert_eq!(l.check_rx(5 * 2048), None);

        let mut sent = Vec::new();
        while let Some(a) = l.pop_free(1) {
            sent.push(a);
        }
        assert_eq!(sent.len(), 4);
        let mut uniq = sent.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 4, "a frame was handed out twice");
        assert!(l.tx_completed(sent[2]));
        assert!(!l.tx_completed(sent[2]), "double completion accepted");
        assert!(!l.tx_completed(fill[1]), "rx frame accepted as completion");
        assert!(
            !l.tx_completed(1 << 40),
            "address outside the UMEM accepted"
        );
        let a = l.accounting().unwrap();
        assert_eq!(a.tx_free, 1);
        assert_eq!(a.tx_in_kernel, 3);
        assert_eq!(a.rx_in_kernel, 3);
        assert_eq!(a.rx_recycling, 1);
    }

    #[test]
    fn a_slot_comes_back_only_when_every_frame_sent_from_it_completes() {
        // 4 receive frames, 16 transmit frames in slots of 4.
        let mut l = FrameLedger::new(4096, 4, 16, 4);
        assert_eq!(l.free_slots(), 4);
        let slot = l.pop_free(3).unwrap();
        assert_eq!(
            slot,
            4 * 4096,
            "lowest slot first, right after the receive pool"
        );
        assert_eq!(l.tx_frames_out(), 4);
        l.accounting().unwrap();
        // Completions come per descriptor, in any order.
        assert!(l.tx_completed(slot + 2 * 4096));
        assert!(l.tx_completed(slot));
        assert_eq!(l.free_slots(), 3, "one frame still with the kernel");
        assert!(
            !l.tx_completed(slot + 3 * 4096),
            "the unsent fourth frame cannot complete"
        );
        l.accounting().unwrap();
        assert!(l.tx_completed(slot + 4096));
        assert_eq!(l.free_slots(), 4);
        assert_eq!(l.tx_frames_out(), 0);
        let a = l.accounting().unwrap();
        assert_eq!((a.tx_free, a.tx_in_kernel), (16, 0));
        // Regrouping at set-up keeps every frame.
        l.set_tx_slot_frames(1);
        assert_eq!(l.free_slots(), 16);
        assert_eq!(l.accounting().unwrap().tx_free, 16);
    }
}
