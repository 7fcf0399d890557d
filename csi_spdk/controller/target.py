"""The controller's view of one SPDK target: lvol lookups, capacity, reclaim.

Split out of ``controller.py`` so the volume and snapshot halves of the
Controller service share one model of SPDK state. Two things are kept
between calls, so that no CreateVolume waits on a scan (docs/DESIGN.md
"Capacity"): the lvstores (free clusters taken off by the driver's thick
creates) and the per-lvstore "provisioned bytes" (volume sizes plus the
clusters snapshots hold, see ``placement``), adjusted by the driver's own
creates, resizes and deletes, over-counted by a new snapshot's source size,
and re-read off the request path (one ``bdev_get_bdevs`` for every lvstore of
the target) every ``PROVISIONED_TTL`` seconds or right after a snapshot
change. Thin admission therefore never under-counts what the driver did;
thick admission may see more free clusters than SPDK has (thin volumes fill
up by writes), and then SPDK itself refuses the create with ENOSPC, which is
RESOURCE_EXHAUSTED with nothing created. GetCapacity reads fresh figures.

Concurrency: safe to share between threads; callers hold the per-volume locks.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import contract
from ..errors import NotFound
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkExists, SpdkNotFound, SpdkNotPermitted
from ..spdk.intents import parallel
from . import qos
from .capacity import KeptCapacity
from .config import TargetConfig
from .export import NvmfExporter
from .volumes import KeptVolumes

MARK_BYTES = 1024 * 1024  # a deleted-snapshot marker's size (thin: no cluster is used)


# the QoS of an lvol with no limit (most): one shared value, never mutated
# (a change assigns a new dict), so 10,000 kept volumes do not hold 10,000
NO_QOS = qos.full({})


@dataclass(slots=True)
class Lvol:
    """An lvol as SPDK reports it in bdev_get_bdevs (slots: the controller
    keeps one per volume, see ``volumes.KeptVolumes``)."""

    uuid: str
    name: str
    lvstore: str
    lvs_uuid: str
    size: int
    thin: bool
    snapshot: bool
    clone: bool
    base_snapshot: str | None = None
    clones: list[str] = field(default_factory=list)
    # limits in force (assigned_rate_limits); a new lvol (the default) has none
    qos: qos.Limits = field(default_factory=lambda: NO_QOS)
    allocated_clusters: int = 0

    @property
    def alias(self) -> str:
        return f"{self.lvstore}/{self.name}"

    @classmethod
    def from_bdev(cls, bdev: dict | None) -> Lvol | None:
        if not bdev:
            return None
        lv = (bdev.get("driver_specific") or {}).get("lvol")
        aliases = bdev.get("aliases") or []
        if lv is None or not aliases or "/" not in aliases[0]:
            return None
        lvs, _, name = aliases[0].partition("/")
        limits = qos.in_force(bdev)
        # the lvstore's name and uuid are the same string for thousands of lvols
        return cls(uuid=bdev.get("uuid") or bdev["name"], name=name, lvstore=sys.intern(lvs),
                   lvs_uuid=sys.intern(lv.get("lvol_store_uuid", "")),
                   size=int(bdev.get("num_blocks", 0)) * int(bdev.get("block_size", 0)),
                   thin=bool(lv.get("thin_provision")), snapshot=bool(lv.get("snapshot")),
                   clone=bool(lv.get("clone")), base_snapshot=lv.get("base_snapshot"),
                   clones=list(lv.get("clones") or []),
                   qos=limits if any(limits.values()) else NO_QOS,
                   allocated_clusters=int(lv.get("num_allocated_clusters") or 0))

    @property
    def is_volume(self) -> bool:
        """A CSI volume (not a snapshot, marker or internal lvol)."""
        return contract.is_volume_lvol(self.name) and not self.snapshot

    @property
    def holds_clusters_only(self) -> bool:
        """Snapshots and driver markers count by what they hold, not their size."""
        return self.snapshot or self.name.startswith(contract.MARKER_PREFIXES)



def volumes_below(target_name: str, snap: Lvol, by_name: dict[str, Lvol]) -> list[str]:
    """Volume ids below ``snap`` through its chain of snapshot children (the
    candidates for a snapshot's source; ``by_name``: the lvstore's lvols)."""
    out, todo, seen = [], list(snap.clones), set()
    while todo:
        child = by_name.get(todo.pop())
        if child is None or child.uuid in seen:
            continue
        seen.add(child.uuid)
        if child.snapshot:
            todo.extend(child.clones)
        elif contract.is_volume_lvol(child.name):
            out.append(str(contract.ObjectId(target_name, child.uuid)))
    return sorted(out)


class Target(KeptCapacity, KeptVolumes):
    """One configured SPDK target with its API client and NVMe/TCP exporter
    (its capacity figures: ``capacity.KeptCapacity``; its volumes, kept for
    ListVolumes: ``volumes.KeptVolumes``; one scan refreshes both)."""

    def __init__(self, cfg: TargetConfig, api: SpdkApi) -> None:
        self.cfg = cfg
        self.api = api
        self.exporter = NvmfExporter(api, cfg)
        # Held by everything that deletes lvols or reclaims snapshots on this
        # target (DeleteSnapshot, DeleteVolume, the reconciler), so a snapshot's
        # "marked deleted" and "last clone gone" can never interleave into a
        # hidden snapshot nobody reclaims. Re-entrant: reclaim runs inside.
        self.lineage = threading.RLock()
        # a delete may have been cut short (a crash before this process, an
        # error in it) since the last sweep: see take_unfinished
        self._unfinished = True
        self._init_capacity()
        self._init_volumes()

    @property
    def name(self) -> str:
        return self.cfg.name

    # --- lookups -------------------------------------------------------------
    def lvstores(self) -> list[dict]:
        """The lvstores this driver may use (configured ones, else all); one RPC.

        Also refreshes the lvstore capacity gauges.
        """
        found = self.api.lvstores()
        if self.cfg.lvstores:
            found = [s for s in found if s["name"] in self.cfg.lvstores]
        for s in found:
            self.observe(s)
        self._keep_lvstores(found)
        return found

    def lvol(self, ref: str) -> Lvol | None:
        """An lvol by uuid or ``lvs/name``; None when missing or not an lvol."""
        return Lvol.from_bdev(self.api.bdev_get(ref))

    def lvol_by_name(self, lvstore: str, name: str) -> Lvol | None:
        return self.lvol(f"{lvstore}/{name}")

    def lvols_with_bdevs(self) -> list[Lvol]:
        """Every lvol of the driver's lvstores (a scan: ListSnapshots, sweep)."""
        return list(self.iter_lvols())

    def iter_lvols(self, keep=None) -> Iterator[Lvol]:
        """The same scan, one lvol at a time; ``keep(bdev)`` filters before an
        ``Lvol`` is built. The reply is decoded one bdev at a time and only
        the ``Lvol``s are held, never the whole reply."""
        allowed = set(self.cfg.lvstores)

        def one(bdev: dict) -> Lvol | None:
            if keep is not None and not keep(bdev):
                return None
            lv = Lvol.from_bdev(bdev)
            return lv if lv is not None and (not allowed or lv.lvstore in allowed) else None
        yield from self.api.bdevs(each=one)

    # --- user-deleted snapshots and reclaim -------------------------------------
    def deleted_mark(self, snap: Lvol) -> Lvol | None:
        """The marker that says the user deleted ``snap`` (see contract.py)."""
        return self.lvol_by_name(snap.lvstore, contract.deleted_mark_lvol_name(snap.uuid))

    def mark_deleted(self, snap: Lvol) -> None:
        """Mark ``snap`` deleted (idempotent): an empty thin lvol, no clusters."""
        with contextlib.suppress(SpdkExists):
            self.api.lvol_create(snap.lvstore, contract.deleted_mark_lvol_name(snap.uuid),
                                 MARK_BYTES, True)

    def drop_deleted_mark(self, snap: Lvol) -> None:
        """Delete ``snap``'s marker, if any (by alias: one call)."""
        with contextlib.suppress(SpdkNotFound):
            self.api.lvol_delete(f"{snap.lvstore}/{contract.deleted_mark_lvol_name(snap.uuid)}")

    # --- a snapshot's durable CSI facts (contract.snapshot_meta_lvol_name) --------
    def snapshot_meta(self, lvstore: str, snap_uuid: str) -> tuple[str, int] | None:
        """(source volume uuid, creation ms) of a snapshot, from its meta lvol
        (one bdev_lvol_get_lvols of the lvstore: names only, no bdev details)."""
        prefix = contract.snapshot_meta_prefix(snap_uuid)
        for lv in self.api.lvols(lvstore):
            if lv.get("name", "").startswith(prefix):
                meta = contract.parse_snapshot_meta(lv["name"])
                if meta is not None:
                    return meta[1], meta[2]
        return None

    def write_snapshot_meta(self, lvstore: str, snap_uuid: str, source_uuid: str,
                            created_ms: int) -> None:
        with contextlib.suppress(SpdkExists):
            self.api.lvol_create(lvstore, contract.snapshot_meta_lvol_name(
                snap_uuid, source_uuid, created_ms), MARK_BYTES, True)

    def drop_snapshot_meta(self, lvstore: str, snap_uuid: str) -> None:
        prefix = contract.snapshot_meta_prefix(snap_uuid)
        for lv in self.api.lvols(lvstore):
            if lv.get("name", "").startswith(prefix):
                with contextlib.suppress(SpdkNotFound):
                    self.api.lvol_delete(lv["uuid"])

    def drop_snapshot_leftovers(self, snap_uuid: str) -> None:
        """A snapshot is gone: delete its deleted-mark and meta lvol wherever
        they are (a retry after a crash between deleting it and them)."""
        meta = contract.snapshot_meta_prefix(snap_uuid)
        mark = contract.deleted_mark_lvol_name(snap_uuid)
        for lv in self.api.lvols():
            name = lv.get("name", "")
            if name == mark or name.startswith(meta):
                with contextlib.suppress(SpdkNotFound):
                    self.api.lvol_delete(lv["uuid"])

    # --- unfinished clones (contract.PENDING_PREFIX) -------------------------------
    def mark_pending(self, lvstore: str, volume_lvol: str) -> None:
        """Say that the clone named ``volume_lvol`` is not finished (idempotent)."""
        with contextlib.suppress(SpdkExists):
            self.api.lvol_create(lvstore, contract.pending_lvol_name(volume_lvol),
                                 MARK_BYTES, True)

    def is_pending(self, lv: Lvol) -> bool:
        return self.lvol_by_name(lv.lvstore, contract.pending_lvol_name(lv.name)) is not None

    def drop_pending(self, lvstore: str, volume_lvol: str) -> None:
        """The clone is finished: delete its marker (by alias: one call)."""
        with contextlib.suppress(SpdkNotFound):
            self.api.lvol_delete(f"{lvstore}/{contract.pending_lvol_name(volume_lvol)}")

    def delete_unfinished(self, lv: Lvol) -> None:
        """Delete a clone no CreateVolume ever answered with (it has a pending
        marker), then the marker; a crash in between leaves only the marker,
        which ``sweep`` deletes."""
        with self.lineage:
            self._delete_lvol(lv)
            self.drop_pending(lv.lvstore, lv.name)

    def reclaim(self, lvstore: str, parent: str | None) -> None:
        """Delete driver-internal snapshots (clone sources ``csic-`` and
        user-deleted, marked ones) up the chain from ``parent`` once they have
        at most one clone left (SPDK merges a one-clone snapshot into its clone,
        so the data stays). A marker goes after its snapshot, so a crash in
        between never brings a deleted snapshot back. Best effort: a failure
        leaves them for the next call or ``sweep``."""
        while parent:
            snap = self.lvol_by_name(lvstore, parent)
            if snap is None or not snap.snapshot or len(snap.clones) > 1:
                return
            mark = None
            if not parent.startswith(contract.CLONE_SOURCE_PREFIX):
                mark = self.deleted_mark(snap) if contract.is_snapshot_lvol(parent) else None
                if mark is None:
                    return  # a snapshot the user still has
            try:
                self.api.lvol_delete(snap.uuid)
            except SpdkNotFound:
                pass
            except SpdkNotPermitted:
                return
            self.forget_provisioned()
            if mark is not None:
                with contextlib.suppress(SpdkNotFound):
                    self.api.lvol_delete(mark.uuid)
                self.drop_snapshot_meta(lvstore, snap.uuid)
            parent = snap.base_snapshot

    def unfinished_delete(self) -> None:
        """A delete on this target failed part-way (its retry must finish it)."""
        self._unfinished = True

    def take_unfinished(self) -> bool:
        """Whether a delete may have been cut short since the last sweep (the
        caller sweeps now, and calls ``unfinished_delete`` again if that
        fails). True once after start: a previous process may have crashed."""
        with self._prov_lock:
            was, self._unfinished = self._unfinished, False
        return was

    def sweep(self, busy: frozenset[str] = frozenset()) -> None:
        """Reclaim orphaned internal objects anywhere on the target (one scan).

        Catches what a crash between deleting a clone and reclaiming its parent
        left behind, clone sources of abandoned CreateVolume retries, clones a
        crashed CreateVolume never finished (and never answered with), and
        markers whose snapshot or volume is already gone. ``busy``: ``csic-``
        and ``csip-`` names an in-flight CreateVolume is working with (left
        alone)."""
        with self.lineage:
            self._sweep(busy)

    def _sweep(self, busy: frozenset[str]) -> None:
        lvols = self.lvols_with_bdevs()
        by_uuid = {lv.uuid: lv for lv in lvols}
        self._sweep_subsystems(by_uuid)
        unfinished = {(lv.lvstore, contract.pending_lvol_name(lv.name)): lv for lv in lvols
                      if contract.is_volume_lvol(lv.name) and not lv.snapshot}
        for lv in lvols:
            meta = contract.parse_snapshot_meta(lv.name)
            if meta is not None and meta[0] not in by_uuid:
                with contextlib.suppress(SpdkNotFound):
                    self.api.lvol_delete(lv.uuid)   # its snapshot is gone
            elif lv.name.startswith((contract.CLONE_SOURCE_PREFIX, contract.PENDING_PREFIX)) \
                    and lv.name in busy:
                continue   # a CreateVolume is using it right now
            elif lv.name.startswith(contract.PENDING_PREFIX):
                vol = unfinished.get((lv.lvstore, lv.name))
                if vol is not None:
                    self._delete_lvol(vol)      # a clone nobody was answered with
                with contextlib.suppress(SpdkNotFound):
                    self.api.lvol_delete(lv.uuid)
            elif lv.name.startswith(contract.DELETED_MARK_PREFIX):
                snap = by_uuid.get(lv.name[len(contract.DELETED_MARK_PREFIX):])
                if snap is None:
                    with contextlib.suppress(SpdkNotFound):
                        self.api.lvol_delete(lv.uuid)
                elif len(snap.clones) <= 1:
                    self.reclaim(snap.lvstore, snap.name)
            elif lv.snapshot and len(lv.clones) <= 1 and \
                    lv.name.startswith(contract.CLONE_SOURCE_PREFIX):
                self.reclaim(lv.lvstore, lv.name)

    def _sweep_subsystems(self, by_uuid: dict[str, Lvol]) -> None:
        """A publish creates the subsystem while it looks the lvol up
        (``intents.export``); a crash right there after finding no volume
        leaves a host-less subsystem of a uuid that is no volume: delete it."""
        def hostless(sub: dict) -> str | None:   # (decoded one subsystem at a time)
            nqn = sub.get("nqn", "")
            return nqn if nqn.startswith(contract.NQN_PREFIX) and not sub.get("hosts") else None
        for nqn in self.api.subsystems(each=hostless):
            uuid = nqn[len(contract.NQN_PREFIX):]
            lv = by_uuid.get(uuid)
            if lv is not None and contract.is_volume_lvol(lv.name) and not lv.snapshot:
                continue
            if lv is None:
                lv = self.lvol(uuid)   # maybe in an lvstore the driver does not use
                if lv is not None and not lv.snapshot:
                    continue
                if lv is None and self.api.bdev_get(uuid) is not None:
                    continue   # some other bdev: not the driver's to judge
            with contextlib.suppress(SpdkNotFound):
                self.api.subsystem_delete(nqn)

    def _delete_lvol(self, lv: Lvol) -> None:
        with contextlib.suppress(SpdkNotFound):
            self.api.lvol_delete(lv.uuid)
        self.deleted_lvol(lv)

    def deleted_lvol(self, lv: Lvol) -> None:
        """``lv`` was just deleted (the caller holds ``lineage``): account for it
        and reclaim its hidden parents."""
        if lv.snapshot:
            self.forget_provisioned()
        else:
            self.adjust_provisioned(lv.lvstore, -lv.size)
            self.volume_gone(lv.uuid)
        self.reclaim(lv.lvstore, lv.base_snapshot)

    # --- thick volumes stay thick ------------------------------------------------
    def keep_thick(self, vol: Lvol, snap: Lvol) -> None:
        """SPDK turns a thick lvol into a thin clone of its first snapshot (its
        clusters move to the snapshot). A snapshot that is not thin says its
        source was thick: inflate the source back, so it owns every cluster
        again and no later write can fail with ENOSPC. Idempotent (a retry
        after a crash between the snapshot and the inflate finishes it); the
        caller checked that the lvstore has the room."""
        if snap.thin:
            return
        cur = self.lvol(vol.uuid)   # the caller's copy predates the snapshot
        if cur is None or not cur.thin or cur.base_snapshot != snap.name:
            return
        self.api.inflate(vol.uuid)
        vol.thin, vol.clone, vol.base_snapshot = False, False, None
        self.forget_provisioned()


