"""The rig's scheduler for WaitForFirstConsumer volumes, and the SSD-class
scenario that relies on it.

The rig runs no kube-scheduler, so the test picks the node itself and writes
the ``volume.kubernetes.io/selected-node`` annotation, as kube-scheduler's
VolumeBinding plugin does in PreBind. ``schedule`` makes that choice the way
VolumeBinding's Filter does for an unbound PVC of a WaitForFirstConsumer
class with dynamic provisioning (``checkVolumeProvisions`` in
pkg/scheduler/framework/plugins/volumebinding/binder.go):

* the StorageClass's ``allowedTopologies`` (an OR of terms, each an AND of
  label requirements, a value in ``values``) must match the node's topology:
  the node's labels for the topology keys its CSINode lists for the driver
  (kubelet writes those labels from NodeGetInfo; kube-scheduler itself reads
  the Node's labels, which for the driver's keys are the same);
* the node's CSINode must list the driver at all;
* when the CSIDriver has ``storageCapacity: true``, some CSIStorageCapacity
  of that class whose ``nodeTopology`` selects the node must have room
  (``maximumVolumeSize`` when set, else ``capacity``, >= the request).

A node that fails is counted under kube-scheduler's reason text, so a PVC
nobody can take gets "0/N nodes are available: N node(s) didn't find
available persistent volumes to bind." Among feasible nodes it takes the
first by name (kube-scheduler would score them; the scenarios have one).
"""

from __future__ import annotations

import collections

from .cluster import DRIVER
from .scenarios import Env, expect_event, leftovers, no_pv_for, qty, unique

REASON_TOPOLOGY = "node(s) didn't find available persistent volumes to bind"
REASON_CAPACITY = "node(s) did not have enough free storage"
REASON_NO_DRIVER = f"node(s) did not have the CSI driver {DRIVER}"
SELECTED_NODE = "volume.kubernetes.io/selected-node"


def _matches_terms(terms: list[dict], labels: dict[str, str]) -> bool:
    if not terms:
        return True
    return any(all(labels.get(e["key"]) in e.get("values", [])
                   for e in t.get("matchLabelExpressions", [])) for t in terms)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def schedule(env: Env, pvc_name: str) -> tuple[str | None, str]:
    """The node VolumeBinding would accept for the unbound PVC, or None and
    kube-scheduler's "0/N nodes are available: ..." message."""
    k = env.kubectl
    pvc = env.get_pvc(pvc_name)
    sc = k.get("storageclass", pvc["spec"]["storageClassName"])
    size = qty(pvc["spec"]["resources"]["requests"]["storage"])
    driver = k.get("csidriver", DRIVER) or {}
    track = bool(driver.get("spec", {}).get("storageCapacity"))
    capacities = [c for c in k.get("csistoragecapacities", namespace=env.driver_namespace)
                  if c.get("storageClassName") == sc["metadata"]["name"]] if track else []
    fails: collections.Counter[str] = collections.Counter()
    feasible = []
    nodes = [n for n in k.get("nodes") if n["metadata"]["name"] in env.nodes]
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name, labels = node["metadata"]["name"], node["metadata"].get("labels") or {}
        csinode = k.get("csinode", name) or {}
        entry = next((d for d in (csinode.get("spec") or {}).get("drivers") or []
                      if d["name"] == DRIVER), None)
        if entry is None:
            fails[REASON_NO_DRIVER] += 1
            continue
        topology = {key: labels[key] for key in entry.get("topologyKeys") or []
                    if key in labels}
        if not _matches_terms(sc.get("allowedTopologies") or [], topology):
            fails[REASON_TOPOLOGY] += 1
            continue
        if track and not any(
                _selects(c.get("nodeTopology") or {}, labels)
                and size <= qty(c.get("maximumVolumeSize") or c.get("capacity") or 0)
                for c in capacities):
            fails[REASON_CAPACITY] += 1
            continue
        feasible.append(name)
    if feasible:
        return feasible[0], ""
    return None, (f"0/{len(nodes)} nodes are available: "
                  + ", ".join(f"{n} {r}" for r, n in sorted(fails.items())) + ".")


