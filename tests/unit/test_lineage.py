"""Lineage safety: the periodic reconciler reclaims what abandoned calls left
(off the request path, never what a call is using right now), DeleteSnapshot
and DeleteVolume on one lineage cannot interleave into a hidden snapshot
nobody reclaims, and CreateVolume from a deleted snapshot never answers with
an unrelated volume of the same name."""

from __future__ import annotations

import threading

import grpc
from controller_fixtures import MiB, call, create_req, expect_code, uuid_of

from csi_spdk import contract
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
THIN = {"thinProvision": "true"}


def names(env):
    return sorted(lv["name"] for lv in env.t0.raw.lvols(env.t0.lvs))


def test_reconciler_reclaims_an_abandoned_clone_source(env):
    s = env.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    env.t0.api.arm(2)          # the clone after the csic- snapshot fails; never retried
    expect_code(C.INTERNAL, s, "CreateVolume", create_req("c", 8 * MiB, volume=src.volume_id,
                                                          params=THIN))
    env.t0.api.arm(0)
    csic = contract.clone_source_lvol_name("c")
    assert csic in names(env)
    # a CreateVolume using it right now keeps it
    with s.targets.using(csic):
        s.reconcile()
        assert csic in names(env)
    s.reconcile()
    assert names(env) == [contract.volume_lvol_name("src")]
    assert not env.t0.raw.bdev_get(uuid_of(src.volume_id))["driver_specific"]["lvol"]["clone"]


def test_delete_snapshot_racing_delete_volume_leaves_nothing_hidden(env):
    s = env.servicer
    v = call(s, "CreateVolume", create_req("v", 8 * MiB, params=THIN)).volume
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=v.volume_id)).snapshot
    c = call(s, "CreateVolume", create_req("c", 8 * MiB, snapshot=snap.snapshot_id,
                                           params=THIN)).volume
    target = s.targets[env.t0.name]
    real_mark = target.mark_deleted

    def racing_mark(lv):
        # SPDK just refused (2 clones); the clone is deleted right now
        t = threading.Thread(target=call, args=(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(
            volume_id=c.volume_id)))
        t.start()
        t.join(1.0)          # with the lineage lock it waits for us
        real_mark(lv)
        racing_mark.thread = t

    target.mark_deleted = racing_mark
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    racing_mark.thread.join(10)
    assert names(env) == [contract.volume_lvol_name("v")]


def test_create_from_a_deleted_snapshot_is_not_found_not_a_same_named_volume(env):
    s = env.servicer
    other = call(s, "CreateVolume", create_req("x", 8 * MiB)).volume      # unrelated
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=src.volume_id)).snapshot
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    msg = expect_code(C.NOT_FOUND, s, "CreateVolume",
                      create_req("x", 8 * MiB, snapshot=snap.snapshot_id))
    assert other.volume_id in msg          # says what holds the name
