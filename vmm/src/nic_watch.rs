//! Follows each AF_XDP NIC's host interface over rtnetlink, on a thread of
//! its own (`xskvm-nicwatch`): the interface's carrier goes to the guest as
//! its link state, and when the interface is deleted and created again
//! under the same name, the NIC is opened again and its queue pairs get the
//! new sockets. AF_XDP itself reports none of this (no POLLERR on link
//! down or unregister), so without it a guest would send into a void.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use devices::virtio::net::{DetachedBackend, NetBackend, NetLink};
use net_afxdp::{AfXdpConfig, AfXdpNic, NicInfo, NicOwner, QueueStatsHandle, UmemRegion};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::afxdp::{gather_region, initial_rx_filter, XdpRxFilter, XskBackend};
use crate::seccomp::{self, ThreadKind};

/// Multicast group of link changes (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;

/// The link a guest sees: up when the host interface is (followed by the
/// watcher) and the API has not set it down. Both inputs are kept so
/// that neither overrides the other.
pub struct GuestLink {
    link: NetLink,
    inputs: Mutex<LinkInputs>,
}

#[derive(Debug, Clone, Copy)]
struct LinkInputs {
    host_up: bool,
    admin_up: bool,
}

impl GuestLink {
    pub fn new(link: NetLink) -> Self {
        Self {
            inputs: Mutex::new(LinkInputs {
                host_up: link.is_up(),
                admin_up: true,
            }),
            link,
        }
    }

    pub fn net_link(&self) -> &NetLink {
        &self.link
    }

    /// The host interface's carrier; returns whether it changed.
    pub fn set_host_up(&self, up: bool) -> bool {
        self.update(|inputs| std::mem::replace(&mut inputs.host_up, up) != up)
    }

    /// The API's setting; returns whether it changed.
    pub fn set_admin_up(&self, up: bool) -> bool {
        self.update(|inputs| std::mem::replace(&mut inputs.admin_up, up) != up)
    }

    /// (guest sees it up, host interface up, API setting up).
    pub fn state(&self) -> (bool, bool, bool) {
        let inputs = *self.inputs.lock().unwrap_or_else(PoisonError::into_inner);
        (self.link.is_up(), inputs.host_up, inputs.admin_up)
    }

    fn update(&self, change: impl FnOnce(&mut LinkInputs) -> bool) -> bool {
        // Under the lock, so that two callers cannot apply their states
        // to the device in the opposite order.
        let mut inputs = self.inputs.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = change(&mut inputs);
        self.link.set_up(inputs.host_up && inputs.admin_up);
        changed
    }
}

/// Handles on a NIC's AF_XDP sockets for their kernel statistics; they
/// do not keep the sockets open.
#[derive(Default)]
pub struct XskStats(Mutex<Vec<QueueStatsHandle>>);

impl XskStats {
    pub fn new(handles: Vec<QueueStatsHandle>) -> Self {
        Self(Mutex::new(handles))
    }

    pub fn replace(&self, handles: Vec<QueueStatsHandle>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = handles;
    }

    /// The kernel's statistics of each queue's socket, in queue order;
    /// None for a queue whose socket is gone.
    pub fn kernel(&self) -> Vec<Option<net_afxdp::XdpStatistics>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|h| h.snapshot().kernel)
            .collect()
    }
}

/// How a NIC's sockets and program are set up, as far as the API tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeInfo {
    /// Whether each queue's socket runs zero-copy (else copy mode).
    pub zero_copy: Vec<bool>,
    /// The sockets are bound with `XDP_USE_SG`.
    pub multi_buffer: bool,
    /// How our program is attached ("native", "skb"); None with inhibit=on.
    pub xdp_mode: Option<&'static str>,
}

impl ModeInfo {
    /// As the kernel set the NIC up when it was opened (the bind's
    /// XDP_OPTIONS, the attach that worked, native or skb after a fallback).
    pub fn of(info: &NicInfo) -> Self {
        Self {
            zero_copy: info.zero_copy.clone(),
            multi_buffer: info.multi_buffer,
            xdp_mode: info.attach_mode.map(|m| m.as_str()),
        }
    }
}

