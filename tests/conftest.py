"""Shared fixtures.

``spdk_rpc`` is the SPDK JSON-RPC address every SPDK-backed test uses: a
fresh simulator per test, or the real ``spdk_tgt`` named by the environment
variable ``CSI_SPDK_TEST_RPC`` (then tests must use unique names and clean up
after themselves, since the target is shared).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REAL_SPDK = os.environ.get("CSI_SPDK_TEST_RPC", "")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spdk_rpc(short_tmp: Path) -> Iterator[str]:
    if REAL_SPDK:
        yield REAL_SPDK
        return
    from csi_spdk.sim.server import SimServer

    sim = SimServer(str(short_tmp / "spdk.sock"), str(short_tmp / "sim-data"))
    sim.start()
    try:
        yield str(short_tmp / "spdk.sock")
    finally:
        sim.stop()
