#!/usr/bin/env bash
# Regenerate the Python stubs from proto/csi.proto (CSI) and proto/agent.proto
# (the storage agent's API).
# Usage: scripts/gen-proto.sh [OUTDIR]   (default: csi_spdk/proto)
# tests/unit/test_proto.py runs this into a temp dir and fails when the
# committed stubs differ, so run it after editing a .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-csi_spdk/proto}
mkdir -p "$out"
for name in csi agent pluginregistration; do
  python3 -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" \
    "proto/$name.proto"
  # protoc emits an absolute import; the stubs live inside a package.
  sed -i "s/^import ${name}_pb2 as ${name}__pb2\$/from . import ${name}_pb2 as ${name}__pb2/" \
    "$out/${name}_pb2_grpc.py"
done
