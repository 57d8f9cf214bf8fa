//! Opening a NIC: checks, the XDP program, one socket per queue.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::config::{AfXdpConfig, XdpMode};
use crate::error::{Error, Result, PRIVILEGE_HINT};
use crate::program::{attached_program, RxFilterMaps, XdpAttachment, XdpProgram};
use crate::queue::{GuestUmemSetup, QueueSetup, SharedWith, XskQueue};
use crate::sys;
use crate::umem::UmemRegion;
use crate::xskmap::PinnedXskMap;

/// What was set up, for logs and the VMM's status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    pub ifname: String,
    pub ifindex: u32,
    /// How our program is attached; None with `inhibit=on`.
    pub attach_mode: Option<XdpMode>,
    /// Kernel id of our program (None with `inhibit=on`).
    pub program_id: Option<u32>,
    /// Device queues, one per [`XskQueue`], in order.
    pub queue_ids: Vec<u32>,
    /// Whether each queue runs zero-copy.
    pub zero_copy: Vec<bool>,
    /// The interface's MTU when the NIC was opened (None: unreadable).
    pub mtu: Option<u32>,
    /// Every queue asks the kernel to fill transmit checksums.
    pub tx_checksum: bool,
    /// The sockets are bound with `XDP_USE_SG`: frames longer than one
    /// UMEM frame travel as several descriptors.
    pub multi_buffer: bool,
    /// The sockets share guest memory as their UMEM (`umem=guest`).
    pub guest_umem: bool,
    /// The longest frame (link header included) every queue carries each
    /// way; a device in front should not offer an MTU above this less
    /// [`LINK_HEADER_LEN`].
    pub max_frame: u32,
}

/// Ethernet header plus one VLAN tag: what a frame adds to the MTU.
pub const LINK_HEADER_LEN: u32 = 18;

/// In skb mode, what generic XDP may hand a socket: a whole GSO or GRO
/// packet (a veth peer's 64 KiB TCP segments, a NIC's merged ones), not
/// wire frames. Without multi-buffer (Linux < 6.6) those are lost.
const SKB_MODE_MAX_RX_FRAME: u32 = 65_536 + LINK_HEADER_LEN;

/// Owns the XDP program link of an opened NIC. Dropping it detaches the
/// program (so does the process dying, even by SIGKILL). The queues keep
/// working without it, they just stop receiving.
#[derive(Debug)]
pub struct NicOwner {
    info: NicInfo,
    attachment: Option<XdpAttachment>,
    /// `map-path=`: the foreign XSKMAP holding our sockets; dropping it
    /// takes them out.
    xsk_map: Option<PinnedXskMap>,
    /// `filter-fds=`: the receive filter of the program our adopted
    /// sockets are in (loaded by someone else).
    adopted_filter: Option<RxFilterMaps>,
}

impl NicOwner {
    pub fn info(&self) -> &NicInfo {
        &self.info
    }

    /// The program link, if we attached one.
    pub fn attachment(&self) -> Option<&XdpAttachment> {
        self.attachment.as_ref()
    }

    /// The receive filter of the program the sockets are in: ours, or the
    /// one `filter-fds=` handed over; None when there is neither.
    pub fn rx_filter(&self) -> Option<&RxFilterMaps> {
        match &self.attachment {
            Some(attachment) => Some(attachment.program().rx_filter()),
            None => self.adopted_filter.as_ref(),
        }
    }

    /// The pinned XSKMAP our sockets are in (`map-path=`), if any.
    pub fn map_path(&self) -> Option<&str> {
        self.xsk_map.as_ref().map(PinnedXskMap::path)
    }
}

impl Drop for NicOwner {
    fn drop(&mut self) {
        if self.attachment.take().is_some() {
            log::info!("af-xdp: detached the XDP program from {}", self.info.ifname);
        }
    }
}

/// An opened AF_XDP NIC: the program link and one [`XskQueue`] per queue.
/// Use [`AfXdpNic::into_parts`] to move each queue to its own thread.
#[derive(Debug)]
pub struct AfXdpNic {
    queues: Vec<XskQueue>,
    owner: NicOwner,
}

/// Interface name → index, or the "no such interface" error.
fn resolve(config: &AfXdpConfig) -> Result<u32> {
    let ifindex = sys::ifindex(&config.ifname).ok_or_else(|| Error::NoSuchInterface {
        ifname: config.ifname.clone(),
    })?;
    // Redirecting lo's frames would take the host's own local traffic.
    if sys::is_loopback(&config.ifname) {
        return Err(Error::Loopback {
            ifname: config.ifname.clone(),
        });
    }
    Ok(ifindex)
}

