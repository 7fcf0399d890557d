"""The Helm chart: lint, render, validate, and agree with the driver.

Every value set in conftest.VALUE_SETS is rendered with `helm template`,
validated strictly against the Kubernetes 1.30-1.34 schemas
(kubernetes-validate) and, for CRD kinds, with kubeconform against schemas
generated from the external-snapshotter CRDs. Then the rendered objects are
cross-checked with the driver itself: its CLI flags, its StorageClass
parameters, its config loader, its socket paths; and the RBAC with what each
sidecar's documentation says it needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    RENDER_KUBE_VERSION,
    ROOT,
    VALUE_SETS,
    by_kind,
    containers,
    missing,
    one,
    python,
    render,
    render_docs,
    run,
    tool,
)

CRD_KINDS = {"VolumeSnapshotClass", "VolumeSnapshot", "ServiceMonitor", "PrometheusRule"}


# --- lint and render ---------------------------------------------------------------

@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_helm_lint_strict(value_set):
    cmd = [tool("helm"), "lint", "--strict", str(CHART), "--kube-version", RENDER_KUBE_VERSION]
    if VALUE_SETS[value_set]:
        cmd += ["-f", str(VALUE_SETS[value_set])]
    out = run(cmd)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_kubernetes_validate_strict(value_set):
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate (PyPI)")
    objs = render_docs(value_set)
    assert objs
    checked = 0
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue  # kubeconform, below
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{value_set}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                            f"Kubernetes {version}: {err.message} at {list(err.path)}")
            checked += 1
    assert checked >= len(KUBE_VERSIONS) * 5


def kubeconform(docs_: list[dict], schema_dir: Path) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs_, f)
    location = f"{schema_dir}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json"
    return run([tool("kubeconform"), "-strict", "-summary", "-output", "json",
                "-schema-location", location, f.name])


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_kubeconform_crd_kinds(value_set, kubeconform_schemas):
    crs = [o for o in render_docs(value_set) if o["kind"] in CRD_KINDS]
    if not crs:
        # snapshotter off / no classes, and no metrics for a ServiceMonitor
        assert value_set in ("metrics-off", "no-huge"), f"{value_set} lost its CRD objects"
        return
    out = kubeconform(crs, kubeconform_schemas)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)["summary"]
    assert summary["valid"] == len(crs) and summary["skipped"] == 0, summary


def test_kubeconform_catches_a_bad_snapshot_class(kubeconform_schemas):
    bad = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
           "metadata": {"name": "x"}, "driver": "csi-spdk.io", "deletionPolicy": "Sometimes",
           "parameterz": {}}
    out = kubeconform([bad], kubeconform_schemas)
    assert out.returncode != 0, "kubeconform accepted an invalid VolumeSnapshotClass"


@pytest.mark.parametrize("values,error", [
    ({"logLevel": "loud"}, "logLevel"),
    ({"storageClasses": [{"name": "x", "parameters": {"replicas": "3"}}]}, "replicas"),
    ({"storageClasses": [{"name": "x", "parameters": {"clearMethod": "shred"}}]}, "clearMethod"),
    ({"config": {"targets": [{"name": "Bad_Name", "rpc": "1.2.3.4:5",
                              "nvmf": {"listenAddress": "1.2.3.4"}}]}}, "name"),
    ({"config": {"targets": []}}, "targets"),
    ({"spdkTgt": {"enabled": True}}, "repository"),
    ({"node": {"maxVolumes": -1}}, "maxVolumes"),
    ({"controller": {"timeout": "soon"}}, "timeout"),
    ({"images": {"driver": {"repository": "x", "tag": "", "pullPolicy": "Always"}}}, "tag"),
    ({"unknownTopLevel": 1}, "unknownTopLevel"),
    ({"node": {"probes": {"startup": {"periodSeconds": 0, "timeoutSeconds": 5,
                                      "failureThreshold": 3},
                          "liveness": {"periodSeconds": 10, "timeoutSeconds": 5,
                                       "failureThreshold": 3}}}}, "periodSeconds"),
    ({"controller": {"probes": {"startup": {"initialDelay": 10}}}}, "initialDelay"),
])
def test_schema_rejects_wrong_values(values, error, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([tool("helm"), "template", "x", str(CHART), "--kube-version", RENDER_KUBE_VERSION,
               "-f", str(f)])
    assert out.returncode != 0, f"schema accepted {values}"
    assert "schema" in out.stderr and error in out.stderr, out.stderr


# --- the chart agrees with the driver ----------------------------------------------------

def _cli_flags(subcommand: str) -> set[str]:
    out = run([python(), "-m", "csi_spdk", subcommand, "--help"], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def _driver_args(container: dict) -> tuple[str, list[str]]:
    args = container.get("args", [])
    return args[0], args[1:]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_driver_flags_exist_in_cli(value_set):
    objs = render_docs(value_set)
    seen = 0
    for workload, sub in ((one(objs, "Deployment", "-controller"), "controller"),
                          (one(objs, "DaemonSet", "-node"), "node")):
        c = containers(workload)["csi-spdk"]
        subcommand, args = _driver_args(c)
        assert subcommand == sub
        accepted = _cli_flags(sub)
        for arg in args:
            flag = arg.split("=", 1)[0]
            assert flag in accepted, f"{sub}: the chart passes {flag}, `csi-spdk {sub} --help` " \
                                     f"accepts only {sorted(accepted)}"
            seen += 1
        # Required flags are always given.
        for required in ("--endpoint",) + (("--config",) if sub == "controller" else
                                            ("--node-id",)):
            assert any(a.startswith(required + "=") for a in args), required
    assert seen >= 8


def test_node_id_comes_from_spec_node_name():
    node = containers(one(render_docs("defaults"), "DaemonSet", "-node"))["csi-spdk"]
    assert "--node-id=$(NODE_NAME)" in node["args"]
    env = {e["name"]: e for e in node["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def _accepted_parameters() -> tuple[set[str], str, dict[str, set[str]]]:
    """(keys, prefix of ignored keys, allowed values) as the driver defines them."""
    try:
        from csi_spdk.controller import requests as controller
        keys = set(controller.PARAM_KEYS)
        prefix = controller.K8S_PARAM_PREFIX
        allowed = {"clearMethod": set(controller.CLEAR_METHODS),
                   "fsType": set(controller.FS_TYPES), "thinProvision": {"true", "false"}}
        return keys, prefix, allowed
    except (ImportError, AttributeError):
        # Fallback: the StorageClass table of docs/DESIGN.md.
        text = (ROOT / "docs" / "DESIGN.md").read_text()
        section = text.split("## StorageClass parameters", 1)[1].split("\n## ", 1)[0]
        keys = set(re.findall(r"^\| `([A-Za-z]+)` \|", section, re.M))
        return keys, "csi.storage.k8s.io/", {}


def test_accepted_parameters_source_is_sane():
    keys, prefix, _ = _accepted_parameters()
    assert {"target", "lvstore", "thinProvision", "clearMethod", "fsType"} <= keys
    assert prefix == "csi.storage.k8s.io/"


def test_values_yaml_documents_every_parameter():
    keys, prefix, allowed = _accepted_parameters()
    values_text = (CHART / "values.yaml").read_text()
    for key in keys:
        assert re.search(rf"^#\s+{key}\s", values_text, re.M), \
            f"values.yaml does not document StorageClass parameter {key!r}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    params = schema["properties"]["storageClasses"]["items"]["properties"]["parameters"]
    assert set(params["properties"]) == keys, "values.schema.json parameters != driver's"
    assert list(params["patternProperties"]) == ["^" + re.escape(prefix)]
    for key, values in allowed.items():
        enum = {str(v).lower() for v in params["properties"][key]["enum"]}
        assert enum == values, f"schema allows {enum} for {key}, driver {values}"


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_storageclass_parameters_are_accepted(value_set):
    keys, prefix, allowed = _accepted_parameters()
    objs = render_docs(value_set)
    driver = one(objs, "CSIDriver")["metadata"]["name"] if by_kind(objs, "CSIDriver") else None
    for sc in by_kind(objs, "StorageClass"):
        assert sc["provisioner"] == driver
        for key, value in sc.get("parameters", {}).items():
            assert isinstance(value, str)
            if key.startswith(prefix):
                continue
            assert key in keys, f"StorageClass {sc['metadata']['name']}: {key!r} is not a " \
                                f"parameter the driver accepts ({sorted(keys)})"
            if key in allowed:
                assert value in allowed[key], f"{key}={value!r} not in {allowed[key]}"


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_configmap_loads_with_the_driver(value_set):
    from csi_spdk.controller import config

    objs = render_docs(value_set)
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-config")]
    values_file = VALUE_SETS[value_set]
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    if values.get("config", {}).get("existingSecret"):
        assert not cms
        vol = {v["name"]: v for v in one(objs, "Deployment", "-controller")["spec"]["template"]
               ["spec"]["volumes"]}["config"]
        assert vol["secret"]["secretName"] == values["config"]["existingSecret"]
        return
    assert len(cms) == 1
    cfg = config.parse(yaml.safe_load(cms[0]["data"]["config.yaml"]), value_set)
    expected = values.get("config", {}).get("targets") or \
        yaml.safe_load((CHART / "values.yaml").read_text())["config"]["targets"]
    assert cfg.target_names == [t["name"] for t in expected]
    if "defaultVolumeSize" in values.get("config", {}):
        assert cfg.default_volume_size == values["config"]["defaultVolumeSize"]


def _mounts(container: dict) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def _sock_path(container: dict, flag: str) -> str:
    for a in container["args"]:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1].removeprefix("unix://")
    raise AssertionError(f"{container['name']} has no {flag}")


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_socket_paths_agree(value_set):
    objs = render_docs(value_set)
    values_file = VALUE_SETS[value_set]
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    kubelet = values.get("kubeletDir", defaults["kubeletDir"]).rstrip("/")
    driver_name = values.get("driverName", defaults["driverName"])
    for kind, suffix in (("Deployment", "-controller"), ("DaemonSet", "-node")):
        w = one(objs, kind, suffix)
        cs = containers(w)
        drv = cs.pop("csi-spdk")
        sock = _sock_path(drv, "--endpoint")
        sock_dir = str(Path(sock).parent)
        vol = {m: n for n, m in _mounts(drv).items()}[sock_dir]
        for name, c in cs.items():
            addr = _sock_path(c, "--csi-address")
            assert addr == sock, f"{kind} {name} dials {addr}, driver listens on {sock}"
            assert _mounts(c).get(vol) == sock_dir, f"{name} does not mount {vol} at {sock_dir}"
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        if kind == "DaemonSet":
            host_dir = volumes[vol]["hostPath"]["path"]
            assert host_dir == f"{kubelet}/plugins/{driver_name}"
            reg = _sock_path(cs["node-driver-registrar"], "--kubelet-registration-path")
            assert reg == f"{host_dir}/{Path(sock).name}"
            assert volumes["registration-dir"]["hostPath"]["path"] == f"{kubelet}/plugins_registry"
            assert _mounts(cs["node-driver-registrar"])["registration-dir"] == "/registration"
            kubelet_mount = [m for m in drv["volumeMounts"] if m["name"] == "kubelet-dir"][0]
            assert kubelet_mount["mountPath"] == kubelet
            assert kubelet_mount["mountPropagation"] == "Bidirectional"
            assert volumes["kubelet-dir"]["hostPath"]["path"] == kubelet
        else:
            assert "emptyDir" in volumes[vol]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_spdk_rpc_socket_shared_with_node_plugin(value_set):
    objs = render_docs(value_set)
    tgts = [d for d in by_kind(objs, "DaemonSet") if d["metadata"]["name"].endswith("-spdk-tgt")]
    node = containers(one(objs, "DaemonSet", "-node"))["csi-spdk"]
    if not tgts:
        return
    tgt = containers(tgts[0])["spdk-tgt"]
    args = tgt["args"]
    sock = args[args.index("-r") + 1]
    assert "--spdk-rpc=unix://" + sock in node["args"]
    assert _mounts(node)["spdk-rpc"] == str(Path(sock).parent)
    assert _mounts(tgt)["spdk-rpc"] == str(Path(sock).parent)
    vol = {v["name"]: v for v in tgts[0]["spec"]["template"]["spec"]["volumes"]}["spdk-rpc"]
    assert vol["hostPath"]["path"] == str(Path(sock).parent)
    assert tgt["securityContext"]["privileged"] is True
    if "--no-huge" in args:
        assert int(args[args.index("-s") + 1]) > 0
    else:
        limits = tgt["resources"]["limits"]
        assert any(k.startswith("hugepages-") for k in limits)


def test_node_daemonset_shape():
    objs = render_docs("defaults")
    ds = one(objs, "DaemonSet", "-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    drv = containers(ds)["csi-spdk"]
    assert drv["securityContext"]["privileged"] is True
    mounts = _mounts(drv)
    assert mounts["dev"] == "/dev" and mounts["sys"] == "/sys"
    assert mounts["state-dir"] == "/var/lib/csi-spdk" and "--state-dir=/var/lib/csi-spdk" in \
        drv["args"]
    assert mounts["etc-nvme"] == "/etc/nvme"
    assert set(containers(ds)) == {"csi-spdk", "node-driver-registrar", "liveness-probe"}


def test_controller_shape():
    objs = render_docs("defaults")
    dep = one(objs, "Deployment", "-controller")
    cs = containers(dep)
    assert set(cs) == {"csi-spdk", "csi-provisioner", "csi-attacher", "csi-resizer",
                       "csi-snapshotter", "liveness-probe"}
    prov = cs["csi-provisioner"]["args"]
    for flag in ("--extra-create-metadata=true", "--enable-capacity=true",
                 "--leader-election=true"):
        assert flag in prov
    for name in ("csi-attacher", "csi-resizer", "csi-snapshotter"):
        assert "--leader-election=true" in cs[name]["args"]
    csidriver = one(objs, "CSIDriver")
    assert csidriver["spec"]["attachRequired"] is True
    assert csidriver["spec"]["storageCapacity"] is True
    assert csidriver["spec"]["volumeLifecycleModes"] == ["Persistent"]
    off = render_docs("metrics-off")
    assert one(off, "CSIDriver")["spec"]["storageCapacity"] is False
    assert not by_kind(off, "Service") and not by_kind(off, "ServiceMonitor")
    assert set(containers(one(off, "Deployment", "-controller"))) == {
        "csi-spdk", "csi-provisioner", "csi-attacher", "liveness-probe"}


def test_every_image_is_pinned():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name, image in values["images"].items():
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", image["tag"]), f"{name}: tag {image['tag']!r}"
    for value_set in VALUE_SETS:
        for w in by_kind(render_docs(value_set), "Deployment") + \
                by_kind(render_docs(value_set), "DaemonSet"):
            for c in w["spec"]["template"]["spec"]["containers"]:
                repo, _, tag = c["image"].rpartition(":")
                assert repo and tag and tag != "latest", c["image"]


# --- RBAC ---------------------------------------------------------------------------------
# What each sidecar's own deploy/kubernetes/rbac.yaml grants, at the pinned
# versions (read from the release trees of kubernetes-csi/external-provisioner
# v6.4.0, external-attacher v4.13.0, external-resizer v2.3.0 and
# external-snapshotter v8.7.0 deploy/kubernetes/csi-snapshotter/
# rbac-csi-snapshotter.yaml). node-driver-registrar v2.17.0's README: "does not
# interact with the Kubernetes API, so no RBAC"; livenessprobe neither.
# (group, resource) -> verbs.
# The driver itself (and external-attacher, which reads the controller-publish
# secret): the per-volume key Secrets, in the release namespace only.
DRIVER_RBAC_NS = {("", "secrets"): {"get", "list", "create", "delete", "patch"},
                  # rotate-keys waits for the nodes' acknowledgements
                  ("", "configmaps"): {"get", "list", "watch"}}

SIDECAR_RBAC = {
    "provisioner": {
        "cluster": {
            ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
            ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
            ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
            ("", "events"): {"list", "watch", "create", "update", "patch"},
            ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list", "watch", "update"},
            ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
            ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
            ("", "nodes"): {"get", "list", "watch"},
            ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch"},
            # Beyond upstream's rbac.yaml: Provision reads the PVC's class
            # (pkg/controller/controller.go VolumeAttributesClasses().Get) to
            # pass its parameters as CreateVolume mutable_parameters.
            ("storage.k8s.io", "volumeattributesclasses"): {"get"},
        },
        "namespace": {
            ("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update",
                                                "create"},
            # capacity tracking (deploy/kubernetes/rbac.yaml, external-provisioner-cfg)
            ("storage.k8s.io", "csistoragecapacities"): {"get", "list", "watch", "create",
                                                         "update", "patch", "delete"},
            ("", "pods"): {"get"},
            ("apps", "replicasets"): {"get"},
        },
    },
    "attacher": {
        "cluster": {
            ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
            ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
            ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch", "patch"},
            ("storage.k8s.io", "volumeattachments/status"): {"patch"},
        },
        "namespace": {
            ("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update",
                                                "create"},
        },
    },
    "resizer": {
        "cluster": {
            ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
            ("", "persistentvolumeclaims"): {"get", "list", "watch"},
            ("", "pods"): {"get", "list", "watch"},
            ("", "persistentvolumeclaims/status"): {"patch"},
            ("", "events"): {"list", "watch", "create", "update", "patch"},
            ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
        },
        "namespace": {
            ("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update",
                                                "create"},
        },
    },
    "snapshotter": {
        "cluster": {
            ("", "events"): {"list", "watch", "create", "update", "patch"},
            ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
            ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch",
                                                                    "update", "patch"},
            ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
            ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses"): {"get", "list",
                                                                             "watch"},
            ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents"): {
                "get", "list", "watch", "update", "patch"},
            ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status"): {
                "update", "patch"},
        },
        "namespace": {
            ("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update",
                                                "create"},
        },
    },
}


def _grants(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for r in rules:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.setdefault((g, res), set()).update(r["verbs"])
    return out


def _subject_grants(objs, sa: str, namespace: str, cluster: bool):
    role_kind, binding_kind = ("ClusterRole", "ClusterRoleBinding") if cluster else \
        ("Role", "RoleBinding")
    roles = {r["metadata"]["name"]: r for r in by_kind(objs, role_kind)}
    per_role = {}
    for b in by_kind(objs, binding_kind):
        if any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == namespace
               for s in b["subjects"]):
            per_role[b["roleRef"]["name"]] = _grants(roles[b["roleRef"]["name"]]["rules"])
    return per_role


def test_rbac_covers_each_sidecar_and_nothing_more():
    objs = render_docs("defaults")
    dep = one(objs, "Deployment", "-controller")
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    ns = dep["metadata"]["namespace"]
    cluster = _subject_grants(objs, sa, ns, cluster=True)
    namespaced = _subject_grants(objs, sa, ns, cluster=False)
    sidecars = set(containers(dep)) - {"csi-spdk", "liveness-probe"}
    assert sidecars == {f"csi-{s}" for s in SIDECAR_RBAC}
    wanted_ns: dict = {k: set(v) for k, v in DRIVER_RBAC_NS.items()}
    for sidecar, need in SIDECAR_RBAC.items():
        role = [name for name in cluster if name.endswith("-" + sidecar)]
        assert len(role) == 1, f"no ClusterRole for {sidecar}"
        assert cluster[role[0]] == need["cluster"], f"{sidecar}: ClusterRole differs from upstream"
        for k, v in need["namespace"].items():
            wanted_ns.setdefault(k, set()).update(v)
    assert len(cluster) == len(SIDECAR_RBAC), f"extra ClusterRoles bound: {sorted(cluster)}"
    merged: dict = {}
    for grants in namespaced.values():
        for k, v in grants.items():
            merged.setdefault(k, set()).update(v)
    assert merged == wanted_ns


def test_rbac_follows_switched_off_features():
    objs = render_docs("metrics-off")  # resizer, snapshotter, capacity tracking off
    names = {r["metadata"]["name"] for r in by_kind(objs, "ClusterRole")}
    assert not any(n.endswith(("-resizer", "-snapshotter")) for n in names)
    role = one(objs, "Role", "-controller")
    assert set(_grants(role["rules"])) == {("coordination.k8s.io", "leases"), ("", "secrets"),
                                           ("", "configmaps")}
    node_sa = [s for s in by_kind(objs, "ServiceAccount")
               if s["metadata"]["name"].endswith("-node")]
    assert node_sa and node_sa[0]["automountServiceAccountToken"] is False


def test_no_rbac_when_disabled():
    objs = render_docs("no-huge")
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ServiceAccount")
    dep = one(objs, "Deployment", "-controller")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "csi-spdk-controller"


def test_render_is_deterministic():
    assert render("multi-target") == render("multi-target")


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_notes_render(value_set, tmp_path):
    """NOTES.txt only renders at `helm install` (needs a cluster): render it
    through a throw-away copy of the chart that wraps it in a ConfigMap."""
    import shutil

    chart = tmp_path / "csi-spdk"
    shutil.copytree(CHART, chart)
    (chart / "files").mkdir()
    (chart / "templates" / "NOTES.txt").rename(chart / "files" / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
        'data:\n  notes: {{ tpl (.Files.Get "files/notes.txt") . | quote }}\n')
    cmd = [tool("helm"), "template", "csi-spdk", str(chart), "--kube-version",
           RENDER_KUBE_VERSION, "--show-only", "templates/zz-notes.yaml"]
    if VALUE_SETS[value_set]:
        cmd += ["-f", str(VALUE_SETS[value_set])]
    out = run(cmd)
    assert out.returncode == 0, out.stderr
    notes = yaml.safe_load(out.stdout)["data"]["notes"]
    assert "PersistentVolumeClaim" in notes and "kubectl apply" in notes


def test_two_controllers_one_active_by_default():
    """Two replicas, and the driver elects itself (its Lease decides which Pod
    the sidecars' leaders can be in): a standby answers Probe not ready, so its
    liveness is probed on the metrics endpoint, not through livenessprobe."""
    dep = one(render_docs("defaults"), "Deployment", "-controller")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate"}
    driver = next(c for c in dep["spec"]["template"]["spec"]["containers"]
                  if c["name"] == "csi-spdk")
    assert "--leader-election" in driver["args"]
    assert "--leader-election-lease-duration=15s" in driver["args"]
    assert {e["name"] for e in driver["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    assert driver["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_encrypted_storageclass_without_auth_still_names_the_volume_secret(tmp_path):
    """encryption needs the volume's Secret as node-stage/controller-publish
    secret even with auth: none (the key travels in it); a class with neither
    gets no secret references."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"storageClasses": [
        {"name": "enc", "parameters": {"auth": "none", "encryption": "node"}},
        {"name": "plain", "parameters": {"auth": "none"}}]}))
    out = run([tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
               "--kube-version", RENDER_KUBE_VERSION, "-f", str(values)])
    assert out.returncode == 0, out.stderr
    scs = {sc["metadata"]["name"]: sc for sc in by_kind(
        [d for d in yaml.safe_load_all(out.stdout) if d], "StorageClass")}
    enc, plain = scs["enc"]["parameters"], scs["plain"]["parameters"]
    for kind in ("node-stage", "controller-publish"):
        assert enc[f"csi.storage.k8s.io/{kind}-secret-name"] == "csi-spdk-auth-${pv.name}"
        assert enc[f"csi.storage.k8s.io/{kind}-secret-namespace"] == NAMESPACE
    assert not [k for k in plain if k.endswith("-secret-name")], plain


