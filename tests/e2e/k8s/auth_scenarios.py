"""Data-path authentication on the real control plane (issue #13): the
volume's keys as a Secret the driver keeps in its own namespace, the PV's
secret references, the test playing kubelet (it reads the PV's
``nodeStageSecretRef``, fetches that Secret from the API server and passes
its data to NodeStageVolume), the guest kernel authenticating, and the
Secret's lifetime (deleted with the volume, kept with reclaimPolicy Retain,
deleted by hand).
"""

from __future__ import annotations

import contextlib
import json
import time

import grpc

from csi_spdk import contract, nvme_keys
from csi_spdk.proto import csi_pb2

from .scenarios import Env, FakeKubelet, unique

MANAGED = "app.kubernetes.io/managed-by"


def secret_ref(env: Env, pv: dict) -> dict:
    """The PV's node-stage reference: the chart's templated
    ``csi-spdk-auth-${pv.name}`` in the driver's namespace, the same as the
    controller-publish one."""
    csi = pv["spec"]["csi"]
    ref = csi.get("nodeStageSecretRef")
    want = {"name": f"csi-spdk-auth-{pv['metadata']['name']}",
            "namespace": env.driver_namespace}
    assert ref == want, csi
    assert csi.get("controllerPublishSecretRef") == want, csi
    assert csi["volumeAttributes"].get(contract.VC_AUTH) == contract.AUTH_DHCHAP, csi
    return ref


def check_secret(env: Env, ref: dict, lvol_uuid: str) -> dict[str, str]:
    """The Secret as the driver made it; returns its (decoded) data."""
    import base64
    secret = env.kubectl.get("secret", ref["name"], ref["namespace"])
    assert secret is not None, f"Secret {ref} missing"
    meta = secret["metadata"]
    assert meta["labels"][MANAGED] == "csi-spdk", meta
    assert meta["labels"]["csi-spdk.io/volume"] == lvol_uuid, meta
    # no ownerReference: a garbage-collected key would lock the data out (DESIGN.md)
    assert not meta.get("ownerReferences"), meta
    assert secret["type"] == "csi-spdk.io/volume-keys", secret["type"]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert sorted(data) == sorted(contract.SECRET_KEYS[:2]), data.keys()
    for value in data.values():
        nvme_keys.parse_dhchap_key(value)
    assert data[contract.SECRET_DHCHAP_KEY] != data[contract.SECRET_DHCHAP_CTRL_KEY]
    return data


def assert_no_keys(data: dict[str, str], *texts: str) -> None:
    for name, key in data.items():
        body = key.split(":")[2]
        for i, text in enumerate(texts):
            assert body not in text, f"{name} leaked into text #{i}"


def rbac_limits_secrets(env: Env, sa_kubectl) -> None:
    """The controller's ServiceAccount may manage Secrets in its own namespace only."""
    def can(verb: str, ns: str) -> str:
        return sa_kubectl.run("auth", "can-i", verb, "secrets", "-n", ns,
                              check=False).stdout.strip()
    for verb in ("get", "list", "create", "delete", "patch"):
        assert can(verb, env.driver_namespace) == "yes", verb
        assert can(verb, env.namespace) == "no", verb
        assert can(verb, "kube-system") == "no", verb
    assert sa_kubectl.run("auth", "can-i", "update", "secrets", "-n", env.driver_namespace,
                          check=False).stdout.strip() == "no"


