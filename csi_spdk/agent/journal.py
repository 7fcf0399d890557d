"""The agent's desired state on disk: a snapshot plus an append-only journal.

Rewriting the whole record on every change costs a full serialization and two
fsyncs of a file that grows with the number of exports (megabytes at 10,000
volumes), on the path of every mutating SPDK call. Instead each change is one
small record appended to ``<name>.journal`` and made durable with one
``fdatasync`` before the call is acknowledged; now and then (when the journal
outgrows the snapshot) the whole state is written once as a new snapshot and
the journal starts over.

Files, both 0600 in the 0700 state directory:

- ``desired.json``, the snapshot: ``{"format": 2, "seq": S, "state": {...}}``,
  replaced atomically (write-temp, fsync, rename, fsync the directory). The
  state holds every change up to record number ``S``. A ``format: 1`` file
  (the whole-file record of earlier agents: the state itself) is migrated on
  the first start: read as the state at ``S = 0`` and rewritten as format 2.
- ``desired.journal``: a header line, then one line per change::

      <crc32 of the JSON, 8 hex digits> <JSON>\\n

  header ``{"format": 2, "base": S}`` (the snapshot it follows), records
  ``{"seq": n, "ops": [["set", section, key, value] | ["del", section, key]]}``
  with ``n`` counting up by one. A record holds the new value of each entry
  (subsystem, key name, QoS limits, crypto record) a change touched, never a
  key's material (the state has none: see ``state.py``, ``crypto_state.py``).

Crash safety. A record is acknowledged only after its ``fdatasync``. A SIGKILL
during an append leaves at most a torn last line (short, or not matching its
checksum): it is dropped on load (its call was never acknowledged), and the
load compacts, so the torn bytes are gone before anything is appended. A bad
line *followed by* good ones is corruption, not a crash, and is refused
(``StateError``), never silently skipped. Compaction writes the snapshot
first (atomically), then replaces the journal with an empty one (atomically):
killed in between, the old journal's records are all ``<= S`` and are
skipped. Records must follow the snapshot without a gap, and the journal's
base may not be newer than the snapshot, so a lost or restored-old snapshot
is an error too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import atomicfile
from . import packed
from .packed import Packed

log = logging.getLogger("csi_spdk.agent.journal")

FORMAT = 2
LEGACY_FORMAT = 1
# Compact when the journal is larger than the snapshot and at least this big:
# the amortised cost of a compaction per record stays constant.
COMPACT_MIN_BYTES = 1 << 20

Op = list[Any]


class StateError(Exception):
    """The state files exist but cannot be used (never silently dropped)."""


def _line(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse(line: bytes) -> dict[str, Any] | None:
    """The record in one journal line; None when it is torn or damaged."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def section(data: dict[str, Any], name: str) -> Packed:
    """One of the state's maps by name; ``crypto.keys`` is ``data["crypto"]["keys"]``."""
    if "." in name:
        top, sub = name.split(".", 1)
        return data.setdefault(top, {}).setdefault(sub, Packed())
    return data.setdefault(name, Packed())


def apply(data: dict[str, Any], ops: list[Op]) -> None:
    for op in ops:
        if op[0] == "set":
            section(data, op[1])[op[2]] = op[3]
        elif op[0] == "del":
            section(data, op[1]).pop(op[2], None)
        else:
            raise StateError(f"unknown journal operation {op[0]!r}")


