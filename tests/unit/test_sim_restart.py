"""The simulator across a SIGKILL, as spdk_tgt: lvstores on aio bdevs come back
when the aio bdev is created again (examine), RAM and exports do not."""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path

import pytest
from simproc import SimProcess

from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkError, SpdkTransportError

MiB = 1 << 20
NQN = "nqn.2016-06.io.spdk:restart"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


def _write(c: SpdkClient, name: str, offset: int, data: bytes) -> None:
    # in 32 KiB requests: the simulator's framing drops a request that spans
    # more than one 64 KiB read while inside a JSON string
    for at in range(0, len(data), 32768):
        c.call("sim_bdev_write", {"name": name, "offset": offset + at,
                                  "data": base64.b64encode(data[at:at + 32768]).decode()})


def _read(c: SpdkClient, name: str, offset: int, length: int) -> bytes:
    return b"".join(
        base64.b64decode(c.call("sim_bdev_read", {"name": name, "offset": at,
                                                  "length": min(MiB, offset + length - at)}))
        for at in range(offset, offset + length, MiB))


def _lvol_view(c: SpdkClient) -> list[dict]:
    lvols = {lv["uuid"]: lv for lv in c.call("bdev_lvol_get_lvols")}
    out = []
    for uuid, lv in sorted(lvols.items()):
        bdev = c.call("bdev_get_bdevs", {"name": uuid})[0]
        out.append({"lvol": lv, "num_blocks": bdev["num_blocks"],
                    "block_size": bdev["block_size"], "aliases": bdev["aliases"],
                    "lvol_driver": bdev["driver_specific"]["lvol"]})
    return out


def _lvstore_view(c: SpdkClient) -> list[dict]:
    return [{k: v for k, v in lvs.items() if k != "base_bdev"}
            for lvs in c.call("bdev_lvol_get_lvstores")]


@pytest.fixture
def sim(short_tmp: Path):
    p = SimProcess(short_tmp / "spdk.sock", short_tmp / "data")
    yield p
    p.stop()


def _populate(c: SpdkClient, pool: Path) -> dict[str, bytes]:
    """An lvstore on an aio file with thick/thin lvols, a snapshot, a clone, data,
    plus a RAM lvstore and exports, keys and QoS that must all be gone later."""
    c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 4096})
    c.call("bdev_lvol_create_lvstore", {"bdev_name": "aio0", "lvs_name": "pool",
                                        "cluster_sz": MiB})
    thick = c.call("bdev_lvol_create", {"lvs_name": "pool", "lvol_name": "thick",
                                        "size_in_mib": 8})
    thin = c.call("bdev_lvol_create", {"lvs_name": "pool", "lvol_name": "thin",
                                       "size_in_mib": 16, "thin_provision": True})
    data = {thick: os.urandom(200_000), thin: os.urandom(4096)}
    _write(c, thick, 4096, data[thick])
    _write(c, thin, 5 * MiB, data[thin])
    snap = c.call("bdev_lvol_snapshot", {"lvol_name": "pool/thick", "snapshot_name": "snap"})
    clone = c.call("bdev_lvol_clone", {"snapshot_name": "pool/snap", "clone_name": "clone"})
    _write(c, clone, 0, b"clone-data" * 100)
    c.call("bdev_lvol_resize", {"name": thin, "size_in_mib": 24})
    data[snap] = _read(c, snap, 0, 8 * MiB)
    data[clone] = _read(c, clone, 0, 8 * MiB)
    data[thick] = _read(c, thick, 0, 8 * MiB)
    data[thin] = _read(c, thin, 0, 24 * MiB)
    # RAM lvstore, exports, key, QoS: runtime state only
    c.call("bdev_malloc_create", {"name": "ram", "num_blocks": 8192, "block_size": 4096})
    c.call("bdev_lvol_create_lvstore", {"bdev_name": "ram", "lvs_name": "ramlvs",
                                        "cluster_sz": MiB})
    c.call("bdev_lvol_create", {"lvs_name": "ramlvs", "lvol_name": "gone", "size_in_mib": 4})
    c.call("nvmf_create_transport", {"trtype": "TCP"})
    c.call("nvmf_create_subsystem", {"nqn": NQN, "serial_number": "SPDK1",
                                     "model_number": "m"})
    c.call("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": thick}})
    c.call("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
        "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}})
    c.call("nvmf_subsystem_add_host", {"nqn": NQN, "host": HOST})
    c.call("bdev_set_qos_limit", {"name": thin, "rw_ios_per_sec": 10000})
    return data


def test_sigkill_keeps_lvols_on_the_aio_file_and_drops_exports(sim: SimProcess,
                                                               short_tmp: Path) -> None:
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(128 * MiB)
    sim.start()
    with sim.client() as c:
        data = _populate(c, pool)
        lvstores, lvols = _lvstore_view(c), _lvol_view(c)
        assert len(lvols) == 5        # 4 on the pool + 1 on RAM
    sim.kill9()

    sim.start()
    with sim.client() as c:
        # nothing before its base bdev exists again
        assert c.call("bdev_lvol_get_lvstores") == []
        assert c.call("bdev_lvol_get_lvols") == []
        c.call("bdev_aio_create", {"name": "aio-again", "filename": str(pool),
                                   "block_size": 4096})
        c.call("bdev_malloc_create", {"name": "ram", "num_blocks": 8192, "block_size": 4096})
        want_lvs = [lvs for lvs in lvstores if lvs["name"] == "pool"]
        assert _lvstore_view(c) == want_lvs
        assert c.call("bdev_lvol_get_lvstores")[0]["base_bdev"] == "aio-again"
        want_lvols = [v for v in lvols if v["lvol"]["lvs"]["name"] == "pool"]
        for v in want_lvols:
            v["lvol_driver"]["base_bdev"] = "aio-again"
        assert _lvol_view(c) == want_lvols
        by_name = {v["lvol"]["name"]: v["lvol"] for v in want_lvols}
        assert by_name["thick"]["is_clone"] and by_name["clone"]["is_clone"]
        assert by_name["snap"]["is_snapshot"] and not by_name["thin"]["is_clone"]
        for uuid, content in data.items():
            assert _read(c, uuid, 0, len(content)) == content
        # the malloc bdev came back empty: no lvstore on it, no lvol "gone"
        assert [b for b in c.call("bdev_get_bdevs") if b["name"] == "ram"][0]["claimed"] is False
        # exports, keys and QoS are runtime state
        assert c.call("nvmf_get_transports") == []
        assert [s["nqn"] for s in c.call("nvmf_get_subsystems")] == [
            "nqn.2014-08.org.nvmexpress.discovery"]
        assert c.call("keyring_get_keys") == []
        thin = next(v["lvol"]["uuid"] for v in want_lvols if v["lvol"]["name"] == "thin")
        qos = c.call("bdev_get_bdevs", {"name": thin})[0]["assigned_rate_limits"]
        assert set(qos.values()) == {0}
        # the loaded lvstore keeps working: new lvols, cluster accounting
        free = c.call("bdev_lvol_get_lvstores")[0]["free_clusters"]
        c.call("bdev_lvol_create", {"lvs_name": "pool", "lvol_name": "after",
                                    "size_in_mib": 2})
        assert c.call("bdev_lvol_get_lvstores")[0]["free_clusters"] == free - 2


def test_deleted_lvstore_does_not_come_back(sim: SimProcess, short_tmp: Path) -> None:
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(64 * MiB)
    sim.start()
    with sim.client() as c:
        c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 512})
        c.call("bdev_lvol_create_lvstore", {"bdev_name": "aio0", "lvs_name": "pool"})
        c.call("bdev_lvol_create", {"lvs_name": "pool", "lvol_name": "v", "size_in_mib": 4})
        assert pool.read_bytes()[:8] == b"SPDKBLOB"
        c.call("bdev_lvol_delete_lvstore", {"lvs_name": "pool"})
        assert pool.read_bytes()[:4096] == bytes(4096)
    sim.kill9()
    sim.start()
    with sim.client() as c:
        c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 512})
        assert c.call("bdev_lvol_get_lvstores") == []
        assert c.call("bdev_get_bdevs", {"name": "aio0"})[0]["claimed"] is False


