"""How long a child process has had to start, not counting the time the
machine made it wait for a CPU.

A start-up deadline in wall-clock seconds mistakes a slow start for a hung
one: on a loaded host (two cores shared by a cluster run and its QEMU guests)
a Python child spends most of its first tens of seconds runnable but not
running, and ``csi-spdk dev`` gave up on an agent that was importing its
modules. The kernel counts that wait per thread (``/proc/<pid>/task/<tid>/
schedstat``, second field: nanoseconds spent on a run queue); this clock is
wall time minus it, so a deadline on it means "the child had that long to
itself and did not get there". The child's descendants and the processes
its answer passes through (the caller, a target the child fronts) are
watched too: a reply that waits for them to get a CPU is as late as one that
waits for the child's own.
Where the kernel does not report it (no CONFIG_SCHED_INFO, not Linux) the
clock is wall time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence


class ChildClock:
    """Seconds since ``pid`` was started, less its threads' run-queue waits
    (and those of its descendants and of the processes ``also`` names).

    Per call, the wait subtracted is that of the thread that waited most in
    the interval (threads wait in parallel, so their sum would count the
    same second twice), never more than the interval itself."""

    def __init__(self, pid: int, also: Sequence[int] = (), proc_root: str = "/proc",
                 now: Callable[[], float] = time.monotonic) -> None:
        self.pids = [pid, *also]
        self.proc_root = proc_root
        self.now = now
        self.started = self.last = now()
        self.starved = 0.0
        self._waits: dict[str, int] = {}

    def _run_queue_ns(self) -> dict[str, int]:
        """Each live thread's total run-queue wait (ns); {} when unreadable."""
        out: dict[str, int] = {}
        todo, seen = list(self.pids), set(self.pids)
        while todo:
            pid = todo.pop()
            tasks = os.path.join(self.proc_root, str(pid), "task")
            try:
                tids = os.listdir(tasks)
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(os.path.join(tasks, tid, "schedstat"), encoding="ascii") as f:
                        out[f"{pid}/{tid}"] = int(f.read().split()[1])
                except (OSError, ValueError, IndexError):
                    continue  # the thread ended, or no schedstat in this kernel
                if pid == self.pids[0] or pid not in self.pids:   # descendants of the child
                    for child in _children(os.path.join(tasks, tid)):
                        if child not in seen:
                            seen.add(child)
                            todo.append(child)
        return out

    def elapsed(self) -> float:
        now = self.now()
        waits = self._run_queue_ns()
        grown = max((ns - self._waits.get(tid, 0) for tid, ns in waits.items()), default=0)
        self._waits.update(waits)
        self.starved += min(max(grown, 0) / 1e9, now - self.last)
        self.last = now
        return now - self.started - self.starved


def _children(task_dir: str) -> list[int]:
    """The pids a thread started (``children``: CONFIG_PROC_CHILDREN)."""
    try:
        with open(os.path.join(task_dir, "children"), encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []
