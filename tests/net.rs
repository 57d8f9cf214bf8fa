//! Network boot tests: a guest with `--net af-xdp` on a veth whose peer is
//! in a network namespace, with the guest's real virtio_net driver and real
//! iperf3 on both ends. Direct on hosts with hardware virtualization, in the
//! nested test host otherwise.

mod common;

use std::path::Path;

use common::{guest_image, run_scenario, ScenarioOutput};

const XSKVM: &str = env!("CARGO_BIN_EXE_xskvm");
const GUEST_IP: &str = "10.77.0.2";
const PEER_IP: &str = "10.77.0.1";
const GUEST_IP6: &str = "fd77::2";
const PEER_IP6: &str = "fd77::1";

/// Shell that creates the veth pair (`queues` queues each way), moves the
/// peer end into namespace `peer` with PEER_IP, and defines `boot_guest`:
/// boot_guest OUT XSKVM-ARGS... runs xskvm in the background with the
/// guest command in /tmp/guest-cmd, its console in OUT and its log in OUT.log
/// (apart: a log line written amid a guest line would split the guest's
/// marker), its pid in $XSKVM_PID.
fn testbed(queues: u32) -> String {
    let image = guest_image();
    format!(
        r#"
set -u
ip netns add peer
ip -n peer link set lo up
# Also used to create the pair again under a running guest.
make_veth() {{
    ip link add xs0 numtxqueues {queues} numrxqueues {queues} type veth peer name xs1 numtxqueues {queues} numrxqueues {queues}
    ip link set xs1 netns peer
    ip -n peer addr add {PEER_IP}/24 dev xs1
    ip -n peer addr add {PEER_IP6}/64 dev xs1 nodad
    # The peer keeps its default offloads: its TCP/UDP frames leave with the
    # checksum left to "hardware", which xskvm's IO thread completes.
    ip -n peer link set xs1 up
    ip link set xs0 up
}}
make_veth
boot_guest() {{
    local out=$1; shift
    {XSKVM} --kernel {kernel} --initrd {initrd} --memory 512M --log-level debug "$@" \
        --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"$(cat /tmp/guest-cmd)\"" \
        </dev/null >$out 2>$out.log &
    XSKVM_PID=$!
}}
wait_for() {{
    for i in $(seq 1200); do grep -q "$1" "$2" && return 0; kill -0 $XSKVM_PID 2>/dev/null || break; sleep 0.1; done
    grep -q "$1" "$2"
}}
finish() {{
    wait $XSKVM_PID
    echo "XSKVM-RC=$?"
    # The kernel may release the BPF link a moment after the process is gone.
    for i in $(seq 20); do ip -d link show xs0 | grep -q xdp || break; sleep 0.1; done
    if ip -d link show xs0 | grep -q xdp; then echo XDP=left; else echo XDP=gone; fi
}}
"#,
        kernel = image.bzimage.display(),
        initrd = image.initramfs.display(),
    )
}

/// Guest shell that brings eth0 up with GUEST_IP.
const GUEST_NET_UP: &str = "ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 1";

fn run(script: String) -> ScenarioOutput {
    let image = guest_image();
    run_scenario(
        &script,
        &[Path::new(XSKVM), &image.bzimage, &image.initramfs],
    )
}

/// The scenario printed `KEY=want` (as its last `KEY=` line).
fn assert_value(out: &ScenarioOutput, key: &str, want: &str) {
    assert_eq!(out.value_of(key), Some(want), "{key}\n{}", out.describe());
}

fn assert_clean_exit(out: &ScenarioOutput) {
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(out, "XSKVM-RC", "0");
    assert_eq!(
        out.value_of("XDP"),
        Some("gone"),
        "XDP program left on xs0\n{}",
        out.describe()
    );
}

#[test]
fn ping_both_ways_and_no_xdp_program_left_after_exit() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} && echo GUEST-PING=ok; sleep 120
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for GUEST-PING=ok /tmp/console
ip -d link show xs0 | grep -q xdp && echo XDP-WHILE-RUNNING=yes
ip netns exec peer ping -c 3 -W 5 {GUEST_IP} && echo PEER-PING=ok
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_value(&out, "GUEST-PING", "ok");
    assert_value(&out, "XDP-WHILE-RUNNING", "yes");
    assert_value(&out, "PEER-PING", "ok");
    assert_clean_exit(&out);
}

