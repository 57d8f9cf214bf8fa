//! `xskvm-net-helper`: the privileged side of `inhibit=on,sock-fds=...`,
//! as libvirt is for QEMU's af-xdp. As root it opens each NIC, loads and
//! attaches xskvm's XDP program (through a BPF link), creates one AF_XDP
//! socket per queue and puts it in the program's XSKMAP, raises
//! RLIMIT_MEMLOCK by what the UMEMs will lock; then it becomes the given
//! unprivileged user (no capabilities, empty bounding set, no_new_privs)
//! and execs xskvm with `--net af-xdp,...,inhibit=on,sock-fds=a:b,filter-fds=c:t:f`.
//!
//! Across the exec xskvm inherits the sockets, the program's receive
//! filter maps (it keeps the guest's MAC filter in them) and the BPF
//! link's fd (it never uses that one): the program stays attached exactly
//! as long as xskvm lives, and goes when it exits however it exits (even
//! SIGKILL), with no process of the helper's left behind.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;

use clap::Parser;
use devices::virtio::net::RxMode;
use net_afxdp::{AfXdpConfig, PreparedSockets};

use crate::afxdp::initial_rx_filter;
use crate::cli::{parse_memory_spec, MemorySpec, DEFAULT_MEMORY};
use crate::net::{MacAddr, NetSpec, NetSpecError};

#[derive(Debug, Parser)]
#[command(
    name = "xskvm-net-helper",
    version,
    about = "Prepares AF_XDP NICs as root, then runs xskvm as an unprivileged user with them",
    after_help = "Example: xskvm-net-helper --user 1000:1000 --groups 108 --net af-xdp,ifname=eth0,queues=2 \
                  -- xskvm --kernel bzImage ...\n\
                  xskvm gets --net af-xdp,ifname=eth0,queues=2,mac=MAC,inhibit=on,sock-fds=A:B,filter-fds=C:T:F (the MAC \
                  the program filters by: the spec's, or one made up) and runs with no \
                  capabilities; give it access to /dev/kvm through --groups (the group owning it)."
)]
pub struct HelperArgs {
    /// The user xskvm runs as: numeric UID[:GID] (GID defaults to UID); not 0.
    #[arg(long, value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: (u32, u32),

    /// Supplementary groups of xskvm (numeric, comma-separated), e.g. the
    /// group that owns /dev/kvm. Default: none.
    #[arg(long, value_name = "GID,...", value_delimiter = ',')]
    pub groups: Vec<u32>,

    /// A NIC to prepare, as xskvm's --net (repeatable):
    /// af-xdp,ifname=IF[,mac=MAC][,spoof-check=off][,queues=N][,start-queue=M]
    /// [,mode=native|skb][,force-copy=on][,tx-csum=kernel|vmm]
    /// [,umem=own|guest[,tx-gather=on]]
    /// (umem=guest: RLIMIT_MEMLOCK is raised by the xskvm command's --memory
    /// too). inhibit, sock-fds, filter-fds and
    /// map-path are the helper's to set.
    #[arg(long, value_name = "SPEC", required = true)]
    pub net: Vec<String>,

    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: log::LevelFilter,

    /// The xskvm program and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "XSKVM [ARGS]")]
    pub command: Vec<OsString>,
}

/// Everything the helper can fail with; each ends it before xskvm runs.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("must run as root (it loads the XDP program and creates the sockets)")]
    NotRoot,
    #[error("--user 0: xskvm would run as root; give an unprivileged user")]
    RootUser,
    #[error(transparent)]
    Spec(#[from] NetSpecError),
    #[error("--net {spec}: {error}")]
    Backend { spec: String, error: String },
    #[error(
        "--net {spec}: {key} is the helper's to set (it loads the program and passes the sockets)"
    )]
    ReservedKey { spec: String, key: &'static str },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("capabilities are still held after changing to uid {uid}; refusing to run xskvm")]
    CapabilitiesLeft { uid: u32 },
    #[error("the xskvm command's --memory: {0}")]
    Memory(String),
    #[error("cannot run {program:?}: {source}")]
    Exec {
        program: OsString,
        source: std::io::Error,
    },
}

/// `UID[:GID]`, numeric.
pub fn parse_user(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text.split_once(':').unwrap_or((text, text));
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("'{text}' is not UID[:GID] with numeric ids"))
    };
    Ok((num(uid)?, num(gid)?))
}

/// One prepared NIC: what keeps it open until the exec, and the `--net`
/// argument xskvm gets.
struct Prepared {
    _sockets: PreparedSockets,
    xskvm_net: String,
    umem_bytes: u64,
}

