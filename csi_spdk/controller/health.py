"""Per-target health, checked off the request path.

Probe tells whether the controller process can serve, not whether every
target answers: one unreachable target must not make Kubernetes restart the
controller (livenessprobe) or park the sidecars in ProbeForever while the
other targets could serve. Each target's reachability is checked here every
``interval`` seconds with ``spdk_get_version`` on a connection of its own
(never the request pool, so slow requests cannot fail the check, and a dead
target cannot starve requests to a live one), exported as the
``csi_spdk_target_up`` metric and reported as an abnormal volume condition.

Concurrency: one daemon thread writes, RPC threads read ``status``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from .. import metrics
from ..errors import CsiError
from .target import Targets

log = logging.getLogger("csi_spdk.health")


class TargetHealth:
    def __init__(self, targets: Targets, interval: float = 10.0) -> None:
        self.interval = interval
        # a client of its own per target (direct socket or the target's agent)
        self._clients = {name: t.cfg.make_api().client for name, t in targets.items()}
        self._status: dict[str, tuple[bool | None, str]] = {
            name: (None, "not checked yet") for name in targets}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Check every target once (sequentially; each has its own timeout)."""
        for name, client in self._clients.items():
            try:
                client.call("spdk_get_version")
                status = (True, "")
            except CsiError as err:
                status = (False, err.message)
            with self._lock:
                before = self._status.get(name, (None, ""))[0]
                self._status[name] = status
            metrics.TARGET_UP.labels(name).set(1 if status[0] else 0)
            if before is not status[0]:
                level = logging.INFO if status[0] else logging.WARNING
                log.log(level, "SPDK target " + ("up" if status[0] else "unreachable"),
                        extra={"f": {"target": name, "error": status[1]}})

    def status(self, name: str) -> tuple[bool | None, str]:
        """(up, error): up is None before the first check."""
        with self._lock:
            return self._status.get(name, (None, "unknown target"))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="target-health",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            self.check()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def stop(self) -> None:
        self._stop.set()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
