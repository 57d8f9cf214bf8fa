//! virtio-net queue processing over guest memory the input controls: the
//! input negotiates features, places the queues, writes descriptor tables,
//! indirect tables, avail rings, headers and control commands, kicks, and
//! has frames arrive from the host; then the driver resets the device and
//! the VMM drops it. The device's IO threads are real threads; a hang is a
//! finding (run with libFuzzer's -timeout).
//!
//! Always checked: reset and drop return, every IO thread ends and every
//! backend comes back; no frame handed to the backend is a runt or longer
//! than its buffer; no panic on any thread.
//!
//! Also always: every frame handed to the backend passes the TX policy
//! (no runt, at most MTU + 18 bytes, the device's source MAC); after the
//! reset the receive mode is back to its default.
//!
//! Checked when the input drove the device "orderly" (no raw memory writes
//! after DRIVER_OK, rings apart from each other and from every buffer the
//! device may write, no descriptor rewritten once published, at most a
//! queue's worth of chains per queue, no raw register writes): a pair only
//! stops with DEVICE_NEEDS_RESET if its rings are broken (avail ring at 0,
//! a head outside the queue); for every other pair, each used ring holds
//! exactly the published chains in order, with the length the chain
//! deserves (RX: header + frame if it fits the writable buffers, else 0;
//! TX: 0; control: 1 if there is room for the ack, else 0); only the queues
//! the negotiated features make live are used; the frames sent are exactly
//! the TX chains' frames the policy allows, and the policy's drop counters
//! match; every frame taken from the backend either lands in the pair's RX
//! ring (in order, bytes as they should be) or, on a pair the guest does
//! not use, is dropped and counted (which of the two is checked wherever
//! it does not depend on when a VQ_PAIRS_SET took effect); control acks
//! follow the command parser (MQ and CTRL_RX commands), and the receive
//! mode the device reports is the one the acked commands set.

#![no_main]

use std::time::Duration;

use devices::virtio::mmio::*;
use devices::virtio::net::{RxMode, MAC_TABLE_MAX};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use xskvm_fuzz::*;

/// Default ring layout: queue q's rings in the 8 KiB block at q * 0x2000.
const RING_BLOCK: u64 = 0x2000;
/// Buffers and indirect tables go here by default (the third region).
const BUF_START: u64 = 0xd000;
const BUF_LEN: u64 = 0x4000;
const RX_HEADER: [u8; NET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// Most chains the device takes for one frame (MRG_RXBUF).
const RX_CHAINS_MAX: usize = 64;
/// The longest frame (after the header) a TX chain may carry: a 64 KiB
/// GSO frame and 256 bytes of headers.
const MAX_TX_FRAME: usize = 65_536 + 256;
/// The device reads at most this much of a control command: class, command
/// and two full MAC tables.
const CTRL_COMMAND_MAX: usize = 2 + 2 * (4 + 6 * MAC_TABLE_MAX);
/// Pair-state syncs (see `sync_pair`) per input, and how long each waits.
const MAX_SYNCS: u32 = 3;
const SYNC_WAIT: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Rx(usize),
    Tx(usize),
    Ctrl,
    Unused,
}

/// One queue as the transport holds it (the driver's writes, filtered by
/// the transport's rules) plus the driver's own bookkeeping.
#[derive(Clone)]
struct Queue {
    max: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    ready: bool,
    avail_idx: u16,
    next_id: u16,
    /// Heads published, in order.
    published: Vec<u16>,
}

impl Queue {
    fn valid(&self) -> bool {
        let n = u64::from(self.size);
        in_ram(self.desc, 16 * n) && in_ram(self.avail, 4 + 2 * n) && in_ram(self.used, 4 + 8 * n)
    }

    /// The rings with their event fields.
    fn rings(&self) -> [(u64, u64); 3] {
        let n = u64::from(self.size);
        [
            (self.desc, 16 * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + 8 * n),
        ]
    }
}

struct Fuzz {
    mem: GuestMemoryMmap,
    shadow: Shadow,
    transport: devices::virtio::MmioTransport,
    host: HostHandle,
    pairs: usize,
    features: u64,
    queues: Vec<Queue>,
    activated: bool,
    orderly: bool,
    /// A raw register write happened: the transport's state is unknown.
    raw_registers: bool,
    /// Bytes of descriptor entries read by a published chain.
    in_chain: Marks,
    /// Bytes of the buffers of published chains.
    in_buffers: Marks,
    /// Bytes written by raw writes, not by the driver helpers.
    foreign: Marks,
    /// Bytes the driver wrote at all.
    written: Marks,
    /// Bytes the driver wrote as buffer contents or descriptor entries (a
    /// ring placed over them holds whatever they hold).
    contents: Marks,
    buf_cursor: u64,
    frame_seq: u32,
    settles: u32,
    /// Per pair, per frame offered (in order, as the backend hands them
    /// out): whether the pair was in use when the device took it, where
    /// that does not depend on timing (None: it may have been either).
    rx_active: Vec<Vec<Option<bool>>>,
    /// Per pair: whether it is in use now, if known (see `sync_pair`).
    active_now: Vec<Option<bool>>,
    /// The queue pairs in use once every published control command is
    /// processed.
    pairs_after_ctrl: u16,
    syncs: u32,
    /// Control used index, receive mode, control used index, read in this
    /// order before the reset.
    rx_mode_seen: Option<(u16, RxMode, u16)>,
}

impl Fuzz {
    fn write(&mut self, addr: u64, data: &[u8]) {
        let start = addr.min(MEM_END);
        let end = addr.saturating_add(data.len() as u64).min(MEM_END);
        let (start, end) = (start as usize, end as usize);
        if self.in_chain[start..end].iter().any(|&b| b)
            || self.in_buffers[start..end].iter().any(|&b| b)
        {
            // A published chain rewritten: what the device saw is unknown.
            self.orderly = false;
        }
        self.written[start..end].iter_mut().for_each(|b| *b = true);
        self.shadow.write(&self.mem, addr, data);
    }

    /// A buffer's contents or a descriptor entry.
    fn write_contents(&mut self, addr: u64, data: &[u8]) {
        let start = addr.min(MEM_END) as usize;
        let end = addr.saturating_add(data.len() as u64).min(MEM_END) as usize;
        self.contents[start..end].iter_mut().for_each(|b| *b = true);
        self.write(addr, data);
    }

    fn write_foreign(&mut self, addr: u64, data: &[u8]) {
        if self.shadow.driver_ok {
            self.orderly = false;
        }
        let start = addr.min(MEM_END) as usize;
        let end = addr.saturating_add(data.len() as u64).min(MEM_END) as usize;
        self.foreign[start..end].iter_mut().for_each(|b| *b = true);
        self.write(addr, data);
    }

    fn write_desc(&mut self, table: u64, id: u16, desc: Desc) {
        if let Some(at) = table.checked_add(u64::from(id) * 16) {
            self.write_contents(at, &desc.to_bytes());
        }
    }