fn os_err(what: &'static str) -> impl Fn(std::io::Error) -> HelperError {
    move |source| HelperError::Os { what, source }
}

fn cvt(ret: libc::c_int, what: &'static str) -> Result<(), HelperError> {
    if ret < 0 {
        return Err(HelperError::Os {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What the `umem=guest` NICs lock: each registers guest RAM with every
/// such NIC's queue area after it (one mapping, see
/// [`crate::vm::create_guest_memory`]), sized by the xskvm command's
/// `--memory`. 0 without such NICs.
fn guest_umem_lock_bytes(
    configs: &[AfXdpConfig],
    command: &[OsString],
) -> Result<u64, HelperError> {
    let nics = configs.iter().filter(|c| c.guest_umem).count() as u64;
    if nics == 0 {
        return Ok(0);
    }
    let area: u64 = configs
        .iter()
        .filter(|c| c.guest_umem)
        .map(AfXdpConfig::queue_umem_bytes)
        .sum();
    let memory = memory_of(command)?;
    Ok(nics * crate::vm::umem_mapping_len(memory.size, memory.hugepages, area))
}

/// The `--memory` of an xskvm command line (program first), as xskvm will
/// read it: the last one given, else the default.
fn memory_of(command: &[OsString]) -> Result<MemorySpec, HelperError> {
    let mut value: Option<String> = None;
    let mut args = command.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == "--memory" {
            value = Some(
                args.next()
                    .ok_or_else(|| HelperError::Memory("no value".into()))?
                    .into_owned(),
            );
        } else if let Some(v) = arg.strip_prefix("--memory=") {
            value = Some(v.to_string());
        }
    }
    parse_memory_spec(value.as_deref().unwrap_or(DEFAULT_MEMORY)).map_err(HelperError::Memory)
}

/// Lets `fd` survive the exec.
fn inherit(fd: RawFd) -> Result<(), HelperError> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor we hold open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    cvt(flags, "reading a descriptor's flags")?;
    // SAFETY: as above; clears FD_CLOEXEC only.
    cvt(
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) },
        "keeping a descriptor open across exec",
    )
}

/// Parses `--net` number `index` and refuses the keys that are the
/// helper's to set. Gives the spec xskvm gets (with a MAC: the one the
/// program filters by) and the backend's config.
fn check_spec(text: &str, index: usize) -> Result<(String, AfXdpConfig), HelperError> {
    let spec: NetSpec = text.parse()?;
    let mut config: AfXdpConfig = spec.backend_config().map_err(|e| HelperError::Backend {
        spec: text.to_string(),
        error: e.to_string(),
    })?;
    for (given, key) in [
        (config.inhibit, "inhibit"),
        (config.sock_fds.is_some(), "sock-fds"),
        (config.filter_fds.is_some(), "filter-fds"),
        (config.map_path.is_some(), "map-path"),
    ] {
        if given {
            return Err(HelperError::ReservedKey {
                spec: text.to_string(),
                key,
            });
        }
    }
    let mac = spec.mac.unwrap_or_else(|| MacAddr::generate(index));
    config.rx_filter = Some(initial_rx_filter(&RxMode::default_for(mac.0)));
    let text = match spec.mac {
        Some(_) => text.to_string(),
        None => format!("{text},mac={mac}"),
    };
    Ok((text, config))
}

fn prepare(text: &str, config: &AfXdpConfig) -> Result<Prepared, HelperError> {
    let sockets = PreparedSockets::create(config).map_err(|e| HelperError::Backend {
        spec: text.to_string(),
        error: e.to_string(),
    })?;
    let mut fds = Vec::new();
    for socket in &sockets.sockets {
        inherit(socket.as_raw_fd())?;
        fds.push(socket.as_raw_fd().to_string());
    }
    // The link goes to xskvm too: it alone keeps the program attached.
    // So do the receive filter's maps: xskvm sets the guest's MAC, modes
    // and MAC table in them (updates through an fd need no capability).
    let mut filter = String::new();
    if let Some(attachment) = sockets.owner.attachment() {
        inherit(attachment.link_fd())?;
        let maps = attachment.program().rx_filter().raw_fds();
        for fd in maps {
            inherit(fd)?;
        }
        filter = format!(",filter-fds={}:{}:{}", maps[0], maps[1], maps[2]);
        log::info!(
            "{}: XDP program id {} attached in {} mode; BPF link fd {}, sockets {} and filter \
             maps {filter} go to xskvm",
            config.ifname,
            attachment.program().id().unwrap_or(0),
            attachment.mode(),
            attachment.link_fd(),
            fds.join(":")
        );
    }
    Ok(Prepared {
        xskvm_net: format!("{text},inhibit=on,sock-fds={}{filter}", fds.join(":")),
        // umem=guest: counted with guest memory (guest_umem_lock_bytes).
        umem_bytes: if config.guest_umem {
            0
        } else {
            config.queue_umem_bytes()
        },
        _sockets: sockets,
    })
}

