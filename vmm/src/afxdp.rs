//! Connects virtio-net queue pairs to AF_XDP sockets: opens a NIC with
//! net-afxdp and adapts each of its queues to [`NetBackend`].

use std::os::fd::RawFd;

use std::sync::{Mutex, PoisonError};

use devices::virtio::net::{
    GatherFill, NetBackend, NetConfig, RxFilterSink, RxMode, TxFrame, TxPieces,
};
use net_afxdp::{
    AfXdpConfig, AfXdpNic, GatherLimits, GatherPieces, GatherRequest, RxFilter, RxFilterConfig,
    RxFilterMaps, TxRequest, UmemRegion, XskQueue, LINK_HEADER_LEN,
};

use crate::net::{MacAddr, NetSpec};
use crate::vm::{NetDevice, NetHost};

/// Frames moved per call: bounds the time one queue spends before the
/// worker looks at its other events again.
const RX_BATCH: usize = 64;
const TX_BATCH: usize = 64;

/// One AF_XDP socket serving one virtio-net queue pair.
pub struct XskBackend {
    queue: XskQueue,
    /// `tx-gather=on`: where guest memory (the UMEM's start) lies in this
    /// process, and what the pieces of a frame sent from it may be.
    gather: Option<(usize, GatherLimits)>,
}

impl XskBackend {
    /// `gather_from`: with `tx-gather=on`, the region the queue's UMEM was
    /// registered on, which frames are then sent from.
    pub fn new(queue: XskQueue, gather_from: Option<UmemRegion>) -> Self {
        let gather = gather_from
            .zip(queue.gather_piece_limits())
            .map(|(region, limits)| (region.as_ptr() as usize, limits));
        Self { queue, gather }
    }
}

/// The device's guest-memory pieces as UMEM offsets, refused exactly where
/// the queue would refuse them (so the device copies such a frame instead).
struct UmemPieces<'a> {
    pieces: &'a mut GatherPieces,
    base: usize,
    limits: GatherLimits,
}

impl TxPieces for UmemPieces<'_> {
    fn push(&mut self, addr: usize, len: usize) -> bool {
        let (Some(offset), Ok(len)) = (addr.checked_sub(self.base), u32::try_from(len)) else {
            return false;
        };
        let offset = offset as u64;
        // Every frame the device gathers has a head in front.
        self.pieces.len() < self.limits.max_pieces
            && self.limits.piece_ok(offset, len)
            && self.pieces.push(offset, len)
    }

    fn clear(&mut self) {
        self.pieces.clear();
    }
}

impl NetBackend for XskBackend {
    fn fd(&self) -> RawFd {
        self.queue.fd()
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        self.queue.rx_batch(RX_BATCH, deliver)
    }

    fn transmit(&mut self, fill: &mut dyn FnMut(&mut [u8]) -> Option<TxFrame>) -> (usize, bool) {
        if self.queue.tx_kick_pending() {
            self.queue.kick_tx();
        }
        let batch = self.queue.tx_batch(TX_BATCH, |buf| {
            fill(buf).map(|frame| TxRequest {
                len: frame.len,
                csum: frame.csum.map(|c| (c.start, c.offset)),
            })
        });
        // Frames still waiting for a kick count as "no room": the worker
        // then waits for the socket to turn writable and tries again.
        (batch.sent, batch.out_of_room || batch.kick_pending)
    }

    fn tx_checksum_offload(&self) -> bool {
        self.queue.tx_checksum()
    }

    fn tx_checksum_reach(&self) -> usize {
        self.queue.tx_checksum_reach()
    }

    fn tx_gather_max_pieces(&self) -> usize {
        self.gather.map_or(0, |(_, limits)| limits.max_pieces)
    }

    fn disarm_unsent_gathers(&mut self) -> usize {
        let n = self.queue.disarm_unsent_gathers();
        if n > 0 {
            // A guest triggers this with every reset: rate-limited.
            devices::log_ratelimited!(
                log::Level::Debug,
                "af-xdp queue {}: {n} frame(s) from guest memory still unsent, made to read none",
                self.queue.queue_id()
            );
        }
        n
    }

    fn tx_gather_piece_max(&self) -> Option<usize> {
        self.gather.map(|(_, limits)| limits.max_len as usize)
    }

