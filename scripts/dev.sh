#!/usr/bin/env bash
# Install the driver into the project venv (.venv; skipped when pyproject.toml
# has not changed) and run it on its embedded default (the SPDK simulator):
# controller + node plugin + simulator with sockets in /tmp/csi-spdk.
# Extra arguments go to `csi-spdk dev` (e.g. --spdk-rpc /var/tmp/spdk.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
csi_spdk_venv
exec "$PYTHON" -m csi_spdk dev "$@"