def test_aio_delete_unloads_and_recreate_loads_in_one_process(sim: SimProcess,
                                                              short_tmp: Path) -> None:
    """Hot-removing the base bdev unloads the lvstore; its data stays on disk."""
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(64 * MiB)
    sim.start()
    with sim.client() as c:
        c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 512})
        c.call("bdev_lvol_create_lvstore", {"bdev_name": "aio0", "lvs_name": "pool"})
        v = c.call("bdev_lvol_create", {"lvs_name": "pool", "lvol_name": "v",
                                        "size_in_mib": 4})
        _write(c, v, 0, b"kept")
        c.call("bdev_aio_delete", {"name": "aio0"})
        assert c.call("bdev_lvol_get_lvols") == []
        c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 512})
        assert [lv["uuid"] for lv in c.call("bdev_lvol_get_lvols")] == [v]
        assert _read(c, v, 0, 4) == b"kept"


def test_sigkill_during_lvol_churn_leaves_a_loadable_state(sim: SimProcess,
                                                           short_tmp: Path) -> None:
    """Kill -9 while lvols are created and deleted back to back: after restart the
    lvstore loads, every acknowledged creation is there and at most the one in
    flight differs."""
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(256 * MiB)
    sim.start()
    with sim.client() as c:
        c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 512})
        c.call("bdev_lvol_create_lvstore", {"bdev_name": "aio0", "lvs_name": "pool",
                                            "cluster_sz": MiB})
    acked: list[str] = []
    deleted: list[str] = []
    stop = threading.Event()

    def churn() -> None:
        with SpdkClient(str(sim.sock), timeout=5) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.call("bdev_lvol_create", {"lvs_name": "pool", "lvol_name": f"v{i}",
                                                "size_in_mib": 1, "thin_provision": i % 2 == 0})
                    acked.append(f"v{i}")
                    if i % 3 == 2:
                        c.call("bdev_lvol_delete", {"name": f"pool/v{i - 1}"})
                        deleted.append(f"v{i - 1}")
                except (SpdkTransportError, SpdkError):
                    return
                i += 1

    t = threading.Thread(target=churn)
    t.start()
    time.sleep(1.5)
    sim.kill9()
    stop.set()
    t.join(timeout=30)
    assert len(acked) > 5, "the churn did not get going"
    sim.start()
    with sim.client() as c:
        c.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 512})
        names = {lv["name"] for lv in c.call("bdev_lvol_get_lvols")}
        expected = set(acked) - set(deleted)
        last = int(acked[-1][1:])
        in_flight = {f"v{last + 1}", f"v{last - 1}"}   # a create or a delete unanswered
        assert expected - in_flight <= names <= expected | in_flight
        lvs = c.call("bdev_lvol_get_lvstores")[0]
        used = sum(1 for lv in c.call("bdev_lvol_get_lvols")
                   if not lv["is_thin_provisioned"])
        assert lvs["free_clusters"] == lvs["total_data_clusters"] - used
    # no torn temp file was taken for the metadata, none is left once loaded cleanly
    meta = list((short_tmp / "data" / "lvstores").glob("*/lvstore.json"))
    assert len(meta) == 1
