#!/bin/busybox sh
# /init of the xskvm guest image. Words after "--" on the kernel command
# line arrive here as arguments: run them as one shell command, report its
# status, power off. Without arguments, give the console a shell.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
while read -r module; do
    insmod "/modules/$module" 2>/dev/null || echo "guest: cannot load $module" >&2
done < /modules.list
ip link set lo up
hostname xskvm-guest
# The ACPI power button (xskvm's vm.shutdown): power off when it is pressed,
# as systemd-logind or acpid would. One read of a whole input event (24
# bytes; evdev refuses shorter reads) is the press.
for event in /sys/class/input/event*; do
    if [ "$(cat "$event/device/name" 2>/dev/null)" = "Power Button" ]; then
        (dd if="/dev/input/${event##*/}" of=/dev/null bs=24 count=1 2>/dev/null &&
            echo "XSKVM-GUEST-POWER-BUTTON" && poweroff -f) &
    fi
done
echo XSKVM-GUEST-READY
if [ $# -gt 0 ]; then
    sh -c "$*"
    echo "XSKVM-GUEST-EXIT=$?"
else
    echo "xskvm guest shell: 'poweroff' to leave (or Ctrl-A x)"
    setsid cttyhack sh -l
fi
poweroff -f
