//! Scenarios that need a second process: the program goes away when its
//! process is SIGKILLed; an unprivileged process uses sockets a privileged
//! one prepared (inhibit=on,sock-fds); missing capabilities and a too
//! small RLIMIT_MEMLOCK give their errors and leave nothing attached.
//!
//! The child is this test binary again, running `child_process_entry`
//! with XSK_TEST_CHILD naming its role (without it that test does nothing).

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use net_afxdp::testbed::{self, cap, PacketSocket, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, Error, PreparedSockets};

const READY: &str = "XSK-CHILD READY";
const OK: &str = "XSK-CHILD OK";

/// Starts this binary as a child in `role`, with `fds` (source, target)
/// duplicated onto fixed numbers in the child.
fn spawn_child(role: &str, env: &[(&str, &str)], fds: &[(RawFd, RawFd)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_process_entry",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("XSK_TEST_CHILD", role)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let fds = fds.to_vec();
    // SAFETY: only dup2 (async-signal-safe) runs between fork and exec; it
    // clears close-on-exec on the target, so exactly these fds are passed.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &fds {
                if libc::dup2(src, dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawning the child test process")
}

/// Waits for the child and asserts it printed OK and exited successfully.
fn expect_ok(child: Child) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(OK),
        "child failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// A 1 MiB RLIMIT_MEMLOCK and every capability opening a NIC takes but
/// CAP_IPC_LOCK (and CAP_SYS_RESOURCE, which could raise the limit).
fn memlock_without_ipc_lock() {
    testbed::set_memlock_limit(1 << 20).unwrap();
    testbed::limit_capabilities(&[
        cap::NET_ADMIN,
        cap::NET_RAW,
        cap::SYS_ADMIN,
        cap::BPF,
        cap::PERFMON,
    ])
    .unwrap();
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("child: {key} not set"))
}

/// The child side, run only by the tests below (ignored in a normal run,
/// so that it is not counted as a test that passed without running).
#[test]
#[ignore = "the child side of the process tests; they spawn it"]
fn child_process_entry() {
    let role = env("XSK_TEST_CHILD");
    init_log();
    testbed::enter_netns(&env("XSK_NETNS")).unwrap();
    let ifname = env("XSK_IF");
    match role.as_str() {
        "attach-and-wait" => {
            let nic = AfXdpNic::open(&format!("ifname={ifname}").parse::<AfXdpConfig>().unwrap())
                .unwrap();
            println!("{READY} {}", nic.info().program_id.unwrap());
            std::thread::sleep(Duration::from_secs(120));
        }
        "no-capabilities" => {
            let config: AfXdpConfig = format!("ifname={ifname}").parse().unwrap();
            // Only CAP_NET_RAW: sockets yes, the program no.
            testbed::limit_capabilities(&[cap::NET_RAW]).unwrap();
            let err = AfXdpNic::open(&config).unwrap_err();
            assert!(
                matches!(&err, Error::PermissionDenied { action, .. } if action.contains("XDP program")),
                "{err}"
            );
            println!("net_raw only: {err}");
            assert_eq!(sys_attached(&ifname), None);
            // Nothing at all: not even the socket.
            testbed::limit_capabilities(&[]).unwrap();
            let err = AfXdpNic::open(&config).unwrap_err();
            assert!(
                matches!(&err, Error::PermissionDenied { action, .. } if action.contains("CAP_NET_RAW")),
                "{err}"
            );
            assert!(
                err.to_string().contains("sock-fds"),
                "the error names the way out: {err}"
            );
            println!("no capabilities: {err}");
            assert_eq!(sys_attached(&ifname), None);
            println!("{OK}");
        }
        "memlock" => {
            // Everything but CAP_IPC_LOCK (and CAP_SYS_RESOURCE, which
            // could raise the limit), and a 1 MiB limit.
            memlock_without_ipc_lock();
            let config: AfXdpConfig = format!("ifname={ifname},queues=2").parse().unwrap();
            let err = AfXdpNic::open(&config).unwrap_err();
            match &err {
                Error::Memlock {
                    needed_kib,
                    queues,
                    limit_kib,
                    guest_memory,
                } => assert_eq!(
                    (*needed_kib, *queues, *limit_kib, *guest_memory),
                    (32768, 2, Some(1024), false)
                ),
                other => panic!("expected Memlock, got {other}"),
            }
            let text = err.to_string();
            assert!(
                text.contains("ulimit -l") && text.contains("CAP_IPC_LOCK"),
                "{text}"
            );
            println!("memlock: {text}");
            // The program was attached before the UMEM failed: gone again.
            assert_eq!(sys_attached(&ifname), None);
            println!("{OK}");
        }
        "memlock-guest" => {
            // As "memlock", with umem=guest: 4 MiB of guest memory and
            // two queues' 16 MiB after it, all registered and locked.
            memlock_without_ipc_lock();
            let config: AfXdpConfig = format!("ifname={ifname},queues=2,umem=guest")
                .parse()
                .unwrap();
            let len = (4 << 20) + config.queue_umem_bytes() as usize;
            let ptr = anonymous_mapping(len);
            // SAFETY: never unmapped (the child exits right after).
            let region = unsafe { net_afxdp::UmemRegion::new(ptr, len, 4 << 20, 4 << 20) }.unwrap();
            let err = AfXdpNic::open_on(&config, Some(region)).unwrap_err();
            match &err {
                Error::Memlock {
                    needed_kib,
                    limit_kib,
                    guest_memory,
                    ..
                } => assert_eq!(
                    (*needed_kib, *limit_kib, *guest_memory),
                    (36864, Some(1024), true)
                ),
                other => panic!("expected Memlock, got {other}"),
            }
            let text = err.to_string();
            assert!(
                text.contains("umem=guest locks all of guest memory")
                    && text.contains("at least 36864 KiB"),
                "{text}"
            );
            println!("memlock with umem=guest: {text}");
            assert_eq!(sys_attached(&ifname), None);
            println!("{OK}");
        }
        "sock-fds" => {
            let peer = PacketSocket::open(&env("XSK_PEER")).unwrap();
            let (a_mac, b_mac) = (mac_of(&ifname), mac_of(&env("XSK_PEER")));
            testbed::limit_capabilities(&[]).unwrap();
            // Really unprivileged now: no AF_XDP socket of our own.
            assert!(matches!(
                AfXdpNic::open(&format!("ifname={ifname}").parse().unwrap()),
                Err(Error::PermissionDenied { .. })
            ));
            let fds = env("XSK_FDS");
            let filter_fds = env("XSK_FILTER_FDS");
            let mut config: AfXdpConfig = format!(
                "ifname={ifname},queues=2,inhibit=on,sock-fds={fds},filter-fds={filter_fds}"
            )
            .parse()
            .unwrap();
            // Without CAP_IPC_LOCK the UMEM counts against RLIMIT_MEMLOCK
            // (often 8 MiB, and CAP_SYS_RESOURCE to raise it may be
            // missing even for root in a container): 1 MiB per queue.
            config.umem = net_afxdp::UmemConfig {
                frame_size: 2048,
                rx_frames: 256,
                tx_frames: 256,
            };
            let mut nic = AfXdpNic::open(&config).unwrap();
            assert_eq!(nic.info().attach_mode, None);
            // The listed fds were taken over.
            for fd in fds.split(':').chain(filter_fds.split(':')) {
                // SAFETY: F_GETFD only inspects the descriptor table.
                let flags = unsafe { libc::fcntl(fd.parse().unwrap(), libc::F_GETFD) };
                assert_eq!(flags, -1, "fd {fd} still open");
            }
            // Peer -> us. Which queue a packet socket's frames land on is
            // the peer's transmit queue choice (flow hash or CPU), so
            // gather from both.
            let frames: Vec<_> = (0..20)
                .map(|i| test_frame(a_mac, b_mac, i, 100 + i as usize))
                .collect();
            for f in &frames {
                peer.send(f).unwrap();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut got = Vec::new();
            while got.len() < frames.len() && std::time::Instant::now() < deadline {
                for q in nic.queues_mut() {
                    got.extend(rx_frames(q, frames.len(), Duration::from_millis(50)));
                }
            }
            got.sort_by_key(|f| net_afxdp::testbed::test_frame_seq(f));
            assert_eq!(got, frames);
            // Both queues -> peer.
            for (j, q) in nic.queues_mut().iter_mut().enumerate() {
                let out: Vec<_> = (0..10)
                    .map(|i| test_frame(b_mac, a_mac, ((j as u64) << 32) | i, 200))
                    .collect();
                tx_all(q, &out);
                assert_no_leak(q);
            }
            assert_eq!(
                by_tag(&packet_frames(&peer, 20, Duration::from_secs(5))),
                [(0, 10), (1, 10)].into()
            );
            // The privileged side's program filters for us: its maps came
            // with filter-fds and take updates without any capability.
            let filter = nic
                .owner()
                .rx_filter()
                .expect("filter-fds adopted")
                .try_clone()
                .unwrap();
            let config = net_afxdp::RxFilterConfig {
                mac: a_mac,
                enabled: 1,
                ..Default::default()
            };
            filter.set(&config, &[]).unwrap();
            let other = [0x02, 0, 0, 0, 0, 0x99];
            for i in 0..10 {
                peer.send(&test_frame(other, b_mac, 1000 + i, 100)).unwrap();
            }
            let ours: Vec<_> = (0..10)
                .map(|i| test_frame(a_mac, b_mac, 2000 + i, 100))
                .collect();
            for f in &ours {
                peer.send(f).unwrap();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut got = Vec::new();
            while got.len() < ours.len() && std::time::Instant::now() < deadline {
                for q in nic.queues_mut() {
                    got.extend(rx_frames(q, ours.len(), Duration::from_millis(50)));
                }
            }
            // A frame for the other MAC would have come first.
            for q in nic.queues_mut() {
                got.extend(rx_frames(q, 1, Duration::from_millis(100)));
            }
            got.sort_by_key(|f| net_afxdp::testbed::test_frame_seq(f));
            assert_eq!(got, ours, "only frames for our MAC reach the sockets");
            let filtered: u64 = (0..2).map(|q| filter.filtered_frames(q)).sum();
            assert_eq!(filtered, 10, "frames for the other MAC, counted");
            println!("{OK}");
        }
        "open-capabilities" => {
            // What xskvm's NIC watcher keeps to reopen a NIC: enough for
            // the program, the sockets and default-size UMEMs (CAP_IPC_LOCK:
            // not charged to RLIMIT_MEMLOCK, which stays as it is).
            testbed::limit_capabilities(&net_afxdp::OPEN_CAPABILITIES).unwrap();
            let nic =
                AfXdpNic::open(&format!("ifname={ifname},queues=2").parse().unwrap()).unwrap();
            assert!(nic.info().program_id.is_some());
            drop(nic);
            println!("{OK}");
        }
        "map-path" => {
            // Only what creating AF_XDP sockets takes: no CAP_BPF,
            // CAP_NET_ADMIN or CAP_SYS_ADMIN, yet the pinned map is ours
            // to fill (BPF_OBJ_GET and a map update need file access only).
            let peer = PacketSocket::open(&env("XSK_PEER")).unwrap();
            let (a_mac, b_mac) = (mac_of(&ifname), mac_of(&env("XSK_PEER")));
            testbed::limit_capabilities(&[cap::NET_RAW]).unwrap();
            let mut config: AfXdpConfig =
                format!("ifname={ifname},inhibit=on,map-path={}", env("XSK_MAP"))
                    .parse()
                    .unwrap();
            config.umem = net_afxdp::UmemConfig {
                frame_size: 2048,
                rx_frames: 256,
                tx_frames: 256,
            };
            let mut nic = AfXdpNic::open(&config).unwrap();
            let frames: Vec<_> = (0..10)
                .map(|i| test_frame(a_mac, b_mac, i, 100 + i as usize))
                .collect();
            for f in &frames {
                peer.send(f).unwrap();
            }
            let got = rx_frames(&mut nic.queues_mut()[0], 10, Duration::from_secs(5));
            assert_eq!(got, frames);
            println!("{OK}");
        }
        other => panic!("unknown child role {other}"),
    }
}

fn sys_attached(ifname: &str) -> Option<net_afxdp::AttachedProgram> {
    net_afxdp::ifindex(ifname).and_then(net_afxdp::attached_program)
}

fn mac_of(ifname: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-br", "link", "show", "dev", ifname])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut mac = [0u8; 6];
    for (b, part) in mac
        .iter_mut()
        .zip(text.split_whitespace().nth(2).unwrap().split(':'))
    {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

#[test]
fn sigkilled_process_leaves_no_program_behind() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    let mut child = spawn_child(
        "attach-and-wait",
        &[("XSK_NETNS", &pair.netns), ("XSK_IF", &pair.a)],
        &[],
    );
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    while !line.contains(READY) {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!(
                "child exited before attaching: {:?}",
                child.wait_with_output()
            );
        }
    }
    let id: u32 = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let attached = pair
        .xdp_program(&pair.a)
        .unwrap()
        .expect("the child attached a program");
    assert_eq!(
        (attached.id, attached.name.as_str()),
        (id, "xskvm_redirect")
    );
    // SIGKILL: no destructor, no cleanup code runs.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_eq!(
        wait_no_xdp(&pair, &pair.a),
        None,
        "the link must die with the process"
    );
}

#[test]
fn unprivileged_process_uses_sockets_from_a_privileged_one() {
    require_root!();
    init_log();
    let pair = VethPair::new(2).unwrap();
    let config: AfXdpConfig = format!("ifname={},queues=2,mode=native", pair.a)
        .parse()
        .unwrap();
    let prepared = pair
        .run(|| PreparedSockets::create(&config))
        .unwrap()
        .unwrap();
    assert_eq!(
        prepared.owner.info().attach_mode,
        Some(net_afxdp::XdpMode::Native)
    );
    let mut fds: Vec<(RawFd, RawFd)> = prepared
        .sockets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_raw_fd(), 100 + i as RawFd))
        .collect();
    // The receive filter's maps, as xskvm-net-helper passes them.
    let maps = prepared
        .owner
        .rx_filter()
        .expect("our program's filter")
        .raw_fds();
    fds.extend(
        maps.iter()
            .enumerate()
            .map(|(i, &fd)| (fd, 102 + i as RawFd)),
    );
    let child = spawn_child(
        "sock-fds",
        &[
            ("XSK_NETNS", &pair.netns),
            ("XSK_IF", &pair.a),
            ("XSK_PEER", &pair.b),
            ("XSK_FDS", "100:101"),
            ("XSK_FILTER_FDS", "102:103:104"),
        ],
        &fds,
    );
    expect_ok(child);
    drop(prepared);
    assert_eq!(wait_no_xdp(&pair, &pair.a), None);
}

