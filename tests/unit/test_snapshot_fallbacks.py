"""The snapshot paths mutation testing (scripts/mutation.sh) found untested:
a snapshot without its meta lvol (a crash between the snapshot and the meta
lvol, or a snapshot from a driver before meta lvols), DeleteSnapshot retried
after SPDK already deleted the snapshot (its marker and meta lvol are left),
and refusals to touch lvols the driver did not create."""

from __future__ import annotations

import time

import grpc
from controller_fixtures import MiB, block_cap, call, create_req, expect_code, uuid_of
from encryption_fixtures import MULTI, NODE_MODE

from csi_spdk import contract
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
THIN = {"thinProvision": "true"}


def names(env) -> list[str]:
    return sorted(lv["name"] for lv in env.t0.raw.lvols(env.t0.lvs))


def snapshot(env, name, source):
    return call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=source)).snapshot


def drop_meta(env, snap_uuid: str) -> None:
    prefix = contract.snapshot_meta_prefix(snap_uuid)
    metas = [lv for lv in env.t0.raw.lvols(env.t0.lvs) if lv["name"].startswith(prefix)]
    assert len(metas) == 1
    env.t0.raw.lvol_delete(metas[0]["uuid"])


def test_a_snapshot_without_meta_takes_its_source_from_the_lineage(env):
    """ListSnapshots names the source from SPDK's clone relations (through a
    chain of snapshots), a CreateSnapshot retry with that source converges and
    writes the meta lvol, one with another source is ALREADY_EXISTS."""
    s = env.servicer
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, params=THIN)).volume
    other = call(s, "CreateVolume", create_req("o", 4 * MiB, params=THIN)).volume
    first = snapshot(env, "s1", v.volume_id)
    second = snapshot(env, "s2", v.volume_id)   # v is now a clone of s2, s2 of s1
    for snap in (first, second):
        drop_meta(env, uuid_of(snap.snapshot_id))
    listed = {e.snapshot.snapshot_id: e.snapshot.source_volume_id
              for e in call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries}
    assert listed == {first.snapshot_id: v.volume_id, second.snapshot_id: v.volume_id}
    by_source = call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        source_volume_id=v.volume_id)).entries
    assert sorted(e.snapshot.snapshot_id for e in by_source) == \
        sorted([first.snapshot_id, second.snapshot_id])
    assert call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        source_volume_id=other.volume_id)).entries == []
    msg = expect_code(C.ALREADY_EXISTS, s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s1", source_volume_id=other.volume_id))
    assert "different source" in msg
    again = snapshot(env, "s1", v.volume_id)     # s1 is two steps up v's chain
    assert again.snapshot_id == first.snapshot_id and again.source_volume_id == v.volume_id
    meta = [contract.parse_snapshot_meta(n) for n in names(env)
            if n.startswith(contract.snapshot_meta_prefix(uuid_of(first.snapshot_id)))]
    assert [m[:2] for m in meta] == [(uuid_of(first.snapshot_id), uuid_of(v.volume_id))]
    # the time the retry wrote is the one answered, and stays so
    assert meta[0][2] == again.creation_time.seconds * 1000 + \
        again.creation_time.nanos // 1_000_000
    assert snapshot(env, "s1", v.volume_id).creation_time == again.creation_time


def test_delete_snapshot_retried_after_spdk_deleted_it_drops_its_leftovers(env):
    """A crash after SPDK deleted a snapshot, before its marker and meta lvol
    went: the retry (the snapshot id no longer resolves) deletes both, and
    leaves every other snapshot's meta lvol alone."""
    s = env.servicer
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, params=THIN)).volume
    keep = snapshot(env, "keep", v.volume_id)
    gone = snapshot(env, "gone", v.volume_id)
    for i in range(2):     # two clones: DeleteSnapshot only marks it
        call(s, "CreateVolume", create_req(f"c{i}", 4 * MiB, snapshot=gone.snapshot_id,
                                           params=THIN))
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=gone.snapshot_id))
    gone_uuid = uuid_of(gone.snapshot_id)
    mark = contract.deleted_mark_lvol_name(gone_uuid)
    meta = contract.snapshot_meta_prefix(gone_uuid)
    assert mark in names(env) and any(n.startswith(meta) for n in names(env))
    # what the crash left: the clones deleted and SPDK deleting the snapshot
    raw = env.t0.raw
    for i in range(2):
        raw.lvol_delete(f"{env.t0.lvs}/{contract.volume_lvol_name(f'c{i}')}")
    raw.lvol_delete(gone_uuid)
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=gone.snapshot_id))
    left = names(env)
    assert mark not in left and not any(n.startswith(meta) for n in left)
    keep_meta = contract.snapshot_meta_prefix(uuid_of(keep.snapshot_id))
    assert sum(n.startswith(keep_meta) for n in left) == 1
    assert contract.snapshot_lvol_name("keep") in left


