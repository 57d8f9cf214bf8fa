//! The crate's errors: one variant per thing a user can get wrong or lack,
//! each with a message that says what to do about it.

use std::io;
use std::os::fd::RawFd;

/// What the privileged operations need, for [`Error::PermissionDenied`].
pub(crate) const PRIVILEGE_HINT: &str =
    "run xskvm as root or grant it CAP_NET_RAW, CAP_NET_ADMIN, \
     CAP_BPF and CAP_IPC_LOCK (e.g. setcap cap_net_raw,cap_net_admin,cap_bpf,cap_ipc_lock+ep), \
     or let a privileged helper create the sockets and pass them with inhibit=on,sock-fds=...";

/// What to do about a program found on the interface. xskvm's own is
/// held by a BPF link of a running xskvm (or of another `--net` of this
/// one), which `ip link set ... xdp off` cannot remove: it goes when that
/// xskvm ends.
fn attached_program_advice(ifname: &str, prog_name: &str) -> String {
    if prog_name.starts_with("xskvm_redirect") {
        format!(
            "it is xskvm's: another xskvm (or another --net of this one) uses {ifname}. One \
             xskvm NIC per interface (queues=N gives it more queue pairs); the program goes \
             when that xskvm ends"
        )
    } else {
        format!(
            "xskvm never replaces another program. Remove it with `ip link set dev {ifname} xdp \
             off` (or `xdp-loader unload {ifname} --all`; a program attached through a BPF link \
             goes only when its owner lets it go), or keep it, put xskvm's sockets in its XSKMAP \
             and use inhibit=on,sock-fds=... or map-path=..."
        )
    }
}

/// An error in the `af-xdp` option string or a [`crate::AfXdpConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("af-xdp: ifname=IF is required")]
    MissingIfname,
    #[error("af-xdp: option {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("af-xdp: unknown option {key:?} (known: {known})")]
    UnknownOption {
        key: String,
        /// Every key accepted where it was met, comma separated.
        known: String,
    },
    #[error("af-xdp: option {0} given twice")]
    Duplicate(String),
    #[error("af-xdp: {key}={value:?} is not valid: expected {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "af-xdp: sock-fds lists {fds} socket(s) but queues={queues}{}; give one socket per queue",
        if *.queues_given { "" } else { " (the default)" }
    )]
    SockFdsCount {
        fds: usize,
        queues: u32,
        queues_given: bool,
    },
    #[error("af-xdp: sock-fds needs inhibit=on (the sockets must already be in an XSKMAP that someone else loaded)")]
    SockFdsWithoutInhibit,
    #[error(
        "af-xdp: map-path needs inhibit=on (the map belongs to an XDP program someone else \
         attached; xskvm then loads none)"
    )]
    MapPathWithoutInhibit,
    #[error(
        "af-xdp: map-path and sock-fds are mutually exclusive (sock-fds sockets are already in \
         their XSKMAP)"
    )]
    MapPathWithSockFds,
    #[error("af-xdp: tx-gather=on needs umem=guest (frames are sent from guest memory only where it is the UMEM)")]
    TxGatherWithoutGuestUmem,
    #[error("af-xdp: map-start-index needs map-path")]
    MapStartIndexWithoutMapPath,
    #[error("af-xdp: sock-fds lists fd {0} twice")]
    DuplicateSockFd(RawFd),
    #[error(
        "af-xdp: filter-fds needs sock-fds (the maps belong to the program those sockets are in, \
         as xskvm-net-helper passes them)"
    )]
    FilterFdsWithoutSockFds,
    #[error("af-xdp: filter-fds lists fd {0} twice, or one of sock-fds")]
    DuplicateFilterFd(RawFd),
    #[error("af-xdp: UMEM: {0}")]
    BadUmem(String),
}

