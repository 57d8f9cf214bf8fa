//! The datapath allocates nothing per packet: a counting global allocator
//! (this test binary only) watches rx_batch, tx_batch, reclaim, kick_tx
//! and poll move frames both ways.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use net_afxdp::testbed::{test_frame_seq, VethPair};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised, no destructor: safe to touch from the allocator.
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn datapath_allocates_nothing_per_packet() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let mut nic = open(&pair, &format!("ifname={}", pair.a)).unwrap();
    let q = &mut nic.queues_mut()[0];
    let inbound: Vec<Vec<u8>> = (0..2000)
        .map(|i| test_frame(a_mac, b_mac, i, 60 + (i as usize % 1400)))
        .collect();
    let outbound = test_frame(b_mac, a_mac, 7, 1000);
    let (mut received, mut sent) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(10);
    for chunk in inbound.chunks(100) {
        for f in chunk {
            peer.send(f).unwrap();
        }
        let want = received + chunk.len();
        WATCHING.with(|w| w.set(true));
        while received < want && Instant::now() < deadline {
            q.rx_batch(64, |f| {
                received += usize::from(test_frame_seq(f).is_some());
                true
            });
            let r = q.tx_batch(64, |buf| {
                if sent % 100 == 99 {
                    return None;
                }
                buf[..outbound.len()].copy_from_slice(&outbound);
                sent += 1;
                Some(outbound.len())
            });
            if r.kick_pending {
                q.kick_tx();
            }
            q.reclaim();
            let _ = q.poll(true, false, Some(Duration::from_millis(5)));
        }
        WATCHING.with(|w| w.set(false));
        sent += 1;
    }
    assert_eq!(received, inbound.len());
    assert!(sent >= 1000, "{sent}");
    assert_eq!(
        ALLOCATIONS.load(Ordering::Relaxed),
        0,
        "allocations in the datapath"
    );
    wait_completions(q);
    assert_no_leak(q);
}
