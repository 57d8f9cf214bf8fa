//! The backend's options, with QEMU `-netdev af-xdp` semantics:
//! `ifname=IF[,queues=N][,start-queue=M][,mode=native|skb][,force-copy=on]
//! [,inhibit=on][,sock-fds=a:b:...][,filter-fds=c:t:f][,map-path=PATH][,map-start-index=N]`.

use std::os::fd::RawFd;
use std::str::FromStr;

use crate::error::ConfigError;
use crate::program::RxFilter;

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): fast; zero-copy possible.
    Native,
    /// Generic XDP on the skb path (`XDP_FLAGS_SKB_MODE`): any driver,
    /// always copy mode.
    Skb,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Skb => "skb",
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who fills the TCP/UDP checksums a caller leaves open on transmit
/// (`tx-csum=`, not a QEMU option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxChecksum {
    /// The kernel, through AF_XDP TX metadata (`XDP_TXMD_FLAGS_CHECKSUM`,
    /// Linux 6.8+): in copy mode the frame becomes a CHECKSUM_PARTIAL skb
    /// that the device (or the stack's software fallback) completes. On
    /// older kernels the caller fills them (see [`crate::XskQueue::tx_checksum`]).
    Kernel,
    /// As `Kernel`, but the kernel computes the checksum in software
    /// right away (`XDP_UMEM_TX_SW_CSUM`, Linux 6.11+): a debugging and
    /// testing aid that makes the filled checksum visible on a veth peer.
    KernelSoftware,
    /// The caller (xskvm's IO thread) fills them itself.
    Caller,
}

/// UMEM geometry per queue. Not part of the option string (QEMU has no
/// such keys); set it on the config in code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UmemConfig {
    /// Bytes per frame (power of two, 2048..=page size). The kernel puts
    /// received frames 256 bytes into a frame (XDP headroom), so the
    /// largest frame received is `frame_size - 256`: 3840 bytes at the
    /// default 4096, room for an MTU of ~3800.
    pub frame_size: u32,
    /// Frames for receiving; also the fill and rx ring sizes (power of two).
    pub rx_frames: u32,
    /// Frames for transmitting; also the tx and completion ring sizes
    /// (power of two).
    pub tx_frames: u32,
}

impl Default for UmemConfig {
    fn default() -> Self {
        UmemConfig {
            frame_size: 4096,
            rx_frames: 2048,
            tx_frames: 2048,
        }
    }
}

/// Largest ring the kernel accepts without complaint in practice; more is
/// only memory.
const MAX_FRAMES: u32 = 1 << 16;
/// Smallest pool that still allows a useful batch.
const MIN_FRAMES: u32 = 8;
/// Where the kernel copies a received frame inside its UMEM frame.
pub(crate) const XDP_PACKET_HEADROOM: u32 = 256;

impl UmemConfig {
    /// Bytes of UMEM one queue registers (and locks).
    pub fn bytes(&self) -> u64 {
        u64::from(self.frame_size) * u64::from(self.rx_frames + self.tx_frames)
    }

    /// The longest frame that can be received (frame size minus the XDP
    /// headroom the kernel leaves in front of it).
    /// Bytes of UMEM one queue registers (what RLIMIT_MEMLOCK is charged).
    pub fn bytes_per_queue(&self) -> u64 {
        u64::from(self.frame_size) * (u64::from(self.rx_frames) + u64::from(self.tx_frames))
    }

    pub fn max_rx_frame(&self) -> u32 {
        self.frame_size - XDP_PACKET_HEADROOM
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
        if !self.frame_size.is_power_of_two() || self.frame_size < 2048 || self.frame_size > page {
            return Err(ConfigError::BadUmem(format!(
                "frame size {} must be a power of two from 2048 to the page size {page}",
                self.frame_size
            )));
        }
        for (what, n) in [("rx_frames", self.rx_frames), ("tx_frames", self.tx_frames)] {
            if !n.is_power_of_two() || !(MIN_FRAMES..=MAX_FRAMES).contains(&n) {
                return Err(ConfigError::BadUmem(format!(
                    "{what}={n} must be a power of two from {MIN_FRAMES} to {MAX_FRAMES}"
                )));
            }
        }
        Ok(())
    }
}

