"""Replay tests/contract/data/crypto_v25.09.json (accel crypto keys and crypto
bdev answers recorded from a real spdk_tgt v25.09 built --with-crypto, by
record_crypto.py) against a fresh simulator, compared like the spdk-golden
replay (test_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

from csi_spdk.sim import SimServer

from .golden_replay import replay_transcript

DATA = Path(__file__).resolve().parent / "data" / "crypto_v25.09.json"


def test_recorded_crypto_transcript(tmp_path: Path) -> None:
    entries = json.loads(DATA.read_text())
    assert entries[0]["response"]["result"]["version"] == "SPDK v25.09"
    methods = {e["request"]["method"] for e in entries}
    assert {"accel_crypto_key_create", "bdev_crypto_create", "bdev_crypto_delete",
            "accel_crypto_key_destroy"} <= methods
    sock = str(tmp_path / "spdk.sock")
    server = SimServer(sock, tmp_path / "data").start()
    try:
        failures = replay_transcript(entries, sock)
    finally:
        server.stop()
    assert not failures, f"{len(failures)} entries differ\n" + "\n".join(failures)
