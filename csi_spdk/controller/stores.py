"""Where the controller keeps secrets when it is not told: the default
strategies behind ``controller/auth.py`` and ``controller/encryption.py``.

Static files (dev, tests) when configured; the volumes' Kubernetes Secrets in
a cluster (or with ``$KUBECONFIG``); else none, and volumes that need one
are then FAILED_PRECONDITION. DH-HMAC-CHAP keys on a target go through its
agent when it has one (they live on the storage host), else to 0600 files on
this host (a same-host target).
"""

from __future__ import annotations

import os
import threading

from .auth import AgentKeyCustody, SameHostKeyCustody, SecretStore, StaticSecrets
from .config import Config
from .encryption import FileKeyStore, KeyStore, SecretKeyStore
from .target import Targets


def default_secret_store(config: Config) -> SecretStore | None:
    """Static keys (dev/tests) when configured, Kubernetes Secrets in a
    cluster (or with $KUBECONFIG), else none (auth: dhchap volumes are then
    FAILED_PRECONDITION)."""
    if config.auth.static_secrets_file:
        return StaticSecrets(config.auth.static_secrets_file)
    if _kubernetes_reachable():
        from .k8s_secrets import KubernetesSecrets
        return KubernetesSecrets(config.auth.secret_namespace)
    return None


def default_key_store(config: Config) -> KeyStore | None:
    """Per-volume key files (dev/tests) when configured, the volumes' Secrets
    in a cluster (or with $KUBECONFIG), else none (encrypted volumes are then
    FAILED_PRECONDITION)."""
    if config.encryption.key_dir:
        return FileKeyStore(config.encryption.key_dir)
    if _kubernetes_reachable():
        return SecretKeyStore(config.auth.secret_namespace)
    return None


def _kubernetes_reachable() -> bool:
    """In a Pod, or pointed at an API server with $KUBECONFIG (the rig, a
    workstation): the Secret-backed stores apply."""
    from .k8s_secrets import in_cluster
    return in_cluster() or bool(os.environ.get("KUBECONFIG"))


class KeyCustodies:
    """One key custody per target, made on first use (``VolumeAuth``'s
    ``key_custody``: target name -> KeyCustody)."""

    def __init__(self, targets: Targets, key_dir: str) -> None:
        self.targets = targets
        self.key_dir = key_dir
        self._lock = threading.Lock()
        self._made: dict[str, SameHostKeyCustody | AgentKeyCustody] = {}

    def __call__(self, target_name: str) -> SameHostKeyCustody | AgentKeyCustody:
        """Through the target's agent when it has one (the keys live on the
        storage host), else 0600 files on this host (a same-host target)."""
        with self._lock:
            if target_name not in self._made:
                api = self.targets[target_name].api
                self._made[target_name] = AgentKeyCustody(api) \
                    if hasattr(api.client, "put_key") else SameHostKeyCustody(
                        api, os.path.join(self.key_dir, target_name))
            return self._made[target_name]
