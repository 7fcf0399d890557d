#!/usr/bin/env bash
# Build the driver's OCI image without a Docker engine (no base image can be
# pulled here):
#   1. the project's wheel and its dependencies' wheels (pip wheel, from PyPI);
#   2. a Debian root filesystem with mmdebstrap: the Dockerfile's apt packages
#      at the Dockerfile's pinned versions (one list, read from the Dockerfile)
#      plus python3; the wheels installed offline into a venv at /opt/csi-spdk;
#      docs, man pages, locales, apt lists and nvme-cli's random
#      /etc/nvme/host{nqn,id} removed; every mtime set to the commit's time;
#      every module (the standard library's and the venv's) byte-compiled
#      with unchecked-hash pycs: the containers run with a read-only root, so
#      a missing or mtime-stale .pyc would be compiled again at every start
#      (the stdlib's own top-level pycs were missing: a TCG node spent tens of
#      seconds of CPU per Python start); unchecked-hash pycs do not depend on
#      mtimes and are never re-validated, which suits an immutable image;
#   3. packed as one layer with umoci into an OCI image layout.
# Reproducible: the same commit (and the same Debian mirror state) gives the
# same manifest digest (SOURCE_DATE_EPOCH = the commit time; the package is
# built from `git archive HEAD`, so uncommitted edits do not leak in).
#
#   scripts/build-image.sh [OUT_DIR]    (default: <repo>/.cache/image)
#
# Prints the image's manifest digest and sizes. Output: OUT_DIR/oci (layout,
# tag csi-spdk:<version>) and OUT_DIR/csi-spdk-<version>.oci.tar.
# Needs root (mmdebstrap --mode=root, umoci unpack). Installs mmdebstrap and
# umoci with apt when missing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/.cache/image}"
SUITE=trixie
# The image's Python (Debian 13's python3) and the wheels' tags: binary
# dependencies are fetched for it, not for the Python running this script.
IMAGE_PY=3.13
MIRROR="${CSI_SPDK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
start=$SECONDS

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
missing=()
for p in mmdebstrap umoci; do command -v "$p" >/dev/null || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-image: apt-get install ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n1)"
revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}"
created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
# The Dockerfile's packages, pinned there: "  name=version \" lines.
mapfile -t pkgs < <(sed -n '/apt-get install/,/apt-get clean/ s/^ *\([a-z0-9][a-z0-9.+-]*=[^ ]*\) *\\$/\1/p' \
  "$repo/Dockerfile")
