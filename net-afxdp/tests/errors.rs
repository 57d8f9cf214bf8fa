//! Bad input and missing support: each gives one clear error, and nothing
//! stays attached to the interface afterwards. (Missing capabilities and
//! memlock limits need a process of their own: see process.rs.)

mod common;

use std::os::fd::{AsRawFd, IntoRawFd};

use common::*;
use net_afxdp::testbed::{self, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, ConfigError, Error, PreparedSockets, XdpProgram};

fn assert_nothing_attached(pair: &VethPair) {
    // The kernel may finish releasing the last link reference a moment after
    // the fds are closed (deferred work when that reference goes away from
    // a socket's RCU teardown), so give it a little time.
    for dev in [&pair.a, &pair.b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut attached = pair.xdp_program(dev).unwrap();
        while attached.is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            attached = pair.xdp_program(dev).unwrap();
        }
        assert_eq!(attached, None, "{dev} kept an XDP program");
    }
}

#[test]
fn unknown_interface() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    let err = open(&pair, "ifname=xsknosuch0").unwrap_err();
    assert!(
        matches!(&err, Error::NoSuchInterface { ifname } if ifname == "xsknosuch0"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "af-xdp: no network interface \"xsknosuch0\" in this network namespace"
    );
}

#[test]
fn loopback_is_refused_with_a_clear_error() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    let err = open(&pair, "ifname=lo").unwrap_err();
    assert!(
        matches!(&err, Error::Loopback { ifname } if ifname == "lo"),
        "{err}"
    );
    assert!(err.to_string().contains("loopback"), "{err}");
    let attached = pair.run(|| net_afxdp::attached_program(1)).unwrap();
    assert_eq!(attached, None, "nothing attached to lo");
}

#[test]
fn queues_beyond_the_device_channels() {
    require_root!();
    let pair = VethPair::new(2).unwrap();
    for options in ["queues=3", "start-queue=2", "start-queue=1,queues=2"] {
        let err = open(&pair, &format!("ifname={},{options}", pair.a)).unwrap_err();
        assert!(
            matches!(err, Error::QueueOutOfRange { available: 2, .. }),
            "{options}: {err}"
        );
        let text = err.to_string();
        assert!(text.contains("has 2 receive queue(s)"), "{text}");
        assert_nothing_attached(&pair);
    }
    // The last queue is fine.
    open(&pair, &format!("ifname={},start-queue=1", pair.a)).unwrap();
}

#[test]
fn queue_already_bound_by_another_socket() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    let first = open(&pair, &format!("ifname={}", pair.a)).unwrap();
    let id = first.info().program_id.unwrap();
    // Our own program is there: a second open must not replace it.
    let err = open(&pair, &format!("ifname={}", pair.a)).unwrap_err();
    match &err {
        Error::ProgramAlreadyAttached {
            prog_id,
            prog_name,
            mode,
            ..
        } => assert_eq!(
            (*prog_id, prog_name.as_str(), *mode),
            (id, "xskvm_redirect", "native")
        ),
        other => panic!("expected ProgramAlreadyAttached, got {other}"),
    }
    // It is xskvm's own program: the advice is to stop the xskvm that
    // holds it (its BPF link refuses `ip link set dev IF xdp off`).
    let text = err.to_string();
    assert!(text.contains("another xskvm"), "{text}");
    assert!(!text.contains("xdp off"), "{text}");
    // With inhibit=on it gets as far as binding: queue 0 is taken.
    let err = open(&pair, &format!("ifname={},inhibit=on", pair.a)).unwrap_err();
    assert!(matches!(err, Error::QueueBusy { queue: 0, .. }), "{err}");
    // Queue 1 is free.
    let second = open(
        &pair,
        &format!("ifname={},inhibit=on,start-queue=1", pair.a),
    )
    .unwrap();
    assert_eq!(second.info().attach_mode, None);
    assert_eq!(
        pair.xdp_program(&pair.a).unwrap().map(|p| p.id),
        Some(id),
        "untouched"
    );
    drop((first, second));
    assert_nothing_attached(&pair);
}

