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

import pytest

from . import rig

pytestmark = [pytest.mark.guest, pytest.mark.timeout(2400)]
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
