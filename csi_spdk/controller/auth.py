"""Controller side of data-path authentication (StorageClass parameter ``auth``).

Per-volume keys (docs/DESIGN.md says why): CreateVolume generates a
DH-HMAC-CHAP host key and controller key for the volume (CSPRNG,
``nvme_keys``) and hands them to a ``SecretStore``, which makes them the
volume's node-stage secrets; ControllerPublishVolume puts the keys on the
target through a ``KeyCustody`` (files on the target host + SPDK's
``keyring_file``) and adds the node's host entry with the key NAMES; the last
unpublish removes the keys again; DeleteVolume deletes the secrets.

Strategies:

* ``SecretStore``: ``KubernetesSecrets`` (a Secret per volume in the
  controller's namespace, named from the PV name, found again by label) or
  ``StaticSecrets`` (dev and csi-sanity only: one key pair from a file for
  every volume, so csi-sanity's ``--csi.secrets`` file can carry it).
* ``KeyCustody``: ``SameHostKeyCustody`` (0600 files in a 0700 directory on
  this host + ``keyring_file_add_key``), for dev and the tests; the target
  agent's PutKey/DeleteKey implements the same interface for remote targets.

Key names in SPDK's keyring: ``csik-<lvol uuid>-<h|c>-<8 hex of the key's
SHA-256>``: a rotated key gets a new name, and every key of a volume is found
by its prefix. Keys never appear in a log line, an error, a context.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from .. import contract, nvme_keys
from ..errors import FailedPrecondition, InvalidArgument
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError
from ..spdk.intents import parallel

log = logging.getLogger("csi_spdk.auth")

KEY_PREFIX = "csik-"
LABEL_VOLUME = "csi-spdk.io/volume"        # lvol uuid
LABEL_MANAGED = "app.kubernetes.io/managed-by"


@dataclass(frozen=True)
class VolumeKeys:
    """A volume's keys (the material; ``repr`` hides it): the DH-HMAC-CHAP
    pair for auth dhchap, the TLS PSK for auth tls."""

    dhchap_key: str = field(default="", repr=False)
    dhchap_ctrl_key: str = field(default="", repr=False)
    tls_psk: str = field(default="", repr=False)

    @classmethod
    def generate(cls, mode: str = contract.AUTH_DHCHAP) -> VolumeKeys:
        if mode == contract.AUTH_TLS:
            return cls(tls_psk=nvme_keys.generate_tls_psk().text)
        return cls(nvme_keys.generate_dhchap_key().text, nvme_keys.generate_dhchap_key().text)

    @classmethod
    def from_secrets(cls, secrets: dict[str, str], where: str) -> VolumeKeys | None:
        """The keys in a secret's data (None without any); INVALID_ARGUMENT
        names a malformed one, never its value."""
        got = {k: (secrets.get(k) or "").strip() for k in contract.SECRET_KEYS}
        if not any(got.values()):
            return None
        parsers = {contract.SECRET_DHCHAP_KEY: nvme_keys.parse_dhchap_key,
                   contract.SECRET_DHCHAP_CTRL_KEY: nvme_keys.parse_dhchap_key,
                   contract.SECRET_TLS_PSK: nvme_keys.parse_tls_psk}
        for name, value in got.items():
            if not value:
                continue
            try:
                parsers[name](value)
            except nvme_keys.KeyFormatError as e:
                raise InvalidArgument(f"{where}: {name!r} is not a valid key: {e}") from None
        if got[contract.SECRET_DHCHAP_CTRL_KEY] and not got[contract.SECRET_DHCHAP_KEY]:
            raise InvalidArgument(f"{where}: {contract.SECRET_DHCHAP_CTRL_KEY!r} without "
                                  f"{contract.SECRET_DHCHAP_KEY!r}")
        return cls(got[contract.SECRET_DHCHAP_KEY], got[contract.SECRET_DHCHAP_CTRL_KEY],
                   got[contract.SECRET_TLS_PSK])

    def has(self, mode: str) -> bool:
        return bool(self.tls_psk) if mode == contract.AUTH_TLS else bool(self.dhchap_key)

    def secrets(self) -> dict[str, str]:  # the node-stage secret's data
        out = {contract.SECRET_DHCHAP_KEY: self.dhchap_key,
               contract.SECRET_DHCHAP_CTRL_KEY: self.dhchap_ctrl_key,
               contract.SECRET_TLS_PSK: self.tls_psk}
        return {k: v for k, v in out.items() if v}

    def _pairs(self, mode: str) -> list[tuple[str, str, str]]:
        """(add_host parameter, role letter, material) for ``mode``."""
        if mode == contract.AUTH_TLS:
            return [("psk", "p", self.tls_psk)]
        out = [("dhchap_key", "h", self.dhchap_key)]
        if self.dhchap_ctrl_key:
            out.append(("dhchap_ctrlr_key", "c", self.dhchap_ctrl_key))
        return out

    @staticmethod
    def _name(lvol_uuid: str, role: str, material: str) -> str:
        fp = hashlib.sha256(material.encode()).hexdigest()[:8]
        return f"{KEY_PREFIX}{lvol_uuid}-{role}-{fp}"

    def names(self, lvol_uuid: str, mode: str = contract.AUTH_DHCHAP) -> dict[str, str]:
        """SPDK keyring names: add_host parameter -> key name."""
        return {param: self._name(lvol_uuid, role, m) for param, role, m in self._pairs(mode)}

    def material(self, lvol_uuid: str, mode: str = contract.AUTH_DHCHAP) -> dict[str, str]:
        """key name -> key material."""
        return {self._name(lvol_uuid, role, m): m for _p, role, m in self._pairs(mode)}


# --- where the keys live for the node: node-stage secrets ------------------------------
class SecretStore(Protocol):
    def create(self, lvol_uuid: str, volume_name: str, keys: VolumeKeys) -> VolumeKeys:
        """Store (idempotently; an existing Secret wins) and return the keys."""

    def get(self, lvol_uuid: str) -> VolumeKeys | None: ...

    def delete(self, lvol_uuid: str) -> None: ...


class StaticSecrets:
    """dev / csi-sanity: one key pair from a file (YAML or JSON with
    ``dhchapKey`` and ``dhchapCtrlKey``) for every volume."""

    def __init__(self, path: str) -> None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        keys = VolumeKeys.from_secrets({k: str(v) for k, v in data.items()}, path)
        if keys is None or not keys.dhchap_ctrl_key:
            raise ValueError(f"{path}: needs {contract.SECRET_DHCHAP_KEY} and "
                             f"{contract.SECRET_DHCHAP_CTRL_KEY} (and {contract.SECRET_TLS_PSK} "
                             "for auth: tls)")
        self.keys = keys
        log.warning("auth: every volume uses the static keys of %s (dev and tests only)", path)

    def create(self, lvol_uuid: str, volume_name: str, keys: VolumeKeys) -> VolumeKeys:
        return self.keys

    def get(self, lvol_uuid: str) -> VolumeKeys | None:
        return self.keys

    def delete(self, lvol_uuid: str) -> None:
        return None


def secret_name(volume_name: str) -> str:
    """The Secret of a volume: the chart's StorageClass names it
    ``csi-spdk-auth-${pv.name}`` (PV name == CSI volume name)."""
    return f"csi-spdk-auth-{volume_name}"[:253]


def write_static_secrets(path: Path, keys: VolumeKeys) -> None:
    """The dev key file, plus what csi-sanity's --csi.secrets reads."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys.secrets(), f)


