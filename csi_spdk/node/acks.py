"""The node's acknowledgements of rotated keys: ConfigMap
``csi-spdk-node-<node>`` in the driver's namespace, one entry per volume,
``<lvol uuid>: "<host key fp>/<controller key fp>"`` (first 8 hex of each
key's SHA-256, as the target's key names carry; no key material).

``csi-spdk rotate-keys`` (controller/rotate_nodes.py) waits for these before
it moves the target on: the target cannot say which key authenticated a
connection. Only this node writes its ConfigMap: the chart's
ValidatingAdmissionPolicy admits a node ServiceAccount's write only when the
object's name matches the node-name claim of its Pod-bound token, so a
compromised node can misreport only its own connections.

The ``kubernetes`` client is imported on first use (a node without
acknowledgements, dev and the guest tests, never loads it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from .. import contract
from ..errors import Unavailable

log = logging.getLogger("csi_spdk.node.acks")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Acks(Protocol):
    def record(self, lvol_uuid: str, pair: str) -> None:
        """This node's live controller of the volume holds ``pair`` (fingerprints)."""

    def forget(self, lvol_uuid: str) -> None:
        """The volume is no longer staged here."""


class ConfigMapAcks:
    def __init__(self, node: str, namespace: str, api=None, timeout: float = 10.0) -> None:
        """``api``: a ``kubernetes.client.CoreV1Api`` (tests pass their own);
        by default the Pod's (projected) ServiceAccount token, or $KUBECONFIG,
        loaded at the first acknowledgement (the node plugin's start stays
        free of the client). ``timeout``: seconds per API request (a stage or
        publish waits for it: an unreachable API must not hold them long)."""
        self._api = api
        self.node = node
        self.namespace = namespace
        self.name = contract.ack_configmap_name(node)
        self.timeout = timeout

    @property
    def api(self):
        if self._api is None:
            from kubernetes import client, config
            try:
                if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
                    config.load_incluster_config()
                else:
                    config.load_kube_config(os.environ["KUBECONFIG"])
            except (config.ConfigException, OSError, KeyError, ValueError) as e:
                raise Unavailable(f"Kubernetes API: no usable credentials for ConfigMap "
                                  f"{self.namespace}/{self.name} ({type(e).__name__})") from None
            self._api = client.CoreV1Api()
        return self._api

    def _call(self, what: str, fn, *args):
        import urllib3
        from kubernetes.client.exceptions import ApiException
        try:
            return fn(*args, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status in (404, 409):
                raise
            # the body may echo the request: only the status goes into the error
            raise Unavailable(f"Kubernetes API: {what} ConfigMap {self.namespace}/{self.name} "
                              f"failed ({e.status} {e.reason})") from None
        except (OSError, urllib3.exceptions.HTTPError) as e:   # unreachable, timed out
            raise Unavailable(f"Kubernetes API: {what} ConfigMap {self.namespace}/{self.name} "
                              f"failed ({type(e).__name__})") from None

    def record(self, lvol_uuid: str, pair: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        patch = {"data": {lvol_uuid: pair}}
        try:
            self._call("patching", self.api.patch_namespaced_config_map, self.name,
                       self.namespace, patch)
            return
        except ApiException as e:
            if e.status != 404:
                raise Unavailable(f"Kubernetes API: patching ConfigMap {self.name} failed "
                                  f"({e.status})") from None
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(
            name=self.name, namespace=self.namespace,
            labels={contract.ACK_LABEL: "true", "app.kubernetes.io/managed-by": "csi-spdk"}),
            data={lvol_uuid: pair})
        try:
            self._call("creating", self.api.create_namespaced_config_map, self.namespace, body)
        except ApiException:   # 409: created meanwhile (an ack of another volume)
            self._call("patching", self.api.patch_namespaced_config_map, self.name,
                       self.namespace, patch)

    def forget(self, lvol_uuid: str) -> None:
        from kubernetes.client.exceptions import ApiException
        with contextlib.suppress(ApiException):   # 404/409: nothing acknowledged here
            self._call("patching", self.api.patch_namespaced_config_map, self.name,
                       self.namespace, {"data": {lvol_uuid: None}})


def from_args(node: str, namespace: str, enabled: str) -> Acks | None:
    """``--acks``: "auto" = on in a Pod with a ServiceAccount token (or with
    $KUBECONFIG), "on", "off"."""
    if enabled == "off":
        return None
    have = (os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists()) or \
        os.environ.get("KUBECONFIG")
    if enabled == "auto" and not have:
        return None
    ns = namespace or os.environ.get("POD_NAMESPACE") or (
        (SA_DIR / "namespace").read_text().strip() if (SA_DIR / "namespace").exists() else "")
    if not ns:
        raise ValueError("--acks needs the driver's namespace (--acks-namespace or "
                         "$POD_NAMESPACE)")
    return ConfigMapAcks(node, ns)
