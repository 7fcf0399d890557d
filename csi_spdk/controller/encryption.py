"""Encryption at rest (StorageClass parameter ``encryption``: none, node, target).

One key per volume (docs/DESIGN.md "Encryption at rest"). Where it comes from,
in this order: a clone or restore copies its source's key; a key the user
gives in CreateVolume's secrets (the provisioner secret the templated
``csi.storage.k8s.io/provisioner-secret-name`` parameters name) is used;
otherwise the driver generates one. Either way the key is kept with the
volume (``KeyStore``): in Kubernetes in the volume's own Secret
(``csi-spdk-auth-<PV>``, the one the node-stage and controller-publish secret
parameters name, next to the DH-HMAC-CHAP keys), in dev/tests in 0600 files.
A snapshot gets a copy too, so restoring it works after its source volume is
deleted. The key is deleted with the volume (or snapshot).

``node`` mode: the node opens LUKS2 with the key from its node-stage secrets
(node/luks.py); the target never sees it. ``target`` mode: ControllerPublish
stacks SPDK's crypto bdev with the key (controller/crypto.py) and exports it;
the last unpublish and DeleteVolume remove bdev and key from SPDK.

Keys never appear in logs, errors, metrics or contexts: messages name the
Secret, never its content; ``VolumeKey``'s repr hides the material.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import secrets as csprng
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .. import atomicfile, contract
from ..errors import FailedPrecondition, InvalidArgument, Unavailable, echo
from . import crypto
from .auth import LABEL_MANAGED, LABEL_VOLUME, secret_name

log = logging.getLogger("csi_spdk.encryption")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def parse_mode(params: dict[str, str]) -> str:
    mode = params.get("encryption") or contract.ENCRYPTION_NONE
    if mode not in contract.ENCRYPTION_MODES:
        raise InvalidArgument(f"parameter encryption={echo(mode)} must be one of "
                              f"{', '.join(contract.ENCRYPTION_MODES)}")
    return mode


@dataclass(frozen=True)
class VolumeKey:
    """A volume's encryption key (``repr`` hides the material)."""

    mode: str
    material: str = field(repr=False)   # 128 hex digits

    @classmethod
    def generate(cls, mode: str) -> VolumeKey:
        while True:
            material = csprng.token_hex(contract.ENCRYPTION_KEY_HEX // 2)
            if material[:64] != material[64:]:
                return cls(mode, material)

    @classmethod
    def from_secrets(cls, data: dict[str, str], where: str, mode: str = "") -> VolumeKey | None:
        """The key in a secret's data, None without one. A malformed key is
        FAILED_PRECONDITION naming ``where`` (the Secret), never the value."""
        material = (data.get(contract.SECRET_ENCRYPTION_KEY) or "").strip()
        if not material:
            return None
        half = contract.ENCRYPTION_KEY_HEX // 2
        if len(material) != contract.ENCRYPTION_KEY_HEX or not _HEX.match(material) or \
                material[:half].lower() == material[half:].lower():
            raise FailedPrecondition(
                f"{where}: {contract.SECRET_ENCRYPTION_KEY!r} is not a volume encryption key "
                f"({contract.ENCRYPTION_KEY_HEX} hex digits whose two halves differ: "
                "AES-XTS-256 key and key2)")
        stored = (data.get(contract.SECRET_ENCRYPTION_MODE) or "").strip()
        return cls(stored if stored in contract.ENCRYPTION_MODES else mode, material.lower())

    @property
    def key(self) -> str:
        return self.material[:contract.ENCRYPTION_KEY_HEX // 2]

    @property
    def key2(self) -> str:
        return self.material[contract.ENCRYPTION_KEY_HEX // 2:]

    def secrets(self) -> dict[str, str]:
        return {contract.SECRET_ENCRYPTION_KEY: self.material,
                contract.SECRET_ENCRYPTION_MODE: self.mode}


# --- where the keys live ---------------------------------------------------------------
class KeyStore(Protocol):
    def get(self, uuid: str) -> VolumeKey | None: ...

    def put(self, uuid: str, name: str, key: VolumeKey) -> VolumeKey:
        """Keep ``key`` for the volume/snapshot ``uuid`` (idempotent: a key
        already kept wins) and return the kept one."""

    def delete(self, uuid: str) -> None: ...

    def where(self, uuid: str, name: str = "") -> str:
        """How to name the key's home in a message (a Secret's name)."""


class FileKeyStore:
    """dev/tests: one 0600 JSON file per volume in a 0700 directory, standing in
    for the per-volume Secrets of Kubernetes."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self._mutex = threading.Lock()

    def _path(self, uuid: str) -> Path:
        return self.dir / f"{uuid}.json"

    def where(self, uuid: str, name: str = "") -> str:
        return f"key file {self._path(uuid)}"

    def get(self, uuid: str) -> VolumeKey | None:
        try:
            data = atomicfile.read_json(self._path(uuid))
        except (OSError, ValueError):
            raise FailedPrecondition(f"{self.where(uuid)} is unreadable") from None
        if not isinstance(data, dict):
            return None
        return VolumeKey.from_secrets(data, self.where(uuid))

    def put(self, uuid: str, name: str, key: VolumeKey) -> VolumeKey:
        with self._mutex:
            existing = self.get(uuid)
            if existing is not None:
                return existing
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            atomicfile.write_json(self._path(uuid), {**key.secrets(), "name": name}, 0o600)
            return key

    def delete(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(uuid).unlink()


class SecretKeyStore:
    """The key as ``encryptionKey``/``encryptionMode`` of the volume's Secret
    (found by its ``csi-spdk.io/volume`` label, created when auth made none),
    in the namespace of controller/k8s_secrets.py's store. A snapshot's copy
    lives in a Secret of its own, ``csi-spdk-auth-<snapshot name>``."""

    def __init__(self, namespace: str = "", api=None) -> None:
        from .k8s_secrets import KubernetesSecrets
        self._k8s = KubernetesSecrets(namespace, api)   # the client and the namespace
        self.api, self.namespace = self._k8s.api, self._k8s.namespace

    def where(self, uuid: str, name: str = "") -> str:
        if name:
            return f"Secret {self.namespace}/{secret_name(name)}"
        try:
            found = [x.metadata.name for x in self._found(uuid)]
        except Unavailable:
            found = []
        if found:
            return f"Secret {self.namespace}/{found[0]}"
        return (f"the Secret labelled {LABEL_VOLUME}={uuid} in namespace {self.namespace} "
                "(there is none)")

    def _found(self, uuid: str) -> list:
        return self._k8s._find(uuid)

    def get(self, uuid: str) -> VolumeKey | None:
        for secret in self._found(uuid):
            data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            key = VolumeKey.from_secrets(data, f"Secret {self.namespace}/{secret.metadata.name}")
            if key is not None:
                return key
        return None

    def put(self, uuid: str, name: str, key: VolumeKey) -> VolumeKey:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        found = self._found(uuid)
        for secret in found:
            data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            existing = VolumeKey.from_secrets(data, f"Secret {secret.metadata.name}")
            if existing is not None:
                return existing
        if found:   # the volume's auth Secret: add the key to it
            self._k8s._call("updating a Secret", self.api.patch_namespaced_secret,
                            found[0].metadata.name, self.namespace,
                            {"stringData": key.secrets()})
            return key
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=secret_name(name), namespace=self.namespace,
                labels={LABEL_MANAGED: "csi-spdk", LABEL_VOLUME: uuid},
                annotations={"csi-spdk.io/volume-name": name}),
            type="csi-spdk.io/volume-keys", string_data=key.secrets())
        try:
            self._k8s._call("creating a Secret", self.api.create_namespaced_secret,
                            self.namespace, body)
        except ApiException:   # 409: created meanwhile
            existing = self.get(uuid)
            if existing is None:
                raise Unavailable(f"Kubernetes API: Secret {secret_name(name)} exists but "
                                  "holds no key for this volume") from None
            return existing
        return key

    def delete(self, uuid: str) -> None:
        for secret in self._found(uuid):
            self._k8s._call("deleting a Secret", self.api.delete_namespaced_secret,
                            secret.metadata.name, self.namespace)


# --- the controller's use of it --------------------------------------------------------
class VolumeEncryption:
    """What CreateVolume, CreateSnapshot, Publish, Unpublish and DeleteVolume do
    about encryption keys. ``store``: a KeyStore, or None (then encrypted
    volumes are FAILED_PRECONDITION before anything is created)."""

    def __init__(self, store: KeyStore | None) -> None:
        self.store = store

    def _need_store(self) -> KeyStore:
        if self.store is None:
            raise FailedPrecondition(
                "encryption needs somewhere to keep each volume's key: run the controller "
                "in Kubernetes (it keeps the key in the volume's Secret) or, for dev/tests, "
                "set encryption.keyDir in its config; or use encryption: none")
        return self.store

    def mode_of_source(self, source_uuid: str) -> str:
        key = self.store.get(source_uuid) if self.store is not None else None
        return key.mode if key is not None and key.mode else contract.ENCRYPTION_NONE

    def check(self, mode: str, source_uuid: str = "") -> None:
        """Before anything is created: can the volume get its key, and does
        the mode fit its content source's (ciphertext stays ciphertext)?"""
        if mode != contract.ENCRYPTION_NONE:
            self._need_store()
        if source_uuid:
            src_mode = self.mode_of_source(source_uuid)
            if src_mode != mode:
                raise InvalidArgument(
                    f"parameter encryption={mode} does not match the content source's "
                    f"encryption ({src_mode}): a clone or restore holds its source's data "
                    f"as it is, so it must use encryption: {src_mode}")

    def created(self, uuid: str, name: str, mode: str, secrets: dict[str, str],
                source_uuid: str = "") -> dict[str, str]:
        """The new volume's key (copied, the user's, or generated); returns its
        volume_context entries (the mode only)."""
        if mode == contract.ENCRYPTION_NONE:
            return {}
        store = self._need_store()
        if source_uuid:
            key = store.get(source_uuid)
            if key is None:
                raise FailedPrecondition(
                    f"the content source's encryption key is missing from "
                    f"{store.where(source_uuid)}; the clone cannot be opened without it")
        else:
            key = VolumeKey.from_secrets(dict(secrets), "the provisioner secret", mode) \
                or VolumeKey.generate(mode)
        store.put(uuid, name, VolumeKey(mode, key.material))
        return {contract.VC_ENCRYPTION: mode}

    def snapshot_taken(self, source_uuid: str, snap_uuid: str, snap_name: str) -> None:
        """A snapshot of an encrypted volume gets a copy of its key."""
        if self.store is None:
            return
        key = self.store.get(source_uuid)
        if key is not None:
            self.store.put(snap_uuid, snap_name, key)

    def key_for(self, uuid: str, secrets: dict[str, str], name: str = "") -> VolumeKey:
        """The key to open the volume with: the given secrets' (controller-publish
        secret), else the store's; FAILED_PRECONDITION naming where it should be."""
        key = VolumeKey.from_secrets(dict(secrets), "the controller-publish secret") \
            if secrets else None
        kept = self.store.get(uuid) if self.store is not None else None
        if key is not None and kept is not None and key.material != kept.material:
            raise FailedPrecondition(
                f"the controller-publish secret's {contract.SECRET_ENCRYPTION_KEY!r} is not "
                f"the key of volume {uuid} kept in {self.store.where(uuid, name)}; refusing "
                "to open the volume with another key (its data would read as garbage)")
        key = key or kept
        if key is None:
            where = self.store.where(uuid, name) if self.store is not None else \
                "the controller-publish secret"
            raise FailedPrecondition(f"volume {uuid} is encrypted but its key is missing "
                                     f"from {where}")
        return key

    def publish_bdev(self, api, uuid: str, mode: str, secrets: dict[str, str]) -> str | None:
        """target mode: the crypto bdev to export instead of the lvol."""
        if mode != contract.ENCRYPTION_TARGET:
            return None
        key = self.key_for(uuid, secrets)
        return crypto.stack(api, uuid, key.key, key.key2, key.material)

    def stacked(self, api, uuid: str) -> bool:
        """Whether the volume's crypto bdev is open on the target."""
        return crypto.bdev_of(api, uuid) is not None

    def _kept(self, uuid: str) -> VolumeKey | None:
        with contextlib.suppress(FailedPrecondition):
            return self.store.get(uuid) if self.store is not None else None
        return None

    def unexported(self, api, uuid: str, stacked: bool | None = None) -> None:
        """The volume's subsystem is gone: so are its crypto bdev and key
        (the key also when a crash came between deleting the two).

        ``stacked``: what the unexport or delete read of SPDK said
        (``intents.stacked``). False (the lvol itself was exported, or lies
        unclaimed) skips the key store read and the crypto look-up: the hot
        path of an unencrypted volume. True or None (unknown: a retry, a crash
        between stacking and exporting) looks everything up, so those converge.
        An accel key a crash left between creating it and stacking the bdev
        (nothing on the lvol, so False) stays until DeleteVolume (``deleted``)."""
        if stacked is False:
            return
        key = self._kept(uuid)
        if key is not None and key.mode == contract.ENCRYPTION_TARGET:
            crypto.unstack(api, uuid, key.material)
        elif stacked or (stacked is None and crypto.bdev_of(api, uuid) is not None):
            crypto.unstack(api, uuid)

    def deleted(self, api, uuid: str, stacked: bool | None = None) -> None:
        """DeleteVolume/DeleteSnapshot: nothing of the key left in SPDK or the
        store (``stacked`` as for ``unexported``; False still reads the store,
        which the delete needs anyway, but makes no SPDK call for a volume
        that is not target-encrypted)."""
        if api is not None and stacked is False:
            # nothing on the lvol; only an accel key a crash left between its
            # create and the crypto bdev's (a publish nobody unpublished) may be
            key = self._kept(uuid)
            if key is not None and key.mode == contract.ENCRYPTION_TARGET:
                crypto.destroy_key(api, contract.crypto_key_name(uuid, key.material))
        elif api is not None:
            self.unexported(api, uuid, stacked)
        if self.store is not None:
            self.store.delete(uuid)
