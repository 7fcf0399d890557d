"""Simulator behaviour the golden transcripts do not pin but the driver relies on.

The tests marked ``real_spdk`` only use public JSON-RPC methods and unique
names, so they also run against a real target (CSI_SPDK_TEST_RPC).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_spdk.sim import SimServer
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkError

MIB = 1 << 20
REAL = bool(os.environ.get("CSI_SPDK_TEST_RPC"))


@pytest.fixture
def sim(short_tmp: Path) -> Iterator[SimServer]:
    server = SimServer(str(short_tmp / "spdk.sock"), str(short_tmp / "data")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(spdk_rpc: str) -> Iterator[SpdkClient]:
    with SpdkClient(spdk_rpc, timeout=30) as c:
        yield c


def _lvstore(c: SpdkClient, cluster_mib: int = 1, size_mib: int = 256) -> tuple[str, str]:
    """A malloc-backed lvstore with unique names; returns (malloc, lvs)."""
    tag = uuid.uuid4().hex[:8]
    malloc, lvs = f"M{tag}", f"lvs{tag}"
    c.call("bdev_malloc_create", {"name": malloc, "num_blocks": size_mib * 256,
                                  "block_size": 4096})
    c.call("bdev_lvol_create_lvstore", {"bdev_name": malloc, "lvs_name": lvs,
                                        "cluster_sz": cluster_mib * MIB})
    return malloc, lvs


def _free(c: SpdkClient, lvs: str) -> int:
    return c.call("bdev_lvol_get_lvstores", {"lvs_name": lvs})[0]["free_clusters"]


def _allocated(c: SpdkClient, name: str) -> int:
    bdev = c.call("bdev_get_bdevs", {"name": name})[0]
    return bdev["driver_specific"]["lvol"]["num_allocated_clusters"]


@pytest.mark.real_spdk
def test_concurrent_create_delete_keeps_accounting(client: SpdkClient) -> None:
    malloc, lvs = _lvstore(client)
    total = _free(client, lvs)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with SpdkClient(client.address, timeout=30) as c:
                for i in range(5):
                    name = f"{lvs}/t{n}-{i}"
                    c.call("bdev_lvol_create", {"lvol_name": f"t{n}-{i}", "size_in_mib": 2,
                                                "lvs_name": lvs, "thin_provision": i % 2 == 0})
                    if i % 2:
                        c.call("bdev_lvol_delete", {"name": name})
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lvols = client.call("bdev_lvol_get_lvols", {"lvs_name": lvs})
    assert len(lvols) == 8 * 3                      # the thin ones survive
    assert _free(client, lvs) == total              # thin lvols own nothing
    for lv in lvols:
        client.call("bdev_lvol_delete", {"name": lv["uuid"]})
    client.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
    client.call("bdev_malloc_delete", {"name": malloc})


def test_concurrent_thick_creates_never_overcommit(sim: SimServer) -> None:
    c = SpdkClient(sim.socket_path or "", timeout=30)
    _, lvs = _lvstore(c)
    total = _free(c, lvs)
    ok: list[str] = []
    nospace: list[str] = []

    def worker(n: int) -> None:
        with SpdkClient(sim.socket_path or "", timeout=30) as cc:
            try:
                ok.append(cc.call("bdev_lvol_create", {"lvol_name": f"v{n}", "size_in_mib": 20,
                                                       "lvs_name": lvs}))
            except SpdkError:
                nospace.append(str(n))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == total // 20 and len(nospace) == 20 - len(ok)
    assert _free(c, lvs) == total - 20 * len(ok)
    c.close()


def test_thin_write_allocates_touched_clusters(sim: SimServer) -> None:
    c = SpdkClient(sim.socket_path or "")
    _, lvs = _lvstore(c)
    total = _free(c, lvs)
    vol = c.call("bdev_lvol_create", {"lvol_name": "v", "size_in_mib": 16, "lvs_name": lvs,
                                      "thin_provision": True})
    sim.write(vol, MIB - 10, b"x" * 20)             # straddles clusters 0 and 1
    assert _allocated(c, vol) == 2 and _free(c, lvs) == total - 2
    sim.write(vol, 0, b"y" * 100)                   # already allocated
    assert _allocated(c, vol) == 2
    assert c.call("sim_bdev_write", {"name": f"{lvs}/v", "offset": 5 * MIB, "length": 4096,
                                     "pattern": 7})
    assert _allocated(c, vol) == 3
    assert sim.read(vol, 5 * MIB, 2) == b"\x07\x07"
    c.close()


def test_clone_presents_snapshot_data_and_copies_on_write(sim: SimServer) -> None:
    c = SpdkClient(sim.socket_path or "")
    _, lvs = _lvstore(c)
    total = _free(c, lvs)
    vol = c.call("bdev_lvol_create", {"lvol_name": "v", "size_in_mib": 8, "lvs_name": lvs,
                                      "thin_provision": True})
    sim.write(vol, 0, b"A" * (2 * MIB))
    snap = c.call("bdev_lvol_snapshot", {"lvol_name": vol, "snapshot_name": "s"})
    clone = c.call("bdev_lvol_clone", {"snapshot_name": snap, "clone_name": "c"})
    assert _allocated(c, snap) == 2 and _allocated(c, vol) == 0 and _allocated(c, clone) == 0
    assert sim.read(clone, 0, 4) == b"AAAA"         # clone shows the snapshot's data
    sim.write(clone, 100, b"B")                     # COW of cluster 0 only
    assert _allocated(c, clone) == 1 and _free(c, lvs) == total - 3
    assert sim.read(clone, 99, 3) == b"ABA"
    assert sim.read(vol, 99, 3) == b"AAA"           # origin unaffected
    assert sim.read(snap, 100, 1) == b"A"
    # The backing file of the clone is a complete image (for a kernel data plane).
    lvol_file = next(Path(sim.data_dir).rglob(f"{clone}.img"))
    with open(lvol_file, "rb") as f:
        assert f.read(4) == b"AAAA"
    # Snapshots are read-only.
    with pytest.raises(Exception, match="Operation not permitted"):
        sim.write(snap, 0, b"x")
    # Inflate copies everything; decouple only the parent's allocated clusters.
    c.call("bdev_lvol_decouple_parent", {"name": vol})
    assert _allocated(c, vol) == 2
    c.call("bdev_lvol_inflate", {"name": clone})
    assert _allocated(c, clone) == 8
    c.close()


def test_delete_snapshot_merges_into_only_clone(sim: SimServer) -> None:
    c = SpdkClient(sim.socket_path or "")
    _, lvs = _lvstore(c)
    vol = c.call("bdev_lvol_create", {"lvol_name": "v", "size_in_mib": 8, "lvs_name": lvs,
                                      "thin_provision": True})
    sim.write(vol, 0, b"A" * (3 * MIB))
    snap = c.call("bdev_lvol_snapshot", {"lvol_name": vol, "snapshot_name": "s"})
    sim.write(vol, 0, b"B")                          # cluster 0 now in both
    sim.write(vol, 6 * MIB, b"C")
    free = _free(c, lvs)
    c.call("bdev_lvol_delete", {"name": snap})
    assert _allocated(c, vol) == 4                   # 0 (own), 1, 2 (merged), 6
    assert _free(c, lvs) == free + 1                 # snapshot's copy of cluster 0 freed
    assert sim.read(vol, 0, 2) == b"BA"
    c.close()


def test_write_beyond_free_space_fails(sim: SimServer) -> None:
    c = SpdkClient(sim.socket_path or "")
    _, lvs = _lvstore(c, cluster_mib=4, size_mib=32)
    thin = c.call("bdev_lvol_create", {"lvol_name": "t", "size_in_mib": 1024,
                                       "lvs_name": lvs, "thin_provision": True})
    free = _free(c, lvs)
    for i in range(free):
        sim.write(thin, i * 4 * MIB, b"z")
    with pytest.raises(Exception, match="No space left"):
        sim.write(thin, free * 4 * MIB, b"z")
    c.close()


def test_socket_removed_at_stop(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    server = SimServer(str(sock), None).start()
    data_dir = server.data_dir
    assert sock.exists()
    with SpdkClient(str(sock)) as c:
        assert c.call("spdk_get_version")["version"] == "SPDK v25.09"
    server.stop()
    assert not sock.exists()
    assert not data_dir.exists()                     # temp data dir removed too


@pytest.mark.real_spdk
def test_read_only_lvols_cannot_be_renamed(client: SpdkClient) -> None:
    """Snapshots and read-only lvols keep their names (seen on spdk_tgt v25.09);
    the driver marks deleted snapshots instead of renaming them."""
    malloc, lvs = _lvstore(client)
    try:
        client.call("bdev_lvol_create", {"lvol_name": "v", "size_in_mib": 4, "lvs_name": lvs})
        client.call("bdev_lvol_snapshot", {"lvol_name": f"{lvs}/v", "snapshot_name": "s"})
        client.call("bdev_lvol_create", {"lvol_name": "ro", "size_in_mib": 4, "lvs_name": lvs})
        client.call("bdev_lvol_set_read_only", {"name": f"{lvs}/ro"})
        for old in ("s", "ro"):
            with pytest.raises(SpdkError) as err:
                client.call("bdev_lvol_rename", {"old_name": f"{lvs}/{old}",
                                                 "new_name": f"{old}-renamed"})
            got = (err.value.spdk_code, err.value.spdk_message)
            assert got == (-32602, "Operation not permitted")
        assert client.call("bdev_lvol_rename", {"old_name": f"{lvs}/v", "new_name": "v2"})
        names = sorted(lv["name"] for lv in client.call("bdev_lvol_get_lvols",
                                                        {"lvs_name": lvs}))
        assert names == ["ro", "s", "v2"]
    finally:
        client.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
        client.call("bdev_malloc_delete", {"name": malloc})


@pytest.mark.real_spdk
@pytest.mark.parametrize("thin", [False, True])
def test_metadata_pages_limit_lvol_count(client: SpdkClient, thin: bool) -> None:
    """One metadata page per cluster by default: a thick 1-cluster lvol takes
    two (blob + extent page), a thin unwritten one takes one. Numbers measured
    on spdk_tgt v25.09: 131 thick then ENOSPC, 263 thin then ENOMEM."""
    malloc, lvs = _lvstore(client, cluster_mib=1, size_mib=264)
    try:
        assert _free(client, lvs) == 262
        made = 0
        with pytest.raises(SpdkError) as err:
            while made < 400:
                client.call("bdev_lvol_create", {"lvol_name": f"l{made}", "size_in_mib": 1,
                                                 "lvs_name": lvs, "thin_provision": thin})
                made += 1
        assert made == (263 if thin else 131)
        want = "Cannot allocate memory" if thin else "No space left on device"
        assert (err.value.spdk_code, err.value.spdk_message) == (-32602, want)
        assert _free(client, lvs) == (262 if thin else 131)
    finally:
        client.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
        client.call("bdev_malloc_delete", {"name": malloc})


@pytest.mark.real_spdk
def test_md_pages_ratio_shapes_data_clusters(client: SpdkClient) -> None:
    tag = uuid.uuid4().hex[:8]
    malloc, lvs = f"M{tag}", f"lvs{tag}"
    client.call("bdev_malloc_create", {"name": malloc, "num_blocks": 264 * 256,
                                       "block_size": 4096})
    try:
        client.call("bdev_lvol_create_lvstore", {"bdev_name": malloc, "lvs_name": lvs,
                                                 "cluster_sz": MIB,
                                                 "num_md_pages_per_cluster_ratio": 200})
        assert _free(client, lvs) == 261
        client.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
    finally:
        client.call("bdev_malloc_delete", {"name": malloc})
