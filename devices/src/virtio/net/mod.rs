//! virtio-net: one IO thread per queue pair, each bound to its own backend
//! queue (an AF_XDP socket in xskvm), plus the control queue for
//! multi-queue. vCPU and main threads never touch packets.

mod backend;
mod counters;
mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use backend::NetBackend;
pub use counters::{CountersSnapshot, QueuePairCounters};
pub use worker::NET_HDR_LEN;

#[cfg(any(test, feature = "test-harness"))]
pub mod harness;
#[cfg(test)]
mod tests;

use super::{ActivateResources, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use worker::{ControlQueue, QueuePairWorker};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

const QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// mac(6) status(2) max_virtqueue_pairs(2) mtu(2).
const CONFIG_LEN: usize = 12;

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Names threads (`xskvm-{id}-q{i}`) and log lines, e.g. "net0".
    pub id: String,
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Runs first on every queue pair IO thread (the VMM installs its
    /// seccomp filter there); on error the thread serves nothing.
    pub on_thread_start: Option<ThreadStartHook>,
}

/// A callback run at the start of each IO thread.
#[derive(Clone)]
pub struct ThreadStartHook(pub Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for ThreadStartHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadStartHook")
    }
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<Box<dyn NetBackend>>,
}

pub struct Net {
    config: NetConfig,
    config_space: [u8; CONFIG_LEN],
    queue_max_sizes: Vec<u16>,
    acked_features: u64,
    /// One per queue pair while the device is inactive; moved into the
    /// workers on activation and given back when they stop.
    backends: Vec<Option<Box<dyn NetBackend>>>,
    workers: Vec<(usize, Worker)>,
    counters: Vec<Arc<QueuePairCounters>>,
}

impl Net {
    /// One backend per queue pair; the guest sees as many pairs.
    pub fn new(config: NetConfig, backends: Vec<Box<dyn NetBackend>>) -> Result<Self, VirtioError> {
        let pairs = backends.len();
        let pairs_u16 = u16::try_from(pairs)
            .ok()
            .filter(|&p| (1..=0x8000).contains(&p))
            .ok_or_else(|| VirtioError::Activate(format!("{pairs} queue pairs is out of range")))?;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..6].copy_from_slice(&config.mac);
        config_space[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config_space[8..10].copy_from_slice(&pairs_u16.to_le_bytes());
        config_space[10..12].copy_from_slice(&config.mtu.to_le_bytes());
        let mut queue_max_sizes = vec![QUEUE_SIZE; 2 * pairs];
        queue_max_sizes.push(CTRL_QUEUE_SIZE);
        Ok(Self {
            config,
            config_space,
            queue_max_sizes,
            acked_features: 0,
            backends: backends.into_iter().map(Some).collect(),
            workers: Vec::new(),
            counters: (0..pairs).map(|_| Arc::default()).collect(),
        })
    }

    pub fn queue_pairs(&self) -> usize {
        self.backends.len()
    }

    /// Counters of each queue pair (live: they keep counting).
    pub fn counters(&self) -> &[Arc<QueuePairCounters>] {
        &self.counters
    }

    fn stop_workers(&mut self) {
        for (pair, worker) in self.workers.drain(..) {
            if let Err(e) = worker.stop.write(1) {
                log::error!("{}: cannot stop queue pair {pair}: {e}", self.config.id);
            }
            match worker.thread.join() {
                Ok(backend) => self.backends[pair] = Some(backend),
                Err(_) => log::error!("{}: queue pair {pair} thread panicked", self.config.id),
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_MQ
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config_space.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-era
        // legacy drivers; modern drivers never write here.
        log::debug!("{}: ignoring config write at {offset:#x}", self.config.id);
    }

    fn activate(&mut self, mut resources: ActivateResources) -> Result<(), VirtioError> {
        self.stop_workers();
        let pairs = self.backends.len();
        let mq = self.acked_features & VIRTIO_NET_F_MQ != 0;
        let used_pairs = if mq { pairs } else { 1 };
        let ctrl_index = 2 * pairs;
        let mut queues: Vec<Option<virtio_queue::Queue>> =
            resources.queues.drain(..).map(Some).collect();
        let mut events: Vec<Option<EventFd>> = resources.queue_events.drain(..).map(Some).collect();
        let mut ctrl = match (
            self.acked_features & VIRTIO_NET_F_CTRL_VQ != 0,
            queues.get_mut(ctrl_index).and_then(Option::take),
            events.get_mut(ctrl_index).and_then(Option::take),
        ) {
            (true, Some(queue), Some(event)) if virtio_queue::QueueT::ready(&queue) => {
                Some(ControlQueue {
                    queue,
                    event,
                    max_pairs: pairs as u16,
                })
            }
            _ => None,
        };
        for pair in 0..used_pairs {
            let (rx, tx) = (2 * pair, 2 * pair + 1);
            let taken = (
                queues.get_mut(rx).and_then(Option::take),
                queues.get_mut(tx).and_then(Option::take),
                events.get_mut(rx).and_then(Option::take),
                events.get_mut(tx).and_then(Option::take),
            );
            let (Some(rx), Some(tx), Some(rx_event), Some(tx_event)) = taken else {
                return Err(VirtioError::MissingQueues {
                    needed: 2 * used_pairs,
                    ready: 2 * pair,
                });
            };
            if !virtio_queue::QueueT::ready(&rx) || !virtio_queue::QueueT::ready(&tx) {
                log::warn!(
                    "{}: queue pair {pair} not ready; not served",
                    self.config.id
                );
                continue;
            }
            let Some(backend) = self.backends[pair].take() else {
                continue;
            };
            let stop =
                EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioError::Activate(e.to_string()))?;
            let worker = QueuePairWorker {
                mem: resources.mem.clone(),
                rx,
                tx,
                rx_event,
                tx_event,
                ctrl: if pair == 0 { ctrl.take() } else { None },
                backend,
                interrupt: resources.interrupt.clone(),
                counters: self.counters[pair].clone(),
                stop: stop
                    .try_clone()
                    .map_err(|e| VirtioError::Activate(e.to_string()))?,
            };
            let hook = self.config.on_thread_start.clone();
            let id = self.config.id.clone();
            let thread = std::thread::Builder::new()
                .name(format!("xskvm-{}-q{pair}", self.config.id))
                .spawn(move || {
                    if let Some(Err(e)) = hook.map(|hook| (hook.0)()) {
                        log::error!("{id}: queue pair {pair} not served: {e}");
                        return worker.backend;
                    }
                    worker.run()
                })
                .map_err(|e| VirtioError::Activate(e.to_string()))?;
            self.workers.push((pair, Worker { stop, thread }));
        }
        log::debug!(
            "{}: active with {} queue pair thread(s), features {:#x}",
            self.config.id,
            self.workers.len(),
            self.acked_features
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.acked_features = 0;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
        for (pair, counters) in self.counters.iter().enumerate() {
            log::debug!("{} q{pair}: {}", self.config.id, counters.snapshot());
        }
    }
}
