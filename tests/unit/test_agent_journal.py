"""The desired state's journal on disk (agent/journal.py): real SIGKILLs at
the points of an append and of a compaction (tests/unit/crashpoint.py), a
torn or damaged journal, the format-1 migration, one writer per directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from simproc import env

from csi_spdk.agent.journal import FORMAT
from csi_spdk.agent.state import DesiredState, StateError

CRASH = str(Path(__file__).resolve().parent / "crashpoint.py")

_WRITER = """
import sys
from csi_spdk.agent.state import DesiredState
s = DesiredState(sys.argv[1])
i = len(s.snapshot()["subsystems"])
while i < int(sys.argv[2]):
    s.record("nvmf_create_subsystem", {"nqn": f"nqn.x:s{i:06d}", "allow_any_host": False})
    print(i, flush=True)                                   # acknowledged
    i += 1
"""


def _nqns(n: int, start: int = 0) -> list[str]:
    return [f"nqn.x:s{i:06d}" for i in range(start, n)]


def run_writer(path: Path, upto: int, point: str = "", compact_bytes: int = 0
               ) -> tuple[int, list[int]]:
    """Run the writer (under a crash point); its exit code and acknowledged numbers."""
    e = env()
    if point:
        e["CSI_SPDK_CRASHPOINT"] = point
    if compact_bytes:
        e["CSI_SPDK_CRASHPOINT_COMPACT_BYTES"] = str(compact_bytes)
    proc = subprocess.run([sys.executable, CRASH, "-c", _WRITER, str(path), str(upto)],
                          env=e, capture_output=True, timeout=120)
    lines = proc.stdout.decode().split()
    return proc.returncode, [int(x) for x in lines]


def load(path: Path) -> list[str]:
    st = DesiredState(path)
    try:
        return sorted(st.snapshot()["subsystems"])
    finally:
        st.close()


def test_kill9_mid_append_drops_only_the_torn_unacknowledged_record(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    rc, acked = run_writer(path, 10)
    assert rc == 0 and acked == list(range(10))
    rc, acked = run_writer(path, 20, point="append-torn@nqn.x:s000013")
    assert rc == -signal.SIGKILL and acked == [10, 11, 12]
    journal = path.with_suffix(".journal").read_bytes()
    assert not journal.endswith(b"\n"), "the kill left a torn record"
    assert load(path) == _nqns(13)                       # 0..12: all acknowledged, no more
    # the load compacted: the torn bytes are gone, appends go on cleanly
    assert path.with_suffix(".journal").read_bytes().count(b"\n") == 1   # the header only
    rc, acked = run_writer(path, 15)
    assert rc == 0 and acked == [13, 14]
    assert load(path) == _nqns(15)


def test_kill9_before_the_fdatasync_loses_nothing_acknowledged(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    rc, acked = run_writer(path, 20, point="append-unsynced@nqn.x:s000005")
    assert rc == -signal.SIGKILL and acked == [0, 1, 2, 3, 4]
    # the page cache outlives the process: the unacknowledged record may be there
    assert load(path) in (_nqns(5), _nqns(6))


@pytest.mark.parametrize("point", ["compact-snapshot@2", "compact-snapshot@4",
                                   "compact-journal@2", "compact-journal@3"])
def test_kill9_during_compaction_loses_nothing(short_tmp: Path, point: str) -> None:
    """A compaction runs after a record's append (durable, not yet
    acknowledged): killed at any of its steps, every acknowledged record and
    the one in flight are there after the restart."""
    path = short_tmp / "st" / "desired.json"
    rc, acked = run_writer(path, 400, point=point, compact_bytes=2048)
    assert rc == -signal.SIGKILL, "the writer was not killed: no compaction reached?"
    assert len(acked) > 3
    got = load(path)
    assert got == _nqns(len(acked) + 1)                 # the acked ones + the durable one
    assert not [p.name for p in path.parent.iterdir() if ".tmp." in p.name]
    rc, more = run_writer(path, len(got) + 3)
    assert rc == 0 and more == list(range(len(got), len(got) + 3))


def test_compaction_bounds_the_journal(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    st = DesiredState(path, compact_min_bytes=4096)
    for i in range(300):
        st.record("nvmf_create_subsystem", {"nqn": f"nqn.x:s{i:06d}"})
        st.record("nvmf_subsystem_add_host", {"nqn": f"nqn.x:s{i:06d}", "host": "nqn.x:h"})
    journal, snapshot = path.with_suffix(".journal"), json.loads(path.read_text())
    assert snapshot["format"] == FORMAT and snapshot["seq"] > 0
    assert journal.stat().st_size <= max(4096, path.stat().st_size) + 1024
    want = st.snapshot()
    st.close()
    assert DesiredState(path, read_only=True).snapshot() == want
    assert len(want["subsystems"]) == 300
    assert all(list(s["hosts"]) == ["nqn.x:h"] for s in want["subsystems"].values())


def test_format_1_state_is_migrated_on_first_start(short_tmp: Path) -> None:
    """The whole-file record an earlier agent wrote (format 1) is read, kept,
    and rewritten as a format-2 snapshot; changes then go to the journal."""
    path = short_tmp / "st" / "desired.json"
    path.parent.mkdir(mode=0o700)
    sub = {"params": {"nqn": "nqn.x:old", "allow_any_host": False}, "allow_any_host": False,
           "namespaces": {"1": {"namespace": {"bdev_name": "lv", "nsid": 1}}},
           "listeners": [], "hosts": {"nqn.x:h1": {"host": "nqn.x:h1"}}}
    old = {"format": 1, "transports": {"TCP": {"trtype": "TCP"}},
           "keys": {"k1": {"name": "k1", "path": "/k/k1"}},
           "subsystems": {"nqn.x:old": sub}, "qos": {"lv": {"rw_ios_per_sec": 2000}},
           "crypto": {"keys": {}, "bdevs": {}}}
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    st = DesiredState(path)
    want = {k: v for k, v in old.items() if k != "format"}
    assert st.snapshot() == want
    on_disk = json.loads(path.read_text())
    assert on_disk == {"format": FORMAT, "seq": 0, "state": want}
    st.record("nvmf_subsystem_remove_host", {"nqn": "nqn.x:old", "host": "nqn.x:h1"})
    st.close()
    again = DesiredState(path).snapshot()
    assert again["subsystems"]["nqn.x:old"]["hosts"] == {} and again["keys"] == want["keys"]


def _journal_with(path: Path, n: int) -> list[bytes]:
    st = DesiredState(path)
    for i in range(n):
        st.record("nvmf_create_subsystem", {"nqn": f"nqn.x:s{i:06d}"})
    st.close()
    return path.with_suffix(".journal").read_bytes().splitlines(keepends=True)


def test_damage_before_good_records_is_refused_not_skipped(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    lines = _journal_with(path, 4)
    lines[2] = lines[2].replace(b"s000001", b"s00000X")          # checksum mismatch
    path.with_suffix(".journal").write_bytes(b"".join(lines))
    with pytest.raises(StateError, match="damaged at line 3.*not a torn write"):
        DesiredState(path)
    assert path.with_suffix(".journal").read_bytes() == b"".join(lines)   # left as found


def test_a_gap_in_the_records_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    lines = _journal_with(path, 4)
    path.with_suffix(".journal").write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(StateError, match="record 3 where 2 was expected"):
        DesiredState(path)


def test_unknown_formats_are_refused(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(json.dumps({"format": 3, "seq": 0, "state": {}}))
    with pytest.raises(StateError, match="unknown format.*reads 1 and 2"):
        DesiredState(path)
    path.write_text('{"format": 2, "seq": 0, "state": {')
    with pytest.raises(StateError, match="unreadable.*move it away"):
        DesiredState(path)


def test_one_writer_per_state_directory(short_tmp: Path) -> None:
    path = short_tmp / "st" / "desired.json"
    first = DesiredState(path)
    first.record("nvmf_create_subsystem", {"nqn": "nqn.x:a"})
    with pytest.raises(StateError, match="in use by another process"):
        DesiredState(path)
    # a reader sees the live journal without disturbing the writer
    assert list(DesiredState(path, read_only=True).snapshot()["subsystems"]) == ["nqn.x:a"]
    first.record("nvmf_create_subsystem", {"nqn": "nqn.x:b"})
    first.close()
    assert load(path) == ["nqn.x:a", "nqn.x:b"]
