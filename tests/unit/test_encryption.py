"""Encryption at rest, controller side (controller/encryption.py, controller/crypto.py):
the ``encryption`` parameter, one key per volume kept with the volume and
copied to snapshots, clones and restores, target mode's crypto bdev stacked
on the lvol and exported under the lvol's uuid (through the agent by default),
missing and wrong keys, and no key material in any context, error or log."""

from __future__ import annotations

import json
import logging
import os
import stat

import grpc
import pytest
from controller_fixtures import (
    block_cap,
    call,
    create_req,
    expect_code,
    make_env,
    publish_req,
    uuid_of,
)
from encryption_fixtures import MULTI, NODE, NODE_MODE, TARGET

from csi_spdk import contract
from csi_spdk.controller.encryption import VolumeKey
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.log import JsonFormatter
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()


class _Lines(logging.Handler):
    """Every log line as the driver writes it (JSON, with its fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def logs():
    handler = _Lines()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def _key(env, uuid) -> VolumeKey | None:
    return env.servicer.encryption.store.get(uuid)


def _publish(env, vol, node=NODE, secrets=None):
    req = publish_req(vol.volume_id, node, cap=block_cap(MULTI))
    req.volume_context.update(vol.volume_context)
    req.secrets.update(secrets or {})
    return call(env.servicer, "ControllerPublishVolume", req)


def _unpublish(env, vol, node=NODE):
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node))


def _create(env, name, params, **kw):
    return call(env.servicer, "CreateVolume",
                create_req(name, caps=[block_cap(MULTI)], params=params, **kw)).volume


def _sim_keys(env) -> list[dict]:
    """accel keys as SPDK holds them (straight to SPDK, never through the agent)."""
    return env.t0.raw.call("accel_crypto_keys_get", {})


def _all_material(*keys: VolumeKey) -> list[str]:
    return [k.material for k in keys] + [k.key for k in keys] + [k.key2 for k in keys]


def test_bad_values_and_mutable_encryption_are_invalid_argument(env):
    msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume",
                      create_req("v-bad", params={"encryption": "luks"}))
    assert "encryption" in msg and "none, node, target" in msg
    req = create_req("v-mut")
    req.mutable_parameters["encryption"] = "node"
    expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", req)
    assert not env.t0.raw.lvols(env.t0.lvs)


def test_node_mode_key_is_kept_with_the_volume_never_in_contexts(env, logs):
    vol = _create(env, "v-node", NODE_MODE)
    uuid = uuid_of(vol.volume_id)
    assert vol.volume_context[contract.VC_ENCRYPTION] == "node"
    key = _key(env, uuid)
    assert key is not None and key.mode == "node" and len(key.material) == 128
    assert key.key != key.key2
    path = env.config.encryption.key_dir + f"/{uuid}.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(env.config.encryption.key_dir).st_mode) == 0o700
    assert key.material not in repr(key)
    ctx = _publish(env, vol).publish_context
    # node mode: the target exports the lvol itself and never sees the key
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert [ns["bdev_name"] for ns in sub["namespaces"]] == [uuid]
    assert _sim_keys(env) == []
    text = json.dumps(dict(vol.volume_context)) + json.dumps(dict(ctx)) + logs.text
    for secret in _all_material(key):
        assert secret not in text
    _unpublish(env, vol)
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert _key(env, uuid) is None and not os.path.exists(path)


def test_target_mode_exports_a_crypto_bdev_and_cleans_up(env, logs):
    vol = _create(env, "v-tgt", TARGET)
    uuid = uuid_of(vol.volume_id)
    key = _key(env, uuid)
    assert key.mode == "target"
    assert _sim_keys(env) == []   # nothing in SPDK until a publish
    ctx = _publish(env, vol).publish_context
    assert ctx[contract.PC_NS_UUID] == uuid
    bdev_name = contract.crypto_bdev_name(uuid)
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert [(ns["bdev_name"], ns["uuid"]) for ns in sub["namespaces"]] == [(bdev_name, uuid)]
    crypt = env.t0.raw.bdev_get(bdev_name)
    assert crypt["product_name"] == "crypto"
    assert crypt["driver_specific"]["crypto"]["base_bdev_name"] == uuid
    key_name = contract.crypto_key_name(uuid, key.material)
    assert crypt["driver_specific"]["crypto"]["key_name"] == key_name
    assert _sim_keys(env) == [{"name": key_name, "cipher": "AES_XTS", "key": key.key,
                               "key2": key.key2}]
    assert env.t0.raw.bdev_get(uuid)["claimed"] is True
    # a retried publish (and a second node) reuses bdev and key
    _publish(env, vol)
    _publish(env, vol, node="node-b")
    assert len(_sim_keys(env)) == 1
    _unpublish(env, vol, node="node-b")
    assert env.t0.raw.bdev_get(bdev_name) is not None   # node-a still has it
    _unpublish(env, vol)
    assert env.t0.raw.bdev_get(bdev_name) is None
    assert _sim_keys(env) == []
    assert env.t0.raw.bdev_get(uuid)["claimed"] is False
    text = json.dumps(dict(vol.volume_context)) + json.dumps(dict(ctx)) + logs.text
    for secret in _all_material(key):
        assert secret not in text
    assert "ControllerPublishVolume" in logs.text   # the capture works
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert _key(env, uuid) is None


def test_delete_of_a_volume_whose_unpublish_crashed_removes_bdev_and_key(env):
    vol = _create(env, "v-crash", TARGET)
    uuid = uuid_of(vol.volume_id)
    _publish(env, vol)
    # as if the controller died after deleting the subsystem, before the crypto bdev
    env.t0.raw.subsystem_delete(contract.subsystem_nqn(uuid))
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert env.t0.raw.bdev_get(contract.crypto_bdev_name(uuid)) is None
    assert env.t0.raw.bdev_get(uuid) is None
    assert _sim_keys(env) == []
    assert _key(env, uuid) is None


@pytest.mark.parametrize("params", [TARGET, NODE_MODE], ids=["target", "node"])
def test_snapshot_clone_and_restore_copy_the_key(env, params):
    src = _create(env, "v-src", params)
    src_key = _key(env, uuid_of(src.volume_id))
    snap = call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s1", source_volume_id=src.volume_id)).snapshot
    assert _key(env, uuid_of(snap.snapshot_id)).material == src_key.material
    clone = _create(env, "v-clone", params, volume=src.volume_id)
    assert _key(env, uuid_of(clone.volume_id)).material == src_key.material
    # the source goes away: the snapshot's copy still opens a restore
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=src.volume_id))
    restore = _create(env, "v-restore", params, snapshot=snap.snapshot_id)
    r_uuid = uuid_of(restore.volume_id)
    assert _key(env, r_uuid).material == src_key.material
    assert restore.volume_context[contract.VC_ENCRYPTION] == params["encryption"]
    if params["encryption"] == "target":
        _publish(env, restore)
        crypt = env.t0.raw.bdev_get(contract.crypto_bdev_name(r_uuid))
        assert crypt["driver_specific"]["crypto"]["key_name"] == \
            contract.crypto_key_name(r_uuid, src_key.material)
        _unpublish(env, restore)
    call(env.servicer, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(
        snapshot_id=snap.snapshot_id))
    assert _key(env, uuid_of(snap.snapshot_id)) is None


def test_a_clone_must_keep_its_sources_encryption(env):
    enc = _create(env, "v-enc", TARGET)
    plain = _create(env, "v-plain", {"auth": "none"})
    msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", create_req(
        "v-c1", caps=[block_cap()], params={"auth": "none"}, volume=enc.volume_id))
    assert "encryption: target" in msg
    expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", create_req(
        "v-c2", caps=[block_cap()], params=TARGET, volume=plain.volume_id))
    expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", create_req(
        "v-c3", caps=[block_cap()], params=NODE_MODE, volume=enc.volume_id))
    names = {lv["name"] for lv in env.t0.raw.lvols()}
    assert not names & {contract.volume_lvol_name(n) for n in ("v-c1", "v-c2", "v-c3")}
    assert not any(n.startswith(contract.CLONE_SOURCE_PREFIX) for n in names)


def test_user_key_from_the_provisioner_secret(env):
    mine = VolumeKey.generate("target")
    req = create_req("v-user", caps=[block_cap()], params=TARGET)
    req.secrets[contract.SECRET_ENCRYPTION_KEY] = mine.material
    vol = call(env.servicer, "CreateVolume", req).volume
    assert _key(env, uuid_of(vol.volume_id)).material == mine.material
    bad = create_req("v-user-bad", caps=[block_cap()], params=TARGET)
    bad.secrets[contract.SECRET_ENCRYPTION_KEY] = "00" * 64   # halves equal
    msg = expect_code(C.FAILED_PRECONDITION, env.servicer, "CreateVolume", bad)
    assert "provisioner secret" in msg and "00" * 32 not in msg


def test_missing_or_wrong_key_is_failed_precondition_naming_where(env):
    vol = _create(env, "v-miss", TARGET)
    uuid = uuid_of(vol.volume_id)
    key = _key(env, uuid)
    path = env.config.encryption.key_dir + f"/{uuid}.json"
    os.unlink(path)
    msg = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume",
                      _pub_req(vol))
    assert path in msg
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
    assert _sim_keys(env) == []
    # the controller-publish secret can carry it instead
    _publish(env, vol, secrets=key.secrets())
    assert env.t0.raw.bdev_get(contract.crypto_bdev_name(uuid)) is not None
    _unpublish(env, vol)
    # a key that is not the one kept for the volume is refused before SPDK sees it
    env.servicer.encryption.store.put(uuid, "v-miss", key)
    wrong = _pub_req(vol)
    wrong.secrets.update(VolumeKey.generate("target").secrets())
    msg = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume", wrong)
    assert "not the key of volume" in msg and path in msg
    assert env.t0.raw.bdev_get(contract.crypto_bdev_name(uuid)) is None and _sim_keys(env) == []
    os.unlink(path)
    _publish(env, vol, secrets=key.secrets())
    # another key while it is open: refused, naming no key
    other = VolumeKey.generate("target")
    req = _pub_req(vol, node="node-b")
    req.secrets.update(other.secrets())
    msg = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume", req)
    assert "another encryption key" in msg
    for secret in _all_material(key, other):
        assert secret not in msg
    bad = _pub_req(vol, node="node-b")
    bad.secrets[contract.SECRET_ENCRYPTION_KEY] = "zz" * 64
    msg = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume", bad)
    assert "controller-publish secret" in msg and "zz" * 64 not in msg


def _pub_req(vol, node=NODE):
    req = publish_req(vol.volume_id, node, cap=block_cap(MULTI))
    req.volume_context.update(vol.volume_context)
    return req


def test_no_key_store_is_failed_precondition_before_anything_is_made(env):
    servicer = ControllerServicer(env.config.__class__(targets=env.config.targets),
                                  "csi-spdk.io", apis={n: t.api for n, t in env.targets.items()},
                                  secret_store=env.secrets)
    servicer.encryption.store = None
    before = len(env.t0.raw.lvols())
    msg = expect_code(C.FAILED_PRECONDITION, servicer, "CreateVolume",
                      create_req("v-nostore", params=TARGET))
    assert "encryption" in msg
    assert len(env.t0.raw.lvols()) == before
