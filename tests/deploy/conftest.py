"""Shared helpers of the deployment checks (Helm chart, manifests, Dockerfile).

Tools come from scripts/install-deploy-tools.sh. A missing tool skips the
tests that need it with the reason, unless CI is set: then it fails them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from . import crd_schema

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "csi-spdk"
MANIFESTS = ROOT / "deploy" / "manifests"
EXAMPLES = MANIFESTS / "examples"
VALUES_DIR = Path(__file__).resolve().parent / "values"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"

# Pinned with scripts/install-deploy-tools.sh.
SNAPSHOTTER_CLIENT_MODULE = "github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0"
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
# Kubernetes versions every rendering is validated against (kubernetes-validate).
KUBE_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34"]
# The version `helm template` renders for (the chart needs >= 1.30).
RENDER_KUBE_VERSION = "1.34.0"
NAMESPACE = "csi-spdk"
RELEASE = "csi-spdk"

# name -> extra values file (None = chart defaults).
VALUE_SETS = {
    "defaults": None,
    "spdk-tgt": VALUES_DIR / "spdk-tgt.yaml",
    "multi-target": VALUES_DIR / "multi-target.yaml",
    "metrics-off": VALUES_DIR / "metrics-off.yaml",
    "no-huge": VALUES_DIR / "no-huge.yaml",
    "monitoring": VALUES_DIR / "monitoring.yaml",
    "agent-pools": VALUES_DIR / "agent-pools.yaml",
    "agent-node-pools": VALUES_DIR / "agent-node-pools.yaml",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(what: str) -> None:
    """Skip (locally) or fail (CI) because a tool is not installed."""
    msg = f"{what} not installed: run scripts/install-deploy-tools.sh"
    if in_ci():
        pytest.fail(f"{msg} (CI is set, so this is a failure, not a skip)")
    pytest.skip(msg)


@functools.cache
def _go_bin_dir() -> Path | None:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists()
                                else None)
    if not go:
        return None
    out = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True, check=False)
    return Path(out.stdout.strip().split(os.pathsep)[0]) / "bin" if out.returncode == 0 else None


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    gobin = _go_bin_dir()
    if gobin and (gobin / name).is_file():
        return str(gobin / name)
    return None


def tool(name: str) -> str:
    path = find_tool(name)
    if not path:
        missing(name)
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


@functools.cache
def _render(values_file: str | None) -> str:
    helm = tool("helm")
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
           "--kube-version", RENDER_KUBE_VERSION]
    if values_file:
        cmd += ["-f", values_file]
    out = run(cmd)
    assert out.returncode == 0, f"helm template {values_file or ''} failed:\n{out.stderr}"
    return out.stdout


def render(value_set: str) -> str:
    f = VALUE_SETS[value_set]
    return _render(str(f) if f else None)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def render_docs(value_set: str) -> list[dict]:
    return docs(render(value_set))


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def containers(workload: dict) -> dict[str, dict]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


@functools.cache
def prometheus_crd_dir() -> Path | None:
    """Directory of the Prometheus Operator's CRD YAMLs (Go module cache)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists() and not shutil.which("go"):
        return None
    out = run([go, "mod", "download", "-json", PROMETHEUS_OPERATOR_MODULE], cwd="/",
              env={**os.environ, "GOFLAGS": "-mod=mod"})
    if out.returncode != 0:
        return None
    d = Path(json.loads(out.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return d if d.is_dir() else None


@functools.cache
def snapshot_crd_dir() -> Path | None:
    """Directory of the external-snapshotter CRD YAMLs (Go module cache)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists() and not shutil.which("go"):
        return None
    out = run([go, "mod", "download", "-json", SNAPSHOTTER_CLIENT_MODULE], cwd="/",
              env={**os.environ, "GOFLAGS": "-mod=mod"})
    if out.returncode != 0:
        return None
    d = Path(json.loads(out.stdout)["Dir"]) / "config" / "crd"
    return d if d.is_dir() else None


def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def kubeconform_schemas(tmp_path_factory):
    crd_dir = snapshot_crd_dir()
    if crd_dir is None:
        missing("Go module cache copy of external-snapshotter/client/v8 (the snapshot CRDs)")
    out = tmp_path_factory.mktemp("schemas")
    written = crd_schema.convert(sorted(crd_dir.glob("snapshot.storage.k8s.io_*.yaml")), out)
    names = {p.name for p in written}
    assert {"volumesnapshotclass_v1.json", "volumesnapshot_v1.json"} <= names, names
    prom = prometheus_crd_dir()
    if prom is None:
        missing("Go module cache copy of prometheus-operator (the PrometheusRule CRD)")
    written = crd_schema.convert([prom / "monitoring.coreos.com_prometheusrules.yaml"], out)
    assert "prometheusrule_v1.json" in {p.name for p in written}
    for hand_written in SCHEMAS_DIR.glob("*.json"):
        (out / hand_written.name).write_text(hand_written.read_text())
    return out