/// A program attached the old way (netlink, outlives its loader) by
/// someone else is reported and left in place.
#[test]
fn foreign_program_is_never_replaced() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    pair.run(|| {
        let ifindex = net_afxdp::ifindex(&pair.a).unwrap();
        let prog = XdpProgram::load(1, false).unwrap();
        // SAFETY: valid program fd and ifindex; no options.
        let ret = unsafe {
            libbpf_sys::bpf_xdp_attach(
                ifindex as i32,
                prog.prog_fd(),
                libbpf_sys::XDP_FLAGS_SKB_MODE,
                std::ptr::null(),
            )
        };
        assert_eq!(ret, 0, "netlink attach");
    })
    .unwrap();
    let before = pair.xdp_program(&pair.a).unwrap().expect("attached");
    for options in ["", ",mode=native", ",mode=skb"] {
        let err = open(&pair, &format!("ifname={}{options}", pair.a)).unwrap_err();
        assert!(
            matches!(&err, Error::ProgramAlreadyAttached { prog_id, mode: "skb", .. } if *prog_id == before.id),
            "{options}: {err}"
        );
    }
    assert_eq!(pair.xdp_program(&pair.a).unwrap(), Some(before));
    pair.ip(&["link", "set", "dev", &pair.a, "xdpgeneric", "off"])
        .unwrap();
    assert_nothing_attached(&pair);
}

#[test]
fn sock_fds_that_are_not_af_xdp_sockets() {
    require_root!();
    let pair = VethPair::new(2).unwrap();
    let (unix, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let file = std::fs::File::open("/dev/null").unwrap();
    let cases = [
        (
            unix.as_raw_fd(),
            "is a socket of address family 1, not AF_XDP (44)",
        ),
        (file.as_raw_fd(), "is not a socket"),
        (4000, "is not an open file descriptor of this process"),
    ];
    for (fd, reason) in cases {
        let err = open(
            &pair,
            &format!("ifname={},inhibit=on,sock-fds={fd}", pair.a),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::BadSockFd { fd: f, reason: r } if *f == fd && r == reason),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with(&format!("af-xdp: sock-fds: fd {fd} ")));
    }
    // The fds were not taken: still open and usable.
    assert!(unix.send(b"x").is_ok());
    // A socket someone already set up (here: a bound xskvm queue) is
    // refused too, before anything is changed.
    let nic = open(&pair, &format!("ifname={},start-queue=1", pair.a)).unwrap();
    let used = nic.queues()[0].fd();
    let err = open(
        &pair,
        &format!("ifname={},inhibit=on,sock-fds={used}", pair.a),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::BadSockFd { reason, .. } if reason.contains("already has a UMEM")),
        "{err}"
    );
    // Wrong count and missing inhibit are option errors.
    let prepared = pair
        .run(|| {
            PreparedSockets::create(&format!("ifname={}", pair.b).parse::<AfXdpConfig>().unwrap())
        })
        .unwrap()
        .unwrap();
    let fd = prepared.sockets[0].as_raw_fd();
    let err = open(
        &pair,
        &format!("ifname={},inhibit=on,queues=2,sock-fds={fd}", pair.b),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config(ConfigError::SockFdsCount {
                fds: 1,
                queues: 2,
                ..
            })
        ),
        "{err}"
    );
    let err = open(&pair, &format!("ifname={},sock-fds={fd}", pair.b)).unwrap_err();
    assert!(
        matches!(err, Error::Config(ConfigError::SockFdsWithoutInhibit)),
        "{err}"
    );
    drop((nic, prepared));
    assert_nothing_attached(&pair);
}

/// A kernel without CONFIG_XDP_SOCKETS answers socket(AF_XDP) with
/// EAFNOSUPPORT; a seccomp filter on the test thread plays that kernel.
#[test]
fn kernel_without_af_xdp() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    let config: AfXdpConfig = format!("ifname={}", pair.a).parse().unwrap();
    let err = pair
        .run(|| {
            testbed::simulate_kernel_without_af_xdp().unwrap();
            AfXdpNic::open(&config)
        })
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::NoAfXdp), "{err}");
    assert!(err.to_string().contains("CONFIG_XDP_SOCKETS"));
    assert_nothing_attached(&pair);
}

/// An error after the program was attached (here: binding fails because a
/// foreign socket holds the queue) detaches it again.
#[test]
fn late_failure_leaves_nothing_attached() {
    require_root!();
    let pair = VethPair::new(2).unwrap();
    // Hold queue 1 with a socket from a helper whose program we then remove.
    let helper = pair
        .run(|| {
            PreparedSockets::create(
                &format!("ifname={},start-queue=1", pair.a)
                    .parse::<AfXdpConfig>()
                    .unwrap(),
            )
        })
        .unwrap()
        .unwrap();
    let fd = helper.sockets[0].try_clone().unwrap().into_raw_fd();
    let holder = open(
        &pair,
        &format!("ifname={},inhibit=on,start-queue=1,sock-fds={fd}", pair.a),
    )
    .unwrap();
    drop(helper);
    assert_nothing_attached(&pair);
    let err = open(&pair, &format!("ifname={},queues=2", pair.a)).unwrap_err();
    assert!(matches!(err, Error::QueueBusy { queue: 1, .. }), "{err}");
    assert_nothing_attached(&pair);
    drop(holder);
}
