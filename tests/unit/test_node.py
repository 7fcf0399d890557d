"""NodeServicer end to end with a fake initiator that hands out REAL loop devices."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import grpc
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import loopdev  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.errors import Unavailable  # noqa: E402
from csi_spdk.node.mount import Mounter  # noqa: E402
from csi_spdk.node.readonly_block import ReadOnlyLoops  # noqa: E402
from csi_spdk.node.service import NodeServicer  # noqa: E402
from csi_spdk.proto import csi_pb2  # noqa: E402

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode
UUID1 = "5b0c7b0e-3c1e-4e7a-9c55-0a8f3c4b7d21"
UUID2 = "0d6f1f4a-8a57-4e0a-b1c2-7e7a5d3a9b10"
VOL1, VOL2 = f"target-a:{UUID1}", f"target-a:{UUID2}"


class RpcError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class Ctx:
    def abort(self, code, message):
        raise RpcError(code, message)


class FakeInitiator:
    """Maps NQNs to loop devices; records calls. ``gate`` can block connect."""

    def __init__(self):
        self.devices: dict[str, str] = {}      # nqn -> device the "target" exports
        self.connected: set[str] = set()
        self.live = True
        self.calls: list[tuple] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def connect(self, pc, timeout=30.0, secrets=None):
        self.calls.append(("connect", pc[contract.PC_NQN]))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        nqn = pc[contract.PC_NQN]
        if nqn not in self.devices:
            raise Unavailable(f"namespace of {nqn} did not appear")
        self.connected.add(nqn)
        return self.devices[nqn]

    def disconnect(self, nqn):
        self.calls.append(("disconnect", nqn))
        self.connected.discard(nqn)

    def find_device(self, nqn, ns_uuid, timeout=0):
        return self.devices.get(nqn) if nqn in self.connected else None

    def is_connected(self, nqn):
        return nqn in self.connected

    def path_live(self, nqn):
        return self.live and nqn in self.connected

    def rescan(self, nqn):
        self.calls.append(("rescan", nqn))


def pc(uuid=UUID1):
    return {contract.PC_NQN: contract.subsystem_nqn(uuid), contract.PC_TRTYPE: "tcp",
            contract.PC_TRADDR: "10.0.2.2", contract.PC_TRSVCID: "4420",
            contract.PC_ADRFAM: "ipv4", contract.PC_NS_UUID: uuid,
            contract.PC_SERIAL: contract.serial_number(uuid)}


def mount_cap(fs="ext4", mode=Mode.SINGLE_NODE_WRITER, flags=()):
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs, mount_flags=list(flags)),
        access_mode=Mode(mode=mode))


def block_cap(mode=Mode.SINGLE_NODE_WRITER):
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=Mode(mode=mode))


class Env:
    def __init__(self, tmp):
        self.tmp = tmp
        self.loops = loopdev.Loops(str(tmp))
        self.ini = FakeInitiator()
        self.state = str(tmp / "state")
        self.node = self.new_node()
        self.ctx = Ctx()

    def new_node(self):
        return NodeServicer("worker-1", self.state, self.ini, Mounter(), max_volumes=7,
                            topology_segments={contract.TOPOLOGY_NODE_KEY: "worker-1",
                                               "ssd.csi-spdk.io/qemu-nvme-ctrl": "true"})

    def export(self, uuid=UUID1, size=64 * MiB):
        dev, backing = self.loops.make(size=size)
        self.ini.devices[contract.subsystem_nqn(uuid)] = dev
        return dev, backing

    def path(self, name):
        return str(self.tmp / name)

    def stage(self, vol=VOL1, uuid=UUID1, cap=None, staging="staging"):
        return self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol, publish_context=pc(uuid), staging_target_path=self.path(staging),
            volume_capability=cap or mount_cap()), self.ctx)

    def unstage(self, vol=VOL1, staging="staging"):
        return self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol, staging_target_path=self.path(staging)), self.ctx)

    def publish(self, target, vol=VOL1, cap=None, readonly=False, staging="staging"):
        return self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol, publish_context=pc(), staging_target_path=self.path(staging),
            target_path=self.path(target), volume_capability=cap or mount_cap(),
            readonly=readonly), self.ctx)

    def unpublish(self, target, vol=VOL1):
        return self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol, target_path=self.path(target)), self.ctx)

    def stats(self, path, vol=VOL1):
        return self.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vol, volume_path=self.path(path)), self.ctx)

    def expand(self, path, required, vol=VOL1, cap=None):
        req = csi_pb2.NodeExpandVolumeRequest(
            volume_id=vol, volume_path=self.path(path),
            capacity_range=csi_pb2.CapacityRange(required_bytes=required))
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        return self.node.NodeExpandVolume(req, self.ctx)


def make_env(tmp_path):
    """The ``env`` fixture's body (shared with test_node_readonly_block.py)."""
    loopdev.require_loop()
    e = Env(tmp_path)
    yield e
    e.loops.cleanup()
    for dev in e.loops.devices:     # read-only loops a failed test left behind
        for loop in ReadOnlyLoops(str(tmp_path / "x")).loops_backed_by(dev):
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


