"""Target-mode encryption meets the QoS hold (controller/qos.py, export.py
``hold_open``, crypto.py): a hold a crash left on an encrypted volume never
blocks its publish, never exports the lvol in clear, and a hold on a volume
whose crypto bdev is stacked holds that bdev, not the (claimed) lvol."""

from __future__ import annotations

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

from csi_spdk import contract
from csi_spdk.controller import qos
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
MULTI = csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
TARGET = {"encryption": "target", "auth": "none", "maxIOPS": "2000"}


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()


def _create(env):
    return call(env.servicer, "CreateVolume",
                create_req("v-held", caps=[block_cap(MULTI)], params=TARGET)).volume


def _publish_req(vol, node="node-a"):
    req = publish_req(vol.volume_id, node, cap=block_cap(MULTI))
    req.volume_context.update(vol.volume_context)
    return req


def _modify_req(vol, iops: str):
    return csi_pb2.ControllerModifyVolumeRequest(volume_id=vol.volume_id,
                                                 mutable_parameters={"maxIOPS": iops})


def _sub(env, uuid):
    return env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))


def _namespaces(env, uuid):
    return [(ns["bdev_name"], ns["uuid"]) for ns in (_sub(env, uuid) or {}).get("namespaces", [])]


def _iops(env, uuid) -> int:
    return env.t0.raw.bdev_get(uuid)["assigned_rate_limits"]["rw_ios_per_sec"]


def _leave_hold(env, vol) -> str:
    """A ControllerModifyVolume that dies at the hold's subsystem delete: the
    hold (the lvol as namespace, no host, no listener) stays on the target."""
    uuid = uuid_of(vol.volume_id)
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "3000"))  # QoS now active
    env.t0.api.arm(3)       # create subsystem, add namespace, *delete subsystem*
    try:
        expect_code(C.INTERNAL, env.servicer, "ControllerModifyVolume", _modify_req(vol, "5000"))
    finally:
        env.t0.api.arm(0)
    sub = _sub(env, uuid)
    assert _namespaces(env, uuid) == [(uuid, uuid)] and not sub["hosts"]
    assert env.t0.raw.bdev_get(uuid)["claim_type"] == "exclusive_write"   # by the hold
    assert _iops(env, uuid) == 5000
    return uuid


def test_publish_over_a_crashed_hold_stacks_crypto_and_exports_only_ciphertext(env):
    vol = _create(env)
    uuid = _leave_hold(env, vol)
    ctx = call(env.servicer, "ControllerPublishVolume", _publish_req(vol)).publish_context
    assert ctx[contract.PC_NS_UUID] == uuid
    crypt = contract.crypto_bdev_name(uuid)
    assert env.t0.raw.bdev_get(crypt)["driver_specific"]["crypto"]["base_bdev_name"] == uuid
    # the one subsystem exports the crypto bdev, to exactly that host; the lvol is not in it
    assert _namespaces(env, uuid) == [(crypt, uuid)]
    assert [h["nqn"] for h in _sub(env, uuid)["hosts"]] == [contract.host_nqn("node-a")]
    assert _iops(env, uuid) == 5000          # the limits survived the swap
    # and it still unpublishes clean: no subsystem, no crypto bdev, lvol free
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-a"))
    assert _sub(env, uuid) is None and env.t0.raw.bdev_get(crypt) is None
    assert env.t0.raw.bdev_get(uuid)["claimed"] is False


def test_a_subsystem_exporting_the_lvol_in_clear_is_refused_and_left_alone(env):
    vol = _create(env)
    uuid = _leave_hold(env, vol)
    # someone let a host onto the hold: the lvol is readable in clear
    env.t0.raw.call("nvmf_subsystem_add_host", {"nqn": contract.subsystem_nqn(uuid),
                                                "host": contract.host_nqn("intruder")})
    message = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume",
                          _publish_req(vol))
    assert "unencrypted" in message and "unpublish" in message
    assert _namespaces(env, uuid) == [(uuid, uuid)]          # not deleted, not joined
    assert [h["nqn"] for h in _sub(env, uuid)["hosts"]] == [contract.host_nqn("intruder")]
    assert env.t0.raw.bdev_get(contract.crypto_bdev_name(uuid)) is None


def test_hold_of_a_volume_with_its_crypto_bdev_stacked_holds_the_crypto_bdev(env, monkeypatch):
    """A publish that died after stacking, before exporting: the crypto bdev
    claims the lvol. A QoS change then holds the crypto bdev (SPDK refuses the
    claimed lvol as a namespace), and the next publish completes the export."""
    vol = _create(env)
    uuid = uuid_of(vol.volume_id)
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "3000"))
    env.t0.api.arm(3)       # accel key, crypto bdev, *the export's subsystem*
    try:
        expect_code(C.INTERNAL, env.servicer, "ControllerPublishVolume", _publish_req(vol))
    finally:
        env.t0.api.arm(0)
    crypt = contract.crypto_bdev_name(uuid)
    assert env.t0.raw.bdev_get(crypt) is not None and _sub(env, uuid) is None
    held = []
    real = qos._set_held_open

    def spy(target, lvol_uuid, change):
        orig = target.api.set_qos

        def seen(*a, **kw):
            held.append(_namespaces(env, lvol_uuid))
            return orig(*a, **kw)
        monkeypatch.setattr(target.api, "set_qos", seen)
        try:
            return real(target, lvol_uuid, change)
        finally:
            monkeypatch.setattr(target.api, "set_qos", orig)
    monkeypatch.setattr(qos, "_set_held_open", spy)
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "6000"))
    assert held and held[0] == [(crypt, uuid)]      # held through the crypto bdev
    assert _iops(env, uuid) == 6000
    assert _sub(env, uuid) is None                  # and the hold released
    call(env.servicer, "ControllerPublishVolume", _publish_req(vol))
    assert _namespaces(env, uuid) == [(crypt, uuid)]
    assert [h["nqn"] for h in _sub(env, uuid)["hosts"]] == [contract.host_nqn("node-a")]
