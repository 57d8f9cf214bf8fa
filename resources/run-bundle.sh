#!/bin/sh
# run-bundle.sh BUNDLE [BUSYBOX]
# Runs a scenario bundle (written by run-scenario.sh with
# XSKVM_SCENARIO_MODE=bundle: the test host's root file system, the
# scenario's files and /scenario.sh, as one cpio archive) on a machine with
# hardware virtualization that has none of the packages the scenario needs:
# unpacks it, loads the kernel modules the scenario uses from this host's
# own kernel, and runs the scenario chrooted, so that it uses this host's
# /dev/kvm at full speed. Needs root, a static busybox (BUSYBOX, default
# `busybox` on PATH) for cpio, and a kernel with veth, tun, bridge, vhost_net
# and AF_XDP. Exit status: the scenario's; 125 when it could not be started.
set -eu
[ $# -ge 1 ] && [ -f "$1" ] || { echo "usage: run-bundle.sh BUNDLE [BUSYBOX]" >&2; exit 2; }
bundle=$(realpath "$1")
bb=${2:-busybox}
fail() { echo "run-bundle: $*" >&2; exit 125; }
[ -c /dev/kvm ] || fail "no /dev/kvm here"
grep -qwE 'vmx|svm' /proc/cpuinfo || fail "no hardware virtualization (vmx/svm) here"
root=$(mktemp -d /tmp/xskvm-bundle.XXXXXX)
cleanup() {
    umount -R -l "$root" 2>/dev/null || true
    # Never remove through a mount still there: /dev is a bind of the host's.
    if grep -q " $root[/ ]" /proc/self/mounts; then
        echo "run-bundle: mounts left under $root; not removing it" >&2
    else
        rm -rf "$root"
    fi
}
trap cleanup EXIT
(cd "$root" && "$bb" cpio -i -d -m < "$bundle" 2>/dev/null) || fail "cannot unpack $bundle with $bb cpio"
for m in veth tun bridge vhost_net sch_ingress cls_bpf; do
    modprobe "$m" 2>/dev/null || echo "run-bundle: modprobe $m failed (built in, or missing)" >&2
done
# The root a mount of its own: `ip netns exec` remounts / inside.
mount --bind "$root" "$root" || fail "cannot bind-mount $root (not root, or no CAP_SYS_ADMIN?)"
mount -t proc proc "$root/proc" || fail "cannot mount proc"
mount -t sysfs sysfs "$root/sys" || fail "cannot mount sysfs"
mount -t bpf bpf "$root/sys/fs/bpf" 2>/dev/null || echo "run-bundle: no bpffs" >&2
mount --rbind /dev "$root/dev" || fail "cannot bind /dev"
mount -t tmpfs tmpfs "$root/run" || fail "cannot mount tmpfs on /run"
chroot "$root" /bin/busybox --install -s /bin 2>/dev/null || true
echo "run-bundle: running the scenario chrooted in $root, on this host's KVM" >&2
set +e
chroot "$root" /bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    /bin/bash -c 'ip link set lo up; cd /tmp && exec bash /scenario.sh'
rc=$?
set -e
exit $rc
