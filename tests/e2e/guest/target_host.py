"""Host side of the guest drivers that use ``target_driver.py``: one run of a
driver against the simulator in the guest, or, with ``CSI_SPDK_TEST_RPC``,
against that real spdk_tgt on the host.

For a real target this module picks free loopback ports for its listeners
(another test or helper may share the machine), a unique name tag, and
writes the run's keys as 0600 files in a 0700 directory of the host, where
spdk_tgt's ``keyring_file_add_key`` reads them (it refuses looser modes);
the directory is removed after the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import GuestOptions

HERE = Path(__file__).resolve().parent
# what a guest needs to import target_driver (for tests not using TargetRun)
DRIVER_FILES: dict[str, str | Path] = {"/root/target_driver.py": HERE / "target_driver.py"}

# The guest part: start the simulator (unless the host's target is used), the
# script body, stop it; the body's exit code wins, a failing stop fails too.
SCRIPT = """
. /etc/guest/lib.sh
{setup}
target_start {sim_args}
rc=0
{body} || rc=$?
target_stop || rc=1
{teardown}
exit $rc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TargetRun:
    """What one guest run needs to reach its target."""

    def __init__(self, host_rpc: str | None, keys: dict[str, str] | None = None) -> None:
        self.host_rpc = host_rpc
        self.keys = keys or {}
        self.key_dir: Path | None = None
        self.env: dict[str, str] = {"TARGET_TAG": "g" + secrets.token_hex(3)}
        if host_rpc:
            self.env["TARGET_PORT"] = str(free_port())
            self.env["TARGET_TLS_PORT"] = str(free_port())
            if self.keys:
                self.key_dir = Path(tempfile.mkdtemp(prefix="csi-guest-keys-"))
                os.chmod(self.key_dir, 0o700)
                for label, material in self.keys.items():
                    fd = os.open(self.key_dir / label, os.O_WRONLY | os.O_CREAT, 0o600)
                    os.write(fd, material.encode())
                    os.close(fd)
                self.env["TARGET_KEY_DIR"] = str(self.key_dir)

    @property
    def real(self) -> bool:
        return bool(self.host_rpc)

    def files(self, driver: str) -> dict[str, str | Path]:
        out: dict[str, str | Path] = {"/root/driver.py": driver, **DRIVER_FILES}
        if self.keys:
            out["/root/keys.json"] = json.dumps(self.keys)
        return out

    def options(self, **kw) -> GuestOptions:
        return GuestOptions(host_rpc=self.host_rpc, **kw)

    def script(self, body: str = "python3 /root/driver.py", *, setup: str = "",
               teardown: str = "", sim_args: str = "") -> str:
        return SCRIPT.format(setup=setup, body=body, teardown=teardown, sim_args=sim_args)

    def run(self, guest, *, timeout: int = 300, **script_kw):
        """Boot the guest and run the driver (``guest``: the conftest fixture)."""
        driver = script_kw.pop("driver")
        return guest.run(self.script(**script_kw), timeout=timeout, env=self.env,
                         files=self.files(driver), options=self.options())

    def close(self) -> None:
        if self.key_dir is not None:
            shutil.rmtree(self.key_dir, ignore_errors=True)
            self.key_dir = None

    def __enter__(self) -> TargetRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def serving(cmd: list[str], sock: Path, log: Path, what: str, env=None):
    """Run ``cmd`` (output to ``log``) until ``sock`` appears; stop it after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def host_agent(host_rpc: str):
    """``csi-spdk agent`` on the host beside the real target (as in a
    deployment: it writes the key files spdk_tgt reads); yields (its Unix
    socket, its log file, its key directory)."""
    work = Path(tempfile.mkdtemp(prefix="csi-guest-agent-"))
    sock, log = work / "agent.sock", work / "agent.log"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[2])}
    try:
        with serving(["nice", "-n", "15", sys.executable, "-m", "csi_spdk", "agent",
                      "--listen", f"unix://{sock}", "--spdk-rpc", host_rpc,
                      "--state-dir", str(work / "state")], sock, log, "the agent", env):
            yield str(sock), log, work / "state" / "keys"
    finally:
        shutil.rmtree(work, ignore_errors=True)
