//! virtio-net: one IO thread per queue pair, each bound to its own backend
//! queue (an AF_XDP socket in xskvm), plus the control queue for
//! multi-queue. vCPU and main threads never touch packets.

mod backend;
mod counters;
mod guest_copy;
mod link;
mod offload;
mod pairs;
mod rx;
mod tx_gather;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use backend::{
    CsumRequest, DetachedBackend, GatherFill, GatherFrame, NetBackend, TxFrame, TxPieces,
};
pub use counters::{CounterValue, CountersSnapshot, QueuePairCounters};
pub use link::{NetLink, RxFilterSink, RxMode, MAC_TABLE_MAX};
pub use worker::NET_HDR_LEN;

#[cfg(test)]
mod gather_tests;
#[cfg(any(test, feature = "test-harness"))]
pub mod harness;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod offload_tests;
#[cfg(test)]
mod tests;

use super::{ActivateResources, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use offload::TxOffloads;
use worker::{ControlQueue, QueuePairWorker, RxState, TxPolicy, TxState};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_NET_F_GUEST_USO4: u64 = 1 << 54;
pub const VIRTIO_NET_F_GUEST_USO6: u64 = 1 << 55;
pub const VIRTIO_NET_F_HOST_USO: u64 = 1 << 56;
/// The receive offloads a driver may switch with
/// VIRTIO_NET_CTRL_GUEST_OFFLOADS: of those, the ones we offer.
const GUEST_OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_GUEST_USO4
    | VIRTIO_NET_F_GUEST_USO6;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

pub(crate) const QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Ethernet header with one VLAN tag: what a frame adds to the MTU.
const ETHERNET_VLAN_HEADER_LEN: usize = 18;
/// mac(6) status(2) max_virtqueue_pairs(2) mtu(2).
const CONFIG_LEN: usize = 12;

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Names threads (`xskvm-{id}-q{i}`) and log lines, e.g. "net0".
    pub id: String,
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Drop (and count) guest frames whose source MAC is not `mac`.
    pub spoof_check: bool,
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
    /// Gives the backend back; `None` only if the thread never got it.
    thread: JoinHandle<Option<Box<dyn NetBackend>>>,
}

/// Hands a backend to a worker thread: if the thread cannot be spawned,
/// the backend is still here and is not lost with the closure.
type BackendHandoff = Arc<Mutex<Option<Box<dyn NetBackend>>>>;

fn take_backend(handoff: &BackendHandoff) -> Option<Box<dyn NetBackend>> {
    handoff
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
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
    /// Pairs the guest uses (see `QueuePairWorker::active_pairs`).
    active_pairs: Arc<pairs::ActivePairs>,
    /// Receive offloads in force (see `QueuePairWorker::guest_offloads`).
    guest_offloads: Arc<AtomicU64>,
    link: Arc<link::LinkState>,
    /// Tests: make spawning this pair's thread fail once.
    #[cfg(test)]
    fail_spawn_at: Option<usize>,
}