/// The NIC's mode now, for the API: set when it is opened, again when it
/// is reopened (which may land in another mode: skb after native, copy
/// after zero-copy), none while its interface is gone.
#[derive(Debug, Default)]
pub struct NicMode(Mutex<Option<ModeInfo>>);

impl NicMode {
    pub fn new(mode: ModeInfo) -> Self {
        Self(Mutex::new(Some(mode)))
    }

    pub fn set(&self, mode: Option<ModeInfo>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    pub fn get(&self) -> Option<ModeInfo> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One NIC as the watcher keeps it.
pub struct WatchedNic {
    /// "net0", for log lines.
    pub id: String,
    /// To open the NIC again after its interface came back.
    pub config: AfXdpConfig,
    /// With `umem=guest`, the region to register again then.
    pub umem: Option<UmemRegion>,
    /// The interface the sockets are bound to; `None` once it is gone.
    pub ifindex: Option<u32>,
    /// Keeps our XDP program attached (dropped when the interface goes).
    pub owner: Option<NicOwner>,
    pub link: Arc<GuestLink>,
    /// Statistics of the NIC's AF_XDP sockets, for the API; follows a reopen.
    pub xsk_stats: Arc<XskStats>,
    /// Its mode, for the API; follows a reopen.
    pub mode: Arc<NicMode>,
    pub mtu: Option<u32>,
    /// Enforces the guest's receive mode in our program (None with
    /// inhibit=on: no program of ours, no filtering).
    pub rx_filter: Option<Arc<XdpRxFilter>>,
    /// False once xskvm gave up the capabilities opening a NIC takes
    /// (`--capabilities none`): a deleted interface cannot be reopened.
    pub can_reopen: bool,
    /// Whether "cannot reopen" was logged (once per NIC is enough).
    pub reopen_refusal_logged: bool,
}

impl WatchedNic {
    /// Logs how many frames the receive filter kept from the guest.
    fn report(&self) {
        if let Some(filter) = self.owner.as_ref().and_then(NicOwner::rx_filter) {
            let filtered: u64 = (0..self.config.queues)
                .map(|q| filter.filtered_frames(self.config.start_queue + q))
                .sum();
            log::debug!(
                "{}: {filtered} frame(s) not for the guest went to the host stack",
                self.id
            );
        }
    }
}

impl WatchedNic {
    /// What to do with one link message from the kernel.
    fn on_link_message(&mut self, message: &LinkMessage, deleted: bool) {
        // The interface's own messages are AF_UNSPEC. A bridge speaks of
        // its ports in AF_BRIDGE ones with the port's index: an RTM_DELLINK
        // there means the port left the bridge, not that it was deleted.
        if message.header.interface_family != AddressFamily::Unspec {
            return;
        }
        let index = message.header.index;
        let name = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        });
        let running = message.header.flags.contains(LinkFlags::Running);
        if Some(index) == self.ifindex {
            if deleted {
                self.forget_interface();
                return;
            }
            if self.link.set_host_up(running) {
                log::warn!(
                    "{}: {} link {}",
                    self.id,
                    self.config.ifname,
                    if running { "up" } else { "down" }
                );
            }
            self.follow_mtu(message);
        } else if self.ifindex.is_none() && !deleted && name == Some(self.config.ifname.as_str()) {
            self.reopen(running);
        }
    }