/// Becomes `uid:gid` with `groups`, holding no capability: the bounding
/// and ambient sets are emptied first (as root), then the uid change
/// clears the rest; no_new_privs keeps an exec from gaining any.
fn become_user(uid: u32, gid: u32, groups: &[u32]) -> Result<(), HelperError> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ only reads; EINVAL past the last capability.
        let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if held < 0 {
            break;
        }
        if held == 1 {
            // SAFETY: changes only this process's bounding set.
            cvt(
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) },
                "dropping the capability bounding set",
            )?;
        }
    }
    // SAFETY: clears the ambient set; no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: groups points to groups.len() gids.
    cvt(
        unsafe { libc::setgroups(groups.len(), groups.as_ptr()) },
        "setting the supplementary groups",
    )?;
    // SAFETY: plain id changes, group before user (after it, no privilege).
    cvt(unsafe { libc::setresgid(gid, gid, gid) }, "changing group")?;
    // SAFETY: as above.
    cvt(unsafe { libc::setresuid(uid, uid, uid) }, "changing user")?;
    // SAFETY: only sets this process's no_new_privs flag.
    cvt(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "setting no_new_privs",
    )?;
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(os_err("reading /proc/self/status"))?;
    let all_zero = ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"]
        .iter()
        .all(|key| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .is_some_and(|l| l.trim_end().ends_with("0000000000000000"))
        });
    if !all_zero {
        return Err(HelperError::CapabilitiesLeft { uid });
    }
    Ok(())
}

