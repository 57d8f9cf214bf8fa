//! Shared pieces of the xskvm fuzz targets: a small guest memory with a
//! driver-side shadow of what the "guest" wrote, an in-memory network
//! backend that checks what the device hands it, and a way to wait until
//! the device's IO threads are idle.
//!
//! Panics anywhere (fuzz thread or device IO thread) abort the process:
//! libfuzzer-sys installs a panic hook that does, so a panic the device's
//! worker would catch and turn into DEVICE_NEEDS_RESET is still a finding.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::virtio::net::{
    GatherFill, Net, NetBackend, NetConfig, NetLink, QueuePairCounters, TxPieces,
};
use devices::virtio::MmioTransport;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM: two adjacent regions (accesses may cross between them), a
/// hole, and a third region, so addresses can fall in, across and outside.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x4000), (0xd000, 0x20000)];
/// First address past the last region.
pub const MEM_END: u64 = 0x2d000;

/// The device's name: its IO threads are called `xskvm-f-q<pair>`.
pub const NET_ID: &str = "f";
const THREAD_PREFIX: &str = "xskvm-f-q";
pub const MAC: [u8; 6] = [0x02, 0x58, 0x53, 0x4b, 0x00, 0x01];
pub const MTU: u16 = 1500;
/// Longest frame the guest may send: the MTU plus an Ethernet header
/// with a VLAN tag (the device drops longer ones).
pub const MAX_FRAME: usize = MTU as usize + 18;
/// What the device offers (checked against `Net::device_features`).
pub const OFFERED: u64 = (1 << 32) // VERSION_1
    | (1 << 0) // CSUM
    | (1 << 1) // GUEST_CSUM
    | (1 << 2) // CTRL_GUEST_OFFLOADS
    | (1 << 11) // HOST_TSO4
    | (1 << 12) // HOST_TSO6
    | (1 << 7) // GUEST_TSO4
    | (1 << 8) // GUEST_TSO6
    | (1 << 9) // GUEST_ECN
    | (1 << 13) // HOST_ECN
    | (1 << 15) // MRG_RXBUF
    | (1 << 54) // GUEST_USO4
    | (1 << 55) // GUEST_USO6
    | (1 << 56) // HOST_USO
    | (1 << 3) // MTU
    | (1 << 5) // MAC
    | (1 << 16) // STATUS
    | (1 << 17) // CTRL_VQ
    | (1 << 18) // CTRL_RX
    | (1 << 22) // MQ
    | (1 << 28) // INDIRECT_DESC
    | (1 << 29); // EVENT_IDX
pub const F_CSUM: u64 = 1 << 0;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_CTRL_RX: u64 = 1 << 18;
pub const F_MQ: u64 = 1 << 22;
pub const F_VERSION_1: u64 = 1 << 32;
pub const NET_HDR_LEN: usize = 12;
/// Size of the backend's transmit buffer: no frame handed over is longer.
pub const TX_BUF: usize = 2048;
pub const QUEUE_MAX: u16 = 256;
pub const CTRL_QUEUE_MAX: u16 = 64;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

// Guest RAM and the driver's bookkeeping are kept from one execution to
// the next: mapping, faulting in and unmapping them anew (the sanitizer
// maps every allocation this large on its own) took a third of a short
// input's time. Each execution gets them all zero, and RAM only once
// nothing of the execution before holds it any more.
thread_local! {
    static RAM: RefCell<Vec<Arc<GuestRegionMmap>>> = const { RefCell::new(Vec::new()) };
    static BYTES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static MARKS: RefCell<Vec<Vec<bool>>> = const { RefCell::new(Vec::new()) };
}

