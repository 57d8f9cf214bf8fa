//! The IO thread of one queue pair: moves frames between the guest's RX/TX
//! virtqueues and a [`NetBackend`], many frames per wake-up, one interrupt
//! per batch. Queue pair 0's thread also serves the control queue.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::NetBackend;
use super::counters::{add, QueuePairCounters};
use crate::virtio::{Interrupt, INTERRUPT_USED_RING};

/// `virtio_net_hdr_v1`: what precedes every frame on both queues.
pub const NET_HDR_LEN: usize = 12;
/// Shortest frame worth sending: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// `num_buffers` (offset 10) is 1: each frame fits one buffer chain.
const RX_HEADER: [u8; NET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_CTRL_QUEUE: u64 = 4;
/// How long transmit waits for room before it kicks the backend again.
const TX_RETRY_MS: i32 = 1;

pub(crate) struct ControlQueue {
    pub queue: Queue,
    pub event: EventFd,
    pub max_pairs: u16,
}

pub(crate) struct QueuePairWorker {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_event: EventFd,
    pub tx_event: EventFd,
    pub ctrl: Option<ControlQueue>,
    pub backend: Box<dyn NetBackend>,
    pub interrupt: Arc<Interrupt>,
    pub counters: Arc<QueuePairCounters>,
    pub stop: EventFd,
}

#[derive(Debug)]
enum ChainError {
    /// Descriptors outside guest memory, or the wrong direction.
    Bad,
    /// The frame does not fit (TX: the host buffer; RX: the guest chain).
    TooBig,
    /// Not even an Ethernet header.
    Runt,
}

impl QueuePairWorker {
    /// Serves the queues until `stop` is signalled; returns the backend so
    /// that a reset device can start again.
    pub fn run(mut self) -> Box<dyn NetBackend> {
        if let Err(e) = self.event_loop() {
            log::error!("virtio-net worker stopped: {e}");
        }
        self.backend
    }

    fn event_loop(&mut self) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let add_fd = |fd: i32, token: u64, events: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add_fd(self.rx_event.as_raw_fd(), TOKEN_RX_QUEUE, EventSet::IN)?;
        add_fd(self.tx_event.as_raw_fd(), TOKEN_TX_QUEUE, EventSet::IN)?;
        add_fd(self.stop.as_raw_fd(), TOKEN_STOP, EventSet::IN)?;
        add_fd(self.backend.fd(), TOKEN_BACKEND, EventSet::IN)?;
        if let Some(ctrl) = &self.ctrl {
            add_fd(ctrl.event.as_raw_fd(), TOKEN_CTRL_QUEUE, EventSet::IN)?;
        }
        // Backend interest: IN unless the guest has no RX buffers (the frames
        // wait and we would spin), OUT only while transmit is out of room.
        let mut rx_waiting_for_buffers = false;
        let mut tx_waiting_for_room = false;
        let mut interest = EventSet::IN;

        // Frames or chains may already be waiting from before activation.
        self.process_tx(&mut tx_waiting_for_room);
        self.process_rx(&mut rx_waiting_for_buffers);

        let mut events = [EpollEvent::default(); 8];
        loop {
            // While transmit is out of room, also retry on a short timer: in
            // copy mode the kernel only moves the AF_XDP TX ring when kicked,
            // and a kick refused as busy is not always followed by POLLOUT.
            let timeout = if tx_waiting_for_room { TX_RETRY_MS } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 && tx_waiting_for_room {
                add(&self.counters.tx_retries, 1);
                tx_waiting_for_room = false;
                self.process_tx(&mut tx_waiting_for_room);
            }
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_TX_QUEUE => {
                        let _ = self.tx_event.read();
                        add(&self.counters.tx_notifications, 1);
                        if !tx_waiting_for_room {
                            self.process_tx(&mut tx_waiting_for_room);
                        }
                    }
                    TOKEN_RX_QUEUE => {
                        let _ = self.rx_event.read();
                        add(&self.counters.rx_notifications, 1);
                        rx_waiting_for_buffers = false;
                        self.process_rx(&mut rx_waiting_for_buffers);
                    }
                    TOKEN_BACKEND => {
                        let ready = event.event_set();
                        if ready.contains(EventSet::OUT) {
                            tx_waiting_for_room = false;
                            self.process_tx(&mut tx_waiting_for_room);
                        }
                        if ready.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP)
                            && !rx_waiting_for_buffers
                        {
                            self.process_rx(&mut rx_waiting_for_buffers);
                        }
                    }
                    TOKEN_CTRL_QUEUE => {
                        if let Some(ctrl) = &self.ctrl {
                            let _ = ctrl.event.read();
                        }
                        self.process_ctrl();
                    }
                    _ => {}
                }
            }
            let mut wanted = EventSet::empty();
            if !rx_waiting_for_buffers {
                wanted |= EventSet::IN;
            }
            if tx_waiting_for_room {
                wanted |= EventSet::OUT;
            }
            if wanted != interest {
                epoll.ctl(
                    ControlOperation::Modify,
                    self.backend.fd(),
                    EpollEvent::new(wanted, TOKEN_BACKEND),
                )?;
                interest = wanted;
            }
        }
    }

    /// Drains every available TX chain into the backend, in batches.
    fn process_tx(&mut self, waiting_for_room: &mut bool) {
        let Self {
            mem,
            tx,
            backend,
            counters,
            ..
        } = self;
        loop {
            if let Err(e) = tx.disable_notification(mem) {
                log::warn!("virtio-net: tx queue unusable: {e:?}");
                return;
            }
            let mut bytes = 0u64;
            let (sent, out_of_room) = backend.transmit(&mut |buf: &mut [u8]| loop {
                let chain = tx.pop_descriptor_chain(&*mem)?;
                let head = chain.head_index();
                let result = copy_tx_chain(mem, chain, buf);
                if let Err(e) = tx.add_used(&*mem, head, 0) {
                    log::warn!("virtio-net: cannot return a tx buffer: {e:?}");
                }
                match result {
                    Ok(len) => {
                        bytes += len as u64;
                        return Some(len);
                    }
                    Err(e) => {
                        log::debug!("virtio-net: tx chain dropped: {e:?}");
                        add(&counters.tx_dropped, 1);
                    }
                }
            });
            if sent > 0 {
                add(&counters.tx_packets, sent as u64);
                add(&counters.tx_bytes, bytes);
                add(&counters.tx_batch_frames, sent as u64);
                add(&counters.tx_batches, 1);
            }
            if out_of_room {
                // Chains stay in the ring; the backend's fd turns writable when
                // there is room, and the guest need not notify meanwhile.
                *waiting_for_room = true;
                add(&counters.tx_ring_full, 1);
                break;
            }
            match tx.enable_notification(mem) {
                Ok(true) => continue, // more chains arrived while we worked
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-net: tx queue unusable: {e:?}");
                    break;
                }
            }
        }
        signal_used(&mut self.tx, &self.mem, &self.interrupt, &self.counters);
    }

    /// Delivers waiting frames into guest RX buffers.
    fn process_rx(&mut self, waiting_for_buffers: &mut bool) {
        let Self {
            mem,
            rx,
            backend,
            counters,
            ..
        } = self;
        let mut delivered_any = false;
        loop {
            let mut no_buffer = false;
            let mut bytes = 0u64;
            let delivered = backend.receive(&mut |frame: &[u8]| {
                let Some(chain) = rx.pop_descriptor_chain(&*mem) else {
                    no_buffer = true;
                    return false;
                };
                let head = chain.head_index();
                let used_len = match write_rx_chain(mem, chain, frame) {
                    Ok(len) => {
                        bytes += frame.len() as u64;
                        len
                    }
                    Err(ChainError::TooBig) => {
                        add(&counters.rx_dropped_too_big, 1);
                        0
                    }
                    Err(_) => {
                        add(&counters.rx_bad_descriptors, 1);
                        0
                    }
                };
                if let Err(e) = rx.add_used(&*mem, head, used_len) {
                    log::warn!("virtio-net: cannot return an rx buffer: {e:?}");
                }
                true
            });
            if delivered > 0 {
                delivered_any = true;
                add(&counters.rx_packets, delivered as u64);
                add(&counters.rx_bytes, bytes);
                add(&counters.rx_batch_frames, delivered as u64);
                add(&counters.rx_batches, 1);
            }
            if !no_buffer {
                break;
            }
            // Out of guest buffers: ask for a notification, then look again
            // in case buffers arrived before the request was visible.
            match rx.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => {
                    *waiting_for_buffers = true;
                    add(&counters.rx_no_buffer_waits, 1);
                    break;
                }
                Err(e) => {
                    log::warn!("virtio-net: rx queue unusable: {e:?}");
                    *waiting_for_buffers = true;
                    break;
                }
            }
        }
        if delivered_any {
            signal_used(&mut self.rx, &self.mem, &self.interrupt, &self.counters);
        }
    }

    fn process_ctrl(&mut self) {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        let mem = &self.mem;
        while let Some(chain) = ctrl.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used = handle_ctrl_chain(mem, chain, ctrl.max_pairs);
            if let Err(e) = ctrl.queue.add_used(mem, head, used) {
                log::warn!("virtio-net: cannot return a control buffer: {e:?}");
            }
        }
        signal_used(&mut ctrl.queue, mem, &self.interrupt, &self.counters);
    }
}