[ ${#pkgs[@]} -gt 0 ] || { echo "build-image: no pinned packages found in the Dockerfile" >&2; exit 1; }

work="$(mktemp -d /tmp/csi-spdk-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "build-image: csi-spdk $version ($revision), Debian $SUITE, packages: python3 ${pkgs[*]}"

# The commit, not the working tree: the revision label names what is inside.
src="$repo"
if [ "$revision" != unknown ]; then
  src="$work/src"
  mkdir -p "$src"
  git -C "$repo" archive HEAD | tar -x -C "$src"
  if [ -n "$(git -C "$repo" status --porcelain -- csi_spdk pyproject.toml README.md)" ]; then
    echo "build-image: note: uncommitted changes to the package are not in the image" \
      "(it is built from $revision)" >&2
  fi
fi
echo "build-image: wheels (pip wheel of the package; its dependencies as Python $IMAGE_PY wheels)"
"$PY" -m pip wheel -q --no-deps --disable-pip-version-check --wheel-dir "$work/wheels" "$src"
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
  --python-version "$IMAGE_PY" --implementation cp --abi "cp${IMAGE_PY/./}" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/wheels" "$work"/wheels/csi_spdk-*.whl

echo "build-image: root filesystem (mmdebstrap; about a minute)"
rootfs="$work/bundle/rootfs"
mkdir -p "$work/bundle"
# Hooks run on the host with $1 = the root filesystem; chroot steps under env -i
# so the host's PIP_*/PYTHON* variables stay out.
mmdebstrap --mode=root --variant=minbase --quiet \
  --include="python3,python3-venv,$(IFS=,; echo "${pkgs[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp $work/wheels/*.whl \"\$1/tmp/wheels/\"" \
  --customize-hook='chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin python3 -m venv /opt/csi-spdk' \
  --customize-hook="chroot \"\$1\" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /opt/csi-spdk/bin/pip install -q --disable-pip-version-check --no-index --no-compile --find-links /tmp/wheels csi-spdk==$version" \
  --customize-hook='chroot "$1" env -i /opt/csi-spdk/bin/pip uninstall -q -y pip setuptools' \
  --customize-hook='chroot "$1" env -i /opt/csi-spdk/bin/python -m compileall -q -f --invalidation-mode unchecked-hash /opt/csi-spdk/lib' \
  --customize-hook='ln -s /opt/csi-spdk/bin/csi-spdk "$1/usr/local/bin/csi-spdk"' \
  --customize-hook='echo "csi:x:65532:65532:csi-spdk controller:/nonexistent:/usr/sbin/nologin" >> "$1/etc/passwd"; echo "csi:x:65532:" >> "$1/etc/group"' \
  --customize-hook='rm -rf "$1"/tmp/wheels "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/* "$1"/etc/nvme/hostnqn "$1"/etc/nvme/hostid "$1"/var/cache/ldconfig/aux-cache "$1"/var/lib/dpkg/*-old "$1"/etc/machine-id; : > "$1/etc/machine-id"' \
  --customize-hook="chroot \"\$1\" env -i /usr/bin/python3 -m compileall -q -f --invalidation-mode unchecked-hash /usr/lib/python$IMAGE_PY >/dev/null" \
  "$SUITE" "$rootfs" "$MIRROR"
# Only what the commit says may differ: every mtime is the commit's.
find "$rootfs" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
du_root="$(du -sm "$rootfs" | cut -f1)"

echo "build-image: OCI layout (umoci)"
tag="csi-spdk:$version"
# The name the chart's image.repository defaults to.
IMAGE_NAME="${CSI_SPDK_IMAGE_NAME:-ghcr.io/csi-spdk/csi-spdk}"
rm -rf "$out/oci"
mkdir -p "$out"
umoci init --layout "$out/oci"
umoci new --image "$out/oci:$version"
# An empty bundle for the new image, with our root filesystem in it; repack
# turns the difference into one layer.
mv "$rootfs" "$work/rootfs.built"
umoci unpack --image "$out/oci:$version" "$work/bundle"
rm -rf "$work/bundle/rootfs"
mv "$work/rootfs.built" "$work/bundle/rootfs"
touch --date="@$SOURCE_DATE_EPOCH" "$work/bundle/rootfs"
umoci repack --image "$out/oci:$version" --history.created "$created" \
  --history.created_by "scripts/build-image.sh ($revision)" "$work/bundle"
umoci config --image "$out/oci:$version" --no-history --created "$created" \
  --config.entrypoint /usr/local/bin/csi-spdk --config.cmd --help \
  --config.env PATH=/opt/csi-spdk/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.workingdir / \
  --config.label org.opencontainers.image.title=csi-spdk \
  --config.label org.opencontainers.image.version="$version" \
  --config.label org.opencontainers.image.revision="$revision" \
  --config.label org.opencontainers.image.licenses=Apache-2.0 \
  --config.label org.opencontainers.image.base.name="debian:$SUITE (mmdebstrap)"
umoci gc --layout "$out/oci"
# Name the manifest as the chart's values do (io.containerd.image.name): the
# archive then imports under that name with `ctr -n k8s.io images import`,
# `kind load image-archive` or `podman load`, no registry involved.
"$PY" - "$out/oci/index.json" "$IMAGE_NAME:$version" <<'PYEOF'
import json, sys
path, name = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
json.dump(index, open(path, "w"), separators=(",", ":"))
PYEOF
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
  -cf "$out/csi-spdk-$version.oci.tar" -C "$out/oci" .

manifest="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$out/oci/index.json")"
layer_mb="$(du -sm "$out/oci/blobs" | cut -f1)"
echo "$manifest" > "$out/digest"
echo "build-image: $tag manifest $manifest; root filesystem ${du_root} MiB, image ${layer_mb} MiB compressed; $((SECONDS - start))s"
