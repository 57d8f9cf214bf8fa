//! Least privilege, as boot tests (direct on hosts with hardware
//! virtualization, in the nested test host otherwise): xskvm started by
//! `xskvm-net-helper` runs the whole network scenario as an unprivileged
//! user with no capabilities at all; xskvm started as root keeps only what
//! its NIC watcher thread needs to reopen a NIC (`--capabilities auto`),
//! or nothing (`--capabilities none`).

mod common;

use std::path::Path;

use common::{guest_image, run_scenario, ScenarioOutput};

const XSKVM: &str = env!("CARGO_BIN_EXE_xskvm");
const HELPER: &str = env!("CARGO_BIN_EXE_xskvm-net-helper");
const GUEST_IP: &str = "10.77.0.2";
const PEER_IP: &str = "10.77.0.1";
/// xskvm's unprivileged user and the group given access to /dev/kvm.
const VM_USER: &str = "4241:4241";
const KVM_GROUP: &str = "4242";
/// CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK, CAP_PERFMON, CAP_BPF, as
/// /proc/PID/status prints a capability set.
const NET_CAPS: &str = "000000c000007000";
const NO_CAPS: &str = "0000000000000000";
/// iperf3 moved real bulk traffic (not a performance floor).
const IPERF_FLOWS_MBITS: f64 = 5.0;
/// Frames the peer sends to a MAC that is not the guest's, per phase.
const OTHER_MAC_FRAMES: u64 = 20;

