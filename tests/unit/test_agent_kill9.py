"""kill -9 of spdk_tgt under ``csi-spdk agent`` with volumes published.

The whole path as deployed: the agent process supervises spdk_tgt
(``--spdk-tgt-cmd``) with a pool on an aio bdev over a regular file
(``--pools``), the controller creates and publishes volumes through the agent
(DH-HMAC-CHAP keys handed over with PutKey, QoS limits), then spdk_tgt gets
SIGKILL. The agent starts it again, SPDK's examine loads the lvstore from the
file (same uuid: loaded, not recreated), and the agent replays every export.
The state after the restart is read back through SPDK's own RPCs, on the
target's socket, not through the agent; the controller's view (health,
ControllerGetVolume, ListVolumes) converges to what it was, and a change made
after the restart survives a second kill.

spdk_tgt is the real binary when ``CSI_SPDK_TEST_SPDK_TGT`` names one (for
example ``/work/spdk-bin/spdk_tgt``; it is started ``--no-huge -s 1024 -u``
on its own socket and NVMe/TCP port), else the simulator in its own process
(which is killed the same way and keeps lvols only on its data dir, like a
real target keeps them on its device).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from controller_fixtures import MemorySecrets, block_cap, call, create_req, publish_req

from csi_spdk import contract
from csi_spdk.agent.supervisor import peer_pid, sim_command
from csi_spdk.childclock import ChildClock
from csi_spdk.controller import config as cfgmod
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.proto import csi_pb2
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkTransportError

MiB = 1 << 20
REAL_TGT = os.environ.get("CSI_SPDK_TEST_SPDK_TGT", "")
ROOT = Path(__file__).resolve().parents[2]
Mode = csi_pb2.VolumeCapability.AccessMode
QOS = {"maxIOPS": "2000", "maxMBps": "100"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tgt_command(sock: str, data_dir: str) -> list[str]:
    if REAL_TGT:
        return [REAL_TGT, "--no-huge", "-s", "1024", "-u", "-m", "0x1",
                "--disable-cpumask-locks", "-r", sock]
    return sim_command(sock, data_dir, "--log-level", "warning")


def ppid_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def spdk_view(api: SpdkApi) -> dict:
    """What the target holds, as SPDK reports it (the assertions' source)."""
    subs = {}
    for s in api.subsystems():
        if s["subtype"] != "NVMe":
            continue
        subs[s["nqn"]] = {
            "serial": s["serial_number"], "model": s["model_number"],
            "any": s["allow_any_host"],
            "ns": sorted((n["nsid"], n["bdev_name"], n["uuid"]) for n in s["namespaces"]),
            "listen": sorted((a["trtype"], a["traddr"], a["trsvcid"])
                             for a in s["listen_addresses"]),
            "hosts": sorted((h["nqn"], h.get("dhchap_key", ""), h.get("dhchap_ctrlr_key", ""))
                            for h in s["hosts"])}
    keys = {k["name"]: k.get("path") for k in api.call("keyring_get_keys")
            if not k.get("removed")}
    lvols = {lv["name"]: lv["uuid"] for lv in api.lvols()}
    qos = {}
    for name in lvols.values():
        limits = (api.bdev_get(name) or {}).get("assigned_rate_limits", {})
        qos[name] = {k: v for k, v in limits.items() if v}
    return {"subsystems": subs, "keys": keys, "lvols": lvols, "qos": qos,
            "transports": sorted(t["trtype"] for t in api.transports()),
            "lvstores": {s["name"]: s["uuid"] for s in api.lvstores()}}


class Agent:
    """``csi-spdk agent`` as a child process that supervises spdk_tgt."""

    def __init__(self, tmp: Path, crashpoint: str = "") -> None:
        """``crashpoint``: the agent SIGKILLs itself there (tests/unit/crashpoint.py).
        A second Agent on the same ``tmp`` reuses its pool file and state dir."""
        self.tmp = tmp
        self.spdk_sock = str(tmp / "spdk.sock")
        self.address = f"unix://{tmp}/agent.sock"
        pool = tmp / "pool.img"
        if not pool.exists():
            with open(pool, "wb") as f:
                f.truncate(256 * MiB)
        (tmp / "pools.yaml").write_text(
            f"pools:\n  - name: pool0\n    devices:\n      - path: {pool}\n"
            "    cluster_size: 1MiB\n    metadata_ratio: 100\n")
        self.log = open(tmp / "agent.log", "a")   # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        launcher = [sys.executable, "-m"]
        if crashpoint:
            env["CSI_SPDK_CRASHPOINT"] = crashpoint
            launcher = [sys.executable, str(ROOT / "tests" / "unit" / "crashpoint.py"), "-m"]
        cmd = [*launcher, "csi_spdk", "agent", "--listen", self.address,
               "--spdk-rpc", f"unix://{self.spdk_sock}", "--state-dir", str(tmp / "state"),
               "--pools", str(tmp / "pools.yaml"), "--spdk-poll-interval", "0.1",
               "--no-hugepage-check", "--spdk-tgt-log", str(tmp / "tgt.log"),
               "--spdk-tgt-cmd", shlex.join(tgt_command(self.spdk_sock, str(tmp / "data")))]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def clock(self) -> ChildClock:
        """The agent's own time (its spdk_tgt's and this test's too): the time
        a loaded machine keeps them waiting for a CPU is not counted."""
        return ChildClock(self.proc.pid, also=[os.getpid()])

    def wait_pool(self, raw: SpdkApi, timeout: float = 120.0) -> None:
        clock = self.clock()
        while clock.elapsed() < timeout:
            assert self.proc.poll() is None, self.logs()
            with contextlib.suppress(SpdkTransportError, OSError):
                if any(s["name"] == "pool0" for s in raw.lvstores()):
                    return
            time.sleep(0.1)
        raise AssertionError("the agent did not start spdk_tgt with pool0:\n" + self.logs())

    def logs(self) -> str:
        self.log.flush()
        return (self.tmp / "agent.log").read_text()[-4000:]

    def stop(self) -> None:
        tgt = peer_pid(f"unix://{self.spdk_sock}")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if tgt is not None:          # never leave our spdk_tgt behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(tgt, signal.SIGKILL)
        self.log.close()


def wait_view(raw: SpdkApi, want: dict, agent: Agent,
              timeout: float = 120.0) -> tuple[dict, float]:
    """Until SPDK holds ``want``, at most ``timeout`` s of the agent's own time;
    what it held last and the wall time it took."""
    t0 = time.monotonic()
    clock = agent.clock()
    got: dict = {}
    while clock.elapsed() < timeout:
        with contextlib.suppress(Exception):
            got = spdk_view(raw)
            if got == want:
                return got, time.monotonic() - t0
        time.sleep(0.05)
    return got, time.monotonic() - t0


def kill9_target(agent: Agent) -> int:
    pid = peer_pid(f"unix://{agent.spdk_sock}")
    assert pid is not None
    assert ppid_of(pid) == agent.proc.pid, "spdk_tgt is not the agent's child"
    os.kill(pid, signal.SIGKILL)
    return pid


def controller_view(servicer: ControllerServicer, ids: list[str]) -> dict:
    servicer.health.check()
    out = {}
    for vid in ids:
        got = call(servicer, "ControllerGetVolume",
                   csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
        out[vid] = (sorted(got.status.published_node_ids), got.status.volume_condition.abnormal,
                    got.volume.capacity_bytes)
    listed = call(servicer, "ListVolumes", csi_pb2.ListVolumesRequest())
    out["list"] = sorted((e.volume.volume_id, tuple(sorted(e.status.published_node_ids)))
                         for e in listed.entries)
    return out


def _controller(agent: Agent, tmp: Path, port: int) -> ControllerServicer:
    """The controller in-process, reaching target store-1 only through ``agent``
    (its NVMe/TCP listener on ``port``), with in-memory Secrets."""
    cfg = cfgmod.parse({"targets": [{"name": "store-1", "agent": {"address": agent.address},
                                     "nvmf": {"listenAddress": "127.0.0.1", "port": port},
                                     "lvstores": ["pool0"]}],
                        "auth": {"keyDir": str(tmp / "ckeys")}})
    return ControllerServicer(cfg, "csi-spdk.io", secret_store=MemorySecrets())


@pytest.mark.timeout(600)
def test_kill9_of_spdk_tgt_under_the_agent_restores_every_export(short_tmp: Path) -> None:
    agent = Agent(short_tmp)
    raw = SpdkApi(SpdkClient(agent.spdk_sock, timeout=30))
    port = free_port()
    servicer = _controller(agent, short_tmp, port)
    try:
        agent.wait_pool(raw)
        lvs_uuid = {s["name"]: s["uuid"] for s in raw.lvstores()}["pool0"]
        multi = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
        a = call(servicer, "CreateVolume", create_req("pvc-a", 16 * MiB, params=QOS)).volume
        b = call(servicer, "CreateVolume", create_req("pvc-b", 8 * MiB, caps=[multi])).volume
        call(servicer, "ControllerPublishVolume", publish_req(a.volume_id, "node-1"))
        for node in ("node-1", "node-2"):
            call(servicer, "ControllerPublishVolume",
                 publish_req(b.volume_id, node, cap=multi))
        ids = [a.volume_id, b.volume_id]
        before = spdk_view(raw)
        ctl_before = controller_view(servicer, ids)

        # what the export is, checked against what the controller asked for
        uuid_a, uuid_b = (v.split(":", 1)[1] for v in ids)
        sub_a = before["subsystems"][contract.subsystem_nqn(uuid_a)]
        sub_b = before["subsystems"][contract.subsystem_nqn(uuid_b)]
        assert [h[0] for h in sub_a["hosts"]] == [contract.host_nqn("node-1")]
        assert sorted(h[0] for h in sub_b["hosts"]) == sorted(
            contract.host_nqn(n) for n in ("node-1", "node-2"))
        assert all(h[1] and h[1] in before["keys"] for h in sub_a["hosts"] + sub_b["hosts"])
        assert sub_a["listen"] == [("TCP", "127.0.0.1", str(port))]
        assert [n[1] for n in sub_a["ns"]] == [uuid_a] and sub_a["any"] is False
        assert before["qos"][uuid_a] == {"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 100}
        assert before["qos"][uuid_b] == {}
        for path in before["keys"].values():
            assert Path(path).stat().st_mode & 0o777 == 0o600
        assert ctl_before[a.volume_id] == (["node-1"], False, 16 * MiB)
        assert ctl_before[b.volume_id] == (["node-1", "node-2"], False, 8 * MiB)

        # --- kill -9, recover ---------------------------------------------------------
        old = kill9_target(agent)
        after, took = wait_view(raw, before, agent)
        print(f"\nkill -9 of {'spdk_tgt' if REAL_TGT else 'the simulator'} -> every export "
              f"back, read through SPDK: {took:.3f}s")
        assert after == before, (after, before, agent.logs())
        new = peer_pid(f"unix://{agent.spdk_sock}")
        assert new not in (None, old) and ppid_of(new) == agent.proc.pid
        assert after["lvstores"]["pool0"] == lvs_uuid          # loaded, not recreated
        logs = agent.logs()
        assert f"pool pool0: loaded (lvstore {lvs_uuid} found on the device)" in logs, logs
        # transport, 4 keys, and per volume subsystem, namespace, listener; 3 hosts; 1 QoS
        assert (f"spdk_tgt restarted after it exited (-9) (pid {new}): 1/1 pools ready, "
                "15 objects fixed, 0 failed") in logs, logs
        # the controller sees what it saw before the kill
        assert controller_view(servicer, ids) == ctl_before

        # --- a change after the restart is what the next restart replays -------------
        call(servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=b.volume_id, node_id="node-2"))
        changed = spdk_view(raw)
        assert [h[0] for h in changed["subsystems"][contract.subsystem_nqn(uuid_b)]["hosts"]] \
            == [contract.host_nqn("node-1")]
        kill9_target(agent)
        again, took = wait_view(raw, changed, agent)
        print(f"second kill -9 -> back: {took:.3f}s")
        assert again == changed, (again, changed, agent.logs())
        view = controller_view(servicer, ids)
        assert view[b.volume_id] == (["node-1"], False, 8 * MiB)
        assert view[a.volume_id] == ctl_before[a.volume_id]
        # and the controller can still change things through the agent
        for vid in ids:
            call(servicer, "ControllerUnpublishVolume",
                 csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-1"))
            call(servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vid))
        final = spdk_view(raw)
        assert final["subsystems"] == {} and final["lvols"] == {} and final["keys"] == {}
    finally:
        servicer.close()
        raw.client.close()
        agent.stop()


@pytest.mark.timeout(600)
def test_qos_changed_online_is_what_a_kill9_restores(short_tmp: Path) -> None:
    """ControllerModifyVolume's changes, not the creation-time limits, come
    back after spdk_tgt is killed: a raised IOPS limit with the bandwidth
    limit removed, a limit added to an unlimited volume, and (second kill) a
    volume made unlimited again stays unlimited. Read from SPDK's
    bdev_get_bdevs on the target's own socket, and from ControllerGetVolume."""
    agent = Agent(short_tmp)
    raw = SpdkApi(SpdkClient(agent.spdk_sock, timeout=30))
    servicer = _controller(agent, short_tmp, free_port())

    def modify(vid: str, **params: str) -> None:
        call(servicer, "ControllerModifyVolume", csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters=params))

    def reported(vid: str) -> dict:
        ctx = call(servicer, "ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(
            volume_id=vid)).volume.volume_context
        return {k: ctx[k] for k in ("maxIOPS", "maxMBps", "maxReadMBps", "maxWriteMBps")
                if k in ctx}

    try:
        agent.wait_pool(raw)
        a = call(servicer, "CreateVolume", create_req("pvc-a", 8 * MiB, params=QOS)).volume
        b = call(servicer, "CreateVolume", create_req("pvc-b", 8 * MiB)).volume
        ua, ub = (v.volume_id.split(":", 1)[1] for v in (a, b))
        modify(a.volume_id, maxIOPS="5000", maxMBps="0")
        modify(b.volume_id, maxReadMBps="20")
        changed = spdk_view(raw)
        assert changed["qos"][ua] == {"rw_ios_per_sec": 5000}
        assert changed["qos"][ub] == {"r_mbytes_per_sec": 20}
        ctl = {v: reported(v) for v in (a.volume_id, b.volume_id)}
        assert ctl == {a.volume_id: {"maxIOPS": "5000"}, b.volume_id: {"maxReadMBps": "20"}}
        kill9_target(agent)
        after, took = wait_view(raw, changed, agent)
        print(f"\nkill -9 -> the online QoS changes back: {took:.3f}s")
        assert after == changed, (after, changed, agent.logs())
        assert {v: reported(v) for v in (a.volume_id, b.volume_id)} == ctl
        modify(a.volume_id, maxIOPS="0")            # unlimited again
        unlimited = spdk_view(raw)
        assert unlimited["qos"][ua] == {} and unlimited["qos"][ub] == {"r_mbytes_per_sec": 20}
        kill9_target(agent)
        again, _ = wait_view(raw, unlimited, agent)
        assert again == unlimited, (again, unlimited, agent.logs())
        for vid in (a.volume_id, b.volume_id):
            call(servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vid))
        assert spdk_view(raw)["lvols"] == {}
    finally:
        servicer.close()
        raw.client.close()
        agent.stop()


