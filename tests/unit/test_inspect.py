"""The inspection CLI (``csi-spdk volumes|snapshots|targets``) against a real
``csi-spdk dev`` after a lifecycle (volumes thick and thin, a snapshot, a clone
of it, a publish), checked against SPDK's own answers and the CSI view; and
gRPC server reflection on the dev's CSI sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from devproc import REPO, run_lifecycle, start_dev  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.controller.inspect import size  # noqa: E402
from csi_spdk.proto import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_spdk.spdk.api import SpdkApi  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def lived(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    real = os.environ.get("CSI_SPDK_TEST_RPC")  # a real spdk_tgt (it must have no lvstore)
    dev = start_dev(tmp, *(["--spdk-rpc", real] if real else []))
    try:
        made = run_lifecycle(dev.controller)
        yield dev, made, str(dev.sock_dir / "dev-state" / "controller.json")
    finally:
        assert dev.stop() == 0, dev.output()


def cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "csi_spdk", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def as_json(*args: str, **kw) -> dict:
    res = cli(*args, "-o", "json", **kw)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def spdk(dev) -> SpdkApi:
    return SpdkApi(SpdkClient(os.environ.get("CSI_SPDK_TEST_RPC")
                              or str(dev.sock_dir / "spdk.sock")))


def test_volumes_json_joins_spdk_exports_and_nodes(lived):
    dev, made, cfg = lived
    vols = {v["id"]: v for v in as_json("volumes", "list", "--config", cfg, "--kube", "off")
            ["items"]}
    assert set(vols) == {made.volume, made.thin_volume, made.clone}
    api = spdk(dev)
    try:
        lvs = api.lvstores()[0]
        cluster = lvs["cluster_size"]
        for vid, row in vols.items():
            uuid = contract.parse_id(vid).lvol_uuid
            bdev = api.bdev_get(uuid)
            assert row["size"] == bdev["num_blocks"] * bdev["block_size"]
            assert row["allocated"] == \
                bdev["driver_specific"]["lvol"]["num_allocated_clusters"] * cluster
            assert row["thin"] == bdev["driver_specific"]["lvol"]["thin_provision"]
            assert row["lvol"] == bdev["aliases"][0]
        sub = api.subsystem_get(contract.subsystem_nqn(contract.parse_id(made.volume).lvol_uuid))
    finally:
        api.client.close()
    vol = vols[made.volume]
    assert vol["size"] == 16 * MiB
    assert vol["nqn"] == sub["nqn"]
    assert vol["hosts"] == [contract.host_nqn("dev-node")] == [h["nqn"] for h in sub["hosts"]]
    assert vol["nodes"] == ["dev-node"]
    assert vol["listeners"] == ["tcp://127.0.0.1:4420"]
    # a clone of its snapshot or not, as SPDK says (the controller decides how it snapshots)
    api = spdk(dev)
    try:
        parent = api.bdev_get(contract.parse_id(made.volume).lvol_uuid)[
            "driver_specific"]["lvol"].get("base_snapshot")
    finally:
        api.client.close()
    assert vol["source"] == (made.snapshot if parent else "")
    assert vols[made.thin_volume]["thin"] is True and vols[made.thin_volume]["size"] == 32 * MiB
    assert vols[made.thin_volume]["nqn"] == "" and vols[made.thin_volume]["nodes"] == []
    assert vols[made.clone]["source"] == made.snapshot


def test_volumes_agree_with_the_csi_view(lived):
    dev, made, cfg = lived
    vols = as_json("volumes", "list", "--config", cfg, "--kube", "off")["items"]
    with grpc.insecure_channel(f"unix:{dev.sock_dir}/controller.sock") as ch:
        listed = csi_pb2_grpc.ControllerStub(ch).ListVolumes(csi_pb2.ListVolumesRequest())
    csi = {e.volume.volume_id: (e.volume.capacity_bytes, list(e.status.published_node_ids))
           for e in listed.entries}
    assert csi == {v["id"]: (v["size"], v["nodes"]) for v in vols}


def test_snapshots_list(lived):
    dev, made, cfg = lived
    snaps = as_json("snapshots", "list", "--config", cfg, "--kube", "off")["items"]
    assert [s["id"] for s in snaps] == [made.snapshot]
    snap = snaps[0]
    assert snap["size"] == 16 * MiB
    api = spdk(dev)
    try:
        lv = api.bdev_get(contract.parse_id(made.snapshot).lvol_uuid)["driver_specific"]["lvol"]
        cluster = api.lvstores()[0]["cluster_size"]
    finally:
        api.client.close()
    assert snap["allocated"] == lv["num_allocated_clusters"] * cluster == 16 * MiB
    assert snap["clones"] == len(lv.get("clones") or [])
    assert made.clone in snap["volumes"] and set(snap["volumes"]) <= {made.volume, made.clone}
    wide = cli("snapshots", "list", "--config", cfg, "-o", "wide", "--kube", "off")
    assert wide.returncode == 0
    header, row = wide.stdout.splitlines()
    assert header.split() == ["SNAPSHOT", "SIZE", "ALLOCATED", "VOLUMES", "TARGET", "LVOL",
                              "CLONES"]
    assert row.split() == [made.snapshot, "16Mi", "16Mi", ",".join(snap["volumes"]), "dev",
                           "lvs0/csis-life-snap", str(snap["clones"])]


def test_tables_for_people(lived):
    dev, made, cfg = lived
    res = cli("volumes", "list", "--config", cfg, "--kube", "off")
    assert res.returncode == 0 and res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["VOLUME", "PVC", "SIZE", "ALLOCATED", "TYPE", "NODES"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    vol = next(v for v in as_json("volumes", "list", "--config", cfg, "--kube", "off")["items"]
               if v["id"] == made.volume)
    assert rows[made.volume] == [made.volume, "-", "16Mi", size(vol["allocated"]),
                                 "thin" if vol["thin"] else "thick", "dev-node"]
    assert rows[made.thin_volume] == [made.thin_volume, "-", "32Mi", "0", "thin", "-"]
    wide = cli("volumes", "list", "--config", cfg, "-o", "wide", "--kube", "off").stdout
    nqn = contract.subsystem_nqn(contract.parse_id(made.volume).lvol_uuid)
    row = next(line for line in wide.splitlines() if line.startswith(made.volume)).split()
    assert row[-2:] == [nqn, "tcp://127.0.0.1:4420"]
    assert row[7:9] == ["dev", "lvs0/csi-life-vol"]
    targets = cli("targets", "list", "--config", cfg, "--kube", "off").stdout.splitlines()
    (t,) = as_json("targets", "list", "--config", cfg, "--kube", "off")["items"]
    lvs = t["lvstores"][0]
    used = f"lvs0({size(lvs['total'] - lvs['free'])}/{size(lvs['total'])}"
    assert targets[1].split() == ["dev", "yes", "SPDK", "v25.09", used, "used)", "3", "1", "1"]


def test_volumes_get(lived):
    dev, made, cfg = lived
    listed = {v["id"]: v for v in as_json("volumes", "list", "--config", cfg, "--kube", "off")
              ["items"]}
    got = as_json("volumes", "get", made.volume, "--config", cfg, "--kube", "off")
    assert got == listed[made.volume]
    text = cli("volumes", "get", made.volume, "--config", cfg, "--kube", "off").stdout
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["Nodes"].strip() == "dev-node" and fields["Size"].strip() == "16Mi (16777216)"
    missing = f"dev:{'0' * 8}-0000-4000-8000-{'0' * 12}"
    res = cli("volumes", "get", missing, "--config", cfg, "--kube", "off")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == f"csi-spdk volumes: volume {missing} does not exist"


def test_targets_list_json_matches_spdk(lived):
    dev, _, cfg = lived
    (t,) = as_json("targets", "list", "--config", cfg, "--kube", "off")["items"]
    api = spdk(dev)
    try:
        (lvs,) = api.lvstores()
    finally:
        api.client.close()
    assert t["reachable"] and t["name"] == "dev" and t["node"] == "dev-node"
    assert t["lvstores"] == [{"name": "lvs0", "cluster_size": lvs["cluster_size"],
                              "total": lvs["total_data_clusters"] * lvs["cluster_size"],
                              "free": lvs["free_clusters"] * lvs["cluster_size"]}]
    assert (t["volumes"], t["snapshots"], t["exports"]) == (3, 1, 1)


def test_an_unreachable_target_is_named_and_the_rest_listed(lived, tmp_path):
    dev, made, cfg = lived
    body = json.loads(Path(cfg).read_text())
    body["targets"].append({"name": "gone", "rpc": str(tmp_path / "gone.sock"),
                            "nvmf": {"listenAddress": "127.0.0.1", "port": 4420}})
    two = tmp_path / "two.json"
    two.write_text(json.dumps(body))
    res = cli("volumes", "list", "--config", str(two), "--kube", "off")
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"csi-spdk volumes list: target gone ({tmp_path}/gone.sock) is "
                           "unreachable, its objects are not listed: ")
    assert made.volume in res.stdout and "Traceback" not in res.stderr
    t = json.loads(cli("targets", "list", "--config", str(two), "-o", "json", "--kube", "off")
                   .stdout)
    assert [(x["name"], x["reachable"]) for x in t["items"]] == [("dev", True), ("gone", False)]
    assert t["errors"][0]["target"] == "gone" and "unreachable" in t["errors"][0]["error"]


FAKE_KUBECTL = """#!/bin/sh
# the two GETs csi_spdk/controller/kube.py makes, answered from files
case "$2" in
  persistentvolumes) cat "$FAKE_KUBE/pvs.json" ;;
  nodes) cat "$FAKE_KUBE/nodes.json" ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""


