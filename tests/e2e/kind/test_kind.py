"""The PVC scenarios of tests/e2e/k8s (shared code: k8s/scenarios.py) against
a kind cluster (or any cluster) in the current kubeconfig context, with the
Helm chart installed with tests/e2e/kind/values.yaml, the snapshot CRDs and
snapshot-controller, a driver image and a running spdk_tgt. Here kubelet does
the node part itself (real Pods, image registry.k8s.io/pause).

Runs only with CSI_SPDK_KIND=1 (see README.md next to this file); CI has no
Docker, so it skips there. Environment:
  CSI_SPDK_KIND=1                    run at all
  CSI_SPDK_KIND_RPC                  target=rpc[,target=rpc...] SPDK JSON-RPC of
                                     every configured target, reachable from
                                     where pytest runs (for the SPDK assertions)
  CSI_SPDK_KIND_NAMESPACE            the chart's namespace (default csi-spdk)
  CSI_SPDK_KIND_IMAGE_DIR            scripts/build-image.sh's output loaded with
                                     `kind load image-archive`: the chart's
                                     driver containers must run that build
  CSI_SPDK_KIND_NODE_TARGETS         node=target[,...] targets hosted by nodes
                                     (config `node:`); two enable the
                                     WaitForFirstConsumer placement scenario
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k8s import scenarios  # noqa: E402
from k8s.cluster import BIN, Kubectl  # noqa: E402
from k8s.rig import SC_BLOCK, SC_IMMEDIATE, SC_WFFC, SNAPSHOT_CLASS, Spdk  # noqa: E402

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(os.environ.get("CSI_SPDK_KIND") != "1", reason=(
                  "needs a kind cluster with the csi-spdk chart, a driver image and a "
                  "running spdk_tgt (Docker); CI here has no Docker. Set CSI_SPDK_KIND=1 "
                  "to run (tests/e2e/kind/README.md)"))]
NAMESPACE = "csi-spdk-kind-tests"


def _pairs(var: str) -> dict[str, str]:
    raw = os.environ.get(var, "")
    return dict(p.split("=", 1) for p in raw.split(",") if "=" in p)


@pytest.fixture(scope="module")
def kind_env():
    kubectl = shutil.which("kubectl") or str(BIN / "kubectl")
    k = Kubectl(kubectl, None)
    rpcs = _pairs("CSI_SPDK_KIND_RPC")
    if not rpcs:
        pytest.fail("CSI_SPDK_KIND_RPC (target=rpc,...) is required to check SPDK's state")
    nodes = {}
    for csinode in k.get("csinodes"):
        for d in csinode["spec"].get("drivers") or []:
            if d["name"] == "csi-spdk.io":
                labels = k.get("node", csinode["metadata"]["name"])["metadata"]["labels"]
                nodes[csinode["metadata"]["name"]] = {
                    "node_id": d["nodeID"],
                    "segment": {key: labels[key] for key in d.get("topologyKeys") or []
                                if key in labels}}
    if not nodes:
        pytest.fail("no node runs the csi-spdk node plugin (no CSINode driver entry)")
    k.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    spdk = Spdk(rpcs)
    env = scenarios.Env(
        kubectl=k, spdk=spdk, namespace=NAMESPACE,
        driver_namespace=os.environ.get("CSI_SPDK_KIND_NAMESPACE", "csi-spdk"),
        sc_immediate=SC_IMMEDIATE, sc_wffc=SC_WFFC, sc_block=SC_BLOCK,
        snapshot_class=SNAPSHOT_CLASS, nodes=nodes, fake_kubelet=False,
        target_of_node=_pairs("CSI_SPDK_KIND_NODE_TARGETS"))
    yield env
    k.run("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false")
    spdk.close()


def test_driver_pods_run_the_built_image(kind_env):
    """The chart's driver containers run the image scripts/build-image.sh made
    (the one CI builds and runs), not some other build under the same tag."""
    given = os.environ.get("CSI_SPDK_KIND_IMAGE_DIR")
    if not given:
        pytest.skip("CSI_SPDK_KIND_IMAGE_DIR not set (image built with docker build)")
    digest = (Path(given) / "digest").read_text().strip()
    algo, _, hexd = digest.partition(":")
    manifest = json.loads((Path(given) / "oci" / "blobs" / algo / hexd).read_text())
    # containerd reports the repo digest (name@<manifest>) when the import
    # recorded one, else the image id (<config digest>): either names this build
    builds = (digest, manifest["config"]["digest"])
    pods = kind_env.kubectl.get("pods", namespace=kind_env.driver_namespace)
    ids = {c["name"] + "@" + p["metadata"]["name"]: c.get("imageID", "")
           for p in pods for c in p.get("status", {}).get("containerStatuses") or []
           if "csi-spdk/csi-spdk" in c.get("image", "")}
    assert ids, "no container of the chart runs the csi-spdk image"
    assert all(i.endswith(builds) for i in ids.values()), (builds, ids)


@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
def test_immediate_pvc_bound_and_deleted(kind_env, block):
    scenarios.provision_immediate(kind_env, block)


def test_wffc_selected_node_and_capacity(kind_env):
    nodes = list(kind_env.target_of_node)
    if len(nodes) < 2:
        pytest.skip("needs two nodes hosting targets (CSI_SPDK_KIND_NODE_TARGETS)")
    params = kind_env.kubectl.get("storageclass", SC_WFFC).get("parameters", {})
    free = {n: kind_env.spdk.lvstore_free(t) for n, t in kind_env.target_of_node.items()}
    node = min(free, key=free.get)
    other = max(free, key=free.get)
    scenarios.wffc_selected_node(kind_env, node, other, params)


def test_attach_detach_controller(kind_env):
    scenarios.attach_detach(kind_env)


@pytest.mark.parametrize("order", [("snap", "src", "restore", "clone"),
                                   ("src", "clone", "restore", "snap")],
                         ids=["snapshot-first", "source-first"])
def test_snapshot_restore_clone(kind_env, order):
    scenarios.snapshot_restore_clone(kind_env, order)


def test_expand_with_node_expansion(kind_env):
    scenarios.expand(kind_env, SC_IMMEDIATE, sorted(kind_env.nodes)[0], None)


def test_bad_storageclass_parameter(kind_env):
    scenarios.bad_parameter(kind_env, "csi-spdk-bad-param", SC_IMMEDIATE)


def test_size_larger_than_any_pool(kind_env):
    scenarios.too_large(kind_env)


def test_snapshot_of_missing_volume(kind_env):
    scenarios.snapshot_of_missing_volume(kind_env, sorted(kind_env.spdk.apis)[0])
