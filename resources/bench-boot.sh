#!/usr/bin/env bash
# Boot time and memory: xskvm beside QEMU's microvm, booting the same
# kernel and initramfs (resources/guest-image.sh) under the same KVM — the
# nested test host here, the real one with hardware virtualization.
# Prints, per run, the milliseconds from start to the guest's ready marker
# and the VMM's peak RSS, then the medians.
# Usage: bench-boot.sh [RUNS]   (build xskvm first: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
source resources/lib.sh
runs=${1:-3}
xskvm=$PWD/target/release/xskvm
[ -x "$xskvm" ] || { echo "bench-boot: build xskvm first: cargo build --release" >&2; exit 1; }
guest=$(guest_dir)
qemu=$(command -v qemu-system-x86_64) || { echo "bench-boot: install qemu-system-x86" >&2; exit 1; }

scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
cat > "$scenario" <<SCENARIO
ms() { awk '{print int(\$1 * 1000)}' /proc/uptime; }
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet -- true"
# Runs a VMM, timing the guest's ready marker; GNU time reports peak RSS.
measure() {
    local name=\$1; shift
    local start=\$(ms)
    /usr/bin/time -f "RSS-KB=%M" -o /tmp/rss "\$@" </dev/null 2>/dev/null | while read -r line; do
        case "\$line" in *XSKVM-GUEST-READY*) echo "READY-MS=\$(( \$(ms) - start ))" > /tmp/ready ;; esac
    done
    echo "\$name \$(cat /tmp/ready 2>/dev/null || echo READY-MS=none) \$(cat /tmp/rss | grep RSS-KB) TOTAL-MS=\$(( \$(ms) - start ))"
    rm -f /tmp/ready /tmp/rss
}
for i in \$(seq $runs); do
    measure xskvm $xskvm --kernel $guest/bzImage --initrd $guest/initramfs.cpio.gz \
        --memory 512M --vcpus 1 --cmdline "\$cmdline"
    measure qemu-microvm $qemu -M microvm,acpi=on,pic=off,pit=off,rtc=off -enable-kvm -cpu host \
        -m 512M -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
        -kernel $guest/bzImage -initrd $guest/initramfs.cpio.gz -append "\$cmdline"
done
SCENARIO
bash resources/run-scenario.sh --file "$xskvm" --file "$guest/bzImage" --file "$guest/initramfs.cpio.gz" --file "$qemu" \
    --file /usr/share/qemu --file /usr/share/seabios --file /usr/bin/time "$scenario" | tee /tmp/bench-boot.out
echo
echo "median over $runs runs (guest RAM 512 MiB, 1 vCPU):"
for vmm in xskvm qemu-microvm; do
    median() { grep "^$vmm " /tmp/bench-boot.out | grep -o "$1=[0-9]*" | cut -d= -f2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    printf '  %-13s start->marker %6s ms   whole run %6s ms   peak RSS %6s MiB\n' \
        "$vmm" "$(median READY-MS)" "$(median TOTAL-MS)" "$(( $(median RSS-KB) / 1024 ))"
done
