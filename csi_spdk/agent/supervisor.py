"""Keeps spdk_tgt running and puts its state back after every (re)start.

Two modes: the agent starts spdk_tgt itself (``command``; huge pages and
memory are checked first, with an error a person can act on) and restarts it
when it dies, with a bounded exponential backoff; or it attaches to one that
something else runs (systemd, another container) and only watches it.

Either way it polls ``spdk_get_version`` every ``poll_interval`` seconds. A
(re)start is a target that answers after not answering, a new process of
ours, or a different process behind the socket (``SO_PEERCRED``: a restart
faster than one poll). On each one it re-attaches the pools, waits for their
lvstores (SPDK's examine loads them) and replays the desired exports, then
logs and counts what it fixed. Hosts connected over NVMe/TCP keep retrying
for their ``ctrl_loss_tmo`` meanwhile, so a recovery inside it is invisible
to the Pods above them.

The start, hang and lvstore timeouts of a spdk_tgt of ours count its own
time (``childclock.py``): the time a loaded host keeps it (or this agent)
waiting for a CPU does not count, so a starved target is not killed as a
hung one and restarted over and over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metrics
from ..childclock import ChildClock
from ..spdk.api import SpdkApi
from ..spdk.client import SpdkClient, parse_address
from ..spdk.errors import SpdkError, SpdkTransportError
from .packed import release_freed_heap
from .pools import Pools
from .state import DesiredState

log = logging.getLogger("csi_spdk.agent.supervisor")


class MemoryCheckError(RuntimeError):
    """spdk_tgt would not start: not enough huge pages or memory (says what to do)."""


# --- huge pages -----------------------------------------------------------------

def _mem_size_mib(cmd: Sequence[str]) -> int | None:
    """spdk_tgt's ``-s``/``--mem-size`` in MiB (a bare number is MB; k/m/g suffixes)."""
    for i, arg in enumerate(cmd):
        value = None
        if arg in ("-s", "--mem-size") and i + 1 < len(cmd):
            value = cmd[i + 1]
        elif arg.startswith("--mem-size="):
            value = arg.split("=", 1)[1]
        if value:
            v = value.strip().lower()
            mult = {"k": 1 / 1024, "m": 1, "g": 1024}.get(v[-1:])
            try:
                return int(float(v[:-1]) * mult) if mult else int(v)
            except ValueError:
                return None
    return None


def check_memory(cmd: Sequence[str], sys_root: str = "/sys",
                 meminfo: str = "/proc/meminfo") -> str:
    """Refuse to start spdk_tgt into a sure failure; returns what was checked.

    DPDK needs huge pages unless the command line says ``--no-huge``; ``-s``
    says how much memory spdk_tgt takes (default: all free huge pages).
    """
    if "--no-huge" in cmd:
        return "--no-huge: huge page check skipped"
    want = _mem_size_mib(cmd)
    pools: list[tuple[int, int, int]] = []            # (page KiB, total, free)
    base = Path(sys_root) / "kernel" / "mm" / "hugepages"
    for d in sorted(base.glob("hugepages-*kB")):
        try:
            size_kib = int(d.name[len("hugepages-"):-2])
            total = int((d / "nr_hugepages").read_text())
            free = int((d / "free_hugepages").read_text())
        except (OSError, ValueError):
            continue
        pools.append((size_kib, total, free))
    free_mib = sum(size * free for size, _, free in pools) // 1024
    total_mib = sum(size * total for size, total, _ in pools) // 1024
    hint = ("reserve huge pages (e.g. `echo 1024 > /sys/kernel/mm/hugepages/hugepages-2048kB/"
            "nr_hugepages` for 2 GiB, or vm.nr_hugepages in sysctl.conf / hugepages= on the "
            "kernel command line), or run spdk_tgt without them by adding "
            "`--no-huge -s 2048` to its command line")
    if total_mib == 0:
        raise MemoryCheckError(f"spdk_tgt not started: no huge pages are reserved on this "
                               f"host ({base}); {hint}")
    if want is not None and free_mib < want:
        raise MemoryCheckError(
            f"spdk_tgt not started: it asks for {want} MiB (-s) but only {free_mib} MiB of "
            f"huge pages are free ({total_mib} MiB reserved); free or {hint}")
    if free_mib == 0:
        raise MemoryCheckError(f"spdk_tgt not started: all {total_mib} MiB of huge pages "
                               f"are in use (another spdk_tgt?); {hint}")
    avail = _mem_available_mib(meminfo)
    return f"{free_mib} MiB of huge pages free, {avail} MiB of memory available"


