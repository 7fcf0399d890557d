#!/usr/bin/env bash
# Install what the QEMU test guest needs (tests/e2e/guest) on a Debian 12 host:
# qemu (TCG only, no KVM needed), the userland copied into the guest's initramfs
# (busybox-static, nvme-cli, e2fsprogs, xfsprogs, util-linux, kmod, socat), and
# Debian's cloud kernel unpacked into a cache dir (never installed on the host).
#
#   scripts/install-guest-deps.sh [CACHE_DIR]     (default: <repo>/.cache/guest)
#
# Idempotent and fast when everything is there. Prints the kernel dir at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-${CSI_SPDK_GUEST_CACHE:-$repo/.cache/guest}}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

pkgs=(qemu-system-x86 busybox-static nvme-cli e2fsprogs xfsprogs util-linux mount
      kmod socat cpio zstd)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
updated=0
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-guest-deps: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  updated=1
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# The cloud kernel: resolve the current versioned package once, unpack it.
mkdir -p "$cache"
if ! ls "$cache"/kernel/boot/vmlinuz-* >/dev/null 2>&1 || [ ! -e "$cache/kernel/.done" ]; then
  if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 && [ $updated = 0 ]; then
    $sudo apt-get update -qq
  fi
  pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
  [ -n "$pkg" ] || { echo "install-guest-deps: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
  echo "install-guest-deps: fetching $pkg" >&2
  tmp="$(mktemp -d)"; chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null)
  rm -rf "$cache/kernel"
  mkdir -p "$cache/kernel"
  dpkg-deb -x "$tmp"/*.deb "$cache/kernel"
  kver="$(ls "$cache/kernel/lib/modules" | head -n1)"
  depmod -b "$cache/kernel" "$kver"
  touch "$cache/kernel/.done"
fi
kver="$(ls "$cache/kernel/lib/modules" | head -n1)"
echo "$cache/kernel $kver"