/// The veth pair (xs0 here, xs1 with PEER_IP in namespace `peer`) and
/// shell helpers: `start OUT CMD...` runs CMD (xskvm or the helper) in
/// the background with the guest's command from /tmp/guest-cmd appended
/// as its --cmdline, console in OUT, log in OUT.log (apart, so that log
/// lines cannot split the guest's), pid in $XSKVM_PID; `caps PREFIX`
/// prints one line per thread of it: PREFIX comm CapEff CapPrm CapBnd
/// NoNewPrivs; `finish` waits for it and says whether an XDP program is
/// left on xs0.
fn testbed() -> String {
    let image = guest_image();
    format!(
        r#"
set -u
ip netns add peer
ip -n peer link set lo up
make_veth() {{
    ip link add xs0 type veth peer name xs1
    ip link set xs1 netns peer
    ip -n peer addr add {PEER_IP}/24 dev xs1
    ip -n peer link set xs1 up
    ip link set xs0 up
}}
make_veth
KERNEL_ARGS="--kernel {kernel} --initrd {initrd} --memory 512M --log-level debug"
start() {{
    local out=$1; shift
    "$@" --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"$(cat /tmp/guest-cmd)\"" \
        </dev/null >$out 2>$out.log &
    XSKVM_PID=$!
}}
wait_for() {{
    for i in $(seq 1200); do grep -q "$1" "$2" && return 0; kill -0 $XSKVM_PID 2>/dev/null || break; sleep 0.1; done
    grep -q "$1" "$2"
}}
field() {{ awk -v k="$1:" '$1 == k {{ print $2 }}' "$2"; }}
caps() {{
    for t in /proc/$XSKVM_PID/task/*; do
        echo "$1 $(cat $t/comm) $(field CapEff $t/status) $(field CapPrm $t/status) $(field CapBnd $t/status) $(field NoNewPrivs $t/status)"
    done
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

const GUEST_NET_UP: &str = "ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 1";
const GUEST_WAIT_CARRIER: &str = "wait_carrier() { for i in $(seq 600); do read c < /sys/class/net/eth0/carrier; [ $c = $1 ] && break; sleep 0.1; done; read c < /sys/class/net/eth0/carrier; echo $2=$c; }";

fn run(script: String) -> ScenarioOutput {
    let image = guest_image();
    run_scenario(
        &script,
        &[
            Path::new(XSKVM),
            Path::new(HELPER),
            &image.bzimage,
            &image.initramfs,
        ],
    )
}

fn assert_value(out: &ScenarioOutput, key: &str, want: &str) {
    assert_eq!(out.value_of(key), Some(want), "{key}\n{}", out.describe());
}

/// Shows what the checks below look at (in the test's output).
fn show(out: &ScenarioOutput) {
    for line in out.stdout.lines() {
        if ["XSKVM-", "THREAD ", "REFUSALS"]
            .iter()
            .any(|p| line.starts_with(p))
        {
            eprintln!("{line}");
        }
    }
}

fn assert_clean_exit(out: &ScenarioOutput) {
    show(out);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(out, "XSKVM-RC", "0");
    assert_value(out, "XDP", "gone");
}

/// One thread of xskvm as `caps` printed it.
#[derive(Debug)]
struct ThreadCaps {
    comm: String,
    effective: String,
    permitted: String,
    bounding: String,
    no_new_privs: String,
}

fn thread_caps(out: &ScenarioOutput, prefix: &str) -> Vec<ThreadCaps> {
    let threads: Vec<ThreadCaps> = out
        .stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix)?.strip_prefix(' '))
        .filter_map(|rest| {
            let w: Vec<&str> = rest.split_whitespace().collect();
            (w.len() == 5).then(|| ThreadCaps {
                comm: w[0].to_string(),
                effective: w[1].to_string(),
                permitted: w[2].to_string(),
                bounding: w[3].to_string(),
                no_new_privs: w[4].to_string(),
            })
        })
        .collect();
    // The main thread, a vCPU and the NIC's IO thread at least.
    for comm in ["xskvm", "xskvm-vcpu0", "xskvm-net0-q0"] {
        assert!(
            threads.iter().any(|t| t.comm == comm),
            "no thread {comm} in {threads:?}\n{}",
            out.describe()
        );
    }
    threads
}

#[test]
fn helper_runs_the_whole_network_scenario_with_xskvm_holding_no_capabilities() {
    let files = common::file_exchange(16 << 20, PEER_IP, GUEST_IP);
    // The guest's side of the receive filter check: once the host's traffic
    // is over (the host says so through the peer's web server), rx_packets
    // before and after frames to another MAC, then with promiscuous mode on.
    let guest_filter_phase = format!(
        "until wget -q -O /dev/null http://{PEER_IP}:8080/filter-go; do sleep 0.5; done; sleep 1; \
         read a < /sys/class/net/eth0/statistics/rx_packets; echo FILTER-RX1=$a; \
         echo GUEST-FILTER-READY; sleep 8; \
         read b < /sys/class/net/eth0/statistics/rx_packets; echo FILTER-RX2=$b; \
         ip link set eth0 promisc on; echo GUEST-PROMISC-ON; sleep 8; \
         read c < /sys/class/net/eth0/statistics/rx_packets; echo FILTER-RX3=$c; \
         ip link set eth0 promisc off; echo GUEST-FILTER-DONE"
    );
    let script = format!(
        r#"{testbed}
# The unprivileged user reaches /dev/kvm through a group, nothing else.
chgrp {KVM_GROUP} /dev/kvm && chmod 0660 /dev/kvm
ip netns exec peer iperf3 -s -D
{files_host_serves}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_WAIT_CARRIER}; {GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} && echo GUEST-PING=ok; iperf3 -c {PEER_IP} -t 10 -f m; iperf3 -c {PEER_IP} -t 10 -f m -R; {transfer}; {guest_filter_phase}; wait_carrier 0 GUEST-CARRIER-GONE; sleep 600
CMD
start /tmp/console {HELPER} --user {VM_USER} --groups {KVM_GROUP} --net af-xdp,ifname=xs0 -- {XSKVM} $KERNEL_ARGS
wait_for GUEST-SERVER-UP /tmp/console
st=/proc/$XSKVM_PID/status
echo "XSKVM-EXE=$(readlink /proc/$XSKVM_PID/exe)"
echo "XSKVM-UID=$(awk '$1 == "Uid:" {{ print $2":"$3":"$4":"$5 }}' $st)"
echo "XSKVM-GID=$(awk '$1 == "Gid:" {{ print $2":"$3":"$4":"$5 }}' $st)"
echo "XSKVM-GROUPS=$(field Groups $st)"
for k in CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs; do echo "XSKVM-$k=$(field $k $st)"; done
caps THREAD
echo "XSKVM-FILTER-FDS=$(tr '\0' '\n' < /proc/$XSKVM_PID/cmdline | grep -c '^af-xdp,.*,filter-fds=[0-9]*:[0-9]*:[0-9]*$')"
ip -d link show xs0 | grep -q xdp && echo XDP-WHILE-RUNNING=yes
ip netns exec peer ping -c 3 -W 5 {GUEST_IP} && echo PEER-PING=ok
{files_host_fetches}
# The receive filter, kept by xskvm in the helper's program: unicast to
# another MAC goes to the host stack until the guest turns promiscuous
# mode on (VIRTIO_NET_CTRL_RX). The guest counts from when the traffic
# above is over.
touch /tmp/www/filter-go
wait_for GUEST-FILTER-READY /tmp/console
ip -n peer neigh replace {GUEST_IP} lladdr 02:00:00:00:00:99 dev xs1 nud permanent
send_other() {{ ip netns exec peer bash -c 'for i in $(seq {OTHER_MAC_FRAMES}); do echo x > /dev/udp/{GUEST_IP}/9; done'; }}
send_other
wait_for GUEST-PROMISC-ON /tmp/console
sleep 1
send_other
wait_for GUEST-FILTER-DONE /tmp/console
ip -n peer neigh del {GUEST_IP} dev xs1
# Deleted and created again: the unprivileged xskvm cannot reattach; it
# says so once and the guest keeps its link down.
ip link del xs0
wait_for GUEST-CARRIER-GONE /tmp/console
make_veth
sleep 2
ip link set xs0 down; ip link set xs0 up
sleep 2
echo "REFUSALS=$(grep -c 'cannot be attached again' /tmp/console.log)"
kill -0 $XSKVM_PID && echo XSKVM-ALIVE=yes
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
        transfer = files.guest,
        files_host_serves = files.host_serves,
        files_host_fetches = files.host_fetches,
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "XSKVM-EXE", XSKVM);
    // The helper handed xskvm its program's filter maps.
    assert_value(&out, "XSKVM-FILTER-FDS", "1");
    assert_value(&out, "XSKVM-UID", "4241:4241:4241:4241");
    assert_value(&out, "XSKVM-GID", "4241:4241:4241:4241");
    assert_value(&out, "XSKVM-GROUPS", KVM_GROUP);
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_value(&out, &format!("XSKVM-{key}"), NO_CAPS);
    }
    assert_value(&out, "XSKVM-NoNewPrivs", "1");
    for t in thread_caps(&out, "THREAD") {
        assert_eq!(
            (
                t.effective.as_str(),
                t.permitted.as_str(),
                t.bounding.as_str()
            ),
            (NO_CAPS, NO_CAPS, NO_CAPS),
            "{t:?}"
        );
        assert_eq!(t.no_new_privs, "1", "{t:?}");
    }
    assert_value(&out, "XDP-WHILE-RUNNING", "yes");
    assert_value(&out, "GUEST-PING", "ok");
    assert_value(&out, "PEER-PING", "ok");
    // Bulk traffic flows both ways; the performance floor is net.rs's
    // business (the datapath is the same; in the nested test host the
    // guest's sending rate is near that floor and varies with the load).
    common::assert_iperf_both_ways(&out, IPERF_FLOWS_MBITS, "");
    common::assert_files_arrived_intact(&out);
    let rx = |key: &str| -> u64 {
        out.value_of(key)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key}\n{}", out.describe()))
    };
    let (rx1, rx2, rx3) = (rx("FILTER-RX1"), rx("FILTER-RX2"), rx("FILTER-RX3"));
    eprintln!("guest rx_packets: {rx1} -> {rx2} (filtering) -> {rx3} (promiscuous)");
    assert!(
        rx2 - rx1 < OTHER_MAC_FRAMES,
        "frames for another MAC reached the guest under the helper: {rx1} -> {rx2}\n{}",
        out.describe()
    );
    assert!(
        rx3 - rx2 >= OTHER_MAC_FRAMES,
        "promiscuous mode (set by the guest, in the helper's program) lets them in: \
         {rx2} -> {rx3}\n{}",
        out.describe()
    );
    assert_value(&out, "GUEST-CARRIER-GONE", "0");
    assert_value(&out, "REFUSALS", "1");
    assert_value(&out, "XSKVM-ALIVE", "yes");
}

/// `umem=guest` under the helper: it raises RLIMIT_MEMLOCK by exactly what
/// registering guest memory locks (the xskvm command's `--memory 512M`
/// plus the queue's 16 MiB area), the unprivileged xskvm registers it and
/// the guest reaches the peer both ways, TCP included.
#[test]
fn helper_with_umem_guest_raises_memlock_by_guest_memory_and_traffic_flows() {
    let script = format!(
        r#"{testbed}
chgrp {KVM_GROUP} /dev/kvm && chmod 0660 /dev/kvm
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} >/dev/null && echo GUEST-PING=ok; iperf3 -c {PEER_IP} -t 2 -f m | grep -q receiver && echo TO-PEER=ok; iperf3 -c {PEER_IP} -t 2 -f m -R | grep -q receiver && echo FROM-PEER=ok; echo GUEST-DONE; sleep 600
CMD
# A known base: the helper adds to the limit it finds.
ulimit -l 8192
start /tmp/console {HELPER} --user {VM_USER} --groups {KVM_GROUP} --net af-xdp,ifname=xs0,umem=guest -- {XSKVM} $KERNEL_ARGS
wait_for GUEST-DONE /tmp/console
echo "XSKVM-MEMLOCK=$(awk '/^Max locked memory/ {{ print $4 }}' /proc/$XSKVM_PID/limits)"
echo "XSKVM-CapEff=$(field CapEff /proc/$XSKVM_PID/status)"
ip netns exec peer ping -c 3 -W 5 {GUEST_IP} >/dev/null && echo PEER-PING=ok
echo "UMEM-GUEST=$(grep -c 'UMEM on guest memory (umem=guest)' /tmp/console.log)"
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "XSKVM-CapEff", NO_CAPS);
    let want = (8192u64 << 10) + (512 << 20) + (16 << 20);
    assert_value(&out, "XSKVM-MEMLOCK", &want.to_string());
    assert_value(&out, "UMEM-GUEST", "1");
    for key in ["GUEST-PING", "TO-PEER", "FROM-PEER", "PEER-PING"] {
        assert_value(&out, key, "ok");
    }
}

#[test]
fn root_xskvm_keeps_only_what_its_nic_watcher_needs() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} && echo GUEST-PING=ok; sleep 600
CMD
start /tmp/console {XSKVM} $KERNEL_ARGS --net af-xdp,ifname=xs0
wait_for GUEST-PING=ok /tmp/console
caps THREAD
ip netns exec peer ping -c 3 -W 5 {GUEST_IP} && echo PEER-PING=ok
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "GUEST-PING", "ok");
    assert_value(&out, "PEER-PING", "ok");
    let threads = thread_caps(&out, "THREAD");
    assert!(
        threads.iter().any(|t| t.comm == "xskvm-nicwatch"),
        "{threads:?}"
    );
    for t in &threads {
        let want = if t.comm == "xskvm-nicwatch" {
            NET_CAPS
        } else {
            NO_CAPS
        };
        assert_eq!(
            (t.effective.as_str(), t.permitted.as_str()),
            (want, want),
            "{t:?}"
        );
        assert_eq!(t.bounding, NET_CAPS, "{t:?}");
        assert_eq!(t.no_new_privs, "1", "{t:?}");
    }
}

#[test]
fn capabilities_none_leaves_nothing_and_a_recreated_interface_stays_down() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
{GUEST_WAIT_CARRIER}; {GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} && echo GUEST-PING=ok; wait_carrier 0 GUEST-CARRIER-GONE; sleep 600
CMD
start /tmp/console {XSKVM} $KERNEL_ARGS --capabilities none --net af-xdp,ifname=xs0
wait_for GUEST-PING=ok /tmp/console
caps THREAD
ip link del xs0
wait_for GUEST-CARRIER-GONE /tmp/console
make_veth
sleep 2
ip link set xs0 down; ip link set xs0 up
sleep 2
echo "REFUSALS=$(grep -c 'cannot be attached again' /tmp/console.log)"
ip -d link show xs0 | grep -q xdp && echo XDP-ON-NEW-XS0=yes || echo XDP-ON-NEW-XS0=no
kill -TERM $XSKVM_PID
finish
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
    );
    let out = run(script);
    assert_clean_exit(&out);
    assert_value(&out, "GUEST-PING", "ok");
    for t in thread_caps(&out, "THREAD") {
        assert_eq!(
            (
                t.effective.as_str(),
                t.permitted.as_str(),
                t.bounding.as_str()
            ),
            (NO_CAPS, NO_CAPS, NO_CAPS),
            "{t:?}"
        );
        assert_eq!(t.no_new_privs, "1", "{t:?}");
    }
    assert_value(&out, "GUEST-CARRIER-GONE", "0");
    assert_value(&out, "REFUSALS", "1");
    assert_value(&out, "XDP-ON-NEW-XS0", "no");
}

/// The foreign loader of the map-path test, run by that test in the test
/// host (this test binary again): loads and attaches an XDP program with
/// an XSKMAP (xskvm's program, as any loader would load its own), pins
/// the map, and holds the program until it is killed.
#[test]
#[ignore = "the foreign XDP loader of the map-path boot test, which starts it"]
fn foreign_xdp_loader() {
    let var = |key: &str| std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"));
    let (ifname, pin) = (var("XSK_LOADER_IF"), var("XSK_LOADER_PIN"));
    let program = net_afxdp::XdpProgram::load(4, false).expect("loading the program");
    let ifindex = net_afxdp::ifindex(&ifname).expect("the interface");
    let _link = program
        .attach(&ifname, ifindex, net_afxdp::XdpMode::Native)
        .expect("attaching");
    net_afxdp::testbed::pin_object(program.map_fd(), &pin).expect("pinning the XSKMAP");
    println!("LOADER-READY id={}", program.id().unwrap_or(0));
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

#[test]
fn map_path_puts_the_sockets_into_a_foreign_programs_map() {
    let loader = std::env::current_exe().expect("this test binary");
    let loader = loader.display();
    let script = format!(
        r#"{testbed}
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
XSK_LOADER_IF=xs0 XSK_LOADER_PIN=/sys/fs/bpf/xsks {loader} --exact foreign_xdp_loader --ignored --nocapture >/tmp/loader.out 2>&1 &
LOADER=$!
for i in $(seq 100); do grep -q LOADER-READY /tmp/loader.out && break; sleep 0.1; done
cat /tmp/loader.out
cat > /tmp/guest-cmd <<'CMD'
{GUEST_NET_UP}; ping -c 3 -W 5 {PEER_IP} && echo GUEST-PING=ok; sleep 600
CMD
start /tmp/console {XSKVM} $KERNEL_ARGS --net af-xdp,ifname=xs0,inhibit=on,map-path=/sys/fs/bpf/xsks
wait_for GUEST-PING=ok /tmp/console
ip netns exec peer ping -c 3 -W 5 {GUEST_IP} && echo PEER-PING=ok
kill -TERM $XSKVM_PID
finish
echo "REMOVED=$(grep -c 'removed 1 socket(s) from /sys/fs/bpf/xsks' /tmp/console.log)"
echo "USED-FOREIGN=$(grep -c 'inhibit=on: using XDP program "xskvm_redirect"' /tmp/console.log)"
kill $LOADER; wait $LOADER
for i in $(seq 20); do ip -d link show xs0 | grep -q xdp || break; sleep 0.1; done
ip -d link show xs0 | grep -q xdp && echo AFTER-LOADER=left || echo AFTER-LOADER=gone
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
    );
    let image = guest_image();
    let out = run_scenario(
        &script,
        &[
            Path::new(XSKVM),
            Path::new(&std::env::current_exe().expect("this test binary")),
            &image.bzimage,
            &image.initramfs,
        ],
    );
    show(&out);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert!(
        out.stdout.contains("LOADER-READY"),
        "the loader did not start\n{}",
        out.describe()
    );
    assert_value(&out, "GUEST-PING", "ok");
    assert_value(&out, "PEER-PING", "ok");
    assert_value(&out, "XSKVM-RC", "0");
    // The program is the loader's: it stays after xskvm, goes with it.
    assert_value(&out, "XDP", "left");
    assert_value(&out, "USED-FOREIGN", "1");
    assert_value(&out, "REMOVED", "1");
    assert_value(&out, "AFTER-LOADER", "gone");
}
