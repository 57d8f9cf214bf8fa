//! `map-path=`: an XDP program loaded and attached outside the NIC (here
//! xskvm's own program, loaded by the test like any other loader would)
//! with its XSKMAP pinned in bpffs; the NIC, with `inhibit=on`, puts its
//! sockets into that map, the program redirects the peer's frames to them,
//! and the keys are emptied again when the NIC goes.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use common::*;
use net_afxdp::testbed::{test_frame_seq, PacketSocket, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, Error, XdpMode, XdpProgram};

/// xskvm's program loaded and attached "by someone else", its XSKMAP
/// (`entries` keys: key = receive queue) pinned.
struct ForeignProgram {
    _link: OwnedFd,
    _program: XdpProgram,
    pin: Pin,
}

fn foreign_program(pair: &VethPair, entries: u32) -> ForeignProgram {
    let program = XdpProgram::load(entries, false).unwrap();
    // Attached from inside the pair's namespace, where its ifindex is.
    let link = pair
        .run(|| {
            let ifindex = net_afxdp::ifindex(&pair.a).expect("interface");
            program.attach(&pair.a, ifindex, XdpMode::Native)
        })
        .unwrap()
        .expect("attaching the foreign program");
    let pin = Pin::new(program.map_fd());
    ForeignProgram {
        _link: link,
        _program: program,
        pin,
    }
}

/// Sends `count` test frames tagged `tag` from the peer to `a`.
fn send_from_peer(pair: &VethPair, peer: &PacketSocket, tag: u64, count: u64) -> Vec<Vec<u8>> {
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let frames: Vec<_> = (0..count)
        .map(|i| test_frame(a_mac, b_mac, (tag << 32) | i, 100 + i as usize))
        .collect();
    for f in &frames {
        peer.send(f).unwrap();
    }
    frames
}

#[test]
fn sockets_in_a_pinned_map_receive_and_send_then_leave_the_map() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    let foreign = foreign_program(&pair, 2);
    let options = format!(
        "ifname={},queues=2,inhibit=on,map-path={}",
        pair.a, foreign.pin.0
    );
    let nic = open(&pair, &options).unwrap();
    assert_eq!(nic.info().attach_mode, None, "no program of its own");
    assert_eq!(nic.owner().map_path(), Some(foreign.pin.0.as_str()));
    let attached = pair.xdp_program(&pair.a).unwrap().unwrap();
    assert_eq!(attached.name, "xskvm_redirect");

    let peer = packet_socket(&pair, &pair.b);
    let host = packet_socket(&pair, &pair.a);
    let (owner, mut queues) = nic.into_parts();

    // Peer -> our sockets, through the foreign program's map.
    let frames = send_from_peer(&pair, &peer, 0, 20);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < frames.len() && std::time::Instant::now() < deadline {
        for q in &mut queues {
            got.extend(rx_frames(q, frames.len(), Duration::from_millis(50)));
        }
    }
    got.sort_by_key(|f| test_frame_seq(f));
    assert_eq!(got, frames, "every frame reached the sockets");
    assert!(
        packet_frames(&host, 1, Duration::from_millis(300)).is_empty(),
        "nothing went to the host stack while the sockets were in the map"
    );

    // Our sockets -> peer.
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    for (j, q) in queues.iter_mut().enumerate() {
        let out: Vec<_> = (0..10)
            .map(|i| test_frame(b_mac, a_mac, ((j as u64 + 1) << 32) | i, 200))
            .collect();
        tx_all(q, &out);
        assert_no_leak(q);
    }
    assert_eq!(
        by_tag(&packet_frames(&peer, 20, Duration::from_secs(5))),
        [(1, 10), (2, 10)].into()
    );

    // The NIC's owner goes while its sockets are still open: the keys are
    // emptied by us, not by the sockets closing, so the program passes
    // the peer's frames to the host stack and the sockets get none.
    drop(owner);
    let frames = send_from_peer(&pair, &peer, 3, 10);
    let at_host = packet_frames(&host, frames.len(), Duration::from_secs(5));
    assert_eq!(
        by_tag(&at_host),
        [(3, 10)].into(),
        "the host stack got them"
    );
    for q in &mut queues {
        assert!(
            rx_frames(q, 1, Duration::from_millis(100)).is_empty(),
            "a socket still in the map"
        );
    }
    drop(queues);
    drop(foreign);
    assert_eq!(wait_no_xdp(&pair, &pair.a), None);
}

