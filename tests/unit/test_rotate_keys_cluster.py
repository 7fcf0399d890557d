"""``csi-spdk rotate-keys`` in a cluster (controller/rotate_nodes.py): no
call to a node. The nodes here act as kubelet's republish does: each reads
the volume's Secret as kubelet hands it over (``MemorySecrets.secret_data``:
keys, ``next.*``, ``rotationStep``), derives the target's pair from it with
the node's own code (``contract.rotation_pair``), re-keys (asserting, as
test_rotate_keys.FakeNodes does, that it is asked only for the pair the
target's host entry holds and changes one secret at a time) and
acknowledges the fingerprints; the real ``ClusterNodeSync`` waits for the
acknowledgements. A node that never republishes makes the step time out
naming it, with everything pending; a rerun resumes. Kills before every
target change, Secret step and wait converge on a rerun. The ConfigMap watch
itself runs on a real API server in tests/e2e/k8s/test_node_acks.py."""

from __future__ import annotations

import time

import pytest
from test_rotate_keys import NODES, FakeNodes, _assert_rotated, _published, killed_before

from csi_spdk import contract
from csi_spdk.controller.auth import VolumeKeys
from csi_spdk.controller.rotate import rotate
from csi_spdk.controller.rotate_nodes import ClusterNodeSync
from csi_spdk.errors import Unavailable


class RepublishingNodes(FakeNodes):
    """Nodes that learn the pair only from the Secret (kubelet's republish)."""

    def __init__(self, env, uuid: str) -> None:
        super().__init__(env, uuid)
        self.acks: dict[str, str] = {}          # node -> fingerprints acknowledged
        self.down: set[str] = set()
        self.republishes = 0
        self.crash_wait_at = 0
        self.waits = 0

    def republish(self, node: str) -> None:
        if node in self.down:
            return
        self.republishes += 1
        data = self.env.secrets.secret_data(self.uuid)
        host, ctrl = contract.rotation_pair(data)
        if (host, ctrl) != self.pairs[node]:
            super().__call__("", node, contract.host_nqn(node), VolumeKeys(host, ctrl))
        self.acks[node] = contract.pair_fingerprint(host, ctrl)

    # the AckWatch: kubelet republishes while the controller waits
    def wait(self, node: str, lvol_uuid: str, want: str, deadline: float) -> bool:
        self.waits += 1
        if self.crash_wait_at and self.waits == self.crash_wait_at:
            raise RuntimeError("killed while waiting")
        assert lvol_uuid == self.uuid
        while True:
            self.republish(node)
            if self.acks.get(node) == want:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _cluster(tmp_path, timeout=5.0):
    env, vol, uuid, old, _ = _published(tmp_path)
    nodes = RepublishingNodes(env, uuid)
    nodes.pairs = {n: (old.dhchap_key, old.dhchap_ctrl_key) for n in NODES}
    return env, vol, uuid, old, nodes, ClusterNodeSync(nodes, timeout)


def _rotate(env, vol, sync):
    target, lv = env.servicer.targets.volume(vol.volume_id)
    return rotate(target, lv, env.servicer.auth, sync, lambda h: contract.node_of_host(h) or h)


def test_waits_for_every_node_each_step(tmp_path):
    env, vol, uuid, old, nodes, sync = _cluster(tmp_path)
    try:
        out = _rotate(env, vol, sync)
        assert sorted(out.hosts) == sorted(NODES) and not out.resumed
        _assert_rotated(env, uuid, old, nodes)
        assert nodes.calls == 2 * len(NODES)        # one re-key per node and step
        new = env.secrets.get(uuid)
        assert nodes.acks == {n: contract.pair_fingerprint(new.dhchap_key, new.dhchap_ctrl_key)
                              for n in NODES}
        data = env.secrets.secret_data(uuid)        # committed: no step, nothing next
        assert contract.SECRET_ROTATION_STEP not in data
        assert not [k for k in data if k.startswith(contract.SECRET_NEXT_PREFIX)]
    finally:
        env.close()


def test_times_out_naming_the_lagging_node_then_resumes(tmp_path):
    env, vol, uuid, old, nodes, sync = _cluster(tmp_path, timeout=0.5)
    try:
        nodes.down = {"node-b"}
        with pytest.raises(Unavailable) as err:
            _rotate(env, vol, sync)
        msg = err.value.message
        assert "node-b" in msg and "node-a" not in msg and "step 1 of 2" in msg, msg
        assert "run rotate-keys again" in msg
        pending = env.secrets.pending(uuid)
        assert pending is not None and env.secrets.get(uuid) == old   # nothing committed
        assert env.secrets.steps[uuid] == 1
        n_h = pending.names(uuid)["dhchap_key"]
        o_c = old.names(uuid)["dhchap_ctrlr_key"]
        sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
        assert {(h["dhchap_key"], h["dhchap_ctrlr_key"]) for h in sub["hosts"]} == {(n_h, o_c)}
        assert nodes.pairs["node-a"] == (pending.dhchap_key, old.dhchap_ctrl_key)
        assert nodes.pairs["node-b"] == (old.dhchap_key, old.dhchap_ctrl_key)
        nodes.down = set()                          # node-b's plugin is back
        out = _rotate(env, vol, sync)
        assert out.resumed and env.secrets.get(uuid) == pending
        _assert_rotated(env, uuid, old, nodes)
    finally:
        env.close()