def guest_stage_with_secret(env: Env, sc: str, node: str, kubelet: FakeKubelet,
                            target: str) -> None:
    """A dhchap PVC on the guest's target: the Secret exists with the PV's
    reference; NodeStageVolume without it or with other keys is refused (the
    second by the guest kernel); with exactly the Secret's data the guest
    kernel authenticates and the filesystem is staged and published. Deleting
    the Pod removes host entry and keys from the target, deleting the PVC the
    Secret."""
    name = unique("auth")
    env.pvc(name, sc, "48Mi")
    _, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    lv = env.lvol_of(pv)
    ref = secret_ref(env, pv)
    data = check_secret(env, ref, lv["uuid"])
    assert kubelet.stage_secrets(pv) == data
    pod = env.pod(name, node, [name])
    va = env.wait(f"VolumeAttachment of {pv_name} attached",
                  lambda: (lambda v: v if v and v.get("status", {}).get("attached") else None)(
                      env.attachment(pv_name, node)))
    pctx = va["status"]["attachmentMetadata"]
    assert pctx.get(contract.PC_AUTH) == contract.AUTH_DHCHAP, pctx
    assert_no_keys(data, json.dumps(va), json.dumps(pv))
    sub = env.spdk.subsystem(pctx[contract.PC_NQN])
    (host,) = sub["hosts"]
    assert host["nqn"] == contract.host_nqn(env.nodes[node]["node_id"]), host
    prefix = f"csik-{lv['uuid']}-"
    assert host["dhchap_key"].startswith(prefix + "h-"), host
    assert host["dhchap_ctrlr_key"].startswith(prefix + "c-"), host
    api = env.spdk.apis[target]
    names = sorted(k["name"] for k in api.keyring_keys() if k["name"].startswith(prefix))
    assert names == sorted([host["dhchap_key"], host["dhchap_ctrlr_key"]]), names

    # refused: no secret (the node), keys of another volume (the guest kernel)
    try:
        kubelet.stage(pv, va, secrets={})
        raise AssertionError("staged without the node-stage secret")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert contract.SECRET_DHCHAP_KEY in err.details(), err.details()
    wrong = {contract.SECRET_DHCHAP_KEY: nvme_keys.generate_dhchap_key().text,
             contract.SECRET_DHCHAP_CTRL_KEY: nvme_keys.generate_dhchap_key().text}
    try:
        kubelet.stage(pv, va, secrets=wrong)
        raise AssertionError("the guest kernel accepted keys of another volume")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "authentication" in err.details(), err.details()
        assert_no_keys({**data, **wrong}, err.details())
    half = {**data, contract.SECRET_DHCHAP_CTRL_KEY: wrong[contract.SECRET_DHCHAP_CTRL_KEY]}
    try:
        kubelet.stage(pv, va, secrets=half)
        raise AssertionError("the guest kernel accepted a wrong controller key")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err

    # the Secret's data, as kubelet passes it: the kernel authenticates
    staging, target_path = kubelet.mount(pv, va, pod)
    assert kubelet.fs_total(pv, target_path) > 0
    kubelet.unmount(pv, staging, target_path)
    env.delete_pod(name)
    env.wait(f"VolumeAttachment {va['metadata']['name']} deleted",
             lambda: env.kubectl.get("volumeattachment", va["metadata"]["name"]) is None)
    env.wait("the volume's keys gone from the target", lambda: not [
        k for k in api.keyring_keys() if k["name"].startswith(prefix)])
    assert env.spdk.subsystem(pctx[contract.PC_NQN]) is None
    env.delete_pvc(name)
    env.wait_gone("pv", pv_name)
    env.wait_lvol_gone(lv["uuid"])
    env.wait_gone("secret", ref["name"], ref["namespace"])


def _cap():
    am = csi_pb2.VolumeCapability.AccessMode
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                                    access_mode=am(mode=am.SINGLE_NODE_WRITER))


def retain_keeps_secret(env: Env, sc: str, controller, node: str) -> None:
    """reclaimPolicy Retain: deleting the PVC and then the PV by hand (what an
    admin does to release a retained volume) leaves the lvol AND its Secret:
    the Secret has no ownerReference for the garbage collector to follow, so
    the retained data stays reachable; re-publishing the volume with the
    kept Secret works. DeleteVolume (the admin's explicit deletion) removes
    both."""
    name = unique("keep")
    env.pvc(name, sc, "32Mi")
    _, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    lv = env.lvol_of(pv)
    ref = secret_ref(env, pv)
    data = check_secret(env, ref, lv["uuid"])
    env.delete_pvc(name)
    env.wait(f"PV {pv_name} Released", lambda: (env.kubectl.get("pv", pv_name) or {}).get(
        "status", {}).get("phase") == "Released")
    env.kubectl.delete("pv", pv_name)
    env.wait_gone("pv", pv_name)
    # kube-controller-manager's garbage collector had its chance: the PV's
    # deletion is processed within a second or two when anything depends on it
    time.sleep(5)
    assert check_secret(env, ref, lv["uuid"]) == data
    assert env.spdk.lvol(lv["uuid"]) is not None, "a retained volume was deleted"

    handle = pv["spec"]["csi"]["volumeHandle"]
    vctx = pv["spec"]["csi"]["volumeAttributes"]
    node_id = env.nodes[node]["node_id"]
    res = controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=handle, node_id=node_id, volume_capability=_cap(), volume_context=vctx,
        secrets=data), timeout=60)
    assert res.publish_context[contract.PC_AUTH] == contract.AUTH_DHCHAP
    controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=handle, node_id=node_id), timeout=60)
    controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=handle), timeout=60)
    env.wait_lvol_gone(lv["uuid"])
    env.wait_gone("secret", ref["name"], ref["namespace"])


