"""Key rotation through kubelet's republish (node/rekey.py): NodePublishVolume
of a published volume, called again with the volume's Secret as kubelet
fetches it (``rotationStep`` and ``next.*`` during a rotation), re-keys the
live controller to the pair the target holds and acknowledges its
fingerprints; with nothing changed it touches neither sysfs nor the kernel
log nor the API. The NodeServicer is real (real loop device, real bind
mount); the controller's re-keying is the real initiator code on a fake
sysfs whose fake kernel answers each write as the real one logs it
(test_node_reauth.FakeKernel); the Kubernetes API behind the
acknowledgements is tests/e2e/k8s/test_node_acks.py."""

from __future__ import annotations

import grpc
import pytest
from test_node import UUID1 as UUID
from test_node import VOL1 as VOL
from test_node import RpcError, block_cap, make_env, pc
from test_node_reauth import FakeKernel

from csi_spdk import contract, nvme_keys
from csi_spdk.errors import Unavailable
from csi_spdk.node import reauth
from csi_spdk.node.initiator import NvmeTcpInitiator
from csi_spdk.node.service import NodeServicer
from csi_spdk.proto import csi_pb2

NQN = contract.subsystem_nqn(UUID)


class FakeAcks:
    """What node/acks.py ConfigMapAcks writes, in a dict."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.calls = 0
        self.fail = False

    def record(self, lvol_uuid: str, pair: str) -> None:
        self.calls += 1
        if self.fail:
            raise Unavailable("Kubernetes API: patching ConfigMap failed (503)")
        self.data[lvol_uuid] = pair

    def forget(self, lvol_uuid: str) -> None:
        self.data.pop(lvol_uuid, None)


def _k() -> str:
    return nvme_keys.generate_dhchap_key().text


@pytest.fixture
def rig(tmp_path, monkeypatch):
    gen = make_env(tmp_path)
    env = next(gen)
    keys = {n: _k() for n in ("h1", "c1", "h2", "c2")}
    sysfs = tmp_path / "sys"
    kernel = FakeKernel(sysfs, "nvme0", keys["h1"], keys["c1"])
    (kernel.dir / "subsysnqn").write_text(NQN + "\n")
    (kernel.dir / "state").write_text("live\n")
    monkeypatch.setattr(reauth, "settle", lambda path, timeout: kernel.idle.wait(timeout))
    real = NvmeTcpInitiator(contract.host_nqn("worker-1"), contract.host_id("worker-1"),
                            sysfs_root=str(sysfs), use_udev=False)
    env.ini.rekey = real.rekey      # the fake initiator's connect, the real re-keying
    acks = FakeAcks()
    env.node = NodeServicer("worker-1", env.state, env.ini, env.node.mounter, acks=acks)
    opened = []
    orig = reauth.KernelLog.__init__

    def counting(self, *a, **kw):
        opened.append(1)
        orig(self, *a, **kw)
    monkeypatch.setattr(reauth.KernelLog, "__init__", counting)
    env.export()
    env.kernel, env.keys, env.acks, env.kmsg_opened = kernel, keys, acks, opened
    try:
        yield env
    finally:
        kernel.stop()
        with pytest.raises(StopIteration):
            next(gen)


def _pc():
    return {**pc(), contract.PC_AUTH: contract.AUTH_DHCHAP}


def secret(env, step: str = "", committed: bool = False) -> dict[str, str]:
    """The volume's Secret data as kubelet hands it over."""
    k = env.keys
    if committed:
        return {contract.SECRET_DHCHAP_KEY: k["h2"], contract.SECRET_DHCHAP_CTRL_KEY: k["c2"]}
    out = {contract.SECRET_DHCHAP_KEY: k["h1"], contract.SECRET_DHCHAP_CTRL_KEY: k["c1"]}
    if step:
        out.update({"next." + contract.SECRET_DHCHAP_KEY: k["h2"],
                    "next." + contract.SECRET_DHCHAP_CTRL_KEY: k["c2"],
                    contract.SECRET_ROTATION_STEP: step})
    return out


def stage(env, secrets):
    return env.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL, publish_context=_pc(), staging_target_path=env.path("staging"),
        volume_capability=block_cap(), secrets=secrets), env.ctx)


def publish(env, secrets):
    return env.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=VOL, publish_context=_pc(), staging_target_path=env.path("staging"),
        target_path=env.path("pod"), volume_capability=block_cap(), secrets=secrets), env.ctx)


def fp(env, h: str, c: str) -> str:
    return contract.pair_fingerprint(env.keys[h], env.keys[c])


def published(env) -> bool:
    return env.node.mounter.mounted_at(env.path("pod")) is not None


