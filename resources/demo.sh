#!/usr/bin/env bash
# The xskvm demo on a fresh Debian bookworm machine (as root): installs what
# is missing, builds xskvm and the Debian guest image, and boots the guest —
# directly with hardware virtualization, else in the nested test host — so
# that you see its console: kernel, CPUs, memory, devices, then power-off.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing Debian packages (log: /tmp/xskvm-install-deps.log)"
bash resources/install-deps.sh > /tmp/xskvm-install-deps.log 2>&1 \
    || { tail -n 30 /tmp/xskvm-install-deps.log >&2; exit 1; }
command -v cargo >/dev/null || { echo "demo: cargo not found (install Rust with rustup)" >&2; exit 1; }
echo "== building xskvm"
cargo build --release -p vmm
xskvm=$PWD/target/release/xskvm
echo "== building the guest image"
guest=$(bash resources/guest-image.sh | head -n1 | xargs dirname)

scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
cat > "$scenario" <<SCENARIO
set -x
$xskvm --kernel $guest/bzImage --initrd $guest/initramfs.cpio.gz --memory 512M --vcpus 2 \
    --log-level info --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \
echo; echo '== inside the guest:'; uname -sr; echo cpus: \\\$(nproc); free -m | head -n 2; \
cat /proc/cmdline; ls /sys/bus/platform/devices | grep -i -e LNRO -e PNP; echo '== bye'"
SCENARIO
echo "== booting the guest"
bash resources/run-scenario.sh --file "$xskvm" --file "$guest" "$scenario"
