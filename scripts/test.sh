#!/usr/bin/env bash
# The project's test command: set up a fresh machine, then run the whole
# suite (lint, unit, simulator contract, csi-sanity, deploy checks, QEMU
# guest tests). Extra arguments go to pytest, e.g. scripts/test.sh tests/unit
# Env: CSI_SPDK_TEST_RPC=/path/spdk.sock runs the SPDK-backed tests against
# that real spdk_tgt instead of the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
# mkfs, losetup, blkid live in /sbin and /usr/sbin, which a bare PATH lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin:/sbin" ;; esac
scripts/setup.sh
# Everything below runs from the project venv setup.sh made (.venv): pytest's
# interpreter, the `csi-spdk` and `python3` the tests spawn.
. scripts/venv.sh
csi_spdk_venv test
[ -d /usr/local/go/bin ] && export PATH="/usr/local/go/bin:$PATH"
export PATH="$(go env GOPATH)/bin:$PATH"
# One driver image build for the session: tests/e2e/cluster (the images its
# nodes import) and tests/image share it, keyed by the committed inputs of
# scripts/build-image.sh (it builds HEAD).
if [ -z "${CSI_SPDK_IMAGE_DIR:-}" ] && git rev-parse -q HEAD >/dev/null 2>&1; then
  key="$(for p in csi_spdk pyproject.toml README.md Dockerfile scripts/build-image.sh; do
           git rev-parse "HEAD:$p"; done | sha256sum | cut -c1-16)"
  export CSI_SPDK_IMAGE_DIR="$PWD/.cache/image-$key"
fi
echo "== ruff"
ruff check .
echo "== pytest"
exec "$PYTHON" -m pytest -ra "${@:-tests}"