def test_republish_is_cheap_when_nothing_changed(rig):
    stage(rig, secret(rig))
    assert rig.acks.data == {UUID: fp(rig, "h1", "c1")}    # acknowledged at stage
    publish(rig, secret(rig))
    calls = rig.acks.calls
    for _ in range(5):                                      # kubelet, once a minute
        publish(rig, secret(rig))
    assert published(rig)
    assert rig.kernel.writes == [] and rig.kmsg_opened == []   # no sysfs write, no kmsg
    assert rig.acks.calls == calls == 1                     # and no API call


def test_republish_follows_the_rotation_and_acknowledges(rig):
    stage(rig, secret(rig))
    publish(rig, secret(rig))
    rig.kernel.target = (rig.keys["h2"], rig.keys["c1"])   # the controller moved the target
    publish(rig, secret(rig, step="1"))                     # ... then said so in the Secret
    assert rig.kernel.writes == [("host", rig.keys["h2"])]
    assert rig.acks.data[UUID] == fp(rig, "h2", "c1")
    opened = len(rig.kmsg_opened)
    publish(rig, secret(rig, step="1"))                     # the next minute: nothing to do
    assert len(rig.kmsg_opened) == opened and len(rig.kernel.writes) == 1
    rig.kernel.target = (rig.keys["h2"], rig.keys["c2"])
    publish(rig, secret(rig, step="2"))
    assert rig.kernel.writes == [("host", rig.keys["h2"]), ("ctrl", rig.keys["c2"])]
    assert rig.acks.data[UUID] == fp(rig, "h2", "c2")
    calls = rig.acks.calls
    publish(rig, secret(rig, committed=True))               # committed: the same pair
    assert rig.acks.calls == calls and len(rig.kernel.writes) == 2
    assert rig.kernel._state() == (rig.keys["h2"], rig.keys["c2"])
    assert published(rig)
    # a restarted node plugin knows what it acknowledged (the stage record)
    again = NodeServicer("worker-1", rig.state, rig.ini, rig.node.mounter, acks=rig.acks)
    rig.node = again
    publish(rig, secret(rig, committed=True))
    assert rig.acks.calls == calls and len(rig.kernel.writes) == 2


def test_a_pair_the_target_does_not_hold_is_refused_and_undone(rig):
    stage(rig, secret(rig))
    publish(rig, secret(rig))
    # the Secret says step 1 but the target still holds the current pair
    with pytest.raises(RpcError) as err:
        publish(rig, secret(rig, step="1"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "does not hold that key pair" in err.value.message
    for v in rig.keys.values():
        assert v.split(":")[2] not in err.value.message
    assert rig.kernel._state() == (rig.keys["h1"], rig.keys["c1"])   # written back
    assert rig.acks.data[UUID] == fp(rig, "h1", "c1")                # nothing acknowledged
    assert published(rig)                                            # the Pod keeps its volume
    # once the target moved, the next republish converges
    rig.kernel.target = (rig.keys["h2"], rig.keys["c1"])
    publish(rig, secret(rig, step="1"))
    assert rig.acks.data[UUID] == fp(rig, "h2", "c1")


def test_a_lost_acknowledgement_is_retried_on_the_next_republish(rig):
    stage(rig, secret(rig))
    publish(rig, secret(rig))
    rig.kernel.target = (rig.keys["h2"], rig.keys["c1"])
    rig.acks.fail = True
    publish(rig, secret(rig, step="1"))       # re-keyed; the API did not take the ack
    assert rig.kernel.writes == [("host", rig.keys["h2"])] and UUID in rig.acks.data
    assert rig.acks.data[UUID] == fp(rig, "h1", "c1")
    rig.acks.fail = False
    publish(rig, secret(rig, step="1"))       # no second write, the ack goes through
    assert rig.kernel.writes == [("host", rig.keys["h2"])]
    assert rig.acks.data[UUID] == fp(rig, "h2", "c1")


def test_stage_mid_rotation_connects_with_the_targets_pair(rig):
    """A node that (re)stages while a rotation is at step 1 connects with (next
    host, current controller) and acknowledges it; a malformed step is
    INVALID_ARGUMENT before anything is recorded."""
    seen = []
    orig = rig.ini.connect

    def connect(p, timeout=30.0, secrets=None):
        seen.append(dict(secrets))
        return orig(p, timeout, secrets)
    rig.ini.connect = connect
    bad = {**secret(rig, step="1"), contract.SECRET_ROTATION_STEP: "3"}
    with pytest.raises(RpcError) as err:
        stage(rig, bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and not seen
    assert rig.node.store.load(VOL) is None
    stage(rig, secret(rig, step="1"))
    assert seen[-1][contract.SECRET_DHCHAP_KEY] == rig.keys["h2"]
    assert seen[-1][contract.SECRET_DHCHAP_CTRL_KEY] == rig.keys["c1"]
    assert rig.acks.data == {UUID: fp(rig, "h2", "c1")}
    rig.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=VOL, staging_target_path=rig.path("staging")), rig.ctx)
    assert rig.acks.data == {}                # unstaged: its acknowledgement goes
