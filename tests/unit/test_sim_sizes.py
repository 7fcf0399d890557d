"""Huge size arguments: answered like SPDK v25.09, in bounded memory and time.

SPDK computes ``size_in_mib * 1024 * 1024`` and the cluster count with u64
arithmetic that wraps, and keeps 8 bytes per cluster of a blob in memory.
The simulator must give the same answers without building per-cluster
structures first (it once grew to 24 GB on a 1 PiB ``bdev_lvol_resize``).
Each case runs in a child process whose address space is capped at 1 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("CSI_SPDK_TEST_RPC")),
    reason="in-process simulator under a memory rlimit (no real target involved)")

U64_MAX = (1 << 64) - 1
PIB_MIB = 1 << 30
ENOSPC = {"code": -32602, "message": "No space left on device"}
ENOMEM = {"code": -32602, "message": "Cannot allocate memory"}

CHILD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from csi_spdk.sim import RpcError, SimServer
    server = SimServer(None, sys.argv[1])
    server.call("bdev_malloc_create", {"name": "m0", "num_blocks": 65536, "block_size": 4096})
    server.call("bdev_lvol_create_lvstore", {"bdev_name": "m0", "lvs_name": "lvs0",
                                             "cluster_sz": int(sys.argv[2])})
    out = []
    for method, params in json.loads(sys.stdin.read()):
        try:
            out.append({"result": server.call(method, params)})
        except RpcError as err:
            out.append({"error": {"code": err.code, "message": err.message}})
    print(json.dumps(out))
""")


def run(tmp_path: Path, calls: list[tuple[str, dict | None]], cluster: int = 4 << 20) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "data"), str(cluster)],
                          input=json.dumps(calls), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def create(name: str, mib: int, thin: bool) -> tuple[str, dict | None]:
    return ("bdev_lvol_create", {"lvs_name": "lvs0", "lvol_name": name, "size_in_mib": mib,
                                 "thin_provision": thin})


def blocks(name: str) -> tuple[str, dict | None]:
    return ("bdev_get_bdevs", {"name": f"lvs0/{name}"})


def test_thick_huge_sizes_are_enospc(tmp_path: Path) -> None:
    # 2^63 - 1 MiB is 2^64 - 1 MiB bytes after the wrap; with 4 MiB clusters the
    # round-up wraps too, to 0 clusters: SPDK creates an empty thick lvol.
    got = run(tmp_path, [create("a", PIB_MIB, False), create("c", 1 << 40, False),
                         ("bdev_lvol_get_lvstores", None), create("b", (1 << 63) - 1, False),
                         blocks("b")])
    assert got[:2] == [{"error": ENOSPC}] * 2
    lvs = got[2]["result"][0]
    assert lvs["free_clusters"] == lvs["total_data_clusters"]
    assert got[4]["result"][0]["num_blocks"] == 0


def test_thin_sizes_wrap_like_spdk_u64_arithmetic(tmp_path: Path) -> None:
    # 4 MiB clusters: 1 PiB thin is 2^28 clusters (fine); 2^44 MiB is 0 bytes;
    # 2^44 + 1 MiB is 1 MiB -> one cluster; 2^64 - 1 MiB is 2^64 - 1 MiB bytes,
    # and rounding up to a cluster wraps past 2^64 to 0 clusters.
    got = run(tmp_path, [create("p", PIB_MIB, True), blocks("p"),
                         create("z", 1 << 44, True), blocks("z"),
                         create("o", (1 << 44) + 1, True), blocks("o"),
                         create("w", U64_MAX, True), blocks("w")])
    assert all("result" in g for g in got), got
    sizes = [g["result"][0]["num_blocks"] * 4096 for g in got[1::2]]
    assert sizes == [1 << 50, 0, 4 << 20, 0]


def test_thin_cluster_array_too_big_is_enomem(tmp_path: Path) -> None:
    # 1 MiB clusters: 2^64 - 1 MiB rounds to 2^44 - 1 clusters, an array of
    # 128 TiB that no host can allocate.
    got = run(tmp_path, [create("w", U64_MAX, True), create("x", (1 << 63) - 1, True),
                         ("bdev_lvol_get_lvols", None)], cluster=1 << 20)
    assert got[:2] == [{"error": ENOMEM}] * 2
    assert got[2] == {"result": []}


def test_resize_and_inflate_to_huge_sizes(tmp_path: Path) -> None:
    got = run(tmp_path, [
        create("t", 8, True), create("k", 8, False),
        ("bdev_lvol_resize", {"name": "lvs0/k", "size_in_mib": PIB_MIB}),      # thick: ENOSPC
        ("bdev_lvol_resize", {"name": "lvs0/k", "size_in_mib": 1 << 40}),
        ("bdev_lvol_resize", {"name": "lvs0/t", "size_in_mib": PIB_MIB}),      # thin: fine
        blocks("t"),
        ("bdev_lvol_inflate", {"name": "lvs0/t"}),                              # 2^28 clusters
        ("bdev_lvol_snapshot", {"lvol_name": "lvs0/t", "snapshot_name": "s"}),
        ("bdev_lvol_decouple_parent", {"name": "lvs0/t"}),                      # nothing to copy
        ("bdev_lvol_resize", {"name": "lvs0/t", "size_in_mib": U64_MAX}),      # wraps to 0
        blocks("t"), blocks("k"),
    ])
    assert got[0:2] == [{"result": got[0]["result"]}, {"result": got[1]["result"]}]
    assert got[2:4] == [{"error": ENOSPC}] * 2
    assert got[4] == {"result": True}
    assert got[5]["result"][0]["num_blocks"] * 4096 == 1 << 50
    assert got[6] == {"error": ENOSPC}
    assert "result" in got[7] and got[8] == {"result": True}
    assert got[9] == {"result": True}
    assert got[10]["result"][0]["num_blocks"] == 0
    assert got[11]["result"][0]["num_blocks"] * 4096 == 8 << 20
