//! The XDP program (bpf/xsk_redirect.bpf.c): loading it, filling its
//! XSKMAP, attaching it with a BPF link, and finding out what else is
//! attached to an interface.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Once;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::PrintLevel;

use crate::config::XdpMode;
use crate::error::{Error, Result, PRIVILEGE_HINT};

#[allow(clippy::all, clippy::pedantic, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/xsk_redirect.skel.rs"));
}

use skel::XskRedirectSkelBuilder;

/// An XDP program attached to an interface (from the kernel's view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    /// The program's name, or "?" if it could not be read.
    pub name: String,
    pub mode: &'static str,
}

/// Sends libbpf's messages to the `log` crate instead of stderr.
fn route_libbpf_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((
            PrintLevel::Info,
            |level: PrintLevel, msg: String| {
                let msg = msg.trim_end();
                match level {
                    PrintLevel::Warn => log::warn!("libbpf: {msg}"),
                    PrintLevel::Info => log::info!("libbpf: {msg}"),
                    PrintLevel::Debug => log::debug!("libbpf: {msg}"),
                }
            },
        )));
    });
}

/// The loaded program and its maps, held by their own fds so that the
/// libbpf object (with its borrowed-lifetime skeleton) need not be kept.
#[derive(Debug)]
pub struct XdpProgram {
    prog: OwnedFd,
    map: OwnedFd,
    map_entries: u32,
    rx_filter: RxFilterMaps,
}

/// `struct rx_filter_config` of bpf/xsk_redirect.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxFilterConfig {
    pub mac: [u8; 6],
    pub enabled: u8,
    pub promisc: u8,
    pub all_multi: u8,
    pub multicast_by_table: u8,
    pub pad: [u8; 2],
}

/// A whole receive filter: its config and the addresses of its MAC table
/// (at most [`RX_FILTER_TABLE_MAX`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxFilter {
    pub config: RxFilterConfig,
    pub table: Vec<[u8; 6]>,
}

/// Addresses the program's MAC table holds (its `max_entries`).
pub const RX_FILTER_TABLE_MAX: usize = 64;

/// The program's receive filter maps, by their own fds: the filter can be
/// changed from any thread while the program runs.
#[derive(Debug)]
pub struct RxFilterMaps {
    config: OwnedFd,
    table: OwnedFd,
    filtered: OwnedFd,
}

/// The low 48 bits of the MAC table key, first byte lowest.
fn mac_key(mac: &[u8; 6]) -> u64 {
    mac.iter()
        .enumerate()
        .fold(0u64, |key, (i, &b)| key | (u64::from(b) << (8 * i)))
}

fn map_error(op: &'static str, ret: i32) -> Error {
    Error::from_privileged(op, io::Error::from_raw_os_error(-ret))
}

