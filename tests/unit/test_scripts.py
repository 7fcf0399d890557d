"""The README's first command on a bare environment: ``env -i
PATH=/usr/bin:/bin bash scripts/dev.sh`` runs from the project venv, skips the
install when pyproject.toml is unchanged (the stamp), starts and answers, and
stops cleanly. Runs inside the venv scripts/test.sh made (CI); skipped when the
tests run from another interpreter, since dev.sh would then install into the
venv."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from csi_spdk.proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


def _stamped() -> bool:
    stamp = VENV / ".csi-spdk-installed"
    if sys.prefix == sys.base_prefix or not stamp.exists():
        return False
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    return stamp.read_text().startswith(f"{digest} {REPO} ")


pytestmark = pytest.mark.skipif(not _stamped(), reason="not running from this repository's "
                                "up-to-date project venv (scripts/test.sh makes it)")


def test_dev_sh_on_a_bare_environment(tmp_path):
    sock_dir = tmp_path / "s"
    log = tmp_path / "dev.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CSI_SPDK_VENV": str(VENV)}
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "scripts/dev.sh", "--socket-dir", str(sock_dir)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine
        while "csi-spdk dev is running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with grpc.insecure_channel(f"unix:{sock_dir}/controller.sock") as ch:
            info = csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(csi_pb2.GetPluginInfoRequest(),
                                                               timeout=10)
        assert info.name == "csi-spdk.io"
        assert "pip install" not in log.read_text(), "dev.sh reinstalled an unchanged project"
        assert "creating" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, log.read_text()
    assert sorted(p.name for p in sock_dir.iterdir()) == []