@pytest.fixture
def env(tmp_path):
    yield from make_env(tmp_path)


def code_of(fn, *args, **kw):
    with pytest.raises(RpcError) as err:
        fn(*args, **kw)
    return err.value.code


def mounted(env, name):
    return Mounter().mounted_at(env.path(name))


# --- mount volumes -------------------------------------------------------------------
def test_mount_lifecycle(env):
    dev, _ = env.export()
    env.stage()
    env.stage()                                          # idempotent
    st = mounted(env, "staging")
    assert st.source == dev and st.fstype == "ext4"
    env.publish("pod1/vol")
    env.publish("pod1/vol")                              # idempotent
    (env.tmp / "pod1/vol/hello").write_text("hi")
    env.publish("pod2/vol", readonly=True)
    assert mounted(env, "pod2/vol").readonly
    assert (env.tmp / "pod2/vol/hello").read_text() == "hi"
    with pytest.raises(OSError):
        (env.tmp / "pod2/vol/nope").write_text("x")
    # Same target, other readonly-ness: incompatible.
    assert code_of(env.publish, "pod2/vol") == grpc.StatusCode.ALREADY_EXISTS

    stats = env.stats("pod1/vol")
    units = {u.unit: u for u in stats.usage}
    assert units[csi_pb2.VolumeUsage.BYTES].total > 50 * MiB
    assert units[csi_pb2.VolumeUsage.INODES].used >= 12
    assert not stats.volume_condition.abnormal

    for target in ("pod1/vol", "pod2/vol"):
        env.unpublish(target)
        env.unpublish(target)                            # idempotent
        assert not os.path.exists(env.path(target))
    env.unstage()
    env.unstage()                                        # idempotent
    assert mounted(env, "staging") is None
    nqn = contract.subsystem_nqn(UUID1)
    assert ("disconnect", nqn) in env.ini.calls
    assert not os.listdir(os.path.join(env.state, "volumes"))


def test_existing_data_is_not_reformatted(env):
    dev, _ = env.export()
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    tmpmnt = env.tmp / "pre"
    tmpmnt.mkdir()
    subprocess.run(["mount", dev, str(tmpmnt)], check=True)
    (tmpmnt / "precious").write_text("data")
    subprocess.run(["umount", str(tmpmnt)], check=True)
    env.stage(cap=mount_cap(fs=""))
    assert (env.tmp / "staging/precious").read_text() == "data"


def test_foreign_signature_refused(env):
    if not loopdev.have("mkswap"):
        pytest.skip("needs mkswap")
    dev, _ = env.export()
    subprocess.run(["mkswap", dev], check=True, capture_output=True)
    assert code_of(env.stage) == grpc.StatusCode.FAILED_PRECONDITION
    assert mounted(env, "staging") is None


def test_mount_flags_applied(env):
    env.export()
    env.stage(cap=mount_cap(flags=["noatime", "nodiscard"]))
    assert "noatime" in mounted(env, "staging").options


def test_xfs_stage_and_expand(env):
    if not (loopdev.have("mkfs.xfs") and loopdev.have("xfs_growfs")):
        pytest.skip("needs xfsprogs")
    dev, backing = env.export(size=320 * MiB)
    env.stage(cap=mount_cap("xfs"))
    env.publish("pod/vol", cap=mount_cap("xfs"))
    before = env.stats("pod/vol").usage[0].total
    env.loops.grow(dev, backing, 640 * MiB)
    resp = env.expand("pod/vol", 640 * MiB)
    assert resp.capacity_bytes == 640 * MiB
    assert ("rescan", contract.subsystem_nqn(UUID1)) in env.ini.calls
    assert env.stats("pod/vol").usage[0].total > before + 250 * MiB