    /// The interface we opened is gone.
    fn forget_interface(&mut self) {
        self.ifindex = None;
        // Its XDP link went with the interface; close ours.
        if let Some(filter) = &self.rx_filter {
            filter.set_maps(None);
        }
        self.owner = None;
        self.xsk_stats.replace(Vec::new());
        self.mode.set(None);
        self.link.set_host_up(false);
        // Let the dead sockets go (and what they pin: a reopen registers
        // its UMEMs afresh, within the same limit on locked memory).
        let link = self.link.net_link();
        match (0..link.queue_pairs())
            .map(|_| DetachedBackend::new().map(|b| Box::new(b) as Box<dyn NetBackend>))
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(detached) => {
                let _ = link.replace_backends(detached);
            }
            Err(e) => log::warn!(
                "{}: the deleted interface's sockets stay open until it is back: {e}",
                self.id
            ),
        }
        log::warn!(
            "{}: {} was deleted; the guest's link is down until it comes back",
            self.id,
            self.config.ifname
        );
    }

    /// Brings the NIC in line with the interface as it is now, for when
    /// link messages may have been missed: before the watcher listened
    /// (between opening the NIC and starting the watcher) and after the
    /// kernel dropped messages (ENOBUFS). An interface of the same name
    /// with another index is a new one: ours was deleted.
    fn resync(&mut self) {
        let now = net_afxdp::ifindex(&self.config.ifname);
        if self.ifindex.is_some() && now != self.ifindex {
            self.forget_interface();
        }
        let running = carrier(&self.config.ifname);
        match (self.ifindex, now) {
            (Some(_), _) => {
                self.link.set_host_up(running);
            }
            (None, Some(_)) => self.reopen(running),
            (None, None) => {}
        }
    }

    fn follow_mtu(&mut self, message: &LinkMessage) {
        let mtu = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        });
        if mtu.is_some() && mtu != self.mtu {
            if let (Some(old), Some(new)) = (self.mtu, mtu) {
                // The device's MTU is set when xskvm starts and its config
                // space never changes, so the guest cannot follow.
                log::warn!(
                    "{}: {} MTU changed from {old} to {new}; the guest keeps the MTU it was \
                     given at start until xskvm is restarted, and frames longer than the \
                     interface now takes are dropped",
                    self.id,
                    self.config.ifname
                );
            }
            self.mtu = mtu;
        }
    }

    /// The interface came back: open the NIC again and hand each queue
    /// pair its new socket.
    fn reopen(&mut self, running: bool) {
        let refusal = if self.config.sock_fds.is_some() {
            Some("its sockets came from sock-fds= (a privileged helper)")
        } else if !self.can_reopen {
            Some("xskvm dropped the capabilities opening it takes (--capabilities none)")
        } else {
            None
        };
        if let Some(why) = refusal {
            if !std::mem::replace(&mut self.reopen_refusal_logged, true) {
                log::warn!(
                    "{}: {} is back, but {why}: it cannot be attached again; the guest's link \
                     stays down until xskvm is restarted",
                    self.id,
                    self.config.ifname
                );
            }
            return;
        }
        // Deferred fill: the old sockets may still be read until the
        // workers switch (see reopen_on).
        // The new program starts with the guest's receive mode as it is.
        let mut config = self.config.clone();
        config.rx_filter = Some(initial_rx_filter(&self.link.net_link().rx_mode()));
        let nic = match AfXdpNic::reopen_on(&config, self.umem) {
            Ok(nic) => nic,
            Err(e) => {
                // Tried again at every link message of the interface.
                devices::warn_ratelimited!(
                    "{}: {} is back but cannot be opened yet: {e}",
                    self.id,
                    self.config.ifname
                );
                return;
            }
        };
        let (owner, queues) = nic.into_parts();
        let gather_from = match gather_region(&self.config, self.umem, &queues) {
            Ok(region) => region,
            Err(e) => {
                // Tried again at every link message of the interface.
                devices::warn_ratelimited!(
                    "{}: {} is back but cannot be used: {e}",
                    self.id,
                    self.config.ifname
                );
                return;
            }
        };
        let stats = queues.iter().map(|q| q.stats_handle()).collect();
        let backends: Vec<Box<dyn NetBackend>> = queues
            .into_iter()
            .map(|q| Box::new(XskBackend::new(q, gather_from)) as Box<dyn NetBackend>)
            .collect();
        if self.link.net_link().replace_backends(backends).is_err() {
            log::error!("{}: the reopened NIC has another number of queues", self.id);
            return;
        }
        self.xsk_stats.replace(stats);
        self.mode.set(Some(ModeInfo::of(owner.info())));
        self.ifindex = Some(owner.info().ifindex);
        if let (Some(filter), Some(attachment)) = (&self.rx_filter, owner.attachment()) {
            match attachment.program().rx_filter().try_clone() {
                Ok(maps) => {
                    filter.set_maps(Some(maps));
                    // The new program learns the guest's receive mode.
                    self.link.net_link().set_rx_filter(filter.clone());
                }
                Err(e) => log::warn!("{}: no receive filter on the new program: {e}", self.id),
            }
        }
        self.owner = Some(owner);
        self.link.set_host_up(running);
        log::warn!(
            "{}: {} is back (ifindex {}); traffic resumes{}",
            self.id,
            self.config.ifname,
            self.ifindex.unwrap_or(0),
            if running { "" } else { " when its link is up" }
        );
    }
}

