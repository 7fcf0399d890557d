"""An SPDK error between any two SPDK calls (in-process: ``FlakyApi`` fails the
N-th mutating call, like an SPDK internal error would), concurrency, and the
controller over real gRPC. Real crashes (SIGKILL of a controller process at
each SPDK call boundary, before and after SPDK applied it) are in
test_controller_kill.py."""

from __future__ import annotations

import threading

import grpc
import pytest
from controller_fixtures import (
    MiB,
    RpcFailure,
    call,
    create_req,
    expect_code,
    mount_cap,
    publish_req,
    uuid_of,
)

from csi_spdk import contract
from csi_spdk.controller import config as cfgmod
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.identity import IdentityServicer
from csi_spdk.proto import csi_pb2, csi_pb2_grpc
from csi_spdk.server import GrpcServer

C = grpc.StatusCode
THIN = {"thinProvision": "true"}   # a thin source stays a clone of its snapshot



def crash_then_retry(env, step, method, request):
    env.t0.api.arm(step)
    try:
        call(env.servicer, method, request)
    except RpcFailure as err:
        assert "injected crash" in err.message
    env.t0.api.arm(0)
    return call(env.servicer, method, request)


def lvol_names(env):
    return sorted(lv["name"] for lv in env.t0.raw.lvols(env.t0.lvs))


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5])   # snapshot, marker, clone, resize, marker
def test_create_from_volume_crash(env, step):
    src = call(env.servicer, "CreateVolume", create_req("src", 8 * MiB)).volume
    vol = crash_then_retry(env, step, "CreateVolume",
                           create_req("c", 12 * MiB, volume=src.volume_id)).volume
    b = env.t0.raw.bdev_get(uuid_of(vol.volume_id))
    assert b["num_blocks"] * b["block_size"] == 12 * MiB == vol.capacity_bytes
    csic = contract.clone_source_lvol_name("c")
    assert b["driver_specific"]["lvol"]["base_snapshot"] == csic
    assert lvol_names(env) == sorted([csic, contract.volume_lvol_name("c"),
                                      contract.volume_lvol_name("src")])


@pytest.mark.parametrize("step", [1, 2])
def test_create_from_snapshot_crash(env, step):
    src = call(env.servicer, "CreateVolume", create_req("src", 8 * MiB)).volume
    snap = call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=src.volume_id)).snapshot
    vol = crash_then_retry(env, step, "CreateVolume",
                           create_req("c", 16 * MiB, snapshot=snap.snapshot_id)).volume
    b = env.t0.raw.bdev_get(uuid_of(vol.volume_id))
    assert b["num_blocks"] * b["block_size"] == 16 * MiB
    assert len(lvol_names(env)) == 4   # src, snapshot, its meta lvol, clone


def test_create_and_snapshot_crash(env):
    vol = crash_then_retry(env, 1, "CreateVolume", create_req("v", 8 * MiB)).volume
    snap = crash_then_retry(env, 1, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=vol.volume_id)).snapshot
    meta = [n for n in lvol_names(env) if n.startswith(contract.SNAPSHOT_META_PREFIX)]
    assert [contract.parse_snapshot_meta(n)[:2] for n in meta] == \
        [(uuid_of(snap.snapshot_id), uuid_of(vol.volume_id))]
    assert sorted(set(lvol_names(env)) - set(meta)) == sorted([contract.volume_lvol_name("v"),
                                                               contract.snapshot_lvol_name("s")])
    assert env.t0.raw.bdev_get(uuid_of(snap.snapshot_id))["driver_specific"]["lvol"]["snapshot"]


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5])
def test_publish_crash(env, step):
    vol = call(env.servicer, "CreateVolume", create_req("v", 8 * MiB)).volume
    ctx = crash_then_retry(env, step, "ControllerPublishVolume",
                           publish_req(vol.volume_id, "node-1")).publish_context
    uuid = uuid_of(vol.volume_id)
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert [h["nqn"] for h in sub["hosts"]] == [contract.host_nqn("node-1")]
    assert [n["uuid"] for n in sub["namespaces"]] == [uuid]
    assert len(sub["listen_addresses"]) == 1 and ctx["nqn"] == sub["nqn"]


