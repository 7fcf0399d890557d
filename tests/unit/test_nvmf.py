"""nvmf.NvmfExporter against the simulator: exact SPDK state, crash at each step."""

from __future__ import annotations

import pytest
from controller_fixtures import NVMF_PORT, Crash

from csi_spdk import contract
from csi_spdk.controller.export import NvmfExporter
from csi_spdk.errors import ResourceExhausted
from csi_spdk.spdk.errors import SpdkError

H1, H2 = contract.host_nqn("node-1"), contract.host_nqn("node-2")


def lvol(env, name="csi-v"):
    return env.t0.raw.lvol_create(env.t0.lvs, name, 8 * 1024 * 1024, thin=True)


def exporter(env):
    return NvmfExporter(env.t0.api, env.config.targets[0])


def check_exported(env, uuid, hosts):
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert sub is not None
    assert sub["allow_any_host"] is False
    assert sorted(h["nqn"] for h in sub["hosts"]) == sorted(hosts)
    assert sub["serial_number"] == contract.serial_number(uuid)
    assert sub["model_number"] == contract.MODEL_NUMBER
    assert sub["max_namespaces"] == 1
    assert [(n["bdev_name"], n["uuid"]) for n in sub["namespaces"]] == [(uuid, uuid)]
    assert [(a["traddr"], str(a["trsvcid"])) for a in sub["listen_addresses"]] == \
        [("127.0.0.1", str(NVMF_PORT))]
    assert any(t["trtype"].upper() == "TCP" for t in env.t0.raw.transports())


def test_export_unexport(env):
    uuid = lvol(env)
    ex = exporter(env)
    ctx = ex.export(uuid, H1)
    assert ctx == {"nqn": contract.subsystem_nqn(uuid), "trtype": "tcp", "traddr": "10.0.2.2",
                   "trsvcid": str(NVMF_PORT), "adrfam": "ipv4", "nsUuid": uuid,
                   "serial": contract.serial_number(uuid)}
    check_exported(env, uuid, [H1])
    assert ex.export(uuid, H1) == ctx          # idempotent
    ex.export(uuid, H2)
    check_exported(env, uuid, [H1, H2])
    assert ex.exported_hosts()[uuid] == ex.hosts(uuid)
    ex.unexport(uuid, H1)
    check_exported(env, uuid, [H2])
    ex.unexport(uuid, H1)                      # idempotent
    ex.unexport(uuid, H2)
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
    ex.unexport(uuid, H2)                      # missing subsystem
    ex.delete(uuid)


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5])
def test_export_crash_between_steps_converges(env, step):
    """Steps: transport (only on a target without one), subsystem, namespace,
    listener, host."""
    uuid = lvol(env)
    ex = exporter(env)
    has_tcp = any(t["trtype"].upper() == "TCP" for t in env.t0.raw.transports())
    if has_tcp and step == 5:
        pytest.skip("this target already has its TCP transport: export makes 4 changes")
    env.t0.api.arm(step)
    with pytest.raises(Crash):
        ex.export(uuid, H1)
    env.t0.api.arm(0)
    ex.export(uuid, H1)
    check_exported(env, uuid, [H1])


@pytest.mark.parametrize("last", [True, False])
def test_unexport_crash_between_steps_converges(env, last):
    """The last host: one change (the subsystem goes with it); another host
    left: the host entry is removed and the subsystem stays."""
    uuid = lvol(env)
    ex = exporter(env)
    ex.export(uuid, H1)
    if not last:
        ex.export(uuid, H2)
    env.t0.api.arm(1)
    with pytest.raises(Crash):
        ex.unexport(uuid, H1)
    env.t0.api.arm(0)
    assert ex.unexport(uuid, H1) is last
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    if last:
        assert sub is None
    else:
        assert [h["nqn"] for h in sub["hosts"]] == [H2]


def test_ipv6_dial_address(env):
    from dataclasses import replace
    t = replace(env.config.targets[0], dial_address="fd00::2")
    ctx = NvmfExporter(env.t0.api, t).publish_context("00000000-0000-0000-0000-000000000001")
    assert ctx["adrfam"] == "ipv6" and ctx["traddr"] == "fd00::2"


def _sim_nvmf(env):
    if env.t0.server is None:
        pytest.skip("needs the simulator (a real target's limit is its own)")
    return env.t0.server.state.nvmf