/// A parsed and validated `af-xdp` backend configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfXdpConfig {
    /// Host interface (`ifname=`).
    pub ifname: String,
    /// Queue pairs, one AF_XDP socket each (`queues=`, default 1).
    pub queues: u32,
    /// First device queue used (`start-queue=`, default 0).
    pub start_queue: u32,
    /// `mode=`; `None` (the default) tries native and falls back to skb.
    pub mode: Option<XdpMode>,
    /// `force-copy=on`: never zero-copy.
    pub force_copy: bool,
    /// `inhibit=on`: load and attach no XDP program.
    pub inhibit: bool,
    /// `sock-fds=a:b:...`: adopt these AF_XDP sockets, one per queue.
    pub sock_fds: Option<Vec<RawFd>>,
    /// `filter-fds=c:t:f`: adopt the receive filter maps of the program
    /// the sockets are in (config, MAC table, filtered-frame counters, as
    /// `xskvm-net-helper` passes them); needs `sock-fds`.
    pub filter_fds: Option<[RawFd; 3]>,
    /// `tx-csum=kernel|vmm` (default kernel where the kernel can).
    pub tx_checksum: TxChecksum,
    /// `map-path=PATH`: put the sockets into the XSKMAP pinned at PATH
    /// (bpffs) by someone else's program; needs `inhibit=on`.
    pub map_path: Option<String>,
    /// `map-start-index=N`: the key of the first queue's socket in that
    /// map (queue i goes to N+i); None when not given (means 0).
    pub map_start_index: Option<u32>,
    /// Whether `queues=` was given (only for error messages).
    pub queues_given: bool,
    /// UMEM geometry per queue.
    pub umem: UmemConfig,
    /// `umem=guest`: the UMEM of every queue is the caller's memory (guest
    /// RAM followed by an area for the queues' own frames), opened with
    /// [`crate::AfXdpNic::open_on`]; `umem=own` (the default): each queue
    /// maps a UMEM of its own.
    pub guest_umem: bool,
    /// `tx-gather=on` (needs `umem=guest`): the VMM sends frames from
    /// guest memory as they lie there rather than copying them into the
    /// queue's own frames. Off by default: in copy mode the kernel copies
    /// each descriptor again and allocates a page per extra one, which
    /// costs more than the copy saved (docs/umem-guest.md).
    pub tx_gather: bool,
    /// Which frames the sockets get from the moment they enter our
    /// program's XSKMAP (not an option: the VMM sets it from the guest's
    /// MAC and receive mode). `None`: every frame of the NIC's queues until
    /// the filter is set through [`crate::RxFilterMaps::set`], the host's
    /// own unicast included.
    pub rx_filter: Option<RxFilter>,
}

/// The option keys this crate understands.
pub const OPTION_KEYS: [&str; 13] = [
    "ifname",
    "queues",
    "start-queue",
    "mode",
    "force-copy",
    "inhibit",
    "sock-fds",
    "filter-fds",
    "tx-csum",
    "map-path",
    "map-start-index",
    "umem",
    "tx-gather",
];

/// `(key, value)` pairs handed back by [`AfXdpConfig::parse_allowing`].
pub type CallerOptions<'a> = Vec<(&'a str, &'a str)>;

/// Most queue pairs accepted (QEMU's limit for a NIC).
const MAX_QUEUES: u32 = 1024;

fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(ConfigError::BadValue {
            key,
            value: value.to_string(),
            expected: "on or off",
        }),
    }
}

fn parse_u32(key: &'static str, value: &str, expected: &'static str) -> Result<u32, ConfigError> {
    value.parse::<u32>().map_err(|_| ConfigError::BadValue {
        key,
        value: value.to_string(),
        expected,
    })
}

impl AfXdpConfig {
    /// A configuration with every option at its default.
    pub fn new(ifname: impl Into<String>) -> Self {
        AfXdpConfig {
            ifname: ifname.into(),
            queues: 1,
            start_queue: 0,
            mode: None,
            force_copy: false,
            inhibit: false,
            sock_fds: None,
            filter_fds: None,
            tx_checksum: TxChecksum::Kernel,
            map_path: None,
            map_start_index: None,
            queues_given: false,
            umem: UmemConfig::default(),
            guest_umem: false,
            tx_gather: false,
            rx_filter: None,
        }
    }