    /// Takes `n` consecutive descriptor ids of queue `q`.
    fn alloc_ids(&mut self, q: usize, n: u16) -> Vec<u16> {
        let queue = &mut self.queues[q];
        (0..n)
            .map(|_| {
                let id = queue.next_id;
                queue.next_id = (queue.next_id + 1) % queue.size.max(1);
                id
            })
            .collect()
    }

    fn alloc_buf(&mut self, len: u64) -> u64 {
        if self.buf_cursor + len > BUF_START + BUF_LEN {
            self.buf_cursor = BUF_START;
        }
        let at = self.buf_cursor;
        self.buf_cursor += len.min(BUF_LEN);
        at
    }

    /// Writes `descs` as a chain at consecutive ids of queue `q` (NEXT
    /// links added unless `raw_links`) and returns its head.
    fn write_chain(&mut self, q: usize, descs: &[Desc], raw_links: bool) -> u16 {
        let ids = self.alloc_ids(q, descs.len() as u16);
        let table = self.queues[q].desc;
        for (i, (&id, &desc)) in ids.iter().zip(descs).enumerate() {
            let mut desc = desc;
            if !raw_links {
                match ids.get(i + 1) {
                    Some(&next) => {
                        desc.flags |= DESC_F_NEXT;
                        desc.next = next;
                    }
                    None => desc.flags &= !DESC_F_NEXT,
                }
            }
            self.write_desc(table, id, desc);
        }
        ids.first().copied().unwrap_or(0)
    }

    /// Puts `head` in the avail ring and publishes it.
    fn publish(&mut self, q: usize, head: u16) {
        let queue = self.queues[q].clone();
        let size = queue.size.max(1);
        // Frames waiting before the chain is visible: a control command
        // may take effect (and a waiting frame be taken under it) before
        // this thread looks again.
        let waiting: Vec<usize> = (0..self.pairs).map(|p| self.host.pending(p)).collect();
        self.write(
            queue
                .avail
                .wrapping_add(4 + u64::from(queue.avail_idx % size) * 2),
            &head.to_le_bytes(),
        );
        let idx = queue.avail_idx.wrapping_add(1);
        self.shadow
            .write_u16(&self.mem, queue.avail.wrapping_add(2), idx);
        self.queues[q].avail_idx = idx;
        self.queues[q].published.push(head);
        if self.queues[q].published.len() > usize::from(size) {
            self.orderly = false;
        }
        self.note_ctrl_publish(q, head, &waiting);
        // The descriptor entries of this chain must not change any more.
        let (descs, entries) = walk_chain(&self.shadow, queue.desc, size, head);
        for at in entries {
            self.in_chain[at as usize..at as usize + 16]
                .iter_mut()
                .for_each(|b| *b = true);
        }
        for d in descs {
            let start = d.addr.min(MEM_END) as usize;
            let end = d.addr.saturating_add(u64::from(d.len)).min(MEM_END) as usize;
            self.in_buffers[start..end]
                .iter_mut()
                .for_each(|b| *b = true);
        }
    }

    /// What a control command just published will do to the pairs in use:
    /// frames that still wait for a pair whose use it changes may be taken
    /// before or after it takes effect.
    fn note_ctrl_publish(&mut self, q: usize, head: u16, waiting: &[usize]) {
        if self.roles_for(true).get(q) != Some(&Role::Ctrl) {
            return;
        }
        let queue = &self.queues[q];
        let (descs, _) = walk_chain(&self.shadow, queue.desc, queue.size, head);
        let expected = expect_ctrl(
            &self.shadow,
            &descs,
            usize::from(queue.size),
            self.allowed(),
        );
        let Some(Effect::Pairs(n)) = expected.effect else {
            return;
        };
        for pair in 1..self.pairs {
            let (before, after) = (
                usize::from(self.pairs_after_ctrl) > pair,
                usize::from(n) > pair,
            );
            if before != after {
                self.active_now[pair] = None;
                let waiting = waiting[pair];
                let offered = self.rx_active[pair].len();
                for class in &mut self.rx_active[pair][offered.saturating_sub(waiting)..] {
                    *class = None;
                }
            }
        }
        self.pairs_after_ctrl = n;
    }

    /// Whether `pair` is in use now. After a VQ_PAIRS_SET that changes it
    /// was acked, the pair's IO thread may still be in a pass that looked
    /// at the old value: a frame offered then and taken (the pass taking
    /// it ends with nothing waiting) proves the next pass looks anew.
    fn sync_pair(&mut self, pair: usize) {
        if self.active_now[pair].is_some()
            || !self.activated
            || !self.orderly
            || self.syncs >= MAX_SYNCS
        {
            return;
        }
        let roles = self.roles();
        let Some(ctrl) = roles.iter().position(|&r| r == Role::Ctrl) else {
            return;
        };
        self.syncs += 1;
        let q = &self.queues[ctrl];
        let deadline = std::time::Instant::now() + SYNC_WAIT;
        loop {
            let used = read_guest(&self.mem, q.used.wrapping_add(2), 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]));
            if used.map(usize::from) == Some(q.published.len()) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.rx_active[pair].push(None);
        let waits = self.host.counter(pair, |c| &c.rx_no_buffer_waits);
        self.host.inject(pair, vec![0x33; 60]);
        while std::time::Instant::now() < deadline {
            if self.host.pending(pair) == 0 {
                self.active_now[pair] = Some(usize::from(self.pairs_after_ctrl) > pair);
                return;
            }
            // The pair found no buffers for it (or a frame before it): it
            // waits for the guest, not for time; nothing to learn here.
            if self.host.counter(pair, |c| &c.rx_no_buffer_waits) > waits {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Offers a frame to the guest on `pair`, noting whether it is in use.
    fn inject(&mut self, pair: usize, frame: Vec<u8>) {
        self.sync_pair(pair);
        let active = if pair == 0 {
            Some(true)
        } else {
            self.active_now[pair]
        };
        self.rx_active[pair].push(active);
        self.host.inject(pair, frame);
    }

    fn allowed(&self) -> Allowed {
        Allowed {
            max_pairs: self.pairs as u16,
            mq: self.features & F_MQ != 0,
            rx_mode: self.features & F_CTRL_RX != 0,
        }
    }

    fn kick(&mut self, q: usize) {
        if let Some(evt) = self.transport.queue_events().get(q) {
            evt.write(1).unwrap();
        }
    }

    fn roles(&self) -> Vec<Role> {
        self.roles_for(self.activated)
    }

    /// What each queue does once the device runs (`live`: it does, or is
    /// about to at DRIVER_OK). Every pair gets a worker, but only the
    /// queues of the pairs the driver knows of (one without MQ) that it
    /// made ready are served; the control queue follows those pairs.
    fn roles_for(&self, live: bool) -> Vec<Role> {
        let mut roles = vec![Role::Unused; self.queues.len()];
        if !live {
            return roles;
        }
        let mq = self.features & F_MQ != 0;
        let used_pairs = if mq { self.pairs } else { 1 };
        for pair in 0..used_pairs {
            if self.queues[2 * pair].ready {
                roles[2 * pair] = Role::Rx(pair);
            }
            if self.queues[2 * pair + 1].ready {
                roles[2 * pair + 1] = Role::Tx(pair);
            }
        }
        let ctrl = 2 * used_pairs;
        if self.features & F_CTRL_VQ != 0 && self.queues[ctrl].ready {
            roles[ctrl] = Role::Ctrl;
        }
        roles
    }

    /// The pair whose IO thread serves queue `q` (the control queue: 0).
    fn pair_of(role: Role) -> Option<usize> {
        match role {
            Role::Rx(p) | Role::Tx(p) => Some(p),
            Role::Ctrl => Some(0),
            Role::Unused => None,
        }
    }
}

/// A ring address register pair written low half first, then high, as
/// the transport takes it: each half is refused if the address it makes
/// is misaligned.
fn set_half_by_half(current: &mut u64, addr: u64, align: u64) {
    let low = (*current & !0xffff_ffff) | (addr & 0xffff_ffff);
    if low % align == 0 {
        *current = low;
    }
    let high = (*current & 0xffff_ffff) | (addr & !0xffff_ffff);
    if high % align == 0 {
        *current = high;
    }
}

fn queue_addr(u: &mut Unstructured, default: u64, align: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=15u8)? {
        0..=12 => default,
        13 | 14 => u64::from(u.int_in_range(0..=(MEM_END / align) as u32)?) * align,
        _ => u.arbitrary()?,
    })
}

