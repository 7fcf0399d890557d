"""PersistentVolumeClaims end to end on a real control plane (issue #5):
kube-apiserver + kube-controller-manager + snapshot-controller + the chart's
sidecars with the chart's RBAC, the driver's controller and SPDK simulators;
the test plays kubelet (Node/CSINode registration, NodeStage/Publish/Expand
in the QEMU guest).

Attach/detach: the VolumeAttachments are created by kube-controller-manager's
attach/detach controller for a Pod whose spec.nodeName names a Node with the
controller-managed-attach-detach annotation (no scheduler or kubelet is
needed for that); the test never creates a VolumeAttachment itself.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from csi_spdk import contract

from . import auth_scenarios, encryption_scenarios, qos_scenarios, scenarios, scheduling
from .cluster import NAMESPACE, Kubectl, python_csi_spdk, python_env
from .rig import GUEST_TARGET, HOST_TARGETS, SC_GUEST, SC_RETAIN, SC_WFFC

pytestmark = pytest.mark.timeout(600)


def test_sidecars_use_the_charts_service_account(rig):
    """The sidecars authenticate as the chart's ServiceAccount (so a rule
    missing from the chart's RBAC fails the tests) and it is not an admin."""
    k = Kubectl(rig.kubectl.binary, rig.sa_kubeconfig)
    who = k.json("auth", "whoami")
    assert who["status"]["userInfo"]["username"] == \
        "system:serviceaccount:csi-spdk:csi-spdk-controller", who
    assert k.run("auth", "can-i", "create", "persistentvolumes").stdout.strip() == "yes"
    assert k.run("auth", "can-i", "delete", "nodes", check=False).stdout.strip() == "no"
    assert k.run("auth", "can-i", "create", "csistoragecapacities", "-n", "csi-spdk"
                 ).stdout.strip() == "yes"


@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
def test_immediate_pvc_bound_and_deleted(env, block):
    scenarios.provision_immediate(env, block)


def test_wffc_selected_node_and_capacity(env):
    params = env.kubectl.get("storageclass", SC_WFFC).get("parameters", {})
    scenarios.wffc_selected_node(env, "k8s-node-b", "k8s-node-a", params)


def test_attach_detach_controller(env):
    scenarios.attach_detach(env)


@pytest.mark.parametrize("order", [("snap", "src", "restore", "clone"),
                                   ("src", "clone", "restore", "snap")],
                         ids=["snapshot-first", "source-first"])
def test_snapshot_restore_clone(env, order):
    scenarios.snapshot_restore_clone(env, order)


def test_expand_with_node_expansion_in_guest(env, rig):
    if rig.guest is None:
        pytest.skip("no QEMU guest (scripts/install-guest-deps.sh, or CSI_SPDK_K8S_GUEST=0)")
    scenarios.expand(env, SC_GUEST, GUEST_TARGET[4],
                     scenarios.FakeKubelet(rig.node_stub(), rig.kubectl))


def test_guest_dhchap_node_stage_secret_from_api_server(env, rig):
    """The guest class is auth: dhchap (the default): the test, as kubelet,
    stages with the Secret the PV names, read from the API server; the guest
    kernel refuses no key and other keys."""
    if rig.guest is None:
        pytest.skip("no QEMU guest (scripts/install-guest-deps.sh, or CSI_SPDK_K8S_GUEST=0)")
    auth_scenarios.guest_stage_with_secret(
        env, SC_GUEST, GUEST_TARGET[4], scenarios.FakeKubelet(rig.node_stub(), rig.kubectl),
        GUEST_TARGET[0])