def _fake_kubectl(tmp_path: Path, monkeypatch, pvs: list, nodes: list[str]) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text(FAKE_KUBECTL)
    (bindir / "kubectl").chmod(0o755)
    (tmp_path / "pvs.json").write_text(json.dumps({"items": pvs}))
    (tmp_path / "nodes.json").write_text(json.dumps(
        {"items": [{"metadata": {"name": n}} for n in nodes]}))
    monkeypatch.setenv("FAKE_KUBE", str(tmp_path))
    return f"{bindir}:/usr/bin:/bin"


def test_pv_and_claim_names_from_kubernetes(lived, tmp_path, monkeypatch):
    """The PV list through kubectl (a stand-in answering from a file): volumes
    get their PV and claim; PVs of another driver or without a handle are
    ignored."""
    dev, made, cfg = lived
    pvs = [
        {"metadata": {"name": "pvc-1111"}, "spec": {
            "csi": {"driver": "csi-spdk.io", "volumeHandle": made.volume},
            "claimRef": {"namespace": "apps", "name": "data"}}},
        {"metadata": {"name": "pvc-2222"}, "spec": {
            "csi": {"driver": "other.example.com", "volumeHandle": made.thin_volume}}},
        {"metadata": {"name": "local-pv"}, "spec": {"hostPath": {"path": "/x"}}},
    ]
    path = _fake_kubectl(tmp_path, monkeypatch, pvs, ["dev-node", "worker-9"])
    out = json.loads(cli("volumes", "list", "--config", cfg, "-o", "json", path=path).stdout)
    vols = {v["id"]: v for v in out["items"]}
    assert out["kubernetes"] == "kubectl" and out["kubernetesError"] is None
    assert (vols[made.volume]["pv"], vols[made.volume]["pvc"]) == ("pvc-1111", "apps/data")
    assert (vols[made.thin_volume]["pv"], vols[made.thin_volume]["pvc"]) == ("", "")
    table = cli("volumes", "list", "--config", cfg, path=path).stdout
    row = next(line for line in table.splitlines() if line.startswith(made.volume)).split()
    assert row[1] == "apps/data"


