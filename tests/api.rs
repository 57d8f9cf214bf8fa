//! The API socket with a real client: `curl --unix-socket` against a guest
//! with an AF_XDP NIC on a veth pair while iperf3 moves traffic; `/metrics`
//! read by the Python `prometheus_client` text parser. Direct on hosts
//! with hardware virtualization, in the nested test host otherwise.

mod common;

use std::path::Path;

use common::{guest_image, run_scenario, ScenarioOutput, TempDir};

const XSKVM: &str = env!("CARGO_BIN_EXE_xskvm");
const CURL: &str = "/usr/bin/curl";
/// Debian's python3 (python3-prometheus-client, resources/install-deps.sh).
const PYTHON: &str = "/usr/bin/python3";

/// Shell for the scenarios: a veth pair with the peer in namespace `peer`,
/// `boot_guest OUT ARGS...` (guest command in /tmp/guest-cmd, console in
/// OUT, log in OUT.log, pid in $XSKVM_PID, `--memory $MEMORY` if set), `wait_for TEXT FILE`, `api METHOD PATH [BODY]` (prints the
/// body, then `CODE=status` on a line of its own) and `finish`.
fn testbed() -> String {
    let image = guest_image();
    format!(
        r#"
set -u
ip netns add peer
ip -n peer link set lo up
ip link add xs0 type veth peer name xs1
ip link set xs1 netns peer
ip -n peer addr add 10.77.0.1/24 dev xs1
ip netns exec peer ethtool -K xs1 tx off >/dev/null
ip -n peer link set xs1 up
ip link set xs0 up
boot_guest() {{
    local out=$1; shift
    {XSKVM} --kernel {kernel} --initrd {initrd} --memory ${{MEMORY:-512M}} --log-level info "$@" \
        --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"$(cat /tmp/guest-cmd)\"" \
        </dev/null >$out 2>$out.log &
    XSKVM_PID=$!
}}
wait_for() {{
    for i in $(seq 1200); do grep -q "$1" "$2" && return 0; kill -0 $XSKVM_PID 2>/dev/null || break; sleep 0.1; done
    grep -q "$1" "$2"
}}
SOCK=/tmp/api.sock
api() {{
    if [ $# -gt 2 ]; then
        {CURL} -sS --max-time 20 --unix-socket $SOCK -X "$1" -H 'Content-Type: application/json' \
            -d "$3" -w '\nCODE=%{{http_code}}\n' "http://localhost$2"
    else
        {CURL} -sS --max-time 20 --unix-socket $SOCK -X "$1" -w '\nCODE=%{{http_code}}\n' "http://localhost$2"
    fi
}}
# Just the status code of a call.
code() {{ api "$@" | sed -n 's/^CODE=//p'; }}
ticks() {{ grep -c TICK /tmp/console; }}
finish() {{
    wait $XSKVM_PID
    echo "XSKVM-RC=$?"
}}
"#,
        kernel = image.bzimage.display(),
        initrd = image.initramfs.display(),
    )
}

fn run(script: String) -> ScenarioOutput {
    let image = guest_image();
    assert!(
        Path::new(CURL).exists(),
        "{CURL} is missing: install curl (resources/install-deps.sh)"
    );
    run_scenario(
        &script,
        &[
            Path::new(XSKVM),
            &image.bzimage,
            &image.initramfs,
            Path::new(CURL),
        ],
    )
}

fn assert_value(out: &ScenarioOutput, key: &str, want: &str) {
    assert_eq!(out.value_of(key), Some(want), "{key}\n{}", out.describe());
}

/// The JSON the scenario printed as `KEY=json`.
fn json_of(out: &ScenarioOutput, key: &str) -> serde_json::Value {
    let text = out
        .value_of(key)
        .unwrap_or_else(|| panic!("no {key}\n{}", out.describe()));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{key}: {e}: {text}"))
}

/// The lines between `begin` and `end` markers.
fn section<'a>(out: &'a ScenarioOutput, begin: &str, end: &str) -> Vec<&'a str> {
    out.stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| *l != end)
        .collect()
}

