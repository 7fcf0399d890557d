"""SecretKeyStore (controller/encryption.py) against a fake CoreV1Api that
behaves like the API server for Secrets: the key joins the volume's auth
Secret (patch) or gets a Secret of its own, is found by label, survives a
retry (the kept key wins) and goes with the Secret."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest

from csi_spdk import contract
from csi_spdk.controller.auth import LABEL_VOLUME, VolumeKeys
from csi_spdk.controller.encryption import SecretKeyStore, VolumeKey
from csi_spdk.controller.k8s_secrets import KubernetesSecrets
from csi_spdk.errors import FailedPrecondition

pytest.importorskip("kubernetes")
UUID = "0f7a4b2e-8a1d-4c3b-9b5a-6f1e2d3c4b5a"


class FakeCore:
    def __init__(self) -> None:
        self.secrets: dict[str, dict] = {}   # name -> {"labels", "data"}
        self.calls: list[str] = []

    def _obj(self, name):
        s = self.secrets[name]
        return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=s["labels"]),
                               data={k: base64.b64encode(v.encode()).decode()
                                     for k, v in s["data"].items()})

    def list_namespaced_secret(self, namespace, label_selector=""):
        self.calls.append("list")
        key, _, value = label_selector.partition("=")
        return SimpleNamespace(items=[self._obj(n) for n, s in self.secrets.items()
                                      if s["labels"].get(key) == value])

    def create_namespaced_secret(self, namespace, body):
        from kubernetes.client.exceptions import ApiException
        self.calls.append("create")
        if body.metadata.name in self.secrets:
            raise ApiException(status=409, reason="Conflict")
        self.secrets[body.metadata.name] = {"labels": dict(body.metadata.labels),
                                            "data": dict(body.string_data)}

    def patch_namespaced_secret(self, name, namespace, body):
        self.calls.append("patch")
        data = self.secrets[name]["data"]
        data.update(body.get("stringData", {}))
        for k, v in body.get("data", {}).items():     # a merge patch: null removes
            if v is None:
                data.pop(k, None)
            else:
                data[k] = base64.b64decode(v).decode()

    def delete_namespaced_secret(self, name, namespace):
        self.calls.append("delete")
        self.secrets.pop(name, None)


def test_the_key_joins_the_volumes_auth_secret():
    core = FakeCore()
    auth = KubernetesSecrets("csi-spdk", api=core)
    auth.create(UUID, "pvc-1", VolumeKeys.generate())
    store = SecretKeyStore("csi-spdk", api=core)
    key = VolumeKey.generate("node")
    assert store.put(UUID, "pvc-1", key) == key
    secret = core.secrets["csi-spdk-auth-pvc-1"]
    assert secret["data"][contract.SECRET_ENCRYPTION_KEY] == key.material
    assert secret["data"][contract.SECRET_ENCRYPTION_MODE] == "node"
    assert contract.SECRET_DHCHAP_KEY in secret["data"]          # auth keys untouched
    assert auth.get(UUID).dhchap_key == secret["data"][contract.SECRET_DHCHAP_KEY]
    # a retried CreateVolume keeps the first key
    assert store.put(UUID, "pvc-1", VolumeKey.generate("node")).material == key.material
    assert store.get(UUID) == key
    assert store.where(UUID) == "Secret csi-spdk/csi-spdk-auth-pvc-1"
    store.delete(UUID)
    assert core.secrets == {} and store.get(UUID) is None


def test_without_auth_the_key_gets_its_own_labelled_secret():
    core = FakeCore()
    store = SecretKeyStore("csi-spdk", api=core)
    key = VolumeKey.generate("target")
    store.put(UUID, "pvc-2", key)
    secret = core.secrets["csi-spdk-auth-pvc-2"]
    assert secret["labels"][LABEL_VOLUME] == UUID
    assert "patch" not in core.calls
    assert store.get(UUID) == key
    assert "there is none" in store.where("00000000-0000-4000-8000-000000000000")


def test_a_malformed_key_in_the_secret_is_failed_precondition_naming_it():
    core = FakeCore()
    core.secrets["csi-spdk-auth-pvc-3"] = {"labels": {LABEL_VOLUME: UUID},
                                           "data": {contract.SECRET_ENCRYPTION_KEY: "nothex"}}
    with pytest.raises(FailedPrecondition) as err:
        SecretKeyStore("csi-spdk", api=core).get(UUID)
    assert "csi-spdk-auth-pvc-3" in err.value.message and "nothex" not in err.value.message


def test_a_rotation_keeps_the_encryption_key_and_says_its_step():
    """rotate-keys in the same Secret: ``next.*`` and ``rotationStep`` while it
    runs (what kubelet's republish hands the nodes: contract.rotation_pair
    reads the target's pair from it), then one patch makes the next keys
    current and drops both, and the encryption key stays."""
    core = FakeCore()
    auth = KubernetesSecrets("csi-spdk", api=core)
    old = auth.create(UUID, "pvc-3", VolumeKeys.generate())
    key = VolumeKey.generate("node")
    SecretKeyStore("csi-spdk", api=core).put(UUID, "pvc-3", key)
    new = auth.set_pending(UUID, VolumeKeys.generate())
    data = core.secrets["csi-spdk-auth-pvc-3"]["data"]
    assert contract.rotation_pair(data) == (old.dhchap_key, old.dhchap_ctrl_key)
    auth.set_step(UUID, 1)
    assert contract.rotation_pair(data) == (new.dhchap_key, old.dhchap_ctrl_key)
    auth.set_step(UUID, 2)
    calls = len(core.calls)
    auth.set_step(UUID, 2)                      # already said: no second patch
    assert core.calls[calls:] == ["list"]
    assert contract.rotation_pair(data) == (new.dhchap_key, new.dhchap_ctrl_key)
    auth.commit(UUID)
    assert data == {contract.SECRET_DHCHAP_KEY: new.dhchap_key,
                    contract.SECRET_DHCHAP_CTRL_KEY: new.dhchap_ctrl_key,
                    contract.SECRET_ENCRYPTION_KEY: key.material,
                    contract.SECRET_ENCRYPTION_MODE: "node"}
    assert auth.get(UUID) == new and auth.pending(UUID) is None
