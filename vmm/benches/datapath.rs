//! The virtio-net datapath against the raw AF_XDP yardstick, on a veth pair
//! in a namespace of its own (root needed).
//!
//! "raw": an AF_XDP socket on one end sends (or receives) as fast as it can.
//! "virtio-net": the same socket behind xskvm's virtio-net device, driven by
//! the device-level driver harness (test code playing the guest's driver
//! through the virtio-mmio registers, queue eventfds and guest memory,
//! notifying only when EVENT_IDX says so, as Linux's driver does). In
//! both, an AF_XDP socket on the other end is the peer. Copy mode, native
//! XDP, one queue pair. Prints Mpps, Gbit/s and virtio-net/raw ratios; and,
//! for `umem=guest`, a bare socket sending frames from guest memory as they
//! lie there (`XskQueue::tx_gather`) against one copying them into its UMEM.
//!
//! cargo bench -p vmm --bench datapath [-- SECONDS]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use devices::virtio::net::harness::{DriverHarness, BUFFER_SIZE, MEM_SIZE};
use devices::virtio::net::{
    Net, NetConfig, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX,
};
use devices::virtio::VIRTIO_F_VERSION_1;
use net_afxdp::testbed::{self, fold, ones_sum, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, GatherRequest, NicOwner, UmemRegion, XskQueue};
use vm_memory::GuestMemoryMmap;
use vmm::afxdp::XskBackend;
use vmm::vm::create_guest_memory;

const BATCH: usize = 64;
const QUEUE_SIZE: u16 = 256;

fn open(pair: &VethPair, dev: &str, extra: &str) -> (NicOwner, XskQueue) {
    let config: AfXdpConfig = format!("ifname={dev},mode=native,force-copy=on{extra}")
        .parse()
        .expect("config");
    let nic = pair
        .run(|| AfXdpNic::open(&config))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("open {dev}: {e}"));
    let (owner, mut queues) = nic.into_parts();
    (owner, queues.remove(0))
}

/// Sends `frame` as fast as the socket takes it, until `stop`.
fn blast(mut q: XskQueue, frame: Vec<u8>, stop: Arc<AtomicBool>) -> XskQueue {
    while !stop.load(Ordering::Relaxed) {
        let batch = q.tx_batch(BATCH, |buf| {
            buf[..frame.len()].copy_from_slice(&frame);
            Some(frame.len())
        });
        if batch.sent == 0 {
            let _ = q.poll(false, true, Some(Duration::from_millis(1)));
            q.reclaim();
        }
    }
    q
}

/// `umem=guest` at the socket level: the queue's UMEM is a "guest memory"
/// region holding `frame`, which it sends from there as it is, without a
/// copy (in pieces of at most one UMEM frame less the TX metadata, a
/// guest buffer's worth), as fast as the socket takes it.
fn blast_gather(
    mut q: XskQueue,
    region: UmemRegion,
    frame: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> XskQueue {
    const AT: usize = 0x1000;
    // SAFETY: inside the region's guest part (64 MiB); the mapping is
    // never unmapped and nothing else writes there.
    unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), region.as_ptr().add(AT), frame.len()) };
    let piece = 4096 - 24;
    while !stop.load(Ordering::Relaxed) {
        let batch = q.tx_gather(BATCH, |_, pieces| {
            for start in (0..frame.len()).step_by(piece) {
                let len = piece.min(frame.len() - start);
                pieces.push((AT + start) as u64, len as u32);
            }
            Some(GatherRequest::default())
        });
        if batch.sent == 0 {
            let _ = q.poll(false, true, Some(Duration::from_millis(1)));
            q.reclaim();
        }
    }
    q
}

