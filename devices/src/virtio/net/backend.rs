//! What a virtio-net queue pair needs from the host side. The AF_XDP
//! backend implements it in the VMM; tests may use anything that moves frames.

use std::os::fd::RawFd;

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

    /// The host side's own view of this queue (drops it counted, say), for
    /// the log when the queue pair stops; called on its IO thread.
    fn report(&self) -> Option<String> {
        None
    }
}
