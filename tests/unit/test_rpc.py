"""The @rpc decorator stack: locking, error mapping, log lines, metrics,
and that secrets never reach the log."""

from __future__ import annotations

import json
import logging
import threading

import grpc
import pytest

from csi_spdk import metrics
from csi_spdk.errors import NotFound
from csi_spdk.locks import KeyedLocks
from csi_spdk.log import JsonFormatter, redact
from csi_spdk.proto import csi_pb2
from csi_spdk.rpc import rpc


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    def abort(self, code, details):
        raise Aborted(code, details)


class Servicer:
    def __init__(self) -> None:
        self.locks = KeyedLocks()
        self.entered = threading.Event()
        self.release = threading.Event()

    @rpc(lock=("volume_id",))
    def DeleteVolume(self, request, context):
        if request.volume_id == "missing":
            raise NotFound("volume 'missing' does not exist")
        if request.volume_id == "boom":
            raise RuntimeError("kaboom")
        if request.volume_id == "slow":
            self.entered.set()
            self.release.wait(5)
        return csi_pb2.DeleteVolumeResponse()

    @rpc(quiet=True)
    def Probe(self, request, context):
        if request == csi_pb2.ProbeRequest() and getattr(self, "fail", False):
            raise NotFound("gone")
        return csi_pb2.ProbeResponse()


def _counter(method: str, code: str) -> float:
    return metrics.CSI_REQUESTS.labels(method, code)._value.get()


def test_ok_returns_response_and_counts() -> None:
    before = _counter("DeleteVolume", "OK")
    resp = Servicer().DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v"), FakeContext())
    assert isinstance(resp, csi_pb2.DeleteVolumeResponse)
    assert _counter("DeleteVolume", "OK") == before + 1


def test_csi_error_keeps_its_code_and_message() -> None:
    with pytest.raises(Aborted) as info:
        Servicer().DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="missing"), FakeContext())
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.details == "volume 'missing' does not exist"


def test_unexpected_exception_is_internal() -> None:
    with pytest.raises(Aborted) as info:
        Servicer().DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="boom"), FakeContext())
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "RuntimeError: kaboom" in info.value.details


def test_same_volume_concurrently_is_aborted_other_volume_runs() -> None:
    s = Servicer()
    t = threading.Thread(target=s.DeleteVolume,
                         args=(csi_pb2.DeleteVolumeRequest(volume_id="slow"), FakeContext()))
    t.start()
    assert s.entered.wait(5)
    with pytest.raises(Aborted) as info:
        s.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="slow"), FakeContext())
    assert info.value.code == grpc.StatusCode.ABORTED
    assert "in progress" in info.value.details
    # a different volume is not blocked by the first
    s.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="other"), FakeContext())
    s.release.set()
    t.join()
    # and the lock is released afterwards
    s.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="slow"), FakeContext())


def test_one_structured_log_line_per_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="csi_spdk.rpc")
    with pytest.raises(Aborted):
        Servicer().DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="missing"), FakeContext())
    (record,) = [r for r in caplog.records if r.name == "csi_spdk.rpc"]
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "DeleteVolume"
    assert line["volume"] == "missing"
    assert line["code"] == "NOT_FOUND"
    assert line["duration_ms"] >= 0
    assert line["level"] == "warning"


def test_quiet_call_logs_success_at_debug_and_failure_as_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """Probe-like calls repeat every second from each sidecar: their success
    is not an info line; their failure still is a warning."""
    caplog.set_level(logging.INFO, logger="csi_spdk.rpc")
    s = Servicer()
    s.Probe(csi_pb2.ProbeRequest(), FakeContext())
    assert [r for r in caplog.records if r.name == "csi_spdk.rpc"] == []
    caplog.set_level(logging.DEBUG, logger="csi_spdk.rpc")
    s.Probe(csi_pb2.ProbeRequest(), FakeContext())
    assert [r.levelname for r in caplog.records
            if r.name == "csi_spdk.rpc" and r.getMessage() == "Probe"] == ["DEBUG"]
    caplog.clear()
    caplog.set_level(logging.INFO, logger="csi_spdk.rpc")
    s.fail = True
    with pytest.raises(Aborted):
        s.Probe(csi_pb2.ProbeRequest(), FakeContext())
    assert [r.levelname for r in caplog.records if r.name == "csi_spdk.rpc"] == ["WARNING"]


def test_secrets_are_redacted_everywhere() -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-1", secrets={"password": "hunter2"},
        parameters={"thinProvision": "true", "dhchapKey": "DHHC-1:00:abc"},
    )
    text = json.dumps(redact(req))
    assert "hunter2" not in text and "DHHC-1" not in text
    assert redact(req)["name"] == "pvc-1"
    assert redact(req)["parameters"]["thinProvision"] == "true"
    stage = csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"k": "s3cret"},
                                           volume_context={"target": "a"})
    assert "s3cret" not in json.dumps(redact(stage))


def test_redact_walks_nested_and_repeated_messages() -> None:
    """Debug logging redacts every request; nested messages must not break it."""
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs"))
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[cap, cap], secrets={"password": "hunter2"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=5),
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s")))
    out = redact(req)
    assert out["volume_capabilities"][1]["mount"]["fs_type"] == "xfs"
    assert out["capacity_range"]["required_bytes"] == "5"
    assert out["volume_content_source"]["snapshot"]["snapshot_id"] == "s"
    assert "hunter2" not in json.dumps(out)


def test_debug_log_of_request_has_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="csi_spdk.rpc")
    req = csi_pb2.DeleteVolumeRequest(volume_id="v", secrets={"token": "hunter2"})
    Servicer().DeleteVolume(req, FakeContext())
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "hunter2" not in text
    assert '"request"' in text  # the request was logged, redacted