/// Opens, retrying while the queue is still bound by a socket closed a
/// moment ago (the kernel releases the queue in deferred work).
fn open_retrying(pair: &VethPair, options: &str) -> Result<AfXdpNic, Error> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match open(pair, options) {
            Err(Error::QueueBusy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

#[test]
fn map_path_errors_leave_nothing_behind() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    let opts =
        |path: &str, extra: &str| format!("ifname={},inhibit=on,map-path={path}{extra}", pair.a);

    ensure_bpffs();
    let missing = format!("/sys/fs/bpf/xskvm-test-missing-{}", std::process::id());
    let err = open(&pair, &opts(&missing, "")).unwrap_err();
    assert!(
        matches!(&err, Error::MapNotFound { path } if *path == missing),
        "{err}"
    );
    assert!(err.to_string().contains("mount -t bpf"), "{err}");

    // A regular file is not a pinned object.
    let err = open(&pair, &opts("/proc/self/status", "")).unwrap_err();
    assert!(matches!(&err, Error::MapAccess { .. }), "{err}");

    // A pinned map of another type.
    // SAFETY: plain map creation; the fd is owned right below.
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_ARRAY,
            std::ptr::null(),
            4,
            4,
            4,
            std::ptr::null(),
        )
    };
    assert!(fd >= 0, "creating an array map: {fd}");
    // SAFETY: a fresh fd we own.
    let array = unsafe { OwnedFd::from_raw_fd(fd) };
    let array_pin = Pin::new(array.as_raw_fd());
    let err = open(&pair, &opts(&array_pin.0, "")).unwrap_err();
    assert!(matches!(&err, Error::NotXskMap { .. }), "{err}");
    assert!(err.to_string().contains("type 2"), "{err}");

    // Keys beyond the map.
    let foreign = foreign_program(&pair, 2);
    let err = open(&pair, &opts(&foreign.pin.0, ",queues=2,map-start-index=1")).unwrap_err();
    assert!(
        matches!(&err, Error::MapTooSmall { max_entries: 2, keys, .. } if *keys == (1..3)),
        "{err}"
    );

    // A key that holds another socket already is not taken over.
    let first = open(&pair, &opts(&foreign.pin.0, ",start-queue=0")).unwrap();
    let err = open(&pair, &opts(&foreign.pin.0, ",start-queue=1")).unwrap_err();
    assert!(matches!(&err, Error::MapKeyBusy { key: 0, .. }), "{err}");
    // The failed open did not empty the key it was refused (it deletes
    // only keys it filled): still busy. Once the first NIC is gone, the
    // key is free again.
    let err = open_retrying(&pair, &opts(&foreign.pin.0, ",start-queue=1")).unwrap_err();
    assert!(matches!(&err, Error::MapKeyBusy { key: 0, .. }), "{err}");
    drop(first);
    let second = open_retrying(&pair, &opts(&foreign.pin.0, ",start-queue=1")).unwrap();
    drop(second);

    // Without inhibit=on it is refused before anything is opened.
    let err =
        AfXdpConfig::parse(&format!("ifname={},map-path={}", pair.a, foreign.pin.0)).unwrap_err();
    assert!(err.to_string().contains("inhibit=on"), "{err}");
    drop(foreign);
    assert_eq!(wait_no_xdp(&pair, &pair.a), None);
}
