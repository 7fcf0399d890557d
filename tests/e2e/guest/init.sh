#!/bin/sh
# /init of the csi-spdk test guest (busybox sh). Sets up the guest, runs
# /etc/guest/test.sh under `timeout` with its output on the second serial port
# (ttyS1), then the marker line "@@GUEST-EXIT <rc> <uptime>" and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/tmp /var/lib /mnt
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
echo 1 > /proc/sys/kernel/sysrq
echo /sbin/modprobe > /proc/sys/kernel/modprobe
ln -sf /proc/self/mounts /etc/mtab
ln -sf /proc/self/fd /dev/fd

stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3>/dev/ttyS1
echo "@@GUEST-START $(cut -d' ' -f1 /proc/uptime)" >&3

modprobe configfs 2>/dev/null
mount -t configfs configfs /sys/kernel/config 2>/dev/null
ip link set lo up
hostname csi-spdk-guest

. /etc/guest/env
for m in $GUEST_MODULES; do
  modprobe "$m" || echo "guest init: modprobe $m failed" >&3
done
if [ "$GUEST_NET" = 1 ]; then
  # The NIC appears once virtio_pci has probed it: load both, wait for eth0.
  modprobe virtio_pci; modprobe virtio_net
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || echo "guest init: no network (eth0 missing after $i tries)" >&3
fi

cd /root
timeout -s KILL "$GUEST_TIMEOUT" sh -e /etc/guest/test.sh </dev/null >&3 2>&3
rc=$?
printf "\n@@GUEST-EXIT %s %s\n" "$rc" "$(cut -d' ' -f1 /proc/uptime)" >&3
exec 3>&-
sync
echo o > /proc/sysrq-trigger
sleep 10
