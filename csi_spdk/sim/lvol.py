"""Logical volume stores and lvols with SPDK blobstore cluster accounting.

Model (as observed on SPDK v25.09, see spdk-golden/README.md):
- a thick lvol owns all its clusters from creation; a thin one owns none and
  gets a cluster on the first write to it (copy-on-write for clones);
- a snapshot takes over the source's clusters, the source becomes a thin
  clone of it (``free_clusters`` unchanged);
- deleting a snapshot with exactly one child merges its clusters into the
  child; with more it is refused (EPERM);
- inflate allocates every cluster and makes the lvol thick; decouple copies
  the parent's allocated clusters, re-parents to the grandparent, stays thin.
The metadata overhead of an lvstore follows the blobstore layout (super block,
three masks, one metadata page per cluster).
"""

from __future__ import annotations

import math
import uuid as uuidlib
from pathlib import Path
from typing import Any

from . import files
from .bdev import Bdev, io_types
from .state import (
    EINVAL,
    ENOSPC,
    EPERM,
    SimState,
    async_error,
    errno_error,
)

PAGE = 4096
DEFAULT_CLUSTER = 4 << 20
MAX_NAME = 63
CLEAR_METHODS = ("none", "unmap", "write_zeroes")


EXTENTS_PER_PAGE = 512   # clusters one extent page maps (SPDK_EXTENTS_PER_EP)
DEFAULT_MD_RATIO = 100   # num_md_pages_per_cluster_ratio
U64 = (1 << 64) - 1
# The blobstore keeps 8 bytes per cluster of a blob in memory (realloc'd, then
# memset) even when thin: a cluster array larger than this is ENOMEM. A real
# target's limit is its host's memory; the sizes that reach it (u64
# wrap-arounds, exabyte lvols) are orders of magnitude beyond either.
MAX_CLUSTER_ARRAY = 1 << 36


def wrapped_clusters(size_in_mib: int, cluster_size: int) -> int:
    """Clusters SPDK computes for ``size_in_mib``, with its u64 arithmetic.

    ``size_in_mib * 1024 * 1024`` and ``spdk_divide_round_up`` both wrap
    modulo 2^64: 2^44 MiB is 0 bytes, and 2^64 - 1 MiB with 4 MiB clusters
    rounds up past 2^64 to 0 clusters.
    """
    size = (size_in_mib << 20) & U64
    return ((size + cluster_size - 1) & U64) // cluster_size


def extent_pages(num_clusters: int) -> int:
    return -(-num_clusters // EXTENTS_PER_PAGE)


def metadata_pages(num_clusters: int, md_pages: int) -> int:
    """Pages the blobstore reserves at the start of the base bdev."""
    def mask(bits: int) -> int:
        return math.ceil((8 + math.ceil(bits / 8)) / PAGE)
    return 1 + mask(md_pages) + mask(num_clusters) + mask(md_pages) + md_pages


class Lvstore:
    def __init__(self, state: SimState, name: str, base: Bdev, cluster_size: int,
                 clear_method: str, md_ratio: int = DEFAULT_MD_RATIO,
                 lvs_uuid: str | None = None) -> None:
        self.state = state
        self.uuid = lvs_uuid or str(uuidlib.uuid4())
        self.on_disk = False        # metadata persisted (aio base): see persist.py
        self.name = name
        self.new_name = ""      # SPDK's lvs->new_name: empty until a rename
        self.base_bdev = base
        self.cluster_size = cluster_size
        self.block_size = base.block_size
        num_clusters = base.size // cluster_size
        # Metadata pages: one per blob plus one extent page per EXTENTS_PER_PAGE
        # allocated clusters; the lvstore's super blob takes one. On spdk_tgt
        # v25.09 a 264 MiB lvstore with 1 MiB clusters held 131 thick 1 MiB
        # lvols (then ENOSPC) or 263 thin ones (then ENOMEM).
        self.md_pages = num_clusters * md_ratio // 100
        reserved = metadata_pages(num_clusters, self.md_pages)
        self.total_clusters = num_clusters - math.ceil(reserved * PAGE / cluster_size)
        self.md_bytes = reserved * PAGE
        self.clear_method = clear_method
        self.lvols: list[Lvol] = []
        self.dir = state.data_dir / "lvstores" / self.uuid
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def free_clusters(self) -> int:
        return self.total_clusters - sum(len(lv.clusters) for lv in self.lvols)

    @property
    def free_md_pages(self) -> int:
        return self.md_pages - 1 - sum(lv.md_pages for lv in self.lvols)

    def need_md_pages(self, pages: int, err: int) -> None:
        if pages > self.free_md_pages:
            raise async_error(err)

    def json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "base_bdev": self.base_bdev.name,
                "total_data_clusters": self.total_clusters, "free_clusters": self.free_clusters,
                "block_size": self.block_size, "cluster_size": self.cluster_size}

    def find(self, name: str) -> Lvol | None:
        return next((lv for lv in self.lvols if lv.name == name), None)

    def hot_remove(self) -> None:
        """The base bdev went away: the lvstore and all its lvols vanish (an
        lvstore on disk stays there, unloaded, for the next examine)."""
        for lv in list(reversed(self.lvols)):
            lv.destroy(keep_file=self.on_disk)
        self.state.lvstores.remove(self)
        self.base_bdev.claim_type = None
        if self.on_disk:
            self.state.persist.detached(self)
        else:
            _rmdir(self.dir)


