"""Per-key try-locks: one operation per volume (or request name) at a time.

CSI sidecars retry on ABORTED, so a second operation on a busy key fails fast
instead of queueing behind the first; operations on different keys never wait
for each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import Aborted


class KeyedLocks:
    """A set of busy keys guarded by one mutex. Thread-safe."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def hold(self, keys: Iterable[str], what: str = "operation") -> Iterator[None]:
        """Hold every key for the duration, or raise Aborted if any is busy."""
        wanted = sorted({k for k in keys if k})
        with self._mutex:
            busy = [k for k in wanted if k in self._busy]
            if busy:
                raise Aborted(
                    f"an {what} on {busy[0]!r} is already in progress; retry later"
                )
            self._busy.update(wanted)
        try:
            yield
        finally:
            with self._mutex:
                self._busy.difference_update(wanted)

    def busy(self, key: str) -> bool:
        with self._mutex:
            return key in self._busy
