"""Target-mode encryption meets the QoS hold (controller/qos.py, export.py
``hold_open``, crypto.py): a hold a crash left on an encrypted volume never
blocks its publish, never exports the lvol in clear, and a hold on a volume
whose crypto bdev is stacked holds that bdev, not the (claimed) lvol."""

from __future__ import annotations

import grpc
import pytest
from controller_fixtures import block_cap, call, create_req, expect_code, make_env, uuid_of
from encryption_fixtures import MULTI, crash_at, crypto_left, publish_req_of

from csi_spdk import contract
from csi_spdk.controller import qos
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
TARGET = {"encryption": "target", "auth": "none", "maxIOPS": "2000"}


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()


def _create(env, params=None):
    return call(env.servicer, "CreateVolume", create_req(
        "v-held", caps=[block_cap(MULTI)], params=TARGET if params is None else params)).volume


def _stacked_before_qos(env):
    """A target-mode volume without limits whose publish died after stacking,
    before exporting (the crypto bdev claims the lvol, nobody exports it),
    then its first limit set: SPDK's QoS on the lvol exists but runs on no
    thread, so the next change is EAGAIN until something holds it open."""
    vol = _create(env, {"encryption": "target", "auth": "none"})
    # accel key, crypto bdev, *the export's subsystem*
    crash_at(env, 3, "ControllerPublishVolume", publish_req_of(vol))
    uuid = uuid_of(vol.volume_id)
    assert crypto_left(env, uuid)[0] is not None and _sub(env, uuid) is None
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "3000"))
    return vol, uuid


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
    # create subsystem, add namespace, *delete subsystem*
    crash_at(env, 3, "ControllerModifyVolume", _modify_req(vol, "5000"))
    sub = _sub(env, uuid)
    assert _namespaces(env, uuid) == [(uuid, uuid)] and not sub["hosts"]
    assert env.t0.raw.bdev_get(uuid)["claim_type"] == "exclusive_write"   # by the hold
    assert _iops(env, uuid) == 5000
    return uuid


def test_publish_over_a_crashed_hold_stacks_crypto_and_exports_only_ciphertext(env):
    vol = _create(env)
    uuid = _leave_hold(env, vol)
    ctx = call(env.servicer, "ControllerPublishVolume", publish_req_of(vol)).publish_context
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
                          publish_req_of(vol))
    assert "unencrypted" in message and "unpublish" in message
    assert _namespaces(env, uuid) == [(uuid, uuid)]          # not deleted, not joined
    assert [h["nqn"] for h in _sub(env, uuid)["hosts"]] == [contract.host_nqn("intruder")]
    assert env.t0.raw.bdev_get(contract.crypto_bdev_name(uuid)) is None


def test_hold_of_a_volume_with_its_crypto_bdev_stacked_holds_the_crypto_bdev(env, monkeypatch):
    """A QoS change on the volume of ``_stacked_before_qos`` holds the crypto
    bdev (SPDK refuses the claimed lvol as a namespace); releasing the hold
    takes the leftover crypto bdev and key along, and the next publish
    stacks and exports again."""
    vol, uuid = _stacked_before_qos(env)
    crypt = contract.crypto_bdev_name(uuid)
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
    assert _sub(env, uuid) is None                  # and the hold released,
    assert crypto_left(env, uuid) == (None, [])    # with the crypto bdev and its key
    assert env.t0.raw.bdev_get(uuid)["claimed"] is False
    call(env.servicer, "ControllerPublishVolume", publish_req_of(vol))
    assert _namespaces(env, uuid) == [(crypt, uuid)]
    assert [h["nqn"] for h in _sub(env, uuid)["hosts"]] == [contract.host_nqn("node-a")]
    assert len(crypto_left(env, uuid)[1]) == 1     # stacked again by the publish
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-a"))
    assert crypto_left(env, uuid) == (None, [])    # (accel keys outlive the test's lvstore)


def test_a_crashed_hold_through_the_crypto_bdev_is_released_with_it(env):
    """The hold above dies at its subsystem delete; the next
    ControllerModifyVolume releases it (release_hold) and, unpublished, the
    crypto bdev and accel key it held go too (not only at the next unpublish)."""
    vol, uuid = _stacked_before_qos(env)
    crypt = contract.crypto_bdev_name(uuid)
    # the hold's subsystem, its namespace, *its delete*
    crash_at(env, 3, "ControllerModifyVolume", _modify_req(vol, "6000"))
    assert _namespaces(env, uuid) == [(crypt, uuid)] and not _sub(env, uuid)["hosts"]
    assert crypto_left(env, uuid)[0] is not None
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "6000"))   # no change
    assert _sub(env, uuid) is None and crypto_left(env, uuid) == (None, [])
    assert env.t0.raw.bdev_get(uuid)["claimed"] is False and _iops(env, uuid) == 6000


def test_qos_on_before_the_crypto_bdev_changes_without_a_hold(env, monkeypatch):
    """QoS enabled before the crypto bdev was stacked: the vbdev's examine ran
    the lvol's QoS on a thread, so a change needs no hold while the crypto
    bdev exists, exported or not (a real v25.09 target accepts it)."""
    vol = _create(env)                      # maxIOPS 2000 from CreateVolume
    uuid = uuid_of(vol.volume_id)
    crash_at(env, 3, "ControllerPublishVolume", publish_req_of(vol))
    holds = []
    monkeypatch.setattr(qos, "_set_held_open", lambda *a: holds.append(a))
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "6000"))
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "7000"))
    assert holds == [] and _iops(env, uuid) == 7000
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-a"))
    assert crypto_left(env, uuid) == (None, [])


def test_releasing_a_hold_on_the_lvol_makes_no_crypto_call(env):
    """An unencrypted hold (the lvol as namespace): release_hold asks SPDK
    nothing about crypto (what the subsystem read said is enough)."""
    vol = call(env.servicer, "CreateVolume", create_req(
        "v-plain-held", caps=[block_cap(MULTI)], params={"auth": "none",
                                                         "maxIOPS": "2000"})).volume
    uuid = _leave_hold(env, vol)
    mark = len(env.t0.api.log)
    call(env.servicer, "ControllerModifyVolume", _modify_req(vol, "5000"))
    assert _sub(env, uuid) is None
    assert not [m for m in env.t0.api.log[mark:]
                if m in ("bdev_crypto_delete", "accel_crypto_key_destroy")]
