"""Renewing the controller's client certificate needs no controller restart.

cert-manager renews a certificate in its Secret; the kubelet swaps the Secret
volume's ``..data`` symlink, so the CA, certificate and key files change in
place, together. The controller's ``AgentClient`` sees the new files and new
connections use them: proved here against a real ``csi-spdk agent`` process
(mutual TLS on 127.0.0.1) with an old certificate that expires a few seconds
into the test. The agent's audit line names the caller by its certificate's
CN, which tells which certificate each call used. A half-written renewal (a
new certificate beside the old key) is not used until it is whole.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from agent_fixtures import SERVER_NAME, Cert, start_agent
from agent_pki import Pki

from csi_spdk import contract
from csi_spdk.spdk import agent_client
from csi_spdk.spdk.agent_client import AgentClient, ClientTls
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.errors import SpdkTransportError

ROOT = Path(__file__).resolve().parents[2]


class SecretVolume:
    """A directory laid out as the kubelet projects a Secret: ``tls.crt`` ->
    ``..data/tls.crt``, ``..data`` -> a timestamped dir, swapped atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        for name in ("ca.crt", "tls.crt", "tls.key"):
            (root / name).symlink_to(Path("..data") / name)
        self.n = 0

    def publish(self, ca: Path, cert: Cert) -> None:
        self.n += 1
        gen = self.root / f"..gen{self.n}"
        gen.mkdir()
        shutil.copy(ca, gen / "ca.crt")
        shutil.copy(cert.cert, gen / "tls.crt")
        shutil.copy(cert.key, gen / "tls.key")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(gen.name)
        os.replace(tmp, self.root / "..data")

    def tls(self) -> ClientTls:
        return ClientTls(str(self.root / "ca.crt"), str(self.root / "tls.crt"),
                         str(self.root / "tls.key"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_and_remove(client: AgentClient) -> None:
    """One mutating call (audited at info with the caller's CN) and its undo."""
    api = SpdkApi(client)
    nqn = contract.NQN_PREFIX + str(uuidlib.uuid4())
    api.subsystem_create(nqn, "SN-renewal", contract.MODEL_NUMBER)
    api.subsystem_delete(nqn)


def callers(log_file: Path) -> list[str]:
    """The CN of every audited nvmf_create_subsystem, in order."""
    out = []
    for line in log_file.read_text().splitlines():
        with_json = line[line.find("{"):] if "{" in line else ""
        try:
            rec = json.loads(with_json)
        except ValueError:
            continue
        if rec.get("method") == "nvmf_create_subsystem" and rec.get("outcome") == "ok":
            out.append(rec["peer"])
    return out


@pytest.mark.timeout(180)
def test_renewed_client_certificate_is_used_without_a_restart(spdk_rpc, short_tmp,
                                                               monkeypatch):
    monkeypatch.setattr(agent_client, "TLS_RECHECK_INTERVAL", 0.2)
    pki = Pki(short_tmp / "pki")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)
    old = pki.client_cert("gen1", "controller-gen1", not_after=expires)
    new = pki.client_cert("gen2", "controller-gen2")
    secret = SecretVolume(short_tmp / "client-tls")
    secret.publish(pki.ca, old)

    port = free_port()
    log_file = short_tmp / "agent.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_spdk", "agent", "--listen", f"127.0.0.1:{port}",
             "--spdk-rpc", spdk_rpc, "--state-dir", str(short_tmp / "state"),
             "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
             "--tls-client-ca", str(pki.ca)],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)
    client = AgentClient(f"127.0.0.1:{port}", secret.tls(), SERVER_NAME, timeout=5,
                         name="store-1")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                export_and_remove(client)
                break
            except SpdkTransportError:
                assert proc.poll() is None, log_file.read_text()
                assert time.monotonic() < deadline, log_file.read_text()
                time.sleep(0.2)
        assert callers(log_file) == ["controller-gen1"]

        secret.publish(pki.ca, new)                 # cert-manager renewed it
        time.sleep(0.3)
        export_and_remove(client)
        assert callers(log_file) == ["controller-gen1", "controller-gen2"]

        # the old certificate has expired: a fresh client with it is refused
        # (the control), the long-lived one goes on with the renewed one
        time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds() + 1.0))
        with AgentClient(f"127.0.0.1:{port}", pki.client_tls(old), SERVER_NAME,
                         timeout=5) as expired_client, pytest.raises(SpdkTransportError):
            export_and_remove(expired_client)
        export_and_remove(client)
        assert callers(log_file) == ["controller-gen1", "controller-gen2", "controller-gen2"]
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_half_written_renewal_is_not_used_until_whole(spdk_rpc, short_tmp, monkeypatch,
                                                        caplog):
    """The certificate file replaced but the key still the old one (files
    written one by one, not through a Secret volume): the client keeps its
    working channel; once the key arrives, the renewed pair is used."""
    monkeypatch.setattr(agent_client, "TLS_RECHECK_INTERVAL", 0.0)
    pki = Pki(short_tmp / "pki")
    old = pki.client_cert("gen1", "controller-gen1")
    new = pki.client_cert("gen2", "controller-gen2")
    files = short_tmp / "files"
    files.mkdir()
    for src, name in ((pki.ca, "ca.crt"), (old.cert, "tls.crt"), (old.key, "tls.key")):
        shutil.copy(src, files / name)
    tls = ClientTls(str(files / "ca.crt"), str(files / "tls.crt"), str(files / "tls.key"))
    agent = start_agent(spdk_rpc, short_tmp / "state", "127.0.0.1:0", pki.server, pki.ca)
    caplog.set_level(logging.INFO, logger="csi_spdk.agent")
    try:
        with agent.client(tls, SERVER_NAME) as client:
            def peers() -> list[str]:
                return [r.f["peer"] for r in caplog.records
                        if getattr(r, "f", {}).get("method") == "nvmf_create_subsystem"]
            export_and_remove(client)
            shutil.copy(new.cert, files / "tls.crt")        # the key is not there yet
            export_and_remove(client)
            assert peers() == ["controller-gen1", "controller-gen1"]
            assert any("not usable yet" in r.getMessage() for r in caplog.records)
            shutil.copy(new.key, files / "tls.key")
            export_and_remove(client)
            assert peers() == ["controller-gen1", "controller-gen1", "controller-gen2"]
    finally:
        agent.stop()
