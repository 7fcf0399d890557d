"""Error codes and messages a caller can act on: SPDK errors nobody mapped get
a code the sidecars treat right (not INTERNAL, which is final), enums this
proto does not know are INVALID_ARGUMENT, and user input echoed in a message
is cut short."""

from __future__ import annotations

import grpc
from controller_fixtures import MiB, call, create_req, expect_code, mount_cap

from csi_spdk.errors import MESSAGE_LIMIT, CsiError, echo
from csi_spdk.proto import csi_pb2
from csi_spdk.spdk.errors import from_response

C = grpc.StatusCode


def test_unmapped_spdk_errors_get_retryable_or_actionable_codes():
    # replies as spdk_tgt v25.09 sends them (spdk-golden 04, 06, 11)
    assert from_response("bdev_lvol_delete", {"code": -19, "message": "No such device"}
                         ).code == C.NOT_FOUND
    assert from_response("bdev_lvol_resize", {"code": -32602, "message": "No such device"}
                         ).code == C.NOT_FOUND
    for busy in ({"code": -16, "message": "Device or resource busy"},
                 {"code": -11, "message": "Resource temporarily unavailable"},
                 {"code": -32603, "message": "Device or resource busy"}):
        assert from_response("bdev_lvol_delete", busy).code == C.UNAVAILABLE
    assert from_response("bdev_lvol_delete", {"code": -32603, "message": "Operation not "
                                              "permitted"}).code == C.FAILED_PRECONDITION
    err = from_response("bdev_lvol_set_xattr", {"code": -32601, "message": "Method not found"})
    assert err.code == C.FAILED_PRECONDITION
    assert "'lvol' module" in err.message and "bdev_lvol_set_xattr" in err.message
    assert "'nvmf' module" in from_response(
        "nvmf_create_subsystem", {"code": -32601, "message": "Method not found"}).message
    assert from_response("x", {"code": -32603, "message": "Input/output error"}).code \
        == C.INTERNAL


def test_unknown_access_mode_is_invalid_argument_not_a_python_error(env):
    cap = mount_cap()
    cap.access_mode.mode = 99
    msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume",
                      create_req("v", MiB, caps=[cap]))
    assert "access mode 99" in msg and "ValueError" not in msg and "Error" not in msg
    resp = call(env.servicer, "ValidateVolumeCapabilities",
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id=call(env.servicer, "CreateVolume",
                                   create_req("w", MiB)).volume.volume_id,
                    volume_capabilities=[cap]))
    assert not resp.HasField("confirmed") and "access mode 99" in resp.message


def test_echoed_user_input_is_truncated(env):
    huge = "x" * 1_000_000
    for params in ({huge: "1"}, {"thinProvision": huge}, {"fsType": huge},
                   {"target": huge}, {"clearMethod": huge}):
        msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume",
                          create_req("v", MiB, params=params))
        assert len(msg) < 400 and "1000000 characters" in msg
    msg = expect_code(C.NOT_FOUND, env.servicer, "ControllerGetVolume",
                      csi_pb2.ControllerGetVolumeRequest(volume_id=huge))
    assert len(msg) < 400
    assert echo("short") == "'short'"
    assert len(CsiError("y" * 10**6).message) <= MESSAGE_LIMIT + 20
