"""What the Kubernetes API knows about the driver's volumes, for the inspection
CLI: PersistentVolume and claim names by volume handle, and node names (a
subsystem's allow-list holds host NQNs, which are hashes of node names).

Optional and read-only: in a Pod it uses the service account (the controller's
can list PVs and nodes for the sidecars), elsewhere ``kubectl`` with the
caller's kubeconfig; when neither answers the caller gets the reason and the
listing goes on without those columns. No Kubernetes client library: two GETs.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT = 10.0


@dataclass
class KubeView:
    """PV names by (driver, volume handle), claims by PV, node names."""

    pvs: dict[str, str] = field(default_factory=dict)      # volume handle -> PV name
    encryption: dict[str, str] = field(default_factory=dict)  # handle -> PV's encryption
    claims: dict[str, str] = field(default_factory=dict)   # PV name -> "namespace/name"
    nodes: list[str] = field(default_factory=list)
    source: str = ""                                       # "in-cluster", "kubectl", ""
    error: str = ""                                        # why there is nothing


def _get_in_cluster(path: str) -> dict:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    with open(os.path.join(SA_DIR, "token"), encoding="ascii") as f:
        token = f.read().strip()
    ctx = ssl.create_default_context(cafile=os.path.join(SA_DIR, "ca.crt"))
    host = f"[{host}]" if ":" in host else host
    req = urllib.request.Request(f"https://{host}:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=TIMEOUT, context=ctx) as resp:
        return json.load(resp)


def _get_kubectl(kubectl: str, kind: str) -> dict:
    res = subprocess.run([kubectl, "get", kind, "-o", "json", f"--request-timeout={TIMEOUT:.0f}s"],
                         capture_output=True, text=True, timeout=TIMEOUT + 5)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(f"kubectl get {kind}: {lines[-1] if lines else res.returncode}")
    return json.loads(res.stdout)


def load(driver_name: str, mode: str = "auto") -> KubeView:
    """The view, or an empty one whose ``error`` says why (mode "off": skipped)."""
    if mode == "off":
        return KubeView(error="skipped (--kube off)")
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(f"{SA_DIR}/token"):
        source = "in-cluster"

        def get(kind: str) -> dict:
            return _get_in_cluster(f"/api/v1/{kind}")
    elif kubectl := shutil.which("kubectl"):
        source = "kubectl"

        def get(kind: str) -> dict:
            return _get_kubectl(kubectl, kind)
    else:
        return KubeView(error="no Kubernetes API (not in a Pod and no kubectl on PATH)")
    view = KubeView(source=source)
    try:
        pvs = get("persistentvolumes")
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as err:
        view.error = f"{source}: {err}"
        return view
    for pv in pvs.get("items") or []:
        csi = (pv.get("spec") or {}).get("csi") or {}
        if csi.get("driver") != driver_name or not csi.get("volumeHandle"):
            continue
        name = pv["metadata"]["name"]
        view.pvs[csi["volumeHandle"]] = name
        view.encryption[csi["volumeHandle"]] = \
            (csi.get("volumeAttributes") or {}).get("encryption") or "none"
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        if ref.get("name"):
            view.claims[name] = f"{ref.get('namespace', '')}/{ref['name']}"
    try:
        view.nodes = sorted(n["metadata"]["name"] for n in get("nodes").get("items") or [])
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as err:
        view.error = f"{source}: nodes: {err}"  # PV names are still good
    return view
