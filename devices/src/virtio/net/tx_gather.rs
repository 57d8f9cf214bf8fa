//! Transmit from guest memory (`umem=guest`): a TX chain's bytes go to the
//! backend as pieces of guest memory behind a head the device writes, and
//! the chain stays out of the used ring until the backend says the host
//! side no longer reads it.
//!
//! The head always holds what the device checked or rewrote (the MACs the
//! spoof check read, the checksum field and its request, a segment's
//! headers), so a guest that changes its buffer after the check changes
//! only payload. Guest addresses become host addresses only after
//! vm-memory resolved them inside guest RAM; the backend then refuses
//! anything outside its UMEM's guest part, and the device copies such a
//! frame instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::backend::TxPieces;

/// Frames shorter than this are copied into the head: below it a
/// descriptor and a held chain cost more than the copy (the datapath
/// bench: 1.04x at 64 bytes from gathering, 1.12x at 1500).
pub(crate) const GATHER_MIN_FRAME: usize = 256;

/// Tokens carry a generation above the chain's head index, so that tokens
/// of chains the device gave up on (link down, a replaced backend, a
/// reset) are told apart from those of chains it still holds.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// TX chains whose frames went out from guest memory and which the host
/// side may still read, oldest first: they go to the used ring as their
/// tokens come back, which the backend hands back in sending order.
pub(crate) struct HeldChains {
    heads: VecDeque<u16>,
    capacity: usize,
    generation: u64,
}

impl HeldChains {
    /// Room for a queue's worth of chains, reserved once.
    pub fn new(queue_size: u16) -> Self {
        let capacity = usize::from(queue_size);
        Self {
            heads: VecDeque::with_capacity(capacity),
            capacity,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether another chain may be held (a guest that makes the same head
    /// available twice could otherwise make the list grow).
    pub fn has_room(&self) -> bool {
        self.heads.len() < self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Holds `head` until its token returns; the token to send with its
    /// frame's last descriptor.
    pub fn hold(&mut self, head: u16) -> u64 {
        debug_assert!(self.has_room());
        self.heads.push_back(head);
        self.token(head)
    }

    pub fn token(&self, head: u16) -> u64 {
        (self.generation << 16) | u64::from(head)
    }

    /// The chain a returned token releases: None for a token of an earlier
    /// generation, or one that is not the oldest held chain's (which the
    /// backend's ordering rules out; the chain stays held rather than be
    /// returned while the host side may read it).
    pub fn release(&mut self, token: u64) -> Option<u16> {
        if token >> 16 != self.generation {
            return None;
        }
        let head = *self.heads.front()?;
        if self.token(head) != token {
            crate::warn_ratelimited!(
                "virtio-net: a transmit completion came back out of order ({token:#x}); \
                 chain {head} stays held"
            );
            return None;
        }
        self.heads.pop_front()
    }

    /// Gives up on every held chain (the backend that holds them is gone,
    /// or its link is down): their heads, for the used ring; tokens still
    /// to come for them are ignored.
    pub fn abandon(&mut self) -> impl Iterator<Item = u16> + '_ {
        self.generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        self.heads.drain(..)
    }
}

/// Pushes `len` bytes of guest memory at `addr` as pieces of at most
/// `max_piece` bytes, split where a guest memory region ends. False when
/// some of it is not guest RAM or the backend refused a piece.
pub(crate) fn push_guest_range(
    mem: &GuestMemoryMmap,
    mut addr: GuestAddress,
    len: usize,
    max_piece: usize,
    pieces: &mut dyn TxPieces,
) -> bool {
    let mut left = len;
    while left > 0 {
        let Some(region) = mem.find_region(addr) else {
            return false;
        };
        let Some(at) = region.to_region_addr(addr) else {
            return false;
        };
        let in_region = (region.len() - at.raw_value()) as usize;
        let n = left.min(in_region).min(max_piece);
        let Ok(host) = region.get_host_address(at) else {
            return false;
        };
        if n == 0 || !pieces.push(host as usize, n) {
            return false;
        }
        left -= n;
        let Some(next) = addr.checked_add(n as u64) else {
            return left == 0;
        };
        addr = next;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorded {
        pieces: Vec<(usize, usize)>,
        refuse_after: Option<usize>,
    }

    impl TxPieces for Recorded {
        fn push(&mut self, addr: usize, len: usize) -> bool {
            if self.refuse_after == Some(self.pieces.len()) {
                return false;
            }
            self.pieces.push((addr, len));
            true
        }
        fn clear(&mut self) {
            self.pieces.clear();
        }
    }

    fn host(mem: &GuestMemoryMmap, addr: u64) -> usize {
        mem.get_host_address(GuestAddress(addr)).unwrap() as usize
    }

    #[test]
    fn ranges_split_at_the_piece_limit_and_where_a_region_ends() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let mut p = Recorded::default();
        assert!(push_guest_range(
            &mem,
            GuestAddress(0xff00),
            0x1200,
            0x1000,
            &mut p
        ));
        assert_eq!(
            p.pieces,
            vec![
                (host(&mem, 0xff00), 0x100),
                (host(&mem, 0x10000), 0x1000),
                (host(&mem, 0x11000), 0x100),
            ]
        );
        // Past guest memory, or refused by the backend: false.
        let mut p = Recorded::default();
        assert!(!push_guest_range(
            &mem,
            GuestAddress(0x1ff00),
            0x200,
            0x1000,
            &mut p
        ));
        let mut p = Recorded {
            refuse_after: Some(1),
            ..Recorded::default()
        };
        assert!(!push_guest_range(
            &mem,
            GuestAddress(0),
            0x3000,
            0x1000,
            &mut p
        ));
        let mut p = Recorded::default();
        assert!(push_guest_range(&mem, GuestAddress(5), 0, 0x1000, &mut p));
        assert!(p.pieces.is_empty());
    }

    #[test]
    fn held_chains_come_back_in_order_and_abandoned_ones_never() {
        let mut held = HeldChains::new(2);
        let a = held.hold(7);
        let b = held.hold(3);
        assert!(!held.has_room());
        // Out of order: refused, still held.
        assert_eq!(held.release(b), None);
        assert_eq!(held.release(a), Some(7));
        assert_eq!(held.release(b), Some(3));
        assert!(held.is_empty());
        let c = held.hold(1);
        assert_eq!(held.abandon().collect::<Vec<_>>(), vec![1]);
        let d = held.hold(1);
        assert_ne!(c, d);
        assert_eq!(held.release(c), None, "a token from before abandon");
        assert_eq!(held.release(d), Some(1));
        // Another worker's tokens (another generation) release nothing.
        let mut other = HeldChains::new(2);
        let e = other.hold(1);
        held.hold(1);
        assert_eq!(held.release(e), None);
    }
}
