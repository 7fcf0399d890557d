#!/bin/bash
# PID 1 of a cluster node guest (installed as /sbin/node-init by
# scripts/build-node-rootfs.sh). The rig's per-boot files are in /etc/node
# (copied there by the initramfs): env (NODE_NAME, API_HOST, API_PORT,
# KUBELET_PORT, POD_CIDR, NODE_LABELS), ca.crt, kubelet.kubeconfig,
# kubelet-config.yaml, manifests/ (static Pods), agent/ (the storage Pod's).
# containerd's store is /dev/vdb (images imported by import-images.sh),
# then kubelet; runs until powered off.
# Status lines go to the second serial port (ttyS1), logs to the console.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
status() { echo "$*" > /dev/ttyS1; echo "node-init: $*" > /dev/console; }
die() { status "NODE-FAILED $*"; sync; sleep 1; echo o > /proc/sysrq-trigger; sleep 10; }
trap 'die "node-init exited"' EXIT

mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw /
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t configfs configfs /sys/kernel/config 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount --make-rshared /
echo /sbin/modprobe > /proc/sys/kernel/modprobe
. /etc/node/env
hostname "$NODE_NAME"
echo "$NODE_NAME" > /etc/hostname
printf '127.0.0.1 localhost\n10.0.2.15 %s\n' "$NODE_NAME" > /etc/hosts
echo "nameserver 10.0.2.3" > /etc/resolv.conf
status "NODE-BOOT $NODE_NAME"

for m in virtio_net overlay br_netfilter veth nf_conntrack nvme-tcp nvme-fabrics nvmet nvmet-tcp \
         nf_tables nft_compat nft_chain_nat xt_nat xt_MASQUERADE xt_conntrack xt_comment \
         xt_addrtype xt_mark loop dm-mod; do
  modprobe "$m" 2>/dev/null || echo "node-init: modprobe $m failed" > /dev/console
done
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 2>/dev/null
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

mkdir -p /var/lib/containerd
mount /dev/vdb /var/lib/containerd || die "cannot mount the image disk /dev/vdb"
containerd > /var/log/containerd.log 2>&1 &
i=0; until ctr version >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 120 ] || die "containerd"; sleep 0.5; done

# The kubernetes Service without kube-proxy: one DNAT to the host's apiserver.
iptables -t nat -A OUTPUT -d 10.0.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$API_HOST:$API_PORT" \
  || die "iptables"
iptables -t nat -A PREROUTING -d 10.0.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$API_HOST:$API_PORT"
cat > /etc/cni/net.d/10-ptp.conflist <<EOF
{"cniVersion": "1.0.0", "name": "rig", "plugins": [
  {"type": "ptp", "ipMasq": true, "ipam": {"type": "host-local", "subnet": "$POD_CIDR",
   "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
mkdir -p /etc/kubernetes/manifests /var/lib/kubelet /var/log/pods
cp -a /etc/node/manifests/. /etc/kubernetes/manifests/ 2>/dev/null
start_kubelet() {
  kubelet --config=/etc/node/kubelet-config.yaml --kubeconfig=/etc/node/kubelet.kubeconfig \
    --hostname-override="$NODE_NAME" --node-ip=10.0.2.15 --cloud-provider=external \
    --node-labels="$NODE_LABELS" --v=1 >> /var/log/kubelet.log 2>&1 &
  echo $! > /run/kubelet.pid
}
start_kubelet
status "NODE-KUBELET-STARTED"
# Serve: show kubelet's errors on the console; restart kubelet when it exits
# (what systemd's Restart=always does on a real node; the kubelet-restart
# scenario kills it). The rig powers the guest off.
tail -n +1 -F /var/log/kubelet.log 2>/dev/null | grep --line-buffered -E '^E' > /dev/console &
restarts=0
while true; do
  if ! kill -0 "$(cat /run/kubelet.pid)" 2>/dev/null; then
    restarts=$((restarts+1))
    status "NODE-KUBELET-EXITED $restarts"
    sleep 1
    start_kubelet
    status "NODE-KUBELET-RESTARTED $restarts"
  fi
  sleep 1
done
