#!/usr/bin/env bash
# Regenerate the CSI Python stubs from proto/csi.proto.
# Usage: scripts/gen-proto.sh [OUTDIR]   (default: csi_spdk/proto)
# tests/unit/test_proto_stubs.py runs this into a temp dir and fails when the
# committed stubs differ, so run it after editing proto/csi.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-csi_spdk/proto}
mkdir -p "$out"
python3 -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" proto/csi.proto
# protoc emits an absolute import; the stubs live inside a package.
sed -i 's/^import csi_pb2 as csi__pb2$/from . import csi_pb2 as csi__pb2/' "$out/csi_pb2_grpc.py"
