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

import errno as errno_mod
import math
import uuid as uuidlib
from pathlib import Path
from typing import Any

from . import files
from .bdev import Bdev, io_types
from .state import (
    EEXIST,
    EINVAL,
    ENODEV,
    ENOMEM,
    ENOSPC,
    EPERM,
    NoParams,
    RpcError,
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

def check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME:
        raise errno_error(EINVAL)


def verify_new_name(lvs: Lvstore, name: str) -> None:
    """``lvs_verify_lvol_name`` reported through a callback (snapshot, clone)."""
    if not name or len(name) > MAX_NAME:
        raise async_error(EINVAL)
    if lvs.find(name) is not None:
        raise async_error(EEXIST)


def find_lvol(state: SimState, name: str) -> Lvol:
    bdev = state.find_bdev(name)
    if not isinstance(bdev, LvolBdev):
        raise errno_error(ENODEV)
    return bdev.lvol


def lvstore_from(state: SimState, p: dict[str, Any], name_key: str = "lvs_name",
                 uuid_key: str = "uuid") -> Lvstore:
    name, uuid = p.get(name_key), p.get(uuid_key)
    if (name is None) == (uuid is None):
        raise errno_error(EINVAL)
    lvs = state.find_lvstore(name=name) if name is not None else state.find_lvstore(uuid=uuid)
    if lvs is None:
        raise errno_error(ENODEV)
    return lvs


def notify_resized(state: SimState, lv: Lvol) -> None:
    state.nvmf.bdev_resized(lv.bdev)
    state.crypto.base_resized(lv.bdev)


# --- lvstore RPCs ------------------------------------------------------------

def create_lvstore(state: SimState, p: dict[str, Any]) -> str:
    # SPDK's order: clear_method (RPC), name (vbdev), opening the base bdev,
    # cluster size vs the bdev's block size and the name in use (lvs_init),
    # then the blobstore's own checks, reported through the callback.
    cluster_size = p.get("cluster_sz", DEFAULT_CLUSTER) or DEFAULT_CLUSTER
    clear_method = p.get("clear_method", "unmap").lower()
    if clear_method not in CLEAR_METHODS:
        raise RpcError(-EINVAL, "Invalid clear_method parameter")
    name = p["lvs_name"]
    if not name or len(name) > MAX_NAME:
        raise errno_error(EINVAL)
    base = state.must_bdev(p["bdev_name"])
    if base.claim_type is not None:
        raise errno_error(EPERM)
    if cluster_size < base.block_size or cluster_size % base.block_size:
        raise errno_error(EINVAL)
    if state.find_lvstore(name=name) is not None:
        raise errno_error(EEXIST)
    if cluster_size % PAGE:
        raise async_error(EINVAL)
    num_clusters = base.size // cluster_size
    md_ratio = p.get("num_md_pages_per_cluster_ratio") or DEFAULT_MD_RATIO
    md_pages = num_clusters * md_ratio // 100
    if num_clusters == 0 or metadata_pages(num_clusters, md_pages) * PAGE >= base.size:
        raise async_error(EINVAL)
    lvs = Lvstore(state, name, base, cluster_size, clear_method, md_ratio)
    if lvs.total_clusters <= 0:
        raise async_error(EINVAL)
    base.claim_type = "read_many_write_one"
    # Blobstore init I/O on the base bdev: metadata reads/writes, unmap of data area.
    base.iostat.add("read", 3 * PAGE, 3)
    base.iostat.add("write", 5 * PAGE, 5)
    base.iostat.add("unmap", base.size - lvs.md_bytes, 1)
    state.lvstores.append(lvs)
    state.persist.created(lvs)
    return lvs.uuid


def get_lvstores(state: SimState, p: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(p, NoParams):      # {} is neither name nor uuid: EINVAL
        return [lvstore_from(state, p).json()]
    reconcile_all(state)
    return [lvs.json() for lvs in state.lvstores]


def rename_lvstore(state: SimState, p: dict[str, Any]) -> bool:
    """``spdk_lvs_rename``: no length check, the name is cut to 63 characters.

    Each lvol's bdev alias then moves to ``new/<lvol name>``; where that alias
    is taken (or the bdev has more than one), SPDK ignores the failure and
    the old alias stays.
    """
    old = p["old_name"]
    lvs = state.find_lvstore(name=old)
    if lvs is None:
        raise RpcError(-errno_mod.ENOENT, f"Lvol store {old} not found")
    new = p["new_name"]
    if lvs.name == new[:MAX_NAME + 1]:
        return True
    # Every lvstore's name and new_name count, its own new_name included: a
    # store never renamed has new_name "", so renaming to "" is EEXIST.
    if any(new[:MAX_NAME + 1] in (o.name, o.new_name) for o in state.lvstores):
        raise async_error(EEXIST)
    lvs.name = lvs.new_name = new[:MAX_NAME]
    for lv in lvs.lvols:
        alias = lv.alias
        if len(lv.bdev.aliases) == 1 and not state.name_taken(alias):
            lv.bdev.aliases = [alias]
    return True


def delete_lvstore(state: SimState, p: dict[str, Any]) -> bool:
    lvs = lvstore_from(state, p)
    state.persist.destroyed(lvs)
    lvs.hot_remove()
    return True


# --- lvol RPCs ---------------------------------------------------------------

def reconcile_all(state: SimState) -> None:
    if not state.dataplane.writes_external_data():
        return
    for lvs in state.lvstores:
        for lv in lvs.lvols:
            if lv.bdev.opened and not lv.read_only:
                lv.reconcile()


def check_cluster_array(num_clusters: int) -> None:
    if num_clusters * 8 > MAX_CLUSTER_ARRAY:
        raise async_error(ENOMEM)


def create_lvol(state: SimState, p: dict[str, Any]) -> str:
    # SPDK's order: lvstore, clear_method, name (sync -errno), then the blob (async).
    lvs = lvstore_from(state, p)
    clear_method = p.get("clear_method", "default").lower()
    if clear_method not in (*CLEAR_METHODS, "default") or "clear_method" in p and \
            clear_method == "default":
        raise RpcError(-EINVAL, "Invalid clean_method option")
    name = p["lvol_name"]
    check_name(name)
    if lvs.find(name) is not None:
        raise errno_error(EEXIST)
    thin = bool(p.get("thin_provision", False))
    num_clusters = wrapped_clusters(p["size_in_mib"], lvs.cluster_size)
    # bs_create_blob claims the blob's metadata page first (ENOMEM), then
    # blob_resize checks clusters and that one more page is free for extents.
    lvs.need_md_pages(1, ENOMEM)
    if thin:
        check_cluster_array(num_clusters)
    else:
        if num_clusters > lvs.free_clusters:
            raise async_error(ENOSPC)
        if num_clusters:
            lvs.need_md_pages(2, ENOSPC)
    lv = Lvol(lvs, name, num_clusters, thin, clear_method)
    if not thin:
        lv.clusters = set(range(num_clusters))
    if state.name_taken(lv.bdev_alias):
        raise async_error(EEXIST)      # spdk_bdev_register: the alias is another bdev's
    files.create_sparse(lv.path, lv.size)
    lv.register()
    return lv.uuid


def get_lvols(state: SimState, p: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(p, NoParams):
        lvstores = [lvstore_from(state, p, "lvs_name", "lvs_uuid")]
    else:
        lvstores = list(state.lvstores)
    reconcile_all(state)
    return [lv.json() for lvs in lvstores for lv in lvs.lvols]


def rename_lvol(state: SimState, p: dict[str, Any]) -> bool:
    """SPDK's order, quirks included (vbdev_lvol_rename, spdk_lvol_rename).

    The bdev alias moves to ``lvs/new`` first (EEXIST if any bdev has that
    name or alias, the lvol's own included, so renaming to the current name
    fails), and stays moved when the blob rename then fails (EPERM on a
    read-only blob) or is a no-op. The lvol name is copied into a 64-byte
    buffer: a 64-character name is cut to 63, the alias keeps all 64.
    """
    lv = find_lvol(state, p["old_name"])
    new = p["new_name"]
    if len(lv.bdev.aliases) != 1:
        raise async_error(EINVAL)
    alias = f"{lv.lvs.name}/{new}"
    if state.name_taken(alias):
        raise async_error(EEXIST)
    lv.bdev.aliases = [alias]
    if lv.name == new[:MAX_NAME + 1]:
        return True
    if lv.lvs.find(new) is not None:
        raise async_error(EEXIST)
    if lv.read_only:
        raise async_error(EPERM)    # the name is an xattr of a read-only blob
    lv.name = new[:MAX_NAME]
    return True


def resize_lvol(state: SimState, p: dict[str, Any]) -> bool:
    lv = find_lvol(state, p["name"])
    if lv.read_only:
        raise async_error(EPERM)
    new_clusters = wrapped_clusters(p["size_in_mib"], lv.lvs.cluster_size)
    if new_clusters == lv.num_clusters:
        return True
    old_size = lv.size
    if new_clusters > lv.num_clusters:
        if not lv.thin:
            if new_clusters - lv.num_clusters > lv.lvs.free_clusters:
                raise async_error(ENOSPC)
            if extent_pages(new_clusters) > extent_pages(lv.num_clusters):
                lv.lvs.need_md_pages(1, ENOSPC)
        check_cluster_array(new_clusters)
        if not lv.thin:
            lv.allocate_all(new_clusters)
    lv.clusters = {c for c in lv.clusters if c < new_clusters}
    lv.num_clusters = new_clusters
    files.resize(lv.path, lv.size)
    if lv.size > old_size and lv.parent is not None:
        # Grown clone: the new range shows what the parent chain holds there.
        files.copy_range(lv.parent.path, lv.path, old_size, lv.size)
    lv.sync_bdev()
    if lv.size != old_size:
        notify_resized(state, lv)
    return True


def set_read_only(state: SimState, p: dict[str, Any]) -> bool:
    lv = find_lvol(state, p["name"])
    lv.set_read_only = True
    return True


def snapshot(state: SimState, p: dict[str, Any]) -> str:
    lv = find_lvol(state, p["lvol_name"])
    name = p["snapshot_name"]
    lvs = lv.lvs
    verify_new_name(lvs, name)
    if lv.read_only:
        raise async_error(EINVAL)
    lvs.need_md_pages(1, ENOMEM)   # the snapshot's page; the extent pages move to it
    reconcile_all(state)
    snap = Lvol(lvs, name, lv.num_clusters, lv.thin, lv.clear_method)
    snap.is_snapshot = True
    snap.clusters = lv.clusters
    files.sparse_copy(lv.path, snap.path)
    old_parent = lv.parent
    if old_parent is not None:
        old_parent.children.remove(lv)
        old_parent.adopt(snap)
    snap.parent = old_parent
    lv.parent = snap
    lv.clusters = set()
    lv.thin = True
    snap.adopt(lv)
    snap.register()
    return snap.uuid


def clone(state: SimState, p: dict[str, Any]) -> str:
    snap = find_lvol(state, p["snapshot_name"])
    name = p.get("clone_name", "")       # optional in SPDK's decoder: NULL is EINVAL
    lvs = snap.lvs
    verify_new_name(lvs, name)
    if not snap.read_only:
        raise async_error(EINVAL)
    lvs.need_md_pages(1, ENOMEM)
    cl = Lvol(lvs, name, snap.num_clusters, True, snap.clear_method)
    files.sparse_copy(snap.path, cl.path)
    cl.parent = snap
    snap.adopt(cl)
    cl.register()
    return cl.uuid


def delete_lvol(state: SimState, p: dict[str, Any]) -> bool:
    lv = find_lvol(state, p["name"])
    if len(lv.children) > 1:
        raise async_error(EPERM, -32603)
    if lv.children:
        # Merge the snapshot into its only child, which takes its place.
        child = lv.children[0]
        child.clusters |= {c for c in lv.clusters if c < child.num_clusters}
        lv.clusters = set()
        lv.children = []
        child.parent = lv.parent
        if lv.parent is not None:
            lv.parent.adopt(child)
    lv.destroy()
    return True


def inflate(state: SimState, p: dict[str, Any], allocate_all: bool) -> bool:
    # No read-only check: the blobstore lifts md_ro for the duration.
    lv = find_lvol(state, p["name"])
    parent = lv.parent
    if not allocate_all and parent is None:
        raise async_error(EINVAL)
    if not lv.thin:
        return True
    if allocate_all:
        lv.allocate_all(lv.num_clusters)
        lv.thin = False
        new_parent = None
    else:
        assert parent is not None
        lv.allocate({c for c in parent.clusters if c < lv.num_clusters})
        new_parent = parent.parent
    if parent is not None:
        parent.children.remove(lv)
    lv.parent = new_parent
    if new_parent is not None:
        new_parent.adopt(lv)
    return True