/// Opens `dev` with `umem=guest` on fresh guest memory as xskvm makes it
/// (the driver harness's size; never unmapped, as a UMEM must be).
fn open_guest(pair: &VethPair, dev: &str) -> (NicOwner, XskQueue, UmemRegion, GuestMemoryMmap) {
    let config: AfXdpConfig = format!("ifname={dev},mode=native,force-copy=on,umem=guest")
        .parse()
        .expect("config");
    let (mem, mapping) = create_guest_memory(MEM_SIZE as u64, None, config.queue_umem_bytes())
        .expect("guest memory");
    let region = mapping.expect("one mapping").region(0).expect("region");
    let nic = pair
        .run(|| AfXdpNic::open_on(&config, Some(region)))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("open {dev}: {e}"));
    let (owner, mut queues) = nic.into_parts();
    (owner, queues.remove(0), region, mem)
}

/// Receives and counts until `stop`; returns the queue (its counters).
fn sink(mut q: XskQueue, stop: Arc<AtomicBool>) -> XskQueue {
    while !stop.load(Ordering::Relaxed) {
        if q.rx_batch(BATCH, |_| true) == 0 {
            let _ = q.poll(true, false, Some(Duration::from_millis(1)));
        }
    }
    q
}

/// The peer's receiver when it measures a sender: [`sink`], but it naps
/// 50 us when its ring is empty instead of sleeping until woken. Woken
/// per frame, a receiver makes every sender pay for waking it (in the
/// kernel's transmit path), and the slower sender more per frame, as the
/// receiver drains sooner and sleeps more often: 4 frames per wake-up
/// against the device, 38 against the raw socket. A real NIC moderates
/// its interrupts; 50 us is ~25 frames at 0.5 Mpps, far below the ring.
fn peer_sink(mut q: XskQueue, stop: Arc<AtomicBool>) -> XskQueue {
    while !stop.load(Ordering::Relaxed) {
        if q.rx_batch(BATCH, |_| true) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    q
}

struct Rate {
    pps: f64,
    size: usize,
    /// CPU time per frame (µs) of the side measured: the raw socket's
    /// thread, or the device's IO thread and the harness (the guest).
    cpu_us: (f64, f64),
    /// The device's counters (virtio-net runs only).
    device: Option<devices::virtio::net::CountersSnapshot>,
}

impl Rate {
    fn show(&self) -> String {
        format!(
            "{:6.3} Mpps {:6.2} Gbit/s",
            self.pps / 1e6,
            self.pps * self.size as f64 * 8.0 / 1e9
        )
    }
}

/// Counts packets seen by `counter` over `secs` after a warm-up.
/// Also returns the CPU time each named thread used in the window.
fn window(secs: f64, counter: impl Fn() -> u64) -> (f64, ThreadCpu) {
    thread::sleep(Duration::from_millis(300));
    let cpu0 = thread_cpu();
    let (c0, t0) = (counter(), Instant::now());
    thread::sleep(Duration::from_secs_f64(secs));
    let pps = (counter() - c0) as f64 / t0.elapsed().as_secs_f64();
    let mut cpu = thread_cpu();
    for (name, ticks) in &mut cpu.0 {
        *ticks -= cpu0
            .0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, t)| *t);
    }
    (pps, cpu)
}

/// CPU time (user + system, in clock ticks) of this process's threads, by
/// name (threads of the same name summed).
#[derive(Default)]
struct ThreadCpu(Vec<(String, u64)>);

impl ThreadCpu {
    /// Microseconds of CPU per frame of the threads named `name`.
    fn per_frame_us(&self, name: &str, frames: f64) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ticks = self
            .0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, t)| *t);
        ticks as f64 / hz * 1e6 / frames.max(1.0)
    }
}

fn thread_cpu() -> ThreadCpu {
    let mut out: Vec<(String, u64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return ThreadCpu(out);
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15, 12 and 13 after ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = fields
            .get(11..13)
            .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += ticks,
            None => out.push((name, ticks)),
        }
    }
    ThreadCpu(out)
}

/// Spawns a thread named `name` (so that its CPU time can be found).
fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn")
}