/// Guest RAM as [`REGIONS`] lays it out, all zero.
pub fn guest_memory() -> GuestMemoryMmap {
    RAM.with(|ram| {
        let mut ram = ram.borrow_mut();
        if ram.is_empty() {
            *ram = REGIONS
                .iter()
                .map(|&(start, len)| {
                    Arc::new(GuestRegionMmap::from_range(GuestAddress(start), len, None).unwrap())
                })
                .collect();
        }
        for region in ram.iter() {
            // A device thread of the last execution would see this one's memory.
            assert_eq!(
                Arc::strong_count(region),
                1,
                "guest memory still held after the last execution"
            );
        }
        let mem = GuestMemoryMmap::from_arc_regions(ram.clone()).unwrap();
        const ZERO: [u8; 4096] = [0; 4096];
        for &(start, len) in &REGIONS {
            for at in (0..len).step_by(ZERO.len()) {
                let n = ZERO.len().min(len - at);
                mem.write_slice(&ZERO[..n], GuestAddress(start + at as u64))
                    .unwrap();
            }
        }
        mem
    })
}

/// One flag per byte of guest RAM, all false (kept for the next execution
/// when dropped).
pub struct Marks(Vec<bool>);

impl Marks {
    pub fn new() -> Self {
        let mut v = MARKS.with(|m| m.borrow_mut().pop()).unwrap_or_default();
        v.clear();
        v.resize(MEM_END as usize, false);
        Self(v)
    }
}

impl Default for Marks {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for Marks {
    type Target = [bool];
    fn deref(&self) -> &[bool] {
        &self.0
    }
}

impl DerefMut for Marks {
    fn deref_mut(&mut self) -> &mut [bool] {
        &mut self.0
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        MARKS.with(|m| m.borrow_mut().push(v));
    }
}

/// Whether `[addr, addr + len)` is all guest RAM.
pub fn in_ram(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    for &(start, size) in &REGIONS {
        let region_end = start + size as u64;
        if at >= start && at < region_end {
            at = region_end.min(end);
        }
    }
    at >= end
}

/// The guest as the driver sees it: every byte the driver wrote. The
/// device's own writes (used rings, received frames) are not in it.
pub struct Shadow {
    pub bytes: Vec<u8>,
    /// Set once the driver set DRIVER_OK (the device may be running).
    pub driver_ok: bool,
}

impl Default for Shadow {
    fn default() -> Self {
        Self::new()
    }
}

impl Shadow {
    pub fn new() -> Self {
        let mut bytes = BYTES.with(|b| b.borrow_mut().pop()).unwrap_or_default();
        bytes.clear();
        bytes.resize(MEM_END as usize, 0);
        Self {
            bytes,
            driver_ok: false,
        }
    }

    /// Writes `data` at `addr` as the driver would: the parts that are RAM
    /// land in guest memory and the shadow, the rest is dropped.
    pub fn write(&mut self, mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
        let end = addr.saturating_add(data.len() as u64);
        for &(start, size) in &REGIONS {
            let (from, to) = (addr.max(start), end.min(start + size as u64));
            if from >= to {
                continue;
            }
            let chunk = &data[(from - addr) as usize..(to - addr) as usize];
            mem.write_slice(chunk, GuestAddress(from)).unwrap();
            self.bytes[from as usize..to as usize].copy_from_slice(chunk);
        }
    }