impl RxFilterMaps {
    /// Which frames go to the guest from now on: `config` (with `enabled`
    /// set to filter at all) plus the addresses of `table` (at most
    /// [`RX_FILTER_TABLE_MAX`]). The table is replaced before the config,
    /// so no frame sees a config whose table is missing.
    pub fn set(&self, config: &RxFilterConfig, table: &[[u8; 6]]) -> Result<()> {
        if table.len() > RX_FILTER_TABLE_MAX {
            return Err(Error::Io {
                op: "setting the MAC filter table",
                source: io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        // Remove the keys that are not in the new table.
        let mut key = 0u64;
        let mut first = true;
        loop {
            let mut next = 0u64;
            let prev: *const u64 = if first { std::ptr::null() } else { &key };
            // SAFETY: a hash map with 8-byte keys; prev is null or a live
            // u64, next is writable.
            let ret = unsafe {
                libbpf_sys::bpf_map_get_next_key(
                    self.table.as_raw_fd(),
                    prev.cast(),
                    (&mut next as *mut u64).cast(),
                )
            };
            if ret < 0 {
                break;
            }
            first = false;
            key = next;
            if !table.iter().any(|mac| mac_key(mac) == next) {
                // SAFETY: next is a live u64 key.
                unsafe {
                    libbpf_sys::bpf_map_delete_elem(
                        self.table.as_raw_fd(),
                        (&next as *const u64).cast(),
                    )
                };
                // Deleting the current key restarts the walk.
                first = true;
            }
        }
        for mac in table {
            let key = mac_key(mac);
            let one = 1u8;
            // SAFETY: 8-byte key and 1-byte value, both live.
            let ret = unsafe {
                libbpf_sys::bpf_map_update_elem(
                    self.table.as_raw_fd(),
                    (&key as *const u64).cast(),
                    (&one as *const u8).cast(),
                    libbpf_sys::BPF_ANY as u64,
                )
            };
            if ret < 0 {
                return Err(map_error("setting the MAC filter table", ret));
            }
        }
        let zero = 0u32;
        // SAFETY: an array map with 4-byte keys and RxFilterConfig values
        // (same layout as the C struct).
        let ret = unsafe {
            libbpf_sys::bpf_map_update_elem(
                self.config.as_raw_fd(),
                (&zero as *const u32).cast(),
                (config as *const RxFilterConfig).cast(),
                libbpf_sys::BPF_ANY as u64,
            )
        };
        if ret < 0 {
            return Err(map_error("setting the receive filter", ret));
        }
        Ok(())
    }

    /// Frames kept from the guest on receive queue `queue` (summed over CPUs).
    pub fn filtered_frames(&self, queue: u32) -> u64 {
        // SAFETY: plain libbpf query.
        let cpus = unsafe { libbpf_sys::libbpf_num_possible_cpus() };
        let Ok(cpus) = usize::try_from(cpus) else {
            return 0;
        };
        let mut values = vec![0u64; cpus];
        // SAFETY: a per-CPU array of u64: the kernel writes one per
        // possible CPU, which `values` has room for.
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_elem(
                self.filtered.as_raw_fd(),
                (&queue as *const u32).cast(),
                values.as_mut_ptr().cast(),
            )
        };
        if ret < 0 {
            return 0;
        }
        values.iter().sum()
    }

    /// The maps' fds, in the order `filter-fds=` takes them (config, MAC
    /// table, filtered-frame counters).
    pub fn raw_fds(&self) -> [RawFd; 3] {
        [
            self.config.as_raw_fd(),
            self.table.as_raw_fd(),
            self.filtered.as_raw_fd(),
        ]
    }

    /// Works on the filter maps of a program someone else loaded (e.g.
    /// `xskvm-net-helper`), by fds in the order of [`RxFilterMaps::raw_fds`].
    /// Each must be a BPF map of the kind the program has; this returns
    /// duplicates and leaves `fds` to the caller. Changing the maps needs
    /// no capability (Linux 6.5+), only the fds.
    pub fn adopt(fds: [RawFd; 3]) -> Result<RxFilterMaps> {
        // (type, key size, value size) of each, as bpf/xsk_redirect.bpf.c
        // declares them.
        let expected = [
            (
                libbpf_sys::BPF_MAP_TYPE_ARRAY,
                4,
                std::mem::size_of::<RxFilterConfig>() as u32,
                "the receive filter config",
            ),
            (libbpf_sys::BPF_MAP_TYPE_HASH, 8, 1, "the MAC table"),
            (
                libbpf_sys::BPF_MAP_TYPE_PERCPU_ARRAY,
                4,
                8,
                "the filtered-frame counters",
            ),
        ];
        let mut owned = Vec::with_capacity(3);
        for (&fd, &(kind, key_size, value_size, what)) in fds.iter().zip(&expected) {
            let bad = |reason: String| Error::BadFilterFd { fd, what, reason };
            if !crate::sys::fd_is_open(fd) {
                return Err(bad("is not an open file descriptor".to_string()));
            }
            // SAFETY: all-zero is a valid bpf_map_info.
            let mut info: libbpf_sys::bpf_map_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libbpf_sys::bpf_map_info>() as u32;
            // SAFETY: fd is open; info is writable for len bytes.
            let ret = unsafe { libbpf_sys::bpf_map_get_info_by_fd(fd, &mut info, &mut len) };
            let errno = ret.checked_neg().unwrap_or(libc::EIO);
            if ret != 0 && errno == libc::EPERM {
                // Before Linux 6.5, kernel.unprivileged_bpf_disabled keeps
                // an unprivileged process from every bpf() call, map
                // updates included: the filter will not work either.
                log::warn!(
                    "af-xdp: filter-fds: fd {fd} ({what}) cannot be inspected without \
                     privilege (Linux before 6.5?); the receive filter may stay off"
                );
            } else if ret != 0 {
                let e = io::Error::from_raw_os_error(errno);
                return Err(bad(format!("is not a BPF map ({e})")));
            } else if (info.type_, info.key_size, info.value_size) != (kind, key_size, value_size) {
                return Err(bad(format!(
                    "is a BPF map of type {} with {}-byte keys and {}-byte values, not type \
                     {kind} with {key_size} and {value_size}",
                    info.type_, info.key_size, info.value_size
                )));
            }
            // SAFETY: checked open above; borrowed only for the dup.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            owned.push(borrowed.try_clone_to_owned().map_err(|source| Error::Io {
                op: "duplicating a filter-fds descriptor",
                source,
            })?);
        }
        let [config, table, filtered]: [OwnedFd; 3] = owned.try_into().map_err(|_| Error::Io {
            op: "adopting the filter-fds descriptors",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        Ok(RxFilterMaps {
            config,
            table,
            filtered,
        })
    }

    /// Second handles on the same maps.
    pub fn try_clone(&self) -> Result<RxFilterMaps> {
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| Error::Io {
                op: "duplicating a map fd",
                source,
            })
        };
        Ok(RxFilterMaps {
            config: dup(&self.config)?,
            table: dup(&self.table)?,
            filtered: dup(&self.filtered)?,
        })
    }
}

