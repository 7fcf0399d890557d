"""The agent's Session stream (agent/session.py, spdk/agent_session.py): many
requests on one stream, each failing on its own, the stream failing as a whole
only when it breaks, and the client opening a new one after that."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

import grpc
import pytest

from csi_spdk import contract, metrics
from csi_spdk.errors import CsiError
from csi_spdk.proto import agent_pb2
from csi_spdk.spdk.agent_client import AgentClient
from csi_spdk.spdk.agent_session import Session, SessionError
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import CRASH_ENV, CRASH_MARKER_ENV, SpdkClient
from csi_spdk.spdk.errors import SpdkTransportError

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def refused_total() -> float:
    return sum(s.value for m in metrics.AGENT_REFUSED.collect()
               for s in m.samples if s.name == "csi_spdk_agent_refused_total")


def test_a_refused_call_on_the_stream_leaves_the_other_calls_on_it_alone(agent_env):
    env = agent_env
    probe = env.api.lvol_create(env.lvs, contract.volume_lvol_name("session-probe"), MiB, True)
    session = env.client._session
    assert session is not None and session.alive
    before = refused_total()
    reads, refusals, errors = [], [], []

    def worker(n: int) -> None:
        for i in range(20):
            try:
                if (n + i) % 2:
                    reads.append(env.api.bdev_get(probe)["uuid"])
                else:
                    try:        # outside the allow list: PERMISSION_DENIED, nothing done
                        env.client.call("bdev_malloc_delete", {"name": env.malloc})
                    except CsiError as err:
                        refusals.append(err.code)
            except Exception as err:  # noqa: BLE001 - collected, asserted below
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert reads == [probe] * 80                       # every read answered, correctly
    assert refusals == [grpc.StatusCode.PERMISSION_DENIED] * 80
    assert refused_total() - before == 80              # each refusal counted
    assert env.client._session is session and session.alive   # one stream throughout
    assert env.raw.bdev_get(env.malloc) is not None    # the refused delete did nothing


def test_an_unknown_request_is_invalid_argument_and_the_stream_carries_on(agent_env):
    channel = grpc.insecure_channel(agent_env.agent.address)
    session = Session(channel)
    try:
        with pytest.raises(SessionError) as err:
            session.request(10, intent=agent_pb2.NamedIntent(name="format_disk"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "format_disk" in err.value.details()
        with pytest.raises(SessionError) as err:
            session.request(10)                        # no kind at all
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reply = session.request(10, call=agent_pb2.CallRequest(method="spdk_get_version"))
        assert "SPDK" in reply.result_json and session.alive
    finally:
        session.close()
        channel.close()
    with pytest.raises(SessionError) as err:           # closed: nothing more is sent
        session.request(10, call=agent_pb2.CallRequest(method="spdk_get_version"))
    assert err.value.code() == grpc.StatusCode.CANCELLED and not err.value.sent


def _agent(spdk_rpc: str, tmp: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "csi_spdk", "agent", "--listen", f"unix://{tmp}/agent.sock",
         "--spdk-rpc", spdk_rpc, "--state-dir", str(tmp / "state"), "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **extra_env},
        stderr=subprocess.DEVNULL)


def _until_up(api: SpdkApi, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600          # a liveness bound (a loaded CI machine)
    while True:
        try:
            api.version()
            return
        except SpdkTransportError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)


def test_a_stream_broken_mid_call_is_unavailable_and_the_next_call_reconnects(
        spdk_rpc, short_tmp):
    raw = SpdkApi(SpdkClient(spdk_rpc, timeout=30))
    suffix = uuidlib.uuid4().hex[:8]
    raw.malloc_create(f"sess{suffix}", 32 * MiB)
    raw.lvstore_create(f"sess{suffix}", f"sess{suffix}", cluster_sz=MiB)
    lvs = f"sess{suffix}"
    marker = short_tmp / "crashed"
    # the agent SIGKILLs itself when the lvol create reaches it: mid-call
    proc = _agent(spdk_rpc, short_tmp, **{CRASH_ENV: "bdev_lvol_create:1:before",
                                          CRASH_MARKER_ENV: str(marker)})
    client = AgentClient(f"unix://{short_tmp}/agent.sock", timeout=10)
    api = SpdkApi(client)
    second = None
    try:
        _until_up(api, proc)
        first = client._session
        reads: list[object] = []
        name = contract.volume_lvol_name(f"sess-{suffix}")
        with pytest.raises(SpdkTransportError) as err:
            api.lvol_create(lvs, name, MiB, True)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "storage agent" in err.value.message
        assert marker.exists() and proc.wait(30) == -signal.SIGKILL
        assert first is not None and not first.alive
        assert raw.bdev_get(f"sess{suffix}/{name}") is None   # killed before SPDK saw it
        try:
            api.version()
        except SpdkTransportError as again:        # nobody listens: UNAVAILABLE again
            reads.append(again.code)
        assert reads == [grpc.StatusCode.UNAVAILABLE]

        second = _agent(spdk_rpc, short_tmp)       # the agent is back
        _until_up(api, second)                     # the same client reconnects
        assert client._session is not first and client._session.alive
        made = api.lvol_create(lvs, name, MiB, True)
        lvol = raw.bdev_get(made)
        assert lvol is not None and lvol["num_blocks"] * lvol["block_size"] == MiB
        raw.lvol_delete(made)
    finally:
        client.close()
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
        raw.call("bdev_lvol_delete_lvstore", {"lvs_name": f"sess{suffix}"})
        raw.call("bdev_malloc_delete", {"name": f"sess{suffix}"})


def test_a_stopping_agent_ends_its_sessions_and_starts_nothing_new(agent_env):
    env = agent_env
    assert env.api.version()["version"].startswith("SPDK")
    session = env.client._session
    assert session is not None and session.alive
    for hook in env.agent.server.on_stop:          # what GrpcServer.stop runs first
        hook()
    deadline = time.monotonic() + 30
    while session.alive:                            # the stream ended (status OK)
        assert time.monotonic() < deadline, "the session did not end"
        time.sleep(0.05)
    with pytest.raises(SpdkTransportError) as err:  # a new stream: refused, not run
        env.client.call("bdev_lvol_create", {"lvs_name": env.lvs, "lvol_name": "csi-x",
                                             "size_in_mib": 1})
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "stopping" in err.value.message
    assert env.client._session is not session
    assert env.raw.lvols(env.lvs) == []             # nothing was created