/// Negotiates, sets up the queues and sets DRIVER_OK, as a driver would,
/// with values from the input; the transport's filtering is mirrored.
fn start(f: &mut Fuzz, u: &mut Unstructured) -> Result<()> {
    let t = &mut f.transport;
    reg_write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    reg_write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2 {
        reg_write(t, REG_DRIVER_FEATURES_SEL, sel);
        reg_write(t, REG_DRIVER_FEATURES, (f.features >> (32 * sel)) as u32);
    }
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    reg_write(t, REG_STATUS, ok);
    let acceptable = f.features & !OFFERED == 0 && f.features & F_VERSION_1 != 0;
    assert_eq!(
        reg_read(t, REG_STATUS) & STATUS_FEATURES_OK != 0,
        acceptable,
        "FEATURES_OK for features {:#x}",
        f.features
    );
    // Mostly every queue, as Linux sets them all up.
    let count = if u.ratio(1, 2)? {
        f.queues.len()
    } else {
        u.int_in_range(0..=f.queues.len())?
    };
    for q in 0..count {
        let size = if u.ratio(15, 16)? {
            1u16 << u.int_in_range(0..=8u32)?
        } else {
            u.arbitrary()?
        };
        let base = q as u64 * RING_BLOCK;
        let desc = queue_addr(u, base, 16)?;
        let avail = queue_addr(u, base + 0x1000, 2)?;
        let used = queue_addr(u, base + 0x1400, 4)?;
        let t = &mut f.transport;
        reg_write(t, REG_QUEUE_SEL, q as u32);
        reg_write(t, REG_QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            (REG_QUEUE_DESC_LOW, desc),
            (REG_QUEUE_AVAIL_LOW, avail),
            (REG_QUEUE_USED_LOW, used),
        ] {
            reg_write(t, low, addr as u32);
            reg_write(t, low + 4, (addr >> 32) as u32);
        }
        reg_write(t, REG_QUEUE_READY, 1);
        if acceptable {
            let queue = &mut f.queues[q];
            // Refused values (logged) leave the old one.
            if size.is_power_of_two() && size <= queue.max {
                queue.size = size;
            }
            set_half_by_half(&mut queue.desc, desc, 16);
            set_half_by_half(&mut queue.avail, avail, 2);
            set_half_by_half(&mut queue.used, used, 4);
            queue.ready = true;
        }
    }
    // Rings and buffers the input writes before the device starts.
    for _ in 0..u.int_in_range(0..=16u8)? {
        op(f, u)?;
    }
    f.shadow.driver_ok = true;
    reg_write(&mut f.transport, REG_STATUS, ok | STATUS_DRIVER_OK);
    f.activated = acceptable && f.queues.iter().all(|q| !q.ready || q.valid());
    let status = reg_read(&mut f.transport, REG_STATUS);
    if acceptable && !f.activated && !f.raw_registers {
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0, "bad queue accepted");
    }
    Ok(())
}

fn desc(u: &mut Unstructured, f: &mut Fuzz, writable: Option<bool>) -> Result<Desc> {
    let len = match u.int_in_range(0..=7u8)? {
        0..=3 => u.int_in_range(0..=2100u32)?,
        4 => u.int_in_range(0..=16u32)?,
        5 => NET_HDR_LEN as u32,
        _ => u.arbitrary()?,
    };
    let addr = if u.ratio(7, 8)? {
        f.alloc_buf(u64::from(len.min(4096)))
    } else {
        u.arbitrary()?
    };
    let flags = match writable {
        Some(true) => DESC_F_WRITE,
        Some(false) => 0,
        None => u.arbitrary::<u16>()? & 0x7,
    };
    Ok(Desc {
        addr,
        len,
        flags,
        next: u.arbitrary()?,
    })
}

/// A control command, mostly one the device knows (VQ_PAIRS_SET, PROMISC,
/// ALLMULTI, MAC_TABLE_SET) with the right, or almost right, data.
fn ctrl_command(u: &mut Unstructured) -> Result<Vec<u8>> {
    let (class, cmd) = match u.int_in_range(0..=9u8)? {
        0..=3 => (4, 0),
        4 | 5 => (0, u.int_in_range(0..=1u8)?),
        6 | 7 => (1, 0),
        _ => (u.arbitrary()?, u.arbitrary()?),
    };
    let mut command = vec![class, cmd];
    match class {
        4 => {
            let pairs: u16 = if u.ratio(3, 4)? {
                u.int_in_range(0..=4)?
            } else {
                u.arbitrary()?
            };
            command.extend_from_slice(&pairs.to_le_bytes());
        }
        0 => command.push(*u.choose(&[0u8, 1, 2, 0xff])?),
        1 => {
            for _ in 0..2 {
                let count: u32 = match u.int_in_range(0..=7u8)? {
                    0..=4 => u.int_in_range(0..=4)?,
                    5 => u.int_in_range(60..=70)?,
                    6 => u.int_in_range(0..=140)?,
                    _ => u.arbitrary()?,
                };
                command.extend_from_slice(&count.to_le_bytes());
                // Addresses from a seed: inputs stay short.
                let seed: u8 = u.arbitrary()?;
                let bytes = (count.min(140) * 6) as usize;
                command.extend((0..bytes).map(|i| seed.wrapping_add(i as u8)));
            }
        }
        _ => {}
    }
    // Cut short, or with more after it (beyond what the device reads, too).
    match u.int_in_range(0..=7u8)? {
        0 => {
            let keep = u.int_in_range(0..=command.len())?;
            command.truncate(keep);
        }
        1 => {
            let more = u.int_in_range(1..=8usize)?;
            command.extend(std::iter::repeat_n(0xa5, more));
        }
        2 => {
            let total = u.int_in_range(CTRL_COMMAND_MAX - 8..=CTRL_COMMAND_MAX + 8)?;
            command.resize(total.max(command.len()), 0x5a);
        }
        _ => {}
    }
    Ok(command)
}