/// The watcher thread, or, where rtnetlink cannot be had, just the NICs
/// (their programs stay attached; link changes then go unnoticed).
pub struct NicWatcher {
    stop: Option<EventFd>,
    /// Ends by dropping the NICs (with our XDP programs): on that thread,
    /// whose seccomp filter allows what that takes.
    thread: Option<JoinHandle<()>>,
    unwatched: Vec<WatchedNic>,
    /// Where a thread that could not start watching leaves the NICs, so
    /// that they stay attached until the watcher is dropped.
    handed_back: Arc<Mutex<Option<Vec<WatchedNic>>>>,
}

impl NicWatcher {
    /// Starts watching; the thread installs `filter` (its seccomp filter)
    /// before anything else, and does not watch if it cannot.
    pub fn start(mut nics: Vec<WatchedNic>, filter: Option<Arc<BpfProgram>>) -> Self {
        if nics.is_empty() {
            return Self {
                stop: None,
                thread: None,
                unwatched: nics,
                handed_back: Arc::default(),
            };
        }
        // After the socket, so nothing falls between reading and listening.
        let started = open_socket().and_then(|socket| {
            let stop = EventFd::new(EFD_NONBLOCK)?;
            let theirs = stop.try_clone()?;
            Ok((socket, stop, theirs))
        });
        let (socket, stop, theirs) = match started {
            Ok(parts) => parts,
            Err(e) => {
                log::warn!(
                    "cannot watch the host interfaces (rtnetlink: {e}); link changes go unnoticed"
                );
                for nic in &mut nics {
                    nic.resync();
                }
                return Self {
                    stop: None,
                    thread: None,
                    unwatched: nics,
                    handed_back: Arc::default(),
                };
            }
        };
        for nic in &mut nics {
            nic.resync();
        }
        // The thread gets the NICs only if it starts; a failed spawn drops
        // the closure, so hand them over through a slot we keep.
        let slot = Arc::new(Mutex::new(Some(nics)));
        let their_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("xskvm-nicwatch".into())
            .spawn(move || {
                let nics = their_slot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                if let Err(e) = seccomp::install(ThreadKind::NicWatch, filter.as_deref()) {
                    // Filterless threads are not allowed: this one ends,
                    // handing the NICs back so they stay attached.
                    log::error!("{e}; link changes go unnoticed");
                    *their_slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(nics);
                    return;
                }
                let nics = watch(socket, theirs, nics);
                for nic in &nics {
                    nic.report();
                }
            });
        match spawned {
            Ok(thread) => Self {
                stop: Some(stop),
                thread: Some(thread),
                unwatched: Vec::new(),
                handed_back: slot,
            },
            Err(e) => {
                log::warn!("cannot start the interface watcher: {e}; link changes go unnoticed");
                let nics = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                Self {
                    stop: None,
                    thread: None,
                    unwatched: nics,
                    handed_back: Arc::default(),
                }
            }
        }
    }
}

