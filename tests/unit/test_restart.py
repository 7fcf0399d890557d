"""Restarts lose nothing: what CSI answers after a controller restart (a new
ControllerServicer over the same SPDK, with no memory of the old one) comes
from durable state: published nodes from the host NQNs, a publish's
capability/readonly from the subsystem's model number, a snapshot's source
and creation time from its meta lvol."""

from __future__ import annotations

import time

import grpc
from controller_fixtures import MiB, block_cap, call, create_req, expect_code, publish_req

from csi_spdk import contract
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
THIN = {"thinProvision": "true"}


def restarted(env) -> ControllerServicer:
    return ControllerServicer(env.config, "csi-spdk.io",
                              apis={n: t.api for n, t in env.targets.items()})


def test_host_nqn_embeds_the_node_id_validly():
    for node in ("worker-1", "ip-10-0-0-1.ec2.internal", "a b/c:ü", "n" * 190):
        nqn = contract.host_nqn(node)
        assert len(nqn.encode()) <= contract.NQN_MAX_BYTES
        assert nqn.startswith("nqn.2024-11.io.csi-spdk:")
        assert contract.node_of_host(nqn) == node
    long = contract.host_nqn("n" * 300)   # too long to embed: a hash, not invertible
    assert len(long.encode()) <= 223 and contract.node_of_host(long) is None
    assert contract.host_id("a") != contract.host_id("b")
    # the node and the controller derive it from the same function
    assert contract.host_nqn("worker-1") != contract.legacy_host_nqn("worker-1")


def test_published_nodes_and_publish_flags_survive_a_restart(env):
    s = env.servicer
    vol = call(s, "CreateVolume", create_req("v", 4 * MiB)).volume
    blk = call(s, "CreateVolume", create_req("b", 4 * MiB, caps=[block_cap(
        csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER)])).volume
    call(s, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1", readonly=True))
    mn = block_cap(csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER)
    call(s, "ControllerPublishVolume", publish_req(blk.volume_id, "node-1", cap=mn))
    call(s, "ControllerPublishVolume", publish_req(blk.volume_id, "node-2", cap=mn))
    s2 = restarted(env)
    got = call(s2, "ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == ["node-1"]
    listed = {e.volume.volume_id: list(e.status.published_node_ids)
              for e in call(s2, "ListVolumes", csi_pb2.ListVolumesRequest()).entries}
    assert listed == {vol.volume_id: ["node-1"], blk.volume_id: ["node-1", "node-2"]}
    # same flags: OK; another readonly flag or capability: ALREADY_EXISTS, after restart
    ctx = call(s2, "ControllerPublishVolume",
               publish_req(vol.volume_id, "node-1", readonly=True)).publish_context
    assert ctx[contract.PC_READONLY] == "true"
    expect_code(C.ALREADY_EXISTS, restarted(env), "ControllerPublishVolume",
                publish_req(vol.volume_id, "node-1", readonly=False))
    expect_code(C.ALREADY_EXISTS, restarted(env), "ControllerPublishVolume",
                publish_req(vol.volume_id, "node-1", cap=block_cap(), readonly=True))
    msg = expect_code(C.FAILED_PRECONDITION, restarted(env), "DeleteVolume",
                      csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert "node-1" in msg and "nqn." not in msg


def test_unpublish_removes_a_host_allowed_by_an_older_driver(env):
    s = env.servicer
    vol = call(s, "CreateVolume", create_req("v", 4 * MiB)).volume
    call(s, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    nqn = contract.subsystem_nqn(vol.volume_id.split(":")[1])
    env.t0.raw.host_add(nqn, contract.legacy_host_nqn("node-1"))
    call(restarted(env), "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-1"))
    assert env.t0.raw.subsystem_get(nqn) is None


def test_snapshot_source_and_time_survive_a_restart(env):
    s = env.servicer
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, params=THIN)).volume
    thick = call(s, "CreateVolume", create_req("t", 4 * MiB)).volume
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=v.volume_id)).snapshot
    tsnap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="ts", source_volume_id=thick.volume_id)).snapshot
    c = call(s, "CreateVolume", create_req("c", 4 * MiB, snapshot=snap.snapshot_id,
                                           params=THIN)).volume
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    time.sleep(0.01)
    s2 = restarted(env)
    listed = {e.snapshot.snapshot_id: e.snapshot
              for e in call(s2, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries}
    assert listed[snap.snapshot_id].source_volume_id == v.volume_id      # not the clone
    assert listed[snap.snapshot_id].creation_time == snap.creation_time
    # a thick source is inflated after its snapshot: no clone relation is left
    assert listed[tsnap.snapshot_id].source_volume_id == thick.volume_id
    assert listed[tsnap.snapshot_id].creation_time == tsnap.creation_time
    by_src = call(s2, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        source_volume_id=c.volume_id)).entries
    assert by_src == []
    again = call(s2, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="ts", source_volume_id=thick.volume_id)).snapshot
    assert again == tsnap
    # the clone descends from the snapshot, but it is not its source
    expect_code(C.ALREADY_EXISTS, restarted(env), "CreateSnapshot",
                csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=c.volume_id))
    # the meta lvol goes with its snapshot
    call(s2, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=tsnap.snapshot_id))
    names = [lv["name"] for lv in env.t0.raw.lvols(env.t0.lvs)]
    assert not any(n.startswith(contract.snapshot_meta_prefix(tsnap.snapshot_id.split(":")[1]))
                   for n in names)


def test_single_node_publish_to_a_node_an_older_driver_allowed_is_no_conflict(env):
    """The allow-list holds node-1 under its older NQN form only (an older
    driver published it): a publish to node-1 after the upgrade is the same
    node, not "published elsewhere", and adds its new NQN; node-2 is still
    FAILED_PRECONDITION."""
    s = env.servicer
    vol = call(s, "CreateVolume", create_req("v", 4 * MiB)).volume
    call(s, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    nqn = contract.subsystem_nqn(vol.volume_id.split(":")[1])
    env.t0.raw.host_add(nqn, contract.legacy_host_nqn("node-1"))
    env.t0.raw.call("nvmf_subsystem_remove_host", {"nqn": nqn,
                                                   "host": contract.host_nqn("node-1")})
    s2 = restarted(env)
    call(s2, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    hosts = sorted(h["nqn"] for h in env.t0.raw.subsystem_get(nqn)["hosts"])
    assert hosts == sorted([contract.host_nqn("node-1"), contract.legacy_host_nqn("node-1")])
    expect_code(C.FAILED_PRECONDITION, s2, "ControllerPublishVolume",
                publish_req(vol.volume_id, "node-2"))


def test_names_an_older_driver_wrote_are_the_names_read_now():
    """What one driver version derives and leaves behind, the next must derive
    the same: the host id a node connected with (the kernel refuses a second
    connect under the same host NQN with another host id), and the name of a
    volume's accel key in SPDK (a restarted or upgraded controller destroys
    the key by that name). The values are recorded from the current derivation: changing one needs a
    migration, never a silent edit."""
    assert contract.host_id("node-1") == "b93a22ee-d3b5-5f44-89fb-f6ea48b82097"
    assert contract.crypto_key_name("0f0e0d0c-0b0a-4909-8807-060504030201", "a" * 64) == \
        "csie-0f0e0d0c-0b0a-4909-8807-060504030201-ffe054fe"
