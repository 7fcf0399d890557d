"""Volume keys as Kubernetes Secrets in the controller's own namespace.

One Secret per volume, ``csi-spdk-auth-<PV name>`` (the chart's
StorageClass points ``csi.storage.k8s.io/node-stage-secret-name`` and
``controller-publish-secret-name`` at ``csi-spdk-auth-${pv.name}`` in this
namespace), labelled with the volume's lvol uuid so DeleteVolume (which
gets only the volume id) finds it. kubelet hands a Secret only to the node
whose Pod uses the volume: node isolation comes from Kubernetes.

Ownership: no ownerReference to the PV, on purpose (docs/DESIGN.md,
"Secret lifetime"): with reclaimPolicy Retain an admin deletes the PV by
hand while the volume and its data stay, and a garbage-collected key would
lock that data out. The Secret is labelled ``app.kubernetes.io/managed-by:
csi-spdk`` and ``csi-spdk.io/volume: <lvol uuid>``, annotated with the
volume name, and deleted by DeleteVolume only. RBAC: get/list/create/delete
on Secrets in this namespace only (deploy/helm/csi-spdk/templates/rbac.yaml).

The ``kubernetes`` client is imported on first use: dev, csi-sanity and the
node never need it.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from .. import contract
from ..errors import Unavailable
from .auth import LABEL_MANAGED, LABEL_VOLUME, VolumeKeys, secret_name

log = logging.getLogger("csi_spdk.auth")
NEXT = contract.SECRET_NEXT_PREFIX   # keys a rotation has not committed yet
STEP = contract.SECRET_ROTATION_STEP  # which pair the target holds (rotation)
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SA_NAMESPACE.exists()


class KubernetesSecrets:
    def __init__(self, namespace: str = "", api=None) -> None:
        """``api``: a ``kubernetes.client.CoreV1Api`` (tests pass one with their
        own kubeconfig); by default the in-cluster service account's."""
        if api is None:
            from kubernetes import client, config
            if in_cluster():
                config.load_incluster_config()
            else:   # a controller outside the cluster (the k8s test rig): $KUBECONFIG
                config.load_kube_config(os.environ["KUBECONFIG"])
            api = client.CoreV1Api()
        self.api = api
        self.namespace = namespace or os.environ.get("POD_NAMESPACE") or (
            SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default")

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status == 409:
                raise
            # the body may echo the object: only the status goes into the error
            raise Unavailable(f"Kubernetes API: {what} failed ({e.status} {e.reason})") from None

    def _find(self, lvol_uuid: str) -> list:
        found = self._call("listing Secrets", self.api.list_namespaced_secret, self.namespace,
                           label_selector=f"{LABEL_VOLUME}={lvol_uuid}")
        return list(found.items) if found is not None else []

    def create(self, lvol_uuid: str, volume_name: str, keys: VolumeKeys) -> VolumeKeys:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        existing = self.get(lvol_uuid)
        if existing is not None:
            return existing   # a retried CreateVolume keeps the first keys
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=secret_name(volume_name), namespace=self.namespace,
                labels={LABEL_MANAGED: "csi-spdk", LABEL_VOLUME: lvol_uuid},
                annotations={"csi-spdk.io/volume-name": volume_name}),
            type="csi-spdk.io/volume-keys",
            string_data=keys.secrets())
        try:
            self._call("creating a Secret", self.api.create_namespaced_secret,
                       self.namespace, body)
        except ApiException:   # 409: a concurrent or earlier create won
            existing = self.get(lvol_uuid)
            if existing is None:
                raise Unavailable(f"Kubernetes API: Secret {secret_name(volume_name)} exists "
                                  "but is not labelled for this volume") from None
            return existing
        log.info("volume keys stored", extra={"f": {"secret": secret_name(volume_name),
                                                     "namespace": self.namespace}})
        return keys

    def where(self, lvol_uuid: str, volume_name: str = "") -> str:
        """Where the volume's keys should be, for error messages."""
        name = secret_name(volume_name) if volume_name else "csi-spdk-auth-<PV name>"
        return (f"Secret {self.namespace}/{name} (labelled {LABEL_VOLUME}={lvol_uuid})")

    def get(self, lvol_uuid: str) -> VolumeKeys | None:
        for secret in self._find(lvol_uuid):
            data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            keys = VolumeKeys.from_secrets(data, f"Secret {secret.metadata.name}")
            if keys is not None:
                return keys
        return None

    # --- rotation (controller/rotate.py): the next keys, kept until committed ---
    def pending(self, lvol_uuid: str) -> VolumeKeys | None:
        for secret in self._find(lvol_uuid):
            data = {k[len(NEXT):]: base64.b64decode(v).decode()
                    for k, v in (secret.data or {}).items() if k.startswith(NEXT)}
            if data:
                return VolumeKeys.from_secrets(data, f"Secret {secret.metadata.name} (next)")
        return None

    def set_pending(self, lvol_uuid: str, keys: VolumeKeys) -> VolumeKeys:
        """Store the next keys unless some are pending already (they win: a
        resumed rotation keeps its keys); returns the pending keys."""
        existing = self.pending(lvol_uuid)
        if existing is not None:
            return existing
        (secret,) = self._find(lvol_uuid)[:1] or (None,)
        if secret is None:
            raise Unavailable(f"no Secret labelled {LABEL_VOLUME}={lvol_uuid} in namespace "
                              f"{self.namespace}")
        self._call("patching a Secret", self.api.patch_namespaced_secret,
                   secret.metadata.name, self.namespace,
                   {"stringData": {NEXT + k: v for k, v in keys.secrets().items()}})
        return keys

    def set_step(self, lvol_uuid: str, step: int) -> None:
        """Say in the Secret which pair the target holds (``contract.rotation_pair``):
        kubelet's republish hands it to the nodes."""
        (secret,) = self._find(lvol_uuid)[:1] or (None,)
        if secret is None:
            raise Unavailable(f"no Secret labelled {LABEL_VOLUME}={lvol_uuid} in namespace "
                              f"{self.namespace}")
        if (secret.data or {}).get(STEP) == base64.b64encode(str(step).encode()).decode():
            return
        self._call("patching a Secret", self.api.patch_namespaced_secret,
                   secret.metadata.name, self.namespace, {"stringData": {STEP: str(step)}})

    def commit(self, lvol_uuid: str) -> None:
        """The pending keys become the volume's keys (one patch: current keys
        replaced and the next ones removed together)."""
        for secret in self._find(lvol_uuid):
            data = dict(secret.data or {})
            nxt = {k[len(NEXT):]: v for k, v in data.items() if k.startswith(NEXT)}
            if not nxt:
                continue
            # the next keys replace the current ones; the step and every other
            # entry (an encryption key, its mode) stay as they are or go
            patch = {k: None for k in data if k.startswith(NEXT) or k == STEP or (
                k in contract.SECRET_KEYS and k not in nxt)}
            patch.update(nxt)
            self._call("patching a Secret", self.api.patch_namespaced_secret,
                       secret.metadata.name, self.namespace, {"data": patch})
            log.info("volume keys rotated", extra={"f": {"secret": secret.metadata.name}})

    def delete(self, lvol_uuid: str) -> None:
        for secret in self._find(lvol_uuid):
            self._call("deleting a Secret", self.api.delete_namespaced_secret,
                       secret.metadata.name, self.namespace)
            log.info("volume keys deleted", extra={"f": {"secret": secret.metadata.name}})