/// An AF_XDP socket on one end of the pair blasts frames at one on the
/// other; `tx` counts what the far end receives, rx what this end receives
/// (the far end sending).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// A bare AF_XDP socket.
    Raw,
    /// A bare AF_XDP socket on guest memory (`umem=guest`) sending frames
    /// from there without copying them (transmit only).
    RawGather,
    /// The socket behind virtio-net, the driver harness playing the guest.
    Virtio,
    /// The same with `umem=guest`: the device sends from guest memory.
    VirtioGuestUmem,
    /// The same, the guest sending 64 KiB TCP segments (TSO) that the
    /// device cuts into `size`-byte frames (checksums left to the kernel
    /// through AF_XDP TX metadata where it takes them).
    VirtioTso,
    /// As `VirtioTso`, the IO thread filling every checksum (tx-csum=vmm).
    VirtioTsoVmmCsum,
    /// As `VirtioTso` with `umem=guest`: segments' payloads sent from
    /// guest memory behind their rewritten headers.
    VirtioTsoGuestUmem,
    /// The same, the guest taking coalesced TCP (GUEST_TSO4, mergeable
    /// buffers) from a peer that sends one in-order TCP stream.
    VirtioGro,
}

/// One run on a fresh veth pair: end `a` is xskvm's side (`side`), end `b`
/// a bare AF_XDP peer. `tx`: `a` sends and the peer's receptions are
/// counted; otherwise the peer sends and `a`'s receptions are counted.
/// `tcp_stream`: the peer sends one in-order TCP stream (receive only).
fn measure(side: Side, tx: bool, size: usize, secs: f64, tcp_stream: bool) -> Rate {
    let pair = VethPair::new(1).expect("veth pair");
    // Jumbo frames: both ends at MTU 9000, so the sockets bind multi-buffer.
    let mtu: u16 = if size > 1514 { 9000 } else { 1500 };
    for dev in [&pair.a, &pair.b] {
        pair.ip(&["link", "set", dev, "mtu", &mtu.to_string()])
            .expect("set mtu");
    }
    let (mac_a, mac_b) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    // The device's side fills transmit checksums itself only where asked.
    let extra = if side == Side::VirtioTsoVmmCsum {
        ",tx-csum=vmm"
    } else {
        ""
    };
    let guest_umem = matches!(
        side,
        Side::RawGather | Side::VirtioGuestUmem | Side::VirtioTsoGuestUmem
    );
    let (_oa, qa, region, guest_mem) = if guest_umem {
        let (o, q, r, m) = open_guest(&pair, &pair.a);
        (o, q, Some(r), Some(m))
    } else {
        let (o, q) = open(&pair, &pair.a, extra);
        (o, q, None, None)
    };
    let (_ob, qb) = open(&pair, &pair.b, "");
    let frame = if tx {
        testbed::test_frame(mac_b, mac_a, 0, size)
    } else {
        testbed::test_frame(mac_a, mac_b, 0, size)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();

    let peer_counters = qb.stats_handle();
    let s = stop.clone();
    threads.push(if tx {
        spawn_named("peer", move || drop(peer_sink(qb, s)))
    } else if tcp_stream {
        let segment = tcp_segment(mac_b, mac_a, size);
        spawn_named("peer", move || drop(blast_tcp(qb, segment, s)))
    } else {
        let frame = frame.clone();
        spawn_named("peer", move || drop(blast(qb, frame, s)))
    });

    let s = stop.clone();
    let mut device = None;
    let mut own_counters = None;
    match side {
        Side::Raw if tx => threads.push(spawn_named("raw", move || drop(blast(qa, frame, s)))),
        Side::RawGather => {
            let region = region.expect("a guest memory region");
            threads.push(spawn_named("raw", move || {
                drop(blast_gather(qa, region, frame, s))
            }))
        }
        Side::Raw => {
            own_counters = Some(qa.stats_handle());
            threads.push(spawn_named("raw", move || drop(sink(qa, s))));
        }
        Side::Virtio
        | Side::VirtioGuestUmem
        | Side::VirtioTso
        | Side::VirtioTsoVmmCsum
        | Side::VirtioTsoGuestUmem
        | Side::VirtioGro => {
            let (counters_tx, counters_rx) = std::sync::mpsc::channel();
            let tso = matches!(
                side,
                Side::VirtioTso | Side::VirtioTsoVmmCsum | Side::VirtioTsoGuestUmem
            );
            let offloads = match side {
                Side::VirtioTso | Side::VirtioTsoVmmCsum | Side::VirtioTsoGuestUmem => {
                    VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4
                }
                Side::VirtioGro => {
                    VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF
                }
                // Jumbo frames reach the guest over mergeable buffers.
                _ if mtu > 1500 => VIRTIO_NET_F_MRG_RXBUF,
                _ => 0,
            };
            threads.push(spawn_named("guest", move || {
                let (h, counters) = harness_for(qa, mac_a, offloads, mtu, guest_mem, region);
                let _ = counters_tx.send(counters);
                if tso {
                    drive_tso(h, &tso_frame(mac_a, mac_b, size), &s);
                } else {
                    drive(h, tx, &frame, &s);
                }
            }));
            device = Some(counters_rx.recv().expect("device counters"));
        }
    }
    let (pps, cpu) = window(secs, || match (tx, &own_counters, &device) {
        (true, _, _) => peer_counters.counters().snapshot().rx_packets,
        (false, Some(own), _) => own.counters().snapshot().rx_packets,
        (false, None, Some(dev)) => dev.snapshot().rx_packets,
        (false, None, None) => 0,
    });
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    let frames = pps * secs;
    let cpu_us = match side {
        Side::Raw | Side::RawGather => (cpu.per_frame_us("raw", frames), 0.0),
        _ => (
            cpu.per_frame_us("xskvm-bench-q0", frames),
            cpu.per_frame_us("guest", frames),
        ),
    };
    Rate {
        pps,
        size,
        cpu_us,
        device: device.map(|d| d.snapshot()),
    }
}

/// The device with `mac` as the guest's MAC (the frames' source on TX).
/// `guest_mem`, `region`: `umem=guest`, the harness on the guest memory
/// registered as the socket's UMEM.
fn harness_for(
    qa: XskQueue,
    mac: [u8; 6],
    offloads: u64,
    mtu: u16,
    guest_mem: Option<GuestMemoryMmap>,
    region: Option<UmemRegion>,
) -> (DriverHarness, Arc<devices::virtio::net::QueuePairCounters>) {
    let net = Net::new(
        NetConfig {
            id: "bench".into(),
            mac,
            mtu,
            spoof_check: true,
            on_thread_start: None,
        },
        vec![Box::new(XskBackend::new(qa, region))],
    )
    .expect("device");
    let counters = net.counters()[0].clone();
    let mut h = match guest_mem {
        Some(mem) => DriverHarness::with_memory(net, mem),
        None => DriverHarness::new(net),
    };
    h.start(
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | offloads,
        3,
        QUEUE_SIZE,
    );
    (h, counters)
}

/// TCP payload bytes per GSO frame: as many whole segments as fit 64 KiB.
const TSO_PAYLOAD: usize = 65_000;
const TSO_HEADERS: usize = 14 + 20 + 32;

/// A 64 KiB TCP/IPv4 GSO frame whose segments are `wire_len` bytes, and
/// its virtio-net header (NEEDS_CSUM, GSO_TCPV4), as Linux would send it.
fn tso_frame(src: [u8; 6], dst: [u8; 6], wire_len: usize) -> ([u8; 12], Vec<u8>) {
    let mss = wire_len - TSO_HEADERS;
    let payload = TSO_PAYLOAD / mss * mss;
    let mut f = Vec::with_capacity(TSO_HEADERS + payload);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((20 + 32 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1]);
    f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x80, 0x10, 0x01, 0xf5, 0, 0, 0, 0]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8]);
    f.extend((0..payload).map(|i| i as u8));
    let mut hdr = [0u8; 12];
    hdr[0] = 1; // NEEDS_CSUM
    hdr[1] = 1; // GSO_TCPV4
    hdr[2..4].copy_from_slice(&(TSO_HEADERS as u16).to_le_bytes());
    hdr[4..6].copy_from_slice(&(mss as u16).to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    (hdr, f)
}

