//! Transmit from the shared UMEM (`umem=guest`): frames whose bytes lie in
//! guest memory go to the kernel as descriptors pointing there, behind an
//! optional head in a frame of the queue's own (rewritten headers, the TX
//! metadata checksum request in front). Such descriptors cannot be matched
//! by address when they complete (the kernel returns an odd address with
//! bit 0 clear, and a guest may post one buffer twice), so a queue on a
//! shared UMEM matches every completion by order: [`InFlight`] records each
//! descriptor as it goes into the tx ring and the caller's tokens come back
//! in the order their frames were sent.

use crate::queue::MAX_DESCS_PER_FRAME;

/// The guest-memory pieces of one gathered frame, filled by the caller's
/// callback (storage of the queue's own: nothing is allocated per frame).
#[derive(Debug)]
pub struct GatherPieces {
    items: [(u64, u32); MAX_DESCS_PER_FRAME as usize],
    len: usize,
}

impl Default for GatherPieces {
    fn default() -> Self {
        GatherPieces {
            items: [(0, 0); MAX_DESCS_PER_FRAME as usize],
            len: 0,
        }
    }
}

impl GatherPieces {
    /// Adds `len` bytes at `offset` of the shared UMEM; false (nothing
    /// added) when a frame already has as many descriptors as it may.
    pub fn push(&mut self, offset: u64, len: u32) -> bool {
        let Some(slot) = self.items.get_mut(self.len) else {
            return false;
        };
        *slot = (offset, len);
        self.len += 1;
        true
    }

    pub fn as_slice(&self) -> &[(u64, u32)] {
        &self.items[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// What a [`crate::XskQueue::tx_gather`] callback asks for: the first
/// `head_len` bytes of the queue's buffer it was given (0: no head), then
/// the pieces it pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GatherRequest {
    pub head_len: usize,
    /// `(csum_start, csum_offset)` for the kernel to fill (TX metadata, in
    /// front of the head: a frame asking for it needs a head).
    pub csum: Option<(u16, u16)>,
    /// Handed back by [`crate::XskQueue::take_completed`] once the kernel
    /// is done with every descriptor of this frame and of all frames sent
    /// before it (a refused frame's token too, in its turn).
    pub token: Option<u64>,
}

/// Where a piece of a gathered frame may lie, exactly as the kernel checks
/// it: it drops a frame with one descriptor it refuses and returns only
/// some of the others on the completion ring (6.18), which would break
/// matching by order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherLimits {
    /// Room for the TX metadata in front of every descriptor.
    pub min_offset: u64,
    /// One chunk, less that room.
    pub max_len: u64,
    /// The end of guest memory in the UMEM.
    pub guest_len: u64,
    /// Pieces one frame may have behind its head: one descriptor fewer
    /// than a frame may have.
    pub max_pieces: usize,
}

impl GatherLimits {
    /// Whether `len` bytes at `offset` of the UMEM may be one piece.
    pub fn piece_ok(&self, offset: u64, len: u32) -> bool {
        (1..=self.max_len).contains(&u64::from(len))
            && offset >= self.min_offset
            && offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= self.guest_len)
    }
}

/// One descriptor in flight, or a token waiting for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A descriptor in a frame of the queue's own (its ledger takes it
    /// back by address).
    Own,
    /// A descriptor pointing into guest memory.
    Guest,
    /// The end of a frame with a token: reported when reached.
    Token(u64),
}

/// The descriptors a queue on a shared UMEM has handed the kernel, oldest
/// first, and the tokens due back, in a ring of fixed capacity.
#[derive(Debug)]
pub(crate) struct InFlight {
    entries: Box<[Entry]>,
    head: usize,
    len: usize,
    /// Tokens whose frames completed, oldest first; at most `entries`'
    /// capacity, since each came from one entry.
    done: Box<[u64]>,
    done_head: usize,
    done_len: usize,
}

