# Shared helpers for the resources/ scripts. Source it; it defines functions only.
# Everything built goes to $XSKVM_CACHE (default /var/cache/xskvm), outside the repo.

XSKVM_CACHE=${XSKVM_CACHE:-/var/cache/xskvm}
RESOURCES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "resources: $*" >&2; }
die() { echo "resources: error: $*" >&2; exit 1; }

# lock_cache / unlock_cache: one build at a time per cache (parallel test
# runs share it); readers never see a half-written file, since builds write
# aside and rename.
lock_cache() {
    mkdir -p "$XSKVM_CACHE"
    exec 9>"$XSKVM_CACHE/.lock"
    flock 9
}
unlock_cache() { exec 9>&-; }

# ensure_packages [-t RELEASE] PKG...: installs the Debian packages that are missing.
ensure_packages() {
    local release=()
    if [ "${1:-}" = -t ]; then release=(-t "$2"); shift 2; fi
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
    ensure_backports
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${release[@]}" "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# Debian bookworm-backports carries the 6.12 kernel and the QEMU we use.
ensure_backports() {
    local list=/etc/apt/sources.list.d/bpo.list
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo 'deb http://deb.debian.org/debian bookworm-backports main' > "$list"
        rm -f "$XSKVM_CACHE/.apt-updated"
    fi
    mkdir -p "$XSKVM_CACHE"
    if [ ! -e "$XSKVM_CACHE/.apt-updated" ]; then
        apt-get update -q >&2 || die "apt-get update failed"
        touch "$XSKVM_CACHE/.apt-updated"
    fi
}

# The cloud kernel package from bookworm-backports (override: XSKVM_KERNEL_PKG,
# a package name, or "bookworm" for bookworm's own cloud kernel, Linux 6.1).
kernel_package() {
    if [ "${XSKVM_KERNEL_PKG:-}" = bookworm ]; then
        apt-cache depends linux-image-cloud-amd64 2>/dev/null \
            | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
        return
    fi
    if [ -n "${XSKVM_KERNEL_PKG:-}" ]; then echo "$XSKVM_KERNEL_PKG"; return; fi
    ensure_backports
    apt-cache depends -t bookworm-backports linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# fetch_kernel: downloads and unpacks the kernel package (not installed on
# the host); sets KERNEL_DIR (unpacked tree), KERNEL_VERSION and KERNEL_IMAGE.
fetch_kernel() {
    ensure_packages kmod xz-utils zstd lz4 cpio
    local pkg
    pkg=$(kernel_package)
    [ -n "$pkg" ] || die "cannot find linux-image-cloud-amd64 in bookworm-backports (apt-get update?)"
    KERNEL_VERSION=${pkg#linux-image-}
    KERNEL_DIR=$XSKVM_CACHE/kernel/$KERNEL_VERSION
    KERNEL_IMAGE=$KERNEL_DIR/boot/vmlinuz-$KERNEL_VERSION
    if [ ! -e "$KERNEL_DIR/.done" ]; then
        log "fetching $pkg"
        mkdir -p "$XSKVM_CACHE/dl"
        rm -rf "$KERNEL_DIR"; mkdir -p "$KERNEL_DIR"
        rm -f "$XSKVM_CACHE/dl/${pkg}"_*.deb
        (cd "$XSKVM_CACHE/dl" && apt-get download -q -t bookworm-backports "$pkg" >&2 2>/dev/null) \
            || die "apt-get download $pkg failed (network? try: apt-get update)"
        dpkg -x "$XSKVM_CACHE"/dl/"${pkg}"_*.deb "$KERNEL_DIR"
        depmod -b "$KERNEL_DIR" "$KERNEL_VERSION"
        touch "$KERNEL_DIR/.done"
    fi
}

# stage_modules DEST MODULE...: copies MODULEs and their dependencies,
# decompressed, into DEST/modules/ and writes DEST/modules.list in load order.
stage_modules() {
    local dest=$1; shift
    mkdir -p "$dest/modules"
    : > "$dest/modules.list"
    local mod path name
    for mod in "$@"; do
        modprobe -d "$KERNEL_DIR" -S "$KERNEL_VERSION" --show-depends "$mod" \
            | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r path; do
        name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}
        case "$path" in
            *.xz) xz -dc "$path" > "$dest/modules/$name" ;;
            *.zst) zstd -qdc "$path" > "$dest/modules/$name" ;;
            *) cp "$path" "$dest/modules/$name" ;;
        esac
        echo "$name" >> "$dest/modules.list"
    done
}

# copy_with_libs DEST PATH...: copies files or directories to the same
# absolute paths under DEST; ELF programs bring their shared libraries.
copy_with_libs() {
    local dest=$1; shift
    local path lib
    for path in "$@"; do
        [ -e "$path" ] || die "no such file: $path"
        path=$(realpath -s "$path")
        mkdir -p "$dest/$(dirname "$path")"
        cp -rL "$path" "$dest/$path"
        if [ -f "$path" ] && head -c 4 "$path" | grep -q ELF; then
            for lib in $(ldd "$path" 2>/dev/null | grep -o '/[^ ]*'); do
                [ -e "$dest/$lib" ] && continue
                mkdir -p "$dest/$(dirname "$lib")"
                cp -L "$lib" "$dest/$lib"
            done
        fi
    done
}

# make_cpio DIR OUT: packs DIR as a newc archive (uncompressed: the kernel
# unpacks it faster than it could gunzip it under emulation).
make_cpio() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) > "$2.tmp"
    mv -f "$2.tmp" "$2"
}

# stamp_of FILE...: a hash that changes when any input changes.
stamp_of() {
    { cat "$@"; echo "${KERNEL_VERSION:-}"; } | sha256sum | cut -d' ' -f1
}

# guest_dir: builds the guest image if needed and prints the folder of its
# bzImage and initramfs. All of guest-image.sh's output is read first, then
# its first line taken: a pipe into head closed early and, under pipefail,
# failed the caller (SIGPIPE, 141) whenever guest-image.sh wrote its next
# line after head had exited.
guest_dir() {
    local images
    images=$(bash "$RESOURCES_DIR/guest-image.sh") || return
    dirname "${images%%$'\n'*}"
}

# veth_peer_setup: the scenario lines that make the scenarios' network: a
# veth pair, xskvm's NIC on xs0 and a peer at 10.77.0.1/24 on xs1 in
# network namespace "peer".
veth_peer_setup() {
    cat <<'LINES'
ip netns add peer
ip link add xs0 type veth peer name xs1
ip link set xs1 netns peer
ip -n peer addr add 10.77.0.1/24 dev xs1
ip -n peer link set xs1 up
ip link set xs0 up
LINES
}