/// Everything opening or running an AF_XDP NIC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("af-xdp: no network interface {ifname:?} in this network namespace")]
    NoSuchInterface { ifname: String },

    #[error(
        "af-xdp: {ifname} is a loopback interface: it carries the host's own traffic, never \
         a guest's; use a NIC, a veth pair or a macvlan"
    )]
    Loopback { ifname: String },

    #[error(
        "af-xdp: {ifname} has {available} receive queue(s) (0..{available}), but start-queue={start_queue} \
         with queues={queues} needs queues {start_queue}..{}; lower queues/start-queue or add \
         channels (ethtool -L {ifname} combined N)",
        u64::from(*.start_queue) + u64::from(*.queues)
    )]
    QueueOutOfRange {
        ifname: String,
        start_queue: u32,
        queues: u32,
        available: u32,
    },

    #[error(
        "af-xdp: queue {queue} of {ifname} is already bound by another AF_XDP socket \
         (another xskvm or AF_XDP program uses it); pick another start-queue or stop that program"
    )]
    QueueBusy { ifname: String, queue: u32 },

    #[error("af-xdp: {action} was refused ({source}): {hint}")]
    PermissionDenied {
        action: &'static str,
        hint: &'static str,
        source: io::Error,
    },

    #[error("af-xdp: this kernel has no AF_XDP sockets (it was built without CONFIG_XDP_SOCKETS)")]
    NoAfXdp,

    #[error("af-xdp: sock-fds: fd {fd} {reason}")]
    BadSockFd { fd: RawFd, reason: String },

    #[error("af-xdp: filter-fds: fd {fd} ({what}) {reason}")]
    BadFilterFd {
        fd: RawFd,
        what: &'static str,
        reason: String,
    },

    #[error(
        "af-xdp: registering the UMEM ({needed_kib} KiB for {queues} queue(s){}) exceeds the \
         locked-memory limit (RLIMIT_MEMLOCK {}); raise it to at least {needed_kib} KiB plus what \
         the process already locks (ulimit -l, LimitMEMLOCK= in systemd, limits.conf) or grant \
         CAP_IPC_LOCK",
        if *.guest_memory { ": umem=guest locks all of guest memory" } else { "" },
        match .limit_kib { Some(k) => format!("{k} KiB"), None => "unknown".to_string() }
    )]
    Memlock {
        needed_kib: u64,
        queues: u32,
        limit_kib: Option<u64>,
        /// The UMEM is guest memory (`umem=guest`).
        guest_memory: bool,
    },

    #[error(
        "af-xdp: {ifname} already has XDP program {prog_name:?} (id {prog_id}) attached in {mode} \
         mode; {}",
        attached_program_advice(ifname, prog_name)
    )]
    ProgramAlreadyAttached {
        ifname: String,
        prog_id: u32,
        prog_name: String,
        mode: &'static str,
    },

    #[error("af-xdp: loading the XDP program failed: {0}")]
    ProgramLoad(String),

    #[error("af-xdp: attaching the XDP program to {ifname} in {mode} mode failed: {source}")]
    Attach {
        ifname: String,
        mode: &'static str,
        source: io::Error,
    },

    #[error(
        "af-xdp: map-path={path}: no such pinned object (is bpffs mounted, e.g. \
         `mount -t bpf bpf /sys/fs/bpf`, and did the program's loader pin its XSKMAP there?)"
    )]
    MapNotFound { path: String },

    #[error(
        "af-xdp: map-path={path}: access refused ({source}); the pinned file must be readable \
         and writable by xskvm's user (chown/chmod it), and be a pinned BPF map"
    )]
    MapAccess { path: String, source: io::Error },

    #[error(
        "af-xdp: map-path={path} is not an XSKMAP ({what}); pin the program's BPF_MAP_TYPE_XSKMAP"
    )]
    NotXskMap { path: String, what: String },

    #[error(
        "af-xdp: map-path={path} has {max_entries} entries, but map-start-index and queues need \
         keys {}..{}",
        .keys.start, .keys.end
    )]
    MapTooSmall {
        path: String,
        max_entries: u32,
        keys: std::ops::Range<u32>,
    },

    #[error(
        "af-xdp: map-path={path}: key {key} already holds a socket (another VM or program uses it); \
         pick another map-start-index"
    )]
    MapKeyBusy { path: String, key: u32 },

    #[error("af-xdp: {op} for queue {queue} failed: {source}")]
    Socket {
        op: &'static str,
        queue: u32,
        source: io::Error,
    },

    #[error("af-xdp: {op} failed: {source}")]
    Io { op: &'static str, source: io::Error },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// For syscalls whose EPERM means "not privileged enough".
    pub(crate) fn from_privileged(action: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                action,
                hint: PRIVILEGE_HINT,
                source,
            },
            _ => Error::Io { op: action, source },
        }
    }
}