/// TCP through xskvm must move real bulk traffic. The floor is for the
/// slowest place these tests run: the nested test host, where the guest
/// runs under KVM inside QEMU's TCG emulator (every instruction of the
/// test host, xskvm's IO thread included, is emulated). Measured there:
/// see the issue notes; on hardware it is orders of magnitude higher.
const IPERF_FLOOR_MBITS: f64 = 20.0;

#[test]
fn iperf3_tcp_both_ways_above_the_floor() {
    let script = format!(
        r#"{testbed}
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; iperf3 -c {PEER_IP} -t 10 -f m; iperf3 -c {PEER_IP} -t 10 -f m -R
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    common::assert_iperf_both_ways(&out, IPERF_FLOOR_MBITS, "");
}

/// `mode=skb` (generic XDP, also the fallback where native XDP is not
/// available): the peer keeps its GSO (native XDP on a veth turns it off
/// for the peer), so generic XDP hands xskvm whole 64 KiB TCP packets;
/// the sockets bind multi-buffer to take them (Linux 6.6+), and the guest
/// gets them as GSO frames cut at its MTU. Before, every such packet was
/// lost and TCP from the peer crawled at a few Mbit/s.
#[test]
fn skb_mode_takes_the_peers_gso_packets_whole_and_tcp_flows_both_ways() {
    let script = format!(
        r#"{testbed}
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; iperf3 -c {PEER_IP} -t 5 -f m; iperf3 -c {PEER_IP} -t 5 -f m -R; ethtool -K eth0 rx-gro-hw off; iperf3 -c {PEER_IP} -t 5 -f m -R | grep receiver | sed 's/receiver/RECEIVED-WITHOUT-GSO/'
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0,mode=skb
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert!(
        out.stdout.contains("frames up to 65554 bytes received"),
        "skb mode without multi-buffer sockets\n{}",
        out.describe()
    );
    common::assert_iperf_both_ways(&out, IPERF_FLOOR_MBITS, "skb mode: ");
    assert_eq!(exit_log_count(&out, "too big"), 0, "{}", out.describe());
    // With GUEST_TSO off (rx-gro-hw off: a router's or an XDP guest's
    // set-up), the peer's packets are cut into wire frames for it.
    let without_gso = out
        .stdout
        .lines()
        .find(|l| l.contains("RECEIVED-WITHOUT-GSO"))
        .and_then(common::iperf_mbits);
    eprintln!(
        "skb mode, guest without GSO frames: peer->guest {without_gso:?} Mbit/s, {} packets cut",
        exit_log_count(&out, "packets into")
    );
    assert!(
        without_gso.is_some_and(|m| m >= IPERF_FLOOR_MBITS),
        "peer to guest without GSO frames: {without_gso:?} Mbit/s\n{}",
        out.describe()
    );
    assert!(
        exit_log_count(&out, "packets into") > 0,
        "{}",
        out.describe()
    );
}

#[test]
fn file_of_64_mib_each_way_arrives_intact() {
    let files = common::file_exchange(64 << 20, PEER_IP, GUEST_IP);
    // busybox httpd serves the file on one side, wget fetches it on the other.
    let script = format!(
        r#"{testbed}
{files_host_serves}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; {files_guest}; sleep 600
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for GUEST-SERVER-UP /tmp/console
{files_host_fetches}
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1),
        files_host_serves = files.host_serves,
        files_guest = files.guest,
        files_host_fetches = files.host_fetches,
    );
    let out = run(script);
    assert_clean_exit(&out);
    common::assert_files_arrived_intact(&out);
}

/// Issue 10: veth at MTU 9000 on both ends. The guest gets MTU 9000
/// through virtio's MTU feature, the AF_XDP sockets run multi-buffer
/// (frames span several 4 KiB UMEM frames), and 9000-byte IP packets go
/// both ways unfragmented (`-M do`); then iperf3 both ways and a 64 MiB
/// file each way at that MTU.
#[test]
fn jumbo_frames_at_mtu_9000_carry_ping_iperf3_and_files_both_ways() {
    let files = common::file_exchange(64 << 20, PEER_IP, GUEST_IP);
    let script = format!(
        r#"{testbed}
ip link set xs0 mtu 9000
ip -n peer link set xs1 mtu 9000
ip netns exec peer iperf3 -s -D
{files_host_serves}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; echo GUEST-MTU=$(cat /sys/class/net/eth0/mtu); /usr/bin/ping -c 3 -W 5 -s 8972 -M do {PEER_IP} && echo GUEST-PING=ok; /usr/bin/ping -c 1 -W 2 -s 8973 -M do {PEER_IP} >/dev/null 2>&1 || echo GUEST-PING-8973=refused; iperf3 -c {PEER_IP} -t 5 -f m; iperf3 -c {PEER_IP} -t 5 -f m -R; {files_guest}; sleep 600
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
# ping, iperf3 and the download come first: allow twice wait_for's time.
wait_for GUEST-SERVER-UP /tmp/console || wait_for GUEST-SERVER-UP /tmp/console
ip netns exec peer /usr/bin/ping -c 3 -W 5 -s 8972 -M do {GUEST_IP} && echo PEER-PING=ok
{files_host_fetches}
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1),
        files_host_serves = files.host_serves,
        files_guest = files.guest,
        files_host_fetches = files.host_fetches,
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert!(
        out.stdout.contains("multi-buffer (frames up to"),
        "the sockets did not bind multi-buffer\n{}",
        out.describe()
    );
    assert_value(&out, "GUEST-MTU", "9000");
    assert_value(&out, "GUEST-PING", "ok");
    assert_value(&out, "GUEST-PING-8973", "refused");
    assert_value(&out, "PEER-PING", "ok");
    common::assert_iperf_both_ways(&out, IPERF_FLOOR_MBITS, "MTU 9000: ");
    common::assert_files_arrived_intact(&out);
}

/// Issue 10: `umem=guest,tx-gather=on` at MTU 9000: the guest's frames
/// (TSO segments and jumbo frames over several of its pages) go out from
/// its own buffers as a head and pieces, and a 64 MiB file each way
/// arrives with the same sha256 (checksums are made over what the kernel
/// read, so only the file's hash shows that it read the right bytes), as
/// do 9000-byte pings both ways.
#[test]
fn umem_guest_tx_gather_at_mtu_9000_carries_files_both_ways_intact() {
    let files = common::file_exchange(64 << 20, PEER_IP, GUEST_IP);
    let script = format!(
        r#"{testbed}
ip link set xs0 mtu 9000
ip -n peer link set xs1 mtu 9000
{files_host_serves}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; /usr/bin/ping -c 3 -W 5 -s 8972 -M do {PEER_IP} && echo GUEST-PING=ok; {files_guest}; sleep 600
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0,umem=guest,tx-gather=on
wait_for GUEST-SERVER-UP /tmp/console || wait_for GUEST-SERVER-UP /tmp/console
ip netns exec peer /usr/bin/ping -c 3 -W 5 -s 8972 -M do {GUEST_IP} && echo PEER-PING=ok
{files_host_fetches}
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1),
        files_host_serves = files.host_serves,
        files_guest = files.guest,
        files_host_fetches = files.host_fetches,
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "GUEST-PING", "ok");
    assert_value(&out, "PEER-PING", "ok");
    common::assert_files_arrived_intact(&out);
    let gathered: u64 = numbers_before(&out, " from guest memory").sum();
    eprintln!("frames sent from guest memory: {gathered}");
    assert!(
        gathered > 1000,
        "frames sent from guest memory: {gathered}\n{}",
        out.describe()
    );
}