def test_probes_come_from_values(tmp_path):
    """A slow first start is not a hang: the node driver, its registrar and
    the controller driver get a startupProbe before their livenessProbe, both
    from values (a small or loaded cluster sets generous ones)."""
    defaults = render_docs("defaults")
    ds, dep = one(defaults, "DaemonSet", "-node"), one(defaults, "Deployment", "-controller")
    for c in (containers(ds)["csi-spdk"], containers(ds)["node-driver-registrar"],
              containers(dep)["csi-spdk"]):
        assert c["startupProbe"]["httpGet"] == c["livenessProbe"]["httpGet"]
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] \
            == 300, c["name"]
        assert "initialDelaySeconds" not in c["livenessProbe"]
    assert containers(ds)["node-driver-registrar"]["startupProbe"]["httpGet"]["port"] \
        == "registrar"
    assert containers(ds)["csi-spdk"]["startupProbe"]["httpGet"]["port"] == "healthz"

    slow = {"startup": {"periodSeconds": 7, "timeoutSeconds": 31, "failureThreshold": 99},
            "liveness": {"periodSeconds": 33, "timeoutSeconds": 29, "failureThreshold": 11}}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"node": {"probes": slow},
                                      "controller": {"replicas": 1, "probes": slow}}))
    out = run([tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
               "--kube-version", RENDER_KUBE_VERSION, "-f", str(values)])
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    ds, dep = one(objs, "DaemonSet", "-node"), one(objs, "Deployment", "-controller")
    for c in (containers(ds)["csi-spdk"], containers(ds)["node-driver-registrar"],
              containers(dep)["csi-spdk"]):
        for kind in ("startup", "liveness"):
            probe = c[f"{kind}Probe"]
            assert {k: probe[k] for k in slow[kind]} == slow[kind], (c["name"], kind)
    # one replica: the controller is probed through livenessprobe's /healthz
    assert containers(dep)["csi-spdk"]["startupProbe"]["httpGet"] == {
        "path": "/healthz", "port": "healthz"}
