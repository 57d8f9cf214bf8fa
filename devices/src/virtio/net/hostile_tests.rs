//! The device driven as a broken or hostile guest would drive it: no input
//! may make an IO thread spin, do unbounded work per notification, starve
//! its other queues, or keep a reset or the VMM's exit from completing.
//!
//! Each test body runs under [`within`], so a device that hangs fails the
//! test instead of holding the whole test run.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::harness::{DriverHarness, VIRTQ_DESC_F_WRITE};
use super::tests::{collect_used, config, frame, SocketBackend, FEATURES};
use super::*;
use crate::virtio::mmio::STATUS_DEVICE_NEEDS_RESET;
use crate::virtio::INTERRUPT_CONFIG_CHANGE;

const TEST_LIMIT: Duration = Duration::from_secs(30);

fn net_named(id: &str, backends: Vec<Box<dyn NetBackend>>) -> (Net, Vec<Arc<QueuePairCounters>>) {
    let net = Net::new(config(id, true), backends).unwrap();
    let counters = net.counters().to_vec();
    (net, counters)
}

/// Runs `body` on its own thread and fails if it does not finish in `limit`.
fn within(what: &str, limit: Duration, body: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        body();
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(limit) {
        Ok(()) => thread.join().unwrap(),
        // The body panicked: pass its panic on.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: hung for {limit:?}"),
    }
}

/// Resets the device on another thread; fails if the reset hangs.
fn reset_within(h: DriverHarness, limit: Duration) -> DriverHarness {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut h = h;
        h.reset();
        let _ = tx.send(h);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("device reset hung for {limit:?}"))
}

fn wait_needs_reset(h: &mut DriverHarness, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if h.status() & STATUS_DEVICE_NEEDS_RESET != 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The /proc/self/task directory of the thread called `name` (as the
/// kernel keeps it: 15 bytes at most).
fn thread_dir(name: &str) -> Option<std::path::PathBuf> {
    let name = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p.join("comm")).is_ok_and(|comm| comm.trim_end() == name))
}

/// CPU time (user + system) the thread called `name` has used, in ms.
fn thread_cpu_ms(name: &str) -> u64 {
    let dir = thread_dir(name).unwrap_or_else(|| panic!("no thread called {name}"));
    let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (fields[10] + fields[11]) * 1000 / ticks_per_s
}

/// Asserts the thread `name` is asleep, not spinning, over `window`.
fn assert_idle(name: &str, window: Duration) {
    let before = thread_cpu_ms(name);
    std::thread::sleep(window);
    let used = thread_cpu_ms(name) - before;
    assert!(
        u128::from(used) * 5 < window.as_millis(),
        "{name} used {used} ms of CPU in {window:?}: it spins"
    );
}

/// After a reset the device must serve a fresh driver again.
fn assert_serves_again(h: &mut DriverHarness, peer: &UnixDatagram) {
    h.start(FEATURES, 3, 256);
    assert_eq!(h.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    h.queue_tx_frame(1, &frame(4242, 64));
    h.kick(1);
    let mut buf = [0u8; 2048];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(4242, 64)[..]);
    h.post_rx_buffers(0, 4);
    h.kick(0);
    peer.send(&frame(4343, 80)).unwrap();
    // A frame that waited through the reset may come first: none is lost.
    let mut got = Vec::new();
    let mut used = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got != frame(4343, 80) && Instant::now() < deadline {
        if used.is_empty() {
            used = collect_used(h, 0, 1);
        }
        if let Some((id, len)) = used.pop() {
            h.rx_frame(0, id, len, &mut got);
        }
    }
    assert_eq!(got, frame(4343, 80));
}

