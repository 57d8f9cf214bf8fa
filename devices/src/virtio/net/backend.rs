//! What a virtio-net queue pair needs from the host side. The AF_XDP
//! backend implements it in the VMM; tests may use anything that moves frames.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A frame `fill` wrote into a transmit buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFrame {
    /// Bytes written, from the start of the buffer.
    pub len: usize,
    /// Asks the host side to fill the checksum, as a NIC does for a
    /// CHECKSUM_PARTIAL frame: the one's-complement sum from `start` to
    /// the end goes at `start + offset`, whose 16 bits hold the
    /// pseudo-header sum. Only where [`NetBackend::tx_checksum_offload`].
    pub csum: Option<CsumRequest>,
}

/// Where a checksum left to the host side starts and is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsumRequest {
    pub start: u16,
    pub offset: u16,
}

/// Where a gathered frame's bytes lie in guest memory (guest memory
/// registered as the backend's UMEM): the device pushes host addresses
/// that vm-memory resolved inside guest memory.
pub trait TxPieces {
    /// Adds `len` bytes at host address `addr`; false (nothing added) when
    /// the backend cannot send them from there (outside its UMEM's guest
    /// memory, too long, or a frame with as many pieces as it may have).
    fn push(&mut self, addr: usize, len: usize) -> bool;
    /// Forgets the pieces pushed for this frame.
    fn clear(&mut self);
}

/// A frame [`NetBackend::transmit_gather`]'s `fill` described: the first
/// `head_len` bytes of the backend's buffer it was given, then the pieces
/// of guest memory it pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GatherFrame {
    pub head_len: usize,
    /// A checksum for the host side to fill, as [`TxFrame::csum`]; offsets
    /// in the whole frame. Needs a head.
    pub csum: Option<CsumRequest>,
    /// Comes back through [`NetBackend::take_completed`] once the host side
    /// no longer reads this frame's pieces, nor those of frames before it.
    pub token: Option<u64>,
}

/// What [`NetBackend::transmit_gather`] calls for each frame: it writes a
/// head into the buffer, pushes the pieces, and describes the frame.
pub type GatherFill<'a> = dyn FnMut(&mut [u8], &mut dyn TxPieces) -> Option<GatherFrame> + 'a;

/// One queue pair's link to the host network, owned by that pair's IO thread.
pub trait NetBackend: Send {
    /// Readable when frames wait to be received; writable when the
    /// transmit path has room again after [`NetBackend::transmit`] ran out.
    fn fd(&self) -> RawFd;

    /// Offers waiting frames, oldest first, to `deliver`. `deliver` returns
    /// false when it cannot take the frame (no guest buffer): that frame
    /// and the rest stay queued. Returns the number of frames taken.
    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize;

    /// Calls `fill` with a free transmit buffer for as long as there are
    /// free buffers and `fill` returns `Some(frame)`; then sends the
    /// filled frames with at most one wake-up of the kernel. Returns
    /// `(sent, out_of_room)`: `out_of_room` is true when it stopped because
    /// no buffer was free while `fill` might have had more.
    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool);

    /// Whether frames may leave their TCP/UDP checksum to the host side
    /// ([`TxFrame::csum`]): true where the kernel fills it (AF_XDP TX
    /// metadata). May change when the backend is opened again.
    fn tx_checksum_offload(&self) -> bool {
        false
    }

    /// Where [`NetBackend::tx_checksum_offload`]: how far into a frame a
    /// checksum field left to the host side may end (AF_XDP reads it from
    /// a frame's first descriptor). A field further in is filled by the
    /// device. At least 256 (every segment's headers fit).
    fn tx_checksum_reach(&self) -> usize {
        usize::MAX
    }

    /// `umem=guest`: the longest piece of guest memory one descriptor of
    /// [`NetBackend::transmit_gather`] takes; None where the backend cannot
    /// send from guest memory.
    fn tx_gather_piece_max(&self) -> Option<usize> {
        None
    }

    /// `umem=guest`: how many pieces one frame of
    /// [`NetBackend::transmit_gather`] may have behind its head.
    fn tx_gather_max_pieces(&self) -> usize {
        0
    }

    /// As [`NetBackend::transmit`], but `fill` may leave a frame's bytes
    /// where they lie in guest memory ([`TxPieces`]) behind a head it
    /// writes into the buffer it is given (a frame with no pieces is a
    /// copied one). Returns `(sent, out_of_room)`.
    fn transmit_gather(&mut self, _fill: &mut GatherFill<'_>) -> (usize, bool) {
        (0, false)
    }

    /// Hands `done` the tokens of gathered frames the host side is done
    /// with, oldest first; returns how many.
    fn take_completed(&mut self, _done: &mut dyn FnMut(u64)) -> usize {
        0
    }

    /// Gathered frames the host side has not read yet must no longer read
    /// guest memory: their chains go back to the guest before their
    /// tokens come (link down, reset), and the guest may reuse the buffers
    /// at once. Frames may still go out, as junk nobody takes. Returns how
    /// many frames were changed.
    fn disarm_unsent_gathers(&mut self) -> usize {
        0
    }

    /// The host side's own view of this queue (drops it counted, say), for
    /// the log when the queue pair stops; called on its IO thread.
    fn report(&self) -> Option<String> {
        None
    }
}

/// Stands in for a backend whose host interface is gone, so that the old
/// one (its sockets, the memory they pin) can be let go until the
/// interface comes back: it receives nothing and sends nothing (the
/// guest's link is down meanwhile, so its frames are dropped before they
/// get here).
pub struct DetachedBackend {
    /// Never signalled: something for the IO thread to wait on.
    idle: EventFd,
}

impl DetachedBackend {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            idle: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}

impl NetBackend for DetachedBackend {
    fn fd(&self) -> RawFd {
        self.idle.as_raw_fd()
    }

    fn receive(&mut self, _deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        0
    }

    fn transmit(&mut self, _fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        (0, false)
    }
}
