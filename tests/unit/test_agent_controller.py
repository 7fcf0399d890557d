"""The controller through the agent: the unit environment really uses it (so
the controller suites test that path), and an agent that cannot be reached
is UNAVAILABLE naming it."""

from __future__ import annotations

import grpc
from controller_fixtures import THROUGH_AGENT, create_req, expect_code, make_env, publish_req
from prometheus_client import REGISTRY

from csi_spdk import contract
from csi_spdk.controller import config as cfgmod
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.proto import csi_pb2
from csi_spdk.spdk.agent_client import AgentClient


def agent_count(method: str) -> float:
    return REGISTRY.get_sample_value("csi_spdk_agent_requests_total",
                                     {"method": method, "outcome": "ok"}) or 0.0


def agent_total() -> float:
    """Every request the agents of this process answered, whatever the method."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "csi_spdk_agent_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


def test_controller_suites_run_through_the_agent(tmp_path):
    """One controller->agent round trip per CSI call (auth: none), the SPDK
    fan-out done by the intent beside spdk_tgt."""
    env = make_env(tmp_path, agent=True)
    try:
        assert isinstance(env.t0.api.client, AgentClient)
        assert env.config.targets[0].agent is not None
        warm = env.servicer.CreateVolume(create_req("pvc-warm", 16 << 20,
                                                    params={"auth": "none"}), None).volume
        # the first calls read the lvstores and make the TCP transport once
        env.servicer.ControllerPublishVolume(publish_req(warm.volume_id, "node-1"), None)
        before = (agent_count("create_lvol"), agent_count("export"), agent_total())
        vol = env.servicer.CreateVolume(create_req("pvc-agent", 16 << 20,
                                                   params={"auth": "none"}), None).volume
        assert agent_total() == before[2] + 1
        env.servicer.ControllerPublishVolume(publish_req(vol.volume_id, "node-1"), None)
        uuid = vol.volume_id.split(":", 1)[1]
        sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
        assert [h["nqn"] for h in sub["hosts"]] == [contract.host_nqn("node-1")]
        assert (agent_count("create_lvol"), agent_count("export"), agent_total()) == \
            (before[0] + 1, before[1] + 1, before[2] + 2)
        mid = agent_total()
        env.servicer.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id="node-1"), None)
        assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
        env.servicer.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), None)
        assert env.t0.raw.bdev_get(uuid) is None
        # each: the intent, the key-name read (once per controller), and the
        # encryption's look-up of a crypto bdev left over (crypto.bdev_of: a
        # bdev_get_bdevs beside the intent; not folded into the intents yet)
        assert agent_total() - mid <= 6
        assert agent_count("unexport") >= 1 and agent_count("delete_volume") >= 1
    finally:
        env.close()


def test_the_env_fixture_goes_through_the_agent(env):
    """What every controller test gets (unless CSI_SPDK_TEST_AGENT=0)."""
    assert isinstance(env.t0.api.client, AgentClient) == THROUGH_AGENT
    assert (env.config.targets[0].agent is not None) == THROUGH_AGENT


def test_unreachable_agent_is_unavailable_naming_it(short_tmp):
    address = f"unix://{short_tmp}/no-agent.sock"
    cfg = cfgmod.parse({"targets": [{"name": "far", "agent": {"address": address},
                                     "nvmf": {"listenAddress": "127.0.0.1"}}]})
    servicer = ControllerServicer(cfg, "csi-spdk.io")
    try:
        req = create_req("pvc-x", 16 << 20)
        req.parameters["auth"] = "none"   # no key store here: reach the agent first
        msg = expect_code(grpc.StatusCode.UNAVAILABLE, servicer, "CreateVolume", req)
        assert "no-agent.sock" in msg and "'far'" in msg
        # Probe is about the process (docs/DESIGN.md "Health"); the target's
        # health check says the agent is down
        assert servicer.ready() is True
        servicer.health.check()
        up, error = servicer.health.status("far")
        assert up is False and "no-agent.sock" in error
    finally:
        servicer.close()


def test_listings_through_the_agent_keep_only_what_the_caller_keeps(env):
    """SpdkApi's listings pass ``each`` to the agent client too: the reply's
    array is decoded element by element and only the kept ones are returned."""
    from csi_spdk.spdk.api import SpdkApi
    api = SpdkApi(env.t0.api.client)
    assert isinstance(api.client, AgentClient) == THROUGH_AGENT
    names = sorted(b["name"] for b in env.t0.raw.call("bdev_get_bdevs"))
    assert len(names) >= 1
    got = api.call("bdev_get_bdevs", each=lambda b: b["name"] if b["name"] == names[0] else None)
    assert got == [names[0]]
    assert sorted(api.call("bdev_get_bdevs", each=lambda b: b["name"])) == names


def test_decode_each_reads_one_element_at_a_time():
    """The agent reply's text decoded element-wise: odd spacing, an empty
    array, a result that is no array, a malformed one; and its memory: a
    ~10 MB listing costs a fraction of what decoding it whole does."""
    import json
    import tracemalloc

    import pytest

    from csi_spdk.spdk.agent_client import decode_each
    assert decode_each(' [ {"a": 1} ,{"a": 2},\n{"a":3} ] ', lambda e: e["a"] % 2 or None) == \
        [1, 1]
    assert decode_each("[]", lambda e: e) == [] == decode_each(" [ \n ] ", lambda e: e)
    assert decode_each('{"x": [1]}', lambda e: e) == {"x": [1]}
    with pytest.raises(ValueError):
        decode_each('[{"a": 1} {"a": 2}]', lambda e: e)
    text = json.dumps([{"name": f"lvs/{i:05d}", "uuid": f"{i:032x}", "num_blocks": 2048 * i,
                        "driver_specific": {"lvol": {"thin_provision": bool(i % 2),
                                                     "base_snapshot": None}}}
                       for i in range(60000)])
    assert len(text) > 9_000_000
    peaks = {}
    for how, fn in (("whole", lambda: len(json.loads(text))),
                    ("each", lambda: decode_each(text, lambda b: None))):
        tracemalloc.start()
        got = fn()
        peaks[how] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got == (60000 if how == "whole" else [])
    assert peaks["whole"] > len(text), peaks
    assert peaks["each"] < 100_000, peaks


def test_the_agent_passes_listings_on_unchanged(env):
    """What the agent relays element by element (policy.LISTINGS) equals what
    spdk_tgt answers directly, for every listing, with filters and without."""
    if not THROUGH_AGENT:
        import pytest
        pytest.skip("CSI_SPDK_TEST_AGENT=0: no agent in the path")
    from csi_spdk.agent import policy
    create = env.servicer.CreateVolume(create_req("pvc-list", 16 << 20,
                                                  params={"auth": "none"}), None).volume
    uuid = create.volume_id.split(":", 1)[1]
    env.servicer.ControllerPublishVolume(publish_req(create.volume_id, "node-1"), None)
    agent = env.t0.api.client
    for method in sorted(policy.LISTINGS):
        assert agent.call(method) == env.t0.raw.call(method), method
    assert agent.call("bdev_get_bdevs", {"name": uuid}) == \
        env.t0.raw.call("bdev_get_bdevs", {"name": uuid})
    assert [b["name"] for b in agent.call("bdev_get_bdevs", {"name": uuid})] == [uuid]


def test_a_listing_larger_than_grpcs_default_message_limit(env):
    """bdev_get_bdevs of ~3,600 lvols (over gRPC's default 4 MiB per message;
    10,000 lvols are ~13 MB) through the agent: the whole listing arrives
    (it failed with "Received message larger than max" before)."""
    import json

    server, raw = env.t0.server, env.t0.raw
    make = server.call if server is not None else raw.call   # in-process when it can
    prefix = f"csi-big-{env.t0.malloc[-8:]}"
    malloc, lvs = f"{env.t0.malloc}big", f"{env.t0.lvs}big"
    # an lvstore of its own: one metadata page per lvol at least
    make("bdev_malloc_create", {"name": malloc, "num_blocks": 262144, "block_size": 4096})
    make("bdev_lvol_create_lvstore", {"bdev_name": malloc, "lvs_name": lvs, "cluster_sz": 1 << 20,
                                      "num_md_pages_per_cluster_ratio": 2000})
    made = []
    try:
        for i in range(3600):
            made.append(make("bdev_lvol_create", {"lvs_name": lvs,
                                                  "lvol_name": f"{prefix}-{i:05d}",
                                                  "size_in_mib": 1, "thin_provision": True}))
        direct = raw.call("bdev_get_bdevs")
        assert len(json.dumps(direct)) > 4 << 20
        got = env.t0.api.client.call("bdev_get_bdevs", each=lambda b: b["name"])
        assert sorted(got) == sorted(b["name"] for b in direct)
        assert set(made) <= set(got)
    finally:
        make("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
        make("bdev_malloc_delete", {"name": malloc})
