"""The three ways CreateVolume makes a volume: empty, from a snapshot, from a volume.

``CreateVolume`` validates the request once into a ``CreateRequest`` and hands
it to one of ``create_empty``, ``create_from_snapshot`` or
``create_from_volume``; each returns the target and lvol of the volume, which
the service turns into the CSI answer. The two clone paths differ only in how
they find the snapshot to clone (the user's, or a driver-managed ``csic-``
snapshot of the source volume) and share ``_finish_clone``.

Capacity (docs/DESIGN.md "Capacity"): every path works out everything it will
still take (the clone's size, the clusters a new ``csic-`` snapshot holds,
re-inflating a thick source, inflating a thick clone) and checks it against
the lvstore under ``Targets.admission`` BEFORE its first SPDK mutation, so a
refused request leaves nothing behind. A clone is thin (it shares the
snapshot's clusters; that is what makes it instant) unless the request asks
for a thick one explicitly (``thinProvision: "false"``): that clone is then
inflated (``bdev_lvol_inflate``: SPDK copies every cluster it shares, so it
owns its whole size and no longer depends on the snapshot), admitted as a
thick volume of its size. Without the parameter a clone is thin and its
volume_context says so. An inflated clone has no SPDK link to its snapshot,
so a retry answers a thick, unlinked volume of its name in the source's
lvstore as that clone (as a CreateVolume without a source answers any volume
of its name).

Idempotency: each path first looks at what already exists under the volume's
lvol name (``CreateRequest.found``) and only does what is missing, so a retry
after a crash between any two SPDK calls converges. Concurrency: the caller
holds the request name (and, from a volume, the source id) in its locks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from .. import contract
from ..errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    echo,
)
from ..proto import csi_pb2
from ..spdk.errors import SpdkExists, SpdkNoSpace
from . import placement
from .capacity import PROVISIONED_TTL
from .config import Config
from .requests import VolumeParams
from .target import Lvol, Target, Targets

MiB = 1024 * 1024


@dataclass
class CreateRequest:
    """One CreateVolume, validated: what every create path reads."""

    name: str                       # the CSI name
    lvol_name: str                  # contract.volume_lvol_name(name)
    params: VolumeParams
    required: int                   # bytes (after the filesystem floor)
    limit: int                      # bytes, 0 = none
    requisite: list[dict[str, str]] = field(default_factory=list)
    preferred: list[dict[str, str]] = field(default_factory=list)
    source: csi_pb2.VolumeContentSource | None = None
    found_target: Target | None = None     # where an lvol of this name already is
    found: Lvol | None = None
    lvstores: dict[str, list[dict]] = field(default_factory=dict)  # per target, for placement
    looked: bool = True   # the name was looked up (found is the answer)

    def check_size(self, lv: Lvol) -> None:
        """An existing volume of this name must satisfy the requested range."""
        if lv.size < self.required or (self.limit and lv.size > self.limit):
            raise AlreadyExists(f"volume {echo(self.name)} already exists with {lv.size} bytes, "
                                f"which is outside the requested range [{self.required}, "
                                f"{self.limit or 'unlimited'}]")


def size_in(req: CreateRequest, cluster: int, default_size: int) -> int | None:
    """The volume size in an lvstore with this cluster size, or None if no whole
    number of clusters fits the range."""
    if req.required:
        size = placement.align(req.required, cluster)
    else:
        size = placement.align(default_size, cluster)
        if req.limit and size > req.limit:
            size = placement.align_down(req.limit, cluster)
    if size <= 0 or (req.limit and size > req.limit):
        return None
    return size


# --- empty --------------------------------------------------------------------------
def create_empty(targets: Targets, config: Config, req: CreateRequest) -> tuple[Target, Lvol]:
    """A new lvol where placement says, or the one a previous attempt made."""
    if req.found is not None:
        req.check_size(req.found)
        return req.found_target, req.found  # type: ignore[return-value]
    params = req.params
    with targets.admission:
        ranked, sizes = _rank(targets, config, req, fresh=False)
        if not ranked:
            # refusals are decided on fresh figures, never on kept ones
            ranked, sizes = _rank(targets, config, req, fresh=True)
        if not ranked and not req.looked:
            # the name was not looked up (one candidate lvstore): a retry of a
            # volume that filled the room is answered with it, not refused
            req.found_target, req.found, _ = targets.find(
                req.lvol_name, only=params.target, lvstore=params.lvstore)
            req.looked = True
            if req.found is not None:
                req.check_size(req.found)
                return req.found_target, req.found  # type: ignore[return-value]
        if not ranked:
            raise ResourceExhausted(
                f"no lvstore {'accessible from the requested topology ' if req.requisite else ''}"
                f"has room for a {'thin' if params.thin else 'thick'} volume of "
                f"{min(sizes.values())} bytes (GetCapacity tells the room each has)")
        for pool in ranked:
            target = targets[pool.target.name]
            size = sizes[(pool.target.name, pool.lvstore)]
            try:
                made = target.api.intent("create_lvol", {
                    "lvs": pool.lvstore, "name": req.lvol_name, "size_mib": -(-size // MiB),
                    "thin": params.thin, "clear_method": params.clear_method or None})
            except SpdkNoSpace:
                target.lvstores()   # the kept free count was stale: re-read it
                continue  # raced for the space: try the next pool
            if "bdev" in made:      # EEXIST: a previous attempt made it
                lv = Lvol.from_bdev(made["bdev"])
                if lv is None:
                    raise AlreadyExists(f"the lvol name of volume {echo(req.name)} is taken "
                                        f"in lvstore {pool.lvstore} by something else")
                req.check_size(lv)
                return target, lv
            target.adjust_provisioned(pool.lvstore, size)
            if not params.thin:
                target.took_clusters(pool.lvstore, size)
            return target, Lvol(uuid=made["uuid"], name=req.lvol_name, lvstore=pool.lvstore,
                                lvs_uuid="", size=size, thin=params.thin, snapshot=False,
                                clone=False)
    raise ResourceExhausted("every suitable lvstore ran out of space; retry later")


def _rank(targets: Targets, config: Config, req: CreateRequest, fresh: bool
          ) -> tuple[list, dict[tuple[str, str], int]]:
    """The pools that can take the volume, best first, and its size in each.
    ``fresh``: re-read lvstores and provisioned bytes instead of the kept ones."""
    params = req.params
    ratio = config.thin_overcommit_ratio
    pools = []
    for tname, stores in req.lvstores.items():
        if params.target and tname != params.target:
            continue
        target = targets[tname]
        if fresh:
            stores = target.lvstores()
        for lvs in stores:
            if params.lvstore and lvs["name"] != params.lvstore:
                continue
            pools.append(target.pool(lvs, with_provisioned=params.thin or ratio <= 1.0,
                                     max_age=0.0 if fresh else PROVISIONED_TTL))
    if not pools:
        where = f"target {echo(params.target)}" if params.target else "any configured target"
        what = f"lvstore {echo(params.lvstore)}" if params.lvstore else "an lvstore"
        raise InvalidArgument(f"{where} has no {what}")
    sizes = {(p.target.name, p.lvstore): size_in(req, p.cluster_size, config.default_volume_size)
             for p in pools}
    pools = [p for p in pools if sizes[(p.target.name, p.lvstore)] is not None]
    if not pools:
        raise OutOfRange(f"no lvstore can hold a volume in [{req.required}, {req.limit}] "
                         "bytes (sizes are whole clusters)")
    ranked = placement.rank(pools, lambda p: sizes[(p.target.name, p.lvstore)],
                            params.thin, ratio, req.requisite, req.preferred)
    return ranked, sizes  # type: ignore[return-value]


# --- clones -------------------------------------------------------------------------
def create_from_snapshot(targets: Targets, config: Config,
                         req: CreateRequest) -> tuple[Target, Lvol]:
    """A clone of the user's snapshot (or the clone a previous attempt made)."""
    snapshot_id = req.source.snapshot.snapshot_id  # type: ignore[union-attr]
    oid = contract.parse_id(snapshot_id, "snapshot")
    target = targets.of(oid, "snapshot")
    snap = target.lvol(oid.lvol_uuid)
    if snap is None or not snap.snapshot or not contract.is_snapshot_lvol(snap.name) \
            or target.deleted_mark(snap) is not None:
        snap = None
    _drop_unfinished(req, target, snap.lvstore if snap else None, snap)
    if snap is None:
        # Gone (perhaps merged into a clone an earlier attempt made): nothing in
        # SPDK proves that a finished volume holding the name came from it, so
        # it is never answered with (it may be an unrelated volume of that name).
        held = ""
        if req.found is not None:
            vid = contract.ObjectId(req.found_target.name, req.found.uuid)  # type: ignore
            held = (f"; volume {vid} holds the name {echo(req.name)} (delete it if an "
                    "earlier attempt left it)")
        raise NotFound(f"snapshot {snapshot_id} does not exist{held}")
    plan = _ClonePlan.of(req, target, snap.lvstore, snap.size)
    with targets.admission:
        plan.admit(target, config, *plan.clone_need(req))
    return _finish_clone(targets, req, target, snap, plan)