fn queue_index(f: &Fuzz, u: &mut Unstructured) -> Result<usize> {
    u.int_in_range(0..=f.queues.len() - 1)
}

fn op(f: &mut Fuzz, u: &mut Unstructured) -> Result<()> {
    let q = queue_index(f, u)?;
    let kind = u.int_in_range(0..=15u8)?;
    // Control commands mostly on the control queue, wherever the features
    // put it.
    let ctrl = f.roles_for(true).iter().position(|&r| r == Role::Ctrl);
    let q = match ctrl {
        Some(ctrl) if kind == 4 && u.ratio(3, 4)? => ctrl,
        _ => q,
    };
    if kind <= 7 && !f.queues[q].ready {
        // Its rings are wherever the transport left them, maybe on top
        // of a live queue's.
        f.orderly = false;
    }
    match kind {
        // Receive buffers.
        0 | 1 => {
            let n = u.int_in_range(1..=3u8)?;
            let descs = (0..n)
                .map(|_| desc(u, f, Some(true)))
                .collect::<Result<Vec<_>>>()?;
            let head = f.write_chain(q, &descs, false);
            f.publish(q, head);
            if u.ratio(1, 2)? {
                f.kick(q);
            }
        }
        // A frame to send: header and frame, split or not; mostly from the
        // device's MAC, around the MTU limit now and then.
        2 | 3 => {
            let len = match u.int_in_range(0..=7u8)? {
                0..=4 => u.int_in_range(0..=2100u32)?,
                5 => u.int_in_range(MAX_FRAME as u32 - 4..=MAX_FRAME as u32 + 4)?,
                _ => u.int_in_range(10..=20u32)?,
            };
            let fill: u8 = u.arbitrary()?;
            let split = u.arbitrary::<bool>()?;
            let mut data = vec![fill; NET_HDR_LEN + len as usize];
            let src = if u.ratio(7, 8)? { MAC } else { u.arbitrary()? };
            let at = (NET_HDR_LEN + 6).min(data.len());
            let n = (data.len() - at).min(6);
            data[at..at + n].copy_from_slice(&src[..n]);
            let addr = f.alloc_buf(data.len() as u64);
            f.write_contents(addr, &data);
            let total = NET_HDR_LEN as u32 + len;
            let descs: Vec<Desc> = if split {
                let cut = u.int_in_range(0..=total)?;
                vec![
                    Desc {
                        addr,
                        len: cut,
                        flags: 0,
                        next: 0,
                    },
                    Desc {
                        addr: addr.wrapping_add(u64::from(cut)),
                        len: total - cut,
                        flags: 0,
                        next: 0,
                    },
                ]
            } else {
                vec![Desc {
                    addr,
                    len: total,
                    flags: 0,
                    next: 0,
                }]
            };
            let head = f.write_chain(q, &descs, false);
            f.publish(q, head);
        }
        // A control command: class, command, data (in up to three readable
        // buffers), and ack buffers.
        4 => {
            let command = ctrl_command(u)?;
            let mut descs = Vec::new();
            let mut rest = &command[..];
            let pieces = u.int_in_range(1..=3u8)?;
            for i in 0..pieces {
                let n = if i + 1 == pieces {
                    rest.len()
                } else {
                    u.int_in_range(0..=rest.len())?
                };
                let addr = f.alloc_buf(n as u64);
                f.write_contents(addr, &rest[..n]);
                rest = &rest[n..];
                descs.push(Desc {
                    addr,
                    len: n as u32,
                    flags: 0,
                    next: 0,
                });
            }
            for _ in 0..u.int_in_range(0..=2u8)? {
                let len = u.int_in_range(0..=2u32)?;
                let ack = Desc {
                    addr: f.alloc_buf(u64::from(len)),
                    len,
                    flags: DESC_F_WRITE,
                    next: 0,
                };
                // Mostly after the command, as drivers put it.
                if u.ratio(1, 8)? {
                    descs.insert(0, ack);
                } else {
                    descs.push(ack);
                }
            }
            let head = f.write_chain(q, &descs, false);
            f.publish(q, head);
            if u.ratio(3, 4)? {
                f.kick(q);
            }
        }
        // Any chain, links as the input says.
        5 => {
            let n = u.int_in_range(1..=4u8)?;
            let descs = (0..n)
                .map(|_| desc(u, f, None))
                .collect::<Result<Vec<_>>>()?;
            let head = f.write_chain(q, &descs, u.arbitrary()?);
            if u.ratio(3, 4)? {
                f.publish(q, head);
            }
        }
        // An indirect table.
        6 => {
            let n = u.int_in_range(1..=4u8)?;
            let writable = match u.int_in_range(0..=2u8)? {
                0 => Some(true),
                1 => Some(false),
                _ => None,
            };
            let descs = (0..n)
                .map(|_| desc(u, f, writable))
                .collect::<Result<Vec<_>>>()?;
            let table = f.alloc_buf(16 * u64::from(n) + 16) & !0xf;
            for (i, d) in descs.iter().enumerate() {
                let mut d = *d;
                if i + 1 < descs.len() && writable.is_some() {
                    d.flags |= DESC_F_NEXT;
                    d.next = i as u16 + 1;
                }
                f.write_desc(table, i as u16, d);
            }
            let len = if u.ratio(7, 8)? {
                16 * u32::from(n)
            } else {
                u.arbitrary()?
            };
            let head = f.write_chain(
                q,
                &[Desc {
                    addr: table,
                    len,
                    flags: DESC_F_INDIRECT,
                    next: 0,
                }],
                false,
            );
            f.publish(q, head);
        }
        7 => {
            let head = u.arbitrary()?;
            f.publish(q, head);
        }
        8 | 9 => f.kick(q),
        10 | 11 => {
            let pair = u.int_in_range(0..=f.pairs - 1)?;
            let len = if u.ratio(7, 8)? {
                u.int_in_range(14..=1600usize)?
            } else {
                u.int_in_range(0..=4000usize)?
            };
            f.frame_seq += 1;
            let seq = f.frame_seq;
            let frame = (0..len).map(|i| (seq as usize * 31 + i) as u8).collect();
            f.inject(pair, frame);
        }
        12 => {
            // Let the IO threads catch up (bounded, so inputs stay fast).
            if f.settles < 8 {
                f.settles += 1;
                settle(Duration::from_millis(5));
            }
            let status = reg_read(&mut f.transport, REG_INTERRUPT_STATUS);
            reg_write(&mut f.transport, REG_INTERRUPT_ACK, status);
        }
        13 => {
            let addr = u64::from(u.int_in_range(0..=MEM_END as u32)?);
            let len = u.int_in_range(0..=64usize)?;
            let data = u.bytes(len)?.to_vec();
            f.write_foreign(addr, &data);
        }
        14 => {
            let idx: u16 = u.arbitrary()?;
            let avail = f.queues[q].avail;
            f.write_foreign(avail.wrapping_add(2), &idx.to_le_bytes());
        }
        _ => {
            // A register write as a confused driver might make (status too).
            f.orderly = false;
            f.raw_registers = true;
            let offset = u.int_in_range(0..=0x40u64)? * 4;
            let value = u.arbitrary()?;
            reg_write(&mut f.transport, offset, value);
        }
    }
    Ok(())
}

