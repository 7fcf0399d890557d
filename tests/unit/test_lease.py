"""The driver's own leader election (controller/lease.py) against an
in-memory coordination.k8s.io Lease store with the API server's optimistic
concurrency (a replace with a stale resourceVersion is 409), so the rules are
checked without a cluster; tests/e2e/k8s/test_failover.py runs two replicas
on a real kube-apiserver."""

from __future__ import annotations

import copy
import threading
import time

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from csi_spdk.controller.lease import LeaseElector  # noqa: E402
from csi_spdk.identity import IdentityServicer  # noqa: E402


class FakeLeases:
    """read/create/replace_namespaced_lease with resourceVersion checks."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], client.V1Lease] = {}
        self.version = 0
        self.lock = threading.Lock()
        self.down = False           # the API server is unreachable

    def _check(self) -> None:
        if self.down:
            raise ApiException(status=503, reason="unavailable")

    def read_namespaced_lease(self, name, namespace):
        with self.lock:
            self._check()
            if (namespace, name) not in self.store:
                raise ApiException(status=404, reason="not found")
            return copy.deepcopy(self.store[(namespace, name)])

    def create_namespaced_lease(self, namespace, body):
        with self.lock:
            self._check()
            key = (namespace, body.metadata.name)
            if key in self.store:
                raise ApiException(status=409, reason="exists")
            self.version += 1
            body = copy.deepcopy(body)
            body.metadata.resource_version = str(self.version)
            self.store[key] = body
            return body

    def replace_namespaced_lease(self, name, namespace, body):
        with self.lock:
            self._check()
            cur = self.store[(namespace, name)]
            if body.metadata.resource_version != cur.metadata.resource_version:
                raise ApiException(status=409, reason="conflict")
            self.version += 1
            body = copy.deepcopy(body)
            body.metadata.resource_version = str(self.version)
            self.store[(namespace, name)] = body
            return body

    def holder(self, name="drv-controller", namespace="ns") -> str:
        with self.lock:
            lease = self.store.get((namespace, name))
            return lease.spec.holder_identity if lease else ""


def elector(api, identity, lost=None) -> LeaseElector:
    # long enough that a loaded machine does not make the holder miss a renewal
    return LeaseElector("drv-controller", "ns", identity, api=api, lease_duration=4.0,
                        renew_deadline=3.0, retry_period=0.2, on_lost=lost or (lambda: None))


def wait_for(check, timeout=10.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_one_holder_and_the_standby_takes_over_after_expiry():
    api = FakeLeases()
    a, b = elector(api, "pod-a"), elector(api, "pod-b")
    a.start()
    wait_for(lambda: a.is_leader)
    b.start()
    time.sleep(1.0)                         # b keeps trying while a renews
    assert api.holder() == "pod-a" and not b.is_leader
    a.stop(release=False)                   # a dies without handing it back
    took = wait_for(lambda: b.is_leader)
    assert api.holder() == "pod-b" and took >= 2.0   # only after the lease expired
    lease = api.read_namespaced_lease("drv-controller", "ns")
    assert lease.spec.lease_transitions == 1
    b.stop()


def test_release_hands_over_at_once():
    api = FakeLeases()
    a, b = elector(api, "pod-a"), elector(api, "pod-b")
    a.start()
    wait_for(lambda: a.is_leader)
    b.start()
    time.sleep(0.3)
    a.stop()                                # SIGTERM: the lease is given back
    lease = api.read_namespaced_lease("drv-controller", "ns")
    assert (lease.spec.holder_identity, lease.spec.lease_duration_seconds) in (
        ("", 1), ("pod-b", 1)) or lease.spec.holder_identity == "pod-b"
    wait_for(lambda: b.is_leader)
    assert api.holder() == "pod-b"
    b.stop()


def test_a_holder_that_cannot_renew_stops_acting():
    api = FakeLeases()
    lost = threading.Event()
    a = elector(api, "pod-a", lost.set)
    a.start()
    wait_for(lambda: a.is_leader)
    api.down = True
    wait_for(lost.is_set, timeout=15)
    assert not a.is_leader
    a.stop(release=False)


def test_probe_is_ready_only_on_the_holder():
    api = FakeLeases()
    a, b = elector(api, "pod-a"), elector(api, "pod-b")
    a.start()
    wait_for(lambda: a.is_leader)
    b.start()
    time.sleep(0.3)
    ids = {e.identity: IdentityServicer("drv", ready=lambda e=e: e.is_leader) for e in (a, b)}
    assert ids["pod-a"].Probe(None, None).ready.value is True
    assert ids["pod-b"].Probe(None, None).ready.value is False
    a.stop(release=False)
    b.stop()