def secret_deleted_by_hand(env: Env, sc: str, controller, node: str) -> None:
    """Someone deletes a volume's Secret: a publish that is not given the
    keys is FAILED_PRECONDITION naming the Secret (never a key, never
    INTERNAL); deleting the PVC still deletes the volume."""
    name = unique("lost")
    env.pvc(name, sc, "32Mi")
    _, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    lv = env.lvol_of(pv)
    ref = secret_ref(env, pv)
    check_secret(env, ref, lv["uuid"])
    env.kubectl.delete("secret", ref["name"], ref["namespace"])
    env.wait_gone("secret", ref["name"], ref["namespace"])
    try:
        controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=pv["spec"]["csi"]["volumeHandle"], node_id=env.nodes[node]["node_id"],
            volume_capability=_cap(), volume_context=pv["spec"]["csi"]["volumeAttributes"]),
            timeout=60)
        raise AssertionError("published a dhchap volume without its keys")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        assert f"{ref['namespace']}/{ref['name']}" in err.details(), err.details()
    sub = env.spdk.subsystem(contract.subsystem_nqn(lv["uuid"]))
    assert sub is None or not sub["hosts"], sub
    env.delete_pvc(name)
    env.wait_gone("pv", pv_name)
    env.wait_lvol_gone(lv["uuid"])


def rotate_keys_command(env: Env, sc: str, node: str, kubelet: FakeKubelet,
                        target: str, run_cli, node_endpoint: str) -> None:
    """``csi-spdk rotate-keys`` (the operator's command, with the controller's
    config, ServiceAccount and Secret store) on a volume staged and mounted
    in the guest: the connection stays, the Secret holds new keys (nothing
    pending), the target only those; the guest kernel refuses the old keys
    on a re-authentication and accepts the Secret's."""
    from csi_spdk.controller.auth import VolumeKeys
    name = unique("rot")
    env.pvc(name, sc, "48Mi")
    _, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    lv = env.lvol_of(pv)
    ref = secret_ref(env, pv)
    old = check_secret(env, ref, lv["uuid"])
    pod = env.pod(name, node, [name])
    va = env.wait(f"VolumeAttachment of {pv_name} attached",
                  lambda: (lambda v: v if v and v.get("status", {}).get("attached") else None)(
                      env.attachment(pv_name, node)))
    staging, target_path = kubelet.mount(pv, va, pod)
    done = False
    try:
        before = kubelet.fs_total(pv, target_path)
        handle = pv["spec"]["csi"]["volumeHandle"]
        node_id = env.nodes[node]["node_id"]
        res = run_cli(["rotate-keys", "--volume", handle, "--node", f"{node_id}={node_endpoint}",
                       "--fs-type", "ext4"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{handle}: keys rotated ({node_id})" in res.stdout, res.stdout
        new = check_secret(env, ref, lv["uuid"])       # two keys only: nothing pending
        assert_no_keys({**old, **new}, res.stdout + res.stderr)
        for k in old:
            assert new[k] != old[k], k
        names = VolumeKeys.from_secrets(new, "new").names(lv["uuid"])
        nqn = contract.subsystem_nqn(lv["uuid"])
        (host,) = env.spdk.subsystem(nqn)["hosts"]
        assert {k: host[k] for k in names} == names, host
        prefix = f"csik-{lv['uuid']}-"
        ring = sorted(k["name"] for k in env.spdk.apis[target].keyring_keys()
                      if k["name"].startswith(prefix))
        assert ring == sorted(names.values()), ring
        # the live connection was kept: the same mount answers
        assert kubelet.fs_total(pv, target_path) == before
        # the guest kernel re-authenticates the live controller: old keys refused ...
        try:
            # the refusal costs a failed re-authentication, the node's write-back
            # of the previous key and its re-authentication, each up to 30 s of
            # the node's waits (node/reauth.py) plus the kernel's work under TCG;
            # CI once took over 120 s (DEADLINE_EXCEEDED), so a longer deadline
            kubelet.stage(pv, va, secrets=old, timeout=420)
            raise AssertionError("the guest kernel re-authenticated with the old keys")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "does not hold that key pair" in err.details(), err.details()
        # ... the Secret's (what kubelet passes) accepted, and the mount still there
        kubelet.stage(pv, va)
        assert kubelet.fs_total(pv, target_path) == before
        done = True
    finally:
        if not done:   # leave nothing staged or exported for the next test
            with contextlib.suppress(Exception):
                kubelet.unmount(pv, staging, target_path)
            env.delete_pod(name)
            env.delete_pvc(name)
    kubelet.unmount(pv, staging, target_path)
    env.delete_pod(name)
    env.wait(f"VolumeAttachment {va['metadata']['name']} deleted",
             lambda: env.kubectl.get("volumeattachment", va["metadata"]["name"]) is None)
    env.delete_pvc(name)
    env.wait_gone("pv", pv_name)
    env.wait_lvol_gone(lv["uuid"])
    env.wait_gone("secret", ref["name"], ref["namespace"])