@pytest.mark.parametrize("step", [1, 2])
def test_unpublish_crash(env, step):
    vol = call(env.servicer, "CreateVolume", create_req("v", 8 * MiB)).volume
    call(env.servicer, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    crash_then_retry(env, step, "ControllerUnpublishVolume",
                     csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                              node_id="node-1"))
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid_of(vol.volume_id))) is None


@pytest.mark.parametrize("step", [1, 2])
def test_delete_clone_crash_reclaims_parent(env, step):
    src = call(env.servicer, "CreateVolume", create_req("src", 8 * MiB)).volume
    clone = call(env.servicer, "CreateVolume", create_req("c", 8 * MiB,
                                                          volume=src.volume_id)).volume
    crash_then_retry(env, step, "DeleteVolume",
                     csi_pb2.DeleteVolumeRequest(volume_id=clone.volume_id))
    assert lvol_names(env) == [contract.volume_lvol_name("src")]


@pytest.mark.parametrize("step", [1, 2])
def test_delete_hidden_snapshot_crash(env, step):
    v = call(env.servicer, "CreateVolume", create_req("v", 8 * MiB, params=THIN)).volume
    snap = call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=v.volume_id)).snapshot
    call(env.servicer, "CreateVolume", create_req("c", 8 * MiB, snapshot=snap.snapshot_id))
    crash_then_retry(env, step, "DeleteSnapshot",
                     csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    uuid = uuid_of(snap.snapshot_id)
    assert env.t0.raw.bdev_get(uuid) is not None          # kept for its 2 clones
    assert env.t0.raw.bdev_get(f"{env.t0.lvs}/{contract.deleted_mark_lvol_name(uuid)}")
    assert call(env.servicer, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries == []


# --- concurrency -------------------------------------------------------------------------
def test_same_name_is_aborted_while_busy(env):
    s = env.servicer
    with s.locks.hold(["pvc-x"]):
        expect_code(C.ABORTED, s, "CreateVolume", create_req("pvc-x", MiB))
    vol = call(s, "CreateVolume", create_req("pvc-x", MiB)).volume
    with s.locks.hold([vol.volume_id]):
        for method, req in [
            ("DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)),
            ("ControllerPublishVolume", publish_req(vol.volume_id, "n")),
            ("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=vol.volume_id, node_id="n")),
            ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))),
        ]:
            expect_code(C.ABORTED, s, method, req)


def test_parallel_different_volumes(env):
    s, errors, ids = env.servicer, [], []

    def work(i):
        try:
            v = call(s, "CreateVolume", create_req(f"p{i}", MiB)).volume
            call(s, "ControllerPublishVolume", publish_req(v.volume_id, f"n{i}"))
            call(s, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=v.volume_id, node_id=f"n{i}"))
            ids.append(v.volume_id)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 16 and len(lvol_names(env)) == 16
    assert [x for x in env.t0.raw.subsystems() if x["nqn"].startswith(contract.NQN_PREFIX)] \
        == []


# --- over gRPC ----------------------------------------------------------------------------
def test_over_grpc(env, tmp_path):
    sock = tmp_path / "csi.sock"
    ident = IdentityServicer("csi-spdk.io", controller=True, ready=env.servicer.ready)
    server = GrpcServer(f"unix://{sock}", [
        lambda srv: csi_pb2_grpc.add_IdentityServicer_to_server(ident, srv),
        lambda srv: csi_pb2_grpc.add_ControllerServicer_to_server(env.servicer, srv)])
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            idc, ctl = csi_pb2_grpc.IdentityStub(ch), csi_pb2_grpc.ControllerStub(ch)
            info = idc.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            assert info.name == "csi-spdk.io" and info.vendor_version
            caps = idc.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
            kinds = {c.WhichOneof("type") for c in caps.capabilities}
            assert kinds == {"service", "volume_expansion"} and len(caps.capabilities) == 3
            assert idc.Probe(csi_pb2.ProbeRequest()).ready.value is True
            vol = ctl.CreateVolume(create_req("g", 4 * MiB)).volume
            ctx = ctl.ControllerPublishVolume(publish_req(vol.volume_id, "n1")).publish_context
            assert ctx["traddr"] == "10.0.2.2"
            with pytest.raises(grpc.RpcError) as err:
                ctl.ControllerPublishVolume(publish_req(vol.volume_id, "n2"))
            assert err.value.code() == C.FAILED_PRECONDITION
            ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=vol.volume_id, node_id="n1"))
            ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
            with pytest.raises(grpc.RpcError) as err:
                ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
                    volume_id=vol.volume_id))
            assert err.value.code() == C.NOT_FOUND
    finally:
        server.stop(0)


