"""`csi-spdk registrar` and `csi-spdk livenessprobe` as processes against a
real driver (`csi-spdk dev`), the test playing kubelet's plugin watcher:
GetInfo over the registration socket names the driver and the endpoint
kubelet was told, a refused registration ends the registrar with exit 1 and
removes its socket, /healthz follows the driver's Probe (500 once the driver
is gone)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from devproc import start_dev

from csi_spdk.proto import pluginregistration_pb2 as pr
from csi_spdk.proto import pluginregistration_pb2_grpc as pr_grpc

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{args[0]}-{time.monotonic_ns()}.log"
    out = open(log, "w")  # noqa: SIM115 (the process keeps it)
    return subprocess.Popen([sys.executable, "-m", "csi_spdk", *args], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)}), log


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _until(check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except (OSError, grpc.RpcError):
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_registrar_registers_with_kubelet_and_exits_when_refused(tmp_path):
    dev = start_dev(tmp_path)
    reg_dir = tmp_path / "plugins_registry"
    reg_dir.mkdir()
    port = _port()
    try:
        proc, log = _spawn(tmp_path, "registrar", f"--csi-address={dev.sock_dir}/controller.sock",
                           "--kubelet-registration-path=/var/lib/kubelet/plugins/x/csi.sock",
                           f"--plugin-registration-path={reg_dir}",
                           f"--http-endpoint=127.0.0.1:{port}", "--v=2")
        sock = reg_dir / "csi-spdk.io-reg.sock"
        _until(sock.exists)
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pr_grpc.RegistrationStub(ch)
            info = _until(lambda: stub.GetInfo(pr.InfoRequest(), timeout=5))
            assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
                "CSIPlugin", "csi-spdk.io", "/var/lib/kubelet/plugins/x/csi.sock", ["1.0.0"])
            stub.NotifyRegistrationStatus(pr.RegistrationStatus(plugin_registered=True),
                                          timeout=5)
            assert _until(lambda: _healthz(port)) == 200
            stub.NotifyRegistrationStatus(
                pr.RegistrationStatus(plugin_registered=False, error="version mismatch"),
                timeout=5)
        assert proc.wait(30) == 1, log.read_text()
        assert not sock.exists()
        assert "version mismatch" in log.read_text()
    finally:
        dev.stop()


def test_livenessprobe_follows_the_drivers_probe(tmp_path):
    dev = start_dev(tmp_path)
    port = _port()
    proc, log = _spawn(tmp_path, "livenessprobe", f"--csi-address={dev.sock_dir}/node.sock",
                       f"--http-endpoint=127.0.0.1:{port}", "--probe-timeout=3s")
    try:
        assert _until(lambda: _healthz(port)) == 200
        dev.stop()
        assert _until(lambda: _healthz(port) == 500) is True
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_registrar_is_healthy_while_waiting_for_the_driver_and_not_once_its_socket_is_gone(
        tmp_path):
    """Started before the driver (a starved node starts the Pod's containers
    minutes apart): /healthz answers 200 while the registrar waits, so the
    liveness probe does not kill it; once the driver answers it serves the
    registration socket, and a lost socket makes /healthz 500."""
    reg_dir = tmp_path / "plugins_registry"
    reg_dir.mkdir()
    sock_dir = tmp_path / "s"
    port = _port()
    proc, log = _spawn(tmp_path, "registrar", f"--csi-address={sock_dir}/controller.sock",
                       "--kubelet-registration-path=/var/lib/kubelet/plugins/x/csi.sock",
                       f"--plugin-registration-path={reg_dir}",
                       f"--http-endpoint=127.0.0.1:{port}", "--v=2")
    dev = None
    try:
        assert _until(lambda: _healthz(port)) == 200
        sock = reg_dir / "csi-spdk.io-reg.sock"
        assert not sock.exists()
        assert "waiting for the CSI driver" in _until(
            lambda: "waiting for the CSI driver" in log.read_text() and log.read_text())
        dev = start_dev(tmp_path, sock_dir=sock_dir)
        _until(sock.exists)
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            info = _until(lambda: pr_grpc.RegistrationStub(ch).GetInfo(pr.InfoRequest(),
                                                                       timeout=5))
        assert info.name == "csi-spdk.io"
        assert _healthz(port) == 200
        sock.unlink()
        assert _healthz(port) == 500
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
        if dev is not None:
            dev.stop()