/// Rejects queue ids beyond the device's receive queues.
fn check_queue_range(config: &AfXdpConfig, ifindex: u32) -> Result<()> {
    if let Some(available) = sys::rx_queue_count(&config.ifname, ifindex) {
        if config.start_queue + config.queues > available {
            return Err(Error::QueueOutOfRange {
                ifname: config.ifname.clone(),
                start_queue: config.start_queue,
                queues: config.queues,
                available,
            });
        }
    }
    Ok(())
}

/// A new AF_XDP socket, with the errors a user can act on.
pub(crate) fn new_xsk_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let source = io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            Some(libc::EAFNOSUPPORT) => Error::NoAfXdp,
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                action: "creating an AF_XDP socket (needs CAP_NET_RAW)",
                hint: PRIVILEGE_HINT,
                source,
            },
            _ => Error::Io {
                op: "creating an AF_XDP socket",
                source,
            },
        });
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that every sock-fds entry is an open AF_XDP socket and returns
/// duplicates to work on: the listed fds themselves are closed only once
/// the open succeeded (see [`AfXdpNic::open`]), so an error leaves the
/// caller's descriptors alone.
fn adopt_sock_fds(fds: &[RawFd]) -> Result<Vec<OwnedFd>> {
    for &fd in fds {
        if !sys::fd_is_open(fd) {
            return Err(Error::BadSockFd {
                fd,
                reason: "is not an open file descriptor of this process".to_string(),
            });
        }
        match sys::socket_domain(fd) {
            Ok(libc::AF_XDP) => {}
            Ok(domain) => {
                return Err(Error::BadSockFd {
                    fd,
                    reason: format!(
                        "is a socket of address family {domain}, not AF_XDP ({})",
                        libc::AF_XDP
                    ),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                return Err(Error::BadSockFd {
                    fd,
                    reason: "is not a socket".to_string(),
                })
            }
            Err(e) => {
                return Err(Error::BadSockFd {
                    fd,
                    reason: format!("cannot be inspected: {e}"),
                })
            }
        }
    }
    fds.iter()
        .map(|&fd| {
            // SAFETY: checked open above; borrowed only for the dup.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            borrowed.try_clone_to_owned().map_err(|source| Error::Io {
                op: "duplicating a sock-fds descriptor",
                source,
            })
        })
        .collect()
}

