#!/usr/bin/env bash
# The project's test command: set up a fresh machine, then run the whole
# suite (lint, unit, simulator contract, csi-sanity, deploy checks, QEMU
# guest tests). Extra arguments go to pytest, e.g. scripts/test.sh tests/unit
# Env: CSI_SPDK_TEST_RPC=/path/spdk.sock runs the SPDK-backed tests against
# that real spdk_tgt instead of the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -d /usr/local/go/bin ] && export PATH="/usr/local/go/bin:$PATH"
export PATH="$(go env GOPATH)/bin:$PATH"
echo "== ruff"
ruff check .
echo "== pytest"
exec python3 -m pytest -ra "${@:-tests}"