/// Parses Prometheus text with `prometheus_client`'s parser and returns
/// `name{labels} value` for every sample, labels sorted, one per line.
fn parse_metrics(text: &str) -> String {
    let dir = TempDir::new("metrics");
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, text).expect("write metrics");
    let program = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{family.type} {s.name}{{{labels}}} {s.value}")
"#;
    let output = std::process::Command::new(PYTHON)
        .arg("-c")
        .arg(program)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {PYTHON}: {e} (install python3-prometheus-client: resources/install-deps.sh)")
        });
    assert!(
        output.status.success(),
        "prometheus_client could not parse /metrics (is python3-prometheus-client installed? \
         resources/install-deps.sh):\n{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn device_counter(counters: &serde_json::Value, name: &str) -> u64 {
    counters["nics"][0]["queues"][0]["device"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {counters}"))
}

#[test]
fn every_call_with_curl_while_iperf3_runs() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; iperf3 -s -D; sleep 1; echo GUEST-NET-UP; while true; do echo TICK; ip link show eth0 | grep -o NO-CARRIER; sleep 0.3; done
CMD
boot_guest /tmp/console --api-socket $SOCK --name test-vm --net af-xdp,ifname=xs0
wait_for GUEST-NET-UP /tmp/console
echo "SOCKET-MODE=$(stat -c %a $SOCK)"
echo "INFO=$(api GET /api/v1/vm.info | head -n 1)"
peer_tx() {{ ip netns exec peer cat /sys/class/net/xs1/statistics/tx_packets; }}
# Counters first, the peer's count after: frames in between count for us.
echo "COUNTERS-BEFORE=$(api GET /api/v1/vm.counters | head -n 1)"
echo "PEER-TX-BEFORE=$(peer_tx)"
ip netns exec peer iperf3 -c 10.77.0.2 -t 8 -i 1 >/tmp/iperf.log 2>&1 &
iperf=$!
sleep 2
# Also frames that arrive while the guest is paused.
ip netns exec peer ping -c 6 -W 1 10.77.0.2 >/tmp/ping.log 2>&1 &
echo "PAUSE-CODE=$(code PUT /api/v1/vm.pause)"
echo "STATE-PAUSED=$(api GET /api/v1/vm.info | head -n 1 | grep -o '"state":"[a-z-]*"')"
a=$(ticks); sleep 2; b=$(ticks)
echo "TICKS-WHILE-PAUSED=$((b - a))"
echo "PAUSE-AGAIN-CODE=$(code PUT /api/v1/vm.pause)"
echo "SHUTDOWN-PAUSED-CODE=$(code PUT /api/v1/vm.shutdown)"
echo "RESUME-CODE=$(code PUT /api/v1/vm.resume)"
echo "RESUME-AGAIN-CODE=$(code PUT /api/v1/vm.resume)"
wait $iperf
echo "IPERF-RC=$?"
sleep 2
c=$(ticks)
[ $c -gt $b ] && echo TICKS-RESUMED=yes
# The peer's count first, then what arrived once it settled.
echo "PEER-TX-AFTER=$(peer_tx)"
sleep 1
echo "COUNTERS-AFTER=$(api GET /api/v1/vm.counters | head -n 1)"
echo METRICS-BEGIN
{CURL} -sS --unix-socket $SOCK http://localhost/metrics
echo METRICS-END
echo "LINK-DOWN-CODE=$(code PUT /api/v1/vm.net-link '{{"id": "net0", "up": false}}')"
wait_for NO-CARRIER /tmp/console && echo NO-CARRIER-SEEN=yes
echo "INFO-LINK-DOWN=$(api GET /api/v1/vm.info | head -n 1)"
echo "LINK-UP-CODE=$(code PUT /api/v1/vm.net-link '{{"id": "net0", "up": true}}')"
echo "UNKNOWN-NIC-CODE=$(code PUT /api/v1/vm.net-link '{{"id": "net9", "up": true}}')"
echo "UNKNOWN-PATH-CODE=$(code GET /api/v1/vm.nothing)"
echo "WRONG-METHOD-CODE=$(code DELETE /api/v1/vm.info)"
echo "MALFORMED-CODE=$(code PUT /api/v1/vm.net-link '{{"id": ')"
head -c 100000 /dev/zero | tr '\0' x > /tmp/big
echo "OVERSIZED-CODE=$({CURL} -sS --unix-socket $SOCK -X PUT --data-binary @/tmp/big -o /dev/null -w '%{{http_code}}' http://localhost/api/v1/vm.pause)"
# A request line httparse refuses (a space in the method).
echo "GARBAGE-CODE=$(code 'G T' /api/v1/vm.info)"
echo "STILL-RUNNING=$(api GET /api/v1/vm.info | head -n 1 | grep -o '"state":"[a-z-]*"')"
echo "SHUTDOWN-CODE=$(code PUT /api/v1/vm.shutdown '{{"timeout_s": 60}}')"
finish
[ -e $SOCK ] && echo SOCKET-GONE=no || echo SOCKET-GONE=yes
cat /tmp/iperf.log
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed()
    );
    let out = run(script);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(&out, "SOCKET-MODE", "600");

    let info = json_of(&out, "INFO");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["name"], "test-vm");
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory_bytes"], 512u64 << 20);
    let nic = &info["nics"][0];
    assert_eq!(nic["id"], "net0", "{info}");
    assert_eq!(nic["ifname"], "xs0");
    assert_eq!(nic["queues"], 1);
    // What the kernel set up: veth takes our program natively but has no
    // zero-copy AF_XDP.
    assert_eq!(nic["mode"], "copy", "{info}");
    assert_eq!(nic["xdp_mode"], "native", "{info}");
    assert_eq!(nic["mtu"], 1500);
    assert_eq!(
        nic["multi_buffer"], false,
        "MTU 1500 fits one UMEM frame: {info}"
    );
    assert_eq!(nic["mac"].as_str().map(str::len), Some(17), "{info}");
    assert_eq!(nic["link"]["up"], true);

    assert_value(&out, "PAUSE-CODE", "204");
    assert_value(&out, "STATE-PAUSED", "\"state\":\"paused\"");
    assert_value(&out, "TICKS-WHILE-PAUSED", "0");
    assert_value(&out, "PAUSE-AGAIN-CODE", "409");
    assert_value(&out, "SHUTDOWN-PAUSED-CODE", "409");
    assert_value(&out, "RESUME-CODE", "204");
    assert_value(&out, "RESUME-AGAIN-CODE", "409");
    assert_value(&out, "IPERF-RC", "0");
    assert_value(&out, "TICKS-RESUMED", "yes");

    let before = json_of(&out, "COUNTERS-BEFORE");
    let after = json_of(&out, "COUNTERS-AFTER");
    for name in [
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "interrupts",
    ] {
        assert!(
            device_counter(&after, name) > device_counter(&before, name),
            "{name} did not grow: {before} -> {after}"
        );
    }
    // No frame lost uncounted, pause included: every frame the peer sent
    // is in a counter (delivered, dropped by the device or the kernel's
    // AF_XDP socket, or passed to the host stack by the receive filter).
    let peer_value = |key: &str| -> u64 {
        out.value_of(key)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key}\n{}", out.describe()))
    };
    let sent = peer_value("PEER-TX-AFTER") - peer_value("PEER-TX-BEFORE");
    let accounted = |c: &serde_json::Value| -> u64 {
        let queue = &c["nics"][0]["queues"][0];
        let device = [
            "rx_packets",
            "rx_dropped_too_big",
            "rx_bad_descriptors",
            "rx_dropped_inactive",
        ]
        .iter()
        .map(|name| device_counter(c, name))
        .sum::<u64>();
        let kernel = ["rx_dropped", "rx_ring_full"]
            .iter()
            .map(|name| {
                queue["af_xdp_kernel"][name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{c}"))
            })
            .sum::<u64>();
        let filtered = queue["xdp_filtered_frames"]
            .as_u64()
            .unwrap_or_else(|| panic!("{c}"));
        device + kernel + filtered
    };
    let counted = accounted(&after) - accounted(&before);
    assert!(
        sent > 100 && counted >= sent,
        "the peer sent {sent} frames, xskvm accounted for {counted}: {before} -> {after}"
    );
    let names = devices::virtio::net::CountersSnapshot::default().values();
    assert_eq!(
        after["nics"][0]["queues"][0]["device"]
            .as_object()
            .map(|m| m.len()),
        Some(names.len()),
        "every device counter: {after}"
    );
    assert!(
        after["nics"][0]["queues"][0]["af_xdp_kernel"]["rx_dropped"].is_u64(),
        "AF_XDP kernel statistics: {after}"
    );
    assert!(
        after["vcpus"][0]["exits"]["mmio_write"].as_u64() > Some(0),
        "{after}"
    );

    let metrics = section(&out, "METRICS-BEGIN", "METRICS-END").join("\n") + "\n";
    let samples = parse_metrics(&metrics);
    let rx_packets = samples
        .lines()
        .find(|l| l.starts_with("counter xskvm_net_rx_packets_total{nic=net0,queue=0,vm=test-vm} "))
        .unwrap_or_else(|| panic!("no rx_packets sample in\n{samples}"));
    let value: f64 = rx_packets
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(value > 0.0, "{rx_packets}");
    for wanted in [
        "gauge xskvm_vm_state{state=running,vm=test-vm} 1.0",
        "gauge xskvm_net_link_up{nic=net0,vm=test-vm} 1.0",
        "counter xskvm_afxdp_rx_dropped_total{nic=net0,queue=0,vm=test-vm} ",
        "counter xskvm_vcpu_exits_total{reason=mmio_write,vcpu=0,vm=test-vm} ",
        "counter xskvm_xdp_filtered_frames_total{nic=net0,queue=0,vm=test-vm} ",
    ] {
        assert!(
            samples.lines().any(|l| l.starts_with(wanted)),
            "no {wanted:?} in\n{samples}"
        );
    }

    assert_value(&out, "LINK-DOWN-CODE", "204");
    assert_value(&out, "NO-CARRIER-SEEN", "yes");
    let down = json_of(&out, "INFO-LINK-DOWN");
    assert_eq!(down["nics"][0]["link"]["up"], false, "{down}");
    assert_eq!(down["nics"][0]["link"]["admin_up"], false, "{down}");
    assert_value(&out, "LINK-UP-CODE", "204");
    assert_value(&out, "UNKNOWN-NIC-CODE", "404");
    assert_value(&out, "UNKNOWN-PATH-CODE", "404");
    assert_value(&out, "WRONG-METHOD-CODE", "405");
    assert_value(&out, "MALFORMED-CODE", "400");
    assert_value(&out, "OVERSIZED-CODE", "413");
    assert_value(&out, "GARBAGE-CODE", "400");
    assert_value(&out, "STILL-RUNNING", "\"state\":\"running\"");

    assert_value(&out, "SHUTDOWN-CODE", "204");
    assert_value(&out, "XSKVM-RC", "0");
    assert!(
        out.stdout.contains("XSKVM-GUEST-POWER-BUTTON"),
        "the guest saw no power button press\n{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("guest powered off"),
        "{}",
        out.describe()
    );
    assert_value(&out, "SOCKET-GONE", "yes");
}