/// A queue the device cannot use: DEVICE_NEEDS_RESET with a config
/// interrupt, the IO thread asleep, and reset, restart and drop working.
fn broken_queue_case(id: &'static str, queue: usize, break_it: fn(&mut DriverHarness)) {
    within(id, TEST_LIMIT, move || {
        let (b, peer) = SocketBackend::pair();
        let (dev, counters) = net_named(id, vec![b]);
        let mut h = DriverHarness::new(dev);
        let avail_at: &[(usize, u64)] = if id.ends_with("zero") {
            &[(queue, 0)]
        } else {
            &[]
        };
        h.start_with_avail_rings(FEATURES, 3, 256, avail_at);
        break_it(&mut h);
        h.kick(queue);
        if queue == 0 {
            // Receive touches the ring only when a frame arrives.
            peer.send(&frame(1, 64)).unwrap();
        }
        assert!(
            wait_needs_reset(&mut h, Duration::from_secs(5)),
            "no DEVICE_NEEDS_RESET"
        );
        assert!(h.wait_interrupt(Duration::from_secs(1)), "no interrupt");
        assert_ne!(h.ack_interrupt() & INTERRUPT_CONFIG_CHANGE, 0);
        assert!(counters[0].snapshot().queue_errors >= 1);
        assert_idle(&format!("xskvm-{id}-q0"), Duration::from_millis(300));

        let mut h = reset_within(h, Duration::from_secs(5));
        assert_eq!(h.status(), 0, "reset clears DEVICE_NEEDS_RESET");
        assert_serves_again(&mut h, &peer);

        // Broken once more, then dropped as the VMM does at exit.
        h.reset();
        h.start_with_avail_rings(FEATURES, 3, 256, avail_at);
        break_it(&mut h);
        h.kick(queue);
        if queue == 0 {
            peer.send(&frame(2, 64)).unwrap();
        }
        assert!(wait_needs_reset(&mut h, Duration::from_secs(5)));
        drop(h);
    });
}

#[test]
fn tx_avail_index_beyond_the_queue_size_needs_reset() {
    broken_queue_case("hv-txidx", 1, |h| h.set_avail_idx(1, 1000));
}

#[test]
fn rx_avail_index_beyond_the_queue_size_needs_reset() {
    broken_queue_case("hv-rxidx", 0, |h| h.set_avail_idx(0, 300));
}

#[test]
fn tx_avail_ring_left_at_zero_needs_reset() {
    broken_queue_case("hv-tx-zero", 1, |h| h.set_avail_idx(1, 5));
}

#[test]
fn rx_avail_ring_left_at_zero_needs_reset() {
    broken_queue_case("hv-rx-zero", 0, |h| h.set_avail_idx(0, 7));
}

#[test]
fn chain_head_outside_the_queue_needs_reset() {
    broken_queue_case("hv-head", 1, |h| {
        // An avail entry naming descriptor 300 of a 256-entry table.
        let slot = h.avail_ring_addr(1) + 4 + u64::from(h.avail_idx(1) % 256) * 2;
        h.mem.write_obj(300u16, GuestAddress(slot)).unwrap();
        let idx = h.avail_idx(1).wrapping_add(1);
        h.set_avail_idx(1, idx);
    });
}

#[test]
fn chains_longer_than_the_queue_are_dropped() {
    within("long chains", TEST_LIMIT, || {
        let (b, peer) = SocketBackend::pair();
        let (dev, counters) = net_named("hv-long", vec![b]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 256);
        // 300 descriptors, then a whole frame: a valid frame in a chain the
        // spec forbids (longer than the queue size).
        let data = 0x30_0000u64;
        h.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(data))
            .unwrap();
        h.mem
            .write_slice(&frame(1, 64), GuestAddress(data + 0x100))
            .unwrap();
        let mut descs = vec![(data, NET_HDR_LEN as u32, 0u16)];
        descs.extend(std::iter::repeat_n((data + 0x80, 0u32, 0u16), 300));
        descs.push((data + 0x100, 64, 0));
        h.queue_indirect_chain(1, 0x40_0000, &descs);
        // The largest indirect table there is, many times over.
        let huge = vec![(data + 0x80, 0u32, 0u16); 65_535];
        for _ in 0..32 {
            h.queue_indirect_chain(1, 0x80_0000, &huge);
        }
        h.queue_tx_frame(1, &frame(2, 64));
        h.kick(1);
        let mut buf = [0u8; 2048];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &frame(2, 64)[..], "only the good frame goes out");
        assert_eq!(
            collect_used(&mut h, 1, 34).len(),
            34,
            "every chain returned"
        );
        // Counters are added after each batch: give the worker a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters[0].snapshot().tx_packets == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let c = counters[0].snapshot();
        assert_eq!((c.tx_packets, c.tx_dropped), (1, 33), "{c}");
        assert_eq!(c.tx_chains_too_long, 33, "{c}");
    });
}

/// Where a flooding backend republishes the TX chain it was just given.
struct FloodTarget {
    mem: GuestMemoryMmap,
    avail: u64,
    next_idx: u16,
    head: u16,
}