def test_rotate_keys_command_keeps_the_guest_connection(env, rig):
    """csi-spdk rotate-keys as an operator runs it (the controller's config and
    ServiceAccount), re-keying the guest node's live connection."""
    if rig.guest is None:
        pytest.skip("no QEMU guest (scripts/install-guest-deps.sh, or CSI_SPDK_K8S_GUEST=0)")

    def run_cli(args):
        env_vars = {**os.environ, **python_env(), "KUBECONFIG": str(rig.sa_kubeconfig),
                    "POD_NAMESPACE": NAMESPACE}
        return subprocess.run([*python_csi_spdk(), *args, "--config",
                               str(rig.dir / "config.yaml")], env=env_vars,
                              capture_output=True, text=True, timeout=300)
    auth_scenarios.rotate_keys_command(
        env, SC_GUEST, GUEST_TARGET[4], scenarios.FakeKubelet(rig.node_stub(), rig.kubectl),
        GUEST_TARGET[0], run_cli, rig.guest.node_endpoint)


def test_secret_rbac_own_namespace_only(env, rig):
    auth_scenarios.rbac_limits_secrets(env, Kubectl(rig.kubectl.binary, rig.sa_kubeconfig))


def test_retain_keeps_volume_and_secret(env, rig):
    auth_scenarios.retain_keeps_secret(env, SC_RETAIN, rig.controller_stub(),
                                       HOST_TARGETS["target-a"][3])


def test_secret_deleted_by_hand(env, rig):
    auth_scenarios.secret_deleted_by_hand(env, env.sc_immediate, rig.controller_stub(),
                                          HOST_TARGETS["target-a"][3])


def test_bad_storageclass_parameter(env):
    scenarios.bad_parameter(env, "csi-spdk-bad-param", env.sc_immediate)


def test_size_larger_than_any_pool(env):
    scenarios.too_large(env)


def test_snapshot_of_missing_volume(env):
    scenarios.snapshot_of_missing_volume(env, "target-a")


QEMU_SSD = contract.TOPOLOGY_SSD_PREFIX + "qemu-nvme-ctrl"


def test_ssd_class_allowed_topologies_wffc(env, rig):
    """The guest node's emulated NVMe SSDs (two, one class) give it one SSD
    class label; a WaitForFirstConsumer class restricted to it is scheduled
    (by the test, as kube-scheduler's VolumeBinding would) to that node, and
    the volume lands on the guest's target."""
    if rig.guest is None:
        pytest.skip("no QEMU guest (scripts/install-guest-deps.sh, or CSI_SPDK_K8S_GUEST=0)")
    seg = env.nodes[GUEST_TARGET[4]]["segment"]
    assert [k for k in seg if k.startswith(contract.TOPOLOGY_SSD_PREFIX)] == [QEMU_SSD], seg
    csinode = rig.kubectl.get("csinode", GUEST_TARGET[4])
    assert QEMU_SSD in csinode["spec"]["drivers"][0]["topologyKeys"], csinode
    scheduling.ssd_class(env, QEMU_SSD, GUEST_TARGET[4])


def test_ssd_class_no_node_has_stays_pending(env):
    scheduling.ssd_class_nobody_has(
        env, contract.TOPOLOGY_SSD_PREFIX + "samsung-mzql21t9hcjr-00a07")


def test_volume_attributes_class_qos(env):
    qos_scenarios.volume_attributes_classes(env)


@pytest.mark.parametrize("mode", ["target", "node"])
def test_encrypted_pvc_keeps_its_key_in_the_pvs_secret(env, mode):
    """Bound; the PV's Secret has the key, the PV and contexts do not; the
    attach exports the crypto bdev (target) or the lvol (node); deleting the
    PVC deletes the Secret."""
    encryption_scenarios.encrypted_pvc(env, env.sc_block, mode)


@pytest.mark.parametrize("mode", ["node", "target"])
def test_encrypted_pvc_staged_in_guest_with_the_pvs_secret(env, rig, mode):
    """As kubelet: NodeStage in the guest with the data of the PV's
    nodeStageSecretRef Secret (node mode: LUKS2 opens with its key)."""
    if rig.guest is None:
        pytest.skip("no QEMU guest (scripts/install-guest-deps.sh, or CSI_SPDK_K8S_GUEST=0)")
    encryption_scenarios.encrypted_pvc(env, SC_GUEST, mode,
                                       scenarios.FakeKubelet(rig.node_stub(), env.kubectl),
                                       GUEST_TARGET[4])