def _mem_available_mib(meminfo: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


def peer_pid(address: str) -> int | None:
    """The pid of the process serving a Unix socket (``SO_PEERCRED``); None for
    TCP or when nobody answers."""
    try:
        family, sockaddr = parse_address(address)
        if family != socket.AF_UNIX:
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(sockaddr)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                 struct.calcsize("3i"))
            return struct.unpack("3i", creds)[0]
    except (OSError, ValueError):
        return None


# --- the supervisor ---------------------------------------------------------------

@dataclass
class SupervisorConfig:
    rpc_socket: str
    command: list[str] | None = None        # start spdk_tgt ourselves; None: attach
    poll_interval: float = 0.5
    probe_timeout: float = 2.0
    start_timeout: float = 60.0
    lvstore_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0              # running this long resets the backoff
    hang_timeout: float = 60.0              # ours, alive, silent this long: killed
    check_memory: bool = True               # huge pages (skipped for --no-huge)
    log_file: str | None = None             # spdk_tgt's stdout/stderr

    @staticmethod
    def parse_command(text: str) -> list[str]:
        return shlex.split(text)


@dataclass
class Recovery:
    """One (re)start handled: when, how long, what was fixed."""

    reason: str
    pid: int | None
    duration: float = 0.0
    pools: list[dict[str, Any]] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Supervisor:
    """Watches (and optionally runs) spdk_tgt; recovers pools and exports.

    Concurrency: ``start`` runs the watch loop on one daemon thread; all
    recovery happens there, one at a time. ``status``, ``recoveries`` and
    ``wait_recoveries`` are safe from any thread. ``stop`` ends the loop and,
    in command mode, stops spdk_tgt (SIGTERM, then SIGKILL).
    Idempotency: a recovery only adds what is missing (``Pools.attach``,
    ``DesiredState.replay``), so one triggered for a target that lost
    nothing changes nothing.
    """

    def __init__(self, config: SupervisorConfig, pools: Pools | None = None,
                 state: DesiredState | None = None,
                 on_recovered: Callable[[Recovery], None] | None = None) -> None:
        self.config = config
        self.pools = pools
        self.state = state
        self.on_recovered = on_recovered
        self.client = SpdkClient(config.rpc_socket, timeout=max(config.probe_timeout, 30.0))
        self.api = SpdkApi(self.client)
        self.proc: subprocess.Popen | None = None
        self._log_fh: Any = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._recoveries: list[Recovery] = []
        self.up = False
        self.restarts = 0
        self._pid: int | None = None
        self._started_at = 0.0
        self._failures = 0
        self._clock: ChildClock | None = None

    # --- public ------------------------------------------------------------------
    def start(self) -> Supervisor:
        if self.config.command and self.config.check_memory:
            log.info("memory check: %s", check_memory(self.config.command))
        self._thread = threading.Thread(target=self._run, name="spdk-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._terminate(timeout)
        self.client.close()

    @property
    def pid(self) -> int | None:
        return self._pid

    def recoveries(self) -> list[Recovery]:
        with self._cond:
            return list(self._recoveries)

    def wait_recoveries(self, n: int, timeout: float) -> list[Recovery]:
        """Block until ``n`` recoveries happened (or the timeout); returns them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._recoveries) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._recoveries)

    def status(self) -> dict[str, Any]:
        with self._cond:
            last = self._recoveries[-1] if self._recoveries else None
        return {"up": self.up, "pid": self._pid, "restarts": self.restarts,
                "managed": bool(self.config.command),
                "last_recovery": None if last is None else {
                    "reason": last.reason, "duration": last.duration,
                    "fixed": last.replay.get("fixed", 0), "error": last.error}}

    # --- loop ----------------------------------------------------------------------
    def _run(self) -> None:
        seen_pid: int | None = None
        was_up = False
        first = True
        spawned = ""
        down_since: float | None = None
        while not self._stop.is_set():
            if self.config.command and (self.proc is None or self.proc.poll() is not None):
                self._set_up(False)
                exited = self.proc.returncode if self.proc is not None else None
                if not self._spawn():
                    continue
                spawned = "start" if first else f"restarted after it exited ({exited})"
                was_up, seen_pid = False, None
            up = self._probe()
            if up:
                down_since = None
                pid = peer_pid(self.config.rpc_socket)
                reason = ""
                if first:
                    reason = spawned or "attached"
                elif not was_up:
                    reason = spawned or "answers again"
                elif pid is not None and seen_pid is not None and pid != seen_pid:
                    reason = f"pid changed {seen_pid} -> {pid}"
                if reason:
                    if not first:
                        self.restarts += 1
                        metrics.SPDK_TGT_RESTARTS.inc()
                    self._pid = pid
                    self._recover(reason, pid)
                    first, spawned = False, ""
                seen_pid = pid or seen_pid
            elif self.proc is not None and self.proc.poll() is None:
                down_since = self._own_time() if down_since is None else down_since
                if self._own_time() - down_since > self.config.hang_timeout:
                    log.error("spdk_tgt pid %d has not answered for %.0fs; killing it",
                              self.proc.pid, self.config.hang_timeout)
                    self._kill_proc(signal.SIGKILL)
                    self.proc.wait()
                    down_since = None
            self._set_up(up)
            was_up = up
            self._stop.wait(self.config.poll_interval)

    def _probe(self) -> bool:
        try:
            self.client.call("spdk_get_version", timeout=self.config.probe_timeout)
            return True
        except (SpdkTransportError, SpdkError, OSError):
            return False

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            log.info("spdk_tgt %s", "up" if up else "DOWN")
        self.up = up
        metrics.SPDK_TGT_UP.set(1 if up else 0)

    # --- process care --------------------------------------------------------------------
    def _spawn(self) -> bool:
        """Start spdk_tgt (after a backoff if it died); True once it answers."""
        if self.proc is not None:
            code = self.proc.returncode
            ran = time.monotonic() - self._started_at
            self._failures = 0 if ran >= self.config.stable_after else self._failures + 1
            delay = min(self.config.backoff_max,
                        self.config.backoff_initial * (2 ** max(0, self._failures - 1)))
            log.error("spdk_tgt (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                      self.proc.pid, code, ran, delay if self._failures else 0.0)
            self.proc = None
            if self._failures and self._stop.wait(delay):
                return False
        cmd = list(self.config.command or [])
        if self._log_fh is None and self.config.log_file:
            self._log_fh = open(self.config.log_file, "ab")   # noqa: SIM115 (kept open)
        out = self._log_fh or subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as err:
            log.error("cannot start spdk_tgt (%s): %s", shlex.join(cmd), err)
            self._failures += 1
            self._stop.wait(min(self.config.backoff_max, self.config.backoff_initial
                                * (2 ** self._failures)))
            return False
        self._started_at = time.monotonic()
        self._clock = ChildClock(self.proc.pid, also=[os.getpid()])
        log.info("started spdk_tgt pid %d: %s", self.proc.pid, shlex.join(cmd))
        while not self._stop.is_set():
            if self.proc.poll() is not None:
                return False                   # died during start-up: next loop backs off
            if self._probe():
                return True
            if self._own_time() > self.config.start_timeout:
                log.error("spdk_tgt pid %d did not answer on %s within %.0fs; killing it",
                          self.proc.pid, self.config.rpc_socket, self.config.start_timeout)
                self._kill_proc(signal.SIGKILL)
                return False
            time.sleep(0.05)
        return False

    def _own_time(self) -> float:
        """Seconds of our spdk_tgt's own time since it started (wall time when
        it is not ours)."""
        clock = self._clock if self.proc is not None else None
        return clock.elapsed() if clock is not None else time.monotonic()

    def _kill_proc(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def _terminate(self, timeout: float) -> None:
        if self.proc is None:
            return
        self._kill_proc(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_proc(signal.SIGKILL)
            self.proc.wait(timeout)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # --- recovery ----------------------------------------------------------------------
    def _recover(self, reason: str, pid: int | None) -> None:
        rec = Recovery(reason, pid)
        t0 = time.monotonic()
        try:
            if self.pools is not None:
                self.pools.attach()
                if not self.pools.wait_lvstores(self.config.lvstore_timeout,
                                                clock=self._own_time):
                    log.warning("not every pool's lvstore appeared within %.0fs",
                                self.config.lvstore_timeout)
                rec.pools = self.pools.report()
            if self.state is not None:
                rec.replay = self.state.replay(self.api)
        except (SpdkError, OSError) as err:      # the target died again mid-way
            rec.error = str(err)
            log.error("recovery after %s failed: %s (retried on the next start)", reason, err)
        rec.duration = time.monotonic() - t0
        metrics.REPLAY_DURATION.observe(rec.duration)
        for kind, ids in {**rec.replay.get("created", {})}.items():
            if ids:
                metrics.REPLAYED_OBJECTS.labels(kind).inc(len(ids))
        for kind, ids in rec.replay.get("removed", {}).items():
            if ids:
                metrics.REPLAYED_OBJECTS.labels(f"removed_{kind}").inc(len(ids))
        if rec.replay.get("failed"):
            metrics.REPLAY_FAILURES.inc(len(rec.replay["failed"]))
        ready = sum(1 for p in rec.pools if p.get("ready"))
        log.info("spdk_tgt %s (pid %s): %d/%d pools ready, %d objects fixed, %d failed, "
                 "%.3fs", reason, pid, ready, len(rec.pools), rec.replay.get("fixed", 0),
                 len(rec.replay.get("failed", [])), rec.duration)
        rec.replay = _kept(rec.replay)
        with self._cond:
            self._recoveries.append(rec)
            self._cond.notify_all()
        release_freed_heap()
        if self.on_recovered is not None:
            self.on_recovered(rec)


# Ids of each kind a kept Recovery holds: a replay of 10,000 volumes names
# ~40,000 objects (~10 MiB), and every recovery is kept.
KEPT_IDS = 50


def _kept(report: dict[str, Any]) -> dict[str, Any]:
    """What a kept Recovery holds of a replay report: every count
    (``counts``), and the first ``KEPT_IDS`` of each list (the log line and
    the metrics had them all)."""
    if not report:
        return report
    created, removed = report.get("created", {}), report.get("removed", {})
    failed = report.get("failed", [])
    return {**report,
            "counts": {"created": {k: len(v) for k, v in created.items()},
                       "removed": {k: len(v) for k, v in removed.items()},
                       "failed": len(failed)},
            "created": {k: v[:KEPT_IDS] for k, v in created.items()},
            "removed": {k: v[:KEPT_IDS] for k, v in removed.items()},
            "failed": failed[:KEPT_IDS]}


def sim_command(rpc_socket: str, data_dir: str, *extra: str) -> list[str]:
    """The simulator as the supervised "spdk_tgt" (tests, ``dev``)."""
    import sys
    return [sys.executable, "-m", "csi_spdk", "sim", "--rpc-socket", rpc_socket,
            "--data-dir", data_dir, *extra]