/// Raises the interrupt if the driver wants one (EVENT_IDX decides).
fn signal_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    counters: &QueuePairCounters,
) {
    let needs = queue.needs_notification(mem);
    match needs {
        Ok(true) => {
            if let Err(e) = interrupt.signal(INTERRUPT_USED_RING) {
                log::error!("virtio-net: cannot raise the interrupt: {e}");
            }
            add(&counters.interrupts, 1);
        }
        Ok(false) => {}
        Err(e) => log::warn!("virtio-net: cannot read the notification state: {e:?}"),
    }
}

/// Copies a TX chain's frame (after the virtio-net header) into `buf`.
fn copy_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut skip = NET_HDR_LEN as u64;
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::Bad);
        }
        let mut desc_len = u64::from(desc.len());
        let mut addr = desc.addr();
        let skipped = skip.min(desc_len);
        skip -= skipped;
        desc_len -= skipped;
        addr = addr.checked_add(skipped).ok_or(ChainError::Bad)?;
        if desc_len == 0 {
            continue;
        }
        let end = len
            .checked_add(desc_len as usize)
            .filter(|&end| end <= buf.len())
            .ok_or(ChainError::TooBig)?;
        mem.read_slice(&mut buf[len..end], addr)
            .map_err(|_| ChainError::Bad)?;
        len = end;
    }
    if len < MIN_FRAME_LEN {
        return Err(ChainError::Runt);
    }
    Ok(len)
}