/// Does the helper's work and execs xskvm; returns only on error (the
/// NICs prepared so far are closed then, detaching the program).
pub fn run(args: HelperArgs) -> HelperError {
    match try_run(args) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_run(args: HelperArgs) -> Result<std::convert::Infallible, HelperError> {
    // Bad input first, whoever runs it; then nothing is opened.
    let (uid, gid) = args.user;
    if uid == 0 {
        return Err(HelperError::RootUser);
    }
    let (texts, configs): (Vec<String>, Vec<AfXdpConfig>) = args
        .net
        .iter()
        .enumerate()
        .map(|(index, text)| check_spec(text, index))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(HelperError::NotRoot);
    }
    let prepared = texts
        .iter()
        .zip(&configs)
        .map(|(text, config)| prepare(text, config))
        .collect::<Result<Vec<_>, _>>()?;
    // What the UMEMs will lock, no more: the limit xskvm inherits.
    let umem_bytes: u64 = prepared.iter().map(|p| p.umem_bytes).sum::<u64>()
        + guest_umem_lock_bytes(&configs, &args.command)?;
    if !net_afxdp::raise_memlock(umem_bytes) {
        log::warn!(
            "cannot raise RLIMIT_MEMLOCK by the {} KiB the UMEMs lock (no CAP_SYS_RESOURCE?); \
             xskvm may fail to register them",
            umem_bytes >> 10
        );
    }
    become_user(uid, gid, &args.groups)?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| HelperError::Exec {
            program: OsString::new(),
            source: std::io::Error::other("no xskvm command given after --"),
        })?;
    let mut command = std::process::Command::new(program);
    command.args(rest);
    for p in &prepared {
        command.arg("--net").arg(&p.xskvm_net);
    }
    let source = command.exec();
    Err(HelperError::Exec {
        program: program.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn guest_memory_nics_lock_guest_ram_and_their_queue_areas() {
        let own: AfXdpConfig = "ifname=a,queues=2".parse().unwrap();
        let guest: AfXdpConfig = "ifname=b,queues=2,umem=guest".parse().unwrap();
        let guest1: AfXdpConfig = "ifname=c,umem=guest".parse().unwrap();
        let per_queue = own.umem.bytes_per_queue();
        let xskvm = command(&["xskvm", "--kernel", "k", "--memory", "256M"]);
        assert_eq!(
            guest_umem_lock_bytes(std::slice::from_ref(&own), &xskvm).unwrap(),
            0
        );
        assert_eq!(
            guest_umem_lock_bytes(&[own.clone(), guest.clone()], &xskvm).unwrap(),
            (256 << 20) + 2 * per_queue
        );
        // Two such NICs: each registers the whole mapping, both areas in it.
        assert_eq!(
            guest_umem_lock_bytes(&[guest.clone(), guest1], &xskvm).unwrap(),
            2 * ((256 << 20) + 3 * per_queue)
        );
        // The default size, the last of several, hugepage rounding.
        let none = command(&["xskvm", "--kernel", "k"]);
        assert_eq!(
            guest_umem_lock_bytes(std::slice::from_ref(&guest), &none).unwrap(),
            (512 << 20) + 2 * per_queue
        );
        let two = command(&[
            "xskvm",
            "--memory=128M",
            "--memory",
            "1G,hugepages=on,hugepage-size=1G",
        ]);
        assert_eq!(
            guest_umem_lock_bytes(std::slice::from_ref(&guest), &two).unwrap(),
            2 << 30
        );
        let bad = command(&["xskvm", "--memory", "lots"]);
        assert!(matches!(
            guest_umem_lock_bytes(std::slice::from_ref(&guest), &bad),
            Err(HelperError::Memory(_))
        ));
        let missing = command(&["xskvm", "--memory"]);
        assert!(matches!(
            guest_umem_lock_bytes(&[guest], &missing),
            Err(HelperError::Memory(_))
        ));
    }

    #[test]
    fn user_and_arguments() {
        assert_eq!(parse_user("1000"), Ok((1000, 1000)));
        assert_eq!(parse_user("1000:108"), Ok((1000, 108)));
        assert!(parse_user("alice").is_err());
        assert!(parse_user("1000:").is_err());
        let args = HelperArgs::try_parse_from([
            "xskvm-net-helper",
            "--user",
            "4241:4241",
            "--groups",
            "4242,4243",
            "--net",
            "af-xdp,ifname=xs0",
            "--",
            "xskvm",
            "--kernel",
            "k",
        ])
        .unwrap();
        assert_eq!(args.user, (4241, 4241));
        assert_eq!(args.groups, vec![4242, 4243]);
        assert_eq!(args.command, ["xskvm", "--kernel", "k"]);
        // No NIC or no xskvm command: refused.
        assert!(HelperArgs::try_parse_from(["h", "--user", "1", "--", "xskvm"]).is_err());
        assert!(
            HelperArgs::try_parse_from(["h", "--user", "1", "--net", "af-xdp,ifname=a"]).is_err()
        );
    }

    #[test]
    fn reserved_keys_are_refused_before_anything_is_opened() {
        for (spec, key) in [
            ("af-xdp,ifname=a,inhibit=on", "inhibit"),
            ("af-xdp,ifname=a,inhibit=on,sock-fds=3", "inhibit"),
            ("af-xdp,ifname=a,inhibit=on,map-path=/m", "inhibit"),
            (
                "af-xdp,ifname=a,inhibit=on,sock-fds=3,filter-fds=4:5:6",
                "inhibit",
            ),
        ] {
            match check_spec(spec, 0) {
                Err(HelperError::ReservedKey { key: k, .. }) => assert_eq!(k, key),
                Err(e) => panic!("{spec}: {e}"),
                Ok(_) => panic!("{spec}: accepted"),
            }
        }
        assert!(matches!(
            check_spec("tap,ifname=a", 0),
            Err(HelperError::Spec(NetSpecError::UnknownBackend(_)))
        ));
        assert!(matches!(
            check_spec("af-xdp,ifname=a,bogus=1", 0),
            Err(HelperError::Backend { .. })
        ));
    }

    /// Regression: the helper's program redirected every frame of the
    /// NIC's queues into its sockets, unbound until xskvm binds them (so
    /// dropped), for as long as xskvm took to start: the host's own
    /// unicast included. It now filters by the guest's MAC from the start,
    /// and xskvm gets the same MAC when the spec named none.
    #[test]
    fn the_helpers_program_filters_by_the_guests_mac_from_the_start() {
        use net_afxdp::testbed::{filtered_after_sending, PacketSocket, VethPair};
        let pair = VethPair::for_test(1);
        let (text, config) =
            check_spec(&format!("af-xdp,ifname={},mode=native", pair.a), 0).expect("spec");
        let guest = text
            .parse::<NetSpec>()
            .expect("xskvm's spec")
            .mac
            .expect("xskvm is told the MAC the program filters by");
        // What prepare() makes, without handing its descriptors on (this
        // process does not exec).
        let prepared = pair
            .run(|| PreparedSockets::create(&config))
            .expect("enter netns")
            .expect("prepare");
        let filter = prepared.owner.rx_filter().expect("the helper's program");
        let peer = pair
            .run(|| PacketSocket::open(&pair.b))
            .expect("enter netns")
            .expect("packet socket");
        let (host, peer_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
        assert_eq!(
            filtered_after_sending(&peer, filter, peer_mac, &[host, guest.0, host], 2)
                .expect("send"),
            2,
            "the host's frames pass to it"
        );
    }
}
