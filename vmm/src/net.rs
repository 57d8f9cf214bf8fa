//! `--net` options: the parts xskvm itself owns (backend kind, guest MAC);
//! the backend's own options go to net-afxdp unchanged.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetSpecError {
    #[error("--net {0:?}: only the af-xdp backend exists (--net af-xdp,ifname=IF,...)")]
    UnknownBackend(String),
    #[error("--net: mac={0:?} is not a MAC address like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("--net: mac={0} is a multicast address; a NIC needs a unicast one")]
    MulticastMac(MacAddr),
    #[error("--net: mac= given twice")]
    DuplicateMac,
    #[error("--net: spoof-check={0:?}: use on or off")]
    BadSpoofCheck(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NetSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || NetSpecError::BadMac(text.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            // Two hex digits exactly: from_str_radix alone would take "+f".
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = MacAddr(bytes);
        if bytes[0] & 1 != 0 {
            return Err(NetSpecError::MulticastMac(mac));
        }
        Ok(mac)
    }
}

impl MacAddr {
    /// A locally administered unicast address, distinct per NIC and per run.
    pub fn generate(nic_index: usize) -> Self {
        let mut random = [0u8; 3];
        if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
            let _ = std::io::Read::read_exact(&mut urandom, &mut random);
        }
        MacAddr([
            0x02,
            0x58,
            0x53,
            random[0],
            random[1],
            random[2].wrapping_add(nic_index as u8),
        ])
    }
}

/// One `--net` flag, split into what xskvm owns and the backend's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub mac: Option<MacAddr>,
    /// `spoof-check=off` lets the guest send with any source MAC.
    pub spoof_check: bool,
    /// `key=value,...` for the AF_XDP backend (ifname, queues, mode, ...).
    pub backend_options: String,
}

impl std::str::FromStr for NetSpec {
    type Err = NetSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = text.split_once(',').unwrap_or((text, ""));
        if kind != "af-xdp" {
            return Err(NetSpecError::UnknownBackend(kind.to_string()));
        }
        let mut mac = None;
        let mut spoof_check = true;
        let mut backend = Vec::new();
        for option in rest.split(',').filter(|o| !o.is_empty()) {
            if let Some(value) = option.strip_prefix("mac=") {
                if mac.replace(value.parse()?).is_some() {
                    return Err(NetSpecError::DuplicateMac);
                }
            } else if let Some(value) = option.strip_prefix("spoof-check=") {
                spoof_check = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(NetSpecError::BadSpoofCheck(value.to_string())),
                };
            } else {
                backend.push(option);
            }
        }
        Ok(NetSpec {
            mac,
            spoof_check,
            backend_options: backend.join(","),
        })
    }
}

/// The keys of `--net af-xdp` that xskvm reads itself; the rest are the
/// backend's (`net_afxdp::OPTION_KEYS`).
pub const VMM_KEYS: [&str; 2] = ["mac", "spoof-check"];

impl NetSpec {
    /// The backend's options, parsed; an unknown key's error lists every
    /// key `--net af-xdp` takes, xskvm's own too.
    pub fn backend_config(&self) -> Result<net_afxdp::AfXdpConfig, net_afxdp::ConfigError> {
        // xskvm's keys were taken out by from_str: none is passed back.
        net_afxdp::AfXdpConfig::parse_allowing(&self.backend_options, &VMM_KEYS)
            .map(|(config, _)| config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_lists_every_key_net_takes() {
        let spec: NetSpec = "af-xdp,ifname=eth1,umme=guest".parse().unwrap();
        let message = spec.backend_config().unwrap_err().to_string();
        for key in ["umem", "tx-gather", "mac", "spoof-check"] {
            assert!(message.contains(key), "{key} missing from: {message}");
        }
    }

    #[test]
    fn splits_mac_from_backend_options() {
        let spec: NetSpec = "af-xdp,ifname=veth0,mac=52:54:00:12:34:56,queues=2"
            .parse()
            .unwrap();
        assert_eq!(spec.mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(spec.backend_options, "ifname=veth0,queues=2");
        assert!(spec.spoof_check, "on by default");
        let spec: NetSpec = "af-xdp,ifname=eth1,spoof-check=off".parse().unwrap();
        assert_eq!(spec.mac, None);
        assert!(!spec.spoof_check);
        assert_eq!(spec.backend_options, "ifname=eth1");
        assert_eq!(
            "af-xdp,ifname=eth1,spoof-check=maybe".parse::<NetSpec>(),
            Err(NetSpecError::BadSpoofCheck("maybe".into()))
        );
    }

    #[test]
    fn rejects_other_backends_and_bad_macs() {
        assert!(matches!(
            "tap,ifname=tap0".parse::<NetSpec>(),
            Err(NetSpecError::UnknownBackend(_))
        ));
        assert!(matches!(
            "af-xdp,mac=zz:00:00:00:00:00".parse::<NetSpec>(),
            Err(NetSpecError::BadMac(_))
        ));
        assert!(matches!(
            "af-xdp,mac=52:54:00:12:34".parse::<NetSpec>(),
            Err(NetSpecError::BadMac(_))
        ));
        // Found by the net_option fuzz target: a sign is not a hex digit.
        assert!(matches!(
            "af-xdp,mac=52:+4:00:12:34:56".parse::<NetSpec>(),
            Err(NetSpecError::BadMac(_))
        ));
        assert!(matches!(
            "af-xdp,mac=01:00:5e:00:00:01".parse::<NetSpec>(),
            Err(NetSpecError::MulticastMac(_))
        ));
        assert!(matches!(
            "af-xdp,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57".parse::<NetSpec>(),
            Err(NetSpecError::DuplicateMac)
        ));
    }

    #[test]
    fn generated_macs_are_local_unicast() {
        let mac = MacAddr::generate(0);
        assert_eq!(mac.0[0] & 0b11, 0b10);
        assert_eq!(mac.to_string().len(), 17);
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
    }
}