/// Writes the header and `frame` into an RX chain; returns the bytes written.
fn write_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let total = NET_HDR_LEN + frame.len();
    let mut written = 0usize;
    for desc in chain {
        if written == total {
            break;
        }
        if !desc.is_write_only() {
            return Err(ChainError::Bad);
        }
        let room = desc.len() as usize;
        let mut offset = 0usize;
        let mut addr = desc.addr();
        // Header first, possibly split across descriptors.
        if written < NET_HDR_LEN {
            let n = (NET_HDR_LEN - written).min(room);
            mem.write_slice(&RX_HEADER[written..written + n], addr)
                .map_err(|_| ChainError::Bad)?;
            written += n;
            offset += n;
            addr = addr.checked_add(n as u64).ok_or(ChainError::Bad)?;
        }
        if written >= NET_HDR_LEN && offset < room {
            let from = written - NET_HDR_LEN;
            let n = (frame.len() - from).min(room - offset);
            mem.write_slice(&frame[from..from + n], addr)
                .map_err(|_| ChainError::Bad)?;
            written += n;
        }
    }
    if written < total {
        return Err(ChainError::TooBig);
    }
    Ok(total as u32)
}

/// Answers one control command; returns the bytes written (the ack).
fn handle_ctrl_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_pairs: u16,
) -> u32 {
    let mut command = [0u8; 4]; // class, cmd, then up to 2 bytes of data
    let mut command_len = 0usize;
    let mut ack_addr = None;
    for desc in chain {
        if desc.is_write_only() {
            ack_addr.get_or_insert(desc.addr());
            continue;
        }
        let n = (desc.len() as usize).min(command.len() - command_len);
        if n > 0
            && mem
                .read_slice(&mut command[command_len..command_len + n], desc.addr())
                .is_ok()
        {
            command_len += n;
        }
    }
    let status = match (command_len, command[0], command[1]) {
        (4, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
            let pairs = u16::from_le_bytes([command[2], command[3]]);
            // Every pair's thread serves its queues regardless; the guest
            // simply stops using the ones beyond `pairs`.
            if (1..=max_pairs).contains(&pairs) {
                VIRTIO_NET_OK
            } else {
                VIRTIO_NET_ERR
            }
        }
        _ => VIRTIO_NET_ERR,
    };
    match ack_addr {
        Some(addr) if mem.write_obj(status, addr).is_ok() => 1,
        _ => 0,
    }
}
