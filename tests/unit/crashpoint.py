"""Run a program that SIGKILLs itself at one point of the desired-state
journal's disk writes: a real ``kill -9`` exactly there, not a mock.

    python tests/unit/crashpoint.py -m csi_spdk agent ...      (the agent)
    python tests/unit/crashpoint.py -c "<code>"                (a writer)

``CSI_SPDK_CRASHPOINT`` says where (nothing is patched without it):

- ``append-torn@<text>``: the first journal record whose line contains
  ``<text>`` is written half, then the process kills itself (a torn record);
- ``append-unsynced@<text>``: written whole, killed before its fdatasync;
- ``compact-snapshot@<n>``: the ``n``-th compaction (the one at start counts
  as 1) has written and fsync'd the new snapshot's temporary file; killed
  before the rename;
- ``compact-journal@<n>``: the new snapshot is renamed in place, the fresh
  journal's temporary file written; killed before it replaces the old journal;
- ``compact-snapshot@<text>``, ``compact-journal@<text>``: the same, in a
  compaction forced right after the first record containing ``<text>`` (that
  record is durable, its call not yet acknowledged).

``CSI_SPDK_CRASHPOINT_COMPACT_BYTES`` lowers the compaction threshold (so a
compaction happens within a few records).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def install(point: str) -> None:
    from csi_spdk.agent import journal

    kind, _, arg = point.partition("@")
    if os.environ.get("CSI_SPDK_CRASHPOINT_COMPACT_BYTES"):
        journal.COMPACT_MIN_BYTES = int(os.environ["CSI_SPDK_CRASHPOINT_COMPACT_BYTES"])
    if kind.startswith("append-"):
        real_write = journal.Journal._write

        def write(self, line: bytes) -> None:
            if arg.encode() not in line:
                return real_write(self, line)
            assert self._fd is not None
            if kind == "append-torn":
                os.write(self._fd, line[: len(line) // 2])
            else:
                os.write(self._fd, line)
            _die()
        journal.Journal._write = write
        return
    if kind.startswith("compact-"):
        real_replace = os.replace
        seen = {"snapshots": 0, "armed": arg.isdigit()}
        if not arg.isdigit():
            real_write, real_wants = journal.Journal._write, journal.Journal.wants_compaction

            def write(self, line: bytes) -> None:
                real_write(self, line)
                if arg.encode() in line:
                    seen["armed"], seen["forced"] = True, True

            def wants(self) -> bool:
                return bool(seen.pop("forced", False)) or real_wants(self)
            journal.Journal._write, journal.Journal.wants_compaction = write, wants

        def due() -> bool:
            return seen["armed"] and (not arg.isdigit() or seen["snapshots"] == int(arg))

        def replace(src, dst, *a, **k):
            dst_path = Path(dst)
            if dst_path.suffix == ".json" and dst_path.name.startswith("desired"):
                seen["snapshots"] += 1
                if kind == "compact-snapshot" and due():
                    _die()
            elif dst_path.suffix == ".journal" and kind == "compact-journal" and due():
                _die()
            return real_replace(src, dst, *a, **k)
        os.replace = replace
        return
    raise SystemExit(f"unknown crash point {point!r}")

def main() -> None:
    point = os.environ.get("CSI_SPDK_CRASHPOINT", "")
    if point:
        install(point)
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[:1] == ["-c"]:
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<crashpoint -c>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(__doc__)

if __name__ == "__main__":
    main()