def retry_unavailable(fn, timeout: float = 90.0):
    """What the CSI sidecars do with an UNAVAILABLE answer: try again."""
    import grpc
    from controller_fixtures import RpcFailure
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except RpcFailure as err:
            if err.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point", ["append-torn", "compact-snapshot", "compact-journal"])
def test_kill9_of_the_agent_mid_journal_write_loses_nothing_acknowledged(
        short_tmp: Path, point: str) -> None:
    """The agent itself is SIGKILLed while it writes the record of a publish:
    half-way through the journal append (the record is torn), or during the
    compaction that follows a durable append (after the new snapshot's temp
    file, or after its rename). spdk_tgt is then killed too, so everything
    must come back from the agent's disk: a new agent on the same state dir
    starts spdk_tgt and replays. Every acknowledged export is there as SPDK
    held it; the publish in flight is there exactly when its record was
    durable (compaction) and absent when it was torn; the controller's retry
    then converges."""
    host3 = contract.host_nqn("node-3")
    agent = Agent(short_tmp, crashpoint=f"{point}@{host3}")
    raw = SpdkApi(SpdkClient(agent.spdk_sock, timeout=30))
    servicer = _controller(agent, short_tmp, free_port())
    agents = [agent]
    try:
        agent.wait_pool(raw)
        multi = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
        a = call(servicer, "CreateVolume", create_req("pvc-a", 16 * MiB, params=QOS)).volume
        b = call(servicer, "CreateVolume", create_req("pvc-b", 8 * MiB, caps=[multi])).volume
        call(servicer, "ControllerPublishVolume", publish_req(a.volume_id, "node-1"))
        for node in ("node-1", "node-2"):
            call(servicer, "ControllerPublishVolume", publish_req(b.volume_id, node, cap=multi))
        acked = spdk_view(raw)
        from controller_fixtures import RpcFailure
        with pytest.raises(RpcFailure):             # the agent dies writing its record
            call(servicer, "ControllerPublishVolume", publish_req(b.volume_id, "node-3",
                                                                  cap=multi))
        assert agent.proc.wait(30) == -signal.SIGKILL, agent.logs()
        applied = spdk_view(raw)                    # what SPDK did before the kill
        nqn_b = contract.subsystem_nqn(b.volume_id.split(":", 1)[1])
        assert host3 in [h[0] for h in applied["subsystems"][nqn_b]["hosts"]]
        tgt = peer_pid(f"unix://{agent.spdk_sock}")
        assert tgt is not None
        os.kill(tgt, signal.SIGKILL)                # and spdk_tgt with it: all from disk
        agent.stop()

        agent = Agent(short_tmp)
        agents.append(agent)
        agent.wait_pool(raw)
        want = acked if point == "append-torn" else applied
        if point == "append-torn":
            # the key PutKey stored for node-3 was acknowledged: it is kept
            want = {**acked, "keys": applied["keys"]}
        after, took = wait_view(raw, want, agent)
        print(f"\nagent kill -9 at {point}, spdk_tgt kill -9, new agent -> {took:.3f}s")
        assert after == want, (after, want, agent.logs())
        assert "dropped a torn last journal record" in agent.logs() or point != "append-torn"

        # the controller's retry converges; and it is recorded for the next restart
        retry_unavailable(lambda: call(servicer, "ControllerPublishVolume", publish_req(
            b.volume_id, "node-3", cap=multi)))
        final = spdk_view(raw)
        assert sorted(h[0] for h in final["subsystems"][nqn_b]["hosts"]) == sorted(
            contract.host_nqn(n) for n in ("node-1", "node-2", "node-3"))
        kill9_target(agent)
        again, _ = wait_view(raw, final, agent)
        assert again == final, (again, final, agent.logs())
    finally:
        servicer.close()
        raw.client.close()
        for ag in agents:
            ag.stop()