def create_from_volume(targets: Targets, config: Config,
                       req: CreateRequest) -> tuple[Target, Lvol]:
    """A clone of a driver-managed snapshot (``csic-``) of the source volume."""
    target, src = targets.volume(req.source.volume.volume_id)  # type: ignore[union-attr]
    csic = contract.clone_source_lvol_name(req.name)
    with targets.using(csic):
        return _from_volume(targets, config, req, target, src, csic)


def _from_volume(targets: Targets, config: Config, req: CreateRequest, target: Target,
                 src: Lvol, csic: str) -> tuple[Target, Lvol]:
    snap = target.lvol_by_name(src.lvstore, csic)
    _drop_unfinished(req, target, src.lvstore, snap)  # e.g. the reconciler merged csic- away
    plan = _ClonePlan.of(req, target, src.lvstore, snap.size if snap else src.size)
    thin_need, thick_need = plan.clone_need(req)
    with targets.admission:
        if snap is None and req.found is None:
            # The snapshot holds the source's clusters; a thick source is
            # inflated back afterwards (Target.keep_thick).
            if src.thin:
                thin_need += src.allocated_clusters * plan.cluster
            else:
                thick_need += src.size
            plan.admit(target, config, thin_need, thick_need)
            with contextlib.suppress(SpdkExists):
                target.api.snapshot(src.uuid, csic)
            target.forget_provisioned(src.lvstore, held=src.size)
            snap = target.lvol_by_name(src.lvstore, csic)
            if snap is None:
                raise NotFound(f"clone source snapshot {csic} vanished; retry")
        else:
            if snap is not None and not snap.thin and src.thin and \
                    src.base_snapshot == snap.name:
                # a crash between the snapshot and re-inflating the source
                thick_need += src.size - src.allocated_clusters * plan.cluster
            plan.admit(target, config, thin_need, thick_need)
    if snap is not None:
        target.keep_thick(src, snap)
    return _finish_clone(targets, req, target, snap, plan)


