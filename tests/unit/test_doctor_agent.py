"""``csi-spdk doctor agent``: a real agent (mutual TLS on 127.0.0.1, over the
simulator or CSI_SPDK_TEST_RPC) passes every check; each thing that goes
wrong between the controller and an agent fails the check that names it,
with a fix: an expired or soon-expiring client certificate, a wrong CA, a
server certificate for another name, an agent that is down, spdk_tgt down
behind a running agent, a pool that is not loaded."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from agent_fixtures import SERVER_NAME, start_agent
from agent_pki import Pki

from csi_spdk.doctor.agent_checks import AgentTarget, agent_checks
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture
def stack(spdk_rpc, short_tmp):
    """An agent with TLS over SPDK holding a fresh lvstore; the PKI."""
    import uuid
    pki = Pki(short_tmp / "pki")
    raw = SpdkApi(SpdkClient(spdk_rpc, timeout=30))
    suffix = uuid.uuid4().hex[:8]
    malloc, lvs = f"doctor{suffix}", f"doctorlvs{suffix}"
    raw.malloc_create(malloc, 32 * MiB)
    raw.lvstore_create(malloc, lvs, cluster_sz=MiB)
    agent = start_agent(spdk_rpc, short_tmp / "state", "127.0.0.1:0", pki.server, pki.ca)
    try:
        yield pki, agent, lvs
    finally:
        agent.stop()
        raw.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
        raw.call("bdev_malloc_delete", {"name": malloc})
        raw.client.close()


def target(pki: Pki, address: str, cert=None, ca=None, server_name=SERVER_NAME,
           lvstores=()) -> AgentTarget:
    cert = cert or pki.client
    return AgentTarget("store-1", address, str(ca or pki.ca), str(cert.cert), str(cert.key),
                       server_name, list(lvstores))


def by_name(checks) -> dict:
    return {c.name.removeprefix("agent store-1: "): c for c in checks}


def test_a_healthy_agent_passes_every_check(stack):
    pki, agent, lvs = stack
    checks = by_name(agent_checks(target(pki, agent.address, lvstores=[lvs])))
    assert {n: c.status for n, c in checks.items()} == {
        "client certificate": "pass", f"reachable at {agent.address}": "pass",
        f"TLS handshake as {SERVER_NAME}": "pass", "service": "pass", "spdk_tgt": "pass",
        "pools": "pass"}
    assert checks["spdk_tgt"].detail.startswith("SPDK v")
    with SpdkClient(agent.args.spdk_rpc) as c:
        [store] = [s for s in SpdkApi(c).lvstores() if s["name"] == lvs]
    total = store["total_data_clusters"] * store["cluster_size"] // MiB
    assert 0 < total < 32
    assert checks["pools"].detail == f"{lvs} {total} MiB free of {total} MiB"
    assert "valid until" in checks["client certificate"].detail


def test_expired_client_certificate(stack):
    pki, agent, _ = stack
    [c] = agent_checks(target(pki, agent.address, cert=pki.expired_client))
    assert c.name == "agent store-1: client certificate" and c.status == "fail"
    assert "expired at" in c.detail and "renew" in c.fix


def test_client_certificate_expiring_soon_warns(stack):
    pki, agent, _ = stack
    soon = pki.client_cert("soon", "csi-spdk-controller",
                           not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    checks = by_name(agent_checks(target(pki, agent.address, cert=soon)))
    assert checks["client certificate"].status == "warn"
    assert "expires in 2 days" in checks["client certificate"].detail
    assert checks["service"].status == "pass"           # it still works today


def test_wrong_ca(stack):
    """The controller's caFile is another CA: the agent's certificate does not
    verify; and a client certificate from another CA is caught locally."""
    pki, agent, _ = stack
    # caFile = the other CA, client cert from the other CA: consistent files, wrong CA
    checks = by_name(agent_checks(target(pki, agent.address, cert=pki.other_client,
                                         ca=pki.other_ca)))
    hs = checks[f"TLS handshake as {SERVER_NAME}"]
    assert hs.status == "fail" and "does not verify against" in hs.detail
    assert "caFile must be the CA that signed the agent's certificate" in hs.fix
    assert "service" not in checks                       # stopped at the cause
    # our CA file, but a client certificate another CA issued
    [c] = agent_checks(target(pki, agent.address, cert=pki.other_client))
    assert c.status == "fail" and "is not in" in c.detail


def test_server_certificate_for_another_name(stack):
    pki, agent, _ = stack
    checks = by_name(agent_checks(target(pki, agent.address, server_name="storage-9.test")))
    hs = checks["TLS handshake as storage-9.test"]
    assert hs.status == "fail"
    assert hs.detail == f"the agent's certificate names {SERVER_NAME}, 127.0.0.1, not " \
                        "storage-9.test"
    assert "serverName" in hs.fix


def test_expired_server_certificate(spdk_rpc, short_tmp):
    pki = Pki(short_tmp / "pki")
    agent = start_agent(spdk_rpc, short_tmp / "state", "127.0.0.1:0", pki.expired_server,
                        pki.ca)
    try:
        checks = by_name(agent_checks(target(pki, agent.address)))
        hs = checks[f"TLS handshake as {SERVER_NAME}"]
        assert hs.status == "fail" and "the agent's certificate expired at" in hs.detail
    finally:
        agent.stop()


def test_agent_down(short_tmp):
    pki = Pki(short_tmp / "pki")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # nothing listens on it once closed
    checks = agent_checks(target(pki, f"127.0.0.1:{port}"))
    assert [c.status for c in checks] == ["pass", "fail"]
    assert checks[1].name == f"agent store-1: reachable at 127.0.0.1:{port}"
    assert "refused" in checks[1].detail and "is the agent running" in checks[1].fix


def test_spdk_tgt_down_behind_a_running_agent(short_tmp):
    pki = Pki(short_tmp / "pki")
    agent = start_agent(str(short_tmp / "no-spdk.sock"), short_tmp / "state", "127.0.0.1:0",
                        pki.server, pki.ca)
    try:
        checks = by_name(agent_checks(target(pki, agent.address), timeout=3))
        assert checks["service"].status == "pass"
        assert checks["spdk_tgt"].status == "fail"
        assert "no-spdk.sock" in checks["spdk_tgt"].detail
        assert "is it running" in checks["spdk_tgt"].fix
        assert "pools" not in checks
    finally:
        agent.stop()


def test_missing_pool(stack):
    pki, agent, lvs = stack
    checks = by_name(agent_checks(target(pki, agent.address, lvstores=[lvs, "pool9"])))
    assert checks["pools"].status == "fail"
    assert checks["pools"].detail.startswith("lvstore(s) pool9 not loaded")
    assert lvs in checks["pools"].detail and "--pools" in checks["pools"].fix


def test_the_command_with_the_controllers_config(stack, short_tmp):
    """What an operator runs in the controller Pod: every agent of the config,
    JSON out, exit code 1 once something fails."""
    pki, agent, lvs = stack
    config = short_tmp / "config.yaml"

    def write(lvstores: list[str]) -> None:
        config.write_text(json.dumps({"targets": [
            {"name": "store-1", "agent": {"address": agent.address, "serverName": SERVER_NAME,
                                          "tls": {"caFile": str(pki.ca),
                                                  "certFile": str(pki.client.cert),
                                                  "keyFile": str(pki.client.key)}},
             "nvmf": {"listenAddress": "127.0.0.1"}, "lvstores": lvstores},
            {"name": "local", "rpc": "unix:///var/tmp/spdk.sock",
             "nvmf": {"listenAddress": "127.0.0.1"}}]}))

    def doctor() -> tuple[int, dict]:
        out = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "agent", "--config",
                              str(config), "--format", "json"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        return out.returncode, json.loads(out.stdout)

    write([lvs])
    code, report = doctor()
    assert code == 0 and report["ok"] is True, report
    assert len(report["checks"]) == 6
    assert all(c["name"].startswith("agent store-1: ") for c in report["checks"])
    write([lvs, "pool9"])
    code, report = doctor()
    assert code == 1 and report["ok"] is False
    assert [c["status"] for c in report["checks"]][-1] == "fail"


def test_the_command_needs_a_config_or_an_address():
    out = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "agent"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert "give either --config" in out.stdout