class Targets(dict[str, Target]):
    """The configured targets by name, and the look-ups every RPC starts with.

    Shared by the volume, snapshot and create paths so none of them reaches
    into another's helpers. Concurrency: read-only after construction, except
    ``admission``: the lock every capacity decision holds from its check to
    the SPDK call that takes the space, so two concurrent creates cannot both
    be admitted into the same room.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.admission = threading.RLock()
        self._busy: dict[str, int] = {}
        self._busy_lock = threading.Lock()

    @contextlib.contextmanager
    def using(self, lvol_name: str):
        """Mark a driver-internal lvol (a ``csic-`` clone source) as in use by a
        running call, so the reconciler leaves it alone."""
        with self._busy_lock:
            self._busy[lvol_name] = self._busy.get(lvol_name, 0) + 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy[lvol_name] -= 1
                if not self._busy[lvol_name]:
                    del self._busy[lvol_name]

    def busy(self) -> frozenset[str]:
        with self._busy_lock:
            return frozenset(self._busy)

    def of(self, oid: contract.ObjectId, kind: str = "volume") -> Target:
        """The target an id names; NOT_FOUND when it is not configured."""
        target = self.get(oid.target)
        if target is None:
            raise NotFound(f"{kind} {oid} does not exist (no configured target {oid.target!r})")
        return target

    def volume(self, volume_id: str) -> tuple[Target, Lvol]:
        """The target and lvol of a CSI volume id; NOT_FOUND unless it is a volume."""
        oid = contract.parse_id(volume_id)
        target = self.of(oid)
        lv = target.lvol(oid.lvol_uuid)
        if lv is None or not contract.is_volume_lvol(lv.name) or lv.snapshot:
            raise NotFound(f"volume {volume_id} does not exist")
        return target, lv

    def find(self, lvol_name: str, only: str = "", lvstore: str = "", always: bool = True
             ) -> tuple[Target | None, Lvol | None, dict[str, list[dict]]]:
        """Look the lvol name up in every target/lvstore, or in target ``only``
        (and lvstore ``lvstore``): the look-ups run together, one round.

        Returns the hit (or None) and each target's lvstores (as kept between
        calls) for placement. Without ``always``, a single candidate lvstore
        is not looked in: the create itself tells (EEXIST) when the name is
        there, so a steady-state CreateVolume is one SPDK call. An
        unreachable target is an error: the name might exist there.
        """
        lvstores: dict[str, list[dict]] = {}
        where: list[tuple[Target, str]] = []
        for target in self.values():
            if only and target.name != only:
                continue
            lvstores[target.name] = target.cached_lvstores()
            where += [(target, s["name"]) for s in lvstores[target.name]
                      if not lvstore or s["name"] == lvstore]
        if len(where) <= 1 and not always:
            return None, None, lvstores
        for (target, _), (lv, err) in zip(where, parallel(
                *(lambda t=t, n=n: t.lvol_by_name(n, lvol_name) for t, n in where)),
                strict=True):
            if err is not None:
                raise err
            if lv is not None:
                return target, lv, lvstores
        return None, None, lvstores
