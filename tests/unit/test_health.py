"""One unreachable target must not take the controller down: Probe is about
the process, per-target health is a metric and a volume condition, a
CreateVolume pinned to a healthy target works, and Probe does not touch the
SPDK request pool (so slow calls cannot fail it)."""

from __future__ import annotations

import threading

import grpc
import pytest
from controller_fixtures import REAL_RPC, MiB, call, create_req, expect_code, make_env

from csi_spdk import metrics
from csi_spdk.identity import IdentityServicer
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
pytestmark = pytest.mark.skipif(bool(REAL_RPC), reason="stops a simulator target")


def up(target: str) -> float:
    return metrics.TARGET_UP.labels(target)._value.get()


def test_one_down_target_leaves_the_others_serving(tmp_path):
    env = make_env(tmp_path, n_targets=2)
    try:
        a, b = env.targets
        s = env.servicer
        on_b = call(s, "CreateVolume", create_req("on-b", MiB, params={"target": b})).volume
        env.targets[b].server.stop()
        s.health.check()
        assert (up(a), up(b)) == (1.0, 0.0)
        assert s.health.status(b)[0] is False and s.health.status(a) == (True, "")
        ident = IdentityServicer("csi-spdk.io", controller=s)
        assert call(ident, "Probe", csi_pb2.ProbeRequest()).ready.value is True
        # pinned to the healthy target: works; unpinned: the name might be on b
        v = call(s, "CreateVolume", create_req("v", MiB, params={"target": a})).volume
        assert v.volume_id.startswith(a + ":")
        assert env.targets[a].raw.bdev_get(v.volume_id.split(":")[1]) is not None
        expect_code(C.UNAVAILABLE, s, "CreateVolume", create_req("w", MiB))
        got = call(s, "ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(
            volume_id=on_b.volume_id))
        assert got.volume.volume_id == on_b.volume_id
        assert got.status.volume_condition.abnormal
        assert "unreachable" in got.status.volume_condition.message
        healthy = call(s, "ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(
            volume_id=v.volume_id))
        assert not healthy.status.volume_condition.abnormal
    finally:
        env.close()


def test_probe_does_not_wait_for_the_spdk_pool(env, monkeypatch):
    """Every request to SPDK hangs (slow calls holding the pool): Probe still
    answers, and the health check uses a connection of its own."""
    release = threading.Event()
    real = env.t0.api.call

    def slow(method, params=None, timeout=None):
        release.wait(30)
        return real(method, params, timeout)

    monkeypatch.setattr(env.t0.api, "call", slow)
    try:
        done = threading.Event()
        ident = IdentityServicer("csi-spdk.io", controller=env.servicer)

        def probe():
            assert call(ident, "Probe", csi_pb2.ProbeRequest()).ready.value is True
            done.set()

        threading.Thread(target=probe, daemon=True).start()
        assert done.wait(10), "Probe waited for SPDK"
        env.servicer.health.check()
        assert env.servicer.health.status(env.t0.name) == (True, "")
    finally:
        release.set()