#[test]
fn reboot_shutdown_timeout_and_the_socket_path() {
    let script = format!(
        r#"{testbed}
# A guest that ignores its power button (its watcher is killed).
cat > /tmp/guest-cmd <<'CMD'
killall dd; echo GUEST-UP; sleep 600
CMD
boot_guest /tmp/console1 --api-socket $SOCK
wait_for GUEST-UP /tmp/console1
# Killed: its socket file stays behind, stale.
kill -KILL $XSKVM_PID; wait $XSKVM_PID 2>/dev/null
[ -S $SOCK ] && echo STALE-LEFT=yes
# A bridge has no native XDP: our program falls back to skb mode.
ip link add br9 type bridge
ip link set br9 up
boot_guest /tmp/console2 --api-socket $SOCK --net af-xdp,ifname=br9
# Without this guest the rest would wait on the next one's 600 s sleep.
wait_for GUEST-UP /tmp/console2 || {{ cat /tmp/console2 /tmp/console2.log; exit 1; }}
echo "STALE-REPLACED-CODE=$(code GET /api/v1/vm.info)"
echo "INFO-DUMMY=$(api GET /api/v1/vm.info | head -n 1)"
first=$XSKVM_PID
# A second xskvm on a socket in use is refused, and leaves it alone.
boot_guest /tmp/console3 --api-socket $SOCK
wait $XSKVM_PID
echo "IN-USE-RC=$?"
grep -o 'another process is listening there' /tmp/console3.log | sed 's/^/IN-USE-MSG=/'
XSKVM_PID=$first
echo "STILL-SERVED-CODE=$(code GET /api/v1/vm.info)"
start=$(date +%s)
echo "SHUTDOWN-CODE=$(code PUT /api/v1/vm.shutdown '{{"timeout_s": 3}}')"
echo "SHUTTING-DOWN=$(api GET /api/v1/vm.info | head -n 1 | grep -o '"state":"[a-z-]*"')"
echo "SHUTDOWN-AGAIN-CODE=$(code PUT /api/v1/vm.shutdown)"
finish
echo "SHUTDOWN-SECONDS=$(( $(date +%s) - start ))"
grep -q 'did not power off within the shutdown timeout' /tmp/console2.log && echo TIMEOUT-LOGGED=yes
[ -e $SOCK ] && echo SOCKET-GONE=no || echo SOCKET-GONE=yes
cat /tmp/console2 /tmp/console3 /tmp/console2.log /tmp/console3.log
"#,
        testbed = testbed()
    );
    let out = run(script);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(&out, "STALE-LEFT", "yes");
    assert_value(&out, "STALE-REPLACED-CODE", "200");
    let info = json_of(&out, "INFO-DUMMY");
    let nic = &info["nics"][0];
    assert_eq!(nic["ifname"], "br9", "{info}");
    assert_eq!(nic["xdp_mode"], "skb", "the fallback, as attached: {info}");
    assert_eq!(nic["mode"], "copy", "{info}");
    assert_value(&out, "IN-USE-RC", "1");
    assert_value(&out, "IN-USE-MSG", "another process is listening there");
    assert_value(&out, "STILL-SERVED-CODE", "200");
    assert_value(&out, "SHUTDOWN-CODE", "204");
    assert_value(&out, "SHUTTING-DOWN", "\"state\":\"shutting-down\"");
    assert_value(&out, "SHUTDOWN-AGAIN-CODE", "409");
    assert_value(&out, "TIMEOUT-LOGGED", "yes");
    let seconds: u64 = out
        .value_of("SHUTDOWN-SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        (3..=10).contains(&seconds),
        "{seconds} s\n{}",
        out.describe()
    );
    assert_value(&out, "SOCKET-GONE", "yes");
    assert_value(&out, "XSKVM-RC", "0");
}