impl FloodTarget {
    /// Publishes `head` once more in a 256-entry avail ring, as a guest would.
    fn publish_again(&mut self) {
        let slot = self.avail + 4 + u64::from(self.next_idx % 256) * 2;
        self.mem.write_obj(self.head, GuestAddress(slot)).unwrap();
        self.next_idx = self.next_idx.wrapping_add(1);
        self.mem
            .write_obj(self.next_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }
}

/// A backend whose every transmit makes the guest post one more TX chain at
/// once: a guest that keeps the TX queue busy forever. Receive comes from a
/// datagram socket.
struct FloodingBackend {
    sock: UnixDatagram,
    target: Arc<Mutex<Option<FloodTarget>>>,
    transmitted: Arc<std::sync::atomic::AtomicU64>,
}

impl NetBackend for FloodingBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        let mut buf = [0u8; 2048];
        let mut taken = 0;
        // Test frames are only sent while buffers are posted: none is lost.
        while let Ok(n) = self.sock.recv(&mut buf) {
            if deliver(&buf[..n]) {
                taken += 1;
            }
        }
        taken
    }

    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        let mut frame = [0u8; 2048];
        let mut sent = 0;
        while fill(&mut frame).is_some() {
            sent += 1;
            self.transmitted.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = self.target.lock().unwrap().as_mut() {
                t.publish_again();
            }
        }
        (sent, false)
    }
}

#[test]
fn endless_tx_does_not_starve_rx_or_reset() {
    within("tx flood", TEST_LIMIT, || {
        let (a, peer) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let target = Arc::new(Mutex::new(None));
        let transmitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let backend = FloodingBackend {
            sock: a,
            target: target.clone(),
            transmitted: transmitted.clone(),
        };
        let (dev, counters) = net_named("hv-flood", vec![Box::new(backend)]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 256);
        h.post_rx_buffers(0, 8);
        h.kick(0);
        h.queue_tx_frame(1, &frame(1, 64));
        let avail = h.avail_ring_addr(1);
        let head: u16 = h.mem.read_obj(GuestAddress(avail + 4)).unwrap();
        *target.lock().unwrap() = Some(FloodTarget {
            mem: h.mem.clone(),
            avail,
            next_idx: h.avail_idx(1),
            head,
        });
        h.kick(1);
        // The flood is on; receive must still be served.
        while transmitted.load(Ordering::Relaxed) < 10_000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        for seq in 0..4 {
            peer.send(&frame(seq, 100)).unwrap();
        }
        let used = collect_used(&mut h, 0, 4);
        assert_eq!(
            used.len(),
            4,
            "rx starved by tx: {}",
            counters[0].snapshot()
        );
        let mut h = reset_within(h, Duration::from_secs(5));
        assert_eq!(h.status(), 0);
    });
}

#[test]
fn control_queue_without_mq_is_queue_2() {
    within("ctrl without mq", TEST_LIMIT, || {
        let (b0, _p0) = SocketBackend::pair();
        let (b1, _p1) = SocketBackend::pair();
        let (dev, _) = net_named("hv-ctrl", vec![b0, b1]);
        let mut h = DriverHarness::new(dev);
        // CTRL_VQ without MQ: rx0, tx0, then the control queue.
        h.start(FEATURES & !VIRTIO_NET_F_MQ, 3, 64);
        let (cmd_addr, ack_addr) = (0x20_0000u64, 0x20_1000u64);
        h.mem
            .write_slice(&[4u8, 0, 1, 0], GuestAddress(cmd_addr))
            .unwrap();
        h.mem.write_obj(0xffu8, GuestAddress(ack_addr)).unwrap();
        h.queue_raw_chain(2, &[(cmd_addr, 4, 0), (ack_addr, 1, VIRTQ_DESC_F_WRITE)]);
        h.kick(2);
        let used = collect_used(&mut h, 2, 1);
        assert_eq!(used, vec![(used.first().map_or(0, |u| u.0), 1)]);
        let ack: u8 = h.mem.read_obj(GuestAddress(ack_addr)).unwrap();
        assert_eq!(ack, 1, "VQ_PAIRS_SET without MQ is refused");
    });
}

