"""``csi-spdk doctor agent``: a real agent (mutual TLS on 127.0.0.1, over the
simulator or CSI_SPDK_TEST_RPC) passes every check; each thing that goes
wrong between the controller and an agent fails the check that names it,
with a fix: an expired or soon-expiring client certificate, a wrong CA, a
server certificate for another name, an agent that is down, spdk_tgt down
behind a running agent, a pool that is not loaded, a pool the agent refused."""

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
        "pools": "pass", "pool status": "pass"}
    assert checks["pool status"].detail == ("the agent has no pool file (its lvstores come "
                                            "from elsewhere)")
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
    assert len(report["checks"]) == 7
    assert all(c["name"].startswith("agent store-1: ") for c in report["checks"])
    write([lvs, "pool9"])
    code, report = doctor()
    assert code == 1 and report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]}["agent store-1: pools"] == "fail"


def test_the_command_needs_a_config_or_an_address():
    out = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "agent"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert "give either --config" in out.stdout


def _agent_with_pools(spdk_rpc: str, tmp: Path, pools: list[tuple[str, Path]]):
    """``csi-spdk agent`` as deployed (a process, attached to spdk_tgt) with a
    pool file; returns the process and its Unix address once it attached them."""
    import time

    import yaml
    (tmp / "pools.yaml").write_text(yaml.safe_dump({"pools": [
        {"name": n, "devices": [{"path": str(p)}], "cluster_size": "1MiB"}
        for n, p in pools]}))
    sock = tmp / "agent.sock"
    log = open(tmp / "agent.log", "w")       # noqa: SIM115 - closed by the caller's kill
    proc = subprocess.Popen([sys.executable, "-m", "csi_spdk", "agent", "--listen",
                             f"unix://{sock}", "--spdk-rpc", spdk_rpc, "--state-dir",
                             str(tmp / "state"), "--pools", str(tmp / "pools.yaml")],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "objects fixed" not in (tmp / "agent.log").read_text():   # first recovery done
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp / "agent.log").read_text()
        time.sleep(0.1)
    return proc, f"unix://{sock}"


def _blank(path: Path, size: int = 32 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def pool_rig(spdk_rpc, short_tmp):
    import uuid
    raw = SpdkApi(SpdkClient(spdk_rpc, timeout=30))
    procs: list[subprocess.Popen] = []
    yield raw, uuid.uuid4().hex[:6], procs
    for p in procs:
        p.terminate()
        p.wait(20)
    for lvs in raw.lvstores():
        if lvs["base_bdev"].startswith("dr") and lvs["base_bdev"].endswith("-dev"):
            raw.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs["name"]})
    for b in raw.call("bdev_get_bdevs"):
        if b["name"].startswith("dr") and b["name"].endswith("-dev"):
            raw.call("bdev_aio_delete", {"name": b["name"]})
    raw.client.close()


def test_pool_status_of_an_agent_whose_pools_are_ready(pool_rig, short_tmp):
    raw, tag, procs = pool_rig
    good = f"drgood{tag}"
    proc, address = _agent_with_pools(raw.client.address, short_tmp,
                                      [(good, _blank(short_tmp / "good.img"))])
    procs.append(proc)
    checks = by_name(agent_checks(AgentTarget("store-1", address, lvstores=[good])))
    assert checks["pool status"].status == "pass"
    assert checks["pool status"].detail == f"{good} created"
    assert checks["pools"].status == "pass"
    assert good in {s["name"] for s in raw.lvstores()}          # really there, in SPDK


def test_pool_status_names_the_pools_the_agent_refused(pool_rig, short_tmp):
    """A device with a filesystem and one holding another lvstore never become
    lvstores; SPDK knows nothing of why, the agent's report does, and the
    doctor line says what to do. The devices are left as they were."""
    import hashlib
    raw, tag, procs = pool_rig
    good, fs, other = f"drgood{tag}", f"drfs{tag}", f"drother{tag}"
    fs_img = _blank(short_tmp / "fs.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "precious", str(fs_img)], check=True)
    other_img = _blank(short_tmp / "other.img")
    raw.call("bdev_aio_create", {"name": f"{other}-dev", "filename": str(other_img),
                                 "block_size": 4096})
    raw.lvstore_create(f"{other}-dev", f"dr{tag}first", cluster_sz=MiB)
    raw.call("bdev_aio_delete", {"name": f"{other}-dev"})        # an lvstore named otherwise
    sums = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (fs_img, other_img)}
    proc, address = _agent_with_pools(raw.client.address, short_tmp, [
        (good, _blank(short_tmp / "good.img")), (fs, fs_img), (other, other_img)])
    procs.append(proc)
    checks = by_name(agent_checks(AgentTarget("store-1", address,
                                              lvstores=[good, fs, other])))
    status = checks["pool status"]
    assert status.status == "fail"
    assert f"pool {fs} refused: pool {fs}: {fs_img} is not empty (" in status.detail
    assert "TYPE=ext4" in status.detail
    assert f"pool {other} error: pool {other}: {other_img} holds lvstore 'dr{tag}first'" \
        in status.detail
    assert good not in status.detail                              # the ready one is fine
    assert "wipefs -a" in status.fix and "agent.nodePools" in status.fix
    assert checks["pools"].status == "fail"                       # SPDK's side of it
    lvstores = {s["name"] for s in raw.lvstores()}
    assert good in lvstores and fs not in lvstores and other not in lvstores
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sums} == sums