/// `umem=guest` on hugepages: guest RAM and the queue's area after it are
/// one hugepage mapping (512 MiB + 16 MiB = 264 pages of 2 MiB), which the
/// NIC registers as its UMEM; `vm.info` says so; the guest reaches the
/// peer, reboots through the API (its memory cleared by writing, the pages
/// kept: the kernel holds them) and reaches the peer again; every page is
/// back once xskvm ends.
#[test]
fn umem_guest_on_hugepages_reboots_and_gives_its_pages_back() {
    let script = format!(
        r#"{testbed}
hp=/sys/kernel/mm/hugepages/hugepages-2048kB
avail() {{ echo $(( $(cat $hp/free_hugepages) - $(cat $hp/resv_hugepages) )); }}
echo 300 > $hp/nr_hugepages
cat > /tmp/guest-cmd <<'CMD'
ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 1; echo GUEST-NET-UP; sleep 600
CMD
MEMORY=512M,hugepages=on boot_guest /tmp/console --api-socket $SOCK --net af-xdp,ifname=xs0,umem=guest
wait_for GUEST-NET-UP /tmp/console
ip netns exec peer ping -c 3 -W 2 10.77.0.2 >/dev/null; echo "PING-BEFORE-RC=$?"
echo "AVAIL-RUNNING=$(avail)"
echo "INFO=$(api GET /api/v1/vm.info | head -n 1)"
echo "REBOOT-CODE=$(code PUT /api/v1/vm.reboot)"
for i in $(seq 1800); do
    [ "$(grep -c GUEST-NET-UP /tmp/console)" -ge 2 ] && break
    kill -0 $XSKVM_PID 2>/dev/null || break
    sleep 0.1
done
echo "BOOTS=$(grep -c GUEST-NET-UP /tmp/console)"
ip netns exec peer ping -c 3 -W 2 10.77.0.2 >/dev/null; echo "PING-AFTER-RC=$?"
echo "AVAIL-REBOOTED=$(avail)"
echo "SHUTDOWN-CODE=$(code PUT /api/v1/vm.shutdown '{{"timeout_s": 60}}')"
finish
echo "AVAIL-AFTER=$(avail)"
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
    );
    let out = run(script);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(&out, "PING-BEFORE-RC", "0");
    assert_value(&out, "AVAIL-RUNNING", "36");
    let info = json_of(&out, "INFO");
    assert_eq!(info["nics"][0]["umem"], "guest", "{info}");
    assert_eq!(info["memory_hugepage_bytes"], 2 << 20, "{info}");
    assert_value(&out, "REBOOT-CODE", "204");
    assert_value(&out, "BOOTS", "2");
    assert_value(&out, "PING-AFTER-RC", "0");
    assert_value(&out, "AVAIL-REBOOTED", "36");
    assert_value(&out, "SHUTDOWN-CODE", "204");
    assert_value(&out, "XSKVM-RC", "0");
    assert_value(&out, "AVAIL-AFTER", "300");
}

