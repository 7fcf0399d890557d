"""Pools: attach devices, load what is on them, create an lvstore only on a blank
device, never touch one that holds anything."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from simproc import SimProcess

from csi_spdk.agent.pools import PoolConfigError, Pools, parse_spec
from csi_spdk.spdk.api import SpdkApi

MiB = 1 << 20


def _file(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _spec(name: str, path: Path, **extra) -> dict:
    return {"pools": [{"name": name, "devices": [{"path": str(path)}], **extra}]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sim(short_tmp: Path):
    p = SimProcess(short_tmp / "spdk.sock", short_tmp / "data")
    p.start()
    yield p
    p.stop()


def test_empty_device_gets_an_lvstore_with_the_configured_cluster_size(
        sim: SimProcess, short_tmp: Path) -> None:
    dev = _file(short_tmp / "blank.img")
    with sim.client() as c:
        api = SpdkApi(c)
        pools = Pools(_spec("pool0", dev, cluster_size="2MiB", metadata_ratio=50), api)
        [st] = pools.attach()
        assert st.state == "created", st.message
        [lvs] = api.lvstores("pool0")
        assert lvs["cluster_size"] == 2 * MiB
        assert lvs["base_bdev"] == "pool0-dev"
        assert api.bdev_get("pool0-dev")["driver_specific"]["aio"]["filename"] == str(dev)
        # idempotent: a second attach on the same live target changes nothing
        [again] = pools.attach()
        assert again.state == "present"
        assert [x["uuid"] for x in api.lvstores()] == [lvs["uuid"]]
        [rep] = pools.report()
        assert rep["ready"] and rep["lvstore_uuid"] == lvs["uuid"]
        assert rep["capacity_bytes"] == lvs["total_data_clusters"] * 2 * MiB
        assert rep["devices"] == [{"kind": "aio", "bdev": "pool0-dev",
                                   "capacity_bytes": 64 * MiB, "path": str(dev)}]
        assert REGISTRY.get_sample_value("csi_spdk_agent_pool_capacity_bytes",
                                         {"pool": "pool0"}) == rep["capacity_bytes"]
        assert REGISTRY.get_sample_value("csi_spdk_agent_pool_ready", {"pool": "pool0"}) == 1
        api.lvol_create("pool0", "csi-a", 4 * MiB, thin=False)
        time.sleep(1.1)                  # read at scrape time, cached for a second
        assert REGISTRY.get_sample_value("csi_spdk_agent_pool_allocated_bytes",
                                         {"pool": "pool0"}) == 4 * MiB


def test_device_with_an_lvstore_is_loaded_not_recreated(sim: SimProcess,
                                                        short_tmp: Path) -> None:
    dev = _file(short_tmp / "pool.img")
    spec = _spec("pool0", dev, cluster_size=MiB)
    with sim.client() as c:
        api = SpdkApi(c)
        assert Pools(spec, api).attach()[0].state == "created"
        lvs_uuid = api.lvstores("pool0")[0]["uuid"]
        vol = api.lvol_create("pool0", "csi-keep", 8 * MiB, thin=False)
        c.call("sim_bdev_write", {"name": vol, "offset": 0, "data": "a2VwdA=="})   # "kept"
    sim.kill9()
    sim.start()
    with sim.client() as c:
        api = SpdkApi(c)
        [st] = Pools(spec, api).attach()
        assert st.state == "loaded", st.message
        assert api.lvstores("pool0")[0]["uuid"] == lvs_uuid
        assert [lv["uuid"] for lv in api.lvols("pool0")] == [vol]
        assert c.call("sim_bdev_read", {"name": vol, "offset": 0, "length": 4}) == "a2VwdA=="


def test_device_with_a_filesystem_is_refused_and_left_unchanged(sim: SimProcess,
                                                                short_tmp: Path) -> None:
    dev = _file(short_tmp / "ext4.img", 32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "precious", str(dev)], check=True)
    before = _sha(dev)
    with sim.client() as c:
        api = SpdkApi(c)
        [st] = Pools(_spec("pool0", dev), api).attach()
        assert st.state == "refused"
        assert f"{dev} is not empty (" in st.message and "TYPE=ext4" in st.message
        assert "never reformats" in st.message and "wipefs" in st.message
        assert api.bdev_get("pool0-dev") is None        # never handed to SPDK
        assert api.lvstores() == []
    assert _sha(dev) == before
    assert REGISTRY.get_sample_value("csi_spdk_agent_pool_ready", {"pool": "pool0"}) == 0


def test_partition_table_is_refused(sim: SimProcess, short_tmp: Path) -> None:
    dev = _file(short_tmp / "mbr.img", 16 * MiB)
    # an MBR with one Linux partition from sector 2048 (what fdisk writes)
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") \
        + (30720).to_bytes(4, "little")
    with open(dev, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    before = _sha(dev)
    with sim.client() as c:
        [st] = Pools(_spec("pool0", dev), SpdkApi(c)).attach()
    assert st.state == "refused" and "PTTYPE=dos" in st.message
    assert _sha(dev) == before


def test_refused_even_when_the_bdev_already_exists(sim: SimProcess, short_tmp: Path) -> None:
    """An agent restarted next to a live target that already has the aio bdev
    probes again before formatting."""
    dev = _file(short_tmp / "ext4.img", 32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dev)], check=True)
    before = _sha(dev)
    with sim.client() as c:
        api = SpdkApi(c)
        c.call("bdev_aio_create", {"name": "pool0-dev", "filename": str(dev),
                                   "block_size": 4096})
        [st] = Pools(_spec("pool0", dev), api).attach()
        assert st.state == "refused" and "TYPE=ext4" in st.message
        assert api.lvstores() == []
    assert _sha(dev) == before


def test_lvstore_of_another_name_is_not_renamed(sim: SimProcess, short_tmp: Path) -> None:
    dev = _file(short_tmp / "pool.img")
    with sim.client() as c:
        api = SpdkApi(c)
        assert Pools(_spec("first", dev), api).attach()[0].state == "created"
        c.call("bdev_aio_delete", {"name": "first-dev"})
        [st] = Pools(_spec("second", dev), api).attach()
        assert st.state == "error" and "holds lvstore 'first'" in st.message
        assert [x["name"] for x in api.lvstores()] == ["first"]


def test_nvme_attach_failure_is_reported(sim: SimProcess) -> None:
    spec = {"pools": [{"name": "nv", "devices": [{"pci": "0000:5e:00.0"}]}]}
    with sim.client() as c:
        [st] = Pools(spec, SpdkApi(c)).attach()
    # the simulator has no PCIe driver: the attach itself fails, and says so
    assert st.state == "error" and st.message.startswith("pool nv: ")
    assert "bdev_nvme_attach_controller" in st.message and not st.ready


def test_nvme_device_gets_an_lvstore_only_with_initialize(sim: SimProcess) -> None:
    """An SPDK-owned SSD cannot be probed from the host: without ``initialize``
    an empty one is refused. (A malloc bdev stands in for its namespace bdev.)"""
    with sim.client() as c:
        api = SpdkApi(c)
        api.malloc_create("nv-nvmen1", 32 * MiB)
        dev = {"pci": "0000:5e:00.0"}
        [st] = Pools({"pools": [{"name": "nv", "devices": [dev]}]}, api).attach()
        assert st.state == "refused" and "initialize: true" in st.message
        assert api.lvstores() == []
        [st] = Pools({"pools": [{"name": "nv", "devices": [{**dev, "initialize": True}]}]},
                     api).attach()
        assert st.state == "created"
        assert [x["base_bdev"] for x in api.lvstores()] == ["nv-nvmen1"]


@pytest.mark.parametrize("doc,msg", [
    ({"pools": [{"name": "a b", "devices": [{"path": "/x"}]}]}, "name must be"),
    ({"pools": [{"name": "a", "devices": []}]}, "exactly one device"),
    ({"pools": [{"name": "a", "devices": [{"path": "x"}]}]}, "path must be absolute"),
    ({"pools": [{"name": "a", "devices": [{"pci": "5e:00.0"}]}]}, "not a PCI address"),
    ({"pools": [{"name": "a", "devices": [{"pci": "0000:5e:00.0", "path": "/x"}]}]},
     "exactly one of"),
    ({"pools": [{"name": "a", "devices": [{"path": "/x", "io": "spdk"}]}]}, "io must be"),
    ({"pools": [{"name": "a", "devices": [{"path": "/x"}], "cluster_size": "4 furlongs"}]},
     "not a size"),
    ({"pools": [{"name": "a", "devices": [{"path": "/x"}], "metadata_ratio": 0}]},
     "metadata_ratio"),
    ({"pools": [{"name": "a", "devices": [{"path": "/x"}], "colour": "red"}]},
     "unknown field"),
    ({"pools": [{"name": "a", "devices": [{"path": "/x"}]},
                {"name": "a", "devices": [{"path": "/y"}]}]}, "defined twice"),
])
def test_bad_pool_files_are_refused_with_the_field_named(doc: dict, msg: str) -> None:
    with pytest.raises(PoolConfigError, match=msg):
        parse_spec(doc)


def test_a_node_of_the_nodes_map_gets_its_own_list() -> None:
    """``nodes``: the node named gets its list instead of ``pools`` (not merged);
    any other node gets ``pools``; a mistake in any node's list is refused on
    every node, naming where it is."""
    doc = {"pools": [{"name": "a", "devices": [{"pci": "0000:01:00.0"}]}],
           "nodes": {"s2": [{"name": "b", "devices": [{"path": "/b.img"}]},
                            {"name": "c", "devices": [{"path": "/c.img", "io": "io_uring"}]}],
                     "s3": []}}
    assert [(p.name, p.device.kind) for p in parse_spec(doc, node="s2")] == [
        ("b", "aio"), ("c", "uring")]
    assert parse_spec(doc, node="s3") == []
    assert [p.name for p in parse_spec(doc, node="s1")] == ["a"]
    assert [p.name for p in parse_spec(doc)] == ["a"]
    doc["nodes"]["s3"] = [{"name": "d", "devices": [{"path": "relative"}]}]
    with pytest.raises(PoolConfigError, match=r"nodes\.s3: pool d: path must be absolute"):
        parse_spec(doc, node="s1")
    for bad in ({"pools": [], "nodes": [{"name": "a"}]}, {"pools": [], "nodes": {"s": {}}}):
        with pytest.raises(PoolConfigError, match="nodes must map node names to pool lists"):
            parse_spec(bad)
    with pytest.raises(PoolConfigError, match=r"unknown field\(s\) \['node'\]"):
        parse_spec({"pools": [], "node": {}})


def test_pool_file_yaml(short_tmp: Path) -> None:
    f = short_tmp / "pools.yaml"
    f.write_text("pools:\n  - name: p\n    devices:\n      - path: /dev/nvme0n1\n"
                 "        io: io_uring\n    cluster_size: 4MiB\n")
    from csi_spdk.agent.pools import load_spec
    [p] = load_spec(f)
    assert (p.name, p.device.kind, p.device.address, p.cluster_size) == (
        "p", "uring", "/dev/nvme0n1", 4 * MiB)
    f.write_text("pools: [")
    with pytest.raises(PoolConfigError, match="not YAML"):
        load_spec(f)


def test_per_volume_io_metrics_come_from_bdev_get_iostat(sim: SimProcess,
                                                         short_tmp: Path) -> None:
    from prometheus_client import CollectorRegistry

    from csi_spdk.agent.pools import volume_io_source
    from csi_spdk.metrics import VolumeIoCollector

    dev = _file(short_tmp / "pool.img")
    with sim.client() as c:
        api = SpdkApi(c)
        Pools(_spec("pool0", dev), api).attach()
        vol = api.lvol_create("pool0", "csi-io", 8 * MiB, thin=True)
        c.call("bdev_reset_iostat", {"name": vol})
        c.call("sim_bdev_write", {"name": vol, "offset": 0, "length": 65536, "pattern": 1,
                                  "io_size": 4096})
        c.call("sim_bdev_read", {"name": vol, "offset": 0, "length": 8192})
        reg = CollectorRegistry()
        reg.register(VolumeIoCollector(volume_io_source(api)))
        labels = {"volume": vol, "lvol": "csi-io"}
        assert reg.get_sample_value("csi_spdk_volume_io_bytes_total",
                                    {**labels, "op": "write"}) == 65536
        assert reg.get_sample_value("csi_spdk_volume_io_ops_total",
                                    {**labels, "op": "write"}) == 16
        assert reg.get_sample_value("csi_spdk_volume_io_bytes_total",
                                    {**labels, "op": "read"}) == 8192
        tick_rate = api.iostat(vol)["tick_rate"]
        ticks = api.iostat(vol)["bdevs"][0]["write_latency_ticks"]
        assert reg.get_sample_value("csi_spdk_volume_io_latency_seconds_total",
                                    {**labels, "op": "write"}) == ticks / tick_rate
        # the base bdev is not a volume
        assert reg.get_sample_value("csi_spdk_volume_io_bytes_total",
                                    {"volume": "pool0-dev", "lvol": "pool0-dev",
                                     "op": "read"}) is None
    sim.kill9()
    # an unreachable target gives an empty scrape, not a failed one
    assert reg.get_sample_value("csi_spdk_volume_io_bytes_total",
                                {**labels, "op": "write"}) is None


def test_pool_gauges_survive_an_unreachable_target(sim: SimProcess, short_tmp: Path) -> None:
    """The pool capacity gauges are read at scrape time: with spdk_tgt killed
    the scrape still answers (the last known figures), it does not fail."""
    dev = _file(short_tmp / "pool.img")
    name = f"gauge{time.monotonic_ns()}"
    with sim.client() as c:
        Pools(_spec(name, dev), SpdkApi(c)).attach()
        total = REGISTRY.get_sample_value("csi_spdk_agent_pool_capacity_bytes", {"pool": name})
        assert total and total > 32 * MiB, total
        sim.kill9()
        time.sleep(1.1)   # past the 1 s lvstore cache: the gauge asks SPDK again
        assert REGISTRY.get_sample_value("csi_spdk_agent_pool_capacity_bytes",
                                         {"pool": name}) == total
