"""Scenarios with two nodes: node-a (the storage node, also the
controller's) and node-b (zone b), which the scenarios move volumes to,
kill and restart. Skipped when CSI_SPDK_CLUSTER_NODES=1.

One DH-HMAC-CHAP volume per node at a time (the simulator's nvmet keeps one
key pair per host NQN): each scenario detaches what it attached."""

from __future__ import annotations

import pytest

from . import rig
from .conftest import node_count

pytestmark = [pytest.mark.guest, pytest.mark.timeout(2400),
              pytest.mark.skipif(node_count() < 2, reason="CSI_SPDK_CLUSTER_NODES=1")]
A, B = rig.STORAGE_NODE, "node-b"


def _hosts_of(cluster, pv: str) -> list[str]:
    """The host NQNs the subsystem of ``pv`` allows (the storage node's
    simulator, through the agent's static Pod)."""
    out = cluster.kubectl.run(
        "exec", "-n", "kube-system", f"csi-spdk-storage-{A}", "-c", "sim", "--",
        "python3", "-c",
        "import json,socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.connect('/run/csi-spdk-sim/spdk.sock')\n"
        "s.sendall(json.dumps({'jsonrpc':'2.0','id':1,'method':'nvmf_get_subsystems'}).encode())\n"
        "b=b''\n"
        "while True:\n"
        "  b+=s.recv(65536)\n"
        "  try: r=json.loads(b); break\n"
        "  except ValueError: pass\n"
        "print(json.dumps(r['result']))", timeout=60).stdout
    import json
    subs = json.loads(out)
    handle = cluster.kubectl.get("pv", pv)["spec"]["csi"]["volumeHandle"]
    lvol = handle.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return [h["nqn"] for s in subs if lvol in s["nqn"] for h in s.get("hosts", [])]


def test_rwo_moves_between_nodes(cluster, wl):
    """ReadWriteOnce: a Pod on A writes; after it is deleted the volume is
    detached from A and attached to B, where a new Pod reads the data."""
    wl.pvc("move", "64Mi", rig.SC_FS)
    pv = wl.bound("move")["spec"]["volumeName"]
    wl.pod("on-a", "move", node=A)
    wl.running("on-a")
    wl.sh("on-a", "echo written-on-a > /data/f && sync")
    assert [va["spec"]["nodeName"] for va in wl.attachments(pv)] == [A]
    wl.delete_pod("on-a")
    wl.wait_detached(pv)
    wl.pod("on-b", "move", node=B)
    wl.running("on-b")
    assert [va["spec"]["nodeName"] for va in wl.attachments(pv)] == [B]
    assert wl.sh("on-b", "cat /data/f") == "written-on-a\n"
    wl.delete_pod("on-b")
    wl.wait_detached(pv)
    wl.delete_pvc("move")


def test_rwop_refuses_a_second_pod(cluster, wl):
    """ReadWriteOncePod: while one Pod uses the PVC a second one (on the
    other node) stays unschedulable; it runs once the first is gone."""
    wl.pvc("solo", "32Mi", rig.SC_FS, mode="ReadWriteOncePod")
    pv = wl.bound("solo")["spec"]["volumeName"]
    wl.pod("first", "solo", node=A)
    wl.running("first")
    wl.pod("second", "solo", node=B)
    wl.until("the second Pod is refused by the scheduler",
             lambda: any("ReadWriteOncePod" in e or "access mode" in e.lower()
                         for e in wl.events("Pod", "second")), 120, 5)
    assert cluster.kubectl.get("pod", "second", "pods")["status"]["phase"] == "Pending"
    assert not cluster.kubectl.get("pod", "second", "pods")["spec"].get("nodeName")
    wl.delete_pod("first")
    wl.running("second", 400)
    wl.delete_pod("second")
    wl.wait_detached(pv)
    wl.delete_pvc("solo")
