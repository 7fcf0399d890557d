"""deploy/manifests: the committed rendering and the examples."""

from __future__ import annotations

import subprocess

import yaml

from .conftest import (
    EXAMPLES,
    KUBE_VERSIONS,
    MANIFESTS,
    ROOT,
    by_kind,
    docs,
    missing,
    render_docs,
    tool,
)
from .test_chart import CRD_KINDS, kubeconform


def test_committed_manifests_match_the_chart(tmp_path):
    tool("helm")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "render-manifests.sh"), str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    fresh = (tmp_path / "csi-spdk.yaml").read_text()
    committed = (MANIFESTS / "csi-spdk.yaml").read_text()
    assert fresh == committed, (
        "deploy/manifests/csi-spdk.yaml is stale: run scripts/render-manifests.sh and commit it")


def test_committed_manifests_are_the_default_rendering():
    committed = docs((MANIFESTS / "csi-spdk.yaml").read_text())
    assert committed[0]["kind"] == "Namespace"
    assert committed[1:] == render_docs("defaults")


def _examples() -> list[dict]:
    objs = []
    for f in sorted(EXAMPLES.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                d.setdefault("metadata", {}).setdefault("namespace", "default")
                objs.append(d)
    return objs


def test_examples_validate():
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate (PyPI)")
    for obj in _examples():
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_example_snapshot_validates(kubeconform_schemas):
    crs = [o for o in _examples() if o["kind"] in CRD_KINDS]
    assert [o["kind"] for o in crs] == ["VolumeSnapshot"]
    out = kubeconform(crs, kubeconform_schemas)
    assert out.returncode == 0, out.stdout + out.stderr


def test_examples_cover_the_walkthrough_and_fit_the_chart():
    objs = _examples()
    defaults = render_docs("defaults")
    sc_names = {o["metadata"]["name"] for o in by_kind(defaults, "StorageClass")}
    vsc_names = {o["metadata"]["name"] for o in by_kind(defaults, "VolumeSnapshotClass")}
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    modes = {p["spec"].get("volumeMode", "Filesystem") for p in pvcs}
    assert modes == {"Filesystem", "Block"}
    for p in pvcs:
        assert p["spec"]["storageClassName"] in sc_names
    sources = {p["spec"].get("dataSource", {}).get("kind") for p in pvcs}
    assert {"VolumeSnapshot", "PersistentVolumeClaim"} <= sources
    claims = {p["metadata"]["name"] for p in pvcs}
    pods = by_kind(objs, "Pod")
    used = {v["persistentVolumeClaim"]["claimName"] for pod in pods
            for v in pod["spec"]["volumes"]}
    assert used <= claims and len(pods) == 2
    assert any(c.get("volumeDevices") for pod in pods for c in pod["spec"]["containers"])
    (snap,) = by_kind(objs, "VolumeSnapshot")
    assert snap["spec"]["volumeSnapshotClassName"] in vsc_names
    assert snap["spec"]["source"]["persistentVolumeClaimName"] in claims
    # expand-pvc.yaml re-applies spdk-fs with a bigger request
    sizes = [p["spec"]["resources"]["requests"]["storage"] for p in pvcs
             if p["metadata"]["name"] == "spdk-fs"]
    assert sorted(sizes) == ["1Gi", "2Gi"]
