"""Record a target's replies to a generated sequence; replay and compare.

A recording is ``{"seed", "steps", "target", "root", "entries": [{"request",
"response"}, ...]}``: the exact request objects sent on one connection and the
reply objects that came back. Comparison reuses the golden replay's narrow
normalisation (``tests/contract/golden_replay.py``): UUIDs paired as a
bijection on first sight, tick counters and the tick rate only need to be
integers, and the host directory the fixtures live in is written as ``ROOT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.contract.golden_replay import Connection, UuidMap, compare, map_paths, translate

from .generator import Generator

ROOT = "/var/tmp/spdk-diff"          # fixture directory as written in recordings
RECORDINGS = Path(__file__).resolve().parent / "recordings"
KEYS = {   # throwaway values, the same as spdk-golden's file 10
    "psk0": "NVMeTLSkey-1:01:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:",
    "dh0": "DHHC-1:00:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:",
    "dhc0": "DHHC-1:00:ZmZlZWRkY2NiYmFhOTk4ODc3NjY1NTQ0MzMyMjExMDBfBm/Y:",
}
AIO_FILES = {"aio0.img": 256 << 20, "aio1.img": 64 << 20}   # sparse


def make_fixtures(root: Path) -> None:
    """The files generated requests name: sparse aio images and key files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, size in AIO_FILES.items():
        with open(root / name, "wb") as f:
            f.truncate(size)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    for name, secret in KEYS.items():
        (keys / name).write_text(secret)
        (keys / name).chmod(0o600)
    (keys / "loose").write_text(KEYS["psk0"])
    (keys / "loose").chmod(0o644)


def to_host(value: Any, root: str) -> Any:
    return map_paths(value, root, ROOT)


def to_recorded(value: Any, root: str) -> Any:
    return map_paths(value, ROOT, root)


def call(conn: Connection, request: dict[str, Any], timeout: float = 30.0) -> Any:
    conn.send(json.dumps(request).encode())
    return conn.read_value(timeout)


def record(sock: str, root: str, seed: int, steps: int) -> list[dict[str, Any]]:
    """Run ``steps`` generated requests against the target at ``sock``."""
    gen = Generator(seed, ROOT)
    entries = []
    conn = Connection(sock, timeout=30.0)
    try:
        for _ in range(steps):
            request = gen.next()
            try:
                reply = to_recorded(call(conn, to_host(request, root)), root)
            except (TimeoutError, ConnectionError) as err:
                raise RuntimeError(f"seed {seed} step {len(entries)}: no reply to "
                                   f"{json.dumps(request)} ({err})") from err
            gen.observe(request, reply)
            entries.append({"request": request, "response": reply})
    finally:
        conn.close()
    return entries


@dataclass
class Difference:
    index: int
    request: dict[str, Any]
    errors: list[str]

    def __str__(self) -> str:
        return (f"[{self.index}] {json.dumps(self.request)[:240]}\n    "
                + "\n    ".join(self.errors[:6]))


@dataclass
class Replay:
    differences: list[Difference] = field(default_factory=list)
    uuids: UuidMap = field(default_factory=UuidMap)


def replay(entries: list[dict[str, Any]], sock: str, root: str) -> Replay:
    """Send every recorded request (UUIDs translated) and compare the replies."""
    out = Replay()
    conn = Connection(sock, timeout=30.0)
    try:
        for index, entry in enumerate(entries):
            request = translate(entry["request"], out.uuids)
            got = to_recorded(call(conn, to_host(request, root)), root)
            errors = compare(entry["response"], got, out.uuids)
            if errors:
                out.differences.append(Difference(index, entry["request"], errors))
    finally:
        conn.close()
    return out


def compare_live(sock_a: str, root_a: str, sock_b: str, root_b: str, seed: int,
                 steps: int) -> Replay:
    """Drive two targets with one generated sequence; ``a`` is the reference."""
    gen = Generator(seed, ROOT)
    out = Replay()
    conn_a, conn_b = Connection(sock_a, timeout=30.0), Connection(sock_b, timeout=30.0)
    try:
        for index in range(steps):
            request = gen.next()
            want = to_recorded(call(conn_a, to_host(request, root_a)), root_a)
            gen.observe(request, want)
            got = to_recorded(call(conn_b, to_host(translate(request, out.uuids), root_b)),
                              root_b)
            errors = compare(want, got, out.uuids)
            if errors:
                out.differences.append(Difference(index, request, errors))
    finally:
        conn_a.close()
        conn_b.close()
    return out


def save(path: Path, seed: int, steps: int, target: str,
         entries: list[dict[str, Any]]) -> None:
    """Compact JSON, one entry per line (reviewable diffs when re-recorded)."""
    head = json.dumps({"seed": seed, "steps": steps, "target": target, "root": ROOT},
                      separators=(",", ":"))[:-1]
    lines = [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in entries]
    path.write_text(head + ',"entries":[\n' + ",\n".join(lines) + "\n]}\n")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def wait_for_socket(sock: str, proc: subprocess.Popen[bytes] | None,
                    timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode} before serving RPC")
        if os.path.exists(sock):
            try:
                conn = Connection(sock, timeout=5.0)
            except OSError:
                pass
            else:
                try:
                    reply = call(conn, {"jsonrpc": "2.0", "id": 0,
                                        "method": "framework_wait_init"}, 10.0)
                    if reply.get("result") is True:
                        return
                finally:
                    conn.close()
        time.sleep(0.2)
    raise TimeoutError(f"no RPC on {sock} after {timeout:.0f}s")


@contextmanager
def spdk_tgt(binary: str, log_path: Path | None = None) -> Iterator[tuple[str, str]]:
    """A fresh real spdk_tgt (no huge pages, one core) and a fixture dir: (sock, root)."""
    tmp = Path(tempfile.mkdtemp(prefix="spdk-diff-", dir="/tmp"))
    root, sock = tmp / "root", str(tmp / "spdk.sock")
    make_fixtures(root)
    with open(log_path or tmp / "spdk_tgt.log", "wb") as log:
        proc = subprocess.Popen([binary, "--no-huge", "-s", "2048", "-u", "-m", "0x1",
                                 "--disable-cpumask-locks", "-r", sock],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp)  # cores stay in tmp
        try:
            wait_for_socket(sock, proc)
            yield sock, str(root)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


@contextmanager
def simulator() -> Iterator[tuple[str, str]]:
    """A fresh in-process simulator and a fixture dir: (sock, root)."""
    from csi_spdk.sim import SimServer

    tmp = Path(tempfile.mkdtemp(prefix="sim-diff-", dir="/tmp"))
    root, sock = tmp / "root", str(tmp / "spdk.sock")
    make_fixtures(root)
    server = SimServer(sock, tmp / "data").start()
    try:
        yield sock, str(root)
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
