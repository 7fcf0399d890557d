"""One active controller among replicas: a coordination.k8s.io Lease.

The sidecars elect a leader each, on their own Lease, so with two controller
Pods the provisioner's leader and the snapshotter's could sit in different
Pods whose in-process locks (per volume, lineage, capacity admission) do not
see each other. The driver therefore elects itself first, on its own Lease
(``<driver name>-controller``, client-go's rules: the holder renews every
``retry_period``; a candidate takes an expired lease, judged by its own clock
from when it last saw the record change; optimistic concurrency through the
resourceVersion). Only the holder answers Probe ready: the sidecars of a
standby Pod wait in ProbeForever and never campaign for their own leases, so
every sidecar leader is in the Pod of the active driver. A holder that cannot
renew within ``renew_deadline`` stops the process (its sidecars exit when the
connection drops, and the Pod restarts them as candidates); the reconciler
runs only while this process holds the lease.

Needs get/create/update on leases in the namespace (the chart's Role).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def default_identity() -> str:
    """The Pod's name (the Downward API's POD_NAME), else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


class LeaseElector:
    """Campaign for and hold one Lease on a daemon thread."""

    def __init__(self, name: str, namespace: str, identity: str, *, api=None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0,
                 on_lost: Callable[[], None] | None = None) -> None:
        if not renew_deadline < lease_duration:
            raise ValueError("the renew deadline must be shorter than the lease duration")
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self.on_lost = on_lost or (lambda: os._exit(1))
        self._api = api
        self._leader = threading.Event()
        self._stop = threading.Event()
        self._observed: tuple[str, str, str] | None = None  # holder, renew time, version
        self._observed_at = 0.0                              # monotonic
        self._renewed_at = 0.0
        self._thread: threading.Thread | None = None

    # --- the API ------------------------------------------------------------------
    def api(self):
        if self._api is None:
            from kubernetes import client, config
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config(os.environ.get("KUBECONFIG"))
            self._api = client.CoordinationV1Api()
        return self._api

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop campaigning; the holder hands the lease back (holder cleared,
        1 s duration) so a standby takes over at once instead of after expiry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_period + 5)
        if release and self.is_leader:
            self._leader.clear()
            try:
                self._update(lambda spec: (setattr(spec, "holder_identity", ""),
                                           setattr(spec, "lease_duration_seconds", 1)))
            except Exception as err:  # noqa: BLE001 - best effort on the way out
                log.warning("lease release failed", extra={"f": {"error": str(err)}})

    # --- the loop -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ok = self._try_acquire_or_renew()
            except Exception as err:  # noqa: BLE001 - the API may be away for a while
                log.warning("lease call failed", extra={"f": {"lease": self.name,
                                                              "error": str(err)}})
                ok = False
            now = time.monotonic()
            if ok:
                self._renewed_at = now
                if not self.is_leader:
                    log.info("lease acquired: this controller is active",
                             extra={"f": {"lease": self.name, "identity": self.identity}})
                    self._leader.set()
            elif self.is_leader and now - self._renewed_at > self.renew_deadline:
                self._leader.clear()
                log.error("lease lost: stopping so that only one controller acts",
                          extra={"f": {"lease": self.name, "identity": self.identity}})
                self.on_lost()
                return
            self._stop.wait(self.retry_period)

    def _try_acquire_or_renew(self) -> bool:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = self.api()
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(client.V1LeaseSpec(lease_transitions=0), acquired=True))
            try:
                api.create_namespaced_lease(self.namespace, body)
            except ApiException as err2:
                if err2.status == 409:
                    return False   # another candidate created it first
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        record = (spec.holder_identity or "", str(spec.renew_time),
                  lease.metadata.resource_version)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = spec.holder_identity or ""
        duration = spec.lease_duration_seconds or self.lease_duration
        if holder and holder != self.identity and \
                time.monotonic() < self._observed_at + duration:
            return False           # held by another, not expired by our clock
        acquired = holder != self.identity
        if acquired:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        lease.spec = self._spec(spec, acquired)
        try:
            api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as err:
            if err.status == 409:
                return False       # changed since we read it: someone else renewed
            raise
        return True

    def _spec(self, spec, acquired: bool):
        now = _now()
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = int(self.lease_duration)
        spec.renew_time = now
        if acquired or spec.acquire_time is None:
            spec.acquire_time = now
        return spec

    def _update(self, change: Callable) -> None:
        api = self.api()
        lease = api.read_namespaced_lease(self.name, self.namespace)
        if (lease.spec.holder_identity or "") != self.identity:
            return
        change(lease.spec)
        api.replace_namespaced_lease(self.name, self.namespace, lease)