#[test]
fn control_ack_never_goes_into_a_zero_length_buffer() {
    within("ctrl zero-length ack", TEST_LIMIT, || {
        let (b, _p) = SocketBackend::pair();
        let (dev, _) = net_named("hv-ack", vec![b]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 64);
        let (cmd_addr, ack_addr) = (0x20_0000u64, 0x20_1000u64);
        h.mem
            .write_slice(&[4u8, 0, 1, 0], GuestAddress(cmd_addr))
            .unwrap();
        h.mem.write_obj(0xffu8, GuestAddress(ack_addr)).unwrap();
        h.queue_raw_chain(2, &[(cmd_addr, 4, 0), (ack_addr, 0, VIRTQ_DESC_F_WRITE)]);
        h.kick(2);
        let used = collect_used(&mut h, 2, 1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1, 0, "nothing written");
        let byte: u8 = h.mem.read_obj(GuestAddress(ack_addr)).unwrap();
        assert_eq!(
            byte, 0xff,
            "the byte behind a zero-length buffer is untouched"
        );
    });
}

#[test]
fn failed_activation_stops_started_pairs_and_keeps_every_backend() {
    within("failed activation", TEST_LIMIT, || {
        let (b0, peer0) = SocketBackend::pair();
        let (b1, peer1) = SocketBackend::pair();
        let (mut dev, _) = net_named("hv-act", vec![b0, b1]);
        dev.fail_spawn_at = Some(1);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 5, 256);
        assert_ne!(
            h.status() & STATUS_DEVICE_NEEDS_RESET,
            0,
            "activation failed"
        );
        // Pair 0 was started before pair 1 failed: it must be stopped.
        std::thread::sleep(Duration::from_millis(50));
        assert!(thread_dir("xskvm-hv-act-q0").is_none(), "pair 0 still runs");
        h.reset();
        h.start(FEATURES, 5, 256);
        assert_eq!(h.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        for (pair, peer) in [(0usize, &peer0), (1, &peer1)] {
            let tx = 2 * pair + 1;
            h.queue_tx_frame(tx, &frame(pair as u32, 64));
            h.kick(tx);
            let mut buf = [0u8; 2048];
            let n = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &frame(pair as u32, 64)[..], "pair {pair}");
        }
    });
}

/// A socket backend that panics in its first transmit.
struct PanickingBackend {
    inner: Box<dyn NetBackend>,
    panicked: Arc<AtomicBool>,
}

impl NetBackend for PanickingBackend {
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        self.inner.receive(deliver)
    }

    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        if !self.panicked.swap(true, Ordering::Relaxed) {
            panic!("backend bug (deliberate, in a test)");
        }
        self.inner.transmit(fill)
    }
}

#[test]
fn a_panicking_worker_keeps_its_backend_and_the_pair_serves_again() {
    within("panicking worker", TEST_LIMIT, || {
        let (inner, peer) = SocketBackend::pair();
        let backend = PanickingBackend {
            inner,
            panicked: Arc::new(AtomicBool::new(false)),
        };
        let (dev, _) = net_named("hv-panic", vec![Box::new(backend)]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 256);
        h.queue_tx_frame(1, &frame(1, 64));
        h.kick(1);
        assert!(
            wait_needs_reset(&mut h, Duration::from_secs(5)),
            "a dead worker must ask for a reset"
        );
        let mut h = reset_within(h, Duration::from_secs(5));
        assert_serves_again(&mut h, &peer);
    });
}

/// A driver adding chains while the device takes them is the normal case,
/// not a broken ring: the device must never mistake the one for the other
/// (it once did, when it re-read avail.idx after finding no chain).
#[test]
fn chains_published_while_the_device_works_are_not_a_broken_ring() {
    within("concurrent publishing", TEST_LIMIT, || {
        let (b, peer) = SocketBackend::pair();
        let (dev, counters) = net_named("hv-race", vec![b]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 256);
        const FRAMES: u32 = 100_000;
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            while n < FRAMES && peer.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        });
        let mut sent = 0;
        let mut used = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while sent < FRAMES && Instant::now() < deadline {
            if h.queue_tx_frame(1, &frame(sent, 64)) {
                sent += 1;
                h.kick_if_needed(1);
            } else {
                used.clear();
                h.take_used(1, &mut used);
            }
            assert_eq!(
                h.status() & STATUS_DEVICE_NEEDS_RESET,
                0,
                "a busy ring taken for a broken one: {}",
                counters[0].snapshot()
            );
        }
        assert_eq!(receiver.join().unwrap(), FRAMES);
    });
}