@dataclass
class _ClonePlan:
    """The size a clone gets, validated before anything is created."""

    lvstore: str
    cluster: int
    base_size: int      # the snapshot's size
    size: int           # the clone's size: the snapshot's, grown to required_bytes
    thick: bool = False  # inflated after the clone (thinProvision: "false")

    @classmethod
    def of(cls, req: CreateRequest, target: Target, lvstore: str, base_size: int) -> _ClonePlan:
        params = req.params
        if params.target and params.target != target.name or \
                params.lvstore and params.lvstore != lvstore:
            raise InvalidArgument(f"the content source lives on {target.name}/{lvstore}, "
                                  "which contradicts the target/lvstore parameters")
        if not placement.accessible(target.cfg, req.requisite):
            raise ResourceExhausted(f"the content source lives on target {target.name}, "
                                    "which is not accessible from the requested topology")
        cluster = next((int(s["cluster_size"]) for s in req.lvstores.get(target.name, [])
                        if s["name"] == lvstore), 0)
        size = max(base_size, placement.align(req.required, cluster) if req.required else 0)
        if req.limit and size > req.limit:
            raise OutOfRange(
                f"the content source has {base_size} bytes; a clone of at least "
                f"{max(base_size, req.required)} bytes in whole clusters is {size} bytes, "
                f"more than limit_bytes {req.limit}")
        if req.found is not None:
            found = req.found
            if req.limit and found.size > req.limit or found.size < size and \
                    found.size != base_size:
                req.check_size(found)
        return cls(lvstore, cluster, base_size, size, thick_asked(req))

    def clone_need(self, req: CreateRequest) -> tuple[int, int]:
        """(provisioned, allocated) bytes the clone steps still take: its size, and
        for a thick clone the clusters the inflate allocates."""
        found = req.found
        grow = self.size if found is None else max(0, self.size - found.size)
        if not self.thick or found is not None and not found.thin:
            return grow, 0
        owned = 0 if found is None else found.allocated_clusters * self.cluster
        return grow, max(0, self.size - owned)

    def admit(self, target: Target, config: Config, thin_bytes: int, thick_bytes: int) -> None:
        if not thin_bytes and not thick_bytes:
            return
        pool = target.pool_of(self.lvstore)
        why = placement.shortfall(pool, config.thin_overcommit_ratio, thin_bytes, thick_bytes)
        if why:   # refusals are decided on fresh figures
            pool = target.pool_of(self.lvstore, max_age=0.0)
            why = placement.shortfall(pool, config.thin_overcommit_ratio, thin_bytes,
                                      thick_bytes)
        if why:
            raise ResourceExhausted(f"no room for the clone: {why}")


