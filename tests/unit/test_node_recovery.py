"""Node recovery: defaults for a target restart, a staged volume whose NVMe
controller the kernel deleted, a bounded NodeUnstage when the target is gone,
and NodeStage's final errors leaving nothing behind (kubelet never unstages
after one). Fake initiator, real loop devices and mounts (test_node.py)."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from test_node import UUID1, VOL1, block_cap, code_of, make_env, mount_cap  # noqa: F401

from csi_spdk import contract
from csi_spdk.cli import build_parser
from csi_spdk.node.initiator import NvmeTcpInitiator
from csi_spdk.node.stage import same_device
from csi_spdk.proto import csi_pb2

NQN = contract.subsystem_nqn(UUID1)


@pytest.fixture
def env(tmp_path):
    yield from make_env(tmp_path)


def test_defaults_survive_a_long_target_restart():
    args = build_parser().parse_args(["node", "--node-id", "n1", "--endpoint", "unix:///x"])
    assert args.ctrl_loss_tmo == -1
    ini = NvmeTcpInitiator("nqn.h", "id")
    assert "--ctrl-loss-tmo=-1" in ini.connect_command({
        contract.PC_TRADDR: "10.0.2.2", contract.PC_TRSVCID: "4420", contract.PC_NQN: NQN})


def test_stage_final_error_disconnects_and_forgets(env):
    env.export()     # an empty device: a read-only mount cannot format it (final)
    ro = mount_cap(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)
    assert code_of(env.stage, cap=ro) == grpc.StatusCode.FAILED_PRECONDITION
    assert ("disconnect", NQN) in env.ini.calls and NQN not in env.ini.connected
    assert env.node.store.load(VOL1) is None
    # a retryable error keeps the record and the connection for the retry
    env.ini.devices.pop(NQN)
    assert code_of(env.stage) == grpc.StatusCode.UNAVAILABLE
    assert env.node.store.load(VOL1) is not None


def test_unstage_is_bounded_when_the_target_is_gone(env):
    env.export()
    env.stage()
    order = []
    real_unmount = env.node.mounter.unmount

    def unmount(path):
        order.append(("unmount", path))
        return real_unmount(path)

    env.node.mounter.unmount = unmount
    real_disconnect = env.ini.disconnect
    env.ini.disconnect = lambda nqn: (order.append(("disconnect", nqn)), real_disconnect(nqn))
    env.node.unstage_grace = 0.2
    env.ini.live = False          # connected, but no live path: the target is away
    env.unstage()
    assert order[0] == ("disconnect", NQN), order   # queued I/O fails before the unmount
    assert ("unmount", env.path("staging")) in order
    assert env.node.mounter.mounted_at(env.path("staging")) is None
    assert env.node.store.load(VOL1) is None


def test_stats_reconnects_a_vanished_controller(env):
    env.export()
    env.stage()
    env.ini.connected.discard(NQN)     # the kernel deleted it (ctrl_loss_tmo ran out)
    cond = env.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=VOL1, volume_path=env.path("staging")), env.ctx).volume_condition
    assert env.ini.calls.count(("connect", NQN)) == 2 and NQN in env.ini.connected
    assert cond.abnormal and "reconnected" in cond.message


def test_stats_reconnect_points_the_luks_mapping_at_the_new_device(env):
    """encryption: node: the mapping follows the namespace's new device (a dm
    table reload, luks.py ``repoint``), with no secret in the request."""
    from test_luks import KEY, FakeCryptsetup

    from csi_spdk.node import luks

    old, backing = env.export()
    env.stage()
    fake = FakeCryptsetup()
    env.node.luks = luks.Luks(fake.probe, run=fake.run, devno=fake.devno)
    rec = env.node.store.load(VOL1)
    rec.mapper = luks.mapper_name(VOL1)
    env.node.store.save(rec)
    fake.headers[old] = KEY
    env.node.luks.open(old, rec.mapper, KEY)
    env.ini.connected.discard(NQN)     # the kernel deleted the controller
    env.ini.devices[NQN] = "/dev/nvme9n1"   # ... and it came back as another device
    cond = env.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=VOL1, volume_path=env.path("staging")), env.ctx).volume_condition
    assert fake.mappings[rec.mapper] == "/dev/nvme9n1"
    assert cond.abnormal and "reads from it again" in cond.message
    # closed behind our back: the condition says what to do
    fake.mappings.clear()
    env.ini.connected.discard(NQN)
    cond = env.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=VOL1, volume_path=env.path("staging")), env.ctx).volume_condition
    assert "is not open: stage the volume again" in cond.message
    rec.mapper = ""
    env.node.store.save(rec)


def test_restage_remounts_when_the_namespace_came_back_as_another_device(env):
    old, backing = env.export()
    env.stage()
    with open(env.path("staging") + "/data", "w") as f:
        f.write("kept")
    subprocess.run(["sync"], check=True)
    # the controller vanished and reconnected: same namespace, new device name
    new = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True,
                         text=True, check=True).stdout.strip()
    env.loops.devices.append(new)
    env.ini.devices[NQN] = new
    env.stage()
    m = env.node.mounter.mounted_at(env.path("staging"))
    assert m is not None and same_device(env.node.mounter, m.major_minor, new)
    with open(env.path("staging") + "/data") as f:
        assert f.read() == "kept"
    assert env.node.store.load(VOL1).device == new
    env.unstage()
