#!/usr/bin/env bash
# Builds the xskvm guest image from Debian packages:
#   $XSKVM_CACHE/guest/bzImage            Debian cloud kernel (bookworm-backports)
#   $XSKVM_CACHE/guest/vmlinux            the same kernel as an ELF
#   $XSKVM_CACHE/guest/initramfs.cpio.gz  busybox, iperf3, ethtool, iputils ping, virtio_mmio/virtio_net, the ACPI
#                                         power button, guest-init.sh
# Rebuilt only when an input changes (this script, guest-init.sh, lib.sh,
# the kernel and package versions); prints the three paths.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Words after "--" on the guest's command line run as a command (guest-init.sh).
# virtio and virtio_ring are built into the cloud kernel (skipped, as are
# built-in dependencies); virtio_net brings failover and net_failover.
# evdev and button: the ACPI power button (xskvm's vm.shutdown) as an input
# device guest-init.sh watches.
GUEST_MODULES=(virtio virtio_ring virtio_mmio virtio_net evdev button)

lock_cache
fetch_kernel
ensure_packages busybox-static iperf3 ethtool iputils-ping
out=$XSKVM_CACHE/guest
stamp=$(stamp_of "$RESOURCES_DIR/guest-image.sh" "$RESOURCES_DIR/guest-init.sh" "$RESOURCES_DIR/lib.sh" \
    <(dpkg-query -W busybox-static iperf3 ethtool iputils-ping))

if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "building the guest image in $out"
    new=$out/.new
    rm -rf "$new"
    mkdir -p "$new"
    cp "$KERNEL_IMAGE" "$new/bzImage"

    # The bzImage payload: one zstd frame (Debian 6.12) or an LZ4 stream
    # (Debian 6.1), found by its magic; what follows it is not ours.
    : > "$new/vmlinux"
    for way in '\x28\xb5\x2f\xfd:zstd -qdc' '\x02\x21\x4c\x18:lz4 -qdc' '\xfd7zXZ\x00:xz -qdc --single-stream'; do
        offset=$(LC_ALL=C grep -obUaP -m1 "${way%%:*}" "$new/bzImage" | cut -d: -f1 | head -n1 || true)
        [ -n "$offset" ] || continue
        tail -c +$((offset + 1)) "$new/bzImage" | ${way#*:} > "$new/vmlinux" 2>/dev/null || true
        [ "$(head -c 4 "$new/vmlinux")" = $'\x7fELF' ] && break
    done
    [ "$(head -c 4 "$new/vmlinux")" = $'\x7fELF' ] || die "could not extract vmlinux from $KERNEL_IMAGE"

    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,root,etc}
    mknod -m 600 "$stage/dev/console" c 5 1
    cp /bin/busybox "$stage/bin/busybox"
    install -m 755 "$RESOURCES_DIR/guest-init.sh" "$stage/init"
    stage_modules "$stage" "${GUEST_MODULES[@]}"
    copy_with_libs "$stage" /usr/bin/iperf3
    copy_with_libs "$stage" /usr/sbin/ethtool
    # iputils ping (as /usr/bin/ping): busybox's has no -M do (don't fragment).
    copy_with_libs "$stage" /usr/bin/ping
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -9 > "$new/initramfs.cpio.gz"
    # Renames: a VMM still reading the old files keeps them.
    rm -f "$out/.stamp"
    mv -f "$new"/* "$out"/
    rmdir "$new"
    echo "$stamp" > "$out/.stamp"
fi
echo "$out/bzImage"
echo "$out/vmlinux"
echo "$out/initramfs.cpio.gz"
