"""The snapshot RPCs of the Controller service (``SnapshotService``).

A CSI snapshot is an SPDK lvol snapshot named ``contract.snapshot_lvol_name``
in its source volume's lvstore; its id is ``<target>:<snapshot uuid>``.

Durable facts: SPDK keeps no timestamp and no settable attributes for lvols,
so right after the snapshot the controller creates an empty thin "meta" lvol
whose name carries the snapshot uuid, the source volume uuid and the creation
time (``contract.snapshot_meta_lvol_name``). creation_time and
source_volume_id come from it, so they survive restarts and failovers, and a
CreateSnapshot retry with another source is ALREADY_EXISTS. Only a snapshot
without one (a crash between the snapshot and the meta lvol, or a driver
before this) falls back: the source from SPDK's clone relations, the time
when this process first saw it; a CreateSnapshot retry then writes the meta
lvol. The meta lvol goes with its snapshot (DeleteSnapshot, reclaim, and the
sweep for orphans).

DeleteSnapshot of a snapshot with two or more clones (SPDK refuses) marks it
deleted with an empty lvol named ``contract.deleted_mark_lvol_name`` (SPDK
cannot rename a snapshot): it disappears from CSI and is reclaimed once at
most one clone is left (see ``Target.reclaim``).

Concurrency: CreateSnapshot holds the name and the source volume id;
DeleteSnapshot the snapshot id. Idempotent as the CSI spec requires.
"""

from __future__ import annotations

import threading
import time

from google.protobuf import timestamp_pb2

from .. import contract
from ..errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    echo,
    require,
)
from ..locks import KeyedLocks
from ..proto import csi_pb2
from ..rpc import rpc
from ..spdk.errors import SpdkExists, SpdkNotFound, SpdkNotPermitted
from . import placement
from .capacity import PROVISIONED_TTL
from .config import Config
from .target import Lvol, Target, Targets, volumes_below


