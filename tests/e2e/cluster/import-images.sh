#!/bin/bash
# Fill a node's image disk (containerd's /var/lib/containerd) on the host:
# the node root disk's own containerd and ctr run in a chroot of it (loop
# mounted read-only) and import the OCI archive into the k8s.io namespace,
# as `ctr -n k8s.io images import` on the node would -- at native speed
# (inside a TCG guest the same import takes 15+ minutes).
#   import-images.sh ROOT_DISK IMAGE_DISK ARCHIVE
# Needs root, loop devices and overlayfs (the snapshotter). Everything it
# mounts is unmounted on exit.
set -euo pipefail
root="$1" disk="$2" archive="$3"
m="$(mktemp -d /tmp/csi-spdk-import.XXXXXX)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  for d in mnt var/lib/containerd var/lib run tmp dev sys proc; do
    umount -R "$m/$d" 2>/dev/null || umount -l "$m/$d" 2>/dev/null || true
  done
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  rmdir "$m" 2>/dev/null || true
}
trap cleanup EXIT
mount -o loop,ro "$root" "$m"
mount -t proc proc "$m/proc"
mount -t sysfs sys "$m/sys"
mount --rbind /dev "$m/dev"
mount --make-rslave "$m/dev"
mount -t tmpfs tmpfs "$m/run"
mount -t tmpfs tmpfs "$m/tmp"
mount -t tmpfs tmpfs "$m/var/lib"
mkdir "$m/var/lib/containerd"
mount -o loop "$disk" "$m/var/lib/containerd"
mount --bind "$(dirname "$archive")" "$m/mnt"
chroot "$m" containerd --config /etc/containerd/config.toml > "$(dirname "$disk")/containerd-import.log" 2>&1 &
pid=$!
for _ in $(seq 150); do chroot "$m" ctr version >/dev/null 2>&1 && break; sleep 0.2; done
chroot "$m" ctr -n k8s.io images import "/mnt/$(basename "$archive")"
chroot "$m" ctr -n k8s.io images ls -q
