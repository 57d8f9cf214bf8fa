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
//! Checked when the input drove the device "orderly" (no raw memory writes
//! after DRIVER_OK, rings apart from each other and from every buffer the
//! device may write, no descriptor rewritten once published, at most a
//! queue's worth of chains per queue, no raw register writes): each used
//! ring holds exactly the published chains in order, with the length the
//! chain deserves (RX: header + frame if it fits the writable buffers,
//! else 0; TX: 0; control: 1 if there is room for the ack, else 0); only
//! the queues the negotiated features make live are used; the frames sent
//! are exactly the well-formed TX chains' frames; received frames and
//! control acks land in guest memory as they should.

#![no_main]

use std::time::Duration;

use devices::virtio::mmio::*;
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
    /// Bytes of descriptor entries read by a published chain.
    in_chain: Vec<bool>,
    /// Bytes of the buffers of published chains.
    in_buffers: Vec<bool>,
    /// Bytes written by raw writes, not by the driver helpers.
    foreign: Vec<bool>,
    /// Bytes the driver wrote at all.
    written: Vec<bool>,
    buf_cursor: u64,
    frame_seq: u32,
    settles: u32,
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
            self.write(at, &desc.to_bytes());
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
        self.write(
            queue.avail + 4 + u64::from(queue.avail_idx % size) * 2,
            &head.to_le_bytes(),
        );
        let idx = queue.avail_idx.wrapping_add(1);
        self.shadow.write_u16(&self.mem, queue.avail + 2, idx);
        self.queues[q].avail_idx = idx;
        self.queues[q].published.push(head);
        if self.queues[q].published.len() > usize::from(size) {
            self.orderly = false;
        }
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

    fn kick(&mut self, q: usize) {
        if let Some(evt) = self.transport.queue_events().get(q) {
            evt.write(1).unwrap();
        }
    }

    fn roles(&self) -> Vec<Role> {
        let mut roles = vec![Role::Unused; self.queues.len()];
        if !self.activated {
            return roles;
        }
        let mq = self.features & F_MQ != 0;
        let used_pairs = if mq { self.pairs } else { 1 };
        let mut pair0 = false;
        for pair in 0..used_pairs {
            if self.queues[2 * pair].ready && self.queues[2 * pair + 1].ready {
                roles[2 * pair] = Role::Rx(pair);
                roles[2 * pair + 1] = Role::Tx(pair);
                pair0 |= pair == 0;
            }
        }
        let ctrl = 2 * used_pairs;
        if self.features & F_CTRL_VQ != 0 && pair0 && self.queues[ctrl].ready {
            roles[ctrl] = Role::Ctrl;
        }
        roles
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
    let count = u.int_in_range(0..=f.queues.len())?;
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
            if size.is_power_of_two() && size <= queue.max {
                queue.size = size;
            }
            // Misaligned addresses are refused; the halves are written
            // low first, so the low half decides.
            if desc % 16 == 0 {
                queue.desc = desc;
            }
            if avail % 2 == 0 {
                queue.avail = avail;
            }
            if used % 4 == 0 {
                queue.used = used;
            }
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
    if acceptable && !f.activated {
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

fn queue_index(f: &Fuzz, u: &mut Unstructured) -> Result<usize> {
    u.int_in_range(0..=f.queues.len() - 1)
}

fn op(f: &mut Fuzz, u: &mut Unstructured) -> Result<()> {
    let q = queue_index(f, u)?;
    let kind = u.int_in_range(0..=15u8)?;
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
        }
        // A frame to send: header and frame, split or not.
        2 | 3 => {
            let len = u.int_in_range(0..=2100u32)?;
            let fill: u8 = u.arbitrary()?;
            let split = u.arbitrary::<bool>()?;
            let data = vec![fill; NET_HDR_LEN + len as usize];
            let addr = f.alloc_buf(data.len() as u64);
            f.write(addr, &data);
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
                        addr: addr + u64::from(cut),
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
        // A control command: class, command, data, then the ack buffer.
        4 => {
            let class = if u.ratio(3, 4)? { 4 } else { u.arbitrary()? };
            let cmd = if u.ratio(3, 4)? { 0 } else { u.arbitrary()? };
            let pairs: u16 = if u.ratio(3, 4)? {
                u.int_in_range(0..=4)?
            } else {
                u.arbitrary()?
            };
            let mut command = vec![class, cmd];
            command.extend_from_slice(&pairs.to_le_bytes());
            let cmd_len = u.int_in_range(0..=4usize)?;
            let addr = f.alloc_buf(8);
            f.write(addr, &command[..cmd_len]);
            let ack_len = u.int_in_range(0..=2u32)?;
            let descs = [
                Desc {
                    addr,
                    len: cmd_len as u32,
                    flags: 0,
                    next: 0,
                },
                Desc {
                    addr: addr + 4,
                    len: ack_len,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            ];
            let head = f.write_chain(q, &descs, false);
            f.publish(q, head);
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
            f.host.inject(pair, frame);
        }
        12 => {
            // Let the IO threads catch up (bounded, so inputs stay fast).
            if f.settles < 8 {
                f.settles += 1;
                settle(f.transport.queue_events(), Duration::from_millis(5));
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
            f.write_foreign(avail + 2, &idx.to_le_bytes());
        }
        _ => {
            // A register write as a confused driver might make (status too).
            f.orderly = false;
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

/// Simulates the device on one RX chain: the used length, if certain.
fn expect_rx(descs: &[Desc], max: usize, frame_len: usize) -> Option<u32> {
    let total = NET_HDR_LEN + frame_len;
    let mut written = 0usize;
    for (i, d) in descs.iter().enumerate() {
        if written == total {
            break;
        }
        if i == max || d.flags & DESC_F_WRITE == 0 {
            return Some(0);
        }
        let room = d.len as usize;
        let mut offset = 0;
        let mut addr = d.addr;
        if written < NET_HDR_LEN {
            let n = (NET_HDR_LEN - written).min(room);
            if n == 0 && !in_ram(addr, 1) {
                return None; // an empty write outside RAM: either way
            }
            if !in_ram(addr, n as u64) {
                return Some(0);
            }
            written += n;
            offset += n;
            addr = addr.checked_add(n as u64)?;
        }
        if written >= NET_HDR_LEN && offset < room {
            let n = (total - written).min(room - offset);
            if n == 0 && !in_ram(addr, 1) {
                return None;
            }
            if !in_ram(addr, n as u64) {
                return Some(0);
            }
            written += n;
        }
    }
    Some(if written < total { 0 } else { total as u32 })
}

/// Simulates the device on one TX chain: the frame it sends, if any.
fn expect_tx(shadow: &Shadow, descs: &[Desc], max: usize) -> Option<Vec<u8>> {
    let mut skip = NET_HDR_LEN as u64;
    let mut frame = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        if i == max || d.flags & DESC_F_WRITE != 0 {
            return None;
        }
        let skipped = skip.min(u64::from(d.len));
        skip -= skipped;
        let len = u64::from(d.len) - skipped;
        let addr = d.addr.checked_add(skipped)?;
        if len == 0 {
            continue;
        }
        if frame.len() as u64 + len > TX_BUF as u64 {
            return None;
        }
        frame.extend_from_slice(shadow.get(addr, len as usize)?);
    }
    (frame.len() >= 14).then_some(frame)
}

/// Simulates the device on one control chain: (used length, ack address, ack).
fn expect_ctrl(
    shadow: &Shadow,
    descs: &[Desc],
    max: usize,
    mq: bool,
    pairs: u16,
) -> (u32, u64, u8) {
    let mut command = Vec::new();
    let mut ack = None;
    for d in descs.iter().take(max) {
        if d.flags & DESC_F_WRITE != 0 {
            if d.len > 0 {
                ack.get_or_insert(d.addr);
            }
            continue;
        }
        let n = (d.len as usize).min(4 - command.len());
        if n > 0 {
            if let Some(bytes) = shadow.get(d.addr, n) {
                command.extend_from_slice(bytes);
            }
        }
    }
    let status = match command[..] {
        [4, 0, lo, hi] if mq && (1..=pairs).contains(&u16::from_le_bytes([lo, hi])) => 0,
        _ => 1,
    };
    match ack {
        Some(at) if in_ram(at, 1) => (1, at, status),
        _ => (0, 0, status),
    }
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
        for (start, len) in a.rings() {
            if f.foreign[start.min(MEM_END) as usize..(start + len).min(MEM_END) as usize]
                .iter()
                .any(|&b| b)
            {
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
    // A write-only range overlapping no other chain's: its content is the device's last word.
    let alone = |range: (u64, u64), qi: usize, head: u16| {
        writable
            .iter()
            .filter(|&&(r, q, h)| r != range || q != qi || h != head)
            .all(|&((a, al), _, _)| !overlaps(a, al, range.0, range.1))
    };
    let readable_stable = !any_overlap(&w, &readable);

    let host = f.host.host.lock().unwrap();
    let mq = f.features & F_MQ != 0;
    let mut sent_expected = vec![Vec::new(); f.pairs];
    for (qi, q) in f.queues.iter().enumerate() {
        if !q.ready {
            continue;
        }
        let used_idx = u16::from_le_bytes(
            read_guest(&f.mem, q.used + 2, 2)
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
        assert!(
            n <= q.published.len(),
            "queue {qi}: {n} used entries for {} chains published",
            q.published.len()
        );
        let max = usize::from(q.size);
        let mut rx_frames = 0;
        for k in 0..n {
            let slot = read_guest(&f.mem, q.used + 4 + (k % max) as u64 * 8, 8).unwrap();
            let id = u32::from_le_bytes(slot[..4].try_into().unwrap());
            let len = u32::from_le_bytes(slot[4..].try_into().unwrap());
            let head = q.published[k];
            assert_eq!(
                id,
                u32::from(head),
                "queue {qi} used entry {k}: wrong chain"
            );
            let (descs, _) = walk_chain(&f.shadow, q.desc, q.size, head);
            match role {
                Role::Rx(pair) => {
                    let frame = host.delivered_frames[pair]
                        .get(rx_frames)
                        .unwrap_or_else(|| {
                            panic!("rx queue {qi}: used entry {k} without a frame taken")
                        });
                    rx_frames += 1;
                    let writable_sum: u64 = descs
                        .iter()
                        .filter(|d| d.flags & DESC_F_WRITE != 0)
                        .map(|d| u64::from(d.len))
                        .sum();
                    assert!(
                        u64::from(len) <= writable_sum,
                        "rx entry {k}: {len} > {writable_sum} offered"
                    );
                    if let Some(expected) = expect_rx(&descs, max, frame.len()) {
                        assert_eq!(
                            len,
                            expected,
                            "rx queue {qi} entry {k}: frame of {}",
                            frame.len()
                        );
                    }
                    let mut expected_bytes = RX_HEADER.to_vec();
                    expected_bytes.extend_from_slice(frame);
                    if len > 0 {
                        let mut at = 0usize;
                        for d in &descs {
                            let n = (d.len as usize).min(expected_bytes.len() - at);
                            if n == 0 {
                                break;
                            }
                            if alone((d.addr, u64::from(d.len)), qi, head) {
                                let got = read_guest(&f.mem, d.addr, n).unwrap();
                                assert_eq!(
                                    got,
                                    expected_bytes[at..at + n],
                                    "rx queue {qi} entry {k} bytes"
                                );
                            }
                            at += n;
                        }
                    }
                }
                Role::Tx(pair) => {
                    assert_eq!(len, 0, "tx used length");
                    sent_expected[pair].push(expect_tx(&f.shadow, &descs, max));
                }
                Role::Ctrl => {
                    let (expected, at, status) =
                        expect_ctrl(&f.shadow, &descs, max, mq, f.pairs as u16);
                    if readable_stable {
                        assert_eq!(len, expected, "control entry {k}");
                        if len == 1 && alone((at, 1), qi, head) {
                            let got = read_guest(&f.mem, at, 1).unwrap()[0];
                            assert_eq!(got, status, "control ack");
                        }
                    } else {
                        assert!(len <= 1, "control used length {len}");
                    }
                }
                Role::Unused => unreachable!(),
            }
        }
        if let Role::Rx(pair) = role {
            assert_eq!(
                rx_frames,
                host.delivered_frames[pair].len(),
                "rx queue {qi}: frames taken vs used entries"
            );
        }
    }
    if readable_stable {
        for (pair, expected) in sent_expected.iter().enumerate() {
            let expected: Vec<&Vec<u8>> = expected.iter().flatten().collect();
            let sent: Vec<&Vec<u8>> = host.sent_frames[pair].iter().collect();
            assert_eq!(sent, expected, "frames sent on pair {pair}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let pairs = usize::from(u.int_in_range(1..=2u8).unwrap_or(1));
    let tx_room = usize::from(u.int_in_range(1..=64u8).unwrap_or(64));
    let features = match u.int_in_range(0..=15u8).unwrap_or(0) {
        0 => u.arbitrary().unwrap_or(0),
        _ => (u.arbitrary::<u64>().unwrap_or(0) & OFFERED) | F_VERSION_1,
    };
    let mem = guest_memory();
    let (transport, host, _irq) = device(pairs, tx_room, &mem);
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
        in_chain: vec![false; MEM_END as usize],
        in_buffers: vec![false; MEM_END as usize],
        foreign: vec![false; MEM_END as usize],
        written: vec![false; MEM_END as usize],
        buf_cursor: BUF_START,
        frame_seq: 0,
        settles: 0,
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
    settle(f.transport.queue_events(), Duration::from_millis(20));
    reg_write(&mut f.transport, REG_STATUS, 0);
    assert_eq!(
        reg_read(&mut f.transport, REG_STATUS),
        0,
        "status after reset"
    );
    assert_no_workers("after reset");
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