def test_storageclass_fstype_from_volume_context(env):
    if not loopdev.have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    dev, _ = env.export(size=320 * MiB)
    env.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, publish_context=pc(UUID1), staging_target_path=env.path("staging"),
        volume_context={contract.VC_FS_TYPE: "xfs"}, volume_capability=mount_cap(fs="")),
        env.ctx)
    probe = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev],
                           capture_output=True, text=True, check=False)
    assert probe.stdout.strip() == "xfs"
    env.unstage()


def test_xfs_volume_too_small_is_a_clear_failed_precondition(env):
    if not loopdev.have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    dev, _ = env.export(size=64 * MiB)
    with pytest.raises(RpcError) as err:
        env.stage(cap=mount_cap("xfs"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "xfs needs at least" in err.value.message and "300 MiB" in err.value.message
    assert mounted(env, "staging") is None
    assert Mounter().probe(dev).empty                    # the device was not touched
    env.unstage()                                        # still cleans up (disconnects)
    assert env.ini.calls[-1] == ("disconnect", contract.subsystem_nqn(UUID1))


def test_ext4_expand(env):
    if not loopdev.has_cap(loopdev.CAP_SYS_RESOURCE):
        pytest.skip("online resize2fs needs CAP_SYS_RESOURCE, which this process lacks")
    dev, backing = env.export()
    env.stage()
    env.loops.grow(dev, backing, 128 * MiB)
    assert env.expand("staging", 128 * MiB).capacity_bytes == 128 * MiB


def test_expand_waits_then_gives_up_when_device_did_not_grow(env, monkeypatch):
    from csi_spdk.node import expand
    monkeypatch.setattr(expand, "EXPAND_WAIT", 0.2)
    env.export()
    env.stage()
    assert code_of(env.expand, "staging", 128 * MiB) == grpc.StatusCode.UNAVAILABLE


def test_publish_onto_foreign_mount_is_an_error(env):
    env.export()
    env.export(UUID2)
    env.stage()
    env.stage(VOL2, UUID2, staging="staging2")
    env.publish("pod/vol", vol=VOL2, staging="staging2")
    assert code_of(env.publish, "pod/vol") == grpc.StatusCode.FAILED_PRECONDITION


def test_publish_requires_stage(env):
    assert code_of(env.publish, "pod/vol") == grpc.StatusCode.FAILED_PRECONDITION


def test_stage_over_foreign_mount_is_an_error(env):
    other, _ = env.export(UUID2)
    env.export()
    subprocess.run(["mkfs.ext4", "-q", other], check=True)
    os.makedirs(env.path("staging"))
    subprocess.run(["mount", other, env.path("staging")], check=True)
    assert code_of(env.stage) == grpc.StatusCode.FAILED_PRECONDITION


# --- block volumes -----------------------------------------------------------------------
def test_block_lifecycle(env):
    dev, backing = env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    assert mounted(env, "staging") is None               # nothing to mount for block
    env.publish("pod/dev", cap=cap)
    env.publish("pod/dev", cap=cap)                      # idempotent
    target = env.path("pod/dev")
    assert os.path.isfile(target) or Mounter.is_block(target)
    assert os.stat(target).st_rdev == os.stat(dev).st_rdev
    env.publish("pod2/dev", cap=cap, readonly=True)
    assert mounted(env, "pod2/dev").readonly
    stats = env.stats("pod/dev")
    assert [u.total for u in stats.usage] == [16 * MiB]
    env.loops.grow(dev, backing, 32 * MiB)
    assert env.expand("pod/dev", 32 * MiB, cap=cap).capacity_bytes == 32 * MiB
    # Staged as block, published as mount: incompatible.
    assert code_of(env.publish, "pod3/vol") == grpc.StatusCode.ALREADY_EXISTS
    env.unpublish("pod/dev")
    env.unpublish("pod2/dev")
    assert not os.path.lexists(target)
    env.unstage()
    assert ("disconnect", contract.subsystem_nqn(UUID1)) in env.ini.calls


# --- stats / condition -----------------------------------------------------------------------
def test_stats_condition_and_not_found(env):
    env.export()
    env.stage()
    env.publish("pod/vol")
    assert code_of(env.stats, "pod/vol", vol=VOL2) == grpc.StatusCode.NOT_FOUND
    assert code_of(env.stats, "nowhere") == grpc.StatusCode.NOT_FOUND
    env.ini.live = False
    cond = env.stats("pod/vol").volume_condition
    assert cond.abnormal and "live" in cond.message
    env.ini.live = True
    os.makedirs(env.path("plain"))
    cond = env.stats("plain").volume_condition
    assert cond.abnormal and "not mounted" in cond.message
    assert code_of(env.expand, "pod/vol", 1, vol=VOL2) == grpc.StatusCode.NOT_FOUND


# --- concurrency, restart, vanished devices ------------------------------------------------
def test_same_volume_twice_is_aborted(env):
    env.export()
    env.export(UUID2)
    env.ini.gate = threading.Event()
    errors = []

    def first():
        try:
            env.stage()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=first)
    t.start()
    assert env.ini.entered.wait(5)
    assert code_of(env.stage) == grpc.StatusCode.ABORTED
    assert code_of(env.unstage) == grpc.StatusCode.ABORTED
    env.ini.gate.set()            # a different volume is not blocked by the first
    env.stage(VOL2, UUID2, staging="staging2")
    t.join(10)
    assert not errors
    assert mounted(env, "staging") is not None


def test_unstage_after_restart(env):
    env.export()
    env.stage()
    env.publish("pod/vol")
    env.node = env.new_node()         # plugin restarted: new servicer, same state_dir
    env.unpublish("pod/vol")
    env.unstage()
    assert mounted(env, "staging") is None
    assert env.ini.calls[-1] == ("disconnect", contract.subsystem_nqn(UUID1))


def test_unstage_without_record_uses_derived_nqn(env):
    env.unstage()
    assert env.ini.calls == [("disconnect", contract.subsystem_nqn(UUID1))]
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="not-a-csi-spdk-id", staging_target_path=env.path("x")), env.ctx)


