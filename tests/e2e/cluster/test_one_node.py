"""Scenarios on the storage node (node-a): what a Pod sees of csi-spdk
volumes through a real kubelet, the chart's node DaemonSet and its
controller Deployment.

The simulator's kernel-nvmet data plane keeps one DH-HMAC-CHAP key pair per
host NQN (csi_spdk/sim/nvmet.py), so two DH-HMAC-CHAP volumes attached to
one node at the same time would fail in the simulator (not in SPDK): every
scenario detaches its volumes (Pods deleted, VolumeAttachments gone) before
the next attaches one.
"""

from __future__ import annotations

import base64

import pytest

from . import rig

try:
    from k8s import cluster as k8s
except ImportError:
    from ..k8s import cluster as k8s

pytestmark = [pytest.mark.guest, pytest.mark.timeout(4800)]
NODE = rig.STORAGE_NODE


def test_filesystem_pvc_survives_its_pod(cluster, wl):
    """Default StorageClass (DH-HMAC-CHAP): a Pod writes a file, the Pod is
    deleted (the volume detaches), a new Pod on the same PVC reads it back."""
    wl.pvc("fs", "64Mi", rig.SC_FS)
    pvc = wl.bound("fs")
    pv = cluster.kubectl.get("pv", pvc["spec"]["volumeName"])
    attrs = pv["spec"]["csi"]["volumeAttributes"]
    assert pv["spec"]["csi"]["driver"] == "csi-spdk.io"
    # the controller made the per-volume keys and the chart's class points at them
    secret_ref = pv["spec"]["csi"].get("nodeStageSecretRef") or {}
    assert secret_ref.get("name", "").startswith("csi-spdk-auth-"), pv["spec"]["csi"]
    assert cluster.kubectl.get("secret", secret_ref["name"], secret_ref["namespace"])
    assert not any("key" in v.lower() and len(v) > 40 for v in attrs.values()), attrs

    wl.pod("writer", "fs", node=NODE)
    wl.running("writer")
    wl.sh("writer", "echo hello-from-writer > /data/f && sync")
    assert wl.sh("writer", "cat /data/f") == "hello-from-writer\n"
    mounts = wl.sh("writer", "grep ' /data ' /proc/mounts")
    assert "ext4" in mounts and "/dev/nvme" in mounts, mounts
    assert len(wl.attachments(pv["metadata"]["name"])) == 1
    wl.delete_pod("writer")
    wl.wait_detached(pv["metadata"]["name"])

    wl.pod("reader", "fs", node=NODE)
    wl.running("reader")
    assert wl.sh("reader", "cat /data/f") == "hello-from-writer\n"
    wl.delete_pod("reader")
    wl.wait_detached(pv["metadata"]["name"])
    wl.delete_pvc("fs")


def test_raw_block_pvc(cluster, wl):
    """A Block PVC through volumeDevices: the Pod sees a block device of the
    PVC's size and reads back what it wrote at an offset, also from a new Pod."""
    wl.pvc("blk", "32Mi", rig.SC_BLOCK, block=True)
    pv_name = wl.bound("blk")["spec"]["volumeName"]
    wl.pod("blk-1", "blk", block=True, node=NODE)
    wl.running("blk-1")
    assert int(wl.sh("blk-1", "blockdev --getsize64 /dev/xvda").strip()) == 32 << 20
    wl.sh("blk-1", "printf 'block-payload-%s' 42 | dd of=/dev/xvda bs=4096 seek=1000 "
                   "conv=fsync oflag=direct 2>/dev/null")
    wl.delete_pod("blk-1")
    wl.wait_detached(pv_name)
    wl.pod("blk-2", "blk", block=True, node=NODE)
    wl.running("blk-2")
    got = wl.sh("blk-2", "dd if=/dev/xvda bs=4096 skip=1000 count=1 iflag=direct 2>/dev/null "
                         "| head -c 16")
    assert got == "block-payload-42"
    wl.delete_pod("blk-2")
    wl.wait_detached(pv_name)
    wl.delete_pvc("blk")