/// Values of the `Tcp:` or `Udp:` lines of /proc/net/snmp as printed by
/// the scenario (a header line of names, then a line of values).
fn snmp(out: &ScenarioOutput, proto: &str, field: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .collect();
    let names = lines.first()?.split_whitespace();
    let values = lines.get(1)?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
}

/// A number in xskvm's exit log: the one before `label` on the queue
/// pair line (e.g. "gso frames"), summed over the pairs.
fn exit_log_count(out: &ScenarioOutput, label: &str) -> u64 {
    out.stdout
        .lines()
        .filter(|l| l.contains(" q") && l.contains(label))
        .filter_map(|l| {
            let before = &l[..l.find(label)?];
            before.split_whitespace().last()?.parse::<u64>().ok()
        })
        .sum()
}

/// Issue 7: the guest negotiates checksum and segmentation offloads, and
/// bulk TCP (IPv4 and IPv6, both ways) and 8 KiB UDP datagrams arrive with
/// correct checksums, the peer keeping its own default offloads (its
/// frames leave with checksums for "hardware" to fill, which xskvm does).
/// With the guest's offloads switched off, traffic still flows. Here xskvm
/// fills the guest's transmit checksums itself (`tx-csum=vmm`), so the
/// peer's stack verifies every one of them (its InCsumErrors stay 0).
#[test]
fn offloads_on_both_ends_carry_tcp_and_udp_with_correct_checksums() {
    let out = offloads_scenario(",tx-csum=vmm");
    assert!(
        out.stdout
            .contains("transmit checksums by xskvm (tx-csum=vmm)"),
        "{}",
        out.describe()
    );
    assert!(
        exit_log_count(&out, "checksums filled") > 0,
        "{}",
        out.describe()
    );
    assert_eq!(
        exit_log_count(&out, "left to the kernel"),
        0,
        "{}",
        out.describe()
    );
}