impl XdpProgram {
    /// Loads the program with an XSKMAP of `map_entries` slots (one per
    /// device queue, so any queue id can be redirected). `frags`: the
    /// variant that takes frames in several buffers (for multi-buffer
    /// sockets); otherwise drivers keep every frame in one.
    pub fn load(map_entries: u32, frags: bool) -> Result<XdpProgram> {
        route_libbpf_logs();
        let load_err = |e: libbpf_rs::Error| match e.kind() {
            libbpf_rs::ErrorKind::PermissionDenied => Error::PermissionDenied {
                action:
                    "loading the XDP program (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)",
                hint: PRIVILEGE_HINT,
                source: io::Error::new(io::ErrorKind::PermissionDenied, format!("{e:#}")),
            },
            _ => Error::ProgramLoad(format!("{e:#}")),
        };
        let mut object = MaybeUninit::uninit();
        let mut open = XskRedirectSkelBuilder::default()
            .open(&mut object)
            .map_err(load_err)?;
        open.maps
            .xsks_map
            .set_max_entries(map_entries.max(1))
            .map_err(load_err)?;
        open.maps
            .filtered_frames
            .set_max_entries(map_entries.max(1))
            .map_err(load_err)?;
        // Only the variant asked for is loaded.
        open.progs.xskvm_redirect.set_autoload(!frags);
        open.progs.xskvm_redirect_frags.set_autoload(frags);
        let skel = open.load().map_err(load_err)?;
        let prog = if frags {
            skel.progs.xskvm_redirect_frags.as_fd()
        } else {
            skel.progs.xskvm_redirect.as_fd()
        };
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|source| Error::Io {
                op: "duplicating the program fd",
                source,
            })
        };
        // Own copies of the fds keep program and map alive after the
        // skeleton (and its libbpf object) is dropped below.
        Ok(XdpProgram {
            prog: dup(prog)?,
            map: dup(skel.maps.xsks_map.as_fd())?,
            map_entries: map_entries.max(1),
            rx_filter: RxFilterMaps {
                config: dup(skel.maps.rx_filter.as_fd())?,
                table: dup(skel.maps.mac_table.as_fd())?,
                filtered: dup(skel.maps.filtered_frames.as_fd())?,
            },
        })
    }

    /// Puts `socket` in slot `queue` of the XSKMAP.
    pub fn insert_socket(&self, queue: u32, socket: BorrowedFd<'_>) -> Result<()> {
        if queue >= self.map_entries {
            return Err(Error::Io {
                op: "adding a socket to the XSKMAP",
                source: io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        let key = queue;
        let value: u32 = socket.as_raw_fd() as u32;
        // SAFETY: map fd is an XSKMAP with 4-byte keys and values; key and
        // value point to live u32s.
        let ret = unsafe {
            libbpf_sys::bpf_map_update_elem(
                self.map.as_raw_fd(),
                (&key as *const u32).cast(),
                (&value as *const u32).cast(),
                libbpf_sys::BPF_ANY as u64,
            )
        };
        if ret < 0 {
            return Err(Error::from_privileged(
                "adding a socket to the XSKMAP",
                io::Error::from_raw_os_error(-ret),
            ));
        }
        Ok(())
    }

    /// Attaches the program to `ifindex` with a BPF link in `mode`. The
    /// link detaches the program when its fd is closed — including when
    /// the process dies — and never replaces another program.
    pub fn attach(&self, ifname: &str, ifindex: u32, mode: XdpMode) -> Result<OwnedFd> {
        let flags = match mode {
            XdpMode::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
            XdpMode::Skb => libbpf_sys::XDP_FLAGS_SKB_MODE,
        };
        // SAFETY: all-zero is a valid bpf_link_create_opts; sz tells libbpf
        // which fields exist.
        let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _;
        opts.flags = flags;
        // SAFETY: prog fd is a loaded XDP program; opts is initialised.
        let fd = unsafe {
            libbpf_sys::bpf_link_create(
                self.prog.as_raw_fd(),
                ifindex as libc::c_int,
                libbpf_sys::BPF_XDP,
                &opts,
            )
        };
        if fd < 0 {
            let source = io::Error::from_raw_os_error(-fd);
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                    action: "attaching the XDP program (needs CAP_NET_ADMIN)",
                    hint: PRIVILEGE_HINT,
                    source,
                },
                // Raced with someone attaching between our check and now.
                Some(libc::EBUSY) | Some(libc::EEXIST) => match attached_program(ifindex) {
                    Some(p) => Error::ProgramAlreadyAttached {
                        ifname: ifname.to_string(),
                        prog_id: p.id,
                        prog_name: p.name,
                        mode: p.mode,
                    },
                    None => Error::Attach {
                        ifname: ifname.to_string(),
                        mode: mode.as_str(),
                        source,
                    },
                },
                _ => Error::Attach {
                    ifname: ifname.to_string(),
                    mode: mode.as_str(),
                    source,
                },
            });
        }
        // SAFETY: bpf_link_create returned a new fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The kernel's id of the loaded program.
    pub fn id(&self) -> Option<u32> {
        prog_info(self.prog.as_fd()).map(|(id, _)| id)
    }

    /// The receive filter (which frames the guest sees).
    pub fn rx_filter(&self) -> &RxFilterMaps {
        &self.rx_filter
    }

    pub fn prog_fd(&self) -> RawFd {
        self.prog.as_raw_fd()
    }

    pub fn map_fd(&self) -> RawFd {
        self.map.as_raw_fd()
    }
}

