"""Scenarios with two nodes: node-a (the storage node, also the
controller's) and node-b, which the scenarios move volumes to,
kill and restart. Run with CSI_SPDK_CLUSTER_NODES=2 (skipped otherwise).

One DH-HMAC-CHAP volume per node at a time (the simulator's nvmet keeps one
key pair per host NQN): each scenario detaches what it attached."""

from __future__ import annotations

import json

import pytest

from . import rig
from .conftest import node_count

pytestmark = [pytest.mark.guest, pytest.mark.timeout(4800),
              pytest.mark.skipif(node_count() < 2,
                                 reason="two-node scenarios: CSI_SPDK_CLUSTER_NODES=2")]
A, B = rig.STORAGE_NODE, "node-b"


def _hosts_of(cluster, nqn: str) -> list[str]:
    """The host NQNs subsystem ``nqn`` allows, from the storage node's
    simulator (its JSON-RPC socket, inside the storage static Pod)."""
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
    subs = json.loads(out)
    return [h["nqn"] for s in subs if s["nqn"] == nqn for h in s.get("hosts", [])]


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


def _kill_kubelet(cluster, wl, node: str) -> None:
    """SIGKILL kubelet on ``node`` from a privileged host-PID Pod (node-init
    starts it again, as systemd would)."""
    name = f"kill-kubelet-{node}"
    cluster.kubectl.create({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "pods"},
        "spec": {"nodeName": node, "hostPID": True, "restartPolicy": "Never",
                 "automountServiceAccountToken": False,
                 "containers": [{"name": "app", "image": wl.image, "imagePullPolicy": "Never",
                                 "securityContext": {"privileged": True},
                                 "command": ["sh", "-c",
                                             "for p in /proc/[0-9]*; do "
                                             "[ \"$(cat $p/comm 2>/dev/null)\" = kubelet ] && "
                                             "kill -9 ${p#/proc/} && echo killed ${p#/proc/}; "
                                             "done; sleep 3600"]}]}})
    wl.until("kubelet killed", lambda: "NODE-KUBELET-RESTARTED" in
             cluster.nodes[node].guest.status(), 240, 3)


def test_kubelet_restart_keeps_the_volume(cluster, wl):
    """kubelet is killed and comes back: the Pod keeps running with its
    volume mounted (the node plugin's staging survives), the node is Ready
    again and the Pod still reads and writes its data."""
    wl.pvc("kr", "32Mi", rig.SC_FS)
    pv = wl.bound("kr")["spec"]["volumeName"]
    wl.pod("kr-pod", "kr", node=B)
    pod = wl.running("kr-pod")
    wl.sh("kr-pod", "echo before-restart > /data/f && sync")
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    _kill_kubelet(cluster, wl, B)
    cluster.kubectl.run("wait", "--for=condition=Ready", f"node/{B}", "--timeout=300s",
                        timeout=330)
    wl.running("kr-pod")
    assert wl.sh("kr-pod", "cat /data/f && echo after-restart >> /data/f && sync && cat /data/f") \
        == "before-restart\nbefore-restart\nafter-restart\n"
    pod = cluster.kubectl.get("pod", "kr-pod", "pods")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == restarts
    cluster.kubectl.run("delete", "pod", f"kill-kubelet-{B}", "-n", "pods", "--wait=false")
    wl.delete_pod("kr-pod")
    wl.wait_detached(pv)
    wl.delete_pvc("kr")


def test_node_reboot_restages_the_volume(cluster, wl):
    """node-b is reset (QEMU killed and booted again from the same disks): the
    Pod stays bound to it, and when kubelet is back it mounts the volume
    again (NodeStage + NodePublish after the reboot lost the NVMe/TCP
    connection and the mounts); the Pod reads what was written before."""
    wl.pvc("rb", "32Mi", rig.SC_FS)
    pv = wl.bound("rb")["spec"]["volumeName"]
    wl.pod("rb-pod", "rb", node=B)
    before = wl.running("rb-pod")
    wl.sh("rb-pod", "echo before-reboot > /data/f && sync")
    node = cluster.nodes[B]
    node.kill()
    node.start(400)     # boot, kubelet, address, NodeReady
    wl.until("the Pod's container started again after the reboot", lambda: (
        lambda p: p["status"].get("containerStatuses")
        and p["status"]["containerStatuses"][0]["restartCount"]
        > before["status"]["containerStatuses"][0]["restartCount"]
        and p["status"]["containerStatuses"][0].get("ready"))(
            cluster.kubectl.get("pod", "rb-pod", "pods")), 600, 5)
    cluster.wait_csinode(B, 300)
    assert wl.sh("rb-pod", "cat /data/f") == "before-reboot\n"
    assert "/dev/nvme" in wl.sh("rb-pod", "grep ' /data ' /proc/mounts")
    wl.delete_pod("rb-pod")
    wl.wait_detached(pv)
    wl.delete_pvc("rb")


def test_node_loss_force_detach(cluster, wl):
    """node-b is lost (QEMU SIGKILLed) with a Pod using the volume; marked
    out-of-service, its Pods are deleted and the volume force-detached; a
    Pod on node-a gets the data and the subsystem no longer lets node-b in."""
    k = cluster.kubectl
    wl.pvc("lost", "32Mi", rig.SC_FS)
    pv = wl.bound("lost")["spec"]["volumeName"]
    wl.pod("on-b", "lost", node=B)
    wl.running("on-b")
    wl.sh("on-b", "echo from-the-lost-node > /data/f && sync")
    nqn = wl.attachments(pv)[0]["status"]["attachmentMetadata"]["nqn"]
    b_host = _hosts_of(cluster, nqn)
    assert len(b_host) == 1 and b_host[0].endswith(B), b_host
    cluster.nodes[B].kill()
    k.run("wait", "--for=condition=Ready=Unknown", f"node/{B}", "--timeout=180s", timeout=210)
    k.run("taint", "node", B, "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute")
    try:
        wl.until("the lost node's Pod is gone", lambda: k.get("pod", "on-b", "pods") is None,
                 300, 5)
        wl.wait_detached(pv, 420)
        assert _hosts_of(cluster, nqn) == []
        wl.pod("on-a", "lost", node=A)
        wl.running("on-a")
        assert wl.sh("on-a", "cat /data/f") == "from-the-lost-node\n"
        wl.delete_pod("on-a")
        wl.wait_detached(pv)
        wl.delete_pvc("lost")
    finally:
        cluster.nodes[B].start(400)
        k.run("taint", "node", B, "node.kubernetes.io/out-of-service-", check=False)