def test_unstage_when_device_vanished(env):
    dev, _ = env.export()
    env.stage()
    subprocess.run(["umount", "-l", env.path("staging")], check=True)
    subprocess.run(["losetup", "-d", dev], check=True)
    env.unstage()
    assert not os.listdir(os.path.join(env.state, "volumes"))


def test_failed_connect_leaves_record_for_unstage(env):
    assert code_of(env.stage) == grpc.StatusCode.UNAVAILABLE     # nothing exported
    env.unstage()
    assert env.ini.calls[-1] == ("disconnect", contract.subsystem_nqn(UUID1))


# --- guards and info ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,request_", [
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        staging_target_path="/x", volume_capability=mount_cap(), publish_context=pc())),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, volume_capability=mount_cap(), publish_context=pc())),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, staging_target_path="/x", publish_context=pc())),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, staging_target_path="/x", volume_capability=mount_cap())),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, staging_target_path="/x", volume_capability=mount_cap("btrfs"),
        publish_context=pc())),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, staging_target_path="/x", publish_context=pc(),
        volume_capability=mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER))),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL1)),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(staging_target_path="/x")),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        volume_id=VOL1, staging_target_path="/x", volume_capability=mount_cap())),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        volume_id=VOL1, target_path="/y", volume_capability=mount_cap())),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        volume_id=VOL1, target_path="/y", staging_target_path="/x")),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        target_path="/y", staging_target_path="/x", volume_capability=mount_cap())),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL1)),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(target_path="/y")),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_path="/y")),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL1)),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_path="/y")),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id=VOL1)),
])
def test_argument_guards(tmp_path, method, request_):
    node = NodeServicer("worker-1", str(tmp_path), FakeInitiator())
    with pytest.raises(RpcError) as err:
        getattr(node, method)(request_, Ctx())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_capabilities_and_info(tmp_path):
    node = NodeServicer("worker-1", str(tmp_path), FakeInitiator(), max_volumes=5)
    caps = node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), Ctx())
    RPC = csi_pb2.NodeServiceCapability.RPC
    assert {RPC.Type.Name(c.rpc.type) for c in caps.capabilities} == {
        "STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME", "VOLUME_CONDITION",
        "SINGLE_NODE_MULTI_WRITER"}
    info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), Ctx())
    assert info.node_id == "worker-1" and info.max_volumes_per_node == 5
    assert dict(info.accessible_topology.segments) == {contract.TOPOLOGY_NODE_KEY: "worker-1"}


def test_host_identity_files(tmp_path, caplog):
    NodeServicer("worker-1", str(tmp_path), FakeInitiator())
    assert (tmp_path / "hostnqn").read_text().strip() == contract.host_nqn("worker-1")
    assert (tmp_path / "hostid").read_text().strip() == contract.host_id("worker-1")
    (tmp_path / "hostnqn").write_text("nqn.2014-08.org.nvmexpress:uuid:other\n")
    with caplog.at_level(logging.WARNING, logger="csi_spdk.node"):
        NodeServicer("worker-1", str(tmp_path), FakeInitiator())
    assert "disagrees" in caplog.text
    assert (tmp_path / "hostnqn").read_text().strip() == contract.host_nqn("worker-1")