def _storage_class(env: Env, name: str, key: str) -> dict:
    base = env.kubectl.get("storageclass", env.sc_wffc)
    return env.kubectl.create({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": name}, "provisioner": base["provisioner"],
        "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete",
        "parameters": dict(base.get("parameters") or {}),
        "allowedTopologies": [{"matchLabelExpressions": [{"key": key, "values": ["true"]}]}]})


def _pending_pod(env: Env, name: str, claim: str) -> dict:
    """A Pod using the claim, not bound to any node (the scheduler's input)."""
    return env.kubectl.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": env.namespace},
        "spec": {"containers": [{"name": "c", "image": env.pod_image}],
                 "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
                 "terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False}})


def ssd_class(env: Env, ssd_key: str, node: str) -> None:
    """A WaitForFirstConsumer StorageClass with allowedTopologies on an SSD
    class label that only ``node`` reports: the scheduler step picks that
    node, the volume lands on the target that node hosts (although another
    target has more room), and the PV's node affinity requires the label."""
    target = env.target_of_node[node]
    others = [t for n, t in env.target_of_node.items() if n != node]
    assert any(env.spdk.lvstore_free(t) > env.spdk.lvstore_free(target) for t in others), \
        "test premise: another target must have more room (else placement proves nothing)"
    holders = [n for n, v in env.nodes.items() if v["segment"].get(ssd_key) == "true"]
    assert holders == [node], f"test premise: only {node} has {ssd_key}: {holders}"
    sc, name = unique("csi-spdk-ssd"), unique("ssd")
    _storage_class(env, sc, ssd_key)
    try:
        _pending_pod(env, name, name)
        env.pvc(name, sc, "48Mi")
        # kube-scheduler retries until the capacity objects of the new class exist
        chosen = env.wait(f"a node for PVC {name}", lambda: schedule(env, name)[0])
        assert chosen == node, (chosen, node)
        env.kubectl.run("annotate", "pvc", name, "-n", env.namespace,
                        f"{SELECTED_NODE}={chosen}")
        _, pv = env.wait_bound(name)
        lv = env.lvol_of(pv)
        assert lv["target"] == target, f"volume on {lv['target']}, expected {target} ({node})"
        terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        exprs = [{e["key"]: e["values"] for e in t["matchExpressions"]} for t in terms]
        assert all(x.get(ssd_key) == ["true"] for x in exprs), exprs
        env.delete_pod(name)
        env.delete_pvc(name)
        env.wait_gone("pv", pv["metadata"]["name"])
        env.wait_lvol_gone(lv["uuid"])
    finally:
        env.delete_pod(name)
        env.delete_pvc(name)
        env.kubectl.delete("storageclass", sc)


def ssd_class_nobody_has(env: Env, ssd_key: str) -> None:
    """allowedTopologies on an SSD class no node reports: no node is feasible,
    the PVC gets no selected node and stays Pending (the PV controller says it
    waits for the Pod to be scheduled); nothing is provisioned."""
    assert not [n for n, v in env.nodes.items() if ssd_key in v["segment"]], env.nodes
    baseline = {lv["uuid"] for lv in env.driver_lvols()}
    sc, name = unique("csi-spdk-ssd-none"), unique("nossd")
    _storage_class(env, sc, ssd_key)
    try:
        # the Pod first, so the PV controller's first look at the claim sees it
        _pending_pod(env, name, name)
        env.pvc(name, sc, "48Mi")
        chosen, reason = schedule(env, name)
        n = len(env.nodes)
        assert chosen is None, chosen
        assert reason == f"0/{n} nodes are available: {n} {REASON_TOPOLOGY}.", reason
        msg = expect_event(env, name, "WaitForPodScheduled", "to be scheduled")
        assert name in msg, msg          # kube-controller-manager's PV controller
        pvc = env.get_pvc(name)
        assert pvc["status"]["phase"] == "Pending", pvc["status"]
        assert SELECTED_NODE not in (pvc["metadata"].get("annotations") or {})
        assert not [e for e in env.event_messages(name) if e.startswith("Provisioning")]
        no_pv_for(env, name)
        leftovers(env, baseline)
    finally:
        env.delete_pod(name)
        env.delete_pvc(name)
        env.kubectl.delete("storageclass", sc)
    env.wait_gone("pvc", name, env.namespace)
