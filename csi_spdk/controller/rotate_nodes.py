"""The cluster's NodeSync for ``csi-spdk rotate-keys``: no call to a node.

A controller Pod cannot reach the node plugins (Unix sockets on their
nodes), so the nodes learn the pair from kubelet: ``rotate()`` has just said
in the volume's Secret which pair the target holds (``rotationStep``), and
kubelet's republish (``requiresRepublish: true``, about once a minute per
mounted volume) hands that Secret to NodePublishVolume, which re-keys the
live controller (node/rekey.py) and acknowledges the pair's fingerprints in
the node's own ConfigMap ``csi-spdk-node-<node>``. This NodeSync waits for
those acknowledgements (a watch, bounded by ``--node-timeout``); a node that
does not acknowledge in time stops the rotation with everything pending
(the Secret keeps the next keys and the step: a rerun resumes) and is named.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from .. import contract
from ..errors import Unavailable
from .auth import VolumeKeys

log = logging.getLogger("csi_spdk.rotate")


class AckWatch(Protocol):
    def wait(self, node: str, lvol_uuid: str, want: str, deadline: float) -> bool:
        """True once ``node``'s acknowledgement of the volume is ``want``;
        False when ``deadline`` (time.monotonic) passed first."""


class ClusterNodeSync:
    def __init__(self, acks: AckWatch, timeout: float) -> None:
        self.acks = acks
        self.timeout = timeout

    def reaches(self, node: str) -> bool:
        return True        # kubelet republishes on every node that mounts the volume

    def sync_all(self, volume_id: str, lvol_uuid: str, step: int,
                 nodes: list[tuple[str, str]], keys: VolumeKeys) -> None:
        want = contract.pair_fingerprint(keys.dhchap_key, keys.dhchap_ctrl_key)
        deadline = time.monotonic() + self.timeout
        lagging = [node for node, _host in nodes
                   if not self.acks.wait(node, lvol_uuid, want, deadline)]
        if lagging:
            raise Unavailable(
                f"volume {volume_id}: rotation step {step} of 2 is pending: "
                f"{', '.join(lagging)} did not re-key within {self.timeout:.0f}s (kubelet's "
                "republish does it for a mounted volume about once a minute: is the node "
                "plugin running there, can it write its ConfigMap "
                f"{contract.ack_configmap_name(lagging[0])}?); the target and the Secret "
                "keep the step and the next keys: run rotate-keys again to resume")
        log.info("nodes re-keyed", extra={"f": {"volume": volume_id, "step": step,
                                                 "nodes": [n for n, _ in nodes]}})

    def __call__(self, volume_id: str, node: str, host: str, keys: VolumeKeys) -> None:
        self.sync_all(volume_id, contract.parse_id(volume_id).lvol_uuid, 0, [(node, host)],
                      keys)


class ConfigMapAckWatch:
    """The nodes' ConfigMaps in the driver's namespace, read with a list and
    then a watch from its resourceVersion (RBAC: get/list/watch ConfigMaps)."""

    def __init__(self, api, namespace: str) -> None:
        self.api = api                 # kubernetes.client.CoreV1Api
        self.namespace = namespace

    def _list(self, name: str):
        from kubernetes.client.exceptions import ApiException
        try:
            return self.api.list_namespaced_config_map(
                self.namespace, field_selector=f"metadata.name={name}", _request_timeout=30)
        except ApiException as e:
            raise Unavailable(f"Kubernetes API: reading ConfigMap {self.namespace}/{name} "
                              f"failed ({e.status} {e.reason})") from None

    def wait(self, node: str, lvol_uuid: str, want: str, deadline: float) -> bool:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        name = contract.ack_configmap_name(node)
        while True:
            found = self._list(name)
            if any((cm.data or {}).get(lvol_uuid) == want for cm in found.items):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            w = watch.Watch()
            try:
                for event in w.stream(self.api.list_namespaced_config_map, self.namespace,
                                      field_selector=f"metadata.name={name}",
                                      resource_version=found.metadata.resource_version,
                                      timeout_seconds=max(1, int(remaining + 0.999)),
                                      _request_timeout=remaining + 30):
                    obj = event["object"]
                    if event["type"] in ("ADDED", "MODIFIED") and \
                            (getattr(obj, "data", None) or {}).get(lvol_uuid) == want:
                        return True
                    if time.monotonic() >= deadline:
                        break
            except ApiException as e:
                if e.status != 410:        # 410 Gone: the version expired, list again
                    raise Unavailable(f"Kubernetes API: watching ConfigMap {name} failed "
                                      f"({e.status} {e.reason})") from None
            finally:
                w.stop()
