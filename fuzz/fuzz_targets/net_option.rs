//! The `--net` option parsers: xskvm's own split of `--net` (backend kind,
//! `mac=`) in `vmm::net`, the AF_XDP backend's options in
//! `net_afxdp::AfXdpConfig`, the path the VMM takes from one to the other,
//! and `--memory` (sizes, hugepages).
//!
//! Invariants: no parser panics; whatever parses is valid and, written
//! back in canonical form, parses to the same value; a MAC address is
//! only accepted in its documented form (six pairs of hex digits).

#![no_main]

use std::fmt::Write;

use libfuzzer_sys::fuzz_target;
use net_afxdp::{AfXdpConfig, TxChecksum};
use vmm::net::{MacAddr, NetSpec};

/// An `AfXdpConfig` as an option string (the crate has no Display).
fn format_config(c: &AfXdpConfig) -> String {
    let mut s = format!("ifname={}", c.ifname);
    if c.queues_given {
        write!(s, ",queues={}", c.queues).unwrap();
    }
    if c.start_queue != 0 {
        write!(s, ",start-queue={}", c.start_queue).unwrap();
    }
    if let Some(mode) = c.mode {
        write!(s, ",mode={mode}").unwrap();
    }
    if c.force_copy {
        s.push_str(",force-copy=on");
    }
    if c.inhibit {
        s.push_str(",inhibit=on");
    }
    if let Some(fds) = &c.sock_fds {
        let fds: Vec<String> = fds.iter().map(i32::to_string).collect();
        write!(s, ",sock-fds={}", fds.join(":")).unwrap();
    }
    if let Some([c, t, f]) = c.filter_fds {
        write!(s, ",filter-fds={c}:{t}:{f}").unwrap();
    }
    if let Some(path) = &c.map_path {
        write!(s, ",map-path={path}").unwrap();
    }
    if let Some(start) = c.map_start_index {
        write!(s, ",map-start-index={start}").unwrap();
    }
    if c.guest_umem {
        s.push_str(",umem=guest");
    }
    if c.tx_gather {
        s.push_str(",tx-gather=on");
    }
    match c.tx_checksum {
        TxChecksum::Kernel => {}
        TxChecksum::Caller => s.push_str(",tx-csum=vmm"),
        TxChecksum::KernelSoftware => unreachable!("not an option value"),
    }
    s
}

fn format_spec(spec: &NetSpec) -> String {
    let mut s = "af-xdp".to_string();
    if let Some(mac) = spec.mac {
        write!(s, ",mac={mac}").unwrap();
    }
    if !spec.spoof_check {
        s.push_str(",spoof-check=off");
    }
    if !spec.backend_options.is_empty() {
        write!(s, ",{}", spec.backend_options).unwrap();
    }
    s
}

/// Six pairs of hex digits separated by colons.
fn mac_shaped(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_config(text: &str) {
    let parsed = AfXdpConfig::parse(text);
    match &parsed {
        Ok(c) => {
            assert_eq!(
                c.validate(),
                Ok(()),
                "{text:?} parsed into an invalid config"
            );
            // Must not overflow: validate promised the range fits.
            let ids = c.queue_ids();
            assert_eq!(ids.len(), c.queues as usize);
            let again = format_config(c);
            assert_eq!(
                AfXdpConfig::parse(&again).as_ref(),
                Ok(c),
                "{text:?} -> {again:?} does not parse back"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // With `mac` handed back to the caller: the same config as without
    // the mac items, and only mac items handed back.
    if let Ok((c, passed)) = AfXdpConfig::parse_allowing(text, &["mac"]) {
        assert!(passed.iter().all(|(k, _)| *k == "mac"), "{passed:?}");
        let without: Vec<&str> = text
            .split(',')
            .filter(|i| !i.is_empty() && !i.starts_with("mac="))
            .collect();
        assert_eq!(AfXdpConfig::parse(&without.join(",")), Ok(c));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_config(text);

    if let Ok(mac) = text.parse::<MacAddr>() {
        assert!(mac_shaped(text), "{text:?} accepted as MAC {mac}");
        assert_eq!(mac.0[0] & 1, 0, "multicast MAC {mac} accepted");
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        assert!(mac.to_string().eq_ignore_ascii_case(text));
    }

    match text.parse::<NetSpec>() {
        Ok(spec) => {
            assert!(text == "af-xdp" || text.starts_with("af-xdp,"), "{text:?}");
            for value in text.split(',').filter_map(|o| o.strip_prefix("mac=")) {
                assert!(mac_shaped(value), "{text:?}: mac={value:?} accepted");
            }
            let again = format_spec(&spec);
            assert_eq!(
                again.parse::<NetSpec>().as_ref(),
                Ok(&spec),
                "{text:?} -> {again:?} does not parse back"
            );
            // What the VMM does next with it.
            check_config(&spec.backend_options);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    if let Ok(bytes) = vmm::cli::parse_memory_size(text) {
        let again = if bytes % (1 << 30) == 0 {
            format!("{}G", bytes >> 30)
        } else if bytes % (1 << 20) == 0 {
            format!("{}M", bytes >> 20)
        } else {
            assert_eq!(bytes % 1024, 0, "{text:?} gave {bytes} bytes");
            format!("{}K", bytes >> 10)
        };
        assert_eq!(vmm::cli::parse_memory_size(&again), Ok(bytes), "{again:?}");
    }

    match vmm::cli::parse_memory_spec(text) {
        Ok(spec) => {
            // Hugepages only for sizes they tile; written back, the same.
            let mut again = format!("{}K", spec.size >> 10);
            assert_eq!(spec.size % 1024, 0, "{text:?}");
            if let Some(page) = spec.hugepages {
                assert_eq!(spec.size % page.bytes(), 0, "{text:?}");
                write!(again, ",hugepages=on,hugepage-size={}K", page.bytes() >> 10).unwrap();
            }
            assert_eq!(vmm::cli::parse_memory_spec(&again), Ok(spec), "{again:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
