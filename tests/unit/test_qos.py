"""QoS limits through the Controller service (controller/qos.py) against the
simulator or CSI_SPDK_TEST_RPC: every parameter and bad value, CreateVolume,
clones, publish/unpublish, ControllerModifyVolume (online, unpublished,
idempotent, concurrent, crash between its SPDK calls), and the limits SPDK
reports in ControllerGetVolume / ListVolumes. Assertions read SPDK's own
``assigned_rate_limits`` and subsystems."""

from __future__ import annotations

import grpc
import pytest
from controller_fixtures import (
    MiB,
    call,
    create_req,
    expect_code,
    publish_req,
    uuid_of,
)

from csi_spdk import contract
from csi_spdk.controller import qos
from csi_spdk.proto import csi_pb2
from csi_spdk.spdk.errors import SpdkBusy

C = grpc.StatusCode
OFF = {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0,
       "w_mbytes_per_sec": 0}


def limits(env, vol_or_id) -> dict:
    vid = vol_or_id if isinstance(vol_or_id, str) else vol_or_id.volume_id
    return env.t0.raw.bdev_get(uuid_of(vid))["assigned_rate_limits"]


def subsystem(env, vid: str):
    return env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid_of(vid)))


def create(env, name="pvc-q", params=None, mutable=None, **kw):
    req = create_req(name, 8 * MiB, params=params, **kw)
    for k, v in (mutable or {}).items():
        req.mutable_parameters[k] = v
    return call(env.servicer, "CreateVolume", req).volume


def modify_req(vid: str, **params: str):
    return csi_pb2.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters=params)


def modify(env, vid: str, **params: str):
    return call(env.servicer, "ControllerModifyVolume", modify_req(vid, **params))


def get_ctx(env, vid: str) -> dict:
    return dict(call(env.servicer, "ControllerGetVolume",
                     csi_pb2.ControllerGetVolumeRequest(volume_id=vid)).volume.volume_context)


def qos_ctx(ctx: dict) -> dict:
    return {k: v for k, v in ctx.items() if k in contract.VC_QOS_KEYS.values()}


def set_qos_calls(env) -> int:
    return env.t0.api.log.count("bdev_set_qos_limit")


# --- parameters --------------------------------------------------------------------
@pytest.mark.parametrize(("key", "spdk_key", "value"), [
    ("maxIOPS", "rw_ios_per_sec", "3000"),
    ("maxMBps", "rw_mbytes_per_sec", "100"),
    ("maxReadMBps", "r_mbytes_per_sec", "1"),
    ("maxWriteMBps", "w_mbytes_per_sec", "77"),
])
def test_each_storageclass_parameter_is_enforced(env, key, spdk_key, value):
    vol = create(env, params={key: value})
    assert limits(env, vol) == {**OFF, spdk_key: int(value)}
    assert qos_ctx(dict(vol.volume_context)) == {key: value}
    assert qos_ctx(get_ctx(env, vol.volume_id)) == {key: value}


def test_all_four_together_and_zero_means_unlimited(env):
    vol = create(env, params={"maxIOPS": "2000", "maxMBps": "0", "maxReadMBps": "40",
                              "maxWriteMBps": "20"})
    assert limits(env, vol) == {"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 0,
                                "r_mbytes_per_sec": 40, "w_mbytes_per_sec": 20}
    assert qos_ctx(dict(vol.volume_context)) == {"maxIOPS": "2000", "maxReadMBps": "40",
                                                 "maxWriteMBps": "20"}


def test_no_parameters_no_qos_call(env):
    vol = create(env)
    assert limits(env, vol) == OFF
    assert qos_ctx(dict(vol.volume_context)) == {}
    assert set_qos_calls(env) == 0


@pytest.mark.parametrize(("key", "value", "says"), [
    ("maxIOPS", "1500", "would silently use 2000; use 0 (unlimited) or a multiple of 1000, "
                        "e.g. 1000 or 2000"),
    ("maxIOPS", "500", "would silently use 1000"),
    ("maxIOPS", "-1000", "must be a whole number >= 0"),
    ("maxIOPS", "1e3", "must be a whole number >= 0"),
    ("maxIOPS", str(2**64), "too large"),
    ("maxMBps", "1.5", "must be a whole number >= 0"),
    ("maxMBps", "", "must be a whole number >= 0"),
    ("maxReadMBps", "ten", "must be a whole number >= 0"),
    ("maxReadMBps", "٣", "must be a whole number >= 0"),   # a non-ASCII digit
    ("maxWriteMBps", str(qos.MAX_MBPS + 1), "caps MiB/s at 17592186044415"),
])
def test_bad_values_are_invalid_and_create_nothing(env, key, value, says):
    for where in ("parameters", "mutable_parameters"):
        req = create_req(f"pvc-bad-{where}", 8 * MiB)
        getattr(req, where)[key] = value
        message = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", req)
        assert key in message and says in message, message
    assert env.t0.raw.lvols(env.t0.lvs) == []


