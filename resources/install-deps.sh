#!/usr/bin/env bash
# Installs the Debian packages xskvm's build, demo and tests need, on a
# fresh Debian bookworm machine (as root). Safe to run again.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bpo.list
fi
apt-get update -q
# Build: clang builds the XDP program; libbpf (vendored by libbpf-sys) needs the rest.
# Guest image and test host: busybox, iperf3, kmod (depmod), xz/zstd (modules, vmlinux), cpio.
# Tests: iproute2 and ethtool (veth, netns), util-linux (setpriv), curl and
# python3-prometheus-client (the API socket test's client and metrics parser).
apt-get install -y -q \
    clang llvm libelf-dev zlib1g-dev pkg-config make gcc \
    busybox-static iperf3 kmod xz-utils zstd cpio iproute2 ethtool util-linux time \
    curl python3 python3-prometheus-client
# QEMU (the nested test host) from backports: the image's qemu-utils is the
# backports build, and bookworm's qemu-system would conflict with it.
apt-get install -y -q -t bookworm-backports qemu-system-x86
