"""A target's capacity figures, kept between calls (docs/DESIGN.md "Capacity").

The lvstores (free clusters taken off by the driver's thick creates) and the
per-lvstore provisioned bytes (volume sizes + clusters held by snapshots)
are kept so that no CreateVolume waits on a scan; they are re-read off the
request path (``_refresh_loop``) every ``PROVISIONED_TTL`` seconds and right
after a snapshot change. What makes them safe to admit with is in
``Target``'s docstring (target.py). The same scan refreshes the kept
volumes (``volumes.KeptVolumes``). A mixin of ``Target``: it uses its
``api``, ``name``, ``lvstores()`` and the ``_volumes_*`` hooks of
``KeptVolumes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import TYPE_CHECKING

from .. import metrics
from ..errors import NotFound
from .placement import Pool

if TYPE_CHECKING:
    from ..spdk.api import SpdkApi
    from .config import TargetConfig

log = logging.getLogger("csi_spdk.controller")

PROVISIONED_TTL = 30.0
# the periodic rescan (one bdev_get_bdevs of every bdev: spdk_tgt builds its
# reply on its only reactor, answering nothing else meanwhile) takes at most
# 1/SCAN_DUTY of the time: at 10,000 volumes a scan is long enough that every
# 30 s would be felt by the calls that arrive during it
SCAN_DUTY = 100.0


def _libc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None    # not glibc: the memory stays with the process's allocator


_TRIM = _libc_trim()


def release_memory() -> None:
    """After a scan: hand the heap it freed back to the system (glibc keeps
    freed memory for reuse, so the RSS would stay at the scan's peak)."""
    if _TRIM is not None:
        _TRIM(0)


class KeptCapacity:
    api: SpdkApi
    cfg: TargetConfig
    name: str

    def lvstores(self) -> list[dict]:
        raise NotImplementedError

    def _init_capacity(self) -> None:
        # lvstore name -> (time, bytes of volumes, clusters held by snapshots)
        self._prov: dict[str, tuple[float, int, int]] = {}
        self._prov_known = False       # a scan filled _prov once
        self._scan_deltas: dict[str, int] | None = None   # changes during a scan
        self._lvs_cache: list[dict] | None = None
        self._prov_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._refresh = threading.Event()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._last_scan = 0.0          # seconds the last scan took

    def _keep_lvstores(self, found: list[dict]) -> None:
        with self._prov_lock:
            self._lvs_cache = [dict(s) for s in found]

    @staticmethod
    def pool_bytes(lvs: dict) -> tuple[int, int, int]:
        cluster = int(lvs["cluster_size"])
        return cluster, int(lvs["total_data_clusters"]) * cluster, \
            int(lvs["free_clusters"]) * cluster

    def observe(self, lvs: dict) -> None:
        _, total, free = self.pool_bytes(lvs)
        metrics.LVSTORE_TOTAL.labels(self.name, lvs["name"]).set(total)
        metrics.LVSTORE_FREE.labels(self.name, lvs["name"]).set(free)

    def rescan(self) -> None:
        """Re-read what the target holds now (provisioned figures and the kept
        volumes, one streamed bdev_get_bdevs), for changes made outside this
        process (another controller, an operator's rpc.py), which the periodic
        rescan would show only at its next pass. Safe from any thread."""
        self._scan_provisioned()

    def _scan_provisioned(self) -> None:
        """One bdev_get_bdevs: the provisioned parts of every lvstore.

        Changes the driver made while the scan ran may or may not be in it:
        growths are added again and shrinks are not applied, so the result
        can only over-count (refuse early), never admit beyond the ratio."""
        with self._scan_lock:
            self._scan_provisioned_locked()

    def _scan_provisioned_locked(self) -> None:
        with self._prov_lock:
            self._scan_deltas = {}
            self._volumes_scan_started()
        now = time.monotonic()
        try:
            self._scan_parts(now)
        except BaseException:
            with self._prov_lock:
                self._scan_deltas = None
                self._volumes_scan_failed()
            raise
        finally:
            self._last_scan = time.monotonic() - now
            release_memory()

    def refresh_wait(self) -> float:
        """Seconds until the next periodic rescan: PROVISIONED_TTL, or longer
        when a scan takes more than 1/SCAN_DUTY of that (asked-for rescans,
        after a snapshot change, still run at once)."""
        return max(PROVISIONED_TTL, SCAN_DUTY * self._last_scan)

    def _scan_parts(self, now: float) -> None:
        """One bdev_get_bdevs, decoded one bdev at a time: the provisioned
        parts of every lvstore and the volumes of the driver's lvstores
        (``volumes.KeptVolumes``); nothing else of the reply is kept."""
        parts: dict[str, list[int]] = {}
        found: dict = {}
        allowed = set(self.cfg.lvstores)
        from .target import Lvol  # (target.py builds on this module)

        def one(bdev: dict) -> None:
            lv = Lvol.from_bdev(bdev)
            if lv is None:
                return None
            part = parts.setdefault(lv.lvstore, [0, 0])
            if lv.holds_clusters_only:
                part[1] += lv.allocated_clusters
            else:
                part[0] += lv.size
            if lv.is_volume and (not allowed or lv.lvstore in allowed):
                found[lv.uuid] = lv
            return None
        self.api.bdevs(each=one)
        with self._prov_lock:
            deltas, self._scan_deltas = self._scan_deltas or {}, None
            self._prov = {name: (now, b + max(0, deltas.get(name, 0)), c)
                          for name, (b, c) in parts.items()}
            for name, d in deltas.items():
                if name not in self._prov and d > 0:
                    self._prov[name] = (now, d, 0)
            self._volumes_scanned(found, now)

    def _refresh_loop(self) -> None:
        """Off the request path: rescan when asked (a snapshot changed what
        SPDK holds) or when the figures are PROVISIONED_TTL old."""
        while not self._stop.is_set():
            self._refresh.wait(self.refresh_wait())
            self._refresh.clear()
            if self._stop.is_set():
                return
            try:
                self._scan_provisioned()
                self.lvstores()
            except Exception as err:  # noqa: BLE001 - the next pass tries again
                log.debug("capacity refresh failed: %s", err)

    def _kick_refresh(self) -> None:
        with self._prov_lock:
            if self._refresher is None and not self._stop.is_set():
                self._refresher = threading.Thread(target=self._refresh_loop, daemon=True,
                                                   name=f"capacity-{self.name}")
                self._refresher.start()
        self._refresh.set()

    def stop(self) -> None:
        self._stop.set()
        self._refresh.set()

    def provisioned(self, lvs: dict, max_age: float = PROVISIONED_TTL) -> int:
        """Volume sizes + bytes held by snapshots (and markers) of an lvstore.

        ``max_age=0`` (GetCapacity) scans now. Otherwise the incrementally kept
        figure is used and an old one is refreshed in the background; only the
        first call after start, with no figure at all, waits for a scan."""
        name = lvs["name"]
        with self._prov_lock:
            hit = self._prov.get(name) if self._prov_known else None
        if hit is None or max_age <= 0:
            self._scan_provisioned()
            with self._prov_lock:
                self._prov_known = True
                hit = self._prov.setdefault(name, (time.monotonic(), 0, 0))
        elif time.monotonic() - hit[0] >= max(max_age, self.refresh_wait()):
            self._kick_refresh()
        total = hit[1] + hit[2] * int(lvs["cluster_size"])
        metrics.LVSTORE_PROVISIONED.labels(self.name, name).set(total)
        return total

    def adjust_provisioned(self, lvstore: str, delta: int) -> None:
        """The driver changed a volume's size by ``delta`` bytes."""
        with self._prov_lock:
            hit = self._prov.get(lvstore)
            if hit:
                self._prov[lvstore] = (hit[0], max(0, hit[1] + delta), hit[2])
            if self._scan_deltas is not None:
                self._scan_deltas[lvstore] = self._scan_deltas.get(lvstore, 0) + delta

    def forget_provisioned(self, lvstore: str = "", held: int = 0) -> None:
        """A snapshot was taken, deleted, merged or inflated: what SPDK holds
        changed by an amount only SPDK knows. ``held``: an upper bound of what
        a new snapshot holds (its source's size), counted until the
        background rescan (started now) replaces the figure."""
        if lvstore and held:
            self.adjust_provisioned(lvstore, held)
        self._kick_refresh()

    # --- the lvstores, kept between calls ---------------------------------------------
    def cached_lvstores(self) -> list[dict]:
        """The driver's lvstores as last read (one RPC when never read).

        Free clusters are taken off as the driver makes thick lvols and
        re-read in the background; a stale figure can only let a create reach
        SPDK, which refuses it (ENOSPC) when the room is not there."""
        with self._prov_lock:
            cached = self._lvs_cache
        if cached is None:
            return self.lvstores()
        return [dict(s) for s in cached]

    def took_clusters(self, lvstore: str, size: int) -> None:
        """A thick lvol of ``size`` bytes took its clusters in ``lvstore``."""
        with self._prov_lock:
            for s in self._lvs_cache or []:
                if s["name"] == lvstore:
                    cluster = int(s["cluster_size"]) or 1
                    s["free_clusters"] = max(0, int(s["free_clusters"]) - -(-size // cluster))

    def pool(self, lvs: dict, with_provisioned: bool = True,
             max_age: float = PROVISIONED_TTL) -> Pool:
        cluster, total, free = self.pool_bytes(lvs)
        return Pool(self.cfg, lvs["name"], cluster, total, free,
                    self.provisioned(lvs, max_age) if with_provisioned else 0)

    def pool_of(self, lvstore: str, max_age: float = PROVISIONED_TTL) -> Pool:
        """The pool of one lvstore by name (one lvstore RPC + the cached sum)."""
        found = self.api.lvstores(lvstore)
        if not found:
            raise NotFound(f"lvstore {lvstore!r} of target {self.name!r} does not exist")
        self.observe(found[0])
        return self.pool(found[0], max_age=max_age)
