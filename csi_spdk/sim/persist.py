"""Lvstores that outlive the simulator process, as they outlive spdk_tgt.

A real blobstore keeps its metadata on the base bdev, so after spdk_tgt
restarts (even after SIGKILL), an lvstore comes back exactly when its base bdev
is created again: the lvol module's examine callback (``vbdev_lvs_examine``
in module/bdev/lvol) reads the super block, ``spdk_lvs_load`` restores the
lvstore's name and uuid and every blob's ``name``/``uuid`` xattrs, sizes,
thin flags, clusters and snapshot/clone links. A malloc bdev is RAM: it comes
back empty. Exports (nvmf), keyring entries and QoS are runtime state and
never come back. ``bdev_lvol_delete_lvstore`` (``spdk_bs_destroy``) zeroes the
super block, so the device carries no lvstore afterwards.

The simulator models this for aio bdevs:
- the aio file gets a 4 KiB super page at offset 0 starting with the
  blobstore signature ``SPDKBLOB`` and naming the lvstore's uuid (the data
  that page held is gone, as with a real ``bdev_lvol_create_lvstore``);
- the lvstore's metadata (the blobstore's metadata pages) is
  ``<data-dir>/lvstores/<uuid>/lvstore.json``, replaced atomically after every
  RPC that changed it, next to the lvols' data files; a SIGKILL at any moment
  leaves the last completed RPC's state loadable;
- ``bdev_aio_create`` over a file with such a super page loads it (examine).
Data directories of RAM lvstores left by a killed process are removed at
start-up: that memory is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from .. import atomicfile

if TYPE_CHECKING:
    from .bdev import Bdev
    from .lvol import Lvol, Lvstore
    from .state import SimState

log = logging.getLogger("csi_spdk.sim.persist")

SIGNATURE = b"SPDKBLOB"
BSTYPE = b"LVOLSTORE"
SUPER_PAGE = 4096
META = "lvstore.json"
FORMAT = 1
_UUID_AT = 32          # uuid (36 ASCII bytes) after signature, version and bstype


def _super_page(lvs_uuid: str) -> bytes:
    head = SIGNATURE + FORMAT.to_bytes(4, "little") + bytes(4) + BSTYPE.ljust(16, b"\0")
    return (head + lvs_uuid.encode()).ljust(SUPER_PAGE, b"\0")


def read_super(filename: str) -> str | None:
    """The lvstore uuid a file's super page names, None when it carries none."""
    try:
        with open(filename, "rb") as f:
            page = f.read(SUPER_PAGE)
    except OSError:
        return None
    if not page.startswith(SIGNATURE) or page[16:16 + len(BSTYPE)] != BSTYPE:
        return None
    return page[_UUID_AT:_UUID_AT + 36].decode("ascii", errors="replace")