def test_identity_node_flavour_and_probe_tells_about_the_process(tmp_path):
    cfg = cfgmod.parse({"targets": [{"name": "dead", "rpc": f"unix://{tmp_path}/none.sock",
                                     "rpcTimeout": 1,
                                     "nvmf": {"listenAddress": "127.0.0.1"}}]})
    ctl = ControllerServicer(cfg, "csi-spdk.io")
    ident = IdentityServicer("csi-spdk.io", controller=True, ready=ctl.ready)
    # a dead target is the health checker's business, not the liveness probe's
    assert call(ident, "Probe", csi_pb2.ProbeRequest()).ready.value is True
    ctl.health.check()
    assert ctl.health.status("dead")[0] is False
    node = IdentityServicer("csi-spdk.io")
    caps = call(node, "GetPluginCapabilities", csi_pb2.GetPluginCapabilitiesRequest())
    assert all(c.service.type != c.service.CONTROLLER_SERVICE for c in caps.capabilities)
    assert call(node, "Probe", csi_pb2.ProbeRequest()).ready.value is True
    with pytest.raises(ValueError):
        IdentityServicer("")
    assert mount_cap()  # keep the helper imported for readers


def test_identity_takes_servicers(env):
    ident = IdentityServicer("csi-spdk.io", controller=env.servicer, node=object())
    assert call(ident, "Probe", csi_pb2.ProbeRequest()).ready.value is True
    caps = call(ident, "GetPluginCapabilities", csi_pb2.GetPluginCapabilitiesRequest())
    assert any(c.service.type == c.service.CONTROLLER_SERVICE for c in caps.capabilities)


@pytest.mark.parametrize("step", [1, 2, 3])   # delete clone, snapshot, marker
def test_delete_last_clone_of_deleted_snapshot_crash(env, step):
    """Deleting the clone that kept a user-deleted snapshot alive reclaims the
    snapshot and then its marker; a crash at any step converges on retry."""
    v = call(env.servicer, "CreateVolume", create_req("v", 8 * MiB, params=THIN)).volume
    snap = call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=v.volume_id)).snapshot
    c = call(env.servicer, "CreateVolume", create_req("c", 8 * MiB,
                                                      snapshot=snap.snapshot_id)).volume
    call(env.servicer, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(
        snapshot_id=snap.snapshot_id))
    assert contract.deleted_mark_lvol_name(uuid_of(snap.snapshot_id)) in lvol_names(env)
    env.t0.api.arm(step)
    expect_code(C.INTERNAL, env.servicer, "DeleteVolume",
                csi_pb2.DeleteVolumeRequest(volume_id=c.volume_id))
    env.t0.api.arm(0)
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=c.volume_id))
    assert lvol_names(env) == [contract.volume_lvol_name("v")]


def test_create_from_volume_retry_after_the_source_grew_clones_the_first_snapshot(env):
    """A CreateVolume from a volume fails right after its csic- snapshot, and
    the source is expanded before the retry: the retry clones that snapshot
    (the source as the first attempt saw it), so a clone that fits limit_bytes
    then still fits it now."""
    s = env.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    request = create_req("c", 8 * MiB, limit=8 * MiB, volume=src.volume_id, params=THIN)
    env.t0.api.arm(2)            # the snapshot is taken, the pending marker fails
    expect_code(C.INTERNAL, s, "CreateVolume", request)
    env.t0.api.arm(0)
    call(s, "ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id=src.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB)))
    vol = call(s, "CreateVolume", request).volume
    b = env.t0.raw.bdev_get(uuid_of(vol.volume_id))
    assert b["num_blocks"] * b["block_size"] == 8 * MiB == vol.capacity_bytes
    assert b["driver_specific"]["lvol"]["base_snapshot"] == contract.clone_source_lvol_name("c")
