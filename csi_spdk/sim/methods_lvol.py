"""The lvol and lvstore JSON-RPC methods of the simulator (``bdev_lvol_*``):
parameter checks and SPDK v25.09's error answers over the model in
``sim/lvol.py`` (lvstores, lvols, cluster accounting)."""

from __future__ import annotations

import errno as errno_mod
from typing import Any

from . import files
from .lvol import (
    CLEAR_METHODS,
    DEFAULT_CLUSTER,
    DEFAULT_MD_RATIO,
    MAX_CLUSTER_ARRAY,
    MAX_NAME,
    PAGE,
    Lvol,
    LvolBdev,
    Lvstore,
    extent_pages,
    metadata_pages,
    wrapped_clusters,
)
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