    /// Aligned little-endian u16 write in one store (ring indices are read
    /// by the device while the driver writes them).
    pub fn write_u16(&mut self, mem: &GuestMemoryMmap, addr: u64, value: u16) {
        if addr % 2 != 0 || !in_ram(addr, 2) {
            return self.write(mem, addr, &value.to_le_bytes());
        }
        mem.write_obj(value, GuestAddress(addr)).unwrap();
        self.bytes[addr as usize..addr as usize + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// The driver's bytes at `[addr, addr + len)`, if that is RAM.
    pub fn get(&self, addr: u64, len: usize) -> Option<&[u8]> {
        in_ram(addr, len as u64).then(|| &self.bytes[addr as usize..addr as usize + len])
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        BYTES.with(|b| b.borrow_mut().push(bytes));
    }
}

/// Reads `len` bytes of guest memory, `None` unless it is all RAM.
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    (in_ram(addr, len as u64) && mem.read_slice(&mut buf, GuestAddress(addr)).is_ok())
        .then_some(buf)
}

/// The host side of all queue pairs, shared with the fuzz thread.
#[derive(Default)]
pub struct Host {
    /// Frames waiting to be received by the guest, per pair.
    pub pending: Vec<VecDeque<Vec<u8>>>,
    /// Lengths of every frame ever offered to the guest.
    pub offered_lens: Vec<usize>,
    /// Frames the device took for the guest, per pair.
    pub delivered: Vec<usize>,
    /// Frames the device transmitted, per pair.
    pub sent: Vec<usize>,
    /// Keep every frame delivered and sent (for checks that compare them).
    pub keep_frames: bool,
    pub delivered_frames: Vec<Vec<Vec<u8>>>,
    pub sent_frames: Vec<Vec<Vec<u8>>>,
    /// Frames transmit accepts per call before it reports no room.
    pub tx_room: usize,
    /// The first broken rule seen on a device thread; checked on the
    /// fuzz thread (a panic there would only mark the device broken).
    pub violation: Option<String>,
    /// Guest memory, where the backends send from it (`umem=guest` with
    /// `tx-gather=on`): frames as a head and pieces of it.
    pub gather_mem: Option<GuestMemoryMmap>,
    /// Per pair: tokens of gathered frames, handed back on the device's
    /// next look (as a kernel done with them at once would).
    pub tokens: Vec<VecDeque<u64>>,
}

/// Longest piece of guest memory a gathering backend takes (small, so
/// frames are cut into several), and most pieces per frame.
const GATHER_PIECE_MAX: usize = 512;
const GATHER_PIECES_MAX: usize = 8;

/// A gathered frame's pieces, as guest addresses: every one must lie in
/// guest RAM (within one region).
struct GuestPieces<'a> {
    mem: &'a GuestMemoryMmap,
    ranges: Vec<(GuestAddress, usize)>,
    outside: Option<String>,
}

impl TxPieces for GuestPieces<'_> {
    fn push(&mut self, addr: usize, len: usize) -> bool {
        if len == 0 || len > GATHER_PIECE_MAX || self.ranges.len() == GATHER_PIECES_MAX {
            return false;
        }
        for region in self.mem.iter() {
            let Ok(base) = region.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let (base, end) = (base as usize, base as usize + region.len() as usize);
            if (base..end).contains(&addr) {
                if addr + len > end {
                    self.outside
                        .get_or_insert(format!("a piece of {len} bytes across a region's end"));
                    return false;
                }
                let at = region.start_addr().0 + (addr - base) as u64;
                self.ranges.push((GuestAddress(at), len));
                return true;
            }
        }
        self.outside
            .get_or_insert(format!("a piece at {addr:#x} outside guest memory"));
        false
    }

    fn clear(&mut self) {
        self.ranges.clear();
    }
}

pub struct HostHandle {
    pub host: Arc<Mutex<Host>>,
    /// Per pair: readable while frames wait (the backend's fd).
    ready: Vec<Arc<EventFd>>,
    /// Backends not dropped yet.
    pub live: Arc<AtomicUsize>,
    /// The device's per-pair counters and link (set by [`device`]).
    pub counters: Vec<Arc<QueuePairCounters>>,
    pub link: Option<NetLink>,
}

impl HostHandle {
    /// Offers `frame` to the guest on `pair`; returns how many frames
    /// (this one included) wait on `pair` now.
    pub fn inject(&self, pair: usize, frame: Vec<u8>) -> usize {
        let mut host = self.host.lock().unwrap();
        host.offered_lens.push(frame.len());
        host.pending[pair].push_back(frame);
        // Under the lock: the backend drains the event under it too, so a
        // frame never waits behind a drained event.
        self.ready[pair].write(1).unwrap();
        host.pending[pair].len()
    }

    /// Frames waiting on `pair` (not taken by the device yet).
    pub fn pending(&self, pair: usize) -> usize {
        self.host.lock().unwrap().pending[pair].len()
    }

    /// A counter of `pair`, e.g. `|c| &c.rx_dropped_inactive`.
    pub fn counter(&self, pair: usize, which: impl Fn(&QueuePairCounters) -> &AtomicU64) -> u64 {
        which(&self.counters[pair]).load(Ordering::SeqCst)
    }

    pub fn violation(&self) -> Option<String> {
        self.host.lock().unwrap().violation.clone()
    }
}

