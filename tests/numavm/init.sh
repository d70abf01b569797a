#!/bin/sh
# PID 1 of the two-node test VM (booted with init=<this file>): mount what the kernel and libvirtd need,
# unpack the project tree the host attached as a tar on the second disk, run the checks, power off.
# The checks' verdicts go to the second serial port; everything else to the console (first port).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
# The initramfs mounts /run noexec; systemd would not, and libvirt executes hooks from under it.
mountpoint -q /run && mount -o remount,exec /run || mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
ip link set lo up
hostname numavm
SRC=/opt/dmem-libvirt/src
rm -rf "$SRC" && mkdir -p "$SRC" && tar -C "$SRC" -xf /dev/vdb
/opt/dmem-libvirt/venv/bin/python "$SRC/tests/numavm/inside.py" --report /dev/ttyS1
echo "numavm: init: checks exited $?"
sync
poweroff -f
