//! Per-queue-pair counters, shared between an IO thread and whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Defines [`QueuePairCounters`] and [`CountersSnapshot`] from one list of
/// fields, with [`CountersSnapshot::values`] over all of them: a counter
/// added here reaches every report (the VMM's API and metrics) by itself.
macro_rules! queue_pair_counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub struct QueuePairCounters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy, for tests and logs.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct CountersSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl QueuePairCounters {
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl CountersSnapshot {
            /// Every counter as (name, description, value), in declaration
            /// order; the description is the field's doc comment (empty if none).
            pub fn values(&self) -> Vec<CounterValue> {
                vec![$(CounterValue {
                    name: stringify!($name),
                    help: concat!($($doc),*).trim_ascii(),
                    value: self.$name,
                },)*]
            }
        }
    };
}

/// One counter of a [`CountersSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterValue {
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
}

queue_pair_counters! {
    rx_packets,
    rx_bytes,
    /// Frames that did not fit the guest buffer they were offered.
    rx_dropped_too_big,
    /// Guest buffers that could not be written (bad descriptors).
    rx_bad_descriptors,
    /// Times frames had to wait because the guest posted no buffers.
    rx_no_buffer_waits,
    /// Frames that arrived for a queue pair the guest does not use, dropped.
    rx_dropped_inactive,
    tx_packets,
    tx_bytes,
    /// Chains dropped for bad descriptors, oversize or runt frames.
    tx_dropped,
    /// Of those, chains longer than the queue size (virtio 1.2 2.7.5.2).
    tx_chains_too_long,
    /// Of those, frames longer than the MTU allows.
    tx_dropped_oversize,
    /// Of those, frames whose source MAC is not the guest's (spoof check).
    tx_dropped_spoofed,
    /// Chains returned unsent while the host link was down.
    tx_dropped_link_down,
    /// Times the host transmit ring was full.
    tx_ring_full,
    /// Transmit retries after waiting for room timed out.
    tx_retries,
    /// GSO frames from the guest (TSO/USO).
    tx_gso_frames,
    /// Wire frames cut from GSO frames.
    tx_gso_segments,
    /// Frames whose transport checksum the device filled (NEEDS_CSUM, and
    /// every segment of a GSO frame).
    tx_csum_filled,
    /// Frames whose transport checksum the device left to the host kernel
    /// (AF_XDP TX metadata) instead.
    tx_csum_offloaded,
    /// Wire frames sent from guest memory (`umem=guest`) rather than copied.
    tx_gathered_frames,
    /// Times the IO thread looked for completions of frames sent from guest
    /// memory on its timer, none having come with the sends.
    tx_gather_waits,
    /// Chains sent from guest memory returned without their completion
    /// (the host link went down or its socket was replaced).
    tx_gather_abandoned,
    /// Of the dropped chains: offload requests that cannot be honoured (not
    /// negotiated, checksum outside the frame, GSO of something not TCP/UDP).
    tx_offload_errors,
    /// Received frames whose transport checksum verified (DATA_VALID for the guest).
    rx_csum_verified,
    /// Received frames whose sender left the checksum to the device, completed.
    rx_csum_completed,
    /// Received frames whose checksum failed (passed on unmarked).
    rx_csum_bad,
    /// Merged frames handed to the guest (GRO).
    rx_gro_frames,
    /// Wire frames merged into them.
    rx_gro_segments,
    /// TCP packets longer than the MTU (a host's GSO packet, as generic XDP
    /// hands them over) cut into wire frames for a guest that cannot take
    /// them whole.
    rx_gso_split,
    /// Wire frames cut from them.
    rx_gso_split_segments,
    /// Of those wire frames, ones dropped because the guest's buffers ran
    /// out partway through the packet (a packet is never delivered twice).
    rx_gso_split_dropped,
    rx_notifications,
    tx_notifications,
    interrupts,
    /// Sum of frames per processed batch and number of batches: their ratio is the mean batch.
    rx_batch_frames,
    rx_batches,
    tx_batch_frames,
    tx_batches,
    /// Queues found unusable (bad avail index or ring, head outside the
    /// queue) or a worker that failed: each put the device in DEVICE_NEEDS_RESET.
    queue_errors,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
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
             {} ring full, {} retries; {} from guest memory, {} completion waits, {} given up), \
             offloads: tx {} gso frames -> {} segments, {} checksums filled, {} left to the kernel, {} refused; \
             rx checksums {} verified, {} completed, {} bad; \
             rx coalesced {} frames from {} segments; \
             rx cut {} packets into {} frames ({} dropped); \
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
            self.tx_gathered_frames,
            self.tx_gather_waits,
            self.tx_gather_abandoned,
            self.tx_gso_frames,
            self.tx_gso_segments,
            self.tx_csum_filled,
            self.tx_csum_offloaded,
            self.tx_offload_errors,
            self.rx_csum_verified,
            self.rx_csum_completed,
            self.rx_csum_bad,
            self.rx_gro_frames,
            self.rx_gro_segments,
            self.rx_gso_split,
            self.rx_gso_split_segments,
            self.rx_gso_split_dropped,
            self.rx_notifications,
            self.tx_notifications,
            self.interrupts,
            mean(self.rx_batch_frames, self.rx_batches),
            mean(self.tx_batch_frames, self.tx_batches),
            self.queue_errors,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_list_every_counter_once_with_its_doc() {
        let counters = QueuePairCounters::default();
        add(&counters.rx_packets, 3);
        add(&counters.queue_errors, 1);
        let values = counters.snapshot().values();
        let names: Vec<&str> = values.iter().map(|v| v.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        let find = |name: &str| values.iter().find(|v| v.name == name).copied();
        assert_eq!(find("rx_packets").map(|v| v.value), Some(3));
        assert_eq!(find("queue_errors").map(|v| v.value), Some(1));
        assert_eq!(find("tx_packets").map(|v| v.value), Some(0));
        assert_eq!(
            find("rx_dropped_inactive").map(|v| v.help),
            Some("Frames that arrived for a queue pair the guest does not use, dropped.")
        );
        assert_eq!(find("rx_packets").map(|v| v.help), Some(""));
    }
}