def paginate(entries: list, starting_token: str, max_entries: int) -> tuple[list, str]:
    """Page ``entries`` (sorted by their first element, an object id).

    The token is the last id of the previous page; anything else is ABORTED
    (CSI: the token is not valid)."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    if starting_token:
        try:
            contract.parse_id(starting_token)
        except (NotFound, InvalidArgument):
            raise Aborted(f"starting_token {echo(starting_token)} is not valid; "
                          "restart the listing") from None
        entries = [e for e in entries if e[0] > starting_token]
    if max_entries and len(entries) > max_entries:
        entries = entries[:max_entries]
        return entries, entries[-1][0]
    return entries, ""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SnapshotService:
    """CreateSnapshot, DeleteSnapshot, ListSnapshots over the given ``Targets``.

    ``ControllerServicer`` inherits these RPCs (gRPC looks them up on one
    servicer object); everything they use is what ``__init__`` is given:
    the targets with their look-ups, and ``locks`` for the ``@rpc`` stack.
    """

    def __init__(self, targets: Targets, locks: KeyedLocks, config: Config) -> None:
        self.targets = targets
        self.locks = locks
        self.ratio = config.thin_overcommit_ratio
        self._snap_mutex = threading.Lock()
        # fallback only: snapshot uuid -> first-seen time, for snapshots without meta
        self._first_seen: dict[str, int] = {}

    # --- helpers -----------------------------------------------------------------
    def _seen_ms(self, uuid: str) -> int:
        with self._snap_mutex:
            return self._first_seen.setdefault(uuid, _now_ms())

    def _snapshot_msg(self, target: Target, snap: Lvol, source: str,
                      created_ms: int | None) -> csi_pb2.Snapshot:
        ms = created_ms if created_ms is not None else self._seen_ms(snap.uuid)
        created = timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
        return csi_pb2.Snapshot(size_bytes=snap.size,
                                snapshot_id=str(contract.ObjectId(target.name, snap.uuid)),
                                source_volume_id=source, creation_time=created,
                                ready_to_use=True)

    def _admit(self, target: Target, src: Lvol) -> None:
        """Refuse a snapshot whose clusters the lvstore cannot back.

        The snapshot keeps the clusters the volume has now. A thin volume's
        count against thin provisioning; a thick volume must stay thick, so it
        is re-inflated after the snapshot and needs its whole size free."""
        for max_age in (PROVISIONED_TTL, 0.0):   # a refusal is decided on fresh figures
            pool = target.pool_of(src.lvstore, max_age=max_age)
            held = src.allocated_clusters * pool.cluster_size
            why = placement.shortfall(pool, self.ratio, held if src.thin else 0,
                                      0 if src.thin else src.size)
            if not why:
                break
        if why:
            kind = "thin" if src.thin else "thick"
            raise ResourceExhausted(
                f"cannot snapshot {kind} volume {target.name}:{src.uuid}: the snapshot keeps "
                f"its {held} allocated bytes"
                + ("" if src.thin else " and the volume must stay thick (own all its "
                   "clusters), which takes its size again")
                + f"; {why}")

    @staticmethod
    def _descends_from(target: Target, lv: Lvol, snap_name: str) -> bool:
        """Is ``snap_name`` on the base-snapshot chain of ``lv``?"""
        parent, seen = lv.base_snapshot, 0
        while parent and seen < 64:
            if parent == snap_name:
                return True
            nxt = target.lvol_by_name(lv.lvstore, parent)
            parent, seen = (nxt.base_snapshot if nxt else None), seen + 1
        return False

    # --- RPCs --------------------------------------------------------------------
    @rpc(lock=("name", "source_volume_id"))
    def CreateSnapshot(self, request, context):
        require(request.name, "name")
        require(request.source_volume_id, "source_volume_id")
        snap_name = contract.snapshot_lvol_name(request.name)
        for target in self.targets.values():
            for lvs in target.lvstores():
                snap = target.lvol_by_name(lvs["name"], snap_name)
                if snap is None:
                    continue
                if target.deleted_mark(snap) is not None:
                    raise FailedPrecondition(
                        f"snapshot {echo(request.name)} was deleted, but SPDK keeps its data "
                        "until the volumes cloned from it are deleted; use another name")
                try:
                    src_target, src = self.targets.volume(request.source_volume_id)
                except NotFound:
                    src_target = src = None
                meta = target.snapshot_meta(snap.lvstore, snap.uuid)
                if meta is not None:
                    same = str(contract.ObjectId(target.name, meta[0])) == \
                        request.source_volume_id
                else:
                    same = src is not None and src_target is target and \
                        self._descends_from(target, src, snap_name)
                if not same:
                    raise AlreadyExists(f"snapshot {echo(request.name)} already exists with a "
                                        "different source volume")
                if meta is None:   # a crash came between the snapshot and its meta lvol
                    meta = (src.uuid, self._seen_ms(snap.uuid))
                    target.write_snapshot_meta(snap.lvstore, snap.uuid, *meta)
                if src is not None:
                    target.keep_thick(src, snap)   # a crash may have come before it
                    self.encryption.snapshot_taken(src.uuid, snap.uuid, request.name)
                return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_msg(
                    target, snap, request.source_volume_id, meta[1]))
        target, src = self.targets.volume(request.source_volume_id)
        with self.targets.admission:
            self._admit(target, src)
            try:
                uuid = target.api.snapshot(src.uuid, snap_name)
            except SpdkExists:
                uuid = None
            except SpdkNotFound as err:
                raise NotFound(f"volume {request.source_volume_id} does not exist") from err
            target.forget_provisioned(src.lvstore, held=src.size)
        snap = target.lvol(uuid) if uuid else target.lvol_by_name(src.lvstore, snap_name)
        if snap is None:
            raise NotFound(f"snapshot {snap_name} vanished after creation; retry")
        created = _now_ms()
        target.write_snapshot_meta(snap.lvstore, snap.uuid, src.uuid, created)
        target.keep_thick(src, snap)
        self.encryption.snapshot_taken(src.uuid, snap.uuid, request.name)
        return csi_pb2.CreateSnapshotResponse(
            snapshot=self._snapshot_msg(target, snap, request.source_volume_id, created))

    @rpc(lock=("snapshot_id",))
    def DeleteSnapshot(self, request, context):
        """Missing is success. Never surfaces SPDK's refusal to delete a snapshot
        with clones: such a snapshot is hidden and reclaimed later."""
        require(request.snapshot_id, "snapshot_id")
        try:
            oid = contract.parse_id(request.snapshot_id, "snapshot")
        except NotFound:
            return csi_pb2.DeleteSnapshotResponse()
        target = self.targets.get(oid.target)
        if target is None:
            return csi_pb2.DeleteSnapshotResponse()
        with target.lineage:
            return self._delete_snapshot(target, oid, request.snapshot_id)

    def _delete_snapshot(self, target: Target, oid: contract.ObjectId,
                         snapshot_id: str) -> csi_pb2.DeleteSnapshotResponse:
        snap = target.lvol(oid.lvol_uuid)
        if snap is None:
            # maybe a retry after a crash between the delete and the clean-up
            target.drop_snapshot_leftovers(oid.lvol_uuid)
            self.encryption.deleted(None, oid.lvol_uuid)
            self._forget(oid.lvol_uuid)
            return csi_pb2.DeleteSnapshotResponse()
        if not contract.is_driver_lvol(snap.name):
            raise FailedPrecondition(f"lvol {snap.alias} was not created by csi-spdk; "
                                     "refusing to delete it")
        if not contract.is_snapshot_lvol(snap.name) or not snap.snapshot:
            raise FailedPrecondition(f"{snapshot_id} is not a snapshot")
        try:
            target.api.lvol_delete(snap.uuid)
        except SpdkNotFound:
            pass
        except SpdkNotPermitted:
            target.mark_deleted(snap)   # also the answer to a retry of this call
            self.encryption.deleted(None, snap.uuid)   # its clones have their own copies
            self._forget(snap.uuid)
            return csi_pb2.DeleteSnapshotResponse()
        # deleted: a marker left by an earlier call (2+ clones then) goes too,
        # and then its meta lvol
        target.forget_provisioned()
        target.drop_deleted_mark(snap)
        target.drop_snapshot_meta(snap.lvstore, snap.uuid)
        self.encryption.deleted(None, snap.uuid)   # a snapshot is never stacked
        self._forget(snap.uuid)
        target.reclaim(snap.lvstore, snap.base_snapshot)
        return csi_pb2.DeleteSnapshotResponse()

    def _forget(self, uuid: str) -> None:
        with self._snap_mutex:
            self._first_seen.pop(uuid, None)

    @rpc()
    def ListSnapshots(self, request, context):
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        only_target = None
        if request.snapshot_id or request.source_volume_id:
            try:
                oid = contract.parse_id(request.snapshot_id or request.source_volume_id)
            except NotFound:
                return csi_pb2.ListSnapshotsResponse()
            only_target = oid.target
            if only_target not in self.targets:
                return csi_pb2.ListSnapshotsResponse()
        entries = []
        for target in self.targets.values():
            if only_target and target.name != only_target:
                continue
            lvols = target.lvols_with_bdevs()
            by_lvs: dict[str, dict[str, Lvol]] = {}
            for lv in lvols:
                by_lvs.setdefault(lv.lvstore, {})[lv.name] = lv
            marked = {lv.name[len(contract.DELETED_MARK_PREFIX):] for lv in lvols
                      if lv.name.startswith(contract.DELETED_MARK_PREFIX)}
            metas = {m[0]: m[1:] for m in map(contract.parse_snapshot_meta,
                                              (lv.name for lv in lvols)) if m is not None}
            for snap in lvols:
                if not snap.snapshot or not contract.is_snapshot_lvol(snap.name) \
                        or snap.uuid in marked:
                    continue
                sid = str(contract.ObjectId(target.name, snap.uuid))
                if request.snapshot_id and sid != request.snapshot_id:
                    continue
                meta = metas.get(snap.uuid)
                sources = [str(contract.ObjectId(target.name, meta[0]))] if meta else \
                    volumes_below(target.name, snap, by_lvs[snap.lvstore])
                if request.source_volume_id and request.source_volume_id not in sources:
                    continue
                source = request.source_volume_id or (sources[0] if sources else "")
                entries.append((sid, target, snap, source, meta[1] if meta else None))
        entries.sort(key=lambda e: e[0])
        page, token = paginate(entries, request.starting_token, request.max_entries)
        out = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot_msg(t, s, src, ms))
               for _, t, s, src, ms in page]
        return csi_pb2.ListSnapshotsResponse(entries=out, next_token=token)
