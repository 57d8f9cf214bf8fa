//! What a virtio-net queue pair needs from the host side. The AF_XDP
//! backend implements it in the VMM; tests may use anything that moves frames.

use std::os::fd::RawFd;

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
    /// free buffers and `fill` returns `Some(frame_len)`; then sends the
    /// filled frames with at most one wake-up of the kernel. Returns
    /// `(sent, out_of_room)`: `out_of_room` is true when it stopped because
    /// no buffer was free while `fill` might have had more.
    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>) -> (usize, bool);

    /// The host side's own view of this queue (drops it counted, say), for
    /// the log when the queue pair stops; called on its IO thread.
    fn report(&self) -> Option<String> {
        None
    }
}