/// A driver may make its queues one entry long: every pass then has a
/// budget of one, and a look at an empty ring must not use it up (it did
/// for transmit: each pass ended asking for another, and the IO thread
/// spun for as long as the device ran).
#[test]
fn queues_of_one_entry_leave_the_io_thread_idle() {
    within("one-entry queues", TEST_LIMIT, || {
        let (b, peer) = SocketBackend::pair();
        let (dev, counters) = net_named("one", vec![b]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 1);
        let thread = "xskvm-one-q0";
        // The thread names itself once it runs.
        let deadline = Instant::now() + Duration::from_secs(5);
        while thread_dir(thread).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_idle(thread, Duration::from_millis(300));
        // Header and frame in one descriptor: the queue holds no more.
        const AT: u64 = 0x300_0000;
        for seq in 0..3 {
            let mut chain = vec![0u8; NET_HDR_LEN];
            chain.extend_from_slice(&frame(seq, 64));
            h.mem.write_slice(&chain, GuestAddress(AT)).unwrap();
            h.queue_raw_chain(1, &[(AT, chain.len() as u32, 0)]);
            h.kick(1);
            let mut buf = [0u8; 2048];
            let n = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &frame(seq, 64)[..]);
            assert_eq!(collect_used(&mut h, 1, 1).len(), 1);
        }
        assert_idle(thread, Duration::from_millis(300));
        assert_eq!(counters[0].snapshot().tx_packets, 3);
    });
}

/// An unusable chain (here a readable buffer in the receive queue) met in
/// the middle of a frame spread over mergeable buffers comes back empty
/// before the frame's own chains: a driver taking num_buffers entries
/// from the frame's first one never meets it among them.
#[test]
fn an_unusable_rx_chain_amid_a_merged_frame_comes_back_before_the_frame() {
    within("unusable chain amid a merged frame", TEST_LIMIT, || {
        let (b, peer) = SocketBackend::pair();
        let (dev, counters) = net_named("amid", vec![b]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES | VIRTIO_NET_F_MRG_RXBUF, 3, 256);
        const AT: u64 = 0x300_0000;
        h.queue_raw_chain(0, &[(AT, 64, VIRTQ_DESC_F_WRITE)]);
        h.queue_raw_chain(0, &[(AT + 0x1000, 64, 0)]);
        h.queue_raw_chain(0, &[(AT + 0x2000, 2048, VIRTQ_DESC_F_WRITE)]);
        let heads: Vec<u16> = (0..3)
            .map(|k| {
                h.mem
                    .read_obj(GuestAddress(h.avail_ring_addr(0) + 4 + 2 * k))
                    .unwrap()
            })
            .collect();
        h.kick(0);
        let sent = frame(7, 200);
        peer.send(&sent).unwrap();
        let used = collect_used(&mut h, 0, 3);
        let first_room = 64 - NET_HDR_LEN;
        assert_eq!(
            used,
            [
                (heads[1], 0),
                (heads[0], 64),
                (heads[2], (sent.len() - first_room) as u32)
            ]
        );
        let mut hdr = [0u8; NET_HDR_LEN];
        h.mem.read_slice(&mut hdr, GuestAddress(AT)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 2, "num_buffers");
        let mut got = vec![0u8; sent.len()];
        h.mem
            .read_slice(
                &mut got[..first_room],
                GuestAddress(AT + NET_HDR_LEN as u64),
            )
            .unwrap();
        h.mem
            .read_slice(&mut got[first_room..], GuestAddress(AT + 0x2000))
            .unwrap();
        assert_eq!(got, sent);
        assert_eq!(counters[0].snapshot().rx_packets, 1);
    });
}

/// Found by fuzzing mmio_registers: a TX avail ring placed two bytes before
/// the used ring, so that `avail.idx` is `used.flags`. Without EVENT_IDX
/// the device's own notification switches rewrite the index it reads
/// (disabling writes 1, enabling 0), so "re-enabled, more chains?" said yes
/// while the ring held none to take, for ever: the IO thread spun in one
/// pass, never saw its stop event, and a reset hung in the join. A ring
/// that announces chains it does not yield is broken: DEVICE_NEEDS_RESET.
#[test]
fn tx_avail_ring_overlapping_the_used_ring_needs_reset_not_a_spin() {
    overlapping_tx_rings_case("hv-overlap", true);
}

/// The same ring while the host link is down, where TX chains are returned
/// unsent by a loop of the same shape.
#[test]
fn tx_avail_ring_overlapping_the_used_ring_with_the_link_down_needs_reset() {
    overlapping_tx_rings_case("hv-overlap-down", false);
}