def test_a_node_lagging_at_step_two_names_it_too(tmp_path):
    env, vol, uuid, old, nodes, sync = _cluster(tmp_path, timeout=0.5)
    try:
        orig = nodes.wait

        def wait(node, lvol_uuid, want, deadline):
            if env.secrets.steps.get(uuid) == 2:
                nodes.down = {"node-a"}
            return orig(node, lvol_uuid, want, deadline)
        nodes.wait = wait
        with pytest.raises(Unavailable, match=r"step 2 of 2 is pending: node-a did not"):
            _rotate(env, vol, sync)
        assert env.secrets.steps[uuid] == 2 and env.secrets.pending(uuid) is not None
        nodes.wait, nodes.down = orig, set()
        assert _rotate(env, vol, sync).resumed
        _assert_rotated(env, uuid, old, nodes)
    finally:
        env.close()


# per run with two nodes: 2 key puts, 4 set_keys, 2 Secret steps, 2 old-key removals
STEPS = 10


@pytest.mark.parametrize("nth", range(1, STEPS + 1))
def test_crash_before_a_target_or_secret_step_then_rerun(tmp_path, nth):
    env, vol, uuid, old, nodes, sync = _cluster(tmp_path)
    try:
        with killed_before(env, nth, secret_steps=True) as seen, \
                pytest.raises(RuntimeError, match="killed"):
            _rotate(env, vol, sync)
        assert seen["n"] == nth
        pending = env.secrets.pending(uuid)
        out = _rotate(env, vol, sync)
        if pending is not None:
            assert out.resumed and env.secrets.get(uuid) == pending
        _assert_rotated(env, uuid, old, nodes)
    finally:
        env.close()


@pytest.mark.parametrize("nth", range(1, 2 * len(NODES) + 1))
def test_crash_while_waiting_for_a_node_then_rerun(tmp_path, nth):
    env, vol, uuid, old, nodes, sync = _cluster(tmp_path)
    try:
        nodes.crash_wait_at = nth
        with pytest.raises(RuntimeError, match="killed while waiting"):
            _rotate(env, vol, sync)
        nodes.crash_wait_at = 0
        assert _rotate(env, vol, sync).resumed
        _assert_rotated(env, uuid, old, nodes)
    finally:
        env.close()


def test_a_publish_mid_rotation_gets_the_steps_pair(tmp_path):
    """external-attacher hands ControllerPublishVolume the Secret as it is:
    at step 1 a newly published node's host entry gets (next, current), the
    pair that node derives from the same Secret, so the rotation's rerun
    finds it consistent."""
    from controller_fixtures import call, publish_req
    env, vol, uuid, old, nodes, sync = _cluster(tmp_path, timeout=0.3)
    try:
        nodes.down = {"node-b"}
        with pytest.raises(Unavailable):
            _rotate(env, vol, sync)
        pending = env.secrets.pending(uuid)
        req = publish_req(vol.volume_id, "node-c")
        req.volume_context.update(vol.volume_context)
        req.secrets.update(env.secrets.secret_data(uuid))
        from csi_spdk.proto import csi_pb2
        am = csi_pb2.VolumeCapability.AccessMode
        req.volume_capability.CopyFrom(csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(),
            access_mode=am(mode=am.MULTI_NODE_MULTI_WRITER)))
        call(env.servicer, "ControllerPublishVolume", req)
        sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
        entry = next(h for h in sub["hosts"] if h["nqn"] == contract.host_nqn("node-c"))
        assert (entry["dhchap_key"], entry["dhchap_ctrlr_key"]) == (
            pending.names(uuid)["dhchap_key"], old.names(uuid)["dhchap_ctrlr_key"])
    finally:
        env.close()


def test_the_command_picks_the_cluster_sync_for_kubernetes_secrets():
    """rotate-keys without --node: with the Kubernetes Secret store, the
    acknowledgement watch on the store's API and namespace; with a store that
    cannot say a step (static dev keys, a test's), none (published volumes
    are then refused before anything changes: test_rotate_keys)."""
    pytest.importorskip("kubernetes")
    from controller_fixtures import MemorySecrets

    from csi_spdk.controller.k8s_secrets import KubernetesSecrets
    from csi_spdk.controller.rotate_cli import cluster_sync
    api = object()
    sync = cluster_sync(KubernetesSecrets("csi-spdk", api=api), 42.0)
    assert isinstance(sync, ClusterNodeSync) and sync.timeout == 42.0
    assert sync.acks.api is api and sync.acks.namespace == "csi-spdk"
    assert sync.reaches("any-node")
    assert cluster_sync(MemorySecrets(), 42.0) is None and cluster_sync(None, 1.0) is None
