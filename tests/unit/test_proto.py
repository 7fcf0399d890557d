"""The committed stubs (CSI and the storage agent's API) are fresh, and
proto/csi.proto is wire-compatible with the official CSI v1.12.0 spec module."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
SPEC_MODULE = "github.com/container-storage-interface/spec@v1.12.0"


def _descriptor_set(proto_dir: Path, tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools
    from grpc_tools import protoc

    out = tmp / f"{proto_dir.name}.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}",
                      f"--descriptor_set_out={out}", str(proto_dir / "csi.proto")])
    assert rc == 0, f"protoc failed on {proto_dir}/csi.proto"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def _wire_shape(fds: descriptor_pb2.FileDescriptorSet) -> dict:
    """Everything that defines the wire format, without comments/options text."""
    (fd,) = [f for f in fds.file if f.name == "csi.proto"]
    shape: dict = {"package": fd.package}

    def messages(prefix: str, msgs) -> None:
        for m in msgs:
            name = f"{prefix}.{m.name}"
            shape[f"message {name}"] = sorted(
                (f.name, f.number, f.type, f.label, f.type_name,
                 f.oneof_index if f.HasField("oneof_index") else -1,
                 f.proto3_optional,
                 tuple(sorted(str(f.options).split())))
                for f in m.field
            )
            shape[f"oneofs {name}"] = [o.name for o in m.oneof_decl]
            for e in m.enum_type:
                shape[f"enum {name}.{e.name}"] = sorted((v.name, v.number) for v in e.value)
            messages(name, m.nested_type)

    messages("", fd.message_type)
    for e in fd.enum_type:
        shape[f"enum .{e.name}"] = sorted((v.name, v.number) for v in e.value)
    for s in fd.service:
        shape[f"service {s.name}"] = sorted(
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in s.method
        )
    for x in fd.extension:
        shape[f"extension {x.extendee}.{x.name}"] = (x.number, x.type)
    return shape


def test_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts/gen-proto.sh"), str(tmp_path)], check=True, cwd=ROOT)
    for name in ("csi_pb2.py", "csi_pb2_grpc.py", "agent_pb2.py", "agent_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, ROOT / "csi_spdk/proto" / name, shallow=False), (
            f"csi_spdk/proto/{name} is stale: run scripts/gen-proto.sh and commit the result"
        )


def _official_proto_dir() -> Path | None:
    override = os.environ.get("CSI_SPEC_DIR")
    if override:
        return Path(override)
    go = shutil.which("go")
    if not go:
        return None
    out = subprocess.run([go, "mod", "download", "-json", SPEC_MODULE],
                         capture_output=True, text=True, cwd="/", check=False,
                         env={**os.environ, "GOFLAGS": "-mod=mod"})
    if out.returncode != 0:
        return None
    import json

    return Path(json.loads(out.stdout)["Dir"])


def test_wire_compatible_with_official_spec(tmp_path: Path) -> None:
    official = _official_proto_dir()
    if official is None:
        if os.environ.get("CI"):
            pytest.fail("cannot download the official CSI spec module (go mod download)")
        pytest.skip("go or the Go module proxy unavailable: cannot fetch the official spec")
    (tmp_path / "official").mkdir()
    shutil.copy(official / "csi.proto", tmp_path / "official" / "csi.proto")
    theirs = _wire_shape(_descriptor_set(tmp_path / "official", tmp_path))
    ours = _wire_shape(_descriptor_set(ROOT / "proto", tmp_path))
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    differ = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k])
    assert not (missing or extra or differ), f"missing={missing} extra={extra} differ={differ}"
    assert len(theirs) > 100  # the comparison really covered the spec
