"""Intents executed inside the agent (spdk/intents.py through CheckedApi):
the same policy as Call, one state write per intent, and a record that states
what the intent made even when a retry finds SPDK already done (the agent
died between SPDK applying a call and writing its record)."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import pytest
from agent_fixtures import RunningAgent, agent_args

from csi_spdk import contract
from csi_spdk.agent import journal as journal_mod
from csi_spdk.agent.state import DesiredState
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.intents import IntentError

MiB = 1 << 20
HOST = contract.host_nqn("node-1")


@pytest.fixture
def rig(spdk_rpc: str, short_tmp: Path):
    raw = SpdkApi(SpdkClient(spdk_rpc, timeout=30))
    tag = uuidlib.uuid4().hex[:8]
    malloc, lvs = f"intm{tag}", f"intl{tag}"
    raw.malloc_create(malloc, 64 * MiB)
    raw.lvstore_create(malloc, lvs, cluster_sz=MiB)
    if not raw.transports():
        raw.transport_create("TCP")
    made: list[str] = []

    def agent(name: str) -> tuple[RunningAgent, DesiredState]:
        st = DesiredState(short_tmp / name / "desired.json")
        a = RunningAgent(agent_args(spdk_rpc, short_tmp / name, f"unix://{short_tmp}/{name}.sock"),
                         state=st)
        made.append(a)
        return a, st

    yield raw, lvs, agent
    for a in made:
        a.stop()
    for lv in raw.lvols(lvs):
        raw.subsystem_get(contract.subsystem_nqn(lv["uuid"])) and \
            raw.subsystem_delete(contract.subsystem_nqn(lv["uuid"]))
        raw.lvol_delete(lv["uuid"])
    raw.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
    raw.call("bdev_malloc_delete", {"name": malloc})
    raw.client.close()


def _spec(uuid: str) -> dict:
    return {"uuid": uuid, "host": HOST, "model": contract.MODEL_NUMBER, "signature": "s",
            "listen": SpdkApi.listen_address("127.0.0.1", 4420), "keys": {}}


def test_export_in_the_agent_writes_once_and_survives_a_lost_record(rig, monkeypatch):
    raw, lvs, agent = rig
    uuid = raw.lvol_create(lvs, contract.volume_lvol_name("v1"), 4 * MiB, True)
    writes: list[int] = []
    real_append = journal_mod.Journal.append
    monkeypatch.setattr(journal_mod.Journal, "append",
                        lambda *a, **k: (writes.append(1), real_append(*a, **k))[1])
    a, st = agent("a1")
    client = a.client()
    assert client.intent("export", _spec(uuid)) == {"created": True}
    assert len(writes) == 1                           # 4 SPDK changes, one journal record
    nqn = contract.subsystem_nqn(uuid)
    sub = raw.subsystem_get(nqn)
    assert [h["nqn"] for h in sub["hosts"]] == [HOST] and sub["allow_any_host"] is False
    assert [n["uuid"] for n in sub["namespaces"]] == [uuid]
    assert list(st.snapshot()["subsystems"][nqn]["hosts"]) == [HOST]

    # the record is lost (agent died before writing): the retry makes no SPDK
    # change, yet the new record states the whole export
    b, st2 = agent("a2")
    assert b.client().intent("export", _spec(uuid)) == {"created": False}
    rec = st2.snapshot()["subsystems"][nqn]
    assert list(rec["hosts"]) == [HOST] and rec["allow_any_host"] is False
    assert [ns["namespace"]["bdev_name"] for ns in rec["namespaces"].values()] == [uuid]
    assert [x["listen_address"]["trsvcid"] for x in rec["listeners"]] == ["4420"]
    raw.subsystem_delete(nqn)                          # spdk_tgt restarted: exports gone
    st2.replay(raw)
    assert [h["nqn"] for h in raw.subsystem_get(nqn)["hosts"]] == [HOST]


def test_unexport_in_the_agent_never_leaves_a_host_to_replay(rig):
    raw, lvs, agent = rig
    uuid = raw.lvol_create(lvs, contract.volume_lvol_name("v2"), 4 * MiB, True)
    a, st = agent("b1")
    client = a.client()
    client.intent("export", _spec(uuid))
    nqn = contract.subsystem_nqn(uuid)
    raw.subsystem_delete(nqn)     # SPDK applied the delete, the agent died before the write
    assert nqn in st.snapshot()["subsystems"]
    # no subsystem read: whether a crypto bdev was exported is unknown
    assert client.intent("unexport", {"uuid": uuid, "hosts": [HOST]}) == {"gone": True,
                                                                         "stacked": None}
    assert nqn not in st.snapshot()["subsystems"]
    st.replay(raw)
    assert raw.subsystem_get(nqn) is None              # nothing re-admitted


def test_intents_keep_the_agent_policy(rig):
    """A foreign lvol is neither exported nor deleted through an intent, and a
    malformed spec is INVALID_ARGUMENT; nothing is left behind."""
    import grpc
    raw, lvs, agent = rig
    foreign = raw.lvol_create(lvs, "not-the-drivers", 4 * MiB, True)
    a, st = agent("c1")
    client = a.client()
    with pytest.raises(IntentError) as err:
        client.intent("export", _spec(foreign))
    assert err.value.reason == "not_volume"
    assert raw.subsystem_get(contract.subsystem_nqn(foreign)) is None
    assert st.snapshot()["subsystems"] == {}
    with pytest.raises(IntentError) as err:
        client.intent("delete_volume", {"uuid": foreign})
    assert err.value.reason == "foreign"
    assert raw.bdev_get(foreign) is not None
    with pytest.raises(Exception) as bad:
        client.intent("create_lvol", {"lvs": lvs, "name": "foreign-name", "size_mib": 1,
                                      "thin": True})
    assert getattr(bad.value, "code", None) == grpc.StatusCode.PERMISSION_DENIED
    assert raw.bdev_get(f"{lvs}/foreign-name") is None
    with pytest.raises(Exception) as bad:
        client.intent("unexport", {"hosts": []})
    assert getattr(bad.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