def thick_asked(req: CreateRequest) -> bool:
    return req.params.thin_set and not req.params.thin


def _clones(req: CreateRequest, target: Target, lvstore: str | None,
            snap: Lvol | None) -> bool:
    """Is the volume found under the name this request's clone (of ``snap``, or
    for a thick clone: already inflated, so SPDK no longer links them)?"""
    found = req.found
    if found is None or req.found_target is not target or found.lvstore != lvstore:
        return False
    if snap is not None and found.base_snapshot == snap.name:
        return True
    return thick_asked(req) and not found.thin and found.base_snapshot is None


def _drop_unfinished(req: CreateRequest, target: Target, lvstore: str | None,
                     snap: Lvol | None) -> None:
    """A clone an earlier attempt left unfinished (it has a pending marker: no
    caller ever got it) that cannot be finished from ``snap`` (gone, or another
    source) is the driver's own leftover: delete it so the request starts over
    (or gets a clean NOT_FOUND for a deleted snapshot)."""
    found, where = req.found, req.found_target
    if found is None or where is None or _clones(req, target, lvstore, snap):
        return
    if where.is_pending(found):
        where.delete_unfinished(found)
        req.found = req.found_target = None


def _finish_clone(targets: Targets, req: CreateRequest, target: Target, snap: Lvol | None,
                  plan: _ClonePlan) -> tuple[Target, Lvol]:
    """Clone ``snap`` under the volume's name and grow it to the planned size.

    A pending marker (contract.PENDING_PREFIX) exists from before the clone
    until the clone is finished, so a retry can tell an unfinished clone (the
    driver's to delete) from a volume a caller may have."""
    if req.found is not None and not _clones(req, target, plan.lvstore, snap):
        raise AlreadyExists(f"volume {echo(req.name)} already exists with a different "
                            "content source")
    with targets.using(contract.pending_lvol_name(req.lvol_name)):
        lv = _clone_and_grow(req, target, snap, plan)
        target.drop_pending(lv.lvstore, req.lvol_name)
    return target, lv


def _clone_and_grow(req: CreateRequest, target: Target, snap: Lvol | None,
                    plan: _ClonePlan) -> Lvol:
    size = plan.size
    lv = req.found
    if lv is None:
        target.mark_pending(snap.lvstore, req.lvol_name)  # type: ignore[union-attr]
        try:
            uuid = target.api.clone(snap.alias, req.lvol_name)  # type: ignore[union-attr]
        except SpdkExists:
            uuid = None
        lv = target.lvol(uuid) if uuid else \
            target.lvol_by_name(snap.lvstore, req.lvol_name)  # type: ignore[union-attr]
        if lv is None:
            raise NotFound(f"clone {req.lvol_name} vanished after creation; retry")
        target.adjust_provisioned(lv.lvstore, lv.size)
    if lv.size < size and lv.size == plan.base_size:
        # New clone, or a retry after a crash between clone and resize.
        try:
            target.api.lvol_resize(lv.uuid, size)
        except SpdkNoSpace as err:
            raise ResourceExhausted(f"no space to grow the clone to {size} bytes") from err
        target.adjust_provisioned(lv.lvstore, size - lv.size)
        lv.size = size
    if plan.thick and lv.thin:
        target.api.inflate(lv.uuid)     # owns every cluster, no longer a clone
        lv.thin, lv.clone, lv.base_snapshot = False, False, None
        target.forget_provisioned()
        if snap is not None:            # one clone fewer: a hidden parent may go now
            with target.lineage:
                target.reclaim(snap.lvstore, snap.name)
    req.check_size(lv)
    return lv
