#!/usr/bin/env bash
# run-scenario.sh [--file PATH]... SCRIPT
# Runs the bash script SCRIPT where KVM can boot Linux guests, with each PATH
# available at the same absolute path, and exits with SCRIPT's status:
#  - directly, when this host has hardware virtualization (vmx/svm);
#  - otherwise inside the nested test host: QEMU TCG with an emulated AMD
#    SVM CPU, the Debian cloud kernel with kvm-amd loaded, and an initramfs
#    holding busybox, bash, iproute2, ethtool, iperf3, iputils ping, the PATHs (ELF
#    programs with their shared libraries) and SCRIPT.
# It says which on stderr. A qemu-system-* among the PATHs brings QEMU's
# firmware directories along. In the test host SCRIPT runs as
# `bash /scenario.sh` in /tmp; its stdout and stderr come back live, on
# run-scenario's stdout and stderr, without kernel messages. Exit status:
# SCRIPT's; 126 when the test host's own kernel crashed or locked up (a fault
# of the emulated nested virtualization, worth one retry); 125 when the test host
# did not finish it otherwise (boot failure, timeout); both with the path of
# its console log on stderr.
# Environment: XSKVM_SCENARIO_MODE=direct|nested forces one; =bundle writes
# the test host's root file system with SCRIPT (a cpio archive) to
# $XSKVM_SCENARIO_BUNDLE and exits, for resources/run-bundle.sh to run on
# another machine with hardware virtualization but none of these packages;
# XSKVM_TESTHOST_MEM (default 3G), XSKVM_TESTHOST_CPUS (default 2),
# XSKVM_TESTHOST_TIMEOUT (seconds, default 600).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Kernel modules and programs every scenario may use in the test host.
# virtio_pci and virtio_console are built into Debian 6.12, modules in 6.1.
TESTHOST_MODULES=(virtio_pci virtio_console kvm_amd veth tun vhost_net bridge sch_ingress cls_bpf)
# Where the kernel package has them (Debian 6.1's cloud kernel has no
# xsk_diag, which bench-memory.sh's `ss --xdp` reads).
TESTHOST_OPTIONAL_MODULES=(xsk_diag)
TESTHOST_PROGRAMS=(/bin/bash /usr/bin/ip /usr/sbin/ethtool /usr/bin/iperf3 /usr/sbin/tc /usr/bin/nproc /usr/bin/ping)

files=()
while [ $# -gt 1 ]; do
    case "$1" in
        --file) files+=("$2"); shift 2 ;;
        *) die "usage: run-scenario.sh [--file PATH]... SCRIPT" ;;
    esac
done
[ $# -eq 1 ] && [ -f "$1" ] || die "usage: run-scenario.sh [--file PATH]... SCRIPT"
script=$1

mode=${XSKVM_SCENARIO_MODE:-auto}
if [ "$mode" = auto ]; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -c /dev/kvm ]; then mode=direct; else mode=nested; fi
fi
[ "$mode" != bundle ] || [ -n "${XSKVM_SCENARIO_BUNDLE:-}" ] || die "bundle mode needs XSKVM_SCENARIO_BUNDLE=PATH"
if [ "$mode" = direct ]; then
    echo "run-scenario: running directly (hardware virtualization)" >&2
    exec bash "$script"
fi
[ "$mode" = bundle ] || echo "run-scenario: running in the nested test host (QEMU TCG, EPYC+svm)" >&2

# QEMU inside the test host needs its firmware (Debian's search path).
for f in "${files[@]}"; do
    case "$(basename "$f")" in qemu-system-*)
        for dir in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
            [ -d "$dir" ] && files+=("$dir")
        done ;;
    esac
done

lock_cache
fetch_kernel
ensure_packages busybox-static iperf3 iproute2 ethtool iputils-ping
ensure_packages -t bookworm-backports qemu-system-x86

base=$XSKVM_CACHE/testhost/base.cpio
stamp=$(stamp_of "$RESOURCES_DIR/run-scenario.sh" "$RESOURCES_DIR/testhost-init.sh" "$RESOURCES_DIR/lib.sh" \
    <(dpkg-query -W busybox-static iperf3 iproute2 ethtool iputils-ping bash))
