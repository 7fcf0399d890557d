#!/usr/bin/env bash
# Install everything the driver and its tests need on a fresh Debian 12
# machine (idempotent, quick when already done):
#   - the package itself (editable) with its test extras, into the project
#     venv .venv (scripts/venv.sh; never into the system python)
#   - csi-sanity (Go module proxy)
#   - Debian tools the node plugin tests use (mkfs, blkid, losetup)
#   - the QEMU guest rig, the deploy check tools and the Kubernetes PVC rig
#     (tests/e2e/k8s: scripts/install-k8s.sh, a long cold build), the cluster
#     rig's node disk (tests/e2e/cluster, with CSI_SPDK_CLUSTER=1:
#     scripts/build-node-rootfs.sh), via their own scripts
# Usage: scripts/setup.sh [--no-guest] [--no-deploy] [--no-k8s]
set -euo pipefail
cd "$(dirname "$0")/.."
# mkfs, losetup, blkid live in /sbin and /usr/sbin, which a bare PATH lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin:/sbin" ;; esac
guest=1 deploy=1 k8s=1
for a in "$@"; do
  case "$a" in
    --no-guest) guest=0 ;;
    --no-deploy) deploy=0 ;;
    --no-k8s) k8s=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

CSI_SANITY_VERSION=v5.4.0
# Go lives in /usr/local/go on these machines; it may not be on a CI PATH.
[ -d /usr/local/go/bin ] && export PATH="/usr/local/go/bin:$PATH"
export PATH="$(go env GOPATH)/bin:$PATH"

need_apt=()
for tool in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs losetup:mount blkid:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "setup: python package and test dependencies (venv .venv)"
. scripts/venv.sh
csi_spdk_venv test   # exports PATH, VIRTUAL_ENV and PYTHON for the scripts below

if ! csi-sanity --ginkgo.dry-run >/dev/null 2>&1 || \
   [ "$(cat "$(go env GOPATH)/bin/.csi-sanity-version" 2>/dev/null)" != "$CSI_SANITY_VERSION" ]; then
  echo "setup: go install csi-sanity@$CSI_SANITY_VERSION (compiles from the module proxy:" \
    "a minute or two cold)"
  start=$SECONDS
  (cd /tmp && go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION")
  echo "setup: csi-sanity built in $((SECONDS - start))s"
  echo "$CSI_SANITY_VERSION" > "$(go env GOPATH)/bin/.csi-sanity-version"
fi

if [ "$guest" = 1 ] && [ -x scripts/install-guest-deps.sh ]; then
  scripts/install-guest-deps.sh
fi
if [ "$deploy" = 1 ] && [ -x scripts/install-deploy-tools.sh ]; then
  scripts/install-deploy-tools.sh
fi
if [ "$k8s" = 1 ] && [ -x scripts/install-k8s.sh ]; then
  echo "setup: the Kubernetes PVC rig (scripts/install-k8s.sh; ~24 min the first time," \
    "skip with --no-k8s)"
  scripts/install-k8s.sh
  if [ "$guest" = 1 ] && [ "${CSI_SPDK_CLUSTER:-}" = 1 ] && [ -x scripts/build-node-rootfs.sh ]; then
    echo "setup: the cluster rig's Debian 13 node disk (scripts/build-node-rootfs.sh;" \
      "~4 min the first time)"
    scripts/build-node-rootfs.sh
  fi
fi
echo "setup: done"