/// `vm.reboot` restarts the guest in the same xskvm, twice, each under
/// full-rate traffic from the peer: the guest boots again with the
/// same configuration, the network works after it, and xskvm holds the
/// same threads, sockets and XDP program as before.
#[test]
fn reboot_restarts_the_guest_in_the_same_xskvm() {
    let script = format!(
        r#"{testbed}
cat > /tmp/guest-cmd <<'CMD'
ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; iperf3 -s -D; sleep 1; echo GUEST-CPUS-$(nproc); echo GUEST-NET-UP; sleep 600
CMD
boot_guest /tmp/console --api-socket $SOCK --vcpus 2 --net af-xdp,ifname=xs0
wait_for GUEST-NET-UP /tmp/console
ip netns exec peer ping -c 3 -W 2 10.77.0.2 >/dev/null; echo "PING-BEFORE-RC=$?"
# What xskvm holds: threads, sockets, our XDP program on xs0.
held() {{
    echo "$(ls /proc/$XSKVM_PID/task | wc -l) threads," \
        "$(ls -l /proc/$XSKVM_PID/fd | grep -c socket:) sockets," \
        "$(ip -d link show xs0 | grep -o 'prog/xdp id [0-9]*')"
}}
echo "HELD-BEFORE=$(held)"
echo "INFO-BEFORE=$(api GET /api/v1/vm.info | head -n 1)"
# Both reboots come with the peer sending to the guest at full rate (the IO
# thread busy, frames in flight, the vCPUs leaving the guest for virtio
# registers all the time: a reboot must not let KVM finish such an exit's
# instruction over the reset vCPU state).
busy_reboot() {{
    ip netns exec peer iperf3 -c 10.77.0.2 -t 60 >/dev/null 2>&1 &
    busy=$!
    sleep 2
    code PUT /api/v1/vm.reboot
    kill $busy 2>/dev/null; wait $busy 2>/dev/null
}}
wait_boots() {{
    for i in $(seq 1800); do
        [ "$(grep -c GUEST-NET-UP /tmp/console)" -ge $1 ] && break
        kill -0 $XSKVM_PID 2>/dev/null || break
        sleep 0.1
    done
}}
echo "REBOOT-CODE=$(busy_reboot)"
echo "INFO-REBOOTED=$(api GET /api/v1/vm.info | head -n 1)"
wait_boots 2
# The second boot's iperf3 server is up once its network is.
sleep 1
echo "REBOOT2-CODE=$(busy_reboot)"
wait_boots 3
echo "BOOTS=$(grep -c GUEST-NET-UP /tmp/console)"
echo "CPUS=$(grep -o 'GUEST-CPUS-[0-9]*' /tmp/console | tr '\n' ' ')"
kill -0 $XSKVM_PID 2>/dev/null && echo ALIVE=yes
ip netns exec peer ping -c 3 -W 2 10.77.0.2 >/dev/null; echo "PING-AFTER-RC=$?"
ip netns exec peer iperf3 -c 10.77.0.2 -t 3 >/tmp/iperf.log 2>&1; echo "IPERF-AFTER-RC=$?"
echo "HELD-AFTER=$(held)"
echo "INFO-AFTER=$(api GET /api/v1/vm.info | head -n 1)"
echo "COUNTERS-AFTER=$(api GET /api/v1/vm.counters | head -n 1)"
echo "SHUTDOWN-CODE=$(code PUT /api/v1/vm.shutdown '{{"timeout_s": 60}}')"
finish
grep -q 'VM rebooted through the API' /tmp/console.log && echo REBOOT-LOGGED=yes
grep -q 'did not power off within' /tmp/console.log && echo SHUTDOWN-TIMED-OUT=yes
cat /tmp/iperf.log
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed()
    );
    let out = run(script);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(&out, "PING-BEFORE-RC", "0");
    assert_value(&out, "REBOOT-CODE", "204");
    assert_value(&out, "REBOOT2-CODE", "204");
    assert_value(&out, "BOOTS", "3");
    assert_value(&out, "ALIVE", "yes");
    assert_value(&out, "CPUS", "GUEST-CPUS-2 GUEST-CPUS-2 GUEST-CPUS-2 ");
    assert_value(&out, "PING-AFTER-RC", "0");
    assert_value(&out, "IPERF-AFTER-RC", "0");
    assert_value(&out, "REBOOT-LOGGED", "yes");
    // Nothing opened again, nothing left behind: the same threads (the
    // NIC's IO thread restarted by the second boot's driver), sockets and
    // XDP program.
    let held_before = out.value_of("HELD-BEFORE").unwrap_or_default();
    assert!(held_before.contains("prog/xdp id"), "{}", out.describe());
    assert_value(&out, "HELD-AFTER", held_before);

    let before = json_of(&out, "INFO-BEFORE");
    let rebooted = json_of(&out, "INFO-REBOOTED");
    let after = json_of(&out, "INFO-AFTER");
    assert_eq!(before["reboots"], 0, "{before}");
    assert_eq!(rebooted["state"], "running", "{rebooted}");
    assert_eq!(after["reboots"], 2, "{after}");
    for key in ["memory_bytes", "vcpus", "kernel"] {
        assert_eq!(before[key], after[key], "{key}: {before} -> {after}");
    }
    let (nic_before, nic_after) = (&before["nics"][0], &after["nics"][0]);
    for key in ["ifname", "mac", "mtu", "queues", "mode", "xdp_mode"] {
        assert_eq!(
            nic_before[key], nic_after[key],
            "{key}: {before} -> {after}"
        );
    }
    assert_eq!(nic_after["link"]["up"], true, "{after}");
    let counters = json_of(&out, "COUNTERS-AFTER");
    assert!(device_counter(&counters, "rx_packets") > 0, "{counters}");

    assert_value(&out, "SHUTDOWN-CODE", "204");
    assert!(
        out.value_of("SHUTDOWN-TIMED-OUT").is_none(),
        "{}",
        out.describe()
    );
    assert_value(&out, "XSKVM-RC", "0");
    assert!(
        out.stdout.contains("guest powered off"),
        "{}",
        out.describe()
    );
}

/// `--memory 512M,hugepages=on`: refused with the way out where the host
/// has too few hugepages; where it has them, the guest runs on them (the
/// host's pool shrinks by exactly 256 pages), reboots through the API (its
/// memory cleared with the hugepages in place) and powers off, and every
/// page goes back to the host.
#[test]
fn hugepage_backed_guest_runs_reboots_and_gives_its_pages_back() {
    let image = guest_image();
    let script = format!(
        r#"{testbed}
hp=/sys/kernel/mm/hugepages/hugepages-2048kB
avail() {{ echo $(( $(cat $hp/free_hugepages) - $(cat $hp/resv_hugepages) )); }}
echo 0 > $hp/nr_hugepages
{XSKVM} --kernel {kernel} --memory 512M,hugepages=on </dev/null >/tmp/none.out 2>&1
echo "NONE-RC=$?"
echo "NONE-MSG=$(head -n 1 /tmp/none.out)"
echo 300 > $hp/nr_hugepages
echo "AVAIL-BEFORE=$(avail)"
cat > /tmp/guest-cmd <<'CMD'
echo GUEST-MEM-KB=$(awk '/MemTotal/ {{print $2}}' /proc/meminfo); echo GUEST-UP; sleep 600
CMD
MEMORY=512M,hugepages=on boot_guest /tmp/console --api-socket $SOCK
wait_for GUEST-UP /tmp/console
echo "AVAIL-RUNNING=$(avail)"
echo "INFO=$(api GET /api/v1/vm.info | head -n 1)"
echo "REBOOT-CODE=$(code PUT /api/v1/vm.reboot)"
for i in $(seq 1800); do
    [ "$(grep -c GUEST-UP /tmp/console)" -ge 2 ] && break
    kill -0 $XSKVM_PID 2>/dev/null || break
    sleep 0.1
done
echo "BOOTS=$(grep -c GUEST-UP /tmp/console)"
echo "AVAIL-REBOOTED=$(avail)"
echo "SHUTDOWN-CODE=$(code PUT /api/v1/vm.shutdown '{{"timeout_s": 60}}')"
finish
echo "AVAIL-AFTER=$(avail)"
cat /tmp/console /tmp/console.log
"#,
        testbed = testbed(),
        kernel = image.bzimage.display(),
    );
    let out = run(script);
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_value(&out, "NONE-RC", "1");
    let refusal = out.value_of("NONE-MSG").unwrap_or_default();
    assert!(
        refusal.contains("needs 256 free 2 MiB hugepages and the host has 0")
            && refusal.contains("hugepages-2048kB/nr_hugepages"),
        "{}",
        out.describe()
    );
    assert_value(&out, "AVAIL-BEFORE", "300");
    assert_value(&out, "AVAIL-RUNNING", "44");
    let info = json_of(&out, "INFO");
    assert_eq!(info["memory_hugepage_bytes"], 2 << 20, "{info}");
    assert_value(&out, "REBOOT-CODE", "204");
    assert_value(&out, "BOOTS", "2");
    // Clearing the memory for the reboot (MADV_DONTNEED) gives the pages
    // back with their reservation: the second boot cannot run short.
    assert_value(&out, "AVAIL-REBOOTED", "44");
    assert_value(&out, "SHUTDOWN-CODE", "204");
    assert_value(&out, "XSKVM-RC", "0");
    assert_value(&out, "AVAIL-AFTER", "300");
    let guest_kb: u64 = out
        .value_of("GUEST-MEM-KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        guest_kb > 400 << 10 && guest_kb <= 512 << 10,
        "{}",
        out.describe()
    );
    assert!(
        out.stdout
            .contains("guest memory: 512 MiB on 2 MiB hugepages"),
        "{}",
        out.describe()
    );
}
