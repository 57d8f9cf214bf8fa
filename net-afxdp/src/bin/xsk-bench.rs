//! xsk-bench: the raw AF_XDP yardstick for the virtio-net datapath.
//!
//! Sets up a veth pair in a throwaway network namespace, opens the
//! measured side (veth "A") with this crate in copy mode, and measures
//! for each combination of direction, XDP mode, queue count and frame
//! size:
//!
//! - tx: A's sockets transmit as fast as they can (one thread per
//!   queue, each frame copied from a template into a UMEM frame, batches
//!   of 64, one kick per batch); the rate is frames completed by the
//!   kernel per second. Peer `xsk`: B receives with AF_XDP sockets on all
//!   its queues (end to end; on veth the peer's XDP and copy run on the
//!   sender's CPU). Peer `stack`: B has no program and its kernel drops
//!   the frames (unknown EtherType), so the sender is the bottleneck.
//! - rx: B's sockets transmit (one thread per queue, on the transmit
//!   queue that veth maps to A's receive queue j); the rate is frames
//!   A's sockets received per second (batches of 64, poll when idle).
//!
//! Gbit/s counts Ethernet frame bytes (no preamble, FCS or gap). The
//! namespace and everything in it is removed on exit (also on Ctrl-C).
//! Needs root.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use net_afxdp::testbed::{self, VethPair};
use net_afxdp::{AfXdpConfig, AfXdpNic, XskQueue};

/// Where the frames of the tx direction go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// The peer receives them with AF_XDP sockets (end to end).
    Xsk,
    /// The peer has no XDP program: its stack drops the frames (unknown
    /// EtherType); the sender is the bottleneck.
    Stack,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Tx,
    Rx,
}

struct Options {
    duration: Duration,
    sizes: Vec<usize>,
    queues: Vec<u32>,
    modes: Vec<String>,
    dirs: Vec<Direction>,
    peers: Vec<Peer>,
    batch: usize,
}

const USAGE: &str = "usage: xsk-bench [--duration SECS] [--sizes 64,1500] [--queues 1,2] \
[--modes native,skb] [--dirs tx,rx] [--peers xsk,stack] [--batch 64]";

