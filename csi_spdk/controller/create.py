"""The three ways CreateVolume makes a volume: empty, from a snapshot, from a volume.

``CreateVolume`` validates the request once into a ``CreateRequest`` and hands
it to one of ``create_empty``, ``create_from_snapshot`` or
``create_from_volume``; each returns the target and lvol of the volume, which
the service turns into the CSI answer. The two clone paths differ only in how
they find the snapshot to clone (the user's, or a driver-managed ``csic-``
snapshot of the source volume) and share ``_finish_clone``.

Idempotency: each path first looks at what already exists under the volume's
lvol name (``CreateRequest.found``) and only does what is missing, so a retry
after a crash between any two SPDK calls converges. Concurrency: the caller
holds the request name (and, from a volume, the source id) in its locks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from .. import contract
from ..errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from ..proto import csi_pb2
from ..spdk.errors import SpdkExists, SpdkNoSpace
from . import placement
from .config import Config
from .requests import VolumeParams
from .target import Lvol, Target, Targets


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

    def check_size(self, lv: Lvol) -> None:
        """An existing volume of this name must satisfy the requested range."""
        if lv.size < self.required or (self.limit and lv.size > self.limit):
            raise AlreadyExists(f"volume {self.name!r} already exists with {lv.size} bytes, "
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
    pools = []
    for tname, stores in req.lvstores.items():
        if params.target and tname != params.target:
            continue
        target = targets[tname]
        for lvs in stores:
            if params.lvstore and lvs["name"] != params.lvstore:
                continue
            pools.append(target.pool(lvs, with_provisioned=params.thin))
    if not pools:
        where = f"target {params.target!r}" if params.target else "any configured target"
        what = f"lvstore {params.lvstore!r}" if params.lvstore else "an lvstore"
        raise InvalidArgument(f"{where} has no {what}")
    sizes = {(p.target.name, p.lvstore): size_in(req, p.cluster_size, config.default_volume_size)
             for p in pools}
    pools = [p for p in pools if sizes[(p.target.name, p.lvstore)] is not None]
    if not pools:
        raise OutOfRange(f"no lvstore can hold a volume in [{req.required}, {req.limit}] bytes "
                         "(sizes are whole clusters)")
    ranked = placement.rank(pools, lambda p: sizes[(p.target.name, p.lvstore)], params.thin,
                            config.thin_overcommit_ratio, req.requisite, req.preferred)
    if not ranked:
        raise ResourceExhausted(
            f"no lvstore {'accessible from the requested topology ' if req.requisite else ''}"
            f"has room for a {'thin' if params.thin else 'thick'} volume of "
            f"{min(sizes.values())} bytes")
    for pool in ranked:
        target = targets[pool.target.name]
        size = sizes[(pool.target.name, pool.lvstore)]
        try:
            uuid = target.api.lvol_create(pool.lvstore, req.lvol_name, size, params.thin,
                                          params.clear_method or None)
        except SpdkNoSpace:
            continue  # raced for the space: try the next pool
        except SpdkExists:
            lv = target.lvol_by_name(pool.lvstore, req.lvol_name)
            if lv is None:
                raise
            req.check_size(lv)
            return target, lv
        target.adjust_provisioned(pool.lvstore, size)
        return target, Lvol(uuid=uuid, name=req.lvol_name, lvstore=pool.lvstore, lvs_uuid="",
                            size=size, thin=params.thin, snapshot=False, clone=False)
    raise ResourceExhausted("every suitable lvstore ran out of space; retry later")


# --- clones -------------------------------------------------------------------------
def create_from_snapshot(targets: Targets, req: CreateRequest) -> tuple[Target, Lvol]:
    """A clone of the user's snapshot (or the clone a previous attempt made)."""
    snapshot_id = req.source.snapshot.snapshot_id  # type: ignore[union-attr]
    oid = contract.parse_id(snapshot_id, "snapshot")
    target = targets.of(oid, "snapshot")
    snap = target.lvol(oid.lvol_uuid)
    if snap is None or not snap.snapshot or not contract.is_snapshot_lvol(snap.name) \
            or target.deleted_mark(snap) is not None:
        snap = None
    if snap is None and req.found is not None and req.found_target is target:
        # The snapshot was deleted after the clone (it merged into it).
        req.check_size(req.found)
        return target, req.found
    if snap is None:
        raise NotFound(f"snapshot {snapshot_id} does not exist")
    return _finish_clone(req, target, snap)


def create_from_volume(targets: Targets, req: CreateRequest) -> tuple[Target, Lvol]:
    """A clone of a driver-managed snapshot (``csic-``) of the source volume."""
    target, src = targets.volume(req.source.volume.volume_id)  # type: ignore[union-attr]
    csic = contract.clone_source_lvol_name(req.name)
    snap = target.lvol_by_name(src.lvstore, csic)
    if snap is None and req.found is None:
        with contextlib.suppress(SpdkExists):
            target.api.snapshot(src.uuid, csic)
        snap = target.lvol_by_name(src.lvstore, csic)
        if snap is None:
            raise NotFound(f"clone source snapshot {csic} vanished; retry")
    return _finish_clone(req, target, snap)


def _finish_clone(req: CreateRequest, target: Target, snap: Lvol | None) -> tuple[Target, Lvol]:
    """Clone ``snap`` under the volume's name and grow it to the requested size."""
    if req.found is not None:
        compatible = req.found_target is target and snap is not None and \
            req.found.lvstore == snap.lvstore and req.found.base_snapshot == snap.name
        if not compatible:
            raise AlreadyExists(f"volume {req.name!r} already exists with a different "
                                "content source")
    params = req.params
    if params.target and params.target != target.name or \
            params.lvstore and params.lvstore != snap.lvstore:
        raise InvalidArgument(f"the content source lives on {target.name}/{snap.lvstore}, "
                              "which contradicts the target/lvstore parameters")
    if not placement.accessible(target.cfg, req.requisite):
        raise ResourceExhausted(f"the content source lives on target {target.name}, "
                                "which is not accessible from the requested topology")
    if req.limit and snap.size > req.limit:
        raise OutOfRange(f"the content source has {snap.size} bytes, more than "
                         f"limit_bytes {req.limit}")
    cluster = next((int(s["cluster_size"]) for s in req.lvstores.get(target.name, [])
                    if s["name"] == snap.lvstore), 0)
    size = max(snap.size, placement.align(req.required, cluster) if req.required else 0)
    if req.limit and size > req.limit:
        size = snap.size
    lv = req.found
    if lv is None:
        try:
            uuid = target.api.clone(snap.alias, req.lvol_name)
        except SpdkExists:
            uuid = None
        lv = target.lvol(uuid) if uuid else target.lvol_by_name(snap.lvstore, req.lvol_name)
        if lv is None:
            raise NotFound(f"clone {req.lvol_name} vanished after creation; retry")
    if lv.size < size and lv.size == snap.size:
        # New clone, or a retry after a crash between clone and resize.
        try:
            target.api.lvol_resize(lv.uuid, size)
        except SpdkNoSpace as err:
            raise ResourceExhausted(f"no space to grow the clone to {size} bytes") from err
        lv.size = size
        target.adjust_provisioned(lv.lvstore, size)
    req.check_size(lv)
    return target, lv