impl InFlight {
    pub(crate) fn new(capacity: usize) -> Self {
        InFlight {
            entries: vec![Entry::Own; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            done: vec![0; capacity].into_boxed_slice(),
            done_head: 0,
            done_len: 0,
        }
    }

    /// Room for `n` more entries (tokens not yet taken count: each will
    /// need a place in `done`).
    pub(crate) fn room(&self, n: usize) -> bool {
        self.len + self.done_len + n <= self.entries.len()
    }

    pub(crate) fn push(&mut self, entry: Entry) {
        debug_assert!(self.room(1));
        let cap = self.entries.len();
        self.entries[(self.head + self.len) % cap] = entry;
        self.len += 1;
    }

    /// One completion arrived: the oldest descriptor is done. Returns what
    /// it was (None when nothing was in flight); tokens it uncovers move
    /// to the done list.
    pub(crate) fn complete_one(&mut self) -> Option<Entry> {
        self.release_tokens();
        if self.len == 0 {
            return None;
        }
        let entry = self.pop();
        self.release_tokens();
        Some(entry)
    }

    fn pop(&mut self) -> Entry {
        let entry = self.entries[self.head];
        self.head = (self.head + 1) % self.entries.len();
        self.len -= 1;
        entry
    }

    /// Moves tokens at the front (their frames' descriptors all done) to
    /// the done list.
    pub(crate) fn release_tokens(&mut self) {
        while self.len > 0 {
            let Entry::Token(token) = self.entries[self.head] else {
                break;
            };
            self.pop();
            let cap = self.done.len();
            self.done[(self.done_head + self.done_len) % cap] = token;
            self.done_len += 1;
        }
    }

    /// Hands the done tokens to `f`, oldest first.
    pub(crate) fn take_done(&mut self, f: &mut dyn FnMut(u64)) -> usize {
        let n = self.done_len;
        for _ in 0..n {
            let token = self.done[self.done_head];
            self.done_head = (self.done_head + 1) % self.done.len();
            self.done_len -= 1;
            f(token);
        }
        n
    }

    /// Descriptors still with the kernel (tokens not counted).
    pub(crate) fn descs(&self) -> usize {
        let cap = self.entries.len();
        (0..self.len)
            .filter(|i| !matches!(self.entries[(self.head + i) % cap], Entry::Token(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(f: &mut InFlight) -> Vec<u64> {
        let mut v = Vec::new();
        f.take_done(&mut |t| v.push(t));
        v
    }

    #[test]
    fn tokens_come_back_in_order_once_their_descriptors_are_done() {
        let mut f = InFlight::new(8);
        // Frame 1: own head + two guest pieces, token 10; frame 2: one
        // guest piece, no token; frame 3 refused, token 30; frame 4: own
        // only, token 40.
        for e in [Entry::Own, Entry::Guest, Entry::Guest, Entry::Token(10)] {
            f.push(e);
        }
        f.push(Entry::Guest);
        f.push(Entry::Token(30));
        f.push(Entry::Own);
        f.push(Entry::Token(40));
        assert!(!f.room(1), "full: 8 entries");
        assert_eq!(f.descs(), 5);
        assert_eq!(f.complete_one(), Some(Entry::Own));
        assert_eq!(f.complete_one(), Some(Entry::Guest));
        assert!(done(&mut f).is_empty());
        assert_eq!(f.complete_one(), Some(Entry::Guest));
        assert_eq!(done(&mut f), vec![10]);
        // The refused frame's token waits for the frame before it.
        assert_eq!(f.complete_one(), Some(Entry::Guest));
        assert_eq!(done(&mut f), vec![30]);
        assert_eq!(f.complete_one(), Some(Entry::Own));
        assert_eq!(done(&mut f), vec![40]);
        assert_eq!(f.complete_one(), None, "nothing in flight");
        assert!(f.room(8));
    }

    #[test]
    fn tokens_not_taken_keep_their_room() {
        let mut f = InFlight::new(4);
        f.push(Entry::Guest);
        f.push(Entry::Token(1));
        f.complete_one();
        // One token waits to be taken: 3 entries of room left.
        assert!(f.room(3) && !f.room(4));
        assert_eq!(done(&mut f), vec![1]);
        assert!(f.room(4));
        // Wrapping around the ring.
        for round in 0..5u64 {
            f.push(Entry::Own);
            f.push(Entry::Token(round));
            f.complete_one();
            assert_eq!(done(&mut f), vec![round]);
        }
    }

    #[test]
    fn pieces_hold_at_most_a_frames_descriptors() {
        let mut p = GatherPieces::default();
        for i in 0..MAX_DESCS_PER_FRAME {
            assert!(p.push(u64::from(i) * 10, 1));
        }
        assert!(!p.push(0, 1));
        assert_eq!(p.len(), MAX_DESCS_PER_FRAME as usize);
        assert_eq!(p.as_slice()[3], (30, 1));
        p.clear();
        assert!(p.is_empty());
    }
}
