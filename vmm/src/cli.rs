//! Command-line interface of the `xskvm` binary.

use std::path::PathBuf;

use clap::Parser;

/// Kernel command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

#[derive(Debug, Parser)]
#[command(
    name = "xskvm",
    version,
    about = "A small KVM virtual machine monitor with AF_XDP networking",
    after_help = "A guest reboot, power-off or SIGINT/SIGTERM ends xskvm with status 0; \
                  a guest crash or KVM error ends it with status 1."
)]
pub struct Args {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line (replaces the default).
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM: a number with a K, M or G suffix (no suffix means MiB),
    /// then optionally `,hugepages=on` to back it with 2 MiB hugepages
    /// (`,hugepage-size=1G` for 1 GiB ones) reserved on the host
    /// (/proc/sys/vm/nr_hugepages, or the hugepages-SIZE directories in
    /// /sys/kernel/mm/hugepages).
    #[arg(long, value_name = "SIZE[,hugepages=on][,hugepage-size=2M|1G]", default_value = DEFAULT_MEMORY, value_parser = parse_memory_spec)]
    pub memory: MemorySpec,

    /// Number of virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,

    /// A NIC backed by AF_XDP sockets on a host interface (repeatable):
    /// af-xdp,ifname=IF[,mac=MAC][,spoof-check=off][,queues=N][,start-queue=M]
    /// [,mode=native|skb][,force-copy=on][,inhibit=on][,sock-fds=a:b[,filter-fds=c:t:f]]
    /// [,map-path=PATH[,map-start-index=N]][,tx-csum=kernel|vmm]
    /// [,umem=own|guest[,tx-gather=on]]. The guest gets one virtio-net
    /// queue pair per queue. inhibit=on: no XDP program of ours; the sockets
    /// come from sock-fds (see xskvm-net-helper, which also passes its
    /// program's receive filter maps as filter-fds) or go into the XSKMAP
    /// pinned at map-path, queue i at key map-start-index+i. tx-csum: who
    /// fills the checksums the guest leaves to the device. umem=guest: guest
    /// RAM is the sockets' UMEM; tx-gather=on: frames are sent from it
    /// rather than copied (copy mode only; slower there, see the README).
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<crate::net::NetSpec>,

    /// KVM device node (for containers and tests that need another path).
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,

    /// System call filters: on (a thread making a call outside its list
    /// kills xskvm), log (such calls go through and the kernel logs them:
    /// audit type 1326 in dmesg), or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,

    /// Serve the HTTP API (JSON; see docs/api.md) on a Unix socket at
    /// PATH, created with mode 0600 and removed at exit.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Capabilities kept once the guest runs: xskvm drops all others after
    /// setup, before any thread starts, and sets no_new_privs (see
    /// docs/privileges.md).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub capabilities: crate::privileges::CapabilityMode,

    /// The VM's name: the `vm` label of its metrics.
    #[arg(long, value_name = "NAME", default_value = "xskvm")]
    pub name: String,

    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: log::LevelFilter,
}

/// `--memory` when not given.
pub const DEFAULT_MEMORY: &str = "512M";

/// `--memory`: how much guest RAM, and what backs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySpec {
    pub size: u64,
    /// Hugepages of this size back the guest's RAM; `None`: ordinary pages.
    pub hugepages: Option<HugePageSize>,
}

/// The hugepage sizes x86-64 has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePageSize {
    Size2M,
    Size1G,
}

impl HugePageSize {
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// log2 of the size, as `mmap` takes it (`MAP_HUGE_SHIFT`).
    pub fn shift(self) -> u32 {
        self.bytes().trailing_zeros()
    }

    /// The directory under /sys/kernel/mm/hugepages/ for this size.
    pub fn sysfs_name(self) -> &'static str {
        match self {
            HugePageSize::Size2M => "hugepages-2048kB",
            HugePageSize::Size1G => "hugepages-1048576kB",
        }
    }
}

impl std::fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HugePageSize::Size2M => "2 MiB",
            HugePageSize::Size1G => "1 GiB",
        })
    }
}

/// Parses `--memory`: `SIZE[,hugepages=on|off][,hugepage-size=2M|1G]`.
pub fn parse_memory_spec(text: &str) -> Result<MemorySpec, String> {
    let mut parts = text.split(',');
    let size = parse_memory_size(parts.next().unwrap_or_default())?;
    let mut hugepages = false;
    let mut page_size = None;
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not KEY=VALUE (hugepages=on, hugepage-size=2M)"))?;
        match key.trim() {
            "hugepages" => {
                hugepages = match value.trim() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("hugepages={other}: use on or off")),
                }
            }
            "hugepage-size" => {
                page_size = Some(match parse_memory_size(value)? {
                    n if n == HugePageSize::Size2M.bytes() => HugePageSize::Size2M,
                    n if n == HugePageSize::Size1G.bytes() => HugePageSize::Size1G,
                    _ => return Err(format!("hugepage-size={value}: use 2M or 1G")),
                })
            }
            other => {
                return Err(format!(
                    "unknown --memory option '{other}' (known: hugepages, hugepage-size)"
                ))
            }
        }
    }
    if page_size.is_some() && !hugepages {
        return Err("hugepage-size needs hugepages=on".into());
    }
    let hugepages = hugepages.then(|| page_size.unwrap_or(HugePageSize::Size2M));
    if let Some(page) = hugepages {
        if size % page.bytes() != 0 {
            return Err(format!(
                "{} MiB is not a whole number of {page} hugepages",
                size >> 20
            ));
        }
    }
    Ok(MemorySpec { size, hugepages })
}