/// Whether two ranges lists share a byte.
fn any_overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter()
        .any(|&(x, xl)| b.iter().any(|&(y, yl)| overlaps(x, xl, y, yl)))
}

/// The bytes an RX chain holds as the device sees it, or None if it
/// cannot use it: a readable descriptor, one outside RAM, more descriptors
/// than the queue has, or no room at all.
fn rx_room(descs: &[Desc], max: usize) -> Option<usize> {
    let mut room = 0usize;
    for (i, d) in descs.iter().enumerate() {
        if i == max || d.flags & DESC_F_WRITE == 0 || !in_ram(d.addr, u64::from(d.len)) {
            return None;
        }
        room += d.len as usize;
    }
    (room > 0).then_some(room)
}

/// What the device does with one TX chain.
#[derive(Debug, PartialEq, Eq)]
enum TxOutcome {
    Sent(Vec<u8>),
    /// Bad descriptors, too long for the host buffer, or a runt.
    Dropped,
    Oversize,
    Spoofed,
}

/// Simulates the device on one TX chain. The fuzzer's frames are one
/// byte repeated (and a MAC): never IP, so a segmentation (GSO) request
/// is always refused; a checksum request (NEEDS_CSUM) is honoured with
/// VIRTIO_NET_F_CSUM, refused without, and fills RFC 1071's checksum from
/// `csum_start` to the end at `csum_start + csum_offset`.
fn expect_tx(shadow: &Shadow, descs: &[Desc], max: usize, features: u64) -> TxOutcome {
    // The header, then the frame, as one byte string.
    let mut bytes = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        if i == max || d.flags & DESC_F_WRITE != 0 {
            return TxOutcome::Dropped;
        }
        if d.len == 0 {
            continue;
        }
        if bytes.len() + d.len as usize > NET_HDR_LEN + MAX_TX_FRAME {
            return TxOutcome::Dropped;
        }
        match shadow.get(d.addr, d.len as usize) {
            Some(b) => bytes.extend_from_slice(b),
            None => return TxOutcome::Dropped,
        }
    }
    if bytes.len() < NET_HDR_LEN + 14 {
        return TxOutcome::Dropped;
    }
    let (hdr, frame) = bytes.split_at(NET_HDR_LEN);
    let needs_csum = hdr[0] & 1 != 0;
    if needs_csum && features & F_CSUM == 0 {
        return TxOutcome::Dropped;
    }
    if hdr[1] != 0 || frame.len() > TX_BUF {
        return TxOutcome::Dropped;
    }
    if frame.len() > MAX_FRAME {
        return TxOutcome::Oversize;
    }
    if frame[6..12] != MAC {
        return TxOutcome::Spoofed;
    }
    let mut frame = frame.to_vec();
    if needs_csum {
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let at = start + usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        if at + 2 > frame.len() {
            return TxOutcome::Dropped;
        }
        let c = rfc1071(&frame[start..]);
        frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    TxOutcome::Sent(frame)
}