impl Drop for NicWatcher {
    /// Stops the thread; the NICs (and our XDP programs) go with it.
    fn drop(&mut self) {
        if let (Some(stop), Some(thread)) = (self.stop.take(), self.thread.take()) {
            if let Err(e) = stop.write(1) {
                log::error!("cannot stop the interface watcher: {e}");
            }
            if thread.join().is_err() {
                log::error!("the interface watcher panicked");
            }
        }
        self.unwatched.clear();
        self.handed_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

fn open_socket() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// Whether `ifname` has carrier now (false if it is down or absent). Not
/// from sysfs: a process moved into a namespace with setns still sees the
/// sysfs of the one it came from.
fn carrier(ifname: &str) -> bool {
    net_afxdp::has_carrier(ifname)
}

fn watch(socket: Socket, stop: EventFd, mut nics: Vec<WatchedNic>) -> Vec<WatchedNic> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match crate::wait::until_work_or_stop(socket.as_raw_fd(), stop.as_raw_fd()) {
            Ok(false) => {}
            Ok(true) => return nics,
            Err(e) => {
                log::error!("interface watcher: poll: {e}; link changes go unnoticed");
                return nics;
            }
        }
        loop {
            let len = match socket.recv(&mut &mut buf[..], 0) {
                Ok(len) => len,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ENOBUFS: we fell behind and lost messages; read the
                    // carrier directly so no state is stale.
                    log::warn!("interface watcher: {e}; rereading link states");
                    for nic in &mut nics {
                        nic.resync();
                    }
                    break;
                }
            };
            handle_datagram(&buf[..len.min(buf.len())], &mut nics);
        }
    }
}