def test_wait_for_first_consumer_follows_topology(cluster, wl):
    """A WaitForFirstConsumer PVC stays Pending until a Pod uses it; its
    class allows only topology.csi-spdk.io/node=node-a (the segment the node
    plugin reports, which kubelet put on the Node as a label), so the
    scheduler puts the Pod (which names no node) on node-a (with two nodes,
    node-b reports node-b), and that node is where the provisioner was told
    to provision (selected-node)."""
    wl.pvc("wffc", "32Mi", rig.SC_WFFC)
    wl.until("the PVC's WaitForFirstConsumer event",
             lambda: any("first consumer" in e.lower()
                         for e in wl.events("PersistentVolumeClaim", "wffc")), 60, 3)
    assert cluster.kubectl.get("pvc", "wffc", "pods")["status"]["phase"] == "Pending"
    wl.pod("wffc-pod", "wffc")
    pod = wl.running("wffc-pod")
    pvc = wl.bound("wffc")
    node = pod["spec"]["nodeName"]
    assert pvc["metadata"]["annotations"].get("volume.kubernetes.io/selected-node") == node
    assert node == NODE
    assert cluster.kubectl.get("node", node)["metadata"]["labels"][rig.TOPOLOGY_KEY] == NODE
    csinode = cluster.kubectl.get("csinode", node)
    keys = [d.get("topologyKeys") or [] for d in csinode["spec"]["drivers"]
            if d["name"] == "csi-spdk.io"]
    assert len(keys) == 1 and rig.TOPOLOGY_KEY in keys[0], csinode["spec"]
    assert wl.sh("wffc-pod", "echo ok > /data/x && cat /data/x") == "ok\n"
    wl.delete_pod("wffc-pod")
    wl.wait_detached(pvc["spec"]["volumeName"])
    wl.delete_pvc("wffc")