def test_delete_snapshot_refuses_what_the_driver_did_not_make(env):
    """A snapshot id naming a foreign lvol, or a volume, is FAILED_PRECONDITION
    with the reason, and nothing is deleted."""
    s = env.servicer
    raw = env.t0.raw
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, params=THIN)).volume
    foreign = raw.lvol_create(env.t0.lvs, "user-data", 4 * MiB, True)
    foreign_snap = raw.call("bdev_lvol_snapshot", {"lvol_name": foreign,
                                                   "snapshot_name": "user-snap"})
    before = names(env)
    for uuid, why in ((foreign_snap, "not created by csi-spdk"), (uuid_of(v.volume_id),
                                                                  "is not a snapshot")):
        msg = expect_code(C.FAILED_PRECONDITION, s, "DeleteSnapshot",
                          csi_pb2.DeleteSnapshotRequest(snapshot_id=f"{env.t0.name}:{uuid}"))
        assert why in msg
    assert names(env) == before
    raw.lvol_delete(foreign)
    raw.lvol_delete(foreign_snap)


def test_a_metaless_retry_from_a_volume_with_its_own_snapshots_is_already_exists(env):
    """The lineage fallback follows the given source's chain and finds another
    snapshot there: not this one, so ALREADY_EXISTS (the meta lvol stays
    unwritten); the true source still converges."""
    s = env.servicer
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, params=THIN)).volume
    other = call(s, "CreateVolume", create_req("o", 4 * MiB, params=THIN)).volume
    mine = snapshot(env, "s1", v.volume_id)
    snapshot(env, "own", other.volume_id)          # other's chain: own, not s1
    drop_meta(env, uuid_of(mine.snapshot_id))
    msg = expect_code(C.ALREADY_EXISTS, s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s1", source_volume_id=other.volume_id))
    assert "different source" in msg
    prefix = contract.snapshot_meta_prefix(uuid_of(mine.snapshot_id))
    assert not any(n.startswith(prefix) for n in names(env))
    assert snapshot(env, "s1", v.volume_id).snapshot_id == mine.snapshot_id


def test_a_metaless_snapshot_is_dated_when_first_seen_each_its_own(env):
    """Without a meta lvol, creation_time is when this process first saw that
    snapshot: a second one seen later has its own, later time, and each keeps
    its time across listings."""
    s = env.servicer
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, params=THIN)).volume
    first = snapshot(env, "s1", v.volume_id)
    drop_meta(env, uuid_of(first.snapshot_id))

    def listed():
        return {e.snapshot.snapshot_id: e.snapshot.creation_time.ToNanoseconds()
                for e in call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries}

    t1 = listed()[first.snapshot_id]
    time.sleep(0.01)
    before = time.time_ns() // 1_000_000 * 1_000_000
    second = snapshot(env, "s2", v.volume_id)
    drop_meta(env, uuid_of(second.snapshot_id))
    again = listed()
    assert again[first.snapshot_id] == t1
    assert again[second.snapshot_id] >= before > t1
    assert listed() == again


def test_delete_snapshot_retried_after_a_crash_drops_its_key_record(env):
    """A snapshot of an encrypted volume has its own copy of the key in the
    key store. A crash after SPDK deleted the snapshot, before that record
    went: the retry (the snapshot id no longer resolves) deletes the record,
    and the volume's own key stays."""
    s = env.servicer
    store = s.encryption.store
    v = call(s, "CreateVolume", create_req("v", 4 * MiB, caps=[block_cap(MULTI)],
                                           params={**NODE_MODE, **THIN})).volume
    snap = snapshot(env, "s", v.volume_id)
    snap_uuid, vol_uuid = uuid_of(snap.snapshot_id), uuid_of(v.volume_id)
    assert store.get(snap_uuid).material == store.get(vol_uuid).material
    request = csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
    env.t0.api.arm(2)          # SPDK deletes the snapshot, the next step fails
    expect_code(C.INTERNAL, s, "DeleteSnapshot", request)
    env.t0.api.arm(0)
    assert env.t0.raw.bdev_get(snap_uuid) is None and store.get(snap_uuid) is not None
    call(s, "DeleteSnapshot", request)
    assert store.get(snap_uuid) is None
    assert store.get(vol_uuid) is not None
    assert names(env) == [contract.volume_lvol_name("v")]
