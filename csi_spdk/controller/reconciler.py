"""The reconciler: off the request path, reclaim what abandoned or crashed
calls left on every reachable target.

``Target.sweep`` removes clone sources of CreateVolumes never retried, hidden
snapshots whose clones are gone and orphaned markers, except what a running
call is using (``Targets.busy``). Only on the active replica: a standby
(controller/lease.py) does not know the active one's running calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import CsiError
from .target import Targets

log = logging.getLogger("csi_spdk.controller")
RECONCILE_INTERVAL = 300.0   # seconds between reconciler passes


class Reconciler:
    def __init__(self, targets: Targets, active: Callable[[], bool]) -> None:
        self.targets = targets
        self.active = active
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def run_once(self) -> None:
        if not self.active():
            return
        for target in self.targets.values():
            try:
                target.sweep(self.targets.busy())
            except CsiError as err:
                log.warning("reconcile failed", extra={"f": {"target": target.name,
                                                             "error": err.message}})

    def start(self, interval: float = RECONCILE_INTERVAL) -> None:
        """A daemon thread: one pass every ``interval`` seconds."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(interval,),
                                            name="reconciler", daemon=True)
            self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            self.run_once()

    def stop(self) -> None:
        self._stopping.set()