impl Net {
    /// One backend per queue pair; the guest sees as many pairs.
    pub fn new(config: NetConfig, backends: Vec<Box<dyn NetBackend>>) -> Result<Self, VirtioError> {
        let pairs = backends.len();
        let pairs_u16 = u16::try_from(pairs)
            .ok()
            .filter(|&p| (1..=0x8000).contains(&p))
            .ok_or_else(|| VirtioError::Activate(format!("{pairs} queue pairs is out of range")))?;
        let mac = config.mac;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..6].copy_from_slice(&mac);
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
            active_pairs: Arc::new(pairs::ActivePairs::new(pairs)),
            guest_offloads: Arc::default(),
            link: Arc::new(link::LinkState::new(pairs, mac)),
            #[cfg(test)]
            fail_spawn_at: None,
        })
    }

    pub fn queue_pairs(&self) -> usize {
        self.backends.len()
    }

    /// The link as the guest sees it, and backend replacement.
    pub fn link(&self) -> NetLink {
        NetLink(self.link.clone())
    }

    /// Counters of each queue pair (live: they keep counting).
    pub fn counters(&self) -> &[Arc<QueuePairCounters>] {
        &self.counters
    }

    /// Stops every worker and takes their backends back.
    fn stop_workers(&mut self) {
        self.link.set_active(None);
        for (pair, worker) in self.workers.drain(..) {
            if let Err(e) = worker.stop.write(1) {
                log::error!("{}: cannot stop queue pair {pair}: {e}", self.config.id);
            }
            match worker.thread.join() {
                Ok(Some(backend)) => self.backends[pair] = Some(backend),
                Ok(None) => {}
                // Workers catch their own panics; this is a panic while
                // unwinding, and the backend went with it.
                Err(_) => log::error!("{}: queue pair {pair} thread died", self.config.id),
            }
        }
    }

    fn spawn_worker(
        &mut self,
        pair: usize,
        worker: impl FnOnce(Box<dyn NetBackend>) -> Box<dyn NetBackend> + Send + 'static,
        handoff: &BackendHandoff,
    ) -> std::io::Result<JoinHandle<Option<Box<dyn NetBackend>>>> {
        #[cfg(test)]
        if self.fail_spawn_at == Some(pair) {
            self.fail_spawn_at = None;
            return Err(std::io::Error::other("spawn failure injected by a test"));
        }
        let theirs = Arc::clone(handoff);
        let hook = self.config.on_thread_start.clone();
        let id = self.config.id.clone();
        std::thread::Builder::new()
            .name(format!("xskvm-{}-q{pair}", self.config.id))
            .spawn(move || {
                // E.g. this thread's seccomp filter: without it, serve nothing.
                if let Some(Err(e)) = hook.map(|hook| (hook.0)()) {
                    log::error!("{id}: queue pair {pair} not served: {e}");
                    return take_backend(&theirs);
                }
                take_backend(&theirs).map(worker)
            })
    }

    /// Starts one worker per queue pair, also for pairs the driver does
    /// not use (their frames are dropped and counted, not left to pile up
    /// unseen). On error the caller stops those already started.
    fn start_workers(&mut self, mut resources: ActivateResources) -> Result<(), VirtioError> {
        let activate_err = |e: std::io::Error| VirtioError::Activate(e.to_string());
        let pairs = self.backends.len();
        let mq = self.acked_features & VIRTIO_NET_F_MQ != 0;
        let used_pairs = if mq { pairs } else { 1 };
        // The control queue follows the pairs the driver knows of: queue 2
        // without MQ, 2 * max_virtqueue_pairs with it (virtio 1.2 5.1.2).
        let ctrl_index = 2 * used_pairs;
        let mut queues: Vec<Option<virtio_queue::Queue>> =
            resources.queues.drain(..).map(Some).collect();
        let mut events: Vec<Option<EventFd>> = resources.queue_events.drain(..).map(Some).collect();
        let mut take = |index: usize| -> std::io::Result<(virtio_queue::Queue, EventFd)> {
            match (
                queues.get_mut(index).and_then(Option::take),
                events.get_mut(index).and_then(Option::take),
            ) {
                (Some(queue), Some(event)) => Ok((queue, event)),
                // Beyond the pairs the driver knows of: a queue that is
                // never ready and an event nobody signals.
                _ => Ok((
                    <virtio_queue::Queue as virtio_queue::QueueT>::new(QUEUE_SIZE)
                        .map_err(|e| std::io::Error::other(format!("{e:?}")))?,
                    EventFd::new(EFD_NONBLOCK)?,
                )),
            }
        };
        let mut ctrl = None;
        if self.acked_features & VIRTIO_NET_F_CTRL_VQ != 0 && ctrl_index < 2 * pairs + 1 {
            let (queue, event) = take(ctrl_index).map_err(activate_err)?;
            if virtio_queue::QueueT::ready(&queue) {
                ctrl = Some(ControlQueue {
                    queue,
                    event,
                    max_pairs: pairs as u16,
                    mq,
                    rx_mode: self.acked_features & VIRTIO_NET_F_CTRL_RX != 0,
                    guest_offloads_allowed: if self.acked_features
                        & VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
                        != 0
                    {
                        self.acked_features & GUEST_OFFLOAD_FEATURES
                    } else {
                        0
                    },
                    wakers: Vec::new(),
                });
            }
        }
        // Until VQ_PAIRS_SET, the driver uses the first pair (5.1.6.5.5).
        self.active_pairs.restart();
        // Every negotiated receive offload is on until the driver says otherwise.
        self.guest_offloads.store(
            self.acked_features & GUEST_OFFLOAD_FEATURES,
            Ordering::Relaxed,
        );
        let acked = |f: u64| self.acked_features & f != 0;
        let mergeable = acked(VIRTIO_NET_F_MRG_RXBUF);
        // Segmentation needs checksumming (virtio 1.2 5.1.3.1).
        let csum = acked(VIRTIO_NET_F_CSUM);
        let tx_offloads = TxOffloads {
            csum,
            tso4: csum && acked(VIRTIO_NET_F_HOST_TSO4),
            tso6: csum && acked(VIRTIO_NET_F_HOST_TSO6),
            ecn: csum && acked(VIRTIO_NET_F_HOST_ECN),
            uso: csum && acked(VIRTIO_NET_F_HOST_USO),
        };
        let wakes = (0..pairs)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(activate_err)?;
        let clone_wakes = || {
            wakes
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(activate_err)
        };
        if let Some(ctrl) = &mut ctrl {
            ctrl.wakers = clone_wakes()?;
        }
        self.link.set_active(Some(link::ActiveLink {
            interrupt: resources.interrupt.clone(),
            wakers: clone_wakes()?,
            status_negotiated: self.acked_features & VIRTIO_NET_F_STATUS != 0,
        }));
        for (pair, wake) in wakes.into_iter().enumerate() {
            let (rx, rx_event) = if pair < used_pairs {
                take(2 * pair).map_err(activate_err)?
            } else {
                take(usize::MAX).map_err(activate_err)?
            };
            let (tx, tx_event) = if pair < used_pairs {
                take(2 * pair + 1).map_err(activate_err)?
            } else {
                take(usize::MAX).map_err(activate_err)?
            };
            if pair < used_pairs
                && (!virtio_queue::QueueT::ready(&rx) || !virtio_queue::QueueT::ready(&tx))
            {
                crate::warn_ratelimited!(
                    "{}: queue pair {pair} not set up by the driver; its frames are dropped",
                    self.config.id
                );
            }
            // A backend for a NIC that came back replaces the old one.
            if let Some(new) = self.link.take_replacement(pair) {
                self.backends[pair] = Some(new);
            }
            let Some(backend) = self.backends[pair].take() else {
                continue;
            };
            let handoff: BackendHandoff = Arc::new(Mutex::new(Some(backend)));
            let started = EventFd::new(EFD_NONBLOCK)
                .and_then(|stop| Ok((stop.try_clone()?, stop)))
                .and_then(|(stop, theirs)| {
                    let mem = resources.mem.clone();
                    let ctrl = if pair == 0 { ctrl.take() } else { None };
                    let interrupt = resources.interrupt.clone();
                    let counters = self.counters[pair].clone();
                    let active_pairs = self.active_pairs.clone();
                    let guest_offloads = self.guest_offloads.clone();
                    let link = self.link.clone();
                    let tx_policy = TxPolicy {
                        mac: self.config.mac,
                        max_frame: usize::from(self.config.mtu) + ETHERNET_VLAN_HEADER_LEN,
                        spoof_check: self.config.spoof_check,
                    };
                    let run = move |backend| {
                        QueuePairWorker {
                            tx_state: TxState::new(tx_offloads, QUEUE_SIZE),
                            rx_state: RxState::new(mergeable),
                            guest_offloads,
                            pair,
                            active_pairs,
                            link,
                            tx_policy,
                            wake,
                            mem,
                            rx,
                            tx,
                            rx_event,
                            tx_event,
                            ctrl,
                            backend,
                            interrupt,
                            counters,
                            stop: theirs,
                        }
                        .run()
                    };
                    let thread = self.spawn_worker(pair, run, &handoff)?;
                    Ok(Worker { stop, thread })
                });
            match started {
                Ok(worker) => self.workers.push((pair, worker)),
                Err(e) => {
                    self.backends[pair] = take_backend(&handoff);
                    return Err(VirtioError::Activate(format!(
                        "queue pair {pair}: cannot start its thread: {e}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The offloads a driver negotiated, for the log: each is done in the
/// queue pairs' IO threads (transmit checksums possibly by the host kernel).
fn describe_offloads(features: u64) -> String {
    const NAMES: [(u64, &str); 11] = [
        (VIRTIO_NET_F_CSUM, "tx-checksum"),
        (VIRTIO_NET_F_HOST_TSO4, "tso4"),
        (VIRTIO_NET_F_HOST_TSO6, "tso6"),
        (VIRTIO_NET_F_HOST_ECN, "tso-ecn"),
        (VIRTIO_NET_F_HOST_USO, "uso"),
        (VIRTIO_NET_F_GUEST_CSUM, "rx-checksum"),
        (VIRTIO_NET_F_GUEST_TSO4, "gro4"),
        (VIRTIO_NET_F_GUEST_TSO6, "gro6"),
        (VIRTIO_NET_F_MRG_RXBUF, "mergeable-buffers"),
        (VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "switchable"),
        (
            VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_USO6,
            "takes-uso",
        ),
    ];
    let on: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if on.is_empty() {
        "none (every frame checksummed and segmented by the guest)".to_string()
    } else {
        format!(
            "{} (segmentation, coalescing and receive checksums in the IO threads; transmit \
             checksums there too or by the host kernel, as the start-up log says per queue)",
            on.join(" ")
        )
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
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_HOST_ECN
            | VIRTIO_NET_F_HOST_USO
            | GUEST_OFFLOAD_FEATURES
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_CTRL_RX
            | VIRTIO_NET_F_MQ
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = self.config_space;
        let status = if self.link.is_up() {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn config_generation(&self) -> u32 {
        self.link.generation()
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-era
        // legacy drivers; modern drivers never write here.
        // The guest chooses how often: rate-limited.
        crate::log_ratelimited!(
            log::Level::Debug,
            "{}: ignoring config write at {offset:#x}",
            self.config.id
        );
    }

    fn activate(&mut self, resources: ActivateResources) -> Result<(), VirtioError> {
        self.stop_workers();
        if let Err(e) = self.start_workers(resources) {
            // Nothing half-started: every pair's backend is back in place
            // for the next activation after the driver resets the device.
            self.stop_workers();
            return Err(e);
        }
        log::debug!(
            "{}: active with {} queue pair thread(s), features {:#x}",
            self.config.id,
            self.workers.len(),
            self.acked_features
        );
        log::info!(
            "{}: guest offloads: {}",
            self.config.id,
            describe_offloads(self.acked_features)
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.link.reset_rx_mode();
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