fn list<T: std::str::FromStr>(text: &str, what: &str) -> Result<Vec<T>, String> {
    text.split(',')
        .map(|s| s.parse().map_err(|_| format!("{what}: bad value {s:?}")))
        .collect()
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        duration: Duration::from_secs(3),
        sizes: vec![64, 1500],
        queues: vec![1, 2],
        modes: vec!["native".into(), "skb".into()],
        dirs: vec![Direction::Tx, Direction::Rx],
        peers: vec![Peer::Xsk, Peer::Stack],
        batch: 64,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--duration" => {
                let secs: f64 = value()?
                    .parse()
                    .map_err(|_| "--duration: seconds".to_string())?;
                if !(0.1..=600.0).contains(&secs) {
                    return Err("--duration: 0.1 to 600 seconds".into());
                }
                o.duration = Duration::from_secs_f64(secs);
            }
            "--sizes" => {
                o.sizes = list(&value()?, "--sizes")?;
                if o.sizes.iter().any(|s| !(60..=1514).contains(s)) {
                    return Err("--sizes: frame sizes from 60 to 1514 (MTU 1500)".into());
                }
            }
            "--queues" => {
                o.queues = list(&value()?, "--queues")?;
                if o.queues.iter().any(|q| !(1..=8).contains(q)) {
                    return Err("--queues: 1 to 8".into());
                }
            }
            "--modes" => {
                o.modes = list(&value()?, "--modes")?;
                if o.modes.iter().any(|m| m != "native" && m != "skb") {
                    return Err("--modes: native and/or skb".into());
                }
            }
            "--dirs" => {
                o.dirs = value()?
                    .split(',')
                    .map(|d| match d {
                        "tx" => Ok(Direction::Tx),
                        "rx" => Ok(Direction::Rx),
                        _ => Err(format!("--dirs: tx and/or rx, not {d:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--peers" => {
                o.peers = value()?
                    .split(',')
                    .map(|p| match p {
                        "xsk" => Ok(Peer::Xsk),
                        "stack" => Ok(Peer::Stack),
                        _ => Err(format!("--peers: xsk and/or stack, not {p:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--batch" => {
                o.batch = value()?
                    .parse()
                    .map_err(|_| "--batch: a number".to_string())?;
                if !(1..=2048).contains(&o.batch) {
                    return Err("--batch: 1 to 2048".into());
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

struct Measurement {
    pps: f64,
    /// None when the peer's stack drops the frames uncounted.
    peer_pps: Option<f64>,
    drops: u64,
}

/// What one case measures.
#[derive(Clone, Copy)]
struct Case<'a> {
    dir: Direction,
    peer: Peer,
    mode: &'a str,
    queues: u32,
    size: usize,
    batch: usize,
}

/// Sends template frames on `q` until `stop`; counts completions.
fn sender(mut q: XskQueue, frame: Vec<u8>, batch: usize, stop: &AtomicBool) -> XskQueue {
    let len = frame.len();
    while !stop.load(Ordering::Relaxed) {
        let r = q.tx_batch(batch, |buf| {
            buf[..len].copy_from_slice(&frame);
            Some(len)
        });
        if r.kick_pending {
            q.kick_tx();
        }
        if r.sent == 0 {
            // Every frame is in flight: let completions come back.
            q.reclaim();
            if q.tx_free() == 0 {
                let _ = q.poll(false, true, Some(Duration::from_millis(1)));
            }
        }
    }
    q
}

/// Receives on `q` until `stop`.
fn receiver(mut q: XskQueue, batch: usize, stop: &AtomicBool) -> XskQueue {
    while !stop.load(Ordering::Relaxed) {
        // Touch each frame, as a consumer copying it out would.
        let n = q.rx_batch(batch, |f| {
            std::hint::black_box(f[0]);
            true
        });
        if n == 0 {
            let _ = q.poll(true, false, Some(Duration::from_millis(10)));
        }
    }
    q
}

fn rx_total(queues: &[net_afxdp::QueueStatsHandle]) -> (u64, u64) {
    queues.iter().fold((0, 0), |(p, d), h| {
        let s = h.snapshot();
        let k = s.kernel.unwrap_or_default();
        (p + s.counters.rx_packets, d + k.rx_dropped + k.rx_ring_full)
    })
}

fn tx_total(queues: &[net_afxdp::QueueStatsHandle]) -> u64 {
    queues
        .iter()
        .map(|h| h.counters().snapshot().tx_completions)
        .sum()
}

fn measure(case: Case<'_>, duration: Duration) -> Result<Measurement, String> {
    let Case {
        dir,
        peer,
        mode,
        queues,
        size,
        batch,
    } = case;
    // One spare queue: in skb mode veth reports transmit queue j+1 of the
    // sender as receive queue j, so the sender needs queues 1..=N.
    let pair = VethPair::new(queues + 1).map_err(|e| format!("setting up the veth pair: {e}"))?;
    let a_mac = pair.mac(&pair.a).map_err(|e| e.to_string())?;
    let b_mac = pair.mac(&pair.b).map_err(|e| e.to_string())?;
    let open = |options: String| -> Result<AfXdpNic, String> {
        let config: AfXdpConfig = options.parse().map_err(|e| format!("{e}"))?;
        pair.run(|| AfXdpNic::open(&config))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    };
    let a = open(format!(
        "ifname={},queues={queues},mode={mode},force-copy=on",
        pair.a
    ))?;
    let b = match peer {
        Peer::Xsk => Some(open(format!(
            "ifname={},queues={},mode={mode},force-copy=on",
            pair.b,
            queues + 1
        ))?),
        Peer::Stack => None,
    };
    let (_a_owner, a_queues) = a.into_parts();
    let (_b_owner, mut b_queues) = match b {
        Some(b) => {
            let (owner, queues) = b.into_parts();
            (Some(owner), queues)
        }
        None => (None, Vec::new()),
    };
    let a_stats: Vec<_> = a_queues.iter().map(XskQueue::stats_handle).collect();
    let b_stats: Vec<_> = b_queues.iter().map(XskQueue::stats_handle).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let spawn = |threads: &mut Vec<thread::JoinHandle<XskQueue>>,
                 f: Box<dyn FnOnce() -> XskQueue + Send>| {
        threads.push(thread::spawn(f));
    };
    match dir {
        Direction::Tx => {
            let frame = testbed::test_frame(b_mac, a_mac, 0, size);
            for q in a_queues {
                let (stop, frame) = (Arc::clone(&stop), frame.clone());
                spawn(
                    &mut threads,
                    Box::new(move || sender(q, frame, batch, &stop)),
                );
            }
            for q in b_queues {
                let stop = Arc::clone(&stop);
                spawn(&mut threads, Box::new(move || receiver(q, batch, &stop)));
            }
        }
        Direction::Rx => {
            let frame = testbed::test_frame(a_mac, b_mac, 0, size);
            let offset = usize::from(mode == "skb");
            for q in a_queues {
                let stop = Arc::clone(&stop);
                spawn(&mut threads, Box::new(move || receiver(q, batch, &stop)));
            }
            for q in b_queues.drain(offset..offset + queues as usize) {
                let (stop, frame) = (Arc::clone(&stop), frame.clone());
                spawn(
                    &mut threads,
                    Box::new(move || sender(q, frame, batch, &stop)),
                );
            }
        }
    }
    // Warm up, then count over the window.
    thread::sleep(Duration::from_millis(300));
    let sample = || match dir {
        Direction::Tx => (tx_total(&a_stats), rx_total(&b_stats)),
        Direction::Rx => (
            rx_total(&a_stats).0,
            (tx_total(&b_stats), rx_total(&a_stats).1),
        ),
    };
    let start = Instant::now();
    let (m0, (p0, d0)) = sample();
    let deadline = start + duration;
    while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    let (m1, (p1, d1)) = sample();
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        drop(
            t.join()
                .map_err(|_| "a benchmark thread panicked".to_string())?,
        );
    }
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    Ok(Measurement {
        pps: (m1 - m0) as f64 / secs,
        peer_pps: (peer == Peer::Xsk || dir == Direction::Rx).then(|| (p1 - p0) as f64 / secs),
        drops: d1 - d0,
    })
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xsk-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !testbed::is_root() {
        eprintln!("xsk-bench: needs root (veth pairs, namespaces, XDP, AF_XDP sockets)");
        return ExitCode::from(2);
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "xsk-bench: raw AF_XDP on a veth pair, copy mode, batch {}, {:.1} s per case, {} CPUs, kernel {}",
        options.batch,
        options.duration.as_secs_f64(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    println!("tx: frames completed on the measured side's sockets; rx: frames received by them.");
    println!(
        "tx peer xsk: the peer receives with AF_XDP; stack: the peer's kernel drops the frames."
    );
    println!("peer Mpps: frames the other end sent (rx) or received (tx); drops: receiving sockets' kernel drops.\n");
    println!(
        "{:<4} {:<6} {:<7} {:>6} {:>6} {:>9} {:>9} {:>10} {:>10}",
        "dir", "peer", "mode", "queues", "bytes", "Mpps", "Gbit/s", "peer Mpps", "drops"
    );
    let mut failed = false;
    for &dir in &options.dirs {
        let peers = if dir == Direction::Tx {
            options.peers.clone()
        } else {
            vec![Peer::Xsk]
        };
        for peer in peers {
            for mode in &options.modes {
                for &queues in &options.queues {
                    for &size in &options.sizes {
                        if INTERRUPTED.load(Ordering::Relaxed) {
                            return ExitCode::from(130);
                        }
                        let case = Case {
                            dir,
                            peer,
                            mode,
                            queues,
                            size,
                            batch: options.batch,
                        };
                        let name = if dir == Direction::Tx { "tx" } else { "rx" };
                        let peer_name = if peer == Peer::Xsk { "xsk" } else { "stack" };
                        let row =
                            format!("{name:<4} {peer_name:<6} {mode:<7} {queues:>6} {size:>6}");
                        match measure(case, options.duration) {
                            Ok(m) => println!(
                                "{row} {:>9.3} {:>9.2} {:>10} {:>10}",
                                m.pps / 1e6,
                                m.pps * size as f64 * 8.0 / 1e9,
                                m.peer_pps
                                    .map_or("-".to_string(), |p| format!("{:.3}", p / 1e6)),
                                m.drops
                            ),
                            Err(e) => {
                                println!("{row} failed: {e}");
                                failed = true;
                            }
                        }
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