    fn transmit_gather(&mut self, fill: &mut GatherFill<'_>) -> (usize, bool) {
        let Some((base, limits)) = self.gather else {
            return (0, false);
        };
        if self.queue.tx_kick_pending() {
            self.queue.kick_tx();
        }
        let batch = self.queue.tx_gather(TX_BATCH, |head, pieces| {
            let mut pieces = UmemPieces {
                pieces,
                base,
                limits,
            };
            fill(head, &mut pieces).map(|frame| GatherRequest {
                head_len: frame.head_len,
                csum: frame.csum.map(|c| (c.start, c.offset)),
                token: frame.token,
            })
        });
        (batch.sent, batch.out_of_room || batch.kick_pending)
    }

    fn take_completed(&mut self, done: &mut dyn FnMut(u64)) -> usize {
        self.queue.take_completed(done)
    }

    fn report(&self) -> Option<String> {
        let k = self.queue.xdp_statistics().ok()?;
        Some(format!(
            "AF_XDP queue {}: kernel drops: {} (no fill-ring buffer or too long), {} (rx ring \
             full); fill ring found empty {} times; invalid rx/tx descriptors {}/{}",
            self.queue.queue_id(),
            k.rx_dropped,
            k.rx_ring_full,
            k.rx_fill_ring_empty_descs,
            k.rx_invalid_descs,
            k.tx_invalid_descs
        ))
    }
}

// The device's MAC table and the program's must hold the same number.
const _: () = assert!(devices::virtio::net::MAC_TABLE_MAX == net_afxdp::RX_FILTER_TABLE_MAX);

/// Enforces a guest's receive mode (its MAC, promiscuous and all-multicast
/// modes, its MAC table) in our XDP program: frames it should not see go
/// to the host stack instead of its socket.
pub struct XdpRxFilter {
    id: String,
    /// The maps of the program now attached; replaced when the NIC is
    /// opened again, `None` while its interface is gone.
    maps: Mutex<Option<RxFilterMaps>>,
}

impl XdpRxFilter {
    pub fn new(id: String, maps: Option<RxFilterMaps>) -> Self {
        Self {
            id,
            maps: Mutex::new(maps),
        }
    }

    pub fn set_maps(&self, maps: Option<RxFilterMaps>) {
        *self.maps.lock().unwrap_or_else(PoisonError::into_inner) = maps;
    }

    /// Frames the filter kept from the guest on device queue `queue` and
    /// passed to the host stack, since our program was attached; None
    /// while the interface is gone.
    pub fn filtered_frames(&self, queue: u32) -> Option<u64> {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.as_ref().map(|maps| maps.filtered_frames(queue))
    }
}

/// The program's filter config for a guest's receive mode (its MAC table
/// goes with it).
fn filter_config(mode: &RxMode) -> RxFilterConfig {
    RxFilterConfig {
        mac: mode.mac,
        enabled: 1,
        promisc: u8::from(mode.promisc || mode.unicast_overflow),
        all_multi: u8::from(mode.all_multi || mode.multicast_overflow),
        multicast_by_table: u8::from(mode.multicast_by_table),
        pad: [0; 2],
    }
}

/// The filter a NIC's program starts with, so that its sockets never get
/// more than `mode` lets the guest see (opening the NIC writes it before
/// the sockets enter the XSKMAP).
pub fn initial_rx_filter(mode: &RxMode) -> RxFilter {
    RxFilter {
        config: filter_config(mode),
        table: mode.table().to_vec(),
    }
}

impl RxFilterSink for XdpRxFilter {
    fn apply(&self, mode: &RxMode) {
        let config = filter_config(mode);
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(maps) = maps.as_ref() {
            if let Err(e) = maps.set(&config, mode.table()) {
                devices::warn_ratelimited!("{}: cannot set the receive filter: {e}", self.id);
            }
        }
    }
}

fn parse_config(spec: &NetSpec) -> Result<AfXdpConfig, crate::VmmError> {
    spec.backend_config()
        .map_err(|e| crate::VmmError::Net(e.to_string()))
}

/// Refuses two `--net` that would both attach xskvm's program to one
/// interface (the second would find the first's there), before any NIC is
/// opened. With `inhibit=on` (sockets for someone else's program, e.g. at
/// `map-path=`) several NICs may share an interface on other queues.
pub fn check_one_nic_per_interface(specs: &[NetSpec]) -> Result<(), crate::VmmError> {
    let configs = specs
        .iter()
        .map(parse_config)
        .collect::<Result<Vec<_>, _>>()?;
    for (later, config) in configs.iter().enumerate() {
        let earlier = configs[..later]
            .iter()
            .position(|c| c.ifname == config.ifname && !c.inhibit && !config.inhibit);
        if let Some(earlier) = earlier {
            return Err(crate::VmmError::Net(format!(
                "--net {later}: ifname={} is already --net {earlier}'s: one NIC per interface \
                 (queues=N gives it more queue pairs)",
                config.ifname
            )));
        }
    }
    Ok(())
}