def test_largest_values_are_accepted(env):
    vol = create(env, params={"maxIOPS": str(qos.MAX_IOPS), "maxMBps": str(qos.MAX_MBPS)})
    assert limits(env, vol)["rw_ios_per_sec"] == qos.MAX_IOPS
    assert limits(env, vol)["rw_mbytes_per_sec"] == qos.MAX_MBPS


def test_volume_attributes_class_wins_over_storageclass(env):
    vol = create(env, params={"maxIOPS": "1000", "maxMBps": "50"},
                 mutable={"maxIOPS": "4000"})
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 4000, "rw_mbytes_per_sec": 50}


@pytest.mark.parametrize(("key", "says"), [
    ("thinProvision", "cannot be changed after creation"),
    ("XXX_FakeKey", "unknown key"),
    ("csi.storage.k8s.io/pvc/name", "unknown key"),
])
def test_create_with_non_mutable_key_in_mutable_parameters(env, key, says):
    req = create_req("pvc-m", 8 * MiB)
    req.mutable_parameters[key] = "true"
    message = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", req)
    assert says in message and "maxIOPS, maxMBps, maxReadMBps, maxWriteMBps" in message


# --- CreateVolume: idempotency, clones, publish ----------------------------------------
def test_create_retry_is_idempotent_and_converges(env):
    vol = create(env, params={"maxIOPS": "2000"})
    calls = set_qos_calls(env)
    again = create(env, params={"maxIOPS": "2000"})
    assert again.volume_id == vol.volume_id and set_qos_calls(env) == calls
    # A retry with other limits (e.g. after a crash between lvol create and the
    # QoS call of a first attempt that had none) converges on the request; the
    # volume is unpublished, so this is the held-open path.
    create(env, params={"maxIOPS": "3000", "maxMBps": "10"})
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 3000, "rw_mbytes_per_sec": 10}
    assert subsystem(env, vol.volume_id) is None


def test_create_with_limits_needs_no_hold(env):
    env.t0.api.arm(2)     # 1: bdev_lvol_create; 2: the hold's nvmf_create_subsystem
    req = create_req("pvc-c", 8 * MiB, params={"maxIOPS": "2000"})
    uuid = None
    try:
        uuid = uuid_of(call(env.servicer, "CreateVolume", req).volume.volume_id)
    finally:
        env.t0.api.arm(0)
    # No hold is needed for a fresh lvol: the first QoS call always succeeds.
    assert uuid and limits(env, f"x:{uuid}")["rw_ios_per_sec"] == 2000


@pytest.mark.parametrize("source", ["snapshot", "volume"])
def test_clone_gets_its_own_requests_limits(env, source):
    src = create(env, "pvc-src", params={"maxIOPS": "5000", "maxMBps": "30"})
    if source == "snapshot":
        snap = call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
            name="snap-q", source_volume_id=src.volume_id)).snapshot
        kw = {"snapshot": snap.snapshot_id}
    else:
        kw = {"volume": src.volume_id}
    plain = create(env, "pvc-plain", **kw)
    assert limits(env, plain) == OFF and qos_ctx(dict(plain.volume_context)) == {}
    own = create(env, "pvc-own", params={"maxWriteMBps": "5"}, mutable={"maxIOPS": "1000"},
                 **kw)
    assert limits(env, own) == {**OFF, "rw_ios_per_sec": 1000, "w_mbytes_per_sec": 5}
    assert qos_ctx(dict(own.volume_context)) == {"maxIOPS": "1000", "maxWriteMBps": "5"}
    assert limits(env, src) == {**OFF, "rw_ios_per_sec": 5000, "rw_mbytes_per_sec": 30}