#[test]
fn missing_capabilities_are_reported() {
    require_root!();
    let pair = VethPair::new(1).unwrap();
    expect_ok(spawn_child(
        "no-capabilities",
        &[("XSK_NETNS", &pair.netns), ("XSK_IF", &pair.a)],
        &[],
    ));
    assert_eq!(pair.xdp_program(&pair.a).unwrap(), None);
}

#[test]
fn umem_beyond_the_memlock_limit_is_reported() {
    require_root!();
    let pair = VethPair::new(2).unwrap();
    expect_ok(spawn_child(
        "memlock",
        &[("XSK_NETNS", &pair.netns), ("XSK_IF", &pair.a)],
        &[],
    ));
    assert_eq!(pair.xdp_program(&pair.a).unwrap(), None);
}

#[test]
fn guest_memory_beyond_the_memlock_limit_is_reported() {
    require_root!();
    let pair = VethPair::new(2).unwrap();
    expect_ok(spawn_child(
        "memlock-guest",
        &[("XSK_NETNS", &pair.netns), ("XSK_IF", &pair.a)],
        &[],
    ));
    assert_eq!(pair.xdp_program(&pair.a).unwrap(), None);
}

#[test]
fn map_path_needs_no_bpf_capability() {
    require_root!();
    init_log();
    let pair = VethPair::new(1).unwrap();
    let program = net_afxdp::XdpProgram::load(1, false).unwrap();
    let _link = pair
        .run(|| {
            let ifindex = net_afxdp::ifindex(&pair.a).expect("interface");
            program.attach(&pair.a, ifindex, net_afxdp::XdpMode::Native)
        })
        .unwrap()
        .unwrap();
    let pin = Pin::new(program.map_fd());
    expect_ok(spawn_child(
        "map-path",
        &[
            ("XSK_NETNS", &pair.netns),
            ("XSK_IF", &pair.a),
            ("XSK_PEER", &pair.b),
            ("XSK_MAP", &pin.0),
        ],
        &[],
    ));
}

#[test]
fn the_capabilities_kept_for_reopening_open_a_nic() {
    require_root!();
    let pair = VethPair::new(2).unwrap();
    expect_ok(spawn_child(
        "open-capabilities",
        &[("XSK_NETNS", &pair.netns), ("XSK_IF", &pair.a)],
        &[],
    ));
    assert_eq!(wait_no_xdp(&pair, &pair.a), None);
}