def _merged(empty: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The loaded sections over the empty ones (nested sections merged too)."""
    out = {**empty, **data}
    for name in packed.NESTED:
        if isinstance(empty.get(name), dict) and isinstance(data.get(name), dict):
            out[name] = {**empty[name], **data[name]}
    return out


class Journal:
    """Snapshot ``path`` and its journal; one writer (the caller serialises
    ``append`` and ``compact``, ``DesiredState`` under its lock)."""

    def __init__(self, path: str | os.PathLike[str],
                 compact_min_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.journal_path = self.path.with_suffix(".journal")
        self.compact_min_bytes = COMPACT_MIN_BYTES if compact_min_bytes is None \
            else compact_min_bytes
        self.seq = 0
        self._fd: int | None = None
        self._journal_bytes = 0
        self._snapshot_bytes = 0

    # --- load ----------------------------------------------------------------------
    def load(self, empty: dict[str, Any]) -> dict[str, Any]:
        """The state: snapshot plus journal (migrated, compacted, ready to append)."""
        data, base, legacy = self._read_snapshot(empty)
        records, torn = self._read_journal(base)
        for rec in records:
            apply(data, rec["ops"])
            packed.settle(data)
        self.seq = records[-1]["seq"] if records else base
        if torn:
            log.warning("desired state: dropped a torn last journal record of %s (a change "
                        "that was never acknowledged: the agent was killed while writing it)",
                        self.journal_path)
        if legacy:
            log.info("desired state: migrated %s from format %d to %d (snapshot + journal)",
                     self.path, LEGACY_FORMAT, FORMAT)
        self.compact(data)     # a clean start: the torn bytes are gone, format 2 on disk
        return data

    def read(self, empty: dict[str, Any]) -> dict[str, Any]:
        """The state, read without writing anything (a live agent may own the
        files: reports and checks use this, never ``load``)."""
        for attempt in range(3):
            try:
                data, base, _ = self._read_snapshot(copy.deepcopy(empty))
                records, _ = self._read_journal(base)
                break
            except StateError:
                if attempt == 2:
                    raise
                time.sleep(0.05)   # the owner compacted between the two reads
        for rec in records:
            apply(data, rec["ops"])
            packed.settle(data)
        self.seq = records[-1]["seq"] if records else base
        return data

    def _read_snapshot(self, empty: dict[str, Any]) -> tuple[dict[str, Any], int, bool]:
        try:
            raw = self._parse_snapshot()
        except (ValueError, OSError) as err:
            raise StateError(f"desired state {self.path} is unreadable ({err}); move it "
                             "away (with desired.journal) to start empty, every export it "
                             "held will then be lost on the next spdk_tgt restart") from err
        if raw is None:
            return empty, 0, False
        if not isinstance(raw, dict):
            raise StateError(f"desired state {self.path} has an unknown format")
        if raw.get("format") == LEGACY_FORMAT:             # an earlier agent's whole file
            data = {k: v for k, v in raw.items() if k != "format"}
            return _merged(empty, data), 0, True
        if raw.get("format") != FORMAT or not isinstance(raw.get("state"), dict) \
                or not isinstance(raw.get("seq"), int):
            raise StateError(f"desired state {self.path} has an unknown format "
                             f"({raw.get('format')!r}; this agent reads {LEGACY_FORMAT} "
                             f"and {FORMAT})")
        return _merged(empty, raw["state"]), raw["seq"], False

    def _parse_snapshot(self) -> Any:
        """The snapshot's top-level value, its sections packed entry by entry
        (``packed.load``: the file is never one tree of Python objects); None
        when there is none."""
        try:
            text = self.path.read_bytes().decode()
        except FileNotFoundError:
            return None
        if text.lstrip()[:1] != "{":
            return json.loads(text)          # not an object: ValueError or an unknown format
        return packed.load(text)

    def _read_journal(self, base: int) -> tuple[list[dict[str, Any]], bool]:
        """The records after ``base``; and whether a torn last one was dropped."""
        try:
            with open(self.journal_path, "rb") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return [], False
        parsed = [_parse(line) for line in lines]
        torn = False
        if parsed and parsed[-1] is None:
            parsed, torn = parsed[:-1], True
        if any(p is None for p in parsed):
            bad = parsed.index(None) + 1
            raise StateError(f"desired state journal {self.journal_path} is damaged at line "
                             f"{bad} (good records follow it, so it is not a torn write); "
                             "move it and desired.json away to start empty, every export "
                             "they held will then be lost on the next spdk_tgt restart")
        if not parsed:
            return [], torn
        header, records = parsed[0], parsed[1:]
        if header.get("format") != FORMAT or not isinstance(header.get("base"), int):
            raise StateError(f"desired state journal {self.journal_path} has an unknown "
                             f"format ({header.get('format')!r}; this agent reads {FORMAT})")
        if header["base"] > base:
            raise StateError(f"desired state journal {self.journal_path} follows snapshot "
                             f"{header['base']} but {self.path} is snapshot {base} (an older "
                             "copy restored?): records in between are missing")
        out, want = [], header["base"] + 1
        for rec in records:
            if rec.get("seq") != want or not isinstance(rec.get("ops"), list):
                raise StateError(f"desired state journal {self.journal_path}: record "
                                 f"{rec.get('seq')!r} where {want} was expected")
            want += 1
            if rec["seq"] > base:
                out.append(rec)
        if want - 1 < base:
            raise StateError(f"desired state journal {self.journal_path} ends at record "
                             f"{want - 1}, before snapshot {base}")
        return out, torn

    # --- write ---------------------------------------------------------------------
    def append(self, ops: list[Op]) -> None:
        """One durable record (returns after its fdatasync)."""
        if not ops:
            return
        if self._fd is None:
            raise StateError("desired state journal is not open (load() first)")
        line = _line({"seq": self.seq + 1, "ops": ops})
        self._write(line)
        self.seq += 1
        self._journal_bytes += len(line)

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        os.fdatasync(self._fd)

    def wants_compaction(self) -> bool:
        return self._journal_bytes >= max(self.compact_min_bytes, self._snapshot_bytes)

    def compact(self, data: dict[str, Any]) -> None:
        """Write ``data`` (the state at ``seq``) as the snapshot; empty the journal."""
        # what json.dumps(sort_keys, compact) of the whole record gives, built
        # from the packed entries without decoding them
        size = 0

        def counted() -> Iterator[bytes]:
            nonlocal size
            for chunk in packed.chunks(b'{"format":%d,"seq":%d,"state":' % (FORMAT, self.seq),
                                       data, b"}\n"):
                size += len(chunk)
                yield chunk
        atomicfile.write_chunks(self.path, counted(), 0o600)
        self._snapshot_bytes = size
        header = _line({"format": FORMAT, "base": self.seq})
        atomicfile.write_bytes(self.journal_path, header, 0o600)
        self.close()
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        self._journal_bytes = 0

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