/// The same with the default `tx-csum=kernel`: the guest's transmit
/// checksums go to the kernel as AF_XDP TX metadata (Linux 6.12 in the
/// test host), the frames leave as CHECKSUM_PARTIAL and everything still
/// flows (a veth peer accepts such frames as they are; that the requests
/// are right is checked where the kernel fills them, in net-afxdp's
/// tx_checksum test and the device tests).
#[test]
fn offloads_with_transmit_checksums_left_to_the_kernel() {
    let out = offloads_scenario("");
    assert!(
        out.stdout
            .contains("transmit checksums by the kernel (AF_XDP TX metadata)"),
        "{}",
        out.describe()
    );
    assert!(
        exit_log_count(&out, "left to the kernel") > 0,
        "{}",
        out.describe()
    );
}

/// Runs the offload scenario with `net_options` appended to `--net` and
/// checks what both checksum paths share.
fn offloads_scenario(net_options: &str) -> ScenarioOutput {
    let offloads = "ethtool -k eth0 | grep -E '^[[:space:]]*(tx-checksumming|rx-checksumming|tcp-segmentation-offload|tx-tcp6-segmentation|tx-udp-segmentation|rx-gro-hw):' | sed 's/^[[:space:]]*//;s/: /=/;s/^/OFFLOAD-/'";
    let script = format!(
        r#"{testbed}
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad; ip -6 addr add {GUEST_IP6}/64 dev eth0; ethtool -K eth0 tx-udp-segmentation on; {offloads}; iperf3 -c {PEER_IP} -t 4 -f m; iperf3 -c {PEER_IP} -t 4 -f m -R; iperf3 -6 -c {PEER_IP6} -t 4 -f m; iperf3 -6 -c {PEER_IP6} -t 4 -f m -R; iperf3 -c {PEER_IP} -u -b 20M -l 8192 -t 3 -f m; iperf3 -c {PEER_IP} -u -b 20M -l 8192 -t 3 -f m -R; ethtool -K eth0 tx off tso off gro off rx-gro-hw off; {offloads}; iperf3 -c {PEER_IP} -t 3 -f m; iperf3 -c {PEER_IP} -t 3 -f m -R; echo GUEST-DONE
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0{net_options}
finish
cat /tmp/console /tmp/console.log
ip netns exec peer cat /proc/net/snmp | grep -E '^(Tcp|Udp):'
"#,
        testbed = testbed(1)
    );
    let out = run(script.clone());
    let slow = check_offloads(&out);
    if slow.is_empty() {
        return out;
    }
    // Rates in the nested TCG test host range over 10x from run to run,
    // and now and then a TCP run stays at a small window throughout; a
    // crawl from a defect is below the floor on the second run too.
    eprintln!(
        "below the floor ({}); the scenario once more",
        slow.join(", ")
    );
    let again = run(script);
    let slow = check_offloads(&again);
    assert!(
        slow.is_empty(),
        "below the floor twice: {}\n{}",
        slow.join(", "),
        again.describe()
    );
    again
}