fn overlapping_tx_rings_case(id: &'static str, link_up: bool) {
    within(id, TEST_LIMIT, move || {
        let (b, _peer) = SocketBackend::pair();
        let (dev, counters) = net_named(id, vec![b]);
        if !link_up {
            dev.link().set_up(false);
        }
        let mut h = DriverHarness::new(dev);
        // Queue 1's used ring is at its ring block + 0x2000.
        let used = 0x10_0000 + 0x4000 + 0x2000;
        h.start_with_avail_rings(
            FEATURES & !VIRTIO_RING_F_EVENT_IDX,
            3,
            256,
            &[(1, used - 2)],
        );
        h.kick(1);
        assert!(
            wait_needs_reset(&mut h, Duration::from_secs(5)),
            "no DEVICE_NEEDS_RESET"
        );
        assert!(counters[0].snapshot().queue_errors >= 1);
        assert_idle(&format!("xskvm-{id}-q0"), Duration::from_millis(300));
        let h = reset_within(h, Duration::from_secs(5));
        drop(h);
    });
}

/// A backend with one frame always waiting: each time the device cannot
/// take it, "the guest" publishes one more unusable (read-only) RX chain.
struct BadRxChainFlood {
    target: Arc<Mutex<Option<FloodTarget>>>,
    on: Arc<AtomicBool>,
    sock: UnixDatagram,
}

impl NetBackend for BadRxChainFlood {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        if deliver(&frame(1, 100)) {
            return 1;
        }
        if self.on.load(Ordering::Relaxed) {
            if let Some(t) = self.target.lock().unwrap().as_mut() {
                t.publish_again();
            }
        }
        0
    }
    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        let mut buf = [0u8; 2048];
        let mut sent = 0;
        while let Some(f) = fill(&mut buf) {
            let _ = self.sock.send(&buf[..f.len]);
            sent += 1;
        }
        (sent, false)
    }
}

#[test]
fn unusable_rx_chains_posted_without_end_do_not_starve_transmit() {
    let (a, peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let target = Arc::new(Mutex::new(None));
    let on = Arc::new(AtomicBool::new(true));
    let backend = BadRxChainFlood {
        target: target.clone(),
        on: on.clone(),
        sock: a,
    };
    let (dev, counters) = net_named("hv-badrx", vec![Box::new(backend)]);
    let mut h = DriverHarness::new(dev);
    h.start(FEATURES, 3, 256);
    // One read-only RX chain, its head published again and again.
    h.queue_raw_chain(0, &[(0x20_2000, 2048, 0)]);
    let avail = h.avail_ring_addr(0);
    let head: u16 = h.mem.read_obj(GuestAddress(avail + 4)).unwrap();
    *target.lock().unwrap() = Some(FloodTarget {
        mem: h.mem.clone(),
        avail,
        next_idx: h.avail_idx(0),
        head,
    });
    h.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    h.queue_tx_frame(1, &frame(9, 64));
    h.kick(1);
    let mut buf = [0u8; 2048];
    let sent = peer.recv(&mut buf);
    on.store(false, Ordering::Relaxed);
    assert!(
        sent.is_ok(),
        "transmit starved by one endless receive pass ({})",
        counters[0].snapshot()
    );
    assert!(counters[0].snapshot().rx_bad_descriptors > 0);
}

/// The only chains a pass returns are unusable ones (given back empty):
/// the guest is still told, or it waits for those buffers for ever.
#[test]
fn unusable_rx_chains_returned_alone_raise_an_interrupt() {
    within("unusable chains returned alone", TEST_LIMIT, || {
        let (b, peer) = SocketBackend::pair();
        let (dev, counters) = net_named("bad-alone", vec![b]);
        let mut h = DriverHarness::new(dev);
        h.start(FEATURES, 3, 256);
        h.queue_raw_chain(0, &[(0x300_1000, 2048, 0)]);
        let head: u16 = h
            .mem
            .read_obj(GuestAddress(h.avail_ring_addr(0) + 4))
            .unwrap();
        h.ack_interrupt();
        h.kick(0);
        peer.send(&frame(7, 200)).unwrap();
        assert!(
            h.wait_interrupt(Duration::from_secs(2)),
            "no interrupt for the returned chain ({})",
            counters[0].snapshot()
        );
        let mut used = Vec::new();
        h.take_used(0, &mut used);
        assert_eq!(used, [(head, 0)]);
        assert_eq!(counters[0].snapshot().rx_bad_descriptors, 1);
    });
}