def test_sim_subsystem_limit_is_spdk_default(env):
    """spdk_tgt v25.09 takes 1023 subsystems besides discovery, then answers
    -32603 "Unable to create subsystem <nqn>" (measured on a real target)."""
    nvmf = _sim_nvmf(env)
    assert nvmf.max_subsystems == 1024
    for i in range(1023):
        env.t0.raw.subsystem_create(f"nqn.2024-01.io.test:s{i}", f"SN{i}", "M", 1)
    with pytest.raises(SpdkError) as err:
        env.t0.raw.subsystem_create("nqn.2024-01.io.test:one-more", "SNX", "M", 1)
    assert (err.value.spdk_code, err.value.spdk_message) == \
        (-32603, "Unable to create subsystem nqn.2024-01.io.test:one-more")


def test_export_when_target_is_out_of_subsystems(env):
    nvmf = _sim_nvmf(env)
    nvmf.max_subsystems = len(nvmf.subsystems)
    uuid = lvol(env)
    with pytest.raises(ResourceExhausted) as err:
        exporter(env).export(uuid, contract.host_nqn("n1"))
    assert "cannot export another volume" in err.value.message
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None


def test_hold_open_serves_the_lvol_alone_and_converges_from_a_stale_view(env):
    """The QoS hold: a subsystem with the lvol's one namespace, no host, no
    listener, room for no other namespace. Given a view read before someone
    else added the namespace (SPDK then refuses the add), it re-checks and
    succeeds; a second hold leaves one namespace; delete removes it."""
    uuid = lvol(env)
    ex = exporter(env)
    nqn = contract.subsystem_nqn(uuid)
    ex.hold_open(uuid, None)
    sub = env.t0.raw.subsystem_get(nqn)
    assert sub["hosts"] == [] and sub["listen_addresses"] == []
    assert sub["max_namespaces"] == 1 and sub["allow_any_host"] is False
    assert [(n["bdev_name"], n["uuid"]) for n in sub["namespaces"]] == [(uuid, uuid)]
    stale = dict(sub, namespaces=[])
    ex.hold_open(uuid, stale)
    ex.hold_open(uuid, env.t0.raw.subsystem_get(nqn))
    assert [n["bdev_name"] for n in env.t0.raw.subsystem_get(nqn)["namespaces"]] == [uuid]
    ex.delete(uuid)
    assert env.t0.raw.subsystem_get(nqn) is None


def test_hold_open_of_a_missing_lvol_fails(env):
    """The add is refused and the re-check finds no namespace: the error
    surfaces (a hold on nothing would be a lie to the QoS call)."""
    ex = exporter(env)
    gone = "0f0e0d0c-0b0a-4909-8807-060504030201"
    with pytest.raises(SpdkError):
        ex.hold_open(gone, None)
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(gone))
    assert sub is None or sub["namespaces"] == []
    ex.delete(gone)


def test_delete_removes_the_subsystem_whatever_its_hosts(env):
    uuid = lvol(env)
    ex = exporter(env)
    ex.export(uuid, H1)
    ex.export(uuid, H2)
    ex.delete(uuid)
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
    ex.delete(uuid)                            # missing is success


class _StaleTransports:
    """An SpdkApi whose first transport listing predates another caller's
    create of the TCP transport (the race ensure_transport must survive)."""

    def __init__(self, api, fail_create=False):
        self.api, self.first, self.fail_create = api, True, fail_create

    def __getattr__(self, name):
        return getattr(self.api, name)

    def transports(self):
        if self.first:
            self.first = False
            return []
        return self.api.transports()

    def transport_create(self, trtype):
        if self.fail_create:
            raise SpdkError("nvmf_create_transport", -32603, "Transport type 'TCP' failed")
        return self.api.transport_create(trtype)


def test_transport_created_meanwhile_is_no_error_a_failed_create_is(env):
    """SPDK refuses a second TCP transport; when the listing shows it exists
    after the refusal the export proceeds. A create that fails with no TCP
    transport listed afterwards raises (nothing to export on)."""
    if not any(t["trtype"].upper() == "TCP" for t in env.t0.raw.transports()):
        env.t0.raw.transport_create("TCP")
    uuid = lvol(env)
    NvmfExporter(_StaleTransports(env.t0.api), env.config.targets[0]).export(uuid, H1)
    check_exported(env, uuid, [H1])
    bare = _StaleTransports(env.t0.api, fail_create=True)
    bare.transports = lambda: []
    with pytest.raises(SpdkError):
        NvmfExporter(bare, env.config.targets[0]).ensure_transport()
