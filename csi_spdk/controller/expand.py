"""ControllerExpandVolume below its guard clauses: grow an lvol online
(SPDK resizes exported lvols) to whole clusters, admitted like a create.

Under the targets' admission lock, the growth must fit the lvstore (thin:
within the overcommit ratio); a refusal is decided on fresh figures, never
on a cached provisioned sum alone.
"""

from __future__ import annotations

from ..errors import FailedPrecondition, NotFound, OutOfRange, ResourceExhausted
from ..spdk.errors import SpdkNoSpace, SpdkNotFound
from . import placement
from .capacity import PROVISIONED_TTL
from .target import Lvol, Target, Targets


def grow(targets: Targets, target: Target, lv: Lvol, *, volume_id: str, required: int,
         limit: int, overcommit: float) -> int:
    """Resize ``lv`` to at least ``required`` bytes; the new size."""
    lvs = next((s for s in target.api.lvstores() if s["uuid"] == lv.lvs_uuid), None)
    if lvs is None:
        raise FailedPrecondition(f"lvstore {lv.lvstore} of volume {volume_id} is "
                                 f"not reported by target {target.name}")
    size = placement.align(required, int(lvs["cluster_size"]))
    if limit and size > limit:
        raise OutOfRange(f"{required} bytes rounded to whole clusters ({size}) exceeds "
                         f"limit_bytes {limit}")
    with targets.admission:
        grow = size - lv.size
        for max_age in (PROVISIONED_TTL, 0.0):   # a refusal is decided on fresh figures
            why = placement.shortfall(target.pool(lvs, max_age=max_age), overcommit,
                                      grow if lv.thin else 0, 0 if lv.thin else grow)
            if not why:
                break
        if why:
            raise ResourceExhausted(f"cannot grow volume {volume_id} to {size} "
                                    f"bytes: {why}")
        try:
            target.api.lvol_resize(lv.uuid, size)
        except SpdkNoSpace as err:
            raise ResourceExhausted(f"lvstore {lv.lvstore} has no room to grow the volume "
                                    f"to {size} bytes") from err
        except SpdkNotFound as err:
            raise NotFound(f"volume {volume_id} does not exist") from err
        target.adjust_provisioned(lv.lvstore, size - lv.size)
    return size
