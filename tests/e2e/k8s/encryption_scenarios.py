"""Encryption at rest (issue #16) on the control plane, against an ``Env`` of
scenarios.py: a PVC of an encrypted StorageClass becomes Bound, the driver
keeps the volume's key in the PV's Secret (the one the chart's StorageClass
names as node-stage and controller-publish secret), never in the PV; the
attach publishes the crypto bdev (target mode); the test, as kubelet, hands
the node exactly that Secret's data; deleting the PVC removes the Secret."""

from __future__ import annotations

import base64

from csi_spdk import contract

from .scenarios import Env, FakeKubelet, node_for, unique


def _secret_data(env: Env, ref: dict) -> dict[str, str]:
    secret = env.kubectl.get("secret", ref["name"], ref["namespace"])
    assert secret is not None, f"Secret {ref} of the PV does not exist"
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def encrypted_pvc(env: Env, base_sc: str, mode: str, kubelet: FakeKubelet | None = None,
                  node: str | None = None) -> None:
    sc_name = f"csi-spdk-enc-{mode}-{unique('sc')[-6:]}"
    sc = env.kubectl.get("storageclass", base_sc)
    params = {**sc.get("parameters", {}), "encryption": mode}
    for kind in ("node-stage", "controller-publish"):   # as the chart's template adds them
        params.setdefault(f"csi.storage.k8s.io/{kind}-secret-name", "csi-spdk-auth-${pv.name}")
        params.setdefault(f"csi.storage.k8s.io/{kind}-secret-namespace", env.driver_namespace)
    env.kubectl.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                        "metadata": {"name": sc_name}, "provisioner": sc["provisioner"],
                        "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
                        "allowVolumeExpansion": True,
                        "parameters": params})
    name = unique(f"enc{mode}")
    try:
        env.pvc(name, sc_name, "64Mi", block=True)
        _, pv = env.wait_bound(name)
        pv_name = pv["metadata"]["name"]
        lv = env.lvol_of(pv)
        csi = pv["spec"]["csi"]
        ctx = csi.get("volumeAttributes", {})
        assert ctx.get(contract.VC_ENCRYPTION) == mode, ctx
        ref = csi.get("nodeStageSecretRef")
        assert ref and ref["name"] == f"csi-spdk-auth-{pv_name}", csi
        assert csi.get("controllerPublishSecretRef") == ref, csi
        data = _secret_data(env, ref)
        key = data.get(contract.SECRET_ENCRYPTION_KEY, "")
        assert len(key) == contract.ENCRYPTION_KEY_HEX and key[:64] != key[64:], \
            "the PV's Secret holds no volume key"
        assert data.get(contract.SECRET_ENCRYPTION_MODE) == mode, sorted(data)
        text = str(pv) + str(env.kubectl.get("pvc", name, env.namespace))
        assert key not in text and key[:64] not in text and key[64:] not in text
        target = node or node_for(env, pv)
        env.pod(name, target, [name])
        va = env.wait(f"VolumeAttachment of {pv_name} attached",
                      lambda: (lambda v: v if v and v.get("status", {}).get("attached")
                               else None)(env.attachment(pv_name, target)))
        meta = va["status"].get("attachmentMetadata", {})
        assert not [v for v in meta.values() if key[:16] in v], "key in publish_context"
        sub = env.spdk.subsystem(contract.subsystem_nqn(lv["uuid"]))
        bdevs = [ns["bdev_name"] for ns in sub["namespaces"]]
        want = contract.crypto_bdev_name(lv["uuid"]) if mode == "target" else lv["uuid"]
        assert bdevs == [want], (bdevs, want)
        if kubelet is not None:   # kubelet's part: the PV's Secret as node-stage secrets
            staging, path = kubelet.mount(pv, va, env.kubectl.get("pod", name, env.namespace),
                                          secrets=data)
            kubelet.unmount(pv, staging, path)
        env.delete_pod(name)
        env.wait(f"VolumeAttachment {va['metadata']['name']} deleted",
                 lambda: env.kubectl.get("volumeattachment", va["metadata"]["name"]) is None)
        oid = contract.parse_id(csi["volumeHandle"])
        api = env.spdk.apis[oid.target]
        env.wait("crypto bdev removed after the detach",
                 lambda: api.bdev_get(contract.crypto_bdev_name(lv["uuid"])) is None)
        env.delete_pvc(name)
        env.wait_gone("pv", pv_name)
        env.wait_lvol_gone(lv["uuid"])
        env.wait_gone("secret", ref["name"], ref["namespace"])
    finally:
        env.delete_pvc(name)
        env.kubectl.delete("storageclass", sc_name)