/// Everything `offloads_scenario` checks but the rate floor; returns the
/// runs below it.
fn check_offloads(out: &ScenarioOutput) -> Vec<String> {
    assert_clean_exit(out);
    assert!(out.stdout.contains("GUEST-DONE"), "{}", out.describe());
    // The first listing (offloads on) comes first in the output. Linux
    // offers USO but leaves it off until asked (the guest command asks).
    let first = |key: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    };
    for feature in [
        "tx-checksumming",
        "rx-checksumming",
        "tcp-segmentation-offload",
        "tx-tcp6-segmentation",
        "tx-udp-segmentation",
        "rx-gro-hw",
    ] {
        let key = format!("OFFLOAD-{feature}");
        // "on", or "on [fixed]" where the driver offers no switch.
        assert!(
            first(&key).is_some_and(|v| v.starts_with("on")),
            "{key}\n{}",
            out.describe()
        );
    }
    assert_value(out, "OFFLOAD-tx-checksumming", "off");
    assert_value(out, "OFFLOAD-tcp-segmentation-offload", "off");
    // rx-gro-hw off goes to the device as VIRTIO_NET_CTRL_GUEST_OFFLOADS:
    // it stops coalescing for this guest.
    assert_value(out, "OFFLOAD-rx-gro-hw", "off");
    let rates = common::iperf_receiver_rates(out);
    assert_eq!(rates.len(), 8, "eight iperf3 runs\n{}", out.describe());
    eprintln!(
        "iperf3 Mbit/s: v4 tcp out {:.0} in {:.0}; v6 tcp out {:.0} in {:.0}; udp 8 KiB out {:.1} in {:.1}; offloads off: tcp out {:.0} in {:.0}",
        rates[0], rates[1], rates[2], rates[3], rates[4], rates[5], rates[6], rates[7]
    );
    let slow: Vec<String> = rates
        .iter()
        .enumerate()
        .filter(|&(i, rate)| {
            *rate
                <= if i == 4 || i == 5 {
                    1.0
                } else {
                    IPERF_FLOOR_MBITS
                }
        })
        .map(|(i, rate)| format!("run {i}: {rate} Mbit/s"))
        .collect();
    for (proto, field) in [("Tcp", "InCsumErrors"), ("Udp", "InCsumErrors")] {
        assert_eq!(
            snmp(out, proto, field),
            Some(0),
            "peer {proto} {field}\n{}",
            out.describe()
        );
    }
    let gso = exit_log_count(out, "gso frames");
    let completed = exit_log_count(out, "completed");
    let merged = exit_log_count(out, "frames from");
    eprintln!(
        "xskvm: {gso} GSO frames from the guest, {completed} peer checksums completed, \
         {merged} coalesced frames to the guest"
    );
    assert!(
        merged > 0,
        "no frames coalesced for the guest\n{}",
        out.describe()
    );
    assert!(gso > 0, "the guest sent no GSO frames\n{}", out.describe());
    assert!(
        completed > 0,
        "no peer checksum completed\n{}",
        out.describe()
    );
    slow
}

/// rx and tx packet counts per queue pair from xskvm's exit log.
fn queue_counts(out: &ScenarioOutput) -> Vec<(u64, u64)> {
    out.stdout
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(" net0 q")?.1;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let rx = words.iter().position(|w| *w == "rx")?;
            let tx = words.iter().position(|w| *w == "tx")?;
            Some((
                words.get(rx + 1)?.parse().ok()?,
                words.get(tx + 1)?.parse().ok()?,
            ))
        })
        .collect()
}

