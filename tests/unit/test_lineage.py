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
    assert msg == (f"snapshot {snap.snapshot_id} does not exist; volume {other.volume_id} "
                   "holds the name 'x' (delete it if an earlier attempt left it)")
    msg = expect_code(C.NOT_FOUND, s, "CreateVolume",         # nothing holds this one
                      create_req("y", 8 * MiB, snapshot=snap.snapshot_id))
    assert msg == f"snapshot {snap.snapshot_id} does not exist"


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


LAST = "ffffffff-ffff-4fff-8fff-ffffffffffff"   # its NQN sorts after every other one


def drivers(raw) -> list[str]:
    """The NQNs of the driver's subsystems, in SPDK's order."""
    return [sub["nqn"] for sub in raw.subsystems() if sub["nqn"].startswith(contract.NQN_PREFIX)]


def test_reconciler_sweeps_past_the_subsystems_it_keeps(env):
    """SPDK lists subsystems ordered by NQN, so an orphan may come after the
    host-less subsystems the sweep keeps: a volume's QoS hold, a bdev that is
    not the driver's, a volume in an lvstore the config does not name. The
    sweep goes on past each of them and deletes the orphan; they all stay."""
    s = env.servicer
    raw = env.t0.raw
    held = call(s, "CreateVolume", create_req("h", 4 * MiB, params=THIN)).volume
    malloc = raw.malloc_create(f"{env.t0.malloc}f", 4 * MiB)
    other = f"{env.t0.malloc}o"
    raw.malloc_create(other, 16 * MiB)
    raw.lvstore_create(other, "other-lvs", cluster_sz=MiB)
    theirs = raw.lvol_create("other-lvs", contract.volume_lvol_name("x"), 4 * MiB, True)
    kept = [uuid_of(held.volume_id), raw.bdev_get(malloc)["uuid"], theirs]
    try:
        for uuid in (*kept, LAST):
            raw.subsystem_create(contract.subsystem_nqn(uuid), contract.serial_number(uuid),
                                 contract.MODEL_NUMBER)
        assert drivers(raw)[-1] == contract.subsystem_nqn(LAST)     # after every kept one
        s.reconcile()
        assert drivers(raw) == sorted(contract.subsystem_nqn(u) for u in kept)
    finally:
        for uuid in kept:
            raw.subsystem_delete(contract.subsystem_nqn(uuid))
        raw.lvol_delete(theirs)
        raw.call("bdev_lvol_delete_lvstore", {"lvs_name": "other-lvs"})
        raw.call("bdev_malloc_delete", {"name": other})
        raw.call("bdev_malloc_delete", {"name": malloc})


def test_one_delete_reclaims_a_chain_of_two_hidden_snapshots(env):
    """Two user-deleted snapshots, s2 right below s1, each hidden for its two
    clones; the reclaim of s1 when its other clone went failed, so s1 is left
    with s2 as its only clone. Deleting s2's last other clone then reclaims
    both, up the chain, with their markers and meta lvols: only the volume
    they merged into is left, a clone of nothing, its data intact."""
    s = env.servicer
    raw = env.t0.raw
    v = call(s, "CreateVolume", create_req("v", 8 * MiB, params=THIN)).volume
    io = env.t0.server          # the simulator's I/O path (None on a real target)
    if io is not None:
        io.write(uuid_of(v.volume_id), 0, b"\x5a" * MiB)
    s1 = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s1", source_volume_id=v.volume_id)).snapshot
    c1 = call(s, "CreateVolume", create_req("c1", 8 * MiB, snapshot=s1.snapshot_id,
                                            params=THIN)).volume
    s2 = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s2", source_volume_id=v.volume_id)).snapshot
    c2 = call(s, "CreateVolume", create_req("c2", 8 * MiB, snapshot=s2.snapshot_id,
                                            params=THIN)).volume
    for snap in (s1, s2):
        call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    lv1 = raw.bdev_get(uuid_of(s1.snapshot_id))["driver_specific"]["lvol"]
    lv2 = raw.bdev_get(uuid_of(s2.snapshot_id))["driver_specific"]["lvol"]
    assert lv2["base_snapshot"] == contract.snapshot_lvol_name("s1")
    assert len(lv1["clones"]) == len(lv2["clones"]) == 2
    env.t0.api.arm(2)           # c1 goes, then the reclaim of s1 fails
    expect_code(C.INTERNAL, s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(
        volume_id=c1.volume_id))
    env.t0.api.arm(0)
    lv1 = raw.bdev_get(uuid_of(s1.snapshot_id))["driver_specific"]["lvol"]
    assert lv1["clones"] == [contract.snapshot_lvol_name("s2")]
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=c2.volume_id))
    assert names(env) == [contract.volume_lvol_name("v")]
    lv = raw.bdev_get(uuid_of(v.volume_id))["driver_specific"]["lvol"]
    assert not lv["clone"] and lv.get("base_snapshot") is None
    if io is not None:
        assert io.read(uuid_of(v.volume_id), 0, MiB) == b"\x5a" * MiB


def test_reconciler_keeps_a_volume_named_like_a_snapshot_meta_lvol(env):
    """A CSI name can make a volume's lvol name exactly as long as a
    snapshot's meta lvol ("csim-" + 55 characters of base64url and hex): only
    the "csim-" prefix makes a meta lvol, so the reconciler, which deletes the
    meta lvols of snapshots that are gone, keeps the volume."""
    s = env.servicer
    name = "x" + "A" * 22 + "B" * 22 + "0" * 11
    vol = call(s, "CreateVolume", create_req(name, 4 * MiB, params=THIN)).volume
    lvol = contract.volume_lvol_name(name)
    assert len(lvol) == len(contract.SNAPSHOT_META_PREFIX) + 55
    s.reconcile()
    assert names(env) == [lvol]
    assert env.t0.raw.bdev_get(uuid_of(vol.volume_id))["aliases"] == [f"{env.t0.lvs}/{lvol}"]


def test_reconciler_leaves_the_clone_source_of_a_running_create_alone(env):
    """The reconciler runs while a CreateVolume from a volume is between its
    csic- snapshot and the clone (the snapshot has one clone then, the source:
    what the sweep reclaims when nobody uses it): the snapshot stays, and the
    CreateVolume answers a clone of it."""
    s = env.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    api = env.t0.api
    real_clone = api.clone
    swept: list[list[str]] = []

    def clone_after_a_reconcile(snapshot_name, clone_name):
        s.reconcile()
        swept.append(names(env))
        return real_clone(snapshot_name, clone_name)

    api.clone = clone_after_a_reconcile
    vol = call(s, "CreateVolume", create_req("c", 8 * MiB, volume=src.volume_id,
                                             params=THIN)).volume
    csic = contract.clone_source_lvol_name("c")
    assert len(swept) == 1 and csic in swept[0]
    lv = env.t0.raw.bdev_get(uuid_of(vol.volume_id))["driver_specific"]["lvol"]
    assert lv["base_snapshot"] == csic
    assert names(env) == sorted([csic, contract.volume_lvol_name("c"),
                                 contract.volume_lvol_name("src")])