/// Applies every link message in one netlink datagram.
fn handle_datagram(mut data: &[u8], nics: &mut [WatchedNic]) {
    while !data.is_empty() {
        // nlmsg_len, the message's first field: what to skip when its
        // payload cannot be parsed.
        let len = data
            .get(..4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .max(16);
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data);
        // Messages are 4-byte aligned in a datagram.
        data = data.get(len.next_multiple_of(4)..).unwrap_or_default();
        let message = match parsed {
            Ok(message) => message,
            Err(e) => {
                // One message the crate cannot read must not hide the
                // others of the datagram.
                devices::warn_ratelimited!("interface watcher: a link message skipped: {e}");
                continue;
            }
        };
        let (link, deleted) = match &message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => (m, false),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => (m, true),
            _ => continue,
        };
        for nic in nics.iter_mut() {
            nic.on_link_message(link, deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::net::{Net, NetConfig};

    /// A watched NIC on interface 7 (`xs0`) with a mode to report.
    fn watched_nic() -> (WatchedNic, Arc<NicMode>) {
        watched_nic_on("xs0", 7)
    }

    /// A one-pair device on `backend`.
    fn net_on(backend: Box<dyn NetBackend>) -> Net {
        Net::new(
            NetConfig {
                id: "net0".into(),
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
                spoof_check: true,
                on_thread_start: None,
            },
            vec![backend],
        )
        .unwrap()
    }

    fn watched_nic_on(ifname: &str, ifindex: u32) -> (WatchedNic, Arc<NicMode>) {
        let net = net_on(Box::new(DetachedBackend::new().expect("eventfd")));
        let mode = Arc::new(NicMode::new(ModeInfo {
            zero_copy: vec![true],
            multi_buffer: false,
            xdp_mode: Some("native"),
        }));
        let nic = WatchedNic {
            id: "net0".into(),
            config: format!("ifname={ifname}").parse().unwrap(),
            umem: None,
            ifindex: Some(ifindex),
            owner: None,
            link: Arc::new(GuestLink::new(net.link())),
            xsk_stats: Arc::default(),
            mode: mode.clone(),
            mtu: Some(1500),
            rx_filter: None,
            can_reopen: false,
            reopen_refusal_logged: false,
        };
        (nic, mode)
    }

    #[test]
    fn a_deleted_interface_leaves_no_mode_to_report() {
        let (mut nic, mode) = watched_nic();
        let mut message = LinkMessage::default();
        message.header.index = 8;
        nic.on_link_message(&message, true);
        assert!(mode.get().is_some(), "another interface went");
        message.header.index = 7;
        nic.on_link_message(&message, true);
        assert_eq!(mode.get(), None);
        assert_eq!(nic.ifindex, None);
    }

    /// A backend that says when it is dropped (its sockets closed).
    struct DropWitness(EventFd, Arc<std::sync::atomic::AtomicBool>);

    impl devices::virtio::net::NetBackend for DropWitness {
        fn fd(&self) -> std::os::fd::RawFd {
            std::os::fd::AsRawFd::as_raw_fd(&self.0)
        }
        fn receive(&mut self, _deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
            0
        }
        fn transmit(
            &mut self,
            _fill: &mut dyn FnMut(&mut [u8]) -> Option<devices::virtio::net::TxFrame>,
        ) -> (usize, bool) {
            (0, false)
        }
    }

    impl Drop for DropWitness {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Regression: the sockets of a deleted interface stayed open (and
    /// their UMEMs pinned, guest RAM with `umem=guest`) until it came
    /// back, when the new ones had to be registered beside them, so a
    /// limit on locked memory that fits one set made every reopen fail.
    #[test]
    fn a_deleted_interfaces_sockets_are_let_go() {
        use devices::virtio::net::harness::DriverHarness;
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let net = net_on(Box::new(DropWitness(
            EventFd::new(0).unwrap(),
            dropped.clone(),
        )));
        let (mut nic, _mode) = watched_nic();
        nic.link = Arc::new(GuestLink::new(net.link()));
        let mut harness = DriverHarness::new(net);
        harness.start(devices::virtio::VIRTIO_F_VERSION_1, 2, 256);
        let mut message = LinkMessage::default();
        message.header.index = 7;
        nic.on_link_message(&message, true);
        assert_eq!(nic.ifindex, None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !dropped.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            dropped.load(std::sync::atomic::Ordering::SeqCst),
            "the old backend is still held"
        );
    }

    #[test]
    fn a_message_that_cannot_be_parsed_does_not_hide_the_next() {
        let (mut nic, mode) = watched_nic();
        // RTM_NEWLINK (16) whose 4-byte body is too short for an ifinfomsg.
        let mut data = Vec::new();
        data.extend_from_slice(&20u32.to_ne_bytes());
        data.extend_from_slice(&16u16.to_ne_bytes());
        data.extend_from_slice(&[0; 10]);
        data.extend_from_slice(&[1, 2, 3, 4]);
        let mut gone = LinkMessage::default();
        gone.header.index = 7;
        let mut message = NetlinkMessage::from(RouteNetlinkMessage::DelLink(gone));
        message.finalize();
        let mut buf = vec![0u8; message.buffer_len()];
        message.serialize(&mut buf);
        data.extend_from_slice(&buf);
        handle_datagram(&data, std::slice::from_mut(&mut nic));
        assert_eq!(nic.ifindex, None, "the deletion after it was lost");
        assert_eq!(mode.get(), None);
    }

    #[test]
    fn a_bridge_port_leaving_its_bridge_is_not_a_deleted_interface() {
        // `ip link set xs0 nomaster`: the bridge announces the port's
        // removal as an AF_BRIDGE RTM_DELLINK with the port's own index.
        let (mut nic, mode) = watched_nic();
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.header.interface_family = AddressFamily::Bridge;
        nic.on_link_message(&message, true);
        assert_eq!(nic.ifindex, Some(7), "the interface is still there");
        assert!(mode.get().is_some());
        // Nor does the bridge's view of the port say anything of its link.
        nic.link.set_host_up(true);
        nic.on_link_message(&message, false);
        assert!(
            nic.link.state().1,
            "a bridge port message took the link down"
        );
    }

    /// A veth pair in a namespace of its own (root only).
    fn veth_pair() -> net_afxdp::testbed::VethPair {
        net_afxdp::testbed::VethPair::for_test(1)
    }

    #[test]
    fn carrier_is_read_in_the_threads_own_namespace() {
        // xskvm started with `nsenter --net` (or setns) keeps the sysfs of
        // the namespace it came from, where the interface is not.
        let pair = veth_pair();
        assert!(
            pair.run(|| carrier(&pair.a)).unwrap(),
            "a veth end that is up"
        );
        pair.ip(&["link", "set", &pair.b, "down"]).unwrap();
        assert!(!pair.run(|| carrier(&pair.a)).unwrap(), "its peer is down");
        assert!(
            !pair.run(|| carrier("xskvm-none0")).unwrap(),
            "no such interface"
        );
    }

    #[test]
    fn an_interface_recreated_while_nobody_listened_is_a_new_one() {
        // Deleted and made again between opening the NIC and starting the
        // watcher (or while the kernel dropped our messages): same name,
        // another index. The NIC must not stay bound to the old one while
        // the new one's carrier raises the guest's link.
        let pair = veth_pair();
        let index = pair
            .run(|| net_afxdp::ifindex(&pair.a))
            .unwrap()
            .expect("ifindex");
        let (mut nic, mode) = watched_nic_on(&pair.a, index + 1000);
        pair.run(|| nic.resync()).unwrap();
        assert_eq!(nic.ifindex, None, "the old interface is gone");
        assert_eq!(mode.get(), None);
        assert!(!nic.link.state().1, "the link rose on another interface");
        // The same interface: its carrier is read.
        let (mut nic, mode) = watched_nic_on(&pair.a, index);
        nic.link.set_host_up(false);
        pair.run(|| nic.resync()).unwrap();
        assert_eq!(nic.ifindex, Some(index));
        assert!(mode.get().is_some());
        assert!(nic.link.state().1, "carrier");
    }

    #[test]
    fn nics_stay_until_the_watcher_goes_when_its_filter_cannot_be_installed() {
        let (nic, mode) = watched_nic();
        // An empty program: installing it fails.
        let filter = Arc::new(BpfProgram::new());
        let watcher = NicWatcher::start(vec![nic], Some(filter));
        let thread = watcher.thread.as_ref().expect("a watcher thread");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(thread.is_finished(), "the thread should have given up");
        assert_eq!(
            Arc::strong_count(&mode),
            2,
            "the NIC (and its program) went"
        );
        drop(watcher);
        assert_eq!(Arc::strong_count(&mode), 1);
    }

    #[test]
    fn what_the_kernel_says_when_a_port_leaves_its_bridge_keeps_the_nic() {
        let pair = veth_pair();
        let bridge = format!("br{}", &pair.a[2..]);
        let (socket, ifindex) = pair
            .run(|| (open_socket(), net_afxdp::ifindex(&pair.a)))
            .expect("in the pair's namespace");
        let socket = socket.expect("rtnetlink socket");
        let ifindex = ifindex.expect("ifindex");
        pair.ip(&["link", "add", &bridge, "type", "bridge"])
            .unwrap();
        pair.ip(&["link", "set", &pair.a, "master", &bridge])
            .unwrap();
        pair.ip(&["link", "set", &pair.a, "nomaster"]).unwrap();
        pair.ip(&["link", "del", &bridge]).unwrap();
        let (nic, mode) = watched_nic_on(&pair.a, ifindex);
        nic.link.set_host_up(true);
        let mut nics = vec![nic];
        let mut buf = vec![0u8; 64 * 1024];
        let mut datagrams = 0;
        while let Ok(len) = socket.recv(&mut &mut buf[..], 0) {
            handle_datagram(&buf[..len], &mut nics);
            datagrams += 1;
        }
        assert!(datagrams > 0, "the kernel said nothing");
        assert_eq!(
            nics[0].ifindex,
            Some(ifindex),
            "the port was taken for deleted"
        );
        assert!(mode.get().is_some());
        assert!(nics[0].link.state().1, "the port's link went down");
    }
}