/// Eight iperf3 flows each way: the peer's veth picks a queue per flow by
/// hash, and with four a run once put every flow on one queue.
#[test]
fn two_vcpus_two_queue_pairs_both_carry_traffic() {
    let script = format!(
        r#"{testbed}
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; cat /sys/class/net/eth0/queues/*/xps_cpus 2>/dev/null; ls /sys/class/net/eth0/queues; iperf3 -c {PEER_IP} -t 3 -P 8 -f m; iperf3 -c {PEER_IP} -t 3 -P 8 -f m -R
CMD
boot_guest /tmp/console --vcpus 2 --net af-xdp,ifname=xs0,queues=2
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(2)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert!(
        out.stdout.contains("rx-1") && out.stdout.contains("tx-1"),
        "guest has 2 queue pairs\n{}",
        out.describe()
    );
    let counts = queue_counts(&out);
    assert_eq!(counts.len(), 2, "{}", out.describe());
    for (pair, (rx, tx)) in counts.iter().enumerate() {
        assert!(
            *rx > 100 && *tx > 100,
            "queue pair {pair}: rx {rx} tx {tx}\n{}",
            out.describe()
        );
    }
}

/// Frames dropped because they arrived on a queue pair the guest does not
/// use, per queue pair, from xskvm's exit log.
fn dropped_on_unused_pairs(out: &ScenarioOutput) -> Vec<u64> {
    out.stdout
        .lines()
        .filter(|l| l.contains(" net0 q"))
        .filter_map(|l| {
            let before = l.split_once(" on an unused pair")?.0;
            before.split_whitespace().last()?.parse().ok()
        })
        .collect()
}

#[test]
fn one_vcpu_with_two_queues_counts_every_frame_it_cannot_deliver() {
    const DATAGRAMS: u64 = 200;
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; echo GUEST-QUEUES=$(ls /sys/class/net/eth0/queues | tr '\n' ' '); echo GUEST-NET-UP; sleep 25
CMD
boot_guest /tmp/console --vcpus 1 --net af-xdp,ifname=xs0,queues=2,mac=52:54:00:12:34:56
wait_for GUEST-NET-UP /tmp/console
# A static neighbour: ARP itself could land on the unused queue.
ip -n peer neigh replace {GUEST_IP} lladdr 52:54:00:12:34:56 dev xs1 nud permanent
# Each datagram from a new socket: a new flow hash, so the peer's veth
# spreads them over both queues.
ip netns exec peer bash -c 'for i in $(seq {DATAGRAMS}); do echo x > /dev/udp/{GUEST_IP}/9; done'
echo SENT=done
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(2)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert!(
        out.stdout.contains("2 queues but 1 vCPU(s)"),
        "xskvm warns at start\n{}",
        out.describe()
    );
    assert_eq!(
        out.value_of("GUEST-QUEUES").map(str::trim),
        Some("rx-0 tx-0"),
        "a 1-vCPU Linux guest uses one pair\n{}",
        out.describe()
    );
    let counts = queue_counts(&out);
    let dropped = dropped_on_unused_pairs(&out);
    eprintln!("(rx, tx) per pair {counts:?}, dropped on an unused pair {dropped:?}");
    assert_eq!((counts.len(), dropped.len()), (2, 2), "{}", out.describe());
    assert_eq!(dropped[0], 0, "pair 0 is in use\n{}", out.describe());
    assert!(
        dropped[1] > 0,
        "some flows hash to queue 1\n{}",
        out.describe()
    );
    assert_eq!(
        counts[1].0,
        0,
        "nothing delivered on pair 1\n{}",
        out.describe()
    );
    assert!(
        counts[0].0 + dropped[1] >= DATAGRAMS,
        "every datagram is delivered or counted: {} + {} < {DATAGRAMS}\n{}",
        counts[0].0,
        dropped[1],
        out.describe()
    );
}

/// Guest shell: waits (up to 60 s) until eth0's carrier is `$1`, then
/// prints `$2=<carrier>` (no double quotes: the command travels in them).
const GUEST_WAIT_CARRIER: &str = "wait_carrier() { for i in $(seq 600); do read c < /sys/class/net/eth0/carrier; [ $c = $1 ] && break; sleep 0.1; done; read c < /sys/class/net/eth0/carrier; echo $2=$c; }";

#[test]
fn host_link_down_then_up_reaches_the_guest_and_traffic_resumes() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_WAIT_CARRIER}; {GUEST_NET_UP}; ping -c 2 -W 5 {PEER_IP} >/dev/null && echo FIRST-PING=ok; wait_carrier 0 GUEST-CARRIER-DOWN; ip link show eth0 | grep -q NO-CARRIER && echo GUEST-NO-CARRIER=yes; wait_carrier 1 GUEST-CARRIER-UP; ping -c 3 -W 5 {PEER_IP} && echo AFTER-PING=ok
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for FIRST-PING=ok /tmp/console
ip link set xs0 down
wait_for GUEST-NO-CARRIER /tmp/console
sleep 3
ip link set xs0 up
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "FIRST-PING", "ok");
    assert_value(&out, "GUEST-CARRIER-DOWN", "0");
    assert_value(&out, "GUEST-NO-CARRIER", "yes");
    assert_value(&out, "GUEST-CARRIER-UP", "1");
    assert_value(&out, "AFTER-PING", "ok");
    assert!(
        out.stdout.contains("xs0 link down") && out.stdout.contains("xs0 link up"),
        "logged once each way\n{}",
        out.describe()
    );
}

#[test]
fn interface_deleted_under_a_running_guest_then_created_again_carries_traffic() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_WAIT_CARRIER}; {GUEST_NET_UP}; ping -c 2 -W 5 {PEER_IP} >/dev/null && echo FIRST-PING=ok; wait_carrier 0 GUEST-CARRIER-GONE; wait_carrier 1 GUEST-CARRIER-BACK; ping -c 3 -W 5 {PEER_IP} && echo AFTER-PING=ok; sleep 5
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for FIRST-PING=ok /tmp/console
ip link del xs0
wait_for GUEST-CARRIER-GONE /tmp/console
kill -0 $XSKVM_PID && echo XSKVM-ALIVE=yes
sleep 2
make_veth
wait_for AFTER-PING /tmp/console
ip -d link show xs0 | grep -q xdp && echo XDP-REATTACHED=yes
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "FIRST-PING", "ok");
    assert_value(&out, "GUEST-CARRIER-GONE", "0");
    assert_value(&out, "XSKVM-ALIVE", "yes");
    assert_value(&out, "GUEST-CARRIER-BACK", "1");
    assert_value(&out, "XDP-REATTACHED", "yes");
    assert_value(&out, "AFTER-PING", "ok");
}

/// `umem=guest`: guest RAM is the UMEM of both queue pairs' sockets (one
/// registration, shared), and the guest works as on its own UMEMs: ping
/// and TCP both ways on two queue pairs (with `tx-gather=on` the guest's
/// segments sent from its own buffers), traffic again after the interface was deleted and
/// created anew (the region registered again).
#[test]
fn umem_guest_carries_traffic_on_two_queue_pairs_and_after_the_interface_returns() {
    let script = format!(
        r#"{testbed}
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_WAIT_CARRIER}; {GUEST_NET_UP}; ping -c 2 -W 5 {PEER_IP} >/dev/null && echo FIRST-PING=ok; iperf3 -c {PEER_IP} -t 2 -P 4 -f m | grep -q receiver && echo TO-PEER=ok; iperf3 -c {PEER_IP} -t 2 -P 4 -f m -R | grep -q receiver && echo FROM-PEER=ok; wait_carrier 0 GUEST-CARRIER-GONE; wait_carrier 1 GUEST-CARRIER-BACK; ping -c 3 -W 5 {PEER_IP} >/dev/null && echo AFTER-PING=ok; sleep 3
CMD
boot_guest /tmp/console --vcpus 2 --net af-xdp,ifname=xs0,queues=2,umem=guest,tx-gather=on
wait_for FROM-PEER=ok /tmp/console
ip link del xs0
wait_for GUEST-CARRIER-GONE /tmp/console
sleep 1
make_veth
wait_for AFTER-PING /tmp/console
finish
grep -c 'UMEM on guest memory (umem=guest)' /tmp/console.log | sed 's/^/UMEM-GUEST-QUEUES=/'
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(2)
    );
    let out = run(script);
    assert_clean_exit(&out);
    for key in ["FIRST-PING", "TO-PEER", "FROM-PEER", "AFTER-PING"] {
        assert_value(&out, key, "ok");
    }
    assert_value(&out, "GUEST-CARRIER-GONE", "0");
    assert_value(&out, "GUEST-CARRIER-BACK", "1");
    // Two queues at start, two again when the interface came back.
    assert_value(&out, "UMEM-GUEST-QUEUES", "4");
    let counts = queue_counts(&out);
    assert_eq!(counts.len(), 2, "{}", out.describe());
    for (pair, (rx, tx)) in counts.iter().enumerate() {
        assert!(
            *rx > 100 && *tx > 100,
            "queue pair {pair}: rx {rx} tx {tx}\n{}",
            out.describe()
        );
    }
    // The guest's TCP segments went out from its own buffers, not copied.
    let gathered: u64 = numbers_before(&out, " from guest memory").sum();
    eprintln!("frames sent from guest memory: {gathered}");
    assert!(
        gathered > 100,
        "frames sent from guest memory: {gathered}\n{}",
        out.describe()
    );
}

/// The numbers right before `marker` on the output lines that have it
/// (xskvm's log lines: counters, the filter's count).
fn numbers_before<'a>(out: &'a ScenarioOutput, marker: &'a str) -> impl Iterator<Item = u64> + 'a {
    out.stdout.lines().filter_map(move |l| {
        let before = l.split_once(marker)?.0;
        before.split_whitespace().last()?.parse().ok()
    })
}

/// The guest's RX packet count as it printed it under `key`.
fn count(out: &ScenarioOutput, key: &str) -> u64 {
    out.value_of(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key}\n{}", out.describe()))
}

#[test]
fn frames_for_other_macs_reach_the_guest_only_in_promiscuous_mode() {
    const FRAMES: u64 = 20;
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; read a < /sys/class/net/eth0/statistics/rx_packets; echo RX1=$a; echo GUEST-NET-UP; sleep 8; read b < /sys/class/net/eth0/statistics/rx_packets; echo RX2=$b; ip link set eth0 promisc on; echo PROMISC-ON; sleep 8; read c < /sys/class/net/eth0/statistics/rx_packets; echo RX3=$c
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for GUEST-NET-UP /tmp/console
# Unicast to a MAC that is not the guest's.
ip -n peer neigh replace {GUEST_IP} lladdr 02:00:00:00:00:99 dev xs1 nud permanent
send() {{ ip netns exec peer bash -c 'for i in $(seq {FRAMES}); do echo x > /dev/udp/{GUEST_IP}/9; done'; }}
send
wait_for PROMISC-ON /tmp/console
sleep 1
send
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    let (rx1, rx2, rx3) = (count(&out, "RX1"), count(&out, "RX2"), count(&out, "RX3"));
    eprintln!("guest rx_packets: {rx1} -> {rx2} (filtering) -> {rx3} (promiscuous)");
    assert!(
        rx2 - rx1 < FRAMES,
        "frames for another MAC were filtered: {rx1} -> {rx2}\n{}",
        out.describe()
    );
    assert!(
        rx3 - rx2 >= FRAMES,
        "promiscuous mode lets them in: {rx2} -> {rx3}\n{}",
        out.describe()
    );
    let filtered = numbers_before(&out, " frame(s) not for the guest")
        .next()
        .unwrap_or_else(|| panic!("no filter count\n{}", out.describe()));
    assert!(filtered >= FRAMES, "{filtered} counted\n{}", out.describe());
}

#[test]
fn a_udp_flood_from_the_peer_leaves_xskvm_and_the_guest_working() {
    // iperf3 -R: the peer's server sends as fast as it can, for 8 s,
    // datagrams of 18 bytes of payload (64-byte frames).
    let script = format!(
        r#"{testbed}
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; iperf3 -c {PEER_IP} -u -b 0 -l 18 -t 8 -R -f m; ping -c 3 -W 5 {PEER_IP} && echo PING-AFTER=ok; echo FLOOD-DONE
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for FLOOD-DONE /tmp/console
kill -0 $XSKVM_PID && echo XSKVM-ALIVE=yes
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "XSKVM-ALIVE", "yes");
    assert_value(&out, "PING-AFTER", "ok");
    let counts = queue_counts(&out);
    eprintln!("(rx, tx) during and after the flood: {counts:?}");
    // What the kernel dropped is counted and reported at exit.
    let report = out
        .stdout
        .lines()
        .find(|l| l.contains("host side: AF_XDP queue 0: kernel drops:"))
        .unwrap_or_else(|| panic!("no AF_XDP drop report\n{}", out.describe()));
    eprintln!("{report}");
    assert!(
        counts.first().is_some_and(|&(rx, _)| rx > 1000),
        "the flood reached the guest\n{}",
        out.describe()
    );
}

#[test]
fn traffic_resumes_after_the_guest_reloads_virtio_net() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; ping -c 2 -W 5 {PEER_IP} > /dev/null && echo FIRST-PING=ok; rmmod virtio_net && echo UNLOADED=yes; insmod /modules/virtio_net.ko; sleep 1; {GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} && echo AFTER-RELOAD-PING=ok
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "FIRST-PING", "ok");
    assert_value(&out, "UNLOADED", "yes");
    assert_value(&out, "AFTER-RELOAD-PING", "ok");
}

#[test]
fn sigkilled_xskvm_leaves_no_xdp_program() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; echo GUEST-NET-UP; sleep 600
CMD
boot_guest /tmp/console --net af-xdp,ifname=xs0
wait_for GUEST-NET-UP /tmp/console
ip -d link show xs0 | grep -q xdp && echo XDP-WHILE-RUNNING=yes
kill -KILL $XSKVM_PID
finish
"#,
        testbed = testbed(1)
    );
    let out = run(script);
    assert_value(&out, "XDP-WHILE-RUNNING", "yes");
    assert_eq!(
        out.value_of("XSKVM-RC"),
        Some("137"),
        "killed by SIGKILL\n{}",
        out.describe()
    );
    assert_eq!(
        out.value_of("XDP"),
        Some("gone"),
        "XDP program left on xs0\n{}",
        out.describe()
    );
}
