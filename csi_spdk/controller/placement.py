"""Choosing where a new volume goes: capacity, overcommit and topology.

Pure functions over ``Pool`` snapshots (one per target/lvstore) so the policy
is testable without SPDK. The capacity rule (docs/DESIGN.md "Capacity"):
``provisioned`` is what the lvstore would need if every volume were rewritten
completely: the sizes of all volumes (thick, thin and clones) plus the
clusters snapshots hold (user snapshots, driver-managed ``csic-`` ones and
user-deleted hidden ones alike; a snapshot's clusters stay allocated until it
is deleted). Thin volumes may provision up to ``ratio x total``. Thick volumes
need free clusters now; at ``ratio <= 1`` every thin byte is a promise too,
so a thick volume also needs ``total - provisioned``. A thick volume owns all
its clusters for its whole life (the controller re-inflates it after SPDK
turns it thin at a snapshot), so thin writes can never take its space.
Topology: NVMe/TCP reaches every target from every node, so a
pool is accessible from a CSI topology segment unless the target's configured
labels (e.g. a zone) conflict with it: no key they share may differ. The node
hosting a target never excludes it; it ranks it: preferred segments rank pools
whose ``node`` is the preferred node first (the consumer's own node), then
pools whose labels match earlier preferred segments, then the most room.

Concurrency: stateless; the caller serialises decisions that race for space
(two CreateVolumes may both pick a nearly full pool; the loser's lvol create
fails with ENOSPC and it tries the next pool).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .. import contract
from .config import TargetConfig

MiB = 1024 * 1024


@dataclass(frozen=True)
class Pool:
    """Capacity of one lvstore on one target, as read from SPDK."""

    target: TargetConfig
    lvstore: str
    cluster_size: int
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int = 0   # volume sizes + bytes held by snapshots

    def available(self, thin: bool, ratio: float) -> int:
        """Bytes a new volume (or growth, or snapshot) of this kind may still take."""
        if thin:
            return max(0, int(self.total_bytes * ratio) - self.provisioned_bytes)
        if ratio <= 1.0:
            return max(0, min(self.free_bytes, self.total_bytes - self.provisioned_bytes))
        return max(0, self.free_bytes)

    def fits(self, size: int, thin: bool, ratio: float) -> bool:
        return size <= self.available(thin, ratio)


def align(size: int, cluster_size: int) -> int:
    """Round up to whole clusters and whole MiB (SPDK sizes lvols in MiB)."""
    step = math.lcm(max(1, cluster_size), MiB)
    return max(step, -(-size // step) * step)


def align_down(size: int, cluster_size: int) -> int:
    step = math.lcm(max(1, cluster_size), MiB)
    return (size // step) * step


def compatible(segment: Mapping[str, str], topology: Mapping[str, str]) -> bool:
    """True when no key present in both has a different value."""
    return all(segment[k] == v for k, v in topology.items() if k in segment)


def accessible(target: TargetConfig, requisite: Sequence[Mapping[str, str]]) -> bool:
    """A pool is usable when there is no requisite, or it suits one of them."""
    if not requisite:
        return True
    seg = target.segment()
    return any(compatible(seg, t) for t in requisite)


def _preference(target: TargetConfig, preferred: Sequence[Mapping[str, str]]) -> tuple[int, int]:
    n = len(preferred)
    node_rank = next((i for i, t in enumerate(preferred)
                      if target.node and t.get(contract.TOPOLOGY_NODE_KEY) == target.node), n)
    seg = target.segment()
    topo_rank = next((i for i, t in enumerate(preferred)
                      if set(t) & set(seg) and compatible(seg, t)), n)
    return node_rank, topo_rank


def rank(pools: Iterable[Pool], size_of, thin: bool, ratio: float,
         requisite: Sequence[Mapping[str, str]] = (),
         preferred: Sequence[Mapping[str, str]] = ()) -> list[Pool]:
    """Pools that can take the volume, best first.

    ``size_of(pool)`` gives the volume's size in that pool (sizes round to the
    pool's cluster size).
    """
    usable = [p for p in pools
              if accessible(p.target, requisite) and p.fits(size_of(p), thin, ratio)]
    return sorted(usable, key=lambda p: (*_preference(p.target, preferred),
                                         -p.available(thin, ratio), p.target.name, p.lvstore))


def shortfall(pool: Pool, ratio: float, thin_bytes: int = 0, thick_bytes: int = 0) -> str:
    """Why ``pool`` cannot take ``thin_bytes`` more provisioned bytes and
    ``thick_bytes`` more allocated ones; "" when it can."""
    for need, thin in ((thin_bytes, True), (thick_bytes, False)):
        room = pool.available(thin, ratio)
        if need > room:
            kind = (f"thin provisioning (up to {ratio:g} x {pool.total_bytes} bytes, "
                    "counting volume sizes and the clusters snapshots hold)") if thin \
                else "thick (allocated) space"
            return (f"lvstore {pool.lvstore} on target {pool.target.name} needs {need} "
                    f"more bytes of {kind} but has {room}")
    return ""
