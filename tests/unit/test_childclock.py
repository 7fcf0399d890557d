"""The start-up clock of ``csi-spdk dev``'s children: wall time less the time
the child's threads spent waiting for a CPU (``csi_spdk/childclock.py``), and
``_start_child`` giving up on that clock, not on the wall clock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csi_spdk import dev
from csi_spdk.childclock import ChildClock
from csi_spdk.spdk.client import SpdkClient


class FakeProc:
    """A /proc tree of one process whose threads' run-queue waits the test sets."""

    def __init__(self, root: Path, pid: int = 4242) -> None:
        self.root, self.pid, self.t = root, pid, 100.0

    def waited(self, tid: int, seconds: float) -> None:
        d = self.root / str(self.pid) / "task" / str(tid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "schedstat").write_text(f"123456 {int(seconds * 1e9)} 7\n")

    def clock(self) -> ChildClock:
        return ChildClock(self.pid, proc_root=str(self.root), now=lambda: self.t)


def test_run_queue_waits_are_not_counted(tmp_path):
    p = FakeProc(tmp_path)
    p.waited(1, 0.0)
    c = p.clock()
    p.t += 5.0
    p.waited(1, 4.0)                      # runnable but not running for 4 of 5 s
    assert c.elapsed() == pytest.approx(1.0)
    p.t += 2.0                            # then it ran (or slept) on its own
    assert c.elapsed() == pytest.approx(3.0)


def test_parallel_waits_count_once_and_never_more_than_the_interval(tmp_path):
    p = FakeProc(tmp_path)
    c = p.clock()
    p.t += 5.0
    p.waited(1, 3.0)
    p.waited(2, 4.0)                      # a thread that appeared: all its wait is new
    assert c.elapsed() == pytest.approx(1.0)
    p.t += 1.0
    p.waited(1, 9.0)                      # 6 s more in a 1 s interval: cannot be
    assert c.elapsed() == pytest.approx(1.0)


def test_the_processes_the_answer_passes_through_count_too(tmp_path):
    p, via = FakeProc(tmp_path), FakeProc(tmp_path, pid=77)
    c = ChildClock(p.pid, also=[via.pid], proc_root=str(tmp_path), now=lambda: p.t)
    p.t += 4.0
    p.waited(1, 1.0)
    via.waited(9, 3.0)                    # the target it fronts waited for a CPU longer
    assert c.elapsed() == pytest.approx(1.0)


def test_descendants_count_too(tmp_path):
    p, grandchild = FakeProc(tmp_path), FakeProc(tmp_path, pid=99)
    p.waited(1, 0.0)
    (tmp_path / str(p.pid) / "task" / "1" / "children").write_text("99\n")
    c = p.clock()
    p.t += 3.0
    grandchild.waited(5, 2.5)             # the target the child started waited for a CPU
    assert c.elapsed() == pytest.approx(0.5)


def test_without_schedstat_it_is_wall_time(tmp_path):
    p = FakeProc(tmp_path)                # no task directory at all
    c = p.clock()
    p.t += 7.5
    assert c.elapsed() == pytest.approx(7.5)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity")
                    or not Path(f"/proc/self/task/{os.getpid()}/schedstat").exists(),
                    reason="the kernel does not report run-queue waits")
def test_a_real_child_sharing_one_cpu_with_a_busy_loop_is_seen_waiting():
    """Two busy loops pinned to one CPU: each waits while the other runs, and
    the kernel's count of it is what the clock takes off."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    cpu = {sorted(os.sched_getaffinity(0))[0]}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, cpu)
        child = subprocess.Popen([sys.executable, "-c", spin])
        os.sched_setaffinity(child.pid, cpu)
        clock = ChildClock(child.pid)
        while child.poll() is None:
            clock.elapsed()
            time.sleep(0.05)
    finally:
        hog.kill()
        hog.wait()
    assert clock.starved > 0.05, clock.starved


def test_start_child_gives_up_on_a_child_that_never_answers(tmp_path, monkeypatch):
    """A child that is alive and not starved but never answers (here: a
    simulator that listens on another socket) is still refused, on its own
    clock, and stopped."""
    started = []
    real_popen = subprocess.Popen

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        return started[-1]

    monkeypatch.setattr(dev.subprocess, "Popen", popen)
    sock = tmp_path / "other.sock"
    made = []

    def client():
        made.append(len(started))          # how many children were forked before it
        return SpdkClient(str(tmp_path / "nobody.sock"), timeout=1.0)

    with pytest.raises(RuntimeError, match=r"did not answer within 3s of its own time"):
        dev._start_child(["sim", "--rpc-socket", str(sock), "--data-dir", str(tmp_path / "d")],
                         client, "the test child", timeout=3.0)
    assert started and started[0].poll() is not None   # not left running
    # the client (for the agent: a gRPC channel) is made after the fork, never before
    assert made == [1]
