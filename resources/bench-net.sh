#!/usr/bin/env bash
# TCP throughput through xskvm (virtio-net over AF_XDP, offloads done in
# its IO thread) beside QEMU's microvm with a tap backend (virtio-net over
# virtio-mmio, tap bridged to the same veth; vhost off and on), same guest
# kernel and initramfs, same KVM: the nested test host here, the real one
# with hardware virtualization. iperf3 runs in the guest against a peer in a
# network namespace behind the veth, both directions; the peer keeps its
# default offloads for every system (each runs in its natural set-up).
# The systems alternate within each round; with ROUNDS rounds (>= 3) the
# medians and their ratios are printed, and a chart is written.
# Usage: bench-net.sh [SECONDS] [ROUNDS] [VCPUS...]   (defaults: 10 3 1 2)
#        (build xskvm first: cargo build --release)
# Writes: $BENCH_OUT (default target/bench-net) /results.txt and /chart.png
# Environment: XSKVM_BIN (the xskvm to run; default target/release/xskvm);
# XSKVM_SCENARIO_MODE=bundle with XSKVM_SCENARIO_BUNDLE=PATH writes the
# whole run as a bundle for resources/run-bundle.sh on a host with KVM.
set -euo pipefail
cd "$(dirname "$0")/.."
source resources/lib.sh
secs=${1:-10}
rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
vcpus_list=${*:-1 2}
out=${BENCH_OUT:-$PWD/target/bench-net}
mkdir -p "$out"
xskvm=${XSKVM_BIN:-$PWD/target/release/xskvm}
[ -x "$xskvm" ] || { echo "bench-net: build xskvm first: cargo build --release" >&2; exit 1; }
ensure_packages python3 python3-matplotlib
guest=$(guest_dir)
qemu=$(command -v qemu-system-x86_64) || { echo "bench-net: install qemu-system-x86" >&2; exit 1; }

scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
cat > "$scenario" <<SCENARIO
exec 2>&1
set -o pipefail
$(veth_peer_setup)
ip link add br0 type bridge
ip tuntap add tap0 mode tap
ip link set tap0 master br0
ip link set tap0 up
ip link set br0 up
cat > /tmp/guest-cmd <<'CMD'
ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 2; iperf3 -c 10.77.0.1 -t $secs -f m | grep receiver | sed 's/^/GUEST-TO-PEER /'; iperf3 -c 10.77.0.1 -t $secs -f m -R | grep receiver | sed 's/^/PEER-TO-GUEST /'
CMD
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"\$(cat /tmp/guest-cmd)\""
# A VMM that does not finish in time is reported, not waited for.
limit=\$(( $secs * 2 + 180 ))
# A fresh iperf3 server per run: one left busy by a run that was cut short
# would refuse the next client.
fresh_server() {
    [ -f /tmp/iperf3.pid ] && kill \$(cat /tmp/iperf3.pid) 2>/dev/null
    sleep 0.5
    ip netns exec peer iperf3 -s -D -I /tmp/iperf3.pid
}
# report SYSTEM STATUS VCPUS: the run's results, or why there are none
# (its exit status and the end of its output, kept for a look).
report() {
    if grep -q -- "-TO-" /tmp/run.log; then
        grep -- "-TO-" /tmp/run.log | sed "s/^/RESULT \$1 \$3 /"
    else
        echo "RESULT \$1 \$3 none (exit status \$2)"
        grep -v "^\[ *[0-9]*\.[0-9]*\]" /tmp/run.log | tail -n 15 | sed "s/^/FAILED-RUN \$1: /"
    fi
}
# run_xskvm VCPUS [MODE]: the default (native XDP), or mode=skb, where the
# peer keeps its GSO and xskvm takes its 64 KiB packets whole.
run_xskvm() {
    fresh_server
    ip link set xs0 nomaster 2>/dev/null || true
    timeout -k 5 \$limit $xskvm --kernel $guest/bzImage --initrd $guest/initramfs.cpio.gz --memory 512M --vcpus \$1 \
        --net af-xdp,ifname=xs0,mac=52:54:00:00:00:02\${2:+,mode=\$2} --cmdline "\$cmdline" </dev/null >/tmp/run.log 2>&1
    report xskvm\${2:+-\$2} \$? "\$1"
}
run_qemu() {
    fresh_server
    ip link set xs0 master br0
    timeout -k 5 \$limit $qemu -M microvm,acpi=on,pic=off,pit=off,rtc=off -enable-kvm -cpu host -m 512M -smp \$1 \
        -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
        -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=\$2 \
        -device virtio-net-device,netdev=n0,mac=52:54:00:00:00:03 \
        -kernel $guest/bzImage -initrd $guest/initramfs.cpio.gz -append "\$cmdline" </dev/null >/tmp/run.log 2>&1
    report qemu-tap-vhost-\$2 \$? "\$1"
}
for round in \$(seq $rounds); do
    for vcpus in $vcpus_list; do
        # Alternate the order from round to round.
        if [ \$((round % 2)) = 1 ]; then
            run_xskvm \$vcpus; run_xskvm \$vcpus skb; run_qemu \$vcpus off; run_qemu \$vcpus on
        else
            run_qemu \$vcpus on; run_qemu \$vcpus off; run_xskvm \$vcpus skb; run_xskvm \$vcpus
        fi
    done
done
SCENARIO
XSKVM_TESTHOST_TIMEOUT=${XSKVM_TESTHOST_TIMEOUT:-3600} \
    bash resources/run-scenario.sh --file "$xskvm" --file "$guest/bzImage" --file "$guest/initramfs.cpio.gz" --file "$qemu" \
    --file /usr/share/qemu --file /usr/share/seabios "$scenario" | tee "$out/raw.txt"
# Bundle mode (XSKVM_SCENARIO_MODE=bundle): only written, to run elsewhere.
[ "${XSKVM_SCENARIO_MODE:-}" != bundle ] || exit 0
# Debian's python3 (where python3-matplotlib is), whatever else is on PATH.
/usr/bin/python3 resources/bench-net-report.py "$out/raw.txt" "$out"