struct MemBackend {
    pair: usize,
    host: Arc<Mutex<Host>>,
    ready: Arc<EventFd>,
    live: Arc<AtomicUsize>,
}

impl Drop for MemBackend {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl NetBackend for MemBackend {
    fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        let mut host = self.host.lock().unwrap();
        let mut taken = 0;
        loop {
            let Some(frame) = host.pending[self.pair].front() else {
                // Nothing waits: not readable any more.
                let _ = self.ready.read();
                return taken;
            };
            if !deliver(frame) {
                return taken;
            }
            let frame = host.pending[self.pair].pop_front().unwrap_or_default();
            host.delivered[self.pair] += 1;
            if host.keep_frames {
                host.delivered_frames[self.pair].push(frame);
            }
            taken += 1;
        }
    }

    fn transmit(
        &mut self,
        fill: &mut dyn FnMut(&mut [u8]) -> Option<devices::virtio::net::TxFrame>,
    ) -> (usize, bool) {
        let mut host = self.host.lock().unwrap();
        let mut buf = [0u8; TX_BUF];
        let mut sent = 0;
        while sent < host.tx_room {
            match fill(&mut buf) {
                Some(out) => {
                    host.check_sent(self.pair, &buf[..out.len.min(TX_BUF)], out.len);
                    sent += 1;
                }
                None => return (sent, false),
            }
        }
        (sent, true)
    }

    fn tx_gather_piece_max(&self) -> Option<usize> {
        let host = self.host.lock().unwrap();
        host.gather_mem.as_ref().map(|_| GATHER_PIECE_MAX)
    }

    fn tx_gather_max_pieces(&self) -> usize {
        GATHER_PIECES_MAX
    }

    fn transmit_gather(&mut self, fill: &mut GatherFill<'_>) -> (usize, bool) {
        let mut host = self.host.lock().unwrap();
        let Some(mem) = host.gather_mem.clone() else {
            return (0, false);
        };
        let mut head = [0u8; TX_BUF];
        let mut frame = Vec::with_capacity(TX_BUF);
        let mut sent = 0;
        while sent < host.tx_room {
            let mut pieces = GuestPieces {
                mem: &mem,
                ranges: Vec::new(),
                outside: None,
            };
            let Some(out) = fill(&mut head, &mut pieces) else {
                return (sent, false);
            };
            if let Some(outside) = pieces.outside {
                host.violation.get_or_insert(outside);
            }
            frame.clear();
            frame.extend_from_slice(&head[..out.head_len.min(TX_BUF)]);
            for &(at, len) in &pieces.ranges {
                let start = frame.len();
                frame.resize(start + len, 0);
                if mem.read_slice(&mut frame[start..], at).is_err() {
                    host.violation
                        .get_or_insert(format!("an unreadable piece at {at:#x?}"));
                }
            }
            if let Some(token) = out.token {
                host.tokens[self.pair].push_back(token);
            } else if !pieces.ranges.is_empty() {
                host.violation
                    .get_or_insert("a frame sent from guest memory without a token".into());
            }
            // A frame with neither head nor pieces only carries a token
            // (a GSO frame that ended early): nothing goes out.
            if !frame.is_empty() {
                let len = frame.len();
                host.check_sent(self.pair, &frame, len);
            }
            sent += 1;
        }
        (sent, true)
    }

    fn take_completed(&mut self, done: &mut dyn FnMut(u64)) -> usize {
        let mut host = self.host.lock().unwrap();
        let tokens = &mut host.tokens[self.pair];
        let n = tokens.len();
        for token in tokens.drain(..) {
            done(token);
        }
        n
    }
}

impl Host {
    /// Checks a frame the device handed over against its TX policy: no
    /// runts, nothing over the MTU, and only the guest's own source MAC
    /// (spoof check).
    fn check_sent(&mut self, pair: usize, frame: &[u8], len: usize) {
        if !(14..=MAX_FRAME).contains(&len) && self.violation.is_none() {
            self.violation = Some(format!("transmitted a frame of {len} bytes"));
        } else if frame[6..12] != MAC && self.violation.is_none() {
            self.violation = Some(format!(
                "transmitted a frame from MAC {:02x?}",
                &frame[6..12]
            ));
        }
        self.sent[pair] += 1;
        if self.keep_frames {
            self.sent_frames[pair].push(frame.to_vec());
        }
    }
}