    /// Parses the option string; every key must be one of [`OPTION_KEYS`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_allowing(text, &[]).map(|(config, _)| config)
    }

    /// Parses the option string, passing keys listed in `caller_keys` back
    /// to the caller (in order, as `(key, value)`) instead of rejecting
    /// them: the VMM lists the keys it owns (e.g. `mac`) and interprets
    /// them itself. The crate's own keys always win; any other key is an
    /// error.
    pub fn parse_allowing<'a>(
        text: &'a str,
        caller_keys: &[&str],
    ) -> Result<(Self, CallerOptions<'a>), ConfigError> {
        let mut config = AfXdpConfig::new(String::new());
        let mut passed = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for item in text.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(item.to_string()))?;
            if !OPTION_KEYS.contains(&key) {
                if caller_keys.contains(&key) {
                    passed.push((key, value));
                    continue;
                }
                return Err(ConfigError::UnknownOption {
                    key: key.to_string(),
                    known: OPTION_KEYS
                        .iter()
                        .chain(caller_keys)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            if seen.contains(&key) {
                return Err(ConfigError::Duplicate(key.to_string()));
            }
            seen.push(key);
            match key {
                "ifname" => config.ifname = value.to_string(),
                "queues" => {
                    let n = parse_u32("queues", value, "a number from 1 to 1024")?;
                    if !(1..=MAX_QUEUES).contains(&n) {
                        return Err(ConfigError::BadValue {
                            key: "queues",
                            value: value.to_string(),
                            expected: "a number from 1 to 1024",
                        });
                    }
                    config.queues = n;
                    config.queues_given = true;
                }
                "start-queue" => {
                    config.start_queue =
                        parse_u32("start-queue", value, "a queue number (0 or more)")?;
                }
                "mode" => {
                    config.mode = Some(match value {
                        "native" => XdpMode::Native,
                        "skb" => XdpMode::Skb,
                        _ => {
                            return Err(ConfigError::BadValue {
                                key: "mode",
                                value: value.to_string(),
                                expected: "native or skb",
                            })
                        }
                    })
                }
                "force-copy" => config.force_copy = parse_bool("force-copy", value)?,
                "inhibit" => config.inhibit = parse_bool("inhibit", value)?,
                "tx-csum" => {
                    config.tx_checksum = match value {
                        "kernel" => TxChecksum::Kernel,
                        "vmm" => TxChecksum::Caller,
                        _ => {
                            return Err(ConfigError::BadValue {
                                key: "tx-csum",
                                value: value.to_string(),
                                expected: "kernel or vmm",
                            })
                        }
                    }
                }
                "sock-fds" => {
                    let fds = value
                        .split(':')
                        .map(|fd| {
                            fd.parse::<RawFd>()
                                .ok()
                                .filter(|&fd| fd >= 0)
                                .ok_or_else(|| ConfigError::BadValue {
                                    key: "sock-fds",
                                    value: value.to_string(),
                                    expected: "file descriptor numbers separated by ':' (e.g. 3:4)",
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    config.sock_fds = Some(fds);
                }
                "filter-fds" => {
                    let bad = || ConfigError::BadValue {
                        key: "filter-fds",
                        value: value.to_string(),
                        expected: "three file descriptor numbers separated by ':' (e.g. 5:6:7)",
                    };
                    let fds = value
                        .split(':')
                        .map(|fd| fd.parse::<RawFd>().ok().filter(|&fd| fd >= 0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(bad)?;
                    config.filter_fds = Some(fds.try_into().map_err(|_| bad())?);
                }
                "map-path" => config.map_path = Some(value.to_string()),
                "map-start-index" => {
                    config.map_start_index = Some(parse_u32(
                        "map-start-index",
                        value,
                        "a map key (0 or more)",
                    )?);
                }
                "umem" => {
                    config.guest_umem = match value {
                        "own" => false,
                        "guest" => true,
                        _ => {
                            return Err(ConfigError::BadValue {
                                key: "umem",
                                value: value.to_string(),
                                expected: "own or guest",
                            })
                        }
                    }
                }
                "tx-gather" => config.tx_gather = parse_bool("tx-gather", value)?,
                _ => unreachable!("key checked against OPTION_KEYS"),
            }
        }
        config.validate()?;
        Ok((config, passed))
    }

    /// Checks the combination of options (also for configs built in code).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ifname.is_empty() {
            return Err(ConfigError::MissingIfname);
        }
        if self.ifname.len() >= libc::IFNAMSIZ
            || self.ifname.contains(['/', '\0', ':'])
            || self.ifname.chars().any(char::is_whitespace)
        {
            return Err(ConfigError::BadValue {
                key: "ifname",
                value: self.ifname.clone(),
                expected: "an interface name (at most 15 characters, no '/', ':' or spaces)",
            });
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(ConfigError::BadValue {
                key: "queues",
                value: self.queues.to_string(),
                expected: "a number from 1 to 1024",
            });
        }
        if self.start_queue.checked_add(self.queues).is_none() {
            return Err(ConfigError::BadValue {
                key: "start-queue",
                value: self.start_queue.to_string(),
                expected: "a queue number that leaves room for all queues",
            });
        }
        if self.tx_gather && !self.guest_umem {
            return Err(ConfigError::TxGatherWithoutGuestUmem);
        }
        if let Some(fds) = &self.sock_fds {
            if !self.inhibit {
                return Err(ConfigError::SockFdsWithoutInhibit);
            }
            if fds.len() != self.queues as usize {
                return Err(ConfigError::SockFdsCount {
                    fds: fds.len(),
                    queues: self.queues,
                    queues_given: self.queues_given,
                });
            }
            for (i, fd) in fds.iter().enumerate() {
                if fds[..i].contains(fd) {
                    return Err(ConfigError::DuplicateSockFd(*fd));
                }
            }
        }
        if let Some(fds) = &self.filter_fds {
            // The maps belong to the program the sockets are in.
            if self.sock_fds.is_none() {
                return Err(ConfigError::FilterFdsWithoutSockFds);
            }
            let socks = self.sock_fds.as_deref().unwrap_or_default();
            for (i, fd) in fds.iter().enumerate() {
                if fds[..i].contains(fd) || socks.contains(fd) {
                    return Err(ConfigError::DuplicateFilterFd(*fd));
                }
            }
        }
        if let Some(path) = &self.map_path {
            if !self.inhibit {
                return Err(ConfigError::MapPathWithoutInhibit);
            }
            if self.sock_fds.is_some() {
                return Err(ConfigError::MapPathWithSockFds);
            }
            if path.is_empty() || path.contains('\0') {
                return Err(ConfigError::BadValue {
                    key: "map-path",
                    value: path.clone(),
                    expected: "the path of a pinned XSKMAP (e.g. /sys/fs/bpf/xsks_map)",
                });
            }
        }
        if let Some(start) = self.map_start_index {
            if self.map_path.is_none() {
                return Err(ConfigError::MapStartIndexWithoutMapPath);
            }
            if start.checked_add(self.queues).is_none() {
                return Err(ConfigError::BadValue {
                    key: "map-start-index",
                    value: start.to_string(),
                    expected: "a map key that leaves room for all queues",
                });
            }
        }
        self.umem.validate()
    }

    /// Bytes of UMEM the queues' own frames take: their UMEMs with
    /// `umem=own`, their area after guest RAM with `umem=guest`.
    pub fn queue_umem_bytes(&self) -> u64 {
        self.umem.bytes_per_queue() * u64::from(self.queues)
    }

    /// The XSKMAP keys the sockets take with `map-path` (queue i at
    /// `map-start-index + i`).
    pub fn map_keys(&self) -> std::ops::Range<u32> {
        let start = self.map_start_index.unwrap_or(0);
        start..start.saturating_add(self.queues)
    }

    /// The device queue ids this config uses.
    pub fn queue_ids(&self) -> std::ops::Range<u32> {
        self.start_queue..self.start_queue + self.queues
    }
}

impl FromStr for AfXdpConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        AfXdpConfig::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c: AfXdpConfig = "ifname=eth0".parse().unwrap();
        assert_eq!(c, AfXdpConfig::new("eth0"));
        assert_eq!(c.queues, 1);
        assert_eq!(c.start_queue, 0);
        assert_eq!(c.mode, None);
        assert!(!c.force_copy && !c.inhibit);
        assert_eq!(c.umem.frame_size, 4096);
        assert_eq!(c.umem.max_rx_frame(), 3840);
        assert_eq!(c.queue_ids(), 0..1);
    }

    #[test]
    fn every_option() {
        let c = AfXdpConfig::parse(
            "ifname=veth0,queues=2,start-queue=3,mode=skb,force-copy=on,inhibit=on,sock-fds=7:9",
        )
        .unwrap();
        assert_eq!(c.ifname, "veth0");
        assert_eq!(c.queues, 2);
        assert_eq!(c.queue_ids(), 3..5);
        assert_eq!(c.mode, Some(XdpMode::Skb));
        assert!(c.force_copy && c.inhibit);
        assert_eq!(c.sock_fds, Some(vec![7, 9]));
        let c = AfXdpConfig::parse("mode=native,force-copy=off,ifname=x").unwrap();
        assert_eq!(c.mode, Some(XdpMode::Native));
        assert!(!c.force_copy);
        assert_eq!(c.tx_checksum, TxChecksum::Kernel, "the default");
        let c = AfXdpConfig::parse("ifname=x,tx-csum=vmm").unwrap();
        assert_eq!(c.tx_checksum, TxChecksum::Caller);
        let c = AfXdpConfig::parse("ifname=x,tx-csum=kernel").unwrap();
        assert_eq!(c.tx_checksum, TxChecksum::Kernel);
        assert!(matches!(
            AfXdpConfig::parse("ifname=x,tx-csum=nic"),
            Err(ConfigError::BadValue { key: "tx-csum", .. })
        ));
    }

    #[test]
    fn tx_gather_is_off_by_default_and_needs_guest_memory() {
        assert!(!AfXdpConfig::parse("ifname=x,umem=guest").unwrap().tx_gather);
        assert!(
            AfXdpConfig::parse("ifname=x,umem=guest,tx-gather=on")
                .unwrap()
                .tx_gather
        );
        assert!(
            !AfXdpConfig::parse("ifname=x,umem=guest,tx-gather=off")
                .unwrap()
                .tx_gather
        );
        assert_eq!(
            AfXdpConfig::parse("ifname=x,tx-gather=on"),
            Err(ConfigError::TxGatherWithoutGuestUmem)
        );
        assert!(matches!(
            AfXdpConfig::parse("ifname=x,umem=guest,tx-gather=maybe"),
            Err(ConfigError::BadValue {
                key: "tx-gather",
                ..
            })
        ));
    }

    #[test]
    fn umem_takes_own_or_guest() {
        assert!(
            !AfXdpConfig::parse("ifname=x").unwrap().guest_umem,
            "the default"
        );
        assert!(!AfXdpConfig::parse("ifname=x,umem=own").unwrap().guest_umem);
        let c = AfXdpConfig::parse("ifname=x,umem=guest,queues=3").unwrap();
        assert!(c.guest_umem);
        assert_eq!(c.queue_umem_bytes(), 3 * c.umem.bytes_per_queue());
        assert!(matches!(
            AfXdpConfig::parse("ifname=x,umem=host"),
            Err(ConfigError::BadValue { key: "umem", .. })
        ));
        // The helper passes sockets for guest-memory UMEMs too.
        assert!(AfXdpConfig::parse("ifname=x,inhibit=on,sock-fds=3,umem=guest").is_ok());
    }

    #[test]
    fn caller_keys_are_passed_back_and_others_rejected() {
        let (c, passed) =
            AfXdpConfig::parse_allowing("ifname=eth1,mac=52:54:00:12:34:56,queues=2", &["mac"])
                .unwrap();
        assert_eq!(c.queues, 2);
        assert_eq!(passed, vec![("mac", "52:54:00:12:34:56")]);
        assert_eq!(
            AfXdpConfig::parse("ifname=eth1,mac=52:54:00:12:34:56"),
            Err(ConfigError::UnknownOption {
                key: "mac".into(),
                known: OPTION_KEYS.join(", ")
            })
        );
        // The crate's own keys cannot be taken over by the caller.
        let (c, passed) = AfXdpConfig::parse_allowing("ifname=a,queues=3", &["queues"]).unwrap();
        assert_eq!((c.queues, passed.len()), (3, 0));
    }

    #[test]
    fn an_unknown_option_lists_every_known_one() {
        let message = AfXdpConfig::parse_allowing("ifname=x,umme=guest", &["mac", "spoof-check"])
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"umme\""), "{message}");
        for key in OPTION_KEYS.iter().chain(&["mac", "spoof-check"]) {
            assert!(message.contains(key), "{key} missing from: {message}");
        }
    }

    #[test]
    fn each_bad_value_has_its_error() {
        use ConfigError::*;
        let err = |s: &str| AfXdpConfig::parse(s).unwrap_err();
        assert_eq!(err(""), MissingIfname);
        assert_eq!(err("queues=2"), MissingIfname);
        assert_eq!(err("ifname"), NotKeyValue("ifname".into()));
        assert!(matches!(err("ifname=a,bogus=1"), UnknownOption { key, .. } if key == "bogus"));
        assert_eq!(err("ifname=a,ifname=b"), Duplicate("ifname".into()));
        assert!(matches!(
            err("ifname=a,queues=0"),
            BadValue { key: "queues", .. }
        ));
        assert!(matches!(
            err("ifname=a,queues=x"),
            BadValue { key: "queues", .. }
        ));
        assert!(matches!(
            err("ifname=a,queues=5000"),
            BadValue { key: "queues", .. }
        ));
        assert!(matches!(
            err("ifname=a,start-queue=-1"),
            BadValue {
                key: "start-queue",
                ..
            }
        ));
        assert!(matches!(
            err("ifname=a,start-queue=4294967295,queues=2"),
            BadValue {
                key: "start-queue",
                ..
            }
        ));
        assert!(matches!(
            err("ifname=a,mode=drv"),
            BadValue { key: "mode", .. }
        ));
        assert!(matches!(
            err("ifname=a,force-copy=1"),
            BadValue {
                key: "force-copy",
                ..
            }
        ));
        assert!(matches!(
            err("ifname=a,inhibit=maybe"),
            BadValue { key: "inhibit", .. }
        ));
        assert!(matches!(
            err("ifname=a,inhibit=on,sock-fds=3:x"),
            BadValue {
                key: "sock-fds",
                ..
            }
        ));
        assert!(matches!(
            err("ifname=a,inhibit=on,sock-fds="),
            BadValue {
                key: "sock-fds",
                ..
            }
        ));
        assert!(matches!(
            err("ifname=a,inhibit=on,sock-fds=-3"),
            BadValue {
                key: "sock-fds",
                ..
            }
        ));
        assert!(matches!(
            err("ifname=this-name-is-too-long"),
            BadValue { key: "ifname", .. }
        ));
        assert!(matches!(err("ifname=a/b"), BadValue { key: "ifname", .. }));
        assert_eq!(err("ifname=a,sock-fds=3"), SockFdsWithoutInhibit);
        assert_eq!(
            err("ifname=a,inhibit=on,sock-fds=3:4"),
            SockFdsCount {
                fds: 2,
                queues: 1,
                queues_given: false
            }
        );
        assert_eq!(
            err("ifname=a,inhibit=on,queues=3,sock-fds=3:4"),
            SockFdsCount {
                fds: 2,
                queues: 3,
                queues_given: true
            }
        );
        assert_eq!(
            err("ifname=a,inhibit=on,queues=2,sock-fds=3:3"),
            DuplicateSockFd(3)
        );
    }

    #[test]
    fn filter_fds() {
        let c = AfXdpConfig::parse("ifname=a,inhibit=on,queues=2,sock-fds=3:4,filter-fds=5:6:7")
            .unwrap();
        assert_eq!(c.filter_fds, Some([5, 6, 7]));
        assert_eq!(AfXdpConfig::new("a").filter_fds, None);
        let err = |s: &str| AfXdpConfig::parse(s).unwrap_err();
        use ConfigError::*;
        for bad in ["5:6", "5:6:7:8", "5:x:7", "5:-6:7", "", "5::7"] {
            assert!(
                matches!(
                    err(&format!("ifname=a,inhibit=on,sock-fds=3,filter-fds={bad}")),
                    BadValue {
                        key: "filter-fds",
                        ..
                    }
                ),
                "filter-fds={bad}"
            );
        }
        // The helper's maps go with the helper's sockets only.
        assert_eq!(err("ifname=a,filter-fds=5:6:7"), FilterFdsWithoutSockFds);
        assert_eq!(
            err("ifname=a,inhibit=on,map-path=/m,filter-fds=5:6:7"),
            FilterFdsWithoutSockFds
        );
        assert_eq!(
            err("ifname=a,inhibit=on,sock-fds=3,filter-fds=5:6:5"),
            DuplicateFilterFd(5)
        );
        assert_eq!(
            err("ifname=a,inhibit=on,sock-fds=3,filter-fds=5:3:7"),
            DuplicateFilterFd(3)
        );
        assert!(FilterFdsWithoutSockFds
            .to_string()
            .contains("needs sock-fds"));
    }

    #[test]
    fn map_path_and_start_index() {
        let c = AfXdpConfig::parse(
            "ifname=eth0,queues=2,start-queue=14,inhibit=on,map-path=/sys/fs/bpf/xsks_map,map-start-index=14",
        )
        .unwrap();
        assert_eq!(c.map_path.as_deref(), Some("/sys/fs/bpf/xsks_map"));
        assert_eq!(c.map_start_index, Some(14));
        assert_eq!(c.map_keys(), 14..16);
        assert_eq!(c.queue_ids(), 14..16);
        // The start index defaults to 0, whatever start-queue is.
        let c = AfXdpConfig::parse("ifname=eth0,start-queue=3,inhibit=on,map-path=/m").unwrap();
        assert_eq!((c.map_start_index, c.map_keys()), (None, 0..1));
        assert_eq!(AfXdpConfig::new("eth0").map_path, None);
    }

    #[test]
    fn map_path_errors() {
        use ConfigError::*;
        let err = |s: &str| AfXdpConfig::parse(s).unwrap_err();
        assert_eq!(err("ifname=a,map-path=/m"), MapPathWithoutInhibit);
        assert_eq!(
            err("ifname=a,inhibit=off,map-path=/m"),
            MapPathWithoutInhibit
        );
        assert_eq!(
            err("ifname=a,inhibit=on,sock-fds=3,map-path=/m"),
            MapPathWithSockFds
        );
        assert_eq!(
            err("ifname=a,inhibit=on,map-start-index=2"),
            MapStartIndexWithoutMapPath
        );
        assert_eq!(
            err("ifname=a,inhibit=on,map-path=/m,map-path=/n"),
            Duplicate("map-path".into())
        );
        assert!(matches!(
            err("ifname=a,inhibit=on,map-path="),
            BadValue {
                key: "map-path",
                ..
            }
        ));
        for bad in ["-1", "x", "", "4294967296"] {
            assert!(
                matches!(
                    err(&format!(
                        "ifname=a,inhibit=on,map-path=/m,map-start-index={bad}"
                    )),
                    BadValue {
                        key: "map-start-index",
                        ..
                    }
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            err("ifname=a,queues=2,inhibit=on,map-path=/m,map-start-index=4294967295"),
            BadValue {
                key: "map-start-index",
                ..
            }
        ));
        // Each message says what to do.
        assert!(MapPathWithoutInhibit.to_string().contains("inhibit=on"));
        assert!(MapStartIndexWithoutMapPath
            .to_string()
            .contains("needs map-path"));
        assert!(err("ifname=a,bogus=1").to_string().contains("map-path"));
    }

    #[test]
    fn messages_name_the_problem() {
        let e = AfXdpConfig::parse("ifname=a,inhibit=on,sock-fds=3:4").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("2 socket(s)") && text.contains("queues=1 (the default)"),
            "{text}"
        );
        let e = AfXdpConfig::parse("ifname=a,mode=drv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "af-xdp: mode=\"drv\" is not valid: expected native or skb"
        );
    }

    #[test]
    fn umem_geometry_is_checked() {
        let mut c = AfXdpConfig::new("a");
        c.umem.frame_size = 3000;
        assert!(matches!(c.validate(), Err(ConfigError::BadUmem(_))));
        c.umem.frame_size = 2048;
        c.umem.rx_frames = 100;
        assert!(matches!(c.validate(), Err(ConfigError::BadUmem(_))));
        c.umem.rx_frames = 64;
        c.umem.tx_frames = 4;
        assert!(matches!(c.validate(), Err(ConfigError::BadUmem(_))));
        c.umem.tx_frames = 64;
        assert!(c.validate().is_ok());
        assert_eq!(c.umem.bytes(), 128 * 2048);
    }
}
