"""The agent's least privilege: what it forwards, what it refuses, and that
SPDK's own answers reach the controller intact (agent/policy.py, server.py).

Every refusal is checked on SPDK itself (through ``raw``, the direct socket):
the object it protected is still there, unchanged."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from csi_spdk import contract
from csi_spdk.spdk.errors import SpdkError, SpdkNoSpace, SpdkNotFound, SpdkTransportError

MiB = 1 << 20


def denied(fn, *args, **kwargs) -> str:
    from csi_spdk.errors import CsiError

    with pytest.raises(CsiError) as err:
        fn(*args, **kwargs)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value
    return err.value.message


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def foreign(agent_env):
    """An lvol the driver did not make (no driver prefix), made directly."""
    uuid = agent_env.raw.lvol_create(agent_env.lvs, "precious", 4 * MiB, thin=False)
    return agent_env.raw.bdev_get(uuid)


@pytest.mark.parametrize("method,params", [
    ("bdev_malloc_create", {"name": "evil", "num_blocks": 256, "block_size": 4096}),
    ("bdev_lvol_delete_lvstore", None),
    ("nvmf_subsystem_allow_any_host", {"nqn": contract.NQN_PREFIX + "x", "allow_any_host": True}),
    ("keyring_file_add_key", {"name": "k", "path": "/etc/shadow"}),
    ("framework_start_init", None),
    ("save_config", None),
])
def test_methods_outside_the_allow_list_are_denied(agent_env, method, params):
    if method == "bdev_lvol_delete_lvstore":
        params = {"lvs_name": agent_env.lvs}
    before = counter("csi_spdk_agent_refused_total", method="other", reason="not_allowed")
    msg = denied(agent_env.api.call, method, params)
    assert method in msg and "allow list" in msg
    assert counter("csi_spdk_agent_refused_total", method="other",
                   reason="not_allowed") == before + 1
    assert agent_env.raw.bdev_get("evil") is None
    assert agent_env.raw.lvstores(agent_env.lvs), "the lvstore must survive"
    assert all(k["name"] != "k" for k in agent_env.raw.call("keyring_get_keys"))


def test_foreign_lvol_cannot_be_deleted_by_uuid_or_alias(agent_env, foreign):
    uuid = foreign["uuid"]
    for ref in (uuid, f"{agent_env.lvs}/precious"):
        msg = denied(agent_env.api.lvol_delete, ref)
        assert "precious" in msg and "csi-" in msg
    assert agent_env.raw.bdev_get(uuid) is not None


def test_foreign_lvol_cannot_be_resized_renamed_snapshotted_or_cloned(agent_env, foreign):
    uuid = foreign["uuid"]
    denied(agent_env.api.lvol_resize, uuid, 8 * MiB)
    denied(agent_env.api.lvol_rename, uuid, "csi-stolen")
    denied(agent_env.api.snapshot, uuid, "csis-snap")
    after = agent_env.raw.bdev_get(uuid)
    assert after["num_blocks"] * after["block_size"] == 4 * MiB
    assert after["aliases"] == [f"{agent_env.lvs}/precious"]
    assert agent_env.raw.bdev_get(f"{agent_env.lvs}/csis-snap") is None
    # a snapshot the driver did not make cannot be cloned either
    snap = agent_env.raw.snapshot(uuid, "their-snap")
    denied(agent_env.api.clone, snap, "csi-clone")
    assert agent_env.raw.bdev_get(f"{agent_env.lvs}/csi-clone") is None


def test_new_names_must_carry_a_driver_prefix(agent_env):
    msg = denied(agent_env.api.lvol_create, agent_env.lvs, "mine", 4 * MiB, False)
    assert "mine" in msg
    assert agent_env.raw.bdev_get(f"{agent_env.lvs}/mine") is None
    uuid = agent_env.api.lvol_create(agent_env.lvs, "csi-vol", 4 * MiB, False)
    denied(agent_env.api.lvol_rename, uuid, "not-ours")
    denied(agent_env.api.snapshot, uuid, "plain-snap")
    denied(agent_env.api.snapshot, uuid, "lvs/csis-x")
    assert agent_env.raw.bdev_get(uuid)["aliases"] == [f"{agent_env.lvs}/csi-vol"]
    snap = agent_env.api.snapshot(uuid, "csis-snap")
    denied(agent_env.api.clone, snap, "plain-clone")
    assert agent_env.raw.bdev_get(f"{agent_env.lvs}/plain-clone") is None
    assert agent_env.raw.bdev_get(f"{agent_env.lvs}/plain-snap") is None


def test_foreign_lvol_cannot_be_exported(agent_env, foreign):
    uuid = foreign["uuid"]
    nqn = contract.subsystem_nqn(uuid)
    agent_env.api.subsystem_create(nqn, contract.serial_number(uuid), contract.MODEL_NUMBER)
    denied(agent_env.api.ns_add, nqn, uuid, uuid=uuid)
    assert agent_env.raw.subsystem_get(nqn)["namespaces"] == []


def test_a_volume_is_only_exported_in_its_own_subsystem(agent_env):
    a = agent_env.api.lvol_create(agent_env.lvs, "csi-a", 4 * MiB, False)
    b = agent_env.api.lvol_create(agent_env.lvs, "csi-b", 4 * MiB, False)
    nqn_b = contract.subsystem_nqn(b)
    agent_env.api.subsystem_create(nqn_b, contract.serial_number(b), contract.MODEL_NUMBER)
    msg = denied(agent_env.api.ns_add, nqn_b, a, uuid=a)
    assert contract.subsystem_nqn(a) in msg
    assert agent_env.raw.subsystem_get(nqn_b)["namespaces"] == []
    agent_env.api.ns_add(nqn_b, b, uuid=b)
    assert [ns["uuid"] for ns in agent_env.raw.subsystem_get(nqn_b)["namespaces"]] == [b]


def test_foreign_and_open_subsystems_are_refused(agent_env):
    other = "nqn.2016-06.io.spdk:cnode1"
    denied(agent_env.api.subsystem_create, other, "SN1", "model")
    assert agent_env.raw.subsystem_get(other) is None
    nqn = contract.NQN_PREFIX + f"00000000-0000-0000-0000-{agent_env.suffix}0000"
    msg = denied(agent_env.api.call, "nvmf_create_subsystem",
                 {"nqn": nqn, "allow_any_host": True})
    assert "hosts" in msg
    assert agent_env.raw.subsystem_get(nqn) is None
    # an existing foreign subsystem: no hosts, listeners or deletion through the agent
    agent_env.raw.subsystem_create(other, "SN1", "model")
    try:
        denied(agent_env.api.host_add, other, "nqn.2014-08.org.nvmexpress:uuid:intruder")
        denied(agent_env.api.listener_add, other, agent_env.api.listen_address("127.0.0.1", 4420))
        denied(agent_env.api.subsystem_delete, other)
        sub = agent_env.raw.subsystem_get(other)
        assert sub is not None and sub["hosts"] == [] and sub["listen_addresses"] == []
    finally:
        agent_env.raw.subsystem_delete(other)


def test_driver_operations_pass_and_change_spdk(agent_env):
    api, raw = agent_env.api, agent_env.raw
    uuid = api.lvol_create(agent_env.lvs, "csi-vol", 4 * MiB, True)
    api.lvol_resize(uuid, 8 * MiB)
    got = raw.bdev_get(uuid)
    assert got["num_blocks"] * got["block_size"] == 8 * MiB
    snap = api.snapshot(uuid, "csis-s")
    clone = api.clone(snap, "csi-c")
    assert raw.bdev_get(clone)["driver_specific"]["lvol"]["clone"] is True
    nqn = contract.subsystem_nqn(uuid)
    api.transport_create("TCP") if not api.transports() else None
    api.subsystem_create(nqn, contract.serial_number(uuid), contract.MODEL_NUMBER)
    api.ns_add(nqn, uuid, uuid=uuid)
    api.host_add(nqn, contract.host_nqn("n1"))
    sub = raw.subsystem_get(nqn)
    assert [h["nqn"] for h in sub["hosts"]] == [contract.host_nqn("n1")]
    assert sub["allow_any_host"] is False
    api.host_remove(nqn, contract.host_nqn("n1"))
    api.subsystem_delete(nqn)
    assert raw.subsystem_get(nqn) is None
    api.lvol_delete(clone)
    assert raw.bdev_get(clone) is None


def _error_of(fn) -> tuple[type, int, str]:
    with pytest.raises(SpdkError) as err:
        fn()
    return type(err.value), err.value.spdk_code, err.value.spdk_message


def test_spdk_errors_reach_the_controller_intact(agent_env):
    """The same failing call, direct and through the agent: same type, code, message."""
    cases = [
        lambda api: api.lvol_create("no-such-lvs", "csi-x", 4 * MiB, False),
        lambda api: api.lvol_create(agent_env.lvs, "csi-huge", 1 << 40, False),
        lambda api: api.lvol_delete("00000000-0000-0000-0000-000000000000"),
        lambda api: api.subsystem_delete(contract.NQN_PREFIX + "missing"),
        lambda api: api.call("bdev_lvol_create", {"lvs_name": agent_env.lvs,
                                                  "lvol_name": "csi-n"}),
        lambda api: api.call("nvmf_create_subsystem", {"nqn": contract.NQN_PREFIX + "x",
                                                       "bogus": 1}),
    ]
    for case in cases:
        assert _error_of(lambda c=case: c(agent_env.api)) == \
            _error_of(lambda c=case: c(agent_env.raw))
    with pytest.raises(SpdkNoSpace):
        agent_env.api.lvol_create(agent_env.lvs, "csi-huge", 1 << 40, False)
    with pytest.raises(SpdkNotFound):
        agent_env.api.lvol_delete("00000000-0000-0000-0000-000000000000")


def test_spdk_tgt_gone_is_unavailable(spdk_rpc, short_tmp):
    from agent_fixtures import start_agent

    from csi_spdk.spdk.api import SpdkApi

    agent = start_agent(str(short_tmp / "nothing-here.sock"), short_tmp / "st",
                        f"unix://{short_tmp}/a.sock")
    try:
        with agent.client() as client, pytest.raises(SpdkTransportError) as err:
            SpdkApi(client).version()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "nothing-here.sock" in err.value.message and "storage agent" in err.value.message
    finally:
        agent.stop()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict | None]] = []
        self.results: list = []

    def record(self, method: str, params: dict | None, result=None) -> None:
        self.calls.append((method, params))
        self.results.append(result)


def test_successful_mutations_are_recorded_and_nothing_else(agent_env):
    from agent_fixtures import start_agent

    from csi_spdk.spdk.api import SpdkApi

    rec = Recorder()
    agent = start_agent(agent_env.rpc, agent_env.tmp / "st2", f"unix://{agent_env.tmp}/r.sock",
                        state=rec)
    try:
        with agent.client() as client:
            api = SpdkApi(client)
            uuid = api.lvol_create(agent_env.lvs, "csi-rec", 4 * MiB, False)
            nqn = contract.subsystem_nqn(uuid)
            api.subsystem_get(nqn)                                  # read: not recorded
            api.subsystem_create(nqn, contract.serial_number(uuid), contract.MODEL_NUMBER)
            with pytest.raises(SpdkError):                          # failed: not recorded
                api.subsystem_create(nqn, contract.serial_number(uuid), contract.MODEL_NUMBER)
            denied(api.subsystem_create, "nqn.2016-06.io.spdk:x", "S", "M")  # refused
            api.host_add(nqn, contract.host_nqn("n1"))
    finally:
        agent.stop()
    assert [m for m, _ in rec.calls] == ["bdev_lvol_create", "nvmf_create_subsystem",
                                         "nvmf_subsystem_add_host"]
    assert rec.calls[2][1] == {"nqn": nqn, "host": contract.host_nqn("n1")}
    assert rec.results[0] == uuid   # SPDK's reply goes along (e.g. the nsid it chose)


def test_request_metrics_count_outcomes(agent_env, foreign):
    def n(method, outcome):
        return counter("csi_spdk_agent_requests_total", method=method, outcome=outcome)

    ok, err, ref = (n("bdev_get_bdevs", "ok"), n("bdev_lvol_delete", "spdk_error"),
                    n("bdev_lvol_delete", "refused"))
    agent_env.api.bdevs()
    with pytest.raises(SpdkNotFound):
        agent_env.api.lvol_delete("00000000-0000-0000-0000-000000000000")
    denied(agent_env.api.lvol_delete, foreign["uuid"])
    assert (n("bdev_get_bdevs", "ok"), n("bdev_lvol_delete", "spdk_error"),
            n("bdev_lvol_delete", "refused")) == (ok + 1, err + 1, ref + 1)
    assert counter("csi_spdk_agent_refused_total", method="bdev_lvol_delete",
                   reason="foreign_lvol") >= 1


def test_refusals_are_logged_with_method_reason_and_peer(agent_env, foreign, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="csi_spdk.agent")
    denied(agent_env.api.lvol_delete, foreign["uuid"])
    denied(agent_env.api.call, "bdev_malloc_delete", {"name": agent_env.malloc})
    refused = [r.f for r in caplog.records if r.levelno == logging.WARNING and r.msg == "refused"]
    assert [(f["method"], f["reason"]) for f in refused] == [
        ("bdev_lvol_delete", "foreign_lvol"), ("bdev_malloc_delete", "not_allowed")]
    assert all(f["outcome"] == "refused" and f["peer"] and f["error"] for f in refused)
    assert agent_env.raw.bdev_get(agent_env.malloc) is not None