/// Bytes a `--net` needs after guest RAM for its queues' frames: those of
/// its UMEMs with `umem=guest`, else 0 (its queues map their own).
pub fn guest_umem_area(spec: &NetSpec) -> Result<u64, crate::VmmError> {
    let config = parse_config(spec)?;
    Ok(if config.guest_umem {
        config.queue_umem_bytes()
    } else {
        0
    })
}

/// With `tx-gather=on`, the region the queues send guest frames from as
/// they lie there. Only in copy mode: zero-copy drivers would need pieces
/// cut where guest pages stop being DMA-contiguous and at the driver's
/// segment limit, which nothing here can check yet.
pub fn gather_region(
    config: &AfXdpConfig,
    umem: Option<UmemRegion>,
    queues: &[XskQueue],
) -> Result<Option<UmemRegion>, String> {
    if !config.tx_gather {
        return Ok(None);
    }
    if queues.iter().any(|q| q.gather_piece_limits().is_none()) {
        return Err(format!(
            "af-xdp: tx-gather=on needs multi-buffer AF_XDP sockets (XDP_USE_SG, Linux 6.6+), \
             and {}'s are not",
            config.ifname
        ));
    }
    if queues.iter().any(XskQueue::is_zero_copy) {
        return Err(format!(
            "af-xdp: tx-gather=on works in copy mode only for now, and {} runs zero-copy: \
             add force-copy=on, or leave tx-gather off",
            config.ifname
        ));
    }
    Ok(umem)
}

/// Opens the host side of `--net` number `index` and describes the device.
/// `umem`: the region its sockets register with `umem=guest` (guest RAM
/// and its queues' area).
pub fn open_net_device(
    index: usize,
    spec: &NetSpec,
    umem: Option<UmemRegion>,
) -> Result<NetDevice, crate::VmmError> {
    let mac = spec.mac.unwrap_or_else(|| MacAddr::generate(index));
    let mut config = parse_config(spec)?;
    config.rx_filter = Some(initial_rx_filter(&RxMode::default_for(mac.0)));
    let nic = AfXdpNic::open_on(&config, umem).map_err(|e| crate::VmmError::Net(e.to_string()))?;
    let (owner, queues) = nic.into_parts();
    let interface_mtu_now = owner.info().mtu;
    // The guest gets the interface's MTU, as far as the sockets carry it
    // (one UMEM frame without multi-buffer).
    let mtu_limit = owner
        .info()
        .max_frame
        .saturating_sub(LINK_HEADER_LEN)
        .min(u32::from(u16::MAX));
    let mtu = interface_mtu_now.unwrap_or(1500).min(mtu_limit);
    if interface_mtu_now.is_some_and(|m| m > mtu_limit) {
        log::warn!(
            "net{index}: {} has MTU {}, but its AF_XDP sockets carry frames of at most {} \
             bytes{}: the guest gets MTU {mtu}",
            config.ifname,
            interface_mtu_now.unwrap_or(0),
            owner.info().max_frame,
            if owner.info().multi_buffer {
                ""
            } else {
                " (no multi-buffer)"
            }
        );
    }
    let gather_from = gather_region(&config, umem, &queues).map_err(crate::VmmError::Net)?;
    let xsk_stats = queues.iter().map(XskQueue::stats_handle).collect();
    let id = format!("net{index}");
    log::info!(
        "{id}: af-xdp on {} queues {:?} ({}), MAC {mac}, MTU {mtu}{}",
        config.ifname,
        owner.info().queue_ids,
        owner
            .info()
            .attach_mode
            .map_or("no program: inhibit=on".to_string(), |m| format!("{m} XDP")),
        match (config.guest_umem, config.tx_gather) {
            (true, true) => {
                ", guest memory registered as the UMEM (umem=guest), frames sent from it \
                 (tx-gather=on), received by copy"
            }
            (true, false) => ", guest memory registered as the UMEM (umem=guest), frames copied",
            _ => "",
        }
    );
    Ok(NetDevice {
        config: NetConfig {
            id,
            mac: mac.0,
            mtu: mtu as u16,
            spoof_check: spec.spoof_check,
            on_thread_start: None,
        },
        backends: queues
            .into_iter()
            .map(|queue| Box::new(XskBackend::new(queue, gather_from)) as Box<dyn NetBackend>)
            .collect(),
        host: NetHost {
            umem,
            af_xdp: config,
            owner,
            mtu: interface_mtu_now,
            xsk_stats,
        },
    })
}

#[cfg(test)]
#[path = "afxdp_tests.rs"]
mod tests;
