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


class SharedExclusive:
    """Many holders of the shared side at once, or one of the exclusive side.

    The storage agent's changes to spdk_tgt hold the shared side (they run in
    parallel with each other) and a replay the exclusive side, so a replay
    never sees a change half made: SPDK already changed, the record not yet
    (it would put back a host an unexport just removed). A waiting exclusive
    holder is served before new shared ones (a replay is not starved). Not
    reentrant: a thread holding either side must not take it again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