/// `pairs` backends over one shared [`Host`]; with `gather_mem` they send
/// frames from that guest memory where the device asks.
pub fn backends(
    pairs: usize,
    tx_room: usize,
    gather_mem: Option<GuestMemoryMmap>,
) -> (Vec<Box<dyn NetBackend>>, HostHandle) {
    let host = Arc::new(Mutex::new(Host {
        pending: vec![VecDeque::new(); pairs],
        delivered: vec![0; pairs],
        sent: vec![0; pairs],
        delivered_frames: vec![Vec::new(); pairs],
        sent_frames: vec![Vec::new(); pairs],
        tx_room: tx_room.max(1),
        gather_mem,
        tokens: vec![VecDeque::new(); pairs],
        ..Host::default()
    }));
    let live = Arc::new(AtomicUsize::new(pairs));
    let ready: Vec<Arc<EventFd>> = (0..pairs)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let backends = (0..pairs)
        .map(|pair| {
            Box::new(MemBackend {
                pair,
                host: host.clone(),
                ready: ready[pair].clone(),
                live: live.clone(),
            }) as Box<dyn NetBackend>
        })
        .collect();
    (
        backends,
        HostHandle {
            host,
            ready,
            live,
            counters: Vec::new(),
            link: None,
        },
    )
}

/// A virtio-net device with `pairs` queue pairs behind its MMIO transport;
/// `gather`: its backends send from guest memory (`tx-gather=on`).
pub fn device(
    pairs: usize,
    tx_room: usize,
    gather: bool,
    mem: &GuestMemoryMmap,
) -> (MmioTransport, HostHandle, EventFd) {
    let (backends, mut host) = backends(pairs, tx_room, gather.then(|| mem.clone()));
    let net = Net::new(
        NetConfig {
            id: NET_ID.into(),
            mac: MAC,
            mtu: MTU,
            spoof_check: true,
            on_thread_start: None,
        },
        backends,
    )
    .unwrap();
    host.counters = net.counters().to_vec();
    host.link = Some(net.link());
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let transport =
        MmioTransport::new(Box::new(net), mem.clone(), irq.try_clone().unwrap()).unwrap();
    (transport, host, irq)
}

pub fn reg_write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn reg_read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// Thread ids of the device's IO threads.
pub fn worker_tids() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with(THREAD_PREFIX))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether the thread is asleep (in epoll_wait or poll); gone counts as asleep.
fn asleep(tid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return true;
    };
    stat.rfind(')')
        .and_then(|i| stat.as_bytes().get(i + 2))
        .is_none_or(|&state| state != b'R')
}