def test_kubernetes_failure_is_said_with_kube_on(lived, tmp_path):
    dev, made, cfg = lived
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text("#!/bin/sh\necho 'error: You must be logged in' >&2\n"
                                    "exit 1\n")
    (bindir / "kubectl").chmod(0o755)
    res = cli("volumes", "list", "--config", cfg, "--kube", "on", path=f"{bindir}:/usr/bin:/bin")
    assert res.returncode == 0 and made.volume in res.stdout
    assert res.stderr.strip() == ("csi-spdk volumes list: PV/PVC names not shown: kubectl: "
                                  "kubectl get persistentvolumes: error: You must be logged in")


def test_a_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("targets: 3\n")
    res = cli("volumes", "list", "--config", str(bad))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "'targets' must be a non-empty list" in res.stderr


def test_grpc_server_reflection_on_the_csi_sockets(lived):
    """What `grpcurl -plaintext -unix <sock> list/describe` needs, without a .proto."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    dev, _, _ = lived
    for sock, csi_service, method in (("controller.sock", "csi.v1.Controller", "CreateVolume"),
                                      ("node.sock", "csi.v1.Node", "NodeStageVolume")):
        with grpc.insecure_channel(f"unix:{dev.sock_dir}/{sock}") as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            assert set(db.get_services()) == {
                "csi.v1.Identity", csi_service, "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"}
            svc = DescriptorPool(db).FindServiceByName(csi_service)
            assert method in [m.name for m in svc.methods]


def test_encryption_column(lived):
    """The mode of each volume: the dev key store says none/node/target; a
    published target-mode volume has its crypto bdev stacked."""
    dev, made, config = lived
    from controller_fixtures import block_cap, create_req, publish_req
    with grpc.insecure_channel(dev.controller.replace("unix://", "unix:")) as ch:
        stub = csi_pb2_grpc.ControllerStub(ch)
        enc = stub.CreateVolume(create_req("insp-enc", 16 * MiB, caps=[block_cap()],
                                           params={"encryption": "target"})).volume
        node = stub.CreateVolume(create_req("insp-node", 16 * MiB, caps=[block_cap()],
                                            params={"encryption": "node"})).volume
        req = publish_req(enc.volume_id, "dev-node", cap=block_cap())
        req.volume_context.update(enc.volume_context)
        stub.ControllerPublishVolume(req)
        try:
            rows = {v["id"]: v for v in as_json("volumes", "list", "--config", config,
                                                "--kube", "off")["items"]}
            assert rows[enc.volume_id]["encryption"] == "target"
            assert rows[node.volume_id]["encryption"] == "node"
            assert rows[made.volume]["encryption"] == "none"
            wide = cli("volumes", "list", "--config", config, "--kube", "off", "-o", "wide")
            assert wide.returncode == 0 and "ENCRYPTION" in wide.stdout.splitlines()[0]
            uuid = contract.parse_id(enc.volume_id).lvol_uuid
            assert spdk(dev).bdev_get(contract.crypto_bdev_name(uuid)) is not None
        finally:
            stub.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=enc.volume_id, node_id="dev-node"))
            for v in (enc, node):
                stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
