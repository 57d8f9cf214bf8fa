#!/usr/bin/env bash
# Memory of one xskvm NIC in each UMEM mode: the same guest (kernel and
# initramfs of resources/guest-image.sh, 512 MiB, 1 vCPU) on a veth, once
# with `umem=own` (the default: queues copy into frames of xskvm's own),
# once with `umem=guest` (guest RAM registered as the UMEM) and once with
# `umem=guest` on 2 MiB hugepages. The guest moves TCP both ways with
# iperf3, then waits while xskvm is measured: its resident set (VmRSS, peak
# VmHWM, hugetlb pages) from /proc, and the memory its AF_XDP sockets pin,
# as the kernel reports it (`ss --xdp -e`: each UMEM's size, counted once
# however many sockets share it). Runs in the nested test host here, or
# directly where KVM has hardware virtualization; the modes alternate
# within each round, and the medians are printed.
# Usage: bench-memory.sh [ROUNDS]   (build xskvm first: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
source resources/lib.sh
rounds=${1:-3}
xskvm=${XSKVM_BIN:-$PWD/target/release/xskvm}
[ -x "$xskvm" ] || { echo "bench-memory: build xskvm first: cargo build --release" >&2; exit 1; }
guest=$(guest_dir)
ss=$(command -v ss) || { echo "bench-memory: install iproute2 (ss)" >&2; exit 1; }

scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
cat > "$scenario" <<SCENARIO
exec 2>&1
# The socket diagnostics ss reads (a module in Debian's kernels; the test
# host loads it).
modprobe xsk_diag 2>/dev/null || true
$(veth_peer_setup)
# 2 MiB pages for the hugepage runs (guest RAM and the queue's 16 MiB),
# given back at the end.
hugepages=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
hugepages_before=\$(cat \$hugepages)
echo \$(( hugepages_before + 272 )) > \$hugepages
# Leave the host as found (it matters where this runs directly).
cleanup() {
    kill \$(cat /tmp/iperf3.pid 2>/dev/null) 2>/dev/null
    ip link del xs0 2>/dev/null
    ip netns del peer 2>/dev/null
    echo \$hugepages_before > \$hugepages
}
trap cleanup EXIT
cat > /tmp/guest-cmd <<'CMD'
ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 2; iperf3 -c 10.77.0.1 -t 3 >/dev/null && iperf3 -c 10.77.0.1 -t 3 -R >/dev/null && echo XSKVM-MEM-SAMPLE; sleep 10
CMD
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"\$(cat /tmp/guest-cmd)\""
# measure NAME NET-OPTIONS MEMORY-OPTIONS: one boot, sampled once the guest
# has moved its traffic and sits idle.
# A fresh iperf3 server per boot: one left busy by a boot that was cut short
# would refuse the next client.
fresh_server() {
    [ -f /tmp/iperf3.pid ] && kill \$(cat /tmp/iperf3.pid) 2>/dev/null
    sleep 0.5
    ip netns exec peer iperf3 -s -D -I /tmp/iperf3.pid
}
measure() {
    fresh_server
    $xskvm --kernel $guest/bzImage --initrd $guest/initramfs.cpio.gz --memory 512M\$3 --vcpus 1 \\
        --net af-xdp,ifname=xs0,mac=52:54:00:00:00:02\$2 --cmdline "\$cmdline" </dev/null >/tmp/run.log 2>&1 &
    local pid=\$! i
    for i in \$(seq 1200); do
        grep -q XSKVM-MEM-SAMPLE /tmp/run.log && break
        kill -0 \$pid 2>/dev/null || break
        sleep 0.5
    done
    if grep -q XSKVM-MEM-SAMPLE /tmp/run.log; then
        local status=/proc/\$pid/status
        # Each UMEM once: the sockets of a NIC's queues share one with umem=guest.
        local umem=\$($ss --xdp -e | grep -o 'umem(id:[0-9]*,size:[0-9]*' | sort -u \\
            | awk -F'[:,]' '{ s += \$4 } END { print s + 0 }')
        echo "MEM \$1 RSS-KB=\$(awk '/^VmRSS/ {print \$2}' \$status)" \\
            "HWM-KB=\$(awk '/^VmHWM/ {print \$2}' \$status)" \\
            "HUGETLB-KB=\$(awk '/^HugetlbPages/ {print \$2}' \$status)" \\
            "UMEM-KB=\$( [ \$umem -gt 0 ] && echo \$(( umem / 1024 )) || echo none)" \\
            "SOCKETS=\$($ss --xdp -e | grep -c 'umem(')"
        kill \$pid
    else
        echo "MEM \$1 none"
        grep -v "^\[ *[0-9]*\.[0-9]*\]" /tmp/run.log | tail -n 15 | sed "s/^/FAILED-RUN \$1: /"
        kill \$pid 2>/dev/null
    fi
    wait \$pid 2>/dev/null
    # The next boot must not meet this one's sockets or program.
    sleep 1
}
for round in \$(seq $rounds); do
    if [ \$((round % 2)) = 1 ]; then
        measure umem-own "" ""; measure umem-guest ",umem=guest" ""; measure umem-guest-hugepages ",umem=guest" ",hugepages=on"
    else
        measure umem-guest-hugepages ",umem=guest" ",hugepages=on"; measure umem-guest ",umem=guest" ""; measure umem-own "" ""
    fi
done
SCENARIO
bash resources/run-scenario.sh --file "$xskvm" --file "$guest/bzImage" --file "$guest/initramfs.cpio.gz" \
    --file "$ss" "$scenario" | tee /tmp/bench-memory.out
echo
echo "median over $rounds rounds (guest RAM 512 MiB, 1 vCPU, one NIC with one queue pair, after iperf3 both ways):"
for mode in umem-own umem-guest umem-guest-hugepages; do
    median() {
        grep "^MEM $mode " /tmp/bench-memory.out | grep -o "$1=[0-9]*" | cut -d= -f2 | sort -n \
            | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "none")}'
    }
    mib() { local v; v=$(median "$1"); [ "$v" = none ] && echo none || echo $(( v / 1024 )); }
    printf '  %-21s RSS %5s MiB (peak %5s)  + hugetlb %5s MiB  pinned by AF_XDP (UMEM) %5s MiB\n' \
        "$mode" "$(mib RSS-KB)" "$(mib HWM-KB)" "$(mib HUGETLB-KB)" "$(mib UMEM-KB)"
done