/// Waits (at most `limit`) until the device's IO threads sleep: whatever
/// the guest offered so far has been processed. Returns whether they did.
/// Heuristic (a thread may sleep for other reasons); it only makes the
/// fuzz thread's view more complete.
///
/// Thread states alone tell it: writing an eventfd (a kick, a frame from
/// the host) wakes the IO thread polling it before the write returns, so
/// a notification not yet taken shows as a running thread. Queue events
/// no thread polls (queues the device does not serve, or a device that
/// never started) stay readable for good; waiting for those made every
/// such input wait out the whole limit.
pub fn settle(limit: Duration) -> bool {
    let tids = worker_tids();
    let deadline = Instant::now() + limit;
    let mut quiet = 0;
    while Instant::now() < deadline {
        let busy = tids.iter().any(|t| !asleep(t));
        quiet = if busy { 0 } else { quiet + 1 };
        if quiet == 3 {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// How long [`assert_no_spin`] watches, and how many interrupts without
/// any work done in that time it calls a spin (a pass with nothing to do
/// raises at most one; a spinning thread raises thousands).
const SPIN_WINDOW: Duration = Duration::from_millis(2);
const SPIN_INTERRUPTS: u64 = 50;

/// For IO threads that did not settle: fails if they keep passing over
/// their queues without doing anything (interrupts raised, but no counter
/// but those and nothing in `progress`, e.g. used indices, moves). A guest
/// whose rings feed themselves keeps them busy too, but with progress.
pub fn assert_no_spin(host: &HostHandle, progress: impl Fn() -> Vec<u64>) {
    let work = || {
        let counters: Vec<_> = host
            .counters
            .iter()
            .map(|c| {
                let mut s = c.snapshot();
                s.interrupts = 0;
                s
            })
            .collect();
        (counters, progress())
    };
    let interrupts = || {
        host.counters
            .iter()
            .map(|c| c.interrupts.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    let (before, raised_before) = (work(), interrupts());
    std::thread::sleep(SPIN_WINDOW);
    let raised = interrupts() - raised_before;
    assert!(
        raised <= SPIN_INTERRUPTS || work() != before,
        "IO threads spin: {raised} interrupts in {SPIN_WINDOW:?} with no work done"
    );
}

/// One descriptor as the driver wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&self.next.to_le_bytes());
        raw
    }

    pub fn from_bytes(raw: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        Desc {
            addr: u64::from_le_bytes(raw[..8].try_into().unwrap()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            flags: u16_at(12),
            next: u16_at(14),
        }
    }
}

/// The descriptors of chain `head` as the device walks it (virtio-queue's
/// `DescriptorChain`: indirect tables, a time-to-live of the table size,
/// at most 4 GiB in total), read from the driver's shadow. Also returns
/// the 16-byte table entries read, so the caller can tell whether the
/// device saw the same bytes.
pub fn walk_chain(shadow: &Shadow, table: u64, size: u16, head: u16) -> (Vec<Desc>, Vec<u64>) {
    let (mut table, mut table_size, mut ttl) = (table, size, size);
    let mut next = head;
    let mut indirect = false;
    let mut total: u32 = 0;
    let (mut descs, mut entries) = (Vec::new(), Vec::new());
    while ttl > 0 && next < table_size {
        let Some(at) = table.checked_add(u64::from(next) * 16) else {
            break;
        };
        let Some(raw) = shadow.get(at, 16) else {
            break;
        };
        entries.push(at);
        let desc = Desc::from_bytes(raw);
        if desc.flags & DESC_F_INDIRECT != 0 {
            if indirect || desc.len % 16 != 0 || desc.len / 16 > u32::from(u16::MAX) {
                break;
            }
            table = desc.addr;
            table_size = (desc.len / 16) as u16;
            ttl = table_size;
            next = 0;
            indirect = true;
            continue;
        }
        let Some(sum) = total.checked_add(desc.len) else {
            break;
        };
        total = sum;
        if desc.flags & DESC_F_NEXT != 0 {
            next = desc.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        descs.push(desc);
    }
    (descs, entries)
}

/// Every descriptor the device could ever find in a table of `size`
/// entries at `table` (including indirect tables), from the shadow; `None`
/// if that is too much to look at.
pub fn all_descs(shadow: &Shadow, table: u64, size: u16) -> Option<Vec<(u64, Desc)>> {
    let mut out = Vec::new();
    let mut tables = vec![(table, u32::from(size), false)];
    while let Some((table, entries, indirect)) = tables.pop() {
        for i in 0..u64::from(entries) {
            let at = table.checked_add(i * 16)?;
            let Some(raw) = shadow.get(at, 16) else {
                continue;
            };
            let desc = Desc::from_bytes(raw);
            if desc.flags & DESC_F_INDIRECT != 0 && !indirect && desc.len % 16 == 0 {
                tables.push((desc.addr, desc.len / 16, true));
            }
            out.push((at, desc));
            if out.len() > 16384 {
                return None;
            }
        }
    }
    Some(out)
}

/// Whether `[a, a + alen)` and `[b, b + blen)` share a byte.
pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Asserts the device's IO threads are gone (joined, never left running).
/// A joined thread may linger in /proc for a moment after it woke its
/// joiner, so this waits a little before it calls a thread left over.
pub fn assert_no_workers(what: &str) {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let left = worker_tids();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: IO threads still running: {left:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}