def test_snapshot_restore_reads_original_data(cluster, wl):
    """A VolumeSnapshot of a written PVC, restored to a new PVC: its Pod reads
    the data as it was at the snapshot, not what was written after."""
    k = cluster.kubectl
    wl.pvc("src", "64Mi", rig.SC_FS)
    src_pv = wl.bound("src")["spec"]["volumeName"]
    wl.pod("src-pod", "src", node=NODE)
    wl.running("src-pod")
    wl.sh("src-pod", "echo before-snapshot > /data/f && sync")
    k.create({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
              "metadata": {"name": "snap", "namespace": "pods"},
              "spec": {"volumeSnapshotClassName": rig.SNAPSHOT_CLASS,
                       "source": {"persistentVolumeClaimName": "src"}}})
    wl.wait("volumesnapshot/snap", "jsonpath={.status.readyToUse}=true", 300)
    wl.sh("src-pod", "echo after-snapshot > /data/f && sync")
    wl.delete_pod("src-pod")
    wl.wait_detached(src_pv)       # one DH-HMAC-CHAP volume per node at a time (simulator)
    wl.pvc("restored", "64Mi", rig.SC_FS,
           source={"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                   "name": "snap"})
    restored_pv = wl.bound("restored")["spec"]["volumeName"]
    assert restored_pv != src_pv
    wl.pod("restored-pod", "restored", node=NODE)
    wl.running("restored-pod")
    assert wl.sh("restored-pod", "cat /data/f") == "before-snapshot\n"
    wl.delete_pod("restored-pod")
    wl.wait_detached(restored_pv)
    wl.delete_pvc("restored")
    k.run("delete", "volumesnapshot", "snap", "-n", "pods", "--timeout=120s", timeout=150)
    wl.delete_pvc("src")


def test_online_expansion_seen_by_df(cluster, wl):
    """The PVC grows while its Pod runs: `df` inside the Pod shows the new
    size (ControllerExpandVolume, then kubelet's NodeExpandVolume resize2fs)."""
    wl.pvc("grow", "64Mi", rig.SC_FS)
    pv_name = wl.bound("grow")["spec"]["volumeName"]
    wl.pod("grow-pod", "grow", node=NODE)
    wl.running("grow-pod")
    before = wl.df_bytes("grow-pod")
    assert 40 << 20 < before <= 64 << 20, before
    wl.sh("grow-pod", "echo kept > /data/k && sync")
    cluster.kubectl.run("patch", "pvc", "grow", "-n", "pods", "--type=merge", "-p",
                        '{"spec":{"resources":{"requests":{"storage":"160Mi"}}}}')
    after = wl.until("df in the Pod shows the grown filesystem",
                     lambda: (lambda b: b if b > 128 << 20 else None)(wl.df_bytes("grow-pod")),
                     300)
    assert 128 << 20 < after <= 160 << 20, after
    wl.wait("pvc/grow", "jsonpath={.status.capacity.storage}=160Mi", 120)
    assert wl.sh("grow-pod", "cat /data/k") == "kept\n"
    wl.delete_pod("grow-pod")
    wl.wait_detached(pv_name)
    wl.delete_pvc("grow")


def test_rotate_keys_keeps_the_pods_connection(cluster, wl):
    """`csi-spdk rotate-keys` run in the controller Pod, as the README says,
    while a Pod writes to the volume: kubelet's republish (requiresRepublish)
    hands the node plugin the Secret's rotationStep pair, the node re-keys its
    live NVMe controller and acknowledges in its ConfigMap; the command ends
    with the new keys in the Secret, the Pod's mount answers throughout, and a
    new Pod (a new connection) authenticates with the new keys only."""
    from csi_spdk import contract
    k = cluster.kubectl
    wl.pvc("rot", "64Mi", rig.SC_FS)
    pv = k.get("pv", wl.bound("rot")["spec"]["volumeName"])
    handle = pv["spec"]["csi"]["volumeHandle"]
    ref = pv["spec"]["csi"]["nodeStageSecretRef"]
    lvol = contract.parse_id(handle).lvol_uuid
    old = {key: base64.b64decode(v).decode() for key, v in
           k.get("secret", ref["name"], ref["namespace"])["data"].items()}
    wl.pod("rot-pod", "rot", node=NODE)
    wl.running("rot-pod")
    wl.sh("rot-pod", "echo before-rotation > /data/a && sync")
    device = wl.sh("rot-pod", "awk '$2 == \"/data\" {print $1}' /proc/mounts").strip()
    assert device.startswith("/dev/nvme"), device

    res = k.run("exec", "-n", k8s.NAMESPACE, f"deploy/{k8s.RELEASE}-controller",
                "-c", "csi-spdk", "--", "csi-spdk", "rotate-keys",
                "--config", "/etc/csi-spdk/config.yaml", "--volume", handle,
                "--node-timeout", "900", check=False, timeout=2100)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{handle}: keys rotated" in res.stdout, res.stdout
    for material in (old[contract.SECRET_DHCHAP_KEY], old[contract.SECRET_DHCHAP_CTRL_KEY]):
        assert material not in res.stdout + res.stderr

    new = {key: base64.b64decode(v).decode() for key, v in
           k.get("secret", ref["name"], ref["namespace"])["data"].items()}
    for key in (contract.SECRET_DHCHAP_KEY, contract.SECRET_DHCHAP_CTRL_KEY):
        assert new[key].startswith("DHHC-1:") and new[key] != old[key], key
    assert not [key for key in new if key.startswith(contract.SECRET_NEXT_PREFIX)
                or key == contract.SECRET_ROTATION_STEP], sorted(new)
    acks = k.get("configmap", contract.ack_configmap_name(NODE), k8s.NAMESPACE)
    assert (acks or {}).get("data", {}).get(lvol) == contract.pair_fingerprint(
        new[contract.SECRET_DHCHAP_KEY], new[contract.SECRET_DHCHAP_CTRL_KEY]), acks

    # the same mount, on the same device, kept working
    assert wl.sh("rot-pod", "cat /data/a") == "before-rotation\n"
    wl.sh("rot-pod", "echo after-rotation > /data/b && sync")
    assert wl.sh("rot-pod", "awk '$2 == \"/data\" {print $1}' /proc/mounts").strip() == device
    wl.delete_pod("rot-pod")
    wl.wait_detached(pv["metadata"]["name"])
    # a new connection: nvme connect with the Secret's (new) keys
    wl.pod("rot-pod-2", "rot", node=NODE)
    wl.running("rot-pod-2")
    assert wl.sh("rot-pod-2", "cat /data/a /data/b") == "before-rotation\nafter-rotation\n"
    wl.delete_pod("rot-pod-2")
    wl.wait_detached(pv["metadata"]["name"])
    wl.delete_pvc("rot")