def test_limits_survive_publish_and_unpublish(env):
    vol = create(env, params={"maxIOPS": "2000", "maxReadMBps": "8"})
    want = {**OFF, "rw_ios_per_sec": 2000, "r_mbytes_per_sec": 8}
    call(env.servicer, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    assert limits(env, vol) == want
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-1"))
    assert subsystem(env, vol.volume_id) is None
    assert limits(env, vol) == want
    assert qos_ctx(get_ctx(env, vol.volume_id)) == {"maxIOPS": "2000", "maxReadMBps": "8"}


# --- ControllerModifyVolume ---------------------------------------------------------------
def test_modify_unpublished_volume_with_limits_is_held_open_and_released(env):
    vol = create(env, params={"maxIOPS": "2000"})
    # SPDK refuses a second QoS change on a bdev nobody has open:
    with pytest.raises(SpdkBusy):
        env.t0.raw.set_qos(uuid_of(vol.volume_id), rw_ios_per_sec=3000)
    modify(env, vol.volume_id, maxIOPS="3000", maxMBps="12")
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 3000, "rw_mbytes_per_sec": 12}
    assert subsystem(env, vol.volume_id) is None          # the hold is gone
    modify(env, vol.volume_id, maxIOPS="0", maxMBps="0")  # off again, still unpublished
    assert limits(env, vol) == OFF
    assert qos_ctx(get_ctx(env, vol.volume_id)) == {}


def test_modify_volume_created_without_limits(env):
    vol = create(env)
    modify(env, vol.volume_id, maxWriteMBps="9")
    assert limits(env, vol) == {**OFF, "w_mbytes_per_sec": 9}
    modify(env, vol.volume_id, maxReadMBps="4")
    assert limits(env, vol) == {**OFF, "w_mbytes_per_sec": 9, "r_mbytes_per_sec": 4}


def test_modify_published_volume_online(env):
    vol = create(env, params={"maxMBps": "100"})
    ctx = call(env.servicer, "ControllerPublishVolume",
               publish_req(vol.volume_id, "node-1")).publish_context
    before = subsystem(env, vol.volume_id)
    modify(env, vol.volume_id, maxIOPS="6000")
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 6000, "rw_mbytes_per_sec": 100}
    after = subsystem(env, vol.volume_id)
    assert after["hosts"] == before["hosts"]   # the host entry (with its keys) untouched
    assert [h["nqn"] for h in after["hosts"]] == [contract.host_nqn("node-1")]
    assert after["listen_addresses"] == before["listen_addresses"]
    assert ctx[contract.PC_NQN] == after["nqn"]


def test_modify_changes_only_the_keys_given(env):
    vol = create(env, params={"maxIOPS": "2000", "maxMBps": "50", "maxReadMBps": "10"})
    modify(env, vol.volume_id, maxMBps="0")
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 2000, "r_mbytes_per_sec": 10}


def test_modify_is_idempotent(env):
    vol = create(env, params={"maxIOPS": "2000"})
    modify(env, vol.volume_id, maxIOPS="4000")
    calls = set_qos_calls(env)
    modify(env, vol.volume_id, maxIOPS="4000")
    modify(env, vol.volume_id, maxIOPS="4000", maxMBps="0")
    assert set_qos_calls(env) == calls
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 4000}


def test_modify_missing_volume_is_not_found(env):
    vol = create(env)
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    for vid in (vol.volume_id, "non-existing-volume-id",
                f"{env.t0.name}:00000000-0000-0000-0000-000000000000"):
        expect_code(C.NOT_FOUND, env.servicer, "ControllerModifyVolume",
                    modify_req(vid, maxIOPS="1000"))


@pytest.mark.parametrize(("params", "says"), [
    ({}, "mutable_parameters"),
    ({"thinProvision": "true"}, "cannot be changed after creation"),
    ({"fsType": "xfs", "maxIOPS": "1000"}, "cannot be changed after creation"),
    ({"XXX_FakeKey": "XXX_FakeValue"}, "unknown key"),
    ({"maxIOPS": "2500"}, "would silently use 3000"),
    ({"maxMBps": "-5"}, "must be a whole number"),
])
def test_modify_bad_request_is_invalid_and_leaves_limits(env, params, says):
    vol = create(env, params={"maxIOPS": "2000", "maxMBps": "7"})
    message = expect_code(C.INVALID_ARGUMENT, env.servicer, "ControllerModifyVolume",
                          modify_req(vol.volume_id, **params))
    assert says in message, message
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 7}
    expect_code(C.INVALID_ARGUMENT, env.servicer, "ControllerModifyVolume",
                modify_req("", maxIOPS="1000"))


def test_concurrent_modify_of_one_volume_is_aborted(env):
    vol = create(env)
    with env.servicer.locks.hold([vol.volume_id], what="another ControllerModifyVolume"):
        expect_code(C.ABORTED, env.servicer, "ControllerModifyVolume",
                    modify_req(vol.volume_id, maxIOPS="1000"))
    assert limits(env, vol) == OFF


