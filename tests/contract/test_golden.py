"""Replay every spdk-golden transcript against a fresh simulator and compare.

Each file runs on one persistent connection like the recording (RAW entries of
file 11: a new connection each, exact bytes). See ``golden_replay`` for the
narrow normalisation (UUID bijection, tick counters, recorded paths).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from csi_spdk.sim import SimServer

from .golden_replay import RECORDED_ROOT, Connection, UuidMap, compare, map_paths, translate

GOLDEN_DIR = Path(os.environ.get("CSI_SPDK_GOLDEN_DIR") or
                  Path(__file__).resolve().parents[2].parent / "shared" / "spdk-golden")
FILES = sorted(p.name for p in GOLDEN_DIR.glob("*.json")) if GOLDEN_DIR.is_dir() else []

# Keys of file 10 (README: throwaway values, mode 0600); "loose" is the 0644 one.
KEYS = {
    "psk0": "NVMeTLSkey-1:01:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:",
    "dh0": "DHHC-1:00:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:",
    "dhc0": "DHHC-1:00:ZmZlZWRkY2NiYmFhOTk4ODc3NjY1NTQ0MzMyMjExMDBfBm/Y:",
}

# (file, entry index) -> reason. Entries listed here are sent but not compared.
EXCEPTIONS: dict[tuple[str, int], str] = {}

MIB = 1 << 20


def _file12_first_io(server: SimServer) -> None:
    # Between entries 9 and 10 spdk_dd connected over NVMe/TCP and wrote 3 MiB at
    # offset 0 of namespace 1 (thin0). The recording's iostat (entry 12) shows the
    # host I/O: 3 reads / 40 KiB (initiator probes) + 24 writes of 128 KiB.
    for length in (4096, 4096, 32768):
        server.read("lvs0/thin0", 0, length)
    server.write("lvs0/thin0", 0, b"\x5a" * (3 * MIB), io_size=128 * 1024)


def _file12_second_io(server: SimServer) -> None:
    # Between entries 15 and 16: 1 MiB written at offset 8 MiB (thin0 is now a clone).
    server.write("lvs0/thin0", 8 * MIB, b"\xa5" * MIB, io_size=128 * 1024)


# file -> {entry index: action run just before that entry is sent}
INJECT: dict[str, dict[int, Callable[[SimServer], None]]] = {
    "12_thin_alloc_with_io.json": {10: _file12_first_io, 16: _file12_second_io},
}

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("CSI_SPDK_TEST_RPC")),
    reason="CSI_SPDK_TEST_RPC names a shared real spdk_tgt; the golden replay needs a "
           "fresh target per transcript")


def _fixtures(root: Path) -> None:
    """Files the transcripts reference under /var/tmp/spdk-golden."""
    root.mkdir(parents=True)
    with open(root / "aio0.img", "wb") as f:
        f.truncate(1 << 30)                      # 1 GiB sparse aio image
    keys = root / "keys"
    keys.mkdir()
    for name, secret in KEYS.items():
        path = keys / name
        path.write_text(secret)
        path.chmod(0o600)
    loose = keys / "loose"
    loose.write_text(KEYS["psk0"])
    loose.chmod(0o644)


def _raw_entry(sock_path: str, raw: str, expected: Any, extra: str | None) -> list[str]:
    conn = Connection(sock_path)
    try:
        conn.send(raw.encode())
        if isinstance(expected, dict) and "__no_response__" in expected:
            data = conn.read_for(0.5)
            why = expected["__no_response__"]
            errors = [f"expected no reply, got {data!r}"] if data else []
            if "closed" in why and not conn.closed:
                errors.append("expected the server to close the connection")
            if "closed" not in why and conn.closed:
                errors.append("server closed the connection, expected it to stay open")
            return errors
        if isinstance(expected, dict) and "__raw_unparsed__" in expected:
            data = conn.read_for(0.5).decode()
            if data != expected["__raw_unparsed__"]:
                return [f"expected raw bytes {expected['__raw_unparsed__']!r}, got {data!r}"]
            return []
        try:
            got = conn.read_value(5.0)
        except (TimeoutError, ConnectionError) as err:
            return [f"no reply: {err}"]
        errors = compare(expected, got, UuidMap())
        rest = conn.read_for(0.3 if extra is None else 0.5)
        want_rest = extra if extra is not None else "\n"
        if rest.decode() != want_rest:
            errors.append(f"bytes after the reply: expected {want_rest!r}, got {rest.decode()!r}")
        return errors
    finally:
        conn.close()


@pytest.mark.parametrize("name", FILES)
def test_golden(name: str, tmp_path: Path) -> None:
    entries = json.loads((GOLDEN_DIR / name).read_text())
    root = tmp_path / "golden"
    _fixtures(root)
    sock = str(tmp_path / "spdk.sock")
    server = SimServer(sock, tmp_path / "data").start()
    uuids = UuidMap()
    failures: list[str] = []
    conn = Connection(sock)
    try:
        for index, entry in enumerate(entries):
            action = INJECT.get(name, {}).get(index)
            if action is not None:
                action(server)
            request = map_paths(entry["request"], str(root))
            expected = map_paths(entry["response"], str(root))
            if isinstance(request, str):
                errors = _raw_entry(sock, request, expected,
                                    entry.get("extra_bytes_after_response"))
            else:
                conn.send(json.dumps(translate(request, uuids)).encode())
                try:
                    got = conn.read_value(10.0)
                except (TimeoutError, ConnectionError) as err:
                    failures.append(f"[{index}] {entry['request']}: no reply ({err})")
                    break
                errors = compare(expected, got, uuids)
            if errors and (name, index) not in EXCEPTIONS:
                req = entry["request"] if isinstance(entry["request"], str) else \
                    json.dumps(entry["request"])
                note = f"  # {entry['note']}" if entry.get("note") else ""
                failures.append(f"entry [{index}] {req[:200]}{note}\n    "
                                + "\n    ".join(errors[:8]))
    finally:
        conn.close()
        server.stop()
    assert not failures, f"{name}: {len(failures)} entries differ\n" + "\n".join(failures)


def test_golden_dir_present() -> None:
    assert FILES, f"no transcripts in {GOLDEN_DIR} (set CSI_SPDK_GOLDEN_DIR)"
    assert RECORDED_ROOT == "/var/tmp/spdk-golden"
