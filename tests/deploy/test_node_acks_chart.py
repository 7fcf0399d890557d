"""The chart's side of key rotation in a cluster (docs/DESIGN.md "Re-keying
live connections in a cluster"): kubelet republishes with the volume's
Secret, the node plugin may write only ConfigMaps and only with its
Pod-bound token, and the admission policy ties the name to the token's
node-name claim. Whether the real API server enforces the policy is
tests/e2e/k8s/test_node_acks.py."""

from __future__ import annotations

from .conftest import by_kind, containers, one, render_docs

CLAIM = "authentication.kubernetes.io/node-name"


def test_kubelet_republishes_with_the_volumes_secret():
    objs = render_docs("defaults")
    assert one(objs, "CSIDriver")["spec"]["requiresRepublish"] is True
    for sc in by_kind(objs, "StorageClass"):
        p = sc.get("parameters", {})
        if "csi.storage.k8s.io/node-stage-secret-name" not in p:
            continue
        assert p["csi.storage.k8s.io/node-publish-secret-name"] == \
            p["csi.storage.k8s.io/node-stage-secret-name"] == "csi-spdk-auth-${pv.name}"
        assert p["csi.storage.k8s.io/node-publish-secret-namespace"] == \
            p["csi.storage.k8s.io/node-stage-secret-namespace"]


def test_node_service_account_writes_configmaps_only():
    objs = render_docs("defaults")
    ds = one(objs, "DaemonSet", "-node")
    spec = ds["spec"]["template"]["spec"]
    sa, ns = spec["serviceAccountName"], ds["metadata"]["namespace"]
    bound = [b for b in by_kind(objs, "RoleBinding") + by_kind(objs, "ClusterRoleBinding")
             if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"])]
    assert [(b["kind"], b["roleRef"]["name"]) for b in bound] == \
        [("RoleBinding", "csi-spdk-node-acks")]
    role = one(objs, "Role", "-node-acks")
    assert role["metadata"]["namespace"] == ns
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "verbs": ["get", "create", "patch"]}]
    # the only token is the projected, Pod-bound one (node-name claim)
    assert spec["automountServiceAccountToken"] is False
    vol = next(v for v in spec["volumes"] if v["name"] == "kube-api-access")
    assert {"serviceAccountToken"} <= {k for s in vol["projected"]["sources"] for k in s}
    driver = containers(ds)["csi-spdk"]
    assert {"name": "kube-api-access", "mountPath":
            "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True} in \
        driver["volumeMounts"]
    env = {e["name"]: e for e in driver["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert all(not c.get("volumeMounts") or not any(
        m["name"] == "kube-api-access" for m in c["volumeMounts"])
        for name, c in containers(ds).items() if name != "csi-spdk")


def test_admission_policy_ties_the_name_to_the_node_claim():
    objs = render_docs("defaults")
    ds = one(objs, "DaemonSet", "-node")
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    ns = ds["metadata"]["namespace"]
    pol = one(objs, "ValidatingAdmissionPolicy", "-node-acks")["spec"]
    assert pol["failurePolicy"] == "Fail"
    (rule,) = pol["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["configmaps"] and {"CREATE", "UPDATE"} <= set(
        rule["operations"])
    (cond,) = pol["matchConditions"]
    assert f"'system:serviceaccount:{ns}:{sa}'" in cond["expression"]
    text = " ".join(v["expression"] for v in pol["variables"] + pol["validations"])
    assert CLAIM in text and "'csi-spdk-node-' + variables.node" in text
    binding = one(objs, "ValidatingAdmissionPolicyBinding", "-node-acks")["spec"]
    assert binding["policyName"] == "csi-spdk-node-acks"
    assert binding["validationActions"] == ["Deny"]
    assert binding["matchResources"]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": ns}
