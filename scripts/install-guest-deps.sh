#!/usr/bin/env bash
# Install what the QEMU test guest needs (tests/e2e/guest) on a Debian 12 host:
# qemu (TCG only, no KVM needed), socat and nvme-cli (the key-format unit test
# compares with its gen-dhchap-key) on the host, and -- never installed
# on the host -- a Debian 13 (trixie) guest: its 6.12 cloud kernel (in-band
# NVMe auth, NVMe/TCP TLS, kernel nvmet with auth and TLS) and the userland
# copied into the guest's initramfs (busybox-static, nvme-cli 2.13 + libnvme,
# tlshd from ktls-utils, keyutils, cryptsetup, e2fsprogs, xfsprogs, util-linux,
# kmod, socat, iproute2) with the shared libraries of those and of the host's
# Python (glibc is backward compatible, so the host's Python runs on trixie's).
#
# Trixie packages come through a private apt configuration under the cache
# (its own sources list, lists and an empty dpkg status, so apt resolves the
# whole dependency closure) and are unpacked with dpkg-deb -x: the host's apt
# sources and dpkg database are not touched.
#
#   scripts/install-guest-deps.sh [CACHE_DIR]     (default: <repo>/.cache/guest)
#
# Layout: CACHE_DIR/trixie/{apt,kernel,root}. Idempotent and fast when done
# (a stamp records the package list). Prints the kernel dir at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-${CSI_SPDK_GUEST_CACHE:-$repo/.cache/guest}}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

host_pkgs=(qemu-system-x86 socat cpio kmod debian-archive-keyring nvme-cli)
missing=()
for p in "${host_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-guest-deps: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# The guest's userland (and the libraries the host's Python and its extension
# modules load: ssl, ffi, sqlite, readline, stdc++, udev for pyudev).
guest_pkgs=(busybox-static nvme-cli ktls-utils keyutils cryptsetup-bin e2fsprogs xfsprogs
            util-linux mount kmod socat iproute2 libssl3t64 libffi8 zlib1g libbz2-1.0 liblzma5
            libsqlite3-0 libreadline8t64 libncursesw6 libuuid1 libexpat1 libstdc++6 libudev1)
kernel_meta=linux-image-cloud-amd64
stamp_want="trixie ${guest_pkgs[*]} $kernel_meta v1"
t="$cache/trixie"
if [ -e "$t/.done" ] && [ "$(cat "$t/.done")" = "$stamp_want" ]; then
  kver="$(ls "$t/kernel/usr/lib/modules" | head -n1)"
  echo "$t/kernel $kver"
  exit 0
fi

echo "install-guest-deps: fetching the Debian 13 (trixie) guest into $t" >&2
mkdir -p "$t/apt/lists/partial" "$t/apt/archives/partial" "$t/apt/cache" "$t/apt/parts"
: > "$t/apt/status"
cat > "$t/apt/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
EOF
apt_opts=(
  -o "Dir::Etc::sourcelist=$t/apt/sources.list" -o "Dir::Etc::sourceparts=$t/apt/parts"
  -o "Dir::Etc::preferencesparts=$t/apt/parts" -o "Dir::State::Lists=$t/apt/lists"
  -o "Dir::State::status=$t/apt/status" -o "Dir::Cache=$t/apt/cache"
  -o "Dir::Cache::archives=$t/apt/archives" -o "Acquire::Languages=none"
  -o "APT::Install-Recommends=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -qq update
rm -f "$t/apt/archives"/*.deb
apt-get "${apt_opts[@]}" -qq -y install --download-only "${guest_pkgs[@]}" >/dev/null

# Userland: every package of the closure unpacked into one tree (no maintainer scripts).
rm -rf "$t/root.tmp"
mkdir -p "$t/root.tmp"
for deb in "$t/apt/archives"/*.deb; do
  dpkg-deb -x "$deb" "$t/root.tmp"
done
rm -rf "$t/root"
mv "$t/root.tmp" "$t/root"

# The kernel: resolve the versioned package behind the metapackage, unpack it.
pkg="$(apt-cache "${apt_opts[@]}" depends "$kernel_meta" \
        | awk '/Depends: linux-image-/{print $2; exit}')"
[ -n "$pkg" ] || { echo "install-guest-deps: cannot resolve $kernel_meta" >&2; exit 1; }
echo "install-guest-deps: fetching $pkg" >&2
tmp="$(mktemp -d)"; chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get "${apt_opts[@]}" -qq download "$pkg" >/dev/null)
rm -rf "$t/kernel"
mkdir -p "$t/kernel"
dpkg-deb -x "$tmp"/*.deb "$t/kernel"
kver="$(ls "$t/kernel/usr/lib/modules" | head -n1)"
# depmod -b wants BASE/lib/modules; trixie ships /usr/lib/modules.
ln -sfn usr/lib "$t/kernel/lib"
depmod -b "$t/kernel" "$kver"
rm -f "$t/apt/archives"/*.deb
echo "$stamp_want" > "$t/.done"
echo "$t/kernel $kver"
