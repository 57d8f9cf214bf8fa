//! Which queue pairs the guest uses, and which are in a receive pass.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The pairs the guest uses (1 after activation, then what VQ_PAIRS_SET
/// says) and, per pair, whether its IO thread is in a receive pass: so
/// that the control queue answers VQ_PAIRS_SET only once no pair it drops
/// can still put a frame on its receive queue (virtio 1.2 5.1.6.5.5).
#[derive(Debug)]
pub(crate) struct ActivePairs {
    count: AtomicUsize,
    receiving: Box<[AtomicBool]>,
}

impl ActivePairs {
    pub fn new(pairs: usize) -> Self {
        Self {
            count: AtomicUsize::new(1),
            receiving: (0..pairs).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// At activation, no IO thread running: the first pair only, and no
    /// pass left marked by a thread that ended in one.
    pub fn restart(&self) {
        self.count.store(1, Ordering::SeqCst);
        for flag in self.receiving.iter() {
            flag.store(false, Ordering::SeqCst);
        }
    }

    pub fn set(&self, pairs: usize) {
        self.count.store(pairs, Ordering::SeqCst);
    }

    /// Starts `pair`'s receive pass; false (no pass) if the guest does not
    /// use the pair. Either this sees a new count, or the control queue
    /// that set it sees the pass and waits for its end (both SeqCst).
    pub fn begin_receive(&self, pair: usize) -> bool {
        let Some(flag) = self.receiving.get(pair) else {
            return false;
        };
        flag.store(true, Ordering::SeqCst);
        if pair < self.count.load(Ordering::SeqCst) {
            return true;
        }
        flag.store(false, Ordering::SeqCst);
        false
    }

    pub fn end_receive(&self, pair: usize) {
        if let Some(flag) = self.receiving.get(pair) {
            flag.store(false, Ordering::SeqCst);
        }
    }

    /// After [`Self::set`]: waits until no pair from `from` on is in a
    /// receive pass (a pass is bounded; `limit` only guards against a
    /// thread that stopped mid-pass). Returns whether they all ended.
    pub fn wait_receives_ended(&self, from: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        for flag in self.receiving.iter().skip(from) {
            while flag.load(Ordering::SeqCst) {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::yield_now();
            }
        }
        true
    }

    /// [`Self::wait_receives_ended`] before the control queue answers
    /// `command`: a pass is bounded, so a second is only ever reached by a
    /// thread that stopped mid-pass; then the answer goes anyway.
    pub fn await_receives_from(&self, from: usize, command: &str) {
        if !self.wait_receives_ended(from, Duration::from_secs(1)) {
            crate::warn_ratelimited!(
                "virtio-net: a queue pair's receive pass outlasted {command}'s wait; answering \
                 anyway"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_beyond_the_count_gets_no_pass_and_the_setter_waits_for_passes() {
        let pairs = ActivePairs::new(3);
        assert!(pairs.begin_receive(0));
        assert!(!pairs.begin_receive(1), "one pair until VQ_PAIRS_SET");
        pairs.set(3);
        assert!(pairs.begin_receive(2));
        pairs.set(1);
        assert!(
            !pairs.wait_receives_ended(1, Duration::from_millis(20)),
            "pair 2's pass is still on"
        );
        pairs.end_receive(2);
        assert!(pairs.wait_receives_ended(1, Duration::from_millis(20)));
        assert!(!pairs.begin_receive(2));
        assert!(!pairs.begin_receive(7), "no such pair");
    }
}