def test_spdk_eagain_on_published_volume_is_aborted(env, monkeypatch):
    """Someone else keeps SPDK's QoS "being changed" (EAGAIN) on an exported
    volume: after the bounded retries the answer is ABORTED, nothing leaks."""
    vol = create(env)
    call(env.servicer, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    api = env.t0.api
    real = api.call

    def busy(method, params=None, timeout=None):
        if method == "bdev_set_qos_limit":
            raise SpdkBusy(method, -32602, "Failed to configure rate limit: "
                                           "Resource temporarily unavailable")
        return real(method, params, timeout)

    monkeypatch.setattr(qos, "BUSY_DELAY", 0.0)
    monkeypatch.setattr(api, "call", busy)
    message = expect_code(C.ABORTED, env.servicer, "ControllerModifyVolume",
                          modify_req(vol.volume_id, maxIOPS="1000"))
    assert "being changed" in message and "Resource temporarily unavailable" in message
    monkeypatch.setattr(api, "call", real)
    hosts = subsystem(env, vol.volume_id)["hosts"]
    assert [h["nqn"] for h in hosts] == [contract.host_nqn("node-1")]
    modify(env, vol.volume_id, maxIOPS="1000")
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 1000}


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_crash_during_held_modify_converges(env, fail_at):
    """A crash at each SPDK step of the hold (create subsystem, add namespace,
    delete subsystem); the retry converges and leaves no subsystem behind."""
    vol = create(env, params={"maxIOPS": "2000"})
    env.t0.api.arm(fail_at)
    try:
        expect_code(C.INTERNAL, env.servicer, "ControllerModifyVolume",
                    modify_req(vol.volume_id, maxIOPS="5000"))
    finally:
        env.t0.api.arm(0)
    modify(env, vol.volume_id, maxIOPS="5000")
    assert limits(env, vol) == {**OFF, "rw_ios_per_sec": 5000}
    assert subsystem(env, vol.volume_id) is None
    # the volume still publishes normally afterwards
    call(env.servicer, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    assert limits(env, vol)["rw_ios_per_sec"] == 5000


# --- reporting ------------------------------------------------------------------------------
def test_get_and_list_report_what_spdk_enforces_not_what_was_asked(env):
    vol = create(env, params={"maxIOPS": "2000"})
    call(env.servicer, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    # Changed behind the driver's back; SPDK rounds 1500 up to 2000 and 4500 to 5000.
    env.t0.raw.set_qos(uuid_of(vol.volume_id), rw_ios_per_sec=4500, r_mbytes_per_sec=3)
    assert qos_ctx(get_ctx(env, vol.volume_id)) == {"maxIOPS": "5000", "maxReadMBps": "3"}
    listed = call(env.servicer, "ListVolumes", csi_pb2.ListVolumesRequest()).entries
    ctx = next(e.volume.volume_context for e in listed if e.volume.volume_id == vol.volume_id)
    assert qos_ctx(dict(ctx)) == {"maxIOPS": "5000", "maxReadMBps": "3"}


def test_validate_volume_capabilities_accepts_mutable_parameters(env):
    vol = create(env, params={"maxIOPS": "1000"})
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[create_req("x").volume_capabilities[0]],
        parameters={"maxIOPS": "1000"}, mutable_parameters={"maxMBps": "10"})
    got = call(env.servicer, "ValidateVolumeCapabilities", req)
    assert dict(got.confirmed.mutable_parameters) == {"maxMBps": "10"}
    assert dict(got.confirmed.parameters) == {"maxIOPS": "1000"}
    for bad, says in (({"thinProvision": "true"}, "cannot be changed"),
                      ({"maxMBps": "x"}, "whole number")):
        req.mutable_parameters.clear()
        req.mutable_parameters.update(bad)
        got = call(env.servicer, "ValidateVolumeCapabilities", req)
        assert not got.HasField("confirmed") and says in got.message
    req.mutable_parameters.clear()
    req.parameters["maxIOPS"] = "999"
    got = call(env.servicer, "ValidateVolumeCapabilities", req)
    assert not got.HasField("confirmed") and "maxIOPS=999" in got.message


def test_delete_volume_with_limits(env):
    vol = create(env, params={"maxIOPS": "2000"})
    modify(env, vol.volume_id, maxIOPS="3000")
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert env.t0.raw.bdev_get(uuid_of(vol.volume_id)) is None