def _write_page(filename: str, page: bytes) -> None:
    fd = os.open(filename, os.O_WRONLY)
    try:
        os.pwrite(fd, page, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ranges(clusters: set[int]) -> list[list[int]]:
    """Sorted clusters as [first, last] runs (a 1 TiB thick lvol is one pair)."""
    out: list[list[int]] = []
    for c in sorted(clusters):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def _unranges(runs: list[list[int]]) -> set[int]:
    out: set[int] = set()
    for first, last in runs:
        out.update(range(first, last + 1))
    return out


def dump(lvs: Lvstore) -> dict[str, Any]:
    """The lvstore's metadata as stored (everything ``spdk_lvs_load`` restores)."""
    return {
        "format": FORMAT, "uuid": lvs.uuid, "name": lvs.name,
        "cluster_size": lvs.cluster_size, "block_size": lvs.block_size,
        "clear_method": lvs.clear_method, "total_clusters": lvs.total_clusters,
        "md_pages": lvs.md_pages, "md_bytes": lvs.md_bytes,
        "lvols": [{"uuid": lv.uuid, "name": lv.name, "num_clusters": lv.num_clusters,
                   "thin": lv.thin, "clear_method": lv.clear_method,
                   "clusters": _ranges(lv.clusters), "snapshot": lv.is_snapshot,
                   "read_only": lv.set_read_only,
                   "parent": lv.parent.uuid if lv.parent is not None else None,
                   "children": [c.uuid for c in lv.children]}
                  for lv in lvs.lvols],
    }


class Persister:
    """Keeps ``lvstore.json`` of every lvstore on an aio bdev in step with memory.

    Called with the state lock held (every hook runs inside an RPC).
    """

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.root = state.data_dir / "lvstores"
        self.written: dict[str, str] = {}     # lvstore uuid -> last JSON written

    # --- start-up ------------------------------------------------------------
    def start(self) -> None:
        """Drop what a killed process left of RAM lvstores and of torn writes."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.is_dir() and not (d / META).exists():
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir():
                atomicfile.remove_stale_temps(d)

    # --- hooks -----------------------------------------------------------------
    @staticmethod
    def backed_by_file(bdev: Bdev) -> str | None:
        from .bdev import AioBdev
        return bdev.filename if isinstance(bdev, AioBdev) else None

    def created(self, lvs: Lvstore) -> None:
        """``bdev_lvol_create_lvstore`` succeeded: write super page and metadata."""
        filename = self.backed_by_file(lvs.base_bdev)
        if filename is None:
            return
        self.save(lvs)
        _write_page(filename, _super_page(lvs.uuid))
        lvs.on_disk = True

    def destroyed(self, lvs: Lvstore) -> None:
        """``bdev_lvol_delete_lvstore``: zero the super page, then forget the metadata."""
        if not lvs.on_disk:
            return
        filename = self.backed_by_file(lvs.base_bdev)
        if filename is not None and read_super(filename) == lvs.uuid:
            _write_page(filename, bytes(SUPER_PAGE))
        with contextlib.suppress(FileNotFoundError):
            (lvs.dir / META).unlink()
        self.written.pop(lvs.uuid, None)
        lvs.on_disk = False

    def detached(self, lvs: Lvstore) -> None:
        """The base bdev went away: the lvstore stays on disk, unloaded."""
        self.written.pop(lvs.uuid, None)

    def sync(self) -> None:
        """Write the metadata of every on-disk lvstore that changed since last time."""
        for lvs in self.state.lvstores:
            if lvs.on_disk:
                self.save(lvs)

    def save(self, lvs: Lvstore) -> None:
        text = json.dumps(dump(lvs), sort_keys=True)
        if self.written.get(lvs.uuid) == text:
            return
        atomicfile.write_bytes(lvs.dir / META, text.encode() + b"\n", 0o644)
        self.written[lvs.uuid] = text

    # --- examine ---------------------------------------------------------------
    def examine(self, bdev: Bdev) -> Lvstore | None:
        """A new bdev: load the lvstore its super page names (SPDK's lvol examine)."""
        filename = self.backed_by_file(bdev)
        if filename is None:
            return None
        lvs_uuid = read_super(filename)
        if lvs_uuid is None:
            return None
        meta = None
        with contextlib.suppress(ValueError, OSError):
            meta = atomicfile.read_json(self.root / lvs_uuid / META)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            log.warning("bdev %s: lvstore %s not loaded: no metadata in %s (another "
                        "--data-dir?)", bdev.name, lvs_uuid, self.root)
            return None
        if self.state.find_lvstore(uuid=lvs_uuid) or self.state.find_lvstore(name=meta["name"]):
            log.warning("bdev %s: lvstore %s (%s) not loaded: one with that uuid or name "
                        "exists", bdev.name, meta["name"], lvs_uuid)
            return None
        return self._load(bdev, meta)

    def _load(self, bdev: Bdev, meta: dict[str, Any]) -> Lvstore:
        from .lvol import Lvol, Lvstore

        lvs = Lvstore(self.state, meta["name"], bdev, meta["cluster_size"],
                      meta["clear_method"], lvs_uuid=meta["uuid"])
        lvs.total_clusters = meta["total_clusters"]
        lvs.md_pages = meta["md_pages"]
        lvs.md_bytes = meta["md_bytes"]
        lvs.block_size = meta["block_size"]
        lvs.on_disk = True
        by_uuid: dict[str, Lvol] = {}
        for m in meta["lvols"]:
            lv = Lvol(lvs, m["name"], m["num_clusters"], m["thin"], m["clear_method"],
                      m["uuid"])
            lv.clusters = _unranges(m["clusters"])
            lv.is_snapshot = m["snapshot"]
            lv.set_read_only = m["read_only"]
            if lv.path.exists():
                by_uuid[lv.uuid] = lv
            else:     # killed after the data file went, before the metadata did
                log.warning("lvol %s/%s: data file missing, dropped", lvs.name, lv.name)
        for m in meta["lvols"]:
            lv = by_uuid.get(m["uuid"])
            if lv is None:
                continue
            parent = m["parent"]
            while parent is not None and parent not in by_uuid:
                parent = next((x["parent"] for x in meta["lvols"] if x["uuid"] == parent), None)
            lv.parent = by_uuid.get(parent) if parent else None
            lv.children = [by_uuid[c] for c in m["children"] if c in by_uuid]
        for lv in by_uuid.values():   # re-parented across a dropped lvol
            if lv.parent is not None and lv not in lv.parent.children:
                lv.parent.children.append(lv)
        known = {lv.path.name for lv in by_uuid.values()}
        for f in lvs.dir.glob("*.img"):
            if f.name not in known:    # created, then killed before the metadata
                f.unlink()
        bdev.claim_type = "read_many_write_one"
        bdev.iostat.add("read", 3 * 4096, 3)     # super block and metadata pages
        self.state.lvstores.append(lvs)
        for m in meta["lvols"]:
            if m["uuid"] in by_uuid:
                by_uuid[m["uuid"]].register()
        self.written[lvs.uuid] = json.dumps(dump(lvs), sort_keys=True)
        if len(by_uuid) != len(meta["lvols"]):
            self.save(lvs)
        log.info("bdev %s: loaded lvstore %s (%s) with %d lvols", bdev.name, lvs.name,
                 lvs.uuid, len(by_uuid))
        return lvs

