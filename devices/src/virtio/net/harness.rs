//! A device-level driver harness: test code that plays the guest's
//! virtio-net driver against [`Net`] through the virtio-mmio registers and
//! queue eventfds, on a real `GuestMemoryMmap`, with no KVM. Used by the
//! device tests and the datapath benchmark.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Net, NET_HDR_LEN};
use crate::bus::BusDevice;
use crate::virtio::mmio::*;

pub const MEM_SIZE: usize = 64 << 20;
/// Each queue's rings live in one 16 KiB block from here.
const RINGS_START: u64 = 0x10_0000;
const RING_BLOCK: u64 = 0x4000;
/// Buffers: one 2 KiB slot per descriptor of each queue, from here.
const BUFFERS_START: u64 = 0x100_0000;
pub const BUFFER_SIZE: u32 = 2048;
const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Driver-side state of one virtqueue.
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    /// Descriptor ids free for new chains.
    free: Vec<u16>,
    /// avail_idx when the device was last notified.
    notified_at: u16,
}

pub struct DriverHarness {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub irq: EventFd,
    queues: Vec<DriverQueue>,
    event_idx: bool,
}

fn reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

impl DriverHarness {
    pub fn new(net: Net) -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        Self::with_memory(net, mem)
    }

    /// On guest memory of the caller's (at least [`MEM_SIZE`] from 0): a
    /// backend's UMEM, say.
    pub fn with_memory(net: Net, mem: GuestMemoryMmap) -> Self {
        assert!(
            mem.check_range(GuestAddress(0), MEM_SIZE),
            "the harness needs {MEM_SIZE} bytes of guest memory from 0"
        );
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = MmioTransport::new(
            Box::new(net),
            mem.clone(),
            irq.try_clone().expect("eventfd"),
        )
        .expect("transport");
        Self {
            mem,
            transport,
            irq,
            queues: Vec::new(),
            event_idx: false,
        }
    }

    pub fn device_features(&mut self) -> u64 {
        reg(&mut self.transport, REG_DEVICE_FEATURES_SEL, 0);
        let low = read_reg(&mut self.transport, REG_DEVICE_FEATURES);
        reg(&mut self.transport, REG_DEVICE_FEATURES_SEL, 1);
        let high = read_reg(&mut self.transport, REG_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    pub fn status(&mut self) -> u32 {
        read_reg(&mut self.transport, REG_STATUS)
    }

    /// Negotiates `features`, sets up `queue_count` queues of `size` and sets
    /// DRIVER_OK, as the Linux driver does.
    pub fn start(&mut self, features: u64, queue_count: usize, size: u16) {
        self.start_with_avail_rings(features, queue_count, size, &[]);
    }

    /// [`DriverHarness::start`], with the avail ring of some queues placed
    /// at a given address instead (`(queue, address)`), as a broken or
    /// hostile driver might.
    pub fn start_with_avail_rings(
        &mut self,
        features: u64,
        queue_count: usize,
        size: u16,
        avail_at: &[(usize, u64)],
    ) {
        let t = &mut self.transport;
        reg(t, REG_STATUS, 0);
        reg(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        reg(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        reg(t, REG_DRIVER_FEATURES_SEL, 0);
        reg(t, REG_DRIVER_FEATURES, features as u32);
        reg(t, REG_DRIVER_FEATURES_SEL, 1);
        reg(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        reg(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        self.event_idx = features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        self.queues.clear();
        for q in 0..queue_count {
            // As Linux does: no larger than the device allows (the control
            // queue is smaller than the others).
            reg(&mut self.transport, REG_QUEUE_SEL, q as u32);
            let max = read_reg(&mut self.transport, REG_QUEUE_NUM_MAX);
            let size = u16::try_from(max).map_or(size, |max| size.min(max));
            let base = RINGS_START + q as u64 * RING_BLOCK;
            let avail = avail_at
                .iter()
                .find(|(queue, _)| *queue == q)
                .map_or(base + 0x1000, |&(_, addr)| addr);
            let queue = DriverQueue {
                size,
                desc: base,
                avail,
                used: base + 0x2000,
                avail_idx: 0,
                used_seen: 0,
                free: (0..size).rev().collect(),
                notified_at: 0,
            };
            // Zero the rings: a reused harness must not see old indices.
            self.mem
                .write_slice(&[0u8; RING_BLOCK as usize], GuestAddress(base))
                .expect("zero rings");
            let t = &mut self.transport;
            reg(t, REG_QUEUE_SEL, q as u32);
            reg(t, REG_QUEUE_NUM, u32::from(size));
            for (low, value) in [
                (REG_QUEUE_DESC_LOW, queue.desc),
                (REG_QUEUE_AVAIL_LOW, queue.avail),
                (REG_QUEUE_USED_LOW, queue.used),
            ] {
                reg(t, low, value as u32);
                reg(t, low + 4, (value >> 32) as u32);
            }
            reg(t, REG_QUEUE_READY, 1);
            self.queues.push(queue);
        }
        reg(
            &mut self.transport,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Resets the device (status 0), as a driver unbinding does.
    pub fn reset(&mut self) {
        reg(&mut self.transport, REG_STATUS, 0);
    }

    fn buffer_addr(queue: usize, id: u16) -> u64 {
        BUFFERS_START + (queue as u64 * 256 + u64::from(id)) * u64::from(BUFFER_SIZE)
    }

    fn write_desc(&self, queue: usize, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.queues[queue].desc + u64::from(id) * 16);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("write descriptor");
    }

    /// Publishes chain `head` in the avail ring (not yet notified).
    fn publish(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = q.avail + 4 + u64::from(q.avail_idx % q.size) * 2;
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail ring");
        q.avail_idx = q.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(q.avail_idx, GuestAddress(q.avail + 2))
            .expect("avail idx");
    }

    /// Posts up to `n` receive buffers (header + frame room each); returns how many.
    pub fn post_rx_buffers(&mut self, queue: usize, n: usize) -> usize {
        self.post_rx_buffers_sized(queue, n, BUFFER_SIZE)
    }

    /// Posts up to `n` receive buffers of `size` bytes (at most the slot
    /// size) each; returns how many.
    pub fn post_rx_buffers_sized(&mut self, queue: usize, n: usize, size: u32) -> usize {
        assert!(size <= BUFFER_SIZE);
        let mut posted = 0;
        while posted < n {
            let Some(id) = self.queues[queue].free.pop() else {
                break;
            };
            self.write_desc(
                queue,
                id,
                Self::buffer_addr(queue, id),
                size,
                VIRTQ_DESC_F_WRITE,
                0,
            );
            self.publish(queue, id);
            posted += 1;
        }
        posted
    }

    /// The first `len` bytes of RX buffer `id`, header included.
    pub fn rx_buffer(&self, queue: usize, id: u16, len: u32) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(Self::buffer_addr(queue, id)))
            .expect("rx buffer");
        out
    }

    /// Queues one frame for transmission as a two-descriptor chain (header,
    /// then frame); false if the queue is full.
    pub fn queue_tx_frame(&mut self, queue: usize, frame: &[u8]) -> bool {
        assert!(frame.len() <= BUFFER_SIZE as usize);
        if self.queues[queue].free.len() < 2 {
            return false;
        }
        let Some(hdr) = self.queues[queue].free.pop() else {
            return false;
        };
        let Some(data) = self.queues[queue].free.pop() else {
            return false;
        };
        let hdr_addr = Self::buffer_addr(queue, hdr);
        self.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(hdr_addr))
            .expect("hdr");
        let data_addr = Self::buffer_addr(queue, data);
        self.mem
            .write_slice(frame, GuestAddress(data_addr))
            .expect("frame");
        self.write_desc(
            queue,
            hdr,
            hdr_addr,
            NET_HDR_LEN as u32,
            VIRTQ_DESC_F_NEXT,
            data,
        );
        self.write_desc(queue, data, data_addr, frame.len() as u32, 0, 0);
        self.publish(queue, hdr);
        true
    }

    /// Queues a frame with the given virtio-net header, the frame split
    /// over as many buffer slots as it needs (as a guest's scatter-gather
    /// transmit would); false if the queue has too few free descriptors.
    pub fn queue_tx_frame_with_header(
        &mut self,
        queue: usize,
        hdr: [u8; NET_HDR_LEN],
        frame: &[u8],
    ) -> bool {
        let pieces = frame.chunks(BUFFER_SIZE as usize);
        let needed = 1 + pieces.len();
        if self.queues[queue].free.len() < needed {
            return false;
        }
        let ids: Vec<u16> = (0..needed)
            .filter_map(|_| self.queues[queue].free.pop())
            .collect();
        let hdr_addr = Self::buffer_addr(queue, ids[0]);
        self.mem
            .write_slice(&hdr, GuestAddress(hdr_addr))
            .expect("hdr");
        self.write_desc(
            queue,
            ids[0],
            hdr_addr,
            NET_HDR_LEN as u32,
            VIRTQ_DESC_F_NEXT,
            ids[1],
        );
        for (k, piece) in frame.chunks(BUFFER_SIZE as usize).enumerate() {
            let id = ids[k + 1];
            let addr = Self::buffer_addr(queue, id);
            self.mem
                .write_slice(piece, GuestAddress(addr))
                .expect("frame");
            let (flags, next) = match ids.get(k + 2) {
                Some(&next) => (VIRTQ_DESC_F_NEXT, next),
                None => (0, 0),
            };
            self.write_desc(queue, id, addr, piece.len() as u32, flags, next);
        }
        self.publish(queue, ids[0]);
        true
    }

    /// The virtio-net header the device wrote into RX buffer `id`.
    pub fn rx_header(&self, queue: usize, id: u16) -> [u8; NET_HDR_LEN] {
        let mut hdr = [0u8; NET_HDR_LEN];
        self.mem
            .read_slice(&mut hdr, GuestAddress(Self::buffer_addr(queue, id)))
            .expect("rx header");
        hdr
    }

    /// Publishes a raw chain built by the caller from (addr, len, flags)
    /// descriptors — for feeding the device malformed input.
    pub fn queue_raw_chain(&mut self, queue: usize, descs: &[(u64, u32, u16)]) {
        let ids: Vec<u16> = (0..descs.len())
            .filter_map(|_| self.queues[queue].free.pop())
            .collect();
        assert_eq!(ids.len(), descs.len(), "queue full");
        for (i, (&id, &(addr, len, flags))) in ids.iter().zip(descs).enumerate() {
            let next = ids.get(i + 1).copied();
            let flags = flags | if next.is_some() { VIRTQ_DESC_F_NEXT } else { 0 };
            self.write_desc(queue, id, addr, len, flags, next.unwrap_or(0));
        }
        self.publish(queue, ids[0]);
    }

    /// Publishes one chain whose head points to an indirect table at
    /// `table_addr` holding `descs` (addr, len, flags), chained in order.
    pub fn queue_indirect_chain(
        &mut self,
        queue: usize,
        table_addr: u64,
        descs: &[(u64, u32, u16)],
    ) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = flags | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            let next = if last { 0 } else { (i + 1) as u16 };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(table_addr + i as u64 * 16))
                .expect("indirect descriptor");
        }
        let id = self.queues[queue].free.pop().expect("free descriptor");
        let table_len = u32::try_from(descs.len() * 16).expect("table length");
        self.write_desc(queue, id, table_addr, table_len, VIRTQ_DESC_F_INDIRECT, 0);
        self.publish(queue, id);
    }

    /// Writes `idx` as the avail ring's index without publishing entries:
    /// a driver claiming chains it never made.
    pub fn set_avail_idx(&mut self, queue: usize, idx: u16) {
        let q = &mut self.queues[queue];
        q.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(q.avail + 2))
            .expect("avail idx");
    }

    /// Guest-physical address of `queue`'s avail ring, for tests that drive
    /// the ring from elsewhere.
    pub fn avail_ring_addr(&self, queue: usize) -> u64 {
        self.queues[queue].avail
    }

    pub fn avail_idx(&self, queue: usize) -> u16 {
        self.queues[queue].avail_idx
    }

    /// Publishes descriptor `id` chained to itself: a descriptor loop.
    pub fn queue_looping_chain(&mut self, queue: usize) {
        let id = self.queues[queue].free.pop().expect("free descriptor");
        let addr = Self::buffer_addr(queue, id);
        self.write_desc(queue, id, addr, 64, VIRTQ_DESC_F_NEXT, id);
        self.publish(queue, id);
    }

    /// Sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on control queue `ctrl`, as
    /// Linux does after probing; returns the ack (0 = OK), None if the
    /// device did not answer within `timeout`.
    pub fn set_queue_pairs(&mut self, ctrl: usize, pairs: u16, timeout: Duration) -> Option<u8> {
        let [low, high] = pairs.to_le_bytes();
        self.send_ctrl(ctrl, &[4, 0, low, high], timeout)
    }

    /// Sends one control command (class, command, data) in one readable
    /// buffer plus the ack byte; returns the ack, None without an answer
    /// within `timeout`.
    pub fn send_ctrl(&mut self, ctrl: usize, command: &[u8], timeout: Duration) -> Option<u8> {
        // Scratch space past the per-queue buffers.
        const CMD: u64 = 0x3f0_0000;
        const ACK: u64 = CMD + 0x1_0000;
        self.mem
            .write_slice(command, GuestAddress(CMD))
            .expect("command");
        self.mem.write_obj(0xffu8, GuestAddress(ACK)).expect("ack");
        let len = u32::try_from(command.len()).expect("command length");
        self.queue_raw_chain(ctrl, &[(CMD, len, 0), (ACK, 1, VIRTQ_DESC_F_WRITE)]);
        // As Linux does: with EVENT_IDX, only when the device asked for it.
        self.kick_if_needed(ctrl);
        let deadline = Instant::now() + timeout;
        let mut used = Vec::new();
        while used.is_empty() && Instant::now() < deadline {
            self.take_used(ctrl, &mut used);
            if used.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if used.is_empty() {
            return None;
        }
        Some(self.mem.read_obj(GuestAddress(ACK)).expect("ack"))
    }

    /// The used ring's entry at index `idx` (mod the ring's size): the
    /// chain's head and the length written.
    pub fn used_entry(&self, queue: usize, idx: u16) -> (u16, u32) {
        let q = &self.queues[queue];
        let at = q.used + 4 + 8 * u64::from(idx % q.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id as u16, len)
    }

    /// The used index the device has published for `queue`.
    pub fn used_idx(&self, queue: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.queues[queue].used + 2))
            .expect("used index")
    }

    /// Notifies the device about `queue`, as the ioeventfd would.
    pub fn kick(&mut self, queue: usize) {
        self.queues[queue].notified_at = self.queues[queue].avail_idx;
        self.transport.queue_events()[queue].write(1).expect("kick");
    }

    /// Notifies the device only if it asked to be (with EVENT_IDX: the
    /// avail_event it published lies among the newly added chains), as the
    /// Linux driver does. Returns whether it kicked.
    pub fn kick_if_needed(&mut self, queue: usize) -> bool {
        let q = &self.queues[queue];
        let (old, new) = (q.notified_at, q.avail_idx);
        if old == new {
            return false;
        }
        let needed = if self.event_idx {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let at = q.used + 4 + u64::from(q.size) * 8;
            let event: u16 = self.mem.read_obj(GuestAddress(at)).expect("avail_event");
            // vring_need_event(): did new pass event since old?
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(q.used)).expect("used flags");
            flags & 1 == 0 // VRING_USED_F_NO_NOTIFY
        };
        if needed {
            self.kick(queue);
        } else {
            self.queues[queue].notified_at = new;
        }
        needed
    }

    /// Takes the used entries the device returned on `queue`, freeing their
    /// descriptors; returns (head id, written length) pairs.
    pub fn take_used(&mut self, queue: usize, out: &mut Vec<(u16, u32)>) {
        let q = &mut self.queues[queue];
        let used_idx: u16 = self
            .mem
            .read_obj(GuestAddress(q.used + 2))
            .expect("used idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        while q.used_seen != used_idx {
            let slot = q.used + 4 + u64::from(q.used_seen % q.size) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used elem");
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used len");
            let id = id as u16;
            // Free the whole chain by following NEXT flags.
            let mut cur = id;
            for _ in 0..q.size {
                q.free.push(cur);
                let flags: u16 = self
                    .mem
                    .read_obj(GuestAddress(q.desc + u64::from(cur) * 16 + 12))
                    .expect("flags");
                let next: u16 = self
                    .mem
                    .read_obj(GuestAddress(q.desc + u64::from(cur) * 16 + 14))
                    .expect("next");
                if flags & VIRTQ_DESC_F_NEXT == 0 || next == cur {
                    break;
                }
                cur = next;
            }
            out.push((id, len));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        if self.event_idx {
            // used_event: interrupt me when you pass what I have seen.
            let at = q.avail + 4 + u64::from(q.size) * 2;
            self.mem
                .write_obj(q.used_seen, GuestAddress(at))
                .expect("used_event");
        }
    }

    /// The frame in RX buffer `id` (without the virtio-net header).
    pub fn rx_frame(&self, queue: usize, id: u16, len: u32, out: &mut Vec<u8>) {
        let len = len as usize;
        assert!(
            len >= NET_HDR_LEN,
            "rx length {len} shorter than the header"
        );
        out.resize(len - NET_HDR_LEN, 0);
        let addr = Self::buffer_addr(queue, id) + NET_HDR_LEN as u64;
        self.mem
            .read_slice(out, GuestAddress(addr))
            .expect("rx frame");
    }

    /// Before sleeping on `queue`'s interrupt, as Linux's driver does
    /// (virtqueue_enable_cb_delayed with `delayed`, else
    /// virtqueue_enable_cb): with EVENT_IDX asks for the interrupt once the
    /// device has used 3/4 of the chains outstanding (`delayed`) or the
    /// next one, then looks at the used index again. True when that many
    /// entries are already there: take them instead of sleeping, since the
    /// device may have decided against an interrupt before it saw the
    /// request.
    pub fn arm_used_interrupt(&mut self, queue: usize, delayed: bool) -> bool {
        let q = &self.queues[queue];
        let outstanding = q.avail_idx.wrapping_sub(q.used_seen);
        let wait_for = if delayed { outstanding * 3 / 4 } else { 0 };
        if self.event_idx {
            let at = q.avail + 4 + u64::from(q.size) * 2;
            self.mem
                .write_obj(q.used_seen.wrapping_add(wait_for), GuestAddress(at))
                .expect("used_event");
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let used_idx: u16 = self
            .mem
            .read_obj(GuestAddress(q.used + 2))
            .expect("used idx");
        used_idx.wrapping_sub(q.used_seen) > wait_for
    }

    /// Waits for the interrupt line; true if it fired within `timeout`.
    pub fn wait_interrupt(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.irq.read().is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.irq),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up: a timeout under 1 ms rounded down to 0 made the
            // wait a busy loop that took a core from the device.
            let ms = deadline
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000)
                .min(100) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    /// Acknowledges interrupt causes as the driver's handler does.
    pub fn ack_interrupt(&mut self) -> u32 {
        let status = read_reg(&mut self.transport, REG_INTERRUPT_STATUS);
        reg(&mut self.transport, REG_INTERRUPT_ACK, status);
        status
    }
}
