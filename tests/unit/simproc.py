"""A simulator in its own process, so tests can SIGKILL it like spdk_tgt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkTransportError

REPO = Path(__file__).resolve().parents[2]


def sim_command(sock: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "csi_spdk", "sim", "--rpc-socket", str(sock),
            "--data-dir", str(data_dir), "--log-level", "warning"]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def wait_ready(sock: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with SpdkClient(str(sock), timeout=2) as c:
                c.call("spdk_get_version")
                return
        except (SpdkTransportError, OSError):
            time.sleep(0.05)
    raise TimeoutError(f"simulator on {sock} did not answer within {timeout}s")


class SimProcess:
    """``csi-spdk sim`` as a child process: start, SIGKILL, restart."""

    def __init__(self, sock: Path, data_dir: Path) -> None:
        self.sock, self.data_dir = sock, data_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> SimProcess:
        self.proc = subprocess.Popen(sim_command(self.sock, self.data_dir), env=env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.sock)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=15) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def client(self) -> SpdkClient:
        return SpdkClient(str(self.sock), timeout=30)
