#!/usr/bin/env bash
# Build (once, cached) the boot media of a Kubernetes node guest for the
# cluster rig (tests/e2e/cluster): a Debian 13 (trixie) root filesystem made
# with mmdebstrap -- containerd, runc, the CNI plugins, iptables, nvme-cli and
# the file system tools from Debian, kubelet from scripts/install-k8s.sh and
# the Debian 13 cloud kernel's modules from scripts/install-guest-deps.sh --
# as an ext4 disk image (booted with snapshot=on, so every boot starts
# clean), and a ~1 MB busybox initramfs that loads virtio_blk, mounts that
# disk, copies the per-boot configuration (appended to the initramfs by the
# rig) into it and switches root to /sbin/node-init (tests/e2e/cluster/node-init.sh).
#
#   scripts/build-node-rootfs.sh [OUT_DIR]   (default: $CSI_SPDK_GUEST_CACHE/node)
#
# Output: OUT_DIR/<stamp>/{rootfs.ext4,initrd.cpio,kernel}, OUT_DIR/current ->
# <stamp>. The stamp hashes this script, node-init.sh, the package list, the
# kubelet binary and the kernel version: a build is reused until one changes.
# Needs root (mmdebstrap --mode=root). About a minute cold; instant when cached.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcache="${CSI_SPDK_GUEST_CACHE:-$repo/.cache/guest}"
out="${1:-$gcache/node}"
kbin="${K8S_BIN:-${K8S_CACHE:-$repo/.cache/k8s}/bin}"
MIRROR="${CSI_SPDK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
PKGS=(containerd runc containernetworking-plugins iptables kmod iproute2 nvme-cli e2fsprogs
      xfsprogs util-linux mount ca-certificates conntrack socat procps)
init_script="$repo/tests/e2e/cluster/node-init.sh"
start=$SECONDS

kubelet="$kbin/kubelet"
[ -x "$kubelet" ] || { echo "build-node-rootfs: no kubelet in $kbin (scripts/install-k8s.sh)" >&2; exit 1; }
kroot="$gcache/trixie/kernel"
kver="$(ls "$kroot/usr/lib/modules" 2>/dev/null | head -n1)"
[ -n "$kver" ] || { echo "build-node-rootfs: no Debian 13 kernel in $kroot (scripts/install-guest-deps.sh)" >&2; exit 1; }
busybox="$gcache/trixie/root/usr/bin/busybox"
[ -x "$busybox" ] || { echo "build-node-rootfs: no busybox in $gcache/trixie/root" >&2; exit 1; }
command -v mmdebstrap >/dev/null || {
  echo "build-node-rootfs: apt-get install mmdebstrap" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
}

stamp="$( { cat "${BASH_SOURCE[0]}" "$init_script"; echo "${PKGS[*]} $kver $SUITE";
            sha256sum "$kubelet" | cut -d' ' -f1; } | sha256sum | cut -c1-16)"
dst="$out/$stamp"
if [ -e "$dst/.done" ]; then
  ln -sfn "$stamp" "$out/current"
  echo "build-node-rootfs: cached $dst"
  exit 0
fi
echo "build-node-rootfs: Debian $SUITE node root filesystem (mmdebstrap, about a minute) into $dst"
work="$(mktemp -d /tmp/csi-spdk-node.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mmdebstrap --mode=root --variant=minbase --quiet \
  --include="$(IFS=,; echo "${PKGS[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/etc/nvme/hostnqn "$1"/etc/nvme/hostid; : > "$1/etc/machine-id"' \
  "$SUITE" "$root" "$MIRROR"

install -m 0755 "$kubelet" "$root/usr/local/bin/kubelet"
# containerd's version: the image disk (containerd's store) is cached by it
mkdir -p "$dst.tmp"
chroot "$root" dpkg-query -W -f='${Version}' containerd > "$dst.tmp/containerd.version"
install -m 0755 "$init_script" "$root/sbin/node-init"
mkdir -p "$root/usr/lib/modules"
cp -a "$kroot/usr/lib/modules/$kver" "$root/usr/lib/modules/"
depmod -b "$root" "$kver" 2>/dev/null || depmod -b "$root/usr" "$kver" 2>/dev/null || true
# containerd: cgroupfs (no systemd in the guest), the locally imported pause
# image, Debian's CNI plugin directory.
mkdir -p "$root/etc/containerd" "$root/etc/cni/net.d" "$root/var/lib/kubelet" "$root/etc/kubernetes"
cat > "$root/etc/containerd/config.toml" <<'EOF'
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
EOF
# the rootfs image: sparse, 3 GiB (containerd's images live on their own disk)
rm -f "$dst.tmp/rootfs.ext4"
mke2fs -q -t ext4 -L noderoot -d "$root" "$dst.tmp/rootfs.ext4" 3G

# initramfs: busybox, virtio_blk (decompressed: busybox insmod), /init
ird="$work/initrd"
mkdir -p "$ird/bin" "$ird/dev" "$ird/proc" "$ird/sys" "$ird/newroot" "$ird/lib"
cp "$busybox" "$ird/bin/busybox"
for a in sh mount umount mkdir cp switch_root insmod sleep echo cat ls; do ln -s busybox "$ird/bin/$a"; done
xz -dc "$kroot/usr/lib/modules/$kver/kernel/drivers/block/virtio_blk.ko.xz" > "$ird/lib/virtio_blk.ko"
cat > "$ird/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
insmod /lib/virtio_blk.ko
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; sleep 2; echo o > /proc/sysrq-trigger; }
# the rig's per-boot files (config, certificates, manifests), appended as a cpio
[ -d /node ] && mkdir -p /newroot/etc/node && cp -a /node/. /newroot/etc/node/
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/node-init
EOF
chmod 755 "$ird/init"
(cd "$ird" && find . | sort | cpio -o -H newc --quiet) > "$dst.tmp/initrd.cpio"
ln -sf "$kroot/boot/vmlinuz-$kver" "$dst.tmp/kernel"
rm -rf "$dst"
mv "$dst.tmp" "$dst"
touch "$dst/.done"
ln -sfn "$stamp" "$out/current"
echo "build-node-rootfs: $dst ($(du -sm --apparent-size "$dst/rootfs.ext4" | cut -f1) MiB apparent," \
  "$(du -sm "$dst/rootfs.ext4" | cut -f1) MiB used) in $((SECONDS - start))s"
