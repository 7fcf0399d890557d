"""Lineage safety: the periodic reconciler reclaims what abandoned calls left
(off the request path, never what a call is using right now), DeleteSnapshot
and DeleteVolume on one lineage cannot interleave into a hidden snapshot
nobody reclaims, and CreateVolume from a deleted snapshot never answers with
an unrelated volume of the same name."""

from __future__ import annotations

import threading

import grpc
from controller_fixtures import MiB, call, create_req, expect_code, publish_req, uuid_of

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


def test_reconciler_deletes_unfinished_clones_but_not_what_a_call_is_using(env):
    """Two abandoned CreateVolumes: one left a csic- snapshot (the clone
    failed), the other a clone of a user snapshot with its pending marker (the
    resize failed; nobody was answered with it). The reconciler deletes the
    unfinished clone and its marker, leaves the csic- snapshot while a call
    is using it, and then reclaims it; the user's snapshot and the volumes stay,
    and the abandoned request, retried, makes its clone afresh."""
    s = env.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    env.t0.api.arm(2)          # clone from a volume: the clone after csic- fails
    expect_code(C.INTERNAL, s, "CreateVolume", create_req("a", 8 * MiB, volume=src.volume_id,
                                                          params=THIN))
    env.t0.api.arm(0)
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=src.volume_id)).snapshot
    request = create_req("b", 12 * MiB, snapshot=snap.snapshot_id, params=THIN)
    env.t0.api.arm(3)          # from the snapshot: marker, clone, then the resize fails
    expect_code(C.INTERNAL, s, "CreateVolume", request)
    env.t0.api.arm(0)
    csic, clone = contract.clone_source_lvol_name("a"), contract.volume_lvol_name("b")
    pending = contract.pending_lvol_name(clone)
    assert {csic, clone, pending} <= set(names(env))
    with s.targets.using(csic):
        s.reconcile()
    left = names(env)
    assert csic in left and clone not in left and pending not in left
    assert contract.snapshot_lvol_name("s") in left
    s.reconcile()
    assert contract.volume_lvol_name("src") in names(env) and csic not in names(env)
    vol = call(s, "CreateVolume", request).volume
    b = env.t0.raw.bdev_get(uuid_of(vol.volume_id))
    assert b["num_blocks"] * b["block_size"] == 12 * MiB
    assert b["driver_specific"]["lvol"]["base_snapshot"] == contract.snapshot_lvol_name("s")
    assert pending not in names(env)


def test_reconciler_deletes_host_less_subsystems_of_no_volume_only(env):
    """A publish that crashed after creating the subsystem, before finding no
    volume, leaves a subsystem without hosts for a uuid that is no volume (a
    missing lvol, a snapshot): the reconciler deletes it. It keeps a published
    volume's subsystem, an unpublished volume's host-less one (the QoS hold),
    and one of a bdev that is not the driver's (another user of the target)."""
    s = env.servicer
    raw = env.t0.raw
    pub = call(s, "CreateVolume", create_req("p", 4 * MiB, params=THIN)).volume
    call(s, "ControllerPublishVolume", publish_req(pub.volume_id, "node-1"))
    held = call(s, "CreateVolume", create_req("h", 4 * MiB, params=THIN)).volume
    malloc = raw.malloc_create(f"{env.t0.malloc}f", 4 * MiB)
    foreign = raw.bdev_get(malloc)["uuid"]
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=held.volume_id)).snapshot
    orphans = ("0f0e0d0c-0b0a-4909-8807-060504030201", uuid_of(snap.snapshot_id))
    for uuid in (uuid_of(held.volume_id), foreign, *orphans):
        raw.subsystem_create(contract.subsystem_nqn(uuid), contract.serial_number(uuid),
                             contract.MODEL_NUMBER)
    before = {sub["nqn"] for sub in raw.subsystems()}
    s.reconcile()
    after = {sub["nqn"] for sub in raw.subsystems()}
    assert before - after == {contract.subsystem_nqn(u) for u in orphans}
    assert {contract.subsystem_nqn(u) for u in (uuid_of(pub.volume_id),
                                                uuid_of(held.volume_id), foreign)} <= after
    host = contract.host_nqn("node-1")
    assert [h["nqn"] for h in raw.subsystem_get(contract.subsystem_nqn(
        uuid_of(pub.volume_id)))["hosts"]] == [host]
    for uuid in (uuid_of(held.volume_id), foreign):
        raw.subsystem_delete(contract.subsystem_nqn(uuid))
    raw.call("bdev_malloc_delete", {"name": malloc})


def test_unfinished_clone_of_a_deleted_snapshot_is_deleted_by_the_retry(env):
    """CreateVolume from a snapshot fails after the clone (its resize), the
    user deletes the snapshot (two clones: hidden), and the retry is NOT_FOUND
    for the snapshot: the unfinished clone (pending marker: nobody has it) goes,
    then the hidden snapshot with it; a second retry answers the same."""
    s = env.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=src.volume_id)).snapshot
    request = create_req("c", 12 * MiB, snapshot=snap.snapshot_id, params=THIN)
    env.t0.api.arm(3)
    expect_code(C.INTERNAL, s, "CreateVolume", request)
    env.t0.api.arm(0)
    clone = contract.volume_lvol_name("c")
    assert {clone, contract.pending_lvol_name(clone)} <= set(names(env))
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for _ in range(2):
        msg = expect_code(C.NOT_FOUND, s, "CreateVolume", request)
        assert snap.snapshot_id in msg
        assert names(env) == [contract.volume_lvol_name("src")]
