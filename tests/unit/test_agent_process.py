"""`csi-spdk agent` as the process the chart and dev run: it serves, records
exports in its storage side's desired state, stops cleanly on SIGTERM (socket
removed), and refuses plaintext TCP at start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from csi_spdk import contract
from csi_spdk.agent.state import DesiredState
from csi_spdk.spdk.agent_client import AgentClient
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.errors import SpdkTransportError

ROOT = Path(__file__).resolve().parents[2]


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "csi_spdk", "agent", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_agent_process_serves_and_stops_cleanly(spdk_rpc, short_tmp):
    sock = short_tmp / "agent.sock"
    proc = subprocess.Popen(agent_cmd("--listen", f"unix://{sock}", "--spdk-rpc", spdk_rpc,
                                      "--state-dir", str(short_tmp / "state")),
                            env=env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        with AgentClient(f"unix://{sock}", timeout=2) as client:
            while True:
                try:
                    assert SpdkApi(client).version()["version"].startswith("SPDK")
                    break
                except SpdkTransportError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
        assert oct((short_tmp / "state" / "keys").stat().st_mode & 0o777) == "0o700"
        # the storage side is the server's state store: an export is recorded
        nqn = contract.NQN_PREFIX + str(uuidlib.uuid4())
        with AgentClient(f"unix://{sock}", timeout=10) as client:
            api = SpdkApi(client)
            api.subsystem_create(nqn, "SN-agent-process", contract.MODEL_NUMBER)
            try:
                desired = DesiredState(short_tmp / "state" / "desired.json",
                                       read_only=True).snapshot()   # the live journal
                assert nqn in desired["subsystems"]
            finally:
                api.subsystem_delete(nqn)
        desired = DesiredState(short_tmp / "state" / "desired.json", read_only=True).snapshot()
        assert nqn not in desired["subsystems"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("extra,fragment", [
    ((), "mutual TLS"),
    (("--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key",
      "--tls-client-ca", "/nonexistent/ca.crt"), "/nonexistent/"),
])
def test_agent_refuses_to_start_without_usable_tls(short_tmp, extra, fragment):
    out = subprocess.run(agent_cmd("--listen", "127.0.0.1:0", "--spdk-rpc",
                                   str(short_tmp / "spdk.sock"),
                                   "--state-dir", str(short_tmp / "state"), *extra),
                         env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert fragment in out.stderr