# --- where the keys live for the target: KeyCustody ------------------------------------
class KeyCustody(Protocol):
    def put(self, name: str, material: str) -> None:
        """The key ``name`` exists in the target's keyring with ``material``."""

    def delete(self, name: str) -> None:
        """The key is gone from the keyring and the target host (missing is success)."""

    def names(self) -> list[str]:
        """Every csi-spdk key name the target's keyring has."""


class SameHostKeyCustody:
    """0600 files in a 0700 directory on this host, registered with SPDK's
    ``keyring_file`` (which refuses group/other-readable files). For a target
    on the controller's host only: dev and the tests."""

    def __init__(self, api: SpdkApi, key_dir: str) -> None:
        self.api = api
        self.dir = Path(key_dir)
        self._mutex = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.dir / name

    def put(self, name: str, material: str) -> None:
        """One SPDK call: the add itself. The keyring is listed only when
        SPDK says the name is taken (a retry: then it must really be there).
        The file is written under a name of its own, so puts of different
        volumes do not queue behind one lock."""
        with self._mutex:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
        path = self._path(name)
        tmp = path.with_name(f"{name}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(material)
        os.replace(tmp, path)
        try:
            self.api.key_file_add(name, str(path))
        except SpdkError:
            if name not in self.names():   # taken by a previous attempt: done
                raise

    def delete(self, name: str) -> None:
        """One SPDK call: the remove itself. A missing key is success (SPDK
        says ENOKEY); any other error is checked against the keyring."""
        try:
            self.api.key_file_remove(name)
        except SpdkError as err:
            if err.errno != errno.ENOKEY and name in self.names():
                raise
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def names(self) -> list[str]:
        return [k["name"] for k in self.api.keyring_keys()
                if k.get("name", "").startswith(KEY_PREFIX) and not k.get("removed")]


class AgentKeyCustody:
    """Keys kept by the target's agent (``PutKey``/``DeleteKey``): it writes the
    0600 file on the storage host and registers it with SPDK's keyring; no SPDK
    RPC takes a key inline, so this is the only way to a remote target."""

    def __init__(self, api: SpdkApi) -> None:
        self.api = api

    def put(self, name: str, material: str) -> None:
        self.api.client.put_key(name, material.encode())

    def delete(self, name: str) -> None:
        self.api.client.delete_key(name)

    def names(self) -> list[str]:
        return [k["name"] for k in self.api.keyring_keys()
                if k.get("name", "").startswith(KEY_PREFIX) and not k.get("removed")]


def key_volume(name: str) -> str:
    """The lvol uuid a key name belongs to (``csik-<uuid>-<role>-<fp>``)."""
    return name[len(KEY_PREFIX):len(KEY_PREFIX) + 36]


def volume_key_names(custody: KeyCustody, lvol_uuid: str) -> list[str]:
    prefix = f"{KEY_PREFIX}{lvol_uuid}-"
    return [n for n in custody.names() if n.startswith(prefix)]


def parse_auth(params: dict[str, str], default: str = contract.AUTH_DHCHAP) -> str:
    mode = params.get("auth") or default
    if mode not in contract.AUTH_MODES:
        raise InvalidArgument(f"parameter auth={mode!r} must be one of "
                              f"{', '.join(contract.AUTH_MODES)}")
    return mode


def no_store_error() -> FailedPrecondition:
    return FailedPrecondition(
        "auth: dhchap needs somewhere to keep the volume's keys: run the controller in "
        "Kubernetes (it creates a Secret per volume) or, for dev/tests, set "
        "auth.staticSecretsFile in its config; or use a StorageClass with auth: none")


# --- the controller's use of all of the above -----------------------------------------
class VolumeAuth:
    """What CreateVolume, Publish, Unpublish and DeleteVolume do about keys.
    ``store``: a SecretStore or None (none available: dhchap volumes are
    FAILED_PRECONDITION); ``custody(target_name)``: the target's KeyCustody."""

    def __init__(self, store: SecretStore | None, custody) -> None:
        self.store = store
        self.custody = custody
        self._warned: set[str] = set()
        self._mutex = threading.Lock()
        # target name -> lvol uuid -> key names its keyring may have: the
        # keyring is listed once per target (the first time it is needed),
        # then kept by this process's own puts and drops, so no publish,
        # unpublish or delete lists a keyring of N volumes' keys (issue #12).
        # Only volumes with keys on the target have an entry.
        self._known: dict[str, dict[str, set[str]]] = {}
        self._listed: set[str] = set()

    def _index(self, target_name: str) -> dict[str, set[str]]:
        """The target's kept key names (listed the first time). Puts made
        while the listing runs are kept too: they add to the same index."""
        with self._mutex:
            index = self._known.setdefault(target_name, {})
            if target_name in self._listed:
                return index
        found = self.custody(target_name).names()
        with self._mutex:
            if target_name not in self._listed:
                for name in found:
                    index.setdefault(key_volume(name), set()).add(name)
                self._listed.add(target_name)
        return index

    def put_key(self, target_name: str, name: str, material: str) -> None:
        """Put one key on the target, kept in the index first (a crash after
        the put: a restart lists it)."""
        index = self._index(target_name)
        with self._mutex:
            index.setdefault(key_volume(name), set()).add(name)
        self.custody(target_name).put(name, material)

    def _stored_names(self, target_name: str, lvol_uuid: str) -> set[str] | None:
        """The key names of the volume's stored keys (current and, during a
        rotation, the next ones: ``rotate-keys`` puts those from another
        process); None when the store cannot be read."""
        if self.store is None:
            return set()
        try:
            stored = [self.store.get(lvol_uuid)]
            pending = getattr(self.store, "pending", None)
            if pending is not None:
                stored.append(pending(lvol_uuid))
        except Exception as err:  # noqa: BLE001 - the keyring listing decides then
            log.warning("auth: the volume's stored keys cannot be read; listing the "
                        "target's keyring instead", extra={"f": {
                            "volume": lvol_uuid, "error": type(err).__name__}})
            return None
        out: set[str] = set()
        for keys in stored:
            for mode in (contract.AUTH_DHCHAP, contract.AUTH_TLS):
                if keys is not None and keys.has(mode):
                    out.update(keys.material(lvol_uuid, mode))
        return out

    def check(self, mode: str) -> None:
        """Before anything is created: can this controller keep the keys?"""
        if mode != contract.AUTH_NONE and self.store is None:
            raise no_store_error()

    def created(self, lvol_uuid: str, volume_name: str, mode: str) -> dict[str, str]:
        """Keys for a new (or re-requested) volume; returns its volume_context
        entries (the mode only, never a key)."""
        if mode == contract.AUTH_NONE:
            with self._mutex:
                first = volume_name not in self._warned
                self._warned.add(volume_name)
            if first:
                log.warning("auth: none: the volume's data path is protected by the host "
                            "allow-list only (any host claiming the node's NQN can attach)",
                            extra={"f": {"volume": volume_name}})
            return {contract.VC_AUTH: mode}
        if self.store is None:
            raise no_store_error()
        keys = self.store.create(lvol_uuid, volume_name, VolumeKeys.generate(mode))
        if not keys.has(mode):
            raise FailedPrecondition(f"the keys kept for volume {volume_name} are not for "
                                     f"auth: {mode} (was the volume created with another auth?)")
        return {contract.VC_AUTH: mode}

    def mode_of(self, lvol_uuid: str, from_context: str) -> str:
        """The volume's auth: its volume_context says; a volume without the
        key (created before auth existed, or a caller that dropped the
        context) is dhchap when the store has keys for it, else none."""
        if from_context in contract.AUTH_MODES:
            return from_context
        if from_context:
            raise InvalidArgument(f"volume_context auth={from_context!r} must be one of "
                                  f"{', '.join(contract.AUTH_MODES)}")
        keys = self.store.get(lvol_uuid) if self.store is not None else None
        if keys is not None:
            return contract.AUTH_DHCHAP if keys.dhchap_key else contract.AUTH_TLS
        return contract.AUTH_NONE

    def keys_for_publish(self, target_name: str, lvol_uuid: str, mode: str,
                         secrets: dict[str, str], volume_name: str = "") -> dict[str, str]:
        """The keyring key names for the host entry (keys put on the target).
        ``volume_name`` (the CSI name, when the lvol name gives it) only
        makes the error name the missing Secret."""
        if mode == contract.AUTH_NONE:
            return {}
        keys = VolumeKeys.from_secrets(secrets, "controller-publish secret") if secrets else None
        if keys is not None and mode == contract.AUTH_DHCHAP and \
                secrets.get(contract.SECRET_ROTATION_STEP):
            # mid-rotation: the pair the other nodes' entries hold, which is
            # also what this node derives from the same Secret (node/rekey.py)
            keys = VolumeKeys(*contract.rotation_pair(dict(secrets)))
        if (keys is None or not keys.has(mode)) and self.store is not None:
            keys = self.store.get(lvol_uuid)
        if keys is None or not keys.has(mode):
            where = getattr(self.store, "where", None)
            kept = where(lvol_uuid, volume_name) if where is not None else \
                "the controller's Secret store"
            raise FailedPrecondition(
                f"volume {lvol_uuid} uses auth: {mode} but its keys are not available: "
                f"neither a controller-publish secret nor {kept} has them (was that "
                "Secret deleted? Without it no node can authenticate: restore it from a "
                "backup, or rotate the volume's keys with csi-spdk rotate-keys)")
        self._index(target_name)    # (listed once, before any put of ours)
        results = parallel(*(lambda n=name, m=material: self.put_key(target_name, n, m)
                             for name, material in keys.material(lvol_uuid, mode).items()))
        for _, err in results:     # the keys go together: one round, not one each
            if err is not None:
                raise err
        return keys.names(lvol_uuid, mode)

    def drop_target_keys(self, target_name: str, lvol_uuid: str,
                         keep: tuple[str, ...] = ()) -> None:
        """Remove the volume's keys (but ``keep``) from the target.

        A volume with no key in the index has none on the target (the index
        has what the keyring had when listed plus every put since; the
        rotation of another process only replaces keys this one knows of).
        Otherwise the candidates are the kept names plus those of the
        stored keys, one remove each (missing is success): no keyring
        listing, unless the store cannot be read."""
        index = self._index(target_name)
        with self._mutex:
            known = set(index.get(lvol_uuid, ()))
        if not known:
            return
        custody = self.custody(target_name)
        stored = self._stored_names(target_name, lvol_uuid)
        if stored is None:
            stored = set(volume_key_names(custody, lvol_uuid))
        drop = sorted((known | stored) - set(keep))
        for name in drop:
            custody.delete(name)
        with self._mutex:
            left = index.get(lvol_uuid, set()) - set(drop)
            if left:
                index[lvol_uuid] = left
            else:
                index.pop(lvol_uuid, None)

    def deleted(self, target_name: str, lvol_uuid: str) -> None:
        self.drop_target_keys(target_name, lvol_uuid)
        if self.store is not None:
            self.store.delete(lvol_uuid)
