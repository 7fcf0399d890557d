"""The node plugins' key-rotation acknowledgements on the rig's real
kube-apiserver (v1.34), with the chart's RBAC and ValidatingAdmissionPolicy:
a node plugin's write (node/acks.py ``ConfigMapAcks``, with a Pod-bound
token of the chart's node ServiceAccount, as the DaemonSet projects it)
is admitted only for the ConfigMap named after the node in the token's
node-name claim; and the controller's watch (controller/rotate_nodes.py
``ConfigMapAckWatch``) sees an acknowledgement or times out."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest

from csi_spdk import contract
from csi_spdk.controller.rotate_nodes import ConfigMapAckWatch
from csi_spdk.errors import CsiError
from csi_spdk.node.acks import ConfigMapAcks

from .cluster import NAMESPACE, kubeconfig
from .rig import HOST_TARGETS

NODE_A, NODE_B = HOST_TARGETS["target-a"][3], HOST_TARGETS["target-b"][3]


def _node_sa(rig) -> str:
    ds = next(o for o in rig.objects if o["kind"] == "DaemonSet"
              and o["metadata"]["name"].endswith("-node"))
    return ds["spec"]["template"]["spec"]["serviceAccountName"]


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _api(rig, token: str, label: str):
    from kubernetes import client, config
    path = kubeconfig(rig.dir / f"{label}.kubeconfig", rig.cp.server, rig.cp.ca, token=token,
                      user=label)
    return client.CoreV1Api(config.new_client_from_config(config_file=str(path)))


@pytest.fixture
def node_tokens(rig):
    """A Pod of the node DaemonSet's ServiceAccount on each host node (the
    objects only: no kubelet runs them) and a token bound to each, as the
    DaemonSet's projected token volume gets it."""
    sa = _node_sa(rig)
    k = rig.kubectl
    tokens, pods = {}, []
    for node in (NODE_A, NODE_B):
        pod = f"acks-{node}-{uuid.uuid4().hex[:6]}"
        k.create({"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": pod, "namespace": NAMESPACE},
                  "spec": {"serviceAccountName": sa, "nodeName": node,
                           "automountServiceAccountToken": False,
                           "containers": [{"name": "csi-spdk", "image": "csi-spdk:rig"}]}})
        pods.append(pod)
        tokens[node] = k.run("create", "token", sa, "-n", NAMESPACE, "--duration=1h",
                             "--bound-object-kind=Pod", f"--bound-object-name={pod}"
                             ).stdout.strip()
    tokens["unbound"] = k.run("create", "token", sa, "-n", NAMESPACE,
                              "--duration=1h").stdout.strip()
    yield tokens
    for pod in pods:
        k.delete("pod", pod, NAMESPACE)
    for node in (NODE_A, NODE_B):
        k.run("delete", "configmap", contract.ack_configmap_name(node), "-n", NAMESPACE,
              "--ignore-not-found", check=False)


def _data(rig, node: str) -> dict | None:
    cm = rig.kubectl.get("configmap", contract.ack_configmap_name(node), NAMESPACE)
    return None if cm is None else cm.get("data", {})


def test_a_node_writes_only_its_own_configmap(rig, node_tokens):
    claims = _claims(node_tokens[NODE_B])
    assert claims["kubernetes.io"]["node"]["name"] == NODE_B, claims   # the node-name claim
    api_a, api_b = _api(rig, node_tokens[NODE_A], "node-a"), _api(rig, node_tokens[NODE_B],
                                                                 "node-b")
    vol = str(uuid.uuid4())
    pair = "0123abcd/4567ef01"
    # node-b's token claiming node-a's ConfigMap: refused (create) ...
    with pytest.raises(CsiError, match="403"):
        ConfigMapAcks(NODE_A, NAMESPACE, api=api_b).record(vol, pair)
    assert _data(rig, NODE_A) is None
    # ... its own admitted, created then patched
    own_b = ConfigMapAcks(NODE_B, NAMESPACE, api=api_b)
    own_b.record(vol, pair)
    vol2 = str(uuid.uuid4())
    own_b.record(vol2, "89abcdef/")
    assert _data(rig, NODE_B) == {vol: pair, vol2: "89abcdef/"}
    # node-a writes its own; node-b can then not patch it either
    ConfigMapAcks(NODE_A, NAMESPACE, api=api_a).record(vol, pair)
    with pytest.raises(CsiError, match="403"):
        ConfigMapAcks(NODE_A, NAMESPACE, api=api_b).record(vol, "ffffffff/ffffffff")
    with pytest.raises(CsiError, match="403"):
        ConfigMapAcks(NODE_A, NAMESPACE, api=api_b).forget(vol)
    assert _data(rig, NODE_A) == {vol: pair}
    # a token of the same ServiceAccount without the claim writes nothing
    api_x = _api(rig, node_tokens["unbound"], "node-x")
    with pytest.raises(CsiError, match="403"):
        ConfigMapAcks(NODE_B, NAMESPACE, api=api_x).record(vol, "ffffffff/ffffffff")
    assert _data(rig, NODE_B)[vol] == pair
    # RBAC: the node ServiceAccount cannot touch Secrets, nor delete its ConfigMap
    for verb, what in (("get", "secrets"), ("delete", "configmaps"), ("list", "secrets")):
        res = rig.kubectl.run("auth", "can-i", verb, what, "-n", NAMESPACE,
                              f"--as=system:serviceaccount:{NAMESPACE}:{_node_sa(rig)}",
                              check=False)
        assert res.stdout.strip() == "no", (verb, what, res.stdout)
    own_b.forget(vol2)
    assert _data(rig, NODE_B) == {vol: pair}


def test_controller_watch_sees_the_ack_or_times_out(rig, node_tokens):
    from kubernetes import client, config
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(rig.sa_kubeconfig)))
    watch = ConfigMapAckWatch(api, NAMESPACE)
    vol = str(uuid.uuid4())
    node_b = ConfigMapAcks(NODE_B, NAMESPACE, api=_api(rig, node_tokens[NODE_B], "node-b2"))
    t0 = time.monotonic()
    assert watch.wait(NODE_B, vol, "aaaaaaaa/bbbbbbbb", time.monotonic() + 2) is False
    assert time.monotonic() - t0 >= 2
    later = threading.Timer(1.5, node_b.record, (vol, "aaaaaaaa/bbbbbbbb"))
    later.start()
    try:
        assert watch.wait(NODE_B, vol, "aaaaaaaa/bbbbbbbb", time.monotonic() + 30) is True
    finally:
        later.join()
    # another pair for the same volume is not that acknowledgement
    assert watch.wait(NODE_B, vol, "cccccccc/dddddddd", time.monotonic() + 1) is False
