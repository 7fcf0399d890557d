#!/usr/bin/env bash
# Install the driver and run it on its embedded default (the SPDK simulator):
# controller + node plugin + simulator with sockets in /tmp/csi-spdk.
# Extra arguments go to `csi-spdk dev` (e.g. --spdk-rpc /var/tmp/spdk.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e .
exec python3 -m csi_spdk dev "$@"
