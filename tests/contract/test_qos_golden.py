"""Replay tests/contract/data/qos_v25.09.json (bdev_set_qos_limit answers recorded
from a real spdk_tgt v25.09 by record_qos.py) against a fresh simulator, with
the same comparison as the spdk-golden replay (test_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

from csi_spdk.sim import SimServer

from .golden_replay import replay_transcript

DATA = Path(__file__).resolve().parent / "data" / "qos_v25.09.json"


def test_recorded_qos_transcript(tmp_path: Path) -> None:
    entries = json.loads(DATA.read_text())
    assert entries[0]["response"]["result"]["version"] == "SPDK v25.09"
    sock = str(tmp_path / "spdk.sock")
    server = SimServer(sock, tmp_path / "data").start()
    try:
        failures = replay_transcript(entries, sock)
    finally:
        server.stop()
    assert not failures, f"{len(failures)} entries differ\n" + "\n".join(failures)
