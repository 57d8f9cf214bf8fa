//! Per-queue-pair counters, shared between an IO thread and whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct QueuePairCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames that did not fit the guest buffer they were offered.
    pub rx_dropped_too_big: AtomicU64,
    /// Guest buffers that could not be written (bad descriptors).
    pub rx_bad_descriptors: AtomicU64,
    /// Times frames had to wait because the guest posted no buffers.
    pub rx_no_buffer_waits: AtomicU64,
    /// Frames that arrived for a queue pair the guest does not use, dropped.
    pub rx_dropped_inactive: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Chains dropped for bad descriptors, oversize or runt frames.
    pub tx_dropped: AtomicU64,
    /// Of those, chains longer than the queue size (virtio 1.2 2.7.5.2).
    pub tx_chains_too_long: AtomicU64,
    /// Of those, frames longer than the MTU allows.
    pub tx_dropped_oversize: AtomicU64,
    /// Of those, frames whose source MAC is not the guest's (spoof check).
    pub tx_dropped_spoofed: AtomicU64,
    /// Chains returned unsent while the host link was down.
    pub tx_dropped_link_down: AtomicU64,
    /// Times the host transmit ring was full.
    pub tx_ring_full: AtomicU64,
    /// Transmit retries after waiting for room timed out.
    pub tx_retries: AtomicU64,
    /// GSO frames from the guest (TSO/USO), and the wire frames cut from them.
    pub tx_gso_frames: AtomicU64,
    pub tx_gso_segments: AtomicU64,
    /// Frames whose transport checksum the device filled (NEEDS_CSUM, and
    /// every segment of a GSO frame).
    pub tx_csum_filled: AtomicU64,
    /// Of the dropped chains: offload requests that cannot be honoured (not
    /// negotiated, checksum outside the frame, GSO of something not TCP/UDP).
    pub tx_offload_errors: AtomicU64,
    /// Received frames whose transport checksum verified (DATA_VALID for
    /// the guest), was completed for a sender that left it to the device,
    /// or failed (passed on unmarked).
    pub rx_csum_verified: AtomicU64,
    pub rx_csum_completed: AtomicU64,
    pub rx_csum_bad: AtomicU64,
    /// Merged frames handed to the guest (GRO), and the wire frames in them.
    pub rx_gro_frames: AtomicU64,
    pub rx_gro_segments: AtomicU64,
    pub rx_notifications: AtomicU64,
    pub tx_notifications: AtomicU64,
    pub interrupts: AtomicU64,
    /// Sum of frames per processed batch and number of batches: their ratio is the mean batch.
    pub rx_batch_frames: AtomicU64,
    pub rx_batches: AtomicU64,
    pub tx_batch_frames: AtomicU64,
    pub tx_batches: AtomicU64,
    /// Queues found unusable (bad avail index or ring, head outside the
    /// queue) or a worker that failed: each put the device in DEVICE_NEEDS_RESET.
    pub queue_errors: AtomicU64,
}

/// A point-in-time copy, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped_too_big: u64,
    pub rx_bad_descriptors: u64,
    pub rx_no_buffer_waits: u64,
    pub rx_dropped_inactive: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_chains_too_long: u64,
    pub tx_dropped_oversize: u64,
    pub tx_dropped_spoofed: u64,
    pub tx_dropped_link_down: u64,
    pub tx_ring_full: u64,
    pub tx_retries: u64,
    pub tx_gso_frames: u64,
    pub tx_gso_segments: u64,
    pub tx_csum_filled: u64,
    pub tx_offload_errors: u64,
    pub rx_csum_verified: u64,
    pub rx_csum_completed: u64,
    pub rx_csum_bad: u64,
    pub rx_gro_frames: u64,
    pub rx_gro_segments: u64,
    pub rx_notifications: u64,
    pub tx_notifications: u64,
    pub interrupts: u64,
    pub rx_batch_frames: u64,
    pub rx_batches: u64,
    pub tx_batch_frames: u64,
    pub tx_batches: u64,
    pub queue_errors: u64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl QueuePairCounters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped_too_big: get(&self.rx_dropped_too_big),
            rx_bad_descriptors: get(&self.rx_bad_descriptors),
            rx_no_buffer_waits: get(&self.rx_no_buffer_waits),
            rx_dropped_inactive: get(&self.rx_dropped_inactive),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_chains_too_long: get(&self.tx_chains_too_long),
            tx_dropped_oversize: get(&self.tx_dropped_oversize),
            tx_dropped_spoofed: get(&self.tx_dropped_spoofed),
            tx_dropped_link_down: get(&self.tx_dropped_link_down),
            tx_ring_full: get(&self.tx_ring_full),
            tx_retries: get(&self.tx_retries),
            tx_gso_frames: get(&self.tx_gso_frames),
            tx_gso_segments: get(&self.tx_gso_segments),
            tx_csum_filled: get(&self.tx_csum_filled),
            tx_offload_errors: get(&self.tx_offload_errors),
            rx_csum_verified: get(&self.rx_csum_verified),
            rx_csum_completed: get(&self.rx_csum_completed),
            rx_csum_bad: get(&self.rx_csum_bad),
            rx_gro_frames: get(&self.rx_gro_frames),
            rx_gro_segments: get(&self.rx_gro_segments),
            rx_notifications: get(&self.rx_notifications),
            tx_notifications: get(&self.tx_notifications),
            interrupts: get(&self.interrupts),
            rx_batch_frames: get(&self.rx_batch_frames),
            rx_batches: get(&self.rx_batches),
            tx_batch_frames: get(&self.tx_batch_frames),
            tx_batches: get(&self.tx_batches),
            queue_errors: get(&self.queue_errors),
        }
    }
}

impl std::fmt::Display for CountersSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mean = |frames: u64, batches: u64| {
            if batches == 0 {
                0.0
            } else {
                frames as f64 / batches as f64
            }
        };
        write!(
            f,
            "rx {} pkts {} B (dropped: {} too big, {} bad desc, {} on an unused pair; \
             {} no-buffer waits), \
             tx {} pkts {} B ({} dropped: {} too long, {} oversize, {} spoofed; {} link down, \
             {} ring full, {} retries), \
             offloads: tx {} gso frames -> {} segments, {} checksums filled, {} refused; \
             rx checksums {} verified, {} completed, {} bad; \
             rx coalesced {} frames from {} segments; \
             notifications rx {} tx {}, interrupts {}, mean batch rx {:.1} tx {:.1}, \
             queue errors {}",
            self.rx_packets,
            self.rx_bytes,
            self.rx_dropped_too_big,
            self.rx_bad_descriptors,
            self.rx_dropped_inactive,
            self.rx_no_buffer_waits,
            self.tx_packets,
            self.tx_bytes,
            self.tx_dropped,
            self.tx_chains_too_long,
            self.tx_dropped_oversize,
            self.tx_dropped_spoofed,
            self.tx_dropped_link_down,
            self.tx_ring_full,
            self.tx_retries,
            self.tx_gso_frames,
            self.tx_gso_segments,
            self.tx_csum_filled,
            self.tx_offload_errors,
            self.rx_csum_verified,
            self.rx_csum_completed,
            self.rx_csum_bad,
            self.rx_gro_frames,
            self.rx_gro_segments,
            self.rx_notifications,
            self.tx_notifications,
            self.interrupts,
            mean(self.rx_batch_frames, self.rx_batches),
            mean(self.tx_batch_frames, self.tx_batches),
            self.queue_errors,
        )
    }
}