if [ "$(cat "$base.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "building the test host initramfs"
    mkdir -p "$(dirname "$base")"
    stage=$(mktemp -d)
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,root,etc}
    mknod -m 600 "$stage/dev/console" c 5 1
    cp /bin/busybox "$stage/bin/busybox"
    install -m 755 "$RESOURCES_DIR/testhost-init.sh" "$stage/init"
    optional=()
    for mod in "${TESTHOST_OPTIONAL_MODULES[@]}"; do
        if modprobe -d "$KERNEL_DIR" -S "$KERNEL_VERSION" --show-depends "$mod" >/dev/null 2>&1; then
            optional+=("$mod")
        fi
    done
    stage_modules "$stage" "${TESTHOST_MODULES[@]}" "${optional[@]}"
    copy_with_libs "$stage" "${TESTHOST_PROGRAMS[@]}"
    echo "root:x:0:0:root:/root:/bin/bash" > "$stage/etc/passwd"
    echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" >> "$stage/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$stage/etc/group"
    make_cpio "$stage" "$base"
    rm -rf "$stage"
    echo "$stamp" > "$base.stamp"
fi
unlock_cache

work=$(mktemp -d /tmp/xskvm-testhost.XXXXXX)
stage=$work/stage
mkdir -p "$stage"
# A bundle is one archive (a cpio reader stops at the first one's end).
[ "$mode" != bundle ] || (cd "$stage" && cpio -i -d --quiet < "$base")
[ ${#files[@]} -eq 0 ] || copy_with_libs "$stage" "${files[@]}"
install -m 755 "$script" "$stage/scenario.sh"
make_cpio "$stage" "$work/scenario.cpio"
rm -rf "$stage"
if [ "$mode" = bundle ]; then
    mv "$work/scenario.cpio" "$XSKVM_SCENARIO_BUNDLE"
    rm -rf "$work"
    echo "run-scenario: bundle written to $XSKVM_SCENARIO_BUNDLE" >&2
    exit 0
fi
# The kernel unpacks concatenated archives in order: base, then this run's files.
cat "$base" "$work/scenario.cpio" > "$work/initrd"
: > "$work/out"; : > "$work/err"; : > "$work/rc"

port() { echo "-chardev file,id=$1,path=$work/$1 -device virtserialport,bus=vs.0,chardev=$1,name=$1"; }
# shellcheck disable=SC2046
timeout -k 10 "${XSKVM_TESTHOST_TIMEOUT:-600}" qemu-system-x86_64 \
    -M q35,accel=tcg -cpu EPYC,+svm -smp "${XSKVM_TESTHOST_CPUS:-2}" -m "${XSKVM_TESTHOST_MEM:-3G}" \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$work/console.log" \
    -kernel "$KERNEL_IMAGE" -initrd "$work/initrd" \
    -append "console=ttyS0 panic=-1 softlockup_panic=1 quiet loglevel=5" \
    -device virtio-serial-pci,id=vs $(port out) $(port err) $(port rc) \
    </dev/null 2>"$work/qemu.log" &
qemu=$!
trap 'kill -TERM $qemu 2>/dev/null; wait $qemu; rm -rf "$work"; exit 130' INT TERM
# A test-host kernel that panics does not always manage to reset (so QEMU
# would spin until the timeout): stop it as soon as the panic shows. A soft
# lockup of the test host's own kernel is made a panic (softlockup_panic=1):
# under TCG one of its CPUs now and then stays stuck in a kernel worker with
# the L2 guest frozen, which only the timeout would have ended; loglevel=5
# puts the stack and workqueue of such a fault in the console log.
(
    while kill -0 $qemu 2>/dev/null; do
        if grep -q "Kernel panic" "$work/console.log" 2>/dev/null; then
            sleep 1
            kill -TERM $qemu 2>/dev/null
            break
        fi
        sleep 1
    done
) &
panic_watch=$!
# The scenario's output as it comes; tail reads to the end once QEMU is gone.
tail -q -n +1 -s 0.2 --pid=$qemu -f "$work/out" &
out_tail=$!
tail -q -n +1 -s 0.2 --pid=$qemu -f "$work/err" >&2 &
err_tail=$!
wait $qemu || true
kill $panic_watch 2>/dev/null || true
wait $out_tail $err_tail $panic_watch 2>/dev/null || true

rc=$(tr -dc '0-9' < "$work/rc")
if [ -z "$rc" ] && grep -q "Kernel panic" "$work/console.log"; then
    echo "run-scenario: the test host's own kernel crashed (the emulated nested virtualization," \
        "not the scenario); its console log: $work/console.log" >&2
    grep -E -B2 -A3 "Kernel panic|soft lockup|Workqueue:" "$work/console.log" | head -n 60 >&2 || true
    exit 126
fi
if [ -z "$rc" ]; then
    echo "run-scenario: the test host did not finish the scenario (boot failure, panic or" \
        "timeout after ${XSKVM_TESTHOST_TIMEOUT:-600} s); its console log: $work/console.log" >&2
    grep -v "TCG doesn't support" "$work/qemu.log" >&2 || true
    tail -n 20 "$work/console.log" >&2 || true
    exit 125
fi
rm -rf "$work"
exit "$rc"