/// Parses a QEMU-style size: `512M`, `2G`, `65536K`, or a bare number of MiB.
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        _ => (text, 20),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 512M or 2G"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_and_without_suffix() {
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2g"), Ok(2 << 30));
        assert_eq!(parse_memory_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_memory_size("256"), Ok(256 << 20));
        assert_eq!(parse_memory_size("0"), Ok(0));
    }

    #[test]
    fn memory_with_hugepages() {
        let spec = |size, hugepages| Ok(MemorySpec { size, hugepages });
        assert_eq!(parse_memory_spec("1G"), spec(1 << 30, None));
        assert_eq!(
            parse_memory_spec("512M,hugepages=on"),
            spec(512 << 20, Some(HugePageSize::Size2M))
        );
        assert_eq!(
            parse_memory_spec("2G,hugepages=on,hugepage-size=1G"),
            spec(2 << 30, Some(HugePageSize::Size1G))
        );
        assert_eq!(
            parse_memory_spec("512M,hugepage-size=2048K,hugepages=on"),
            spec(512 << 20, Some(HugePageSize::Size2M))
        );
        assert_eq!(
            parse_memory_spec("512M,hugepages=off"),
            spec(512 << 20, None)
        );
        assert_eq!(HugePageSize::Size2M.shift(), 21);
        assert_eq!(HugePageSize::Size1G.shift(), 30);
    }

    #[test]
    fn memory_options_that_cannot_work_are_refused() {
        for bad in [
            "512M,hugepages=yes",
            "512M,hugepages",
            "512M,hugepage-size=4M,hugepages=on",
            "512M,hugepage-size=2M",
            "512M,hugepages=on,hugepage-size=1G",
            "513M,hugepages=on",
            "512M,shared=on",
            ",hugepages=on",
        ] {
            assert!(parse_memory_spec(bad).is_err(), "{bad} accepted");
        }
        let e = parse_memory_spec("513M,hugepages=on").unwrap_err();
        assert!(e.contains("whole number of 2 MiB hugepages"), "{e}");
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert!(parse_memory_size("").is_err());
        assert!(parse_memory_size("M").is_err());
        assert!(parse_memory_size("12X").is_err());
        assert!(parse_memory_size("-1G").is_err());
        assert!(parse_memory_size("99999999999999999G").is_err());
    }

    #[test]
    fn defaults_and_unknown_flags() {
        let args = Args::try_parse_from(["xskvm", "--kernel", "k"]).unwrap();
        assert_eq!(
            args.memory,
            MemorySpec {
                size: 512 << 20,
                hugepages: None
            }
        );
        assert_eq!(args.vcpus, 1);
        assert_eq!(args.cmdline, DEFAULT_CMDLINE);
        assert!(Args::try_parse_from(["xskvm", "--kernel", "k", "--bogus"]).is_err());
        assert!(
            Args::try_parse_from(["xskvm"]).is_err(),
            "kernel is required"
        );
        assert!(Args::try_parse_from(["xskvm", "--kernel", "k", "--vcpus", "-1"]).is_err());
    }

    #[test]
    fn capability_modes() {
        use crate::privileges::CapabilityMode;
        let parse = |mode: &str| {
            Args::try_parse_from(["xskvm", "--kernel", "k", "--capabilities", mode])
                .map(|a| a.capabilities)
        };
        let default = Args::try_parse_from(["xskvm", "--kernel", "k"]).unwrap();
        assert_eq!(default.capabilities, CapabilityMode::Auto);
        assert_eq!(parse("none").unwrap(), CapabilityMode::None);
        assert_eq!(parse("net").unwrap(), CapabilityMode::Net);
        assert_eq!(parse("keep").unwrap(), CapabilityMode::Keep);
        let error = parse("all").unwrap_err().to_string();
        assert!(
            error.contains("[possible values: auto, none, net, keep]"),
            "{error}"
        );
    }

    #[test]
    fn seccomp_modes() {
        use crate::seccomp::SeccompMode;
        let parse = |mode: &str| {
            Args::try_parse_from(["xskvm", "--kernel", "k", "--seccomp", mode]).map(|a| a.seccomp)
        };
        let default = Args::try_parse_from(["xskvm", "--kernel", "k"]).unwrap();
        assert_eq!(default.seccomp, SeccompMode::On);
        assert_eq!(parse("on").unwrap(), SeccompMode::On);
        assert_eq!(parse("off").unwrap(), SeccompMode::Off);
        assert_eq!(parse("log").unwrap(), SeccompMode::Log);
        for bad in ["bogus", "", "ON1", "kill"] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(
                error.contains("--seccomp") && error.contains("[possible values: on, off, log]"),
                "{bad:?}: {error}"
            );
        }
    }
}
