#!/usr/bin/env bash
# The xskvm demo on a fresh Debian bookworm machine (as root): installs what
# is missing, builds xskvm and the Debian guest image, and boots the guest —
# directly with hardware virtualization, else in the nested test host — with
# an AF_XDP NIC on a veth pair: the guest pings and runs iperf3 against a
# peer in a network namespace, then powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
source resources/lib.sh

echo "== installing Debian packages (log: /tmp/xskvm-install-deps.log)"
bash resources/install-deps.sh > /tmp/xskvm-install-deps.log 2>&1 \
    || { tail -n 30 /tmp/xskvm-install-deps.log >&2; exit 1; }
command -v cargo >/dev/null || { echo "demo: cargo not found (install Rust with rustup)" >&2; exit 1; }
echo "== building xskvm"
cargo build --release -p vmm
xskvm=$PWD/target/release/xskvm
echo "== building the guest image"
guest=$(guest_dir)

scenario=$(mktemp)
out=$(mktemp)
trap 'rm -f "$scenario" "$out"' EXIT
cat > "$scenario" <<SCENARIO
set -e
exec 2>&1   # one stream, in order
# A veth pair: xskvm's NIC on xs0, a peer at 10.77.0.1 in namespace "peer".
$(veth_peer_setup)
ip netns exec peer iperf3 -s -D
cat > /tmp/guest-cmd <<'CMD'
echo; echo '== inside the guest'; uname -sr; echo cpus: \$(nproc); ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 1; ip addr show eth0 | grep inet; ping -c 3 10.77.0.1; iperf3 -c 10.77.0.1 -t 5 -f m | tail -n 4; echo '== bye'
CMD
set -x
$xskvm --kernel $guest/bzImage --initrd $guest/initramfs.cpio.gz --memory 512M --vcpus 2 \
    --net af-xdp,ifname=xs0 --log-level info \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"\$(cat /tmp/guest-cmd)\""
set +x
ip -d link show xs0 | grep -q xdp && echo "XDP program still on xs0!" || echo "== xskvm has exited; no XDP program is left on xs0"
SCENARIO
# The demo takes under a minute in the test host: a run stuck for four is
# stuck (the default limit of run-scenario.sh is ten).
run_demo() {
    XSKVM_TESTHOST_TIMEOUT=${XSKVM_TESTHOST_TIMEOUT:-240} \
        bash resources/run-scenario.sh --file "$xskvm" --file "$guest/bzImage" \
        --file "$guest/initramfs.cpio.gz" "$scenario" 2>&1 | tee "$out"
    return "${PIPESTATUS[0]}"
}
echo "== booting the guest with an AF_XDP NIC"
rc=0
run_demo || rc=$?
# In the nested test host (QEMU TCG emulating AMD SVM) the L2 guest now and
# then triple-faults, the test host's own kernel rarely crashes (126), and
# with two L2 vCPUs under traffic it has frozen (125, the time limit). The
# tests run the first two once more (tests/common); the demo, all three.
# None of it has been seen with hardware virtualization.
if [ "$rc" -ne 0 ] && grep -q 'running in the nested test host' "$out" \
    && { [ "$rc" -eq 126 ] || [ "$rc" -eq 125 ] \
        || grep -q 'guest triple fault (KVM_EXIT_SHUTDOWN)' "$out"; }; then
    echo "== the emulated nested host failed the guest (a known QEMU TCG fault, see tests/common); once more"
    rc=0
    run_demo || rc=$?
fi
exit "$rc"
