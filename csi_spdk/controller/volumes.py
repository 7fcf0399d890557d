"""A target's volumes, kept between calls so ListVolumes pages scan nothing.

At 10,000 volumes one ``bdev_get_bdevs`` is ~12 MB that spdk_tgt builds on
its only reactor and the controller decodes for seconds; a paged ListVolumes
used to pay that on every page (267 s for 20 pages). The controller keeps
one ``Lvol`` per volume of the driver's lvstores instead (about 0.5 KB
each), by uuid:

- filled by the capacity scan (``capacity.KeptCapacity``: the same one
  ``bdev_get_bdevs``, decoded one bdev at a time), which runs off the request
  path every ``refresh_wait()`` seconds and so also reconciles what changed
  behind the controller's back (an lvol made or deleted with rpc.py shows up
  or goes at the next rescan);
- kept current by the controller's own creates, deletes, expansions and QoS
  changes at once; those made while a scan runs are replayed on its result,
  so a scan that started before a create never drops the new volume.

Only the first ListVolumes of a process waits for a scan (nothing is known
yet). A mixin of ``Target``: it uses ``_prov_lock``, ``_scan_provisioned``,
``_kick_refresh``, ``refresh_wait`` and ``_lvs_cache`` (capacity.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from .target import Lvol


class KeptVolumes:
    # from capacity.KeptCapacity (the other half of Target)
    _prov_lock: threading.Lock
    _lvs_cache: list[dict] | None
    _scan_provisioned: Callable[[], None]
    _kick_refresh: Callable[[], None]
    refresh_wait: Callable[[], float]

    def _init_volumes(self) -> None:
        self._vols: dict[str, Lvol] | None = None     # None: no scan yet
        self._vols_time = 0.0
        # the controller's own changes while a scan runs: (uuid, Lvol or None)
        self._vols_journal: list[tuple[str, Lvol | None]] | None = None

    # --- the scan (capacity.py) ---------------------------------------------------
    def _volumes_scan_started(self) -> None:
        """Called with ``_prov_lock`` held as a scan starts."""
        self._vols_journal = []

    def _volumes_scanned(self, found: dict[str, Lvol], when: float) -> None:
        """Called with ``_prov_lock`` held: the scan's volumes replace the kept
        ones, with the controller's own changes since it started on top (the
        scan may or may not have seen them)."""
        journal, self._vols_journal = self._vols_journal or [], None
        for uuid, lv in journal:
            if lv is None:
                found.pop(uuid, None)
            else:
                found[uuid] = lv
        self._vols, self._vols_time = found, when

    def _volumes_scan_failed(self) -> None:
        self._vols_journal = None

    # --- the controller's own changes -------------------------------------------
    def volume_kept(self, lv: Lvol) -> None:
        """The controller made (or changed) volume ``lv``: keep it as it is now."""
        if not lv.lvs_uuid:
            for s in self._lvs_cache or []:
                if s["name"] == lv.lvstore:
                    lv.lvs_uuid = s["uuid"]
        with self._prov_lock:
            if self._vols is not None:
                self._vols[lv.uuid] = lv
            if self._vols_journal is not None:
                self._vols_journal.append((lv.uuid, lv))

    def volume_gone(self, uuid: str) -> None:
        """The controller deleted the volume whose lvol is ``uuid``."""
        with self._prov_lock:
            if self._vols is not None:
                self._vols.pop(uuid, None)
            if self._vols_journal is not None:
                self._vols_journal.append((uuid, None))

    # --- ListVolumes -------------------------------------------------------------
    def kept_volumes(self) -> list[Lvol]:
        """Every volume as kept: one scan only when none was made yet (the
        first call of a process); an old view asks the background rescan
        for a fresh one and is answered meanwhile."""
        with self._prov_lock:
            vols, when = self._vols, self._vols_time
        if vols is None:
            self._scan_provisioned()
            with self._prov_lock:
                vols = self._vols if self._vols is not None else {}
                return list(vols.values())
        if time.monotonic() - when >= self.refresh_wait():
            self._kick_refresh()
        with self._prov_lock:
            return list(vols.values())