/// id and name of a program from its fd.
fn prog_info(fd: BorrowedFd<'_>) -> Option<(u32, String)> {
    // SAFETY: all-zero is a valid bpf_prog_info.
    let mut info: libbpf_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: info is writable for len bytes.
    let ret = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if ret != 0 {
        return None;
    }
    let name = info.name.map(|c| c as u8);
    let name = CStr::from_bytes_until_nul(&name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some((info.id, name))
}

/// The XDP program attached to `ifindex`, if any (any mode).
pub fn attached_program(ifindex: u32) -> Option<AttachedProgram> {
    // SAFETY: all-zero is a valid bpf_xdp_query_opts; sz set below.
    let mut opts: libbpf_sys::bpf_xdp_query_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_xdp_query_opts>() as _;
    // SAFETY: opts is initialised; the call only writes into it.
    let ret = unsafe { libbpf_sys::bpf_xdp_query(ifindex as libc::c_int, 0, &mut opts) };
    if ret != 0 {
        return None;
    }
    let (id, mode) = [
        (opts.drv_prog_id, "native"),
        (opts.skb_prog_id, "skb"),
        (opts.hw_prog_id, "offload"),
    ]
    .into_iter()
    .find(|(id, _)| *id != 0)?;
    // SAFETY: plain syscall wrapper; the fd (if any) is owned right below.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    let name = if fd >= 0 {
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        prog_info(fd.as_fd()).map(|(_, n)| n)
    } else {
        None
    };
    Some(AttachedProgram {
        id,
        name: name.unwrap_or_else(|| "?".to_string()),
        mode,
    })
}

/// The program attached with a link; detached when this is dropped (or
/// the process exits, however it exits).
#[derive(Debug)]
pub struct XdpAttachment {
    // Field order: the link goes first, then the program and map.
    link: OwnedFd,
    program: XdpProgram,
    mode: XdpMode,
    ifindex: u32,
}

impl XdpAttachment {
    pub(crate) fn new(link: OwnedFd, program: XdpProgram, mode: XdpMode, ifindex: u32) -> Self {
        XdpAttachment {
            link,
            program,
            mode,
            ifindex,
        }
    }

    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    pub fn program(&self) -> &XdpProgram {
        &self.program
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn link_fd(&self) -> RawFd {
        self.link.as_raw_fd()
    }
}