/// One wire TCP/IPv4 segment of `wire_len` bytes (a TSO frame's first).
fn tcp_segment(src: [u8; 6], dst: [u8; 6], wire_len: usize) -> Vec<u8> {
    let (_, big) = tso_frame(src, dst, wire_len);
    let mut f = big[..wire_len].to_vec();
    f[16..18].copy_from_slice(&((wire_len - 14) as u16).to_be_bytes());
    f[24..26].fill(0);
    let c = !fold(ones_sum(0, &f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// Sends `segment` over and over as one in-order TCP stream (sequence
/// number advanced, checksum filled per frame), until `stop`.
fn blast_tcp(mut q: XskQueue, segment: Vec<u8>, stop: Arc<AtomicBool>) -> XskQueue {
    let payload = (segment.len() - TSO_HEADERS) as u32;
    let mut seq = 1u32;
    while !stop.load(Ordering::Relaxed) {
        let batch = q.tx_batch(BATCH, |buf| {
            let f = &mut buf[..segment.len()];
            f.copy_from_slice(&segment);
            f[38..42].copy_from_slice(&seq.to_be_bytes());
            seq = seq.wrapping_add(payload);
            let pseudo = ones_sum(ones_sum(0, &f[26..34]), &[0, 6]) + (f.len() - 34) as u64;
            let c = !fold(ones_sum(pseudo, &f[34..]));
            f[50..52].copy_from_slice(&c.to_be_bytes());
            Some(f.len())
        });
        if batch.sent == 0 {
            let _ = q.poll(false, true, Some(Duration::from_millis(1)));
            q.reclaim();
        }
    }
    q
}

/// The guest's side for TSO: keeps the TX queue full of GSO frames.
fn drive_tso(mut h: DriverHarness, (hdr, frame): &([u8; 12], Vec<u8>), stop: &AtomicBool) {
    let mut used = Vec::with_capacity(usize::from(QUEUE_SIZE));
    while !stop.load(Ordering::Relaxed) {
        used.clear();
        h.take_used(1, &mut used);
        while h.queue_tx_frame_with_header(1, *hdr, frame) {}
        h.kick_if_needed(1);
        // The ring is full: sleep until most of it is sent, as Linux's
        // driver does when it stops its queue.
        if !h.arm_used_interrupt(1, true) {
            h.wait_interrupt(Duration::from_millis(1));
        }
    }
}

/// The guest's side: `tx` keeps the TX queue full of `frame`; otherwise
/// keeps RX buffers posted. Used chains are reaped either way.
fn drive(mut h: DriverHarness, tx: bool, frame: &[u8], stop: &AtomicBool) {
    let queue = if tx { 1 } else { 0 };
    let mut used = Vec::with_capacity(usize::from(QUEUE_SIZE));
    while !stop.load(Ordering::Relaxed) {
        used.clear();
        h.take_used(queue, &mut used);
        if tx {
            // A jumbo frame spans several buffers, as a guest's would.
            while if frame.len() > BUFFER_SIZE as usize {
                h.queue_tx_frame_with_header(queue, [0; 12], frame)
            } else {
                h.queue_tx_frame(queue, frame)
            } {}
            h.kick_if_needed(queue);
            // The ring is full: sleep until most of it is sent, as Linux's
            // driver does when it stops its queue.
            if !h.arm_used_interrupt(queue, true) {
                h.wait_interrupt(Duration::from_millis(1));
            }
        } else {
            if h.post_rx_buffers(queue, usize::from(QUEUE_SIZE)) > 0 {
                h.kick_if_needed(queue);
            }
            // As NAPI does once a poll found no more: interrupt on the next
            // frame, unless one came meanwhile.
            if used.is_empty() && !h.arm_used_interrupt(queue, false) {
                h.wait_interrupt(Duration::from_millis(1));
            }
        }
    }
}

/// `umem=guest` (`g`) against the copy path (`v`) and raw AF_XDP (`r`).
fn gather_report(label: &str, r: &Rate, v: &Rate, g: &Rate) {
    println!(
        "{label}   raw {}   copy path {}   umem=guest {}   ratio to raw {:.2}, to copy path {:.2}",
        r.show(),
        v.show(),
        g.show(),
        g.pps / r.pps.max(1.0),
        g.pps / v.pps.max(1.0)
    );
    println!(
        "            CPU per wire frame, IO thread: copy path {:.2} us, umem=guest {:.2} us (raw socket thread {:.2} us)",
        v.cpu_us.0, g.cpu_us.0, r.cpu_us.0
    );
    if let Some(c) = g.device {
        if c.tx_packets > 0 {
            println!(
                "            umem=guest device: {} of {} wire frames from guest memory, {} completion waits, {} dropped",
                c.tx_gathered_frames, c.tx_packets, c.tx_gather_waits, c.tx_dropped
            );
        } else {
            println!(
                "            umem=guest device: {} frames received, {} dropped too big, {} without a guest buffer",
                c.rx_packets, c.rx_dropped_too_big, c.rx_no_buffer_waits
            );
        }
    }
}

/// One comparison's first lines: rates, their ratio, CPU per frame.
fn compare(label: &str, r: &Rate, v: &Rate) {
    println!(
        "{label}   raw AF_XDP {}   virtio-net {}   ratio {:.2}",
        r.show(),
        v.show(),
        v.pps / r.pps.max(1.0)
    );
    println!(
        "            CPU per wire frame: raw socket thread {:.2} us; device IO thread {:.2} us, harness (guest) {:.2} us",
        r.cpu_us.0, v.cpu_us.0, v.cpu_us.1
    );
}

fn main() {
    if !testbed::is_root() {
        eprintln!("datapath bench: needs root (veth pairs, namespaces, AF_XDP); skipped");
        return;
    }
    // `cargo bench` passes --bench; under `cargo test` this is a short smoke run.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let default = if args.iter().any(|a| a == "--bench") {
        3.0
    } else {
        0.2
    };
    // A positive number is the window in seconds (so a row by its size
    // needs the " B" of its label).
    let seconds = |a: &String| a.parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0);
    let secs: f64 = args.iter().find_map(seconds).unwrap_or(default);
    // Other words select rows: those whose label contains one of them, or
    // (a word starting with '=') is the rest of it.
    let words: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && seconds(a).is_none())
        .collect();
    let selected = |label: &str| {
        words.is_empty()
            || words.iter().any(|w| match w.strip_prefix('=') {
                Some(exact) => label == exact,
                None => label.contains(w.as_str()),
            })
    };
    println!("virtio-net datapath vs raw AF_XDP: veth, copy mode, native XDP, 1 queue pair, {secs} s windows");
    // 9000: veth at MTU 9000, multi-buffer sockets on both ends.
    for size in [64usize, 1500, 9000] {
        for (dir, tx) in [("tx", true), ("rx", false)] {
            if !selected(&format!("{dir} {size:4} B")) {
                continue;
            }
            let r = measure(Side::Raw, tx, size, secs, false);
            let v = measure(Side::Virtio, tx, size, secs, false);
            compare(&format!("{dir} {size:4} B"), &r, &v);
            if let Some(c) = v.device {
                let per = |n: u64, d: u64| n as f64 / d.max(1) as f64;
                let (frames, batches, notes) = if tx {
                    (c.tx_packets, c.tx_batches, c.tx_notifications)
                } else {
                    (c.rx_packets, c.rx_batches, c.rx_notifications)
                };
                println!(
                    "            device: {:.1} frames per batch, {:.1} frames per guest notification, {:.1} frames per interrupt",
                    per(frames, batches),
                    per(frames, notes),
                    per(frames, c.interrupts)
                );
            }
        }
    }
    // TSO: the guest hands over 64 KiB segments; the yardstick sends
    // 1514-byte frames, the size the device cuts them into.
    for (side, label) in [
        (
            Side::VirtioTso,
            "tx TSO 64 KiB -> 1514 B, checksums by the kernel",
        ),
        (
            Side::VirtioTsoVmmCsum,
            "tx TSO 64 KiB -> 1514 B, checksums by xskvm",
        ),
    ] {
        if !selected(label) {
            continue;
        }
        let r = measure(Side::Raw, true, 1514, secs, false);
        let v = measure(side, true, 1514, secs, false);
        compare(label, &r, &v);
        if let Some(c) = v.device {
            println!(
                "            device: {:.1} wire frames per GSO frame, {} checksums left to the kernel, {} filled, {} offload errors, {} dropped",
                c.tx_gso_segments as f64 / c.tx_gso_frames.max(1) as f64,
                c.tx_csum_offloaded,
                c.tx_csum_filled,
                c.tx_offload_errors,
                c.tx_dropped
            );
        }
    }
    // umem=guest in the device: frames sent from guest memory against the
    // copy path and the raw socket, the three measured in turn.
    for size in [64usize, 1500, 9000] {
        let label = format!("tx {size:4} B umem=guest");
        if !selected(&label) {
            continue;
        }
        let r = measure(Side::Raw, true, size, secs, false);
        let v = measure(Side::Virtio, true, size, secs, false);
        let g = measure(Side::VirtioGuestUmem, true, size, secs, false);
        gather_report(&label, &r, &v, &g);
    }
    let label = "tx TSO 64 KiB -> 1514 B umem=guest";
    if selected(label) {
        let r = measure(Side::Raw, true, 1514, secs, false);
        let v = measure(Side::VirtioTso, true, 1514, secs, false);
        let g = measure(Side::VirtioTsoGuestUmem, true, 1514, secs, false);
        gather_report(label, &r, &v, &g);
    }
    // Receive with umem=guest: the kernel writes frames into the socket's
    // part of the registered mapping and the device copies them into guest
    // buffers, as on the copy path (receiving into guest buffers directly
    // is not built: see docs/umem-guest.md).
    for size in [64usize, 1500, 9000] {
        let label = format!("rx {size:4} B umem=guest");
        if !selected(&label) {
            continue;
        }
        let r = measure(Side::Raw, false, size, secs, false);
        let v = measure(Side::Virtio, false, size, secs, false);
        let g = measure(Side::VirtioGuestUmem, false, size, secs, false);
        gather_report(&label, &r, &v, &g);
    }
    // umem=guest at the socket level: frames sent from guest memory as
    // they lie there against frames copied into the socket's own UMEM
    // first (what the copy path does), both bare sockets.
    for size in [64usize, 1500, 9000] {
        if !selected(&format!("tx {size:4} B copied into the UMEM")) {
            continue;
        }
        let r = measure(Side::Raw, true, size, secs, false);
        let g = measure(Side::RawGather, true, size, secs, false);
        println!(
            "tx {size:4} B copied into the UMEM {}   sent from guest memory {}   ratio {:.2}",
            r.show(),
            g.show(),
            g.pps / r.pps.max(1.0)
        );
        println!(
            "            CPU per frame of the sending thread: copied {:.2} us, from guest memory {:.2} us",
            r.cpu_us.0, g.cpu_us.0
        );
    }
    // Receive coalescing: the peer sends one in-order TCP stream of
    // 1514-byte frames; the guest takes them merged (GRO).
    let label = "rx TCP stream 1514 B, coalesced";
    if !selected(label) {
        return;
    }
    let r = measure(Side::Raw, false, 1514, secs, true);
    let v = measure(Side::VirtioGro, false, 1514, secs, true);
    compare(label, &r, &v);
    if let Some(c) = v.device {
        let per = |n: u64, d: u64| n as f64 / d.max(1) as f64;
        println!(
            "            device: {:.1} wire frames per merged frame, {:.1} wire frames per guest notification, {:.1} per interrupt",
            per(c.rx_gro_segments, c.rx_gro_frames),
            per(c.rx_packets, c.rx_notifications),
            per(c.rx_packets, c.interrupts)
        );
    }
}