/// The Internet checksum to store for `data`, word by word as RFC 1071
/// describes it (0 sent as 0xffff).
fn rfc1071(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u32::from(pair[0]) << 8 | pair.get(1).map_or(0, |&b| u32::from(b));
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// Which control commands the negotiated features allow.
#[derive(Debug, Clone, Copy)]
struct Allowed {
    max_pairs: u16,
    mq: bool,
    rx_mode: bool,
}

/// What an accepted control command changes.
#[derive(Debug, Clone)]
enum Effect {
    Pairs(u16),
    Promisc(bool),
    AllMulti(bool),
    MacTable(Box<RxMode>),
}

impl Effect {
    fn apply(&self, mode: &mut RxMode) {
        match self {
            Effect::Pairs(_) => {}
            Effect::Promisc(on) => mode.promisc = *on,
            Effect::AllMulti(on) => mode.all_multi = *on,
            Effect::MacTable(table) => {
                mode.table = table.table;
                mode.table_len = table.table_len;
                mode.unicast_overflow = table.unicast_overflow;
                mode.multicast_overflow = table.multicast_overflow;
                mode.multicast_by_table = true;
            }
        }
    }
}

/// The device's answer to one control chain.
struct CtrlExpect {
    used_len: u32,
    ack_at: u64,
    status: u8,
    effect: Option<Effect>,
}

/// Simulates the device on one control chain: the whole readable part
/// (up to `CTRL_COMMAND_MAX` bytes) is the command, the ack goes into the
/// first writable buffer with room for it.
fn expect_ctrl(shadow: &Shadow, descs: &[Desc], max: usize, allowed: Allowed) -> CtrlExpect {
    let mut command = Vec::new();
    let mut truncated = false;
    let mut ack = None;
    for d in descs.iter().take(max) {
        if d.flags & DESC_F_WRITE != 0 {
            if d.len > 0 {
                ack.get_or_insert(d.addr);
            }
            continue;
        }
        let len = d.len as usize;
        let n = len.min(CTRL_COMMAND_MAX - command.len());
        truncated |= n < len;
        if n > 0 {
            if let Some(bytes) = shadow.get(d.addr, n) {
                command.extend_from_slice(bytes);
            }
        }
    }
    let effect = parse_command(&command, truncated, allowed);
    let status = u8::from(effect.is_none());
    let (used_len, ack_at) = match ack {
        Some(at) if in_ram(at, 1) => (1, at),
        _ => (0, 0),
    };
    CtrlExpect {
        used_len,
        ack_at,
        status,
        effect,
    }
}

fn parse_command(command: &[u8], truncated: bool, allowed: Allowed) -> Option<Effect> {
    let (&class, rest) = command.split_first()?;
    let (&cmd, data) = rest.split_first()?;
    match (class, cmd) {
        (4, 0) if allowed.mq => {
            let pairs = u16::from_le_bytes(data.try_into().ok()?);
            (1..=allowed.max_pairs)
                .contains(&pairs)
                .then_some(Effect::Pairs(pairs))
        }
        (0, 0 | 1) if allowed.rx_mode => match data {
            [on] if cmd == 0 => Some(Effect::Promisc(*on != 0)),
            [on] => Some(Effect::AllMulti(*on != 0)),
            _ => None,
        },
        (1, 0) if allowed.rx_mode => parse_tables(data, truncated).map(Effect::MacTable),
        _ => None,
    }
}

/// Unicast then multicast table (le32 count, 6 bytes each); a table cut
/// short by the device's buffer can only be larger than the device's.
fn parse_tables(mut data: &[u8], truncated: bool) -> Option<Box<RxMode>> {
    let mut t = Box::new(RxMode::default_for(MAC));
    for multicast in [false, true] {
        let entries = data.split_first_chunk::<4>().and_then(|(count, rest)| {
            let bytes = (u32::from_le_bytes(*count) as usize).checked_mul(6)?;
            (bytes <= rest.len()).then(|| rest.split_at(bytes))
        });
        let Some((entries, rest)) = entries else {
            if !truncated {
                return None;
            }
            t.unicast_overflow |= !multicast;
            t.multicast_overflow = true;
            return Some(t);
        };
        for mac in entries.chunks_exact(6) {
            if t.table_len < MAC_TABLE_MAX {
                t.table[t.table_len].copy_from_slice(mac);
                t.table_len += 1;
            } else if multicast {
                t.multicast_overflow = true;
            } else {
                t.unicast_overflow = true;
            }
        }
        data = rest;
    }
    Some(t)
}

/// The orderly-run checks, after reset (the IO threads are joined, guest
/// memory no longer changes).
fn check_used_rings(f: &Fuzz) {
    let ready: Vec<&Queue> = f.queues.iter().filter(|q| q.ready).collect();
    // Rings apart from each other, in RAM, and never written raw; used
    // rings never written by the driver at all.
    for (i, a) in ready.iter().enumerate() {
        if !a.valid() {
            return;
        }
        let rings = a.rings();
        if (0..3)
            .any(|x| (x + 1..3).any(|y| overlaps(rings[x].0, rings[x].1, rings[y].0, rings[y].1)))
        {
            return;
        }
        let (used, used_len) = rings[2];
        if f.written[used as usize..(used + used_len) as usize]
            .iter()
            .any(|&b| b)
        {
            return;
        }
        // Nor placed over raw writes or over buffer contents and
        // descriptor entries (whose bytes then are the ring's).
        for (start, len) in a.rings() {
            let bytes = start.min(MEM_END) as usize..(start + len).min(MEM_END) as usize;
            if f.foreign[bytes.clone()].iter().any(|&b| b) || f.contents[bytes].iter().any(|&b| b) {
                return;
            }
        }
        for b in &ready[i + 1..] {
            if any_overlap(&a.rings(), &b.rings()) {
                return;
            }
        }
    }
    let roles = f.roles();
    // Every published chain's descriptors, and what the device may write.
    let mut chains = Vec::new();
    let mut writable = Vec::new();
    let mut readable = Vec::new();
    for (qi, q) in f.queues.iter().enumerate() {
        for &head in &q.published {
            let (descs, _) = walk_chain(&f.shadow, q.desc, q.size, head);
            for d in &descs {
                let range = (d.addr, u64::from(d.len));
                if d.flags & DESC_F_WRITE != 0 {
                    writable.push((range, qi, head));
                } else {
                    readable.push(range);
                }
            }
            chains.push(descs);
        }
    }
    let all_rings: Vec<(u64, u64)> = ready.iter().flat_map(|q| q.rings()).collect();
    let w: Vec<(u64, u64)> = writable.iter().map(|&(r, _, _)| r).collect();
    let over_entries = w.iter().any(|&(a, len)| {
        let (start, end) = (
            a.min(MEM_END) as usize,
            a.saturating_add(len).min(MEM_END) as usize,
        );
        f.in_chain[start..end].iter().any(|&b| b)
    });
    if any_overlap(&w, &all_rings) || over_entries {
        return;
    }
    // A write-only range overlapping nothing else the device may write
    // (another chain's, or the same chain published twice, or another
    // descriptor of its own): its content is the device's last word.
    let alone = |range: (u64, u64), _qi: usize, _head: u16| {
        writable
            .iter()
            .filter(|&&((a, al), _, _)| overlaps(a, al, range.0, range.1))
            .count()
            <= 1
    };
    let readable_stable = !any_overlap(&w, &readable);

    let host = f.host.host.lock().unwrap();
    // Pairs that stopped with DEVICE_NEEDS_RESET: only where the driver
    // broke a ring (avail ring at 0, a head outside the queue); from then
    // on nothing is certain about them.
    let mut may_fault = vec![false; f.pairs];
    for (qi, q) in f.queues.iter().enumerate() {
        if let Some(pair) = Fuzz::pair_of(roles[qi]) {
            may_fault[pair] |= q.avail == 0 || q.published.iter().any(|&h| h >= q.size);
        }
    }
    let faulted: Vec<bool> = (0..f.pairs)
        .map(|p| f.host.counter(p, |c| &c.queue_errors) > 0)
        .collect();
    for pair in 0..f.pairs {
        assert!(
            !faulted[pair] || may_fault[pair],
            "pair {pair} needs a reset, but its rings are fine"
        );
    }
    if !f.activated {
        assert!(
            host.delivered.iter().all(|&n| n == 0),
            "frames taken by a device that never started"
        );
    }
    let allowed = f.allowed();
    let mut sent_expected = vec![Vec::new(); f.pairs];
    let mut ctrl_effects: Option<Vec<Option<Effect>>> = None;
    let mut has_rx = vec![false; f.pairs];
    for (qi, q) in f.queues.iter().enumerate() {
        if !q.ready {
            continue;
        }
        let used_idx = u16::from_le_bytes(
            read_guest(&f.mem, q.used.wrapping_add(2), 2)
                .unwrap()
                .try_into()
                .unwrap(),
        );
        let n = usize::from(used_idx);
        let role = roles[qi];
        if role == Role::Unused {
            assert_eq!(n, 0, "queue {qi} ({role:?}) has used entries");
            continue;
        }
        let pair = Fuzz::pair_of(role).unwrap();
        if let Role::Rx(p) = role {
            has_rx[p] = true;
        }
        if faulted[pair] {
            continue;
        }
        assert!(
            n <= q.published.len(),
            "queue {qi}: {n} used entries for {} chains published",
            q.published.len()
        );
        let max = usize::from(q.size);
        // entries[k]: the k-th published chain (head, descriptors) with the
        // length of the k-th used entry; used_ids[k]: that entry's chain.
        let mut entries = Vec::new();
        let mut used_ids = Vec::new();
        for k in 0..n {
            let slot =
                read_guest(&f.mem, q.used.wrapping_add(4 + (k % max) as u64 * 8), 8).unwrap();
            let id = u32::from_le_bytes(slot[..4].try_into().unwrap());
            let len = u32::from_le_bytes(slot[4..].try_into().unwrap());
            let head = q.published[k];
            // RX may reorder within a frame (checked below); the rest not.
            if !matches!(role, Role::Rx(_)) {
                assert_eq!(
                    id,
                    u32::from(head),
                    "queue {qi} used entry {k}: wrong chain"
                );
            }
            let (descs, _) = walk_chain(&f.shadow, q.desc, q.size, head);
            entries.push((head, len, descs));
            used_ids.push(id);
        }
        match role {
            Role::Rx(pair) => {
                let taken = &host.delivered_frames[pair];
                let classes: Vec<Option<bool>> = (0..taken.len())
                    .map(|i| match f.rx_active[pair].get(i) {
                        _ if pair == 0 => Some(true),
                        // What VQ_PAIRS_SET did depends on bytes the
                        // device may have overwritten.
                        _ if !readable_stable => None,
                        Some(&class) => class,
                        None => panic!("pair {pair}: frame {i} taken but never offered"),
                    })
                    .collect();
                let mergeable = f.features & F_MRG_RXBUF != 0;
                // How the device sees each chain: None if unusable
                // (readable or out-of-RAM descriptors, too many, no room),
                // else the bytes it can hold.
                let rooms: Vec<Option<usize>> = entries
                    .iter()
                    .map(|(_, _, descs)| rx_room(descs, max))
                    .collect();
                // Whether frame i can be the `m` used entries from k, made
                // of the `m` chains published from k: delivered (header +
                // frame over the usable chains, each filled before the
                // next) or dropped as too big (all empty). Unusable chains
                // the device meets inside a merged frame come back first,
                // with length 0, then the frame's own chains in order (so
                // a driver never finds one amid a frame's buffers).
                let lands = |i: usize, k: usize, m: usize| -> bool {
                    let frame = &taken[i];
                    let total = NET_HDR_LEN + frame.len();
                    if rooms[k].is_none_or(|r| r < NET_HDR_LEN) || (!mergeable && m != 1) {
                        return false;
                    }
                    let (good, bad): (Vec<usize>, Vec<usize>) =
                        (k..k + m).partition(|&j| rooms[j].is_some());
                    let in_order = bad
                        .iter()
                        .chain(&good)
                        .zip(k..k + m)
                        .all(|(&j, at)| used_ids[at] == u32::from(entries[j].0));
                    if !in_order || entries[k..k + bad.len()].iter().any(|e| e.1 != 0) {
                        return false;
                    }
                    let room: usize = good.iter().filter_map(|&j| rooms[j]).sum();
                    if entries[k..k + m].iter().all(|e| e.1 == 0) && room < total {
                        // Too big: one chain, or (merged) as many as the
                        // device takes for a frame before it gives up.
                        return if mergeable {
                            m <= RX_CHAINS_MAX
                        } else {
                            m == 1
                        };
                    }
                    // The device takes a chain only for bytes left to write.
                    if rooms[k + m - 1].is_none() {
                        return false;
                    }
                    let mut header = RX_HEADER;
                    header[10..12].copy_from_slice(&(good.len() as u16).to_le_bytes());
                    let mut expected_bytes = header.to_vec();
                    expected_bytes.extend_from_slice(frame);
                    let mut at = 0usize;
                    for (g, &j) in good.iter().enumerate() {
                        let (head, _, descs) = &entries[j];
                        let len = entries[k + bad.len() + g].1;
                        let want = rooms[j].unwrap_or(0).min(total - at);
                        if want == 0 || len as usize != want {
                            return false;
                        }
                        let mut left = want;
                        for d in descs.iter().filter(|d| d.len > 0) {
                            let n = (d.len as usize).min(left);
                            if n == 0 {
                                break;
                            }
                            if alone((d.addr, u64::from(d.len)), qi, *head)
                                && read_guest(&f.mem, d.addr, n).unwrap()
                                    != expected_bytes[at..at + n]
                            {
                                return false;
                            }
                            at += n;
                            left -= n;
                        }
                    }
                    at == total
                };
                // Frames taken in order; each lands in the next used
                // entries (the pair was in use) or is dropped (it was not);
                // unusable chains come back empty between frames.
                let mut reach = vec![vec![false; n + 1]; taken.len() + 1];
                reach[0][0] = true;
                for i in 0..=taken.len() {
                    for k in 0..=n {
                        if !reach[i][k] {
                            continue;
                        }
                        if k < n
                            && entries[k].1 == 0
                            && used_ids[k] == u32::from(entries[k].0)
                            && rooms[k].is_none_or(|r| r < NET_HDR_LEN)
                        {
                            reach[i][k + 1] = true;
                        }
                        if i == taken.len() {
                            continue;
                        }
                        // Dropped: not for a pair in use, or longer than
                        // the MTU allows without GSO (rx_dropped_too_big).
                        if classes[i] != Some(true) || taken[i].len() > MAX_FRAME {
                            reach[i + 1][k] = true;
                        }
                        if classes[i] == Some(false) {
                            continue;
                        }
                        let most = if mergeable { RX_CHAINS_MAX } else { 1 };
                        for m in 1..=most.min(n - k) {
                            if lands(i, k, m) {
                                reach[i + 1][k + m] = true;
                            }
                        }
                    }
                }
                assert!(
                    reach[taken.len()][n],
                    "rx queue {qi}: {} frames taken (lengths {:?}, in use {classes:?}) do not \
                     match the {n} used entries (chains {:?}, lengths {:?}; published {:?}, \
                     room as the model sees it {:?}; descriptors {:?})",
                    taken.len(),
                    taken.iter().map(Vec::len).collect::<Vec<_>>(),
                    used_ids,
                    entries.iter().map(|e| e.1).collect::<Vec<_>>(),
                    entries.iter().map(|e| e.0).collect::<Vec<_>>(),
                    rooms,
                    entries.iter().map(|e| &e.2).collect::<Vec<_>>()
                );
                // Frames may take several entries (or none): the drops for
                // an unused pair are pinned down where every frame's class is.
                let inactive = f.host.counter(pair, |c| &c.rx_dropped_inactive) as usize;
                let must = classes.iter().filter(|c| **c == Some(false)).count();
                let may = classes.iter().filter(|c| **c != Some(true)).count();
                assert!(
                    (must..=may).contains(&inactive),
                    "rx queue {qi}: {inactive} frames dropped as not in use, expected {must}..={may}"
                );
            }
            Role::Tx(pair) => {
                let (mut oversize, mut spoofed) = (0, 0);
                for (k, (_, len, descs)) in entries.iter().enumerate() {
                    assert_eq!(*len, 0, "tx used length, entry {k}");
                    match expect_tx(&f.shadow, descs, max, f.features) {
                        TxOutcome::Sent(frame) => sent_expected[pair].push(frame),
                        TxOutcome::Oversize => oversize += 1,
                        TxOutcome::Spoofed => spoofed += 1,
                        TxOutcome::Dropped => {}
                    }
                }
                if readable_stable {
                    let counted = (
                        f.host.counter(pair, |c| &c.tx_dropped_oversize),
                        f.host.counter(pair, |c| &c.tx_dropped_spoofed),
                    );
                    assert_eq!(counted, (oversize, spoofed), "tx drops on pair {pair}");
                }
            }
            Role::Ctrl => {
                let mut effects = Vec::new();
                for (k, (head, len, descs)) in entries.iter().enumerate() {
                    let e = expect_ctrl(&f.shadow, descs, max, allowed);
                    if readable_stable {
                        assert_eq!(*len, e.used_len, "control entry {k}");
                        if *len == 1 && alone((e.ack_at, 1), qi, *head) {
                            let got = read_guest(&f.mem, e.ack_at, 1).unwrap()[0];
                            assert_eq!(got, e.status, "control ack, entry {k}");
                        }
                    } else {
                        assert!(*len <= 1, "control used length {len}");
                    }
                    effects.push(e.effect);
                }
                ctrl_effects = Some(effects);
            }
            Role::Unused => unreachable!(),
        }
    }
    // Frames for a pair whose receive queue is not served are all dropped.
    for pair in 0..f.pairs {
        if !has_rx[pair] && !faulted[pair] {
            assert_eq!(
                f.host.counter(pair, |c| &c.rx_dropped_inactive) as usize,
                host.delivered[pair],
                "pair {pair} without a receive queue: frames dropped"
            );
        }
    }
    if readable_stable {
        for (pair, expected) in sent_expected.iter().enumerate() {
            if faulted[pair] {
                continue;
            }
            assert_eq!(
                &host.sent_frames[pair], expected,
                "frames sent on pair {pair}"
            );
        }
        // The receive mode read before the reset is the one some prefix of
        // the acked commands set: at least those acked before it was read,
        // at most one more (its effect comes before its ack).
        if let (Some(effects), Some((before, mode, after))) = (&ctrl_effects, &f.rx_mode_seen) {
            let mut state = RxMode::default_for(MAC);
            let mut states = vec![state];
            for e in effects.iter().flatten() {
                e.apply(&mut state);
                states.push(state);
            }
            // states[k]: after the first k accepted commands.
            let accepted_by = |count: usize| effects.iter().take(count).flatten().count();
            let lo = accepted_by(usize::from(*before));
            let hi = accepted_by(usize::from(*after) + 1);
            assert!(
                states[lo..=hi].contains(mode),
                "receive mode (promisc, all_multi, by table, table, overflow) {:?} \
                 not set by commands {before}..={after}",
                (
                    mode.promisc,
                    mode.all_multi,
                    mode.multicast_by_table,
                    mode.table(),
                    (mode.unicast_overflow, mode.multicast_overflow)
                )
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let pairs = usize::from(u.int_in_range(1..=2u8).unwrap_or(1));
    // One byte: the backend's room per call and whether it sends from
    // guest memory (tx-gather=on).
    let room = u.int_in_range(0..=127u8).unwrap_or(63);
    let (tx_room, gather) = (usize::from(room % 64) + 1, room >= 64);
    let features = match u.int_in_range(0..=15u8).unwrap_or(0) {
        0 => u.arbitrary().unwrap_or(0),
        // All of them, as Linux takes them.
        1..=5 => OFFERED,
        _ => (u.arbitrary::<u64>().unwrap_or(0) & OFFERED) | F_VERSION_1,
    };
    let mem = guest_memory();
    let (transport, host, _irq) = device(pairs, tx_room, gather, &mem);
    host.host.lock().unwrap().keep_frames = true;
    let queues = (0..=2 * pairs)
        .map(|q| {
            let max = if q == 2 * pairs {
                CTRL_QUEUE_MAX
            } else {
                QUEUE_MAX
            };
            Queue {
                max,
                size: max,
                desc: 0,
                avail: 0,
                used: 0,
                ready: false,
                avail_idx: 0,
                next_id: 0,
                published: Vec::new(),
            }
        })
        .collect();
    let mut f = Fuzz {
        mem,
        shadow: Shadow::new(),
        transport,
        host,
        pairs,
        features,
        queues,
        activated: false,
        orderly: true,
        raw_registers: false,
        in_chain: Marks::new(),
        in_buffers: Marks::new(),
        foreign: Marks::new(),
        written: Marks::new(),
        contents: Marks::new(),
        buf_cursor: BUF_START,
        frame_seq: 0,
        settles: 0,
        rx_active: vec![Vec::new(); pairs],
        // Until VQ_PAIRS_SET, the driver uses the first pair only.
        active_now: (0..pairs).map(|p| Some(p == 0)).collect(),
        pairs_after_ctrl: 1,
        syncs: 0,
        rx_mode_seen: None,
    };
    if start(&mut f, &mut u).is_ok() {
        for _ in 0..128 {
            if u.is_empty() || op(&mut f, &mut u).is_err() {
                break;
            }
        }
    }
    // Let the device finish what it was given, then reset it as a driver
    // unbinding does and drop it as the VMM does.
    if !settle(Duration::from_millis(20)) {
        // Busy for long: with work to do (rings that feed themselves), or
        // spinning over queues with nothing to do (a finding).
        let progress = || {
            let host = f.host.host.lock().unwrap();
            let mut state: Vec<u64> = f
                .queues
                .iter()
                .filter_map(|q| read_guest(&f.mem, q.used.wrapping_add(2), 2))
                .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            state.extend(host.delivered.iter().chain(&host.sent).map(|&n| n as u64));
            state
        };
        assert_no_spin(&f.host, progress);
    }
    let link = f.host.link.clone().unwrap();
    if let Some(ctrl) = f.roles().iter().position(|&r| r == Role::Ctrl) {
        let used = f.queues[ctrl].used.wrapping_add(2);
        let read_used =
            |f: &Fuzz| read_guest(&f.mem, used, 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let before = read_used(&f);
        let mode = link.rx_mode();
        f.rx_mode_seen = Some((before, mode, read_used(&f)));
    }
    reg_write(&mut f.transport, REG_STATUS, 0);
    assert_eq!(
        reg_read(&mut f.transport, REG_STATUS),
        0,
        "status after reset"
    );
    assert_no_workers("after reset");
    assert_eq!(
        link.rx_mode(),
        RxMode::default_for(MAC),
        "receive mode after reset"
    );
    if let Some(v) = f.host.violation() {
        panic!("device thread: {v}");
    }
    if std::env::var_os("XSKVM_FUZZ_DEBUG").is_some() {
        eprintln!(
            "pairs {} features {:#x} activated {} orderly {} roles {:?}",
            f.pairs,
            f.features,
            f.activated,
            f.orderly,
            f.roles()
        );
        for (p, c) in f.host.counters.iter().enumerate() {
            eprintln!("pair {p}: {}", c.snapshot());
        }
        for (i, q) in f.queues.iter().enumerate() {
            eprintln!(
                "q{i}: ready {} size {} desc {:#x} avail {:#x} used {:#x} published {:?}",
                q.ready, q.size, q.desc, q.avail, q.used, q.published
            );
        }
    }
    if f.orderly {
        check_used_rings(&f);
    }
    let Fuzz {
        transport, host, ..
    } = f;
    drop(transport);
    assert_eq!(
        host.live.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "backends not given back and dropped"
    );
});
