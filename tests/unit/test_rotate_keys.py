"""``csi-spdk rotate-keys`` (controller/rotate.py) on the simulator: the
two-step rotation moves target and node in lock-step, and the node is only
ever asked for the pair the target holds at that moment (the property that
keeps a live connection authenticated at every single re-authentication);
afterwards the host entry names only the new keys, the keyring holds only
them, the Secret store's keys are the new ones and nothing is pending. A
crash at any SPDK call or node step, then a rerun, converges to the same
state with the keys the interrupted run chose. The real kernel part is in
tests/e2e/test_guest_auth.py."""

from __future__ import annotations

import contextlib

import pytest
from controller_fixtures import call, create_req, make_env, publish_req, uuid_of

from csi_spdk import contract
from csi_spdk.controller.auth import VolumeKeys
from csi_spdk.controller.rotate import rotate
from csi_spdk.errors import FailedPrecondition

NODES = ("node-a", "node-b")


class FakeNodes:
    """The nodes' live controllers: each holds a key pair; a sync must bring
    exactly the pair the target's host entry holds right now."""

    def __init__(self, env, uuid: str, fail_at: int = 0) -> None:
        self.env, self.uuid = env, uuid
        self.pairs: dict[str, tuple[str, str]] = {}
        self.calls = 0
        self.fail_at = fail_at

    def target_pair(self, host: str) -> tuple[str, str]:
        sub = self.env.t0.raw.subsystem_get(contract.subsystem_nqn(self.uuid))
        entry = next(h for h in sub["hosts"] if h["nqn"] == host)
        ring = {k["name"]: k["path"] for k in self.env.t0.raw.keyring_keys()}

        def material(name: str) -> str:
            with open(ring[name]) as f:
                return f.read().strip()
        return material(entry["dhchap_key"]), material(entry["dhchap_ctrlr_key"])

    def reaches(self, node: str) -> bool:
        return node in NODES

    def __call__(self, volume_id: str, node: str, host: str, keys: VolumeKeys) -> None:
        self.calls += 1
        if self.fail_at and self.calls == self.fail_at:
            raise RuntimeError("node crashed")
        want = (keys.dhchap_key, keys.dhchap_ctrl_key)
        have = self.pairs[node]
        assert want == self.target_pair(host), "node asked for a pair the target does not hold"
        assert sum(a != b for a, b in zip(have, want, strict=True)) <= 1, \
            "two secrets changed in one step"
        self.pairs[node] = want


def _published(tmp_path, nodes=NODES):
    env = make_env(tmp_path)
    vol = call(env.servicer, "CreateVolume", create_req("v-rot")).volume
    uuid = uuid_of(vol.volume_id)
    old = env.secrets.get(uuid)
    from csi_spdk.proto import csi_pb2
    am = csi_pb2.VolumeCapability.AccessMode
    cap = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                   access_mode=am(mode=am.MULTI_NODE_MULTI_WRITER))
    for node in nodes:
        req = publish_req(vol.volume_id, node, cap=cap)
        req.volume_context.update(vol.volume_context)
        call(env.servicer, "ControllerPublishVolume", req)
    fake = FakeNodes(env, uuid)
    fake.pairs = {n: (old.dhchap_key, old.dhchap_ctrl_key) for n in nodes}
    return env, vol, uuid, old, fake


def _rotate(env, vol, fake):
    target, lv = env.servicer.targets.volume(vol.volume_id)
    return rotate(target, lv, env.servicer.auth, fake,
                  lambda h: contract.node_of_host(h) or h)


def _assert_rotated(env, uuid, old, fake, nodes=NODES):
    new = env.secrets.get(uuid)
    assert env.secrets.pending(uuid) is None
    assert (new.dhchap_key, new.dhchap_ctrl_key) != (old.dhchap_key, old.dhchap_ctrl_key)
    assert new.dhchap_key != old.dhchap_key and new.dhchap_ctrl_key != old.dhchap_ctrl_key
    names = new.names(uuid)
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert sorted(h["nqn"] for h in sub["hosts"]) == sorted(contract.host_nqn(n) for n in nodes)
    for h in sub["hosts"]:
        assert {k: h[k] for k in names} == names, h          # old keys refused from now on
    ring = sorted(k["name"] for k in env.t0.raw.keyring_keys()
                  if k["name"].startswith(f"csik-{uuid}-") and not k.get("removed"))
    assert ring == sorted(names.values()), ring              # old keys gone from the target
    for node in nodes:
        assert fake.pairs[node] == (new.dhchap_key, new.dhchap_ctrl_key)


def test_rotation_two_steps_in_lock_step(tmp_path):
    env, vol, uuid, old, fake = _published(tmp_path)
    try:
        out = _rotate(env, vol, fake)
        assert sorted(out.hosts) == sorted(NODES) and not out.resumed
        assert fake.calls == 2 * len(NODES)
        _assert_rotated(env, uuid, old, fake)
        # a publish after the rotation hands out the new keys
        assert env.secrets.get(uuid).names(uuid) == \
            {k: v for k, v in env.t0.raw.subsystem_get(
                contract.subsystem_nqn(uuid))["hosts"][0].items() if k != "nqn"}
    finally:
        env.close()


# per run with two nodes: 2 key puts, 4 set_keys, 2 old-key removals
STEPS = 8


