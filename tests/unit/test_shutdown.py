"""A process that will not end is reported, not waited on: SIGUSR1 prints
every thread's stack and leaves the process running, SIGTERM ends it, and a
thread stuck after SIGTERM ends the process after ``bounded_shutdown``'s
deadline with that thread's stack on stderr. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_node_dumps_threads_on_usr1_and_exits_on_term(tmp_path):
    sock = tmp_path / "node.sock"
    err = tmp_path / "stderr"
    with err.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_spdk", "node", "--endpoint", f"unix://{sock}",
             "--node-id", "shutdown-test", "--state-dir", str(tmp_path / "state")],
            stdout=subprocess.DEVNULL, stderr=fh, env=ENV)
    try:
        wait_for(sock.exists)
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "wait_for_signal" in err.read_text())
        assert proc.poll() is None, "SIGUSR1 ended the process"
        dump = err.read_text()
        assert "Thread 0x" in dump and 'csi_spdk/server.py' in dump, dump
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


STUCK = """
import threading, time
from csi_spdk.server import bounded_shutdown

def stuck_in_a_call():
    time.sleep(3600)

threading.Thread(target=stuck_in_a_call).start()   # not a daemon: exit waits on it
bounded_shutdown(2.0)
"""


def test_a_stuck_thread_ends_the_process_with_its_stack():
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True,
                         timeout=60, env=ENV)
    took = time.monotonic() - start
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "stuck_in_a_call" in res.stderr, res.stderr
    assert took < 30, took