def _rmdir(path: Path) -> None:
    try:
        for child in path.iterdir():
            files.remove(child)
        path.rmdir()
    except OSError:
        pass


class LvolBdev(Bdev):
    """The bdev an lvol presents: named by its uuid, alias ``lvs/lvol``."""

    product_name = "Logical Volume"

    @property
    def has_memory_domains(self) -> bool:  # type: ignore[override]
        """The blobstore passes its base bdev's memory domains through."""
        return self.lvol.lvs.base_bdev.has_memory_domains

    def __init__(self, lvol: Lvol) -> None:
        super().__init__(lvol.lvs.state, lvol.uuid, lvol.lvs.block_size,
                         lvol.size // lvol.lvs.block_size, lvol.uuid)
        self.lvol = lvol
        self.aliases = [lvol.alias]

    @property
    def supported(self) -> dict[str, bool]:  # type: ignore[override]
        if self.lvol.read_only:
            return io_types("read", "reset", "seek_hole", "seek_data")
        return io_types("read", "write", "unmap", "reset", "write_zeroes", "seek_hole",
                        "seek_data")

    def driver_specific(self) -> dict[str, Any]:
        lv = self.lvol
        out: dict[str, Any] = {"lvol_store_uuid": lv.lvs.uuid,
                               "base_bdev": lv.lvs.base_bdev.name,
                               "thin_provision": lv.thin,
                               "num_allocated_clusters": len(lv.clusters),
                               "snapshot": lv.has_clones, "clone": lv.parent is not None}
        if lv.parent is not None:
            out["base_snapshot"] = lv.parent.name
        if lv.has_clones and lv.children:     # SPDK omits an empty list
            out["clones"] = [c.name for c in lv.children]
        out["esnap_clone"] = False
        return {"lvol": out}


class Lvol:
    def __init__(self, lvs: Lvstore, name: str, num_clusters: int, thin: bool,
                 clear_method: str, lvol_uuid: str | None = None) -> None:
        self.lvs = lvs
        self.uuid = lvol_uuid or str(uuidlib.uuid4())
        self.name = name
        self.num_clusters = num_clusters
        self.thin = thin
        self.clear_method = clear_method
        self.clusters: set[int] = set()    # callers allocate after their checks
        self.bdev_alias = f"{lvs.name}/{name}"
        self.parent: Lvol | None = None
        self.children: list[Lvol] = []
        self.is_snapshot = False
        self.clone_entry = False
        self.set_read_only = False
        self.path = lvs.dir / f"{self.uuid}.img"
        self.bdev = LvolBdev(self)

    # --- derived -----------------------------------------------------
    @property
    def alias(self) -> str:
        return f"{self.lvs.name}/{self.name}"

    @property
    def size(self) -> int:
        return self.num_clusters * self.lvs.cluster_size

    @property
    def has_clones(self) -> bool:
        """What SPDK reports as ``is_snapshot``: the blob has a snapshot-list entry.

        The entry appears with the first clone and only goes with the blob, so
        a snapshot whose clones were all deleted or inflated still reports
        ``is_snapshot`` (and ``clones: []``); a read-only lvol that got a
        clone reports it too.
        """
        return self.clone_entry or bool(self.children)

    def adopt(self, child: Lvol) -> None:
        self.children.append(child)
        self.clone_entry = True

    @property
    def read_only(self) -> bool:
        return self.is_snapshot or self.set_read_only

    @property
    def md_pages(self) -> int:
        """Its metadata page and the extent pages of its allocated clusters."""
        n = len(self.clusters)
        if n == self.num_clusters:
            return 1 + extent_pages(n)
        return 1 + len({c // EXTENTS_PER_PAGE for c in self.clusters})

    def json(self) -> dict[str, Any]:
        return {"alias": self.alias, "uuid": self.uuid, "name": self.name,
                "is_thin_provisioned": self.thin, "is_snapshot": self.has_clones,
                "is_clone": self.parent is not None, "is_esnap_clone": False,
                "is_degraded": False, "num_allocated_clusters": len(self.clusters),
                "lvs": {"name": self.lvs.name, "uuid": self.lvs.uuid}}

    # --- lifecycle ---------------------------------------------------
    def register(self) -> None:
        self.lvs.lvols.append(self)
        self.lvs.state.register_bdev(self.bdev)

    def sync_bdev(self, alias: bool = False) -> None:
        """Refresh the bdev's size (and, after an lvstore rename, its alias)."""
        self.bdev.num_blocks = self.size // self.lvs.block_size
        if alias:
            self.bdev.aliases = [self.alias]

    def destroy(self, keep_file: bool = False) -> None:
        """Drop the lvol, its bdev (and namespace) and its file. No checks."""
        state = self.lvs.state
        state.unregister_bdev(self.bdev)
        if self.parent is not None:
            self.parent.children.remove(self)
        if self in self.lvs.lvols:
            self.lvs.lvols.remove(self)
        if not keep_file:
            files.remove(self.path)

    def allocate(self, wanted: set[int]) -> None:
        """Give this lvol the clusters in ``wanted`` it does not own yet (ENOSPC)."""
        new = wanted - self.clusters
        if len(new) > self.lvs.free_clusters:
            raise async_error(ENOSPC)
        self.clusters |= new

    def allocate_all(self, num_clusters: int) -> None:
        """Own clusters [0, num_clusters): the free-space check comes before any set."""
        owned = sum(1 for c in self.clusters if c < num_clusters)
        if num_clusters - owned > self.lvs.free_clusters:
            raise async_error(ENOSPC)
        self.clusters |= set(range(num_clusters))

    # --- I/O (simulator only) ------------------------------------------
    def write(self, offset: int, data: bytes, io_size: int = 0) -> None:
        """A host write: allocate touched clusters (COW in clones), then store."""
        if self.read_only:
            raise errno_error(EPERM)
        if offset < 0 or offset + len(data) > self.size:
            raise errno_error(EINVAL)
        if data:
            cs = self.lvs.cluster_size
            first, last = offset // cs, (offset + len(data) - 1) // cs
            self.allocate(set(range(first, last + 1)))
            files.write(self.path, offset, data)
        ops = max(1, math.ceil(len(data) / io_size)) if io_size else 1
        self.bdev.iostat.add("write", len(data), ops)
        if self.bdev.opened:
            self.bdev.channel_stat.add("write", len(data), ops)

    def read(self, offset: int, length: int, io_size: int = 0) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise errno_error(EINVAL)
        ops = max(1, math.ceil(length / io_size)) if io_size else 1
        self.bdev.iostat.add("read", length, ops)
        if self.bdev.opened:
            self.bdev.channel_stat.add("read", length, ops)
        return files.read(self.path, offset, length)

    def reconcile(self) -> bool:
        """Best effort: count clusters a kernel data plane wrote into the file.

        A cluster not yet owned is taken as written when the file has data in
        it (SEEK_DATA) and, in a clone, when its content differs from what the
        parent chain presents there. Writes that leave a clone's cluster equal
        to the parent's data, and writes beyond free space, go unnoticed.
        """
        changed = False
        cs = self.lvs.cluster_size
        for idx in files.data_clusters(self.path, cs, self.num_clusters):
            if idx in self.clusters or self.lvs.free_clusters == 0:
                continue
            start, end = idx * cs, (idx + 1) * cs
            if not files.range_has_data(self.path, start, end):
                continue
            if self.parent is not None and files.ranges_equal(self.path, self.parent.path,
                                                              start, end):
                continue
            self.clusters.add(idx)
            changed = True
        return changed


# --- validation helpers ------------------------------------------------------