/// Closes the descriptors the options handed over (sock-fds, filter-fds)
/// once the NIC owns duplicates.
fn close_handed_over(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: the option handed these descriptors to us; the NIC works
        // on duplicates, and nothing else here refers to these numbers.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// What the interface asks of the sockets: its MTU, the longest frame
/// that brings, and whether that takes multi-buffer sockets (and the
/// program variant that takes frames in pieces), which Linux has from 6.6.
fn frame_plan(config: &AfXdpConfig) -> (Option<u32>, u32, bool) {
    let mtu = sys::interface_mtu(&config.ifname);
    let max_frame = mtu.unwrap_or(1500) + LINK_HEADER_LEN;
    let frags = max_frame > config.umem.max_rx_frame()
        && sys::kernel_version().is_some_and(|v| v >= (6, 6));
    (mtu, max_frame, frags)
}

/// Loads and attaches the program unless `inhibit=on`: refuses when
/// another program is attached; with no mode given, tries native and
/// falls back to skb. `frags`: the variant for multi-buffer sockets.
pub(crate) fn attach_program(
    config: &AfXdpConfig,
    ifindex: u32,
    frags: bool,
) -> Result<Option<XdpAttachment>> {
    if config.inhibit {
        match attached_program(ifindex) {
            Some(p) => log::info!(
                "af-xdp: inhibit=on: using XDP program {:?} (id {}, {} mode) already attached to {}",
                p.name,
                p.id,
                p.mode,
                config.ifname
            ),
            None => log::warn!(
                "af-xdp: inhibit=on but {} has no XDP program attached: the sockets will receive \
                 nothing until a program redirects to them",
                config.ifname
            ),
        }
        return Ok(None);
    }
    if let Some(p) = attached_program(ifindex) {
        return Err(Error::ProgramAlreadyAttached {
            ifname: config.ifname.clone(),
            prog_id: p.id,
            prog_name: p.name,
            mode: p.mode,
        });
    }
    let entries = sys::rx_queue_count(&config.ifname, ifindex)
        .unwrap_or(0)
        .max(config.start_queue + config.queues);
    let program = XdpProgram::load(entries, frags)?;
    // Before any socket enters the XSKMAP: until then every frame passes
    // to the host, after it only the guest's go to the sockets.
    if let Some(filter) = &config.rx_filter {
        program.rx_filter().set(&filter.config, &filter.table)?;
    }
    let (link, mode) = match config.mode {
        Some(mode) => (program.attach(&config.ifname, ifindex, mode)?, mode),
        None => match program.attach(&config.ifname, ifindex, XdpMode::Native) {
            Ok(link) => (link, XdpMode::Native),
            Err(Error::Attach { source, .. }) => {
                log::warn!(
                    "af-xdp: native XDP is not available on {} ({source}); falling back to skb mode \
                     (generic XDP, copy mode, slower)",
                    config.ifname
                );
                (
                    program.attach(&config.ifname, ifindex, XdpMode::Skb)?,
                    XdpMode::Skb,
                )
            }
            Err(e) => return Err(e),
        },
    };
    log::info!(
        "af-xdp: attached XDP program id {} to {} in {mode} mode (BPF link: detached when xskvm exits)",
        program.id().unwrap_or(0),
        config.ifname
    );
    Ok(Some(XdpAttachment::new(link, program, mode, ifindex)))
}

/// XDP_COPY or 0 (try zero-copy, fall back to copy) for the bind.
fn copy_flag(config: &AfXdpConfig, attach_mode: Option<XdpMode>, ifindex: u32) -> u16 {
    let skb = match attach_mode {
        Some(mode) => mode == XdpMode::Skb,
        // inhibit=on: follow the mode asked for, else how the foreign
        // program is attached (generic XDP cannot feed zero-copy sockets).
        None => {
            config.mode == Some(XdpMode::Skb)
                || attached_program(ifindex).is_some_and(|p| p.mode == "skb")
        }
    };
    if config.force_copy || skb {
        libc::XDP_COPY
    } else {
        0
    }
}

impl AfXdpNic {
    /// Opens the NIC: checks the interface and queues, creates (or adopts
    /// with `sock-fds`) one AF_XDP socket per queue, attaches the program
    /// (unless `inhibit=on`), registers a UMEM per queue, binds, and puts
    /// the sockets in the XSKMAP. On any error nothing stays attached and
    /// every socket it created is closed.
    ///
    /// With `sock-fds`, the NIC takes over the listed descriptors: on
    /// success they are closed (the NIC keeps its own duplicates); on
    /// error they stay open and the caller still owns them (possibly with
    /// a UMEM or rings already configured).
    pub fn open(config: &AfXdpConfig) -> Result<AfXdpNic> {
        AfXdpNic::open_on(config, None)
    }

    /// [`AfXdpNic::open`], for `umem=guest` with the region every queue
    /// registers as its UMEM: the first queue registers all of it (so its
    /// pages are locked once per NIC), the others share it, and each queue
    /// keeps its frames in its window of the region's area. The region
    /// must be given exactly when the config says `umem=guest`, with an
    /// area of at least [`AfXdpConfig::queue_umem_bytes`].
    pub fn open_on(config: &AfXdpConfig, region: Option<UmemRegion>) -> Result<AfXdpNic> {
        AfXdpNic::open_with(config, region, false)
    }

    /// [`AfXdpNic::open_on`] for a NIC opened again (its interface came
    /// back) while the sockets it replaces may still be read: with
    /// `umem=guest` the new queues use the same windows of the region as
    /// the old ones, so they give the kernel no frame until their first
    /// receive. Otherwise the kernel could write new frames into frames
    /// the old sockets still hold unread, and whoever reads those before
    /// switching sockets would hand over mixed bytes.
    pub fn reopen_on(config: &AfXdpConfig, region: Option<UmemRegion>) -> Result<AfXdpNic> {
        AfXdpNic::open_with(config, region, region.is_some())
    }

    fn open_with(
        config: &AfXdpConfig,
        region: Option<UmemRegion>,
        defer_fill: bool,
    ) -> Result<AfXdpNic> {
        config.validate()?;
        let region_err = |reason: String| Error::Io {
            op: "opening a NIC with umem=guest",
            source: io::Error::new(io::ErrorKind::InvalidInput, reason),
        };
        match (config.guest_umem, &region) {
            (true, None) => return Err(region_err("no guest memory was given".into())),
            (false, Some(_)) => {
                return Err(region_err(
                    "guest memory was given without umem=guest".into(),
                ))
            }
            (true, Some(r)) if ((r.len() - r.area_start()) as u64) < config.queue_umem_bytes() => {
                return Err(region_err(format!(
                    "the queues need {} bytes after guest memory and have {}",
                    config.queue_umem_bytes(),
                    r.len() - r.area_start()
                )))
            }
            _ => {}
        }
        let ifindex = resolve(config)?;
        check_queue_range(config, ifindex)?;

        // A foreign map that is missing or wrong fails before anything is
        // created.
        let mut xsk_map = match &config.map_path {
            Some(path) => Some(PinnedXskMap::open(path, config.map_keys())?),
            None => None,
        };

        // Sockets first: a missing capability fails here, before the
        // interface is touched.
        let sockets = match &config.sock_fds {
            Some(fds) => adopt_sock_fds(fds)?,
            None => (0..config.queues)
                .map(|_| new_xsk_socket())
                .collect::<Result<Vec<_>>>()?,
        };
        // Like the sockets: duplicates now, the caller's fds closed once
        // the open succeeded.
        let adopted_filter = config.filter_fds.map(RxFilterMaps::adopt).transpose()?;

        // Frames as long as the interface's MTU allows; beyond one UMEM
        // frame that takes multi-buffer sockets.
        let (mtu, max_frame, frags) = frame_plan(config);
        let attachment = attach_program(config, ifindex, frags)?;
        let attach_mode = attachment.as_ref().map(|a| a.mode());
        let copy = copy_flag(config, attach_mode, ifindex);

        // Registration says what to do if this was not enough.
        let _ = sys::raise_memlock(match &region {
            Some(r) => r.len() as u64,
            None => config.queue_umem_bytes(),
        });
        let mut queues: Vec<XskQueue> = Vec::with_capacity(sockets.len());
        for (i, (fd, queue_id)) in sockets.into_iter().zip(config.queue_ids()).enumerate() {
            let guest = region.map(|region| GuestUmemSetup {
                region,
                window: region.area_start() as u64 + i as u64 * config.umem.bytes_per_queue(),
                share: queues.first().map(|first| SharedWith {
                    fd: first.as_fd(),
                    multi_buffer: first.is_multi_buffer(),
                    sg: first.is_sg(),
                    tx_metadata: first.tx_checksum(),
                }),
            });
            let setup = QueueSetup {
                ifname: &config.ifname,
                ifindex,
                queue_id,
                umem: config.umem,
                copy_flag: copy,
                total_queues: config.queues,
                adopted: config.sock_fds.is_some(),
                max_frame,
                max_rx_frame: if attach_mode == Some(XdpMode::Skb) {
                    // Generic XDP sees GSO/GRO packets whole.
                    max_frame.max(SKB_MODE_MAX_RX_FRAME)
                } else {
                    max_frame
                },
                tx_checksum: config.tx_checksum,
                guest,
                defer_fill,
            };
            let queue = XskQueue::setup(fd, &setup)?;
            log::info!(
                "af-xdp: {} queue {queue_id}: {}{}{}; transmit checksums {}",
                config.ifname,
                if config.guest_umem {
                    "UMEM on guest memory (umem=guest), "
                } else {
                    ""
                },
                if queue.is_multi_buffer() {
                    format!(
                        "multi-buffer (frames up to {} bytes received, {} sent, in {}-byte \
                         pieces), ",
                        queue.max_rx_frame(),
                        queue.max_frame(),
                        queue.frame_size()
                    )
                } else {
                    String::new()
                },
                if queue.is_zero_copy() {
                    "zero-copy"
                } else if config.force_copy {
                    "copy mode (force-copy=on)"
                } else if copy != 0 {
                    "copy mode (skb mode)"
                } else {
                    "copy mode (the driver has no zero-copy support)"
                },
                if queue.tx_checksum() {
                    "by the kernel (AF_XDP TX metadata)"
                } else if config.tx_checksum == crate::TxChecksum::Caller {
                    "by xskvm (tx-csum=vmm)"
                } else {
                    "by xskvm (no AF_XDP TX metadata before Linux 6.8)"
                }
            );
            queues.push(queue);
        }
        if let Some(attachment) = &attachment {
            for queue in &queues {
                attachment
                    .program()
                    .insert_socket(queue.queue_id(), queue.as_fd())?;
            }
        }
        if let Some(map) = &mut xsk_map {
            // Bound sockets only: the kernel would take an unbound one, and
            // the program would redirect into a socket with no rings.
            for (queue, key) in queues.iter().zip(config.map_keys()) {
                map.insert(key, queue.as_fd())?;
            }
            log::info!(
                "af-xdp: {}: sockets of queues {:?} at keys {:?} of {}",
                config.ifname,
                config.queue_ids(),
                config.map_keys(),
                map.path()
            );
        }
        if let Some(fds) = &config.sock_fds {
            close_handed_over(fds);
        }
        if let Some(fds) = &config.filter_fds {
            close_handed_over(fds);
        }
        let info = NicInfo {
            ifname: config.ifname.clone(),
            ifindex,
            attach_mode,
            program_id: attachment.as_ref().and_then(|a| a.program().id()),
            queue_ids: config.queue_ids().collect(),
            zero_copy: queues.iter().map(XskQueue::is_zero_copy).collect(),
            mtu,
            tx_checksum: queues.iter().all(XskQueue::tx_checksum),
            multi_buffer: queues.iter().all(XskQueue::is_multi_buffer),
            guest_umem: config.guest_umem,
            max_frame: queues
                .iter()
                .map(XskQueue::max_frame)
                .min()
                .unwrap_or_else(|| config.umem.max_rx_frame()),
        };
        Ok(AfXdpNic {
            queues,
            owner: NicOwner {
                info,
                attachment,
                xsk_map,
                adopted_filter,
            },
        })
    }

    pub fn info(&self) -> &NicInfo {
        &self.owner.info
    }

    /// The program link and what was set up.
    pub fn owner(&self) -> &NicOwner {
        &self.owner
    }

    pub fn queues(&self) -> &[XskQueue] {
        &self.queues
    }

    pub fn queues_mut(&mut self) -> &mut [XskQueue] {
        &mut self.queues
    }

    /// Splits into the owner of the program link (keep it on the main
    /// thread; its drop detaches) and the per-queue objects (each `Send`,
    /// one per IO thread).
    pub fn into_parts(self) -> (NicOwner, Vec<XskQueue>) {
        (self.owner, self.queues)
    }
}

/// For the privileged side of `inhibit=on,sock-fds=...`: attaches the
/// program and creates one bare AF_XDP socket per queue, already in the
/// XSKMAP and tied to the interface (SO_BINDTODEVICE, so the receiver
/// cannot bind it elsewhere). Hand the sockets to xskvm (SCM_RIGHTS or fd
/// inheritance) and keep this alive while xskvm runs: dropping it (or
/// exiting) detaches the program.
#[derive(Debug)]
pub struct PreparedSockets {
    pub sockets: Vec<OwnedFd>,
    pub owner: NicOwner,
}

impl PreparedSockets {
    /// `config` as for [`AfXdpNic::open`]; `inhibit`, `sock-fds` and
    /// `map-path` are ignored (this is the side that loads the program).
    pub fn create(config: &AfXdpConfig) -> Result<PreparedSockets> {
        let mut config = config.clone();
        config.inhibit = false;
        config.sock_fds = None;
        config.filter_fds = None;
        config.map_path = None;
        config.map_start_index = None;
        config.validate()?;
        let ifindex = resolve(&config)?;
        check_queue_range(&config, ifindex)?;
        let sockets = (0..config.queues)
            .map(|_| new_xsk_socket())
            .collect::<Result<Vec<_>>>()?;
        for s in &sockets {
            if let Err(e) = sys::setsockopt_bytes(
                s.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                config.ifname.as_bytes(),
            ) {
                log::debug!("af-xdp: SO_BINDTODEVICE on an AF_XDP socket: {e}");
            }
        }
        let (mtu, _, frags) = frame_plan(&config);
        let attachment = attach_program(&config, ifindex, frags)?;
        if let Some(attachment) = &attachment {
            for (s, q) in sockets.iter().zip(config.queue_ids()) {
                attachment.program().insert_socket(q, s.as_fd())?;
            }
        }
        let info = NicInfo {
            ifname: config.ifname.clone(),
            ifindex,
            attach_mode: attachment.as_ref().map(|a| a.mode()),
            program_id: attachment.as_ref().and_then(|a| a.program().id()),
            queue_ids: config.queue_ids().collect(),
            zero_copy: vec![false; config.queues as usize],
            mtu,
            // Decided by whoever binds the sockets.
            tx_checksum: false,
            multi_buffer: false,
            guest_umem: false,
            max_frame: config.umem.max_rx_frame(),
        };
        Ok(PreparedSockets {
            sockets,
            owner: NicOwner {
                info,
                attachment,
                xsk_map: None,
                adopted_filter: None,
            },
        })
    }
}
