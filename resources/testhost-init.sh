#!/bin/busybox sh
# /init of the nested test host: brings up /dev/kvm, then runs /scenario.sh
# with its stdout, stderr and exit status going to virtio-serial ports
# that run-scenario.sh reads on the outside.
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
while read -r module; do
    insmod "/modules/$module" 2>/dev/null || echo "testhost: cannot load $module" >&2
done < /modules.list
ip link set lo up
[ -c /dev/kvm ] || echo "testhost: no /dev/kvm" >&2

port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name")" = "$1" ] && echo "/dev/${p##*/}"
    done
}
cd /tmp
bash /scenario.sh < /dev/null > "$(port out)" 2> "$(port err)"
echo $? > "$(port rc)"
sync
poweroff -f