@contextlib.contextmanager
def killed_before(env, nth: int, secret_steps: bool = False):
    """The rotation is killed (RuntimeError) before the nth change on the
    target (key custody or SPDK set_keys) or, with ``secret_steps``, in the
    Secret (``rotationStep``); everything is restored on leaving. Yields the
    count of changes seen."""
    api = env.t0.api
    custody = env.servicer.auth.custody(env.t0.name)
    seen = {"n": 0}
    originals = (api.call, custody.put, custody.delete, env.secrets.set_step)

    def maybe_crash(what: str) -> None:
        seen["n"] += 1
        if seen["n"] == nth:
            raise RuntimeError(f"killed before {what}")

    def call(method, params=None, timeout=None):
        if method == "nvmf_subsystem_set_keys":
            maybe_crash(method)
        return originals[0](method, params, timeout)

    def put(name, material):
        maybe_crash("put")
        return originals[1](name, material)

    def delete(name):
        maybe_crash("delete")
        return originals[2](name)

    def set_step(lvol_uuid, step):
        if secret_steps:
            maybe_crash(f"rotationStep {step}")
        return originals[3](lvol_uuid, step)
    api.call, custody.put, custody.delete, env.secrets.set_step = call, put, delete, set_step
    try:
        yield seen
    finally:
        api.call, custody.put, custody.delete, env.secrets.set_step = originals


@pytest.mark.parametrize("nth", range(1, STEPS + 1))
def test_crash_at_a_target_step_then_rerun(tmp_path, nth):
    """A kill before the nth change on the target (key custody or SPDK call)."""
    env, vol, uuid, old, fake = _published(tmp_path)
    try:
        with killed_before(env, nth) as seen, pytest.raises(RuntimeError, match="killed"):
            _rotate(env, vol, fake)
        assert seen["n"] == nth
        pending = env.secrets.pending(uuid)
        out = _rotate(env, vol, fake)
        if pending is not None:                        # not yet committed
            assert out.resumed
            assert env.secrets.get(uuid) == pending    # the interrupted run's keys
        _assert_rotated(env, uuid, old, fake)          # (else killed in the final clean-up:
    finally:                                           # the rerun rotated once more)
        env.close()


@pytest.mark.parametrize("nth", range(1, 2 * len(NODES) + 1))
def test_crash_at_a_node_step_then_rerun(tmp_path, nth):
    env, vol, uuid, old, fake = _published(tmp_path)
    try:
        fake.fail_at = nth
        with pytest.raises(RuntimeError, match="node crashed"):
            _rotate(env, vol, fake)
        fake.fail_at = 0
        assert _rotate(env, vol, fake).resumed
        _assert_rotated(env, uuid, old, fake)
    finally:
        env.close()


def test_unpublished_volume_gets_new_keys_only(tmp_path):
    env, vol, uuid, old, fake = _published(tmp_path, nodes=())
    try:
        out = _rotate(env, vol, fake)
        assert out.hosts == [] and fake.calls == 0
        new = env.secrets.get(uuid)
        assert new.dhchap_key != old.dhchap_key
        assert not [k for k in env.t0.raw.keyring_keys() if k["name"].startswith("csik-")]
    finally:
        env.close()


def test_a_node_it_cannot_reach_refuses_before_anything_changes(tmp_path):
    env, vol, uuid, old, fake = _published(tmp_path, nodes=("node-a", "node-z"))
    try:
        with pytest.raises(FailedPrecondition, match="node-z"):
            _rotate(env, vol, fake)
        assert env.secrets.pending(uuid) is None and env.secrets.get(uuid) == old
        with pytest.raises(FailedPrecondition, match="--node"):
            target, lv = env.servicer.targets.volume(vol.volume_id)
            rotate(target, lv, env.servicer.auth, None, lambda h: contract.node_of_host(h))
    finally:
        env.close()


def test_cli_refuses_static_keys_and_bad_flags(tmp_path, capsys):
    """The command line: one line per volume, exit 1 when one failed; static
    dev keys (shared by every volume) cannot be rotated per volume."""
    import json
    import os

    from csi_spdk import cli
    from csi_spdk.controller.auth import write_static_secrets
    from csi_spdk.sim.server import SimServer
    sock = str(tmp_path / "spdk.sock")
    server = SimServer(sock, str(tmp_path / "data"))
    server.start()
    try:
        keys = tmp_path / "keys.json"
        write_static_secrets(keys, VolumeKeys.generate())
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({
            "targets": [{"name": "t", "rpc": f"unix://{sock}",
                         "nvmf": {"listenAddress": "127.0.0.1", "port": 4420}}],
            "auth": {"staticSecretsFile": str(keys), "keyDir": str(tmp_path / "k")}}))
        from csi_spdk.spdk.api import SpdkApi
        from csi_spdk.spdk.client import SpdkClient
        api = SpdkApi(SpdkClient(sock))
        api.malloc_create("M0", 32 << 20)
        api.lvstore_create("M0", "lvs0")
        uuid = api.lvol_create("lvs0", "csi-pvc-1", 4 << 20, thin=True)
        assert cli.main(["rotate-keys", "--config", str(cfg), "--all"]) == 1
        err = capsys.readouterr().err
        assert f"t:{uuid}: not rotated: FAILED_PRECONDITION" in err and "static" in err, err
        assert cli.main(["rotate-keys", "--config", str(cfg)]) == 1
        assert "--volume ID" in capsys.readouterr().err
        assert cli.main(["rotate-keys", "--config", str(cfg), "--all", "--node", "x"]) == 1
        assert "NODE=ENDPOINT" in capsys.readouterr().err
        assert os.path.exists(keys)
    finally:
        server.stop()
