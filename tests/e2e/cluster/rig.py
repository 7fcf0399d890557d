"""A small real cluster: the control plane on the host (tests/e2e/k8s/cluster.py
in kubelet mode: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, snapshot-controller), QEMU node guests with kubelet +
containerd + runc (nodes.py), and the chart installed with `helm install`,
unchanged but for values.

Where things run:
* the storage side -- ``csi-spdk sim --nvmet`` (the simulator with the kernel
  nvmet data plane: the host kernel has no nvmet) and ``csi-spdk agent`` with
  mutual TLS -- is a static Pod of the first node (``STORAGE_NODE``), from
  the driver's image, on the host network: a hyperconverged storage node.
  Its NVMe/TCP port and the agent's port are forwarded from the host, so every
  node dials 10.0.2.2:<port> (the first node's own connections loop through
  the host too);
* the controller Deployment (driver + provisioner, attacher, resizer,
  snapshotter) runs on the storage node as well (nodeSelector): it reaches
  the agent over mutual TLS like any remote controller, the apiserver
  through the ``kubernetes`` Service (one DNAT in node-init.sh instead of
  kube-proxy), and it is never on a node a scenario kills or reboots;
* the node DaemonSet (driver, node-driver-registrar, livenessprobe) on every
  node.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from . import images as images_mod
from . import nodes
from .nodes import NodeGuest, NodeSpec

try:
    from k8s import cluster as k8s
except ImportError:   # imported as tests.e2e.cluster
    from ..k8s import cluster as k8s

STORAGE_NODE = "node-a"
# the segment key the node plugin reports (csi_spdk/contract.py TOPOLOGY_NODE_KEY)
TOPOLOGY_KEY = "topology.csi-spdk.io/node"
TARGET = "storage-a"
POOL = "pool0"
POOL_SIZE = 3 << 30
SC_FS, SC_BLOCK, SC_WFFC = "csi-spdk", "csi-spdk-block", "csi-spdk-wffc"
SNAPSHOT_CLASS = "csi-spdk"
AGENT_PORT_IN_NODE = 5261
# put on the storage node once the node plugin is registered (Cluster._install_chart)
CONTROLLER_LABEL = "rig.csi-spdk.io/controller"


def storage_pod(image: str, nvme_port: int) -> dict:
    """The static Pod of the storage node: simulator (kernel nvmet) + agent."""
    def hp(name: str, path: str, kind: str = "DirectoryOrCreate") -> dict:
        return {"name": name, "hostPath": {"path": path, "type": kind}}

    common = [{"name": "sim-run", "mountPath": "/run/csi-spdk-sim"},
              {"name": "agent-state", "mountPath": "/var/lib/csi-spdk-agent"},
              {"name": "sim-data", "mountPath": "/var/lib/csi-spdk-sim"}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "csi-spdk-storage", "namespace": "kube-system",
                     "labels": {"app": "csi-spdk-storage"}},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {"name": "sim", "image": image, "imagePullPolicy": "Never",
                 "command": ["sh", "-c",
                             f"[ -e /var/lib/csi-spdk-sim/{POOL}.img ] || truncate -s {POOL_SIZE}"
                             f" /var/lib/csi-spdk-sim/{POOL}.img; exec csi-spdk sim "
                             "--rpc-socket /run/csi-spdk-sim/spdk.sock "
                             "--data-dir /var/lib/csi-spdk-sim/lvols --nvmet"],
                 "env": [{"name": "CSI_SPDK_NVMET_TRADDR", "value": "0.0.0.0"}],
                 "securityContext": {"privileged": True},
                 "volumeMounts": [*common, {"name": "configfs", "mountPath": "/sys/kernel/config"},
                                  {"name": "dev", "mountPath": "/dev"}]},
                {"name": "agent", "image": image, "imagePullPolicy": "Never",
                 "args": ["agent", "--listen", f"0.0.0.0:{AGENT_PORT_IN_NODE}",
                          "--spdk-rpc", "unix:///run/csi-spdk-sim/spdk.sock",
                          "--state-dir", "/var/lib/csi-spdk-agent",
                          "--tls-cert", "/etc/node/agent/tls.crt",
                          "--tls-key", "/etc/node/agent/tls.key",
                          "--tls-client-ca", "/etc/node/agent/ca.crt",
                          "--pools", "/etc/node/agent/pools.yaml",
                          # 0.5 s by default: each poll costs both Python
                          # processes CPU, which a TCG node cannot spare (the
                          # agent was the busiest container); no scenario
                          # kills the simulator
                          "--spdk-poll-interval", "5"],
                 "volumeMounts": [*common, {"name": "agent-conf", "mountPath": "/etc/node/agent",
                                            "readOnly": True}]},
            ],
            "volumes": [hp("sim-run", "/run/csi-spdk-sim"),
                        hp("agent-state", "/var/lib/csi-spdk-agent"),
                        hp("sim-data", "/var/lib/csi-spdk-sim"),
                        hp("configfs", "/sys/kernel/config", "Directory"),
                        hp("dev", "/dev", "Directory"),
                        hp("agent-conf", "/etc/node/agent", "Directory")],
        },
    }


# A TCG node is 20-50x slower than the host and the probes are answered by
# Python processes starting next to each other: a first start may take
# minutes (startup: up to 30 min), and a probe answer many seconds.
RIG_PROBES = {"startup": {"periodSeconds": 10, "timeoutSeconds": 30, "failureThreshold": 180},
              "liveness": {"periodSeconds": 30, "timeoutSeconds": 30, "failureThreshold": 10}}
# The livenessprobe sidecar answers kubelet's liveness probe with a CSI Probe
# of its own, 1 s by default: in a TCG node one Probe can take longer, and a
# 500 then restarts a healthy driver (seen: the node driver restarted once
# mid start-up). Inside kubelet's 30 s probe timeout.
LIVENESS_ARGS = ["--probe-timeout=25s"]


def chart_values(imgs: images_mod.Images, agent_port: int, nvme_port: int) -> dict:
    base = {"reclaimPolicy": "Delete", "allowVolumeExpansion": True}
    return {
        "images": imgs.values,
        "controller": {"replicas": 1, "probes": RIG_PROBES,
                       # with two TCG nodes on two cores an apiserver round
                       # trip from the node took over 10 s: every sidecar
                       # lost its lease ("Failed to renew lease: context
                       # deadline exceeded"), exited and crash-looped
                       "leaderElection": {"leaseDuration": "120s", "renewDeadline": "90s",
                                          "retryPeriod": "20s"},
                       "extraArgs": {"livenessProbe": LIVENESS_ARGS},
                       "nodeSelector": {"kubernetes.io/hostname": STORAGE_NODE,
                                        CONTROLLER_LABEL: "true"}},
        "node": {"probes": RIG_PROBES, "extraArgs": {"livenessProbe": LIVENESS_ARGS}},
        "capacityTracking": {"enabled": True, "pollInterval": "1m"},
        "config": {"targets": [{
            "name": TARGET,
            "agent": {"address": f"10.0.2.2:{agent_port}", "serverName": "csi-spdk-agent"},
            "nvmf": {"listenAddress": "10.0.2.15", "port": nvme_port, "dialAddress": "10.0.2.2"},
            # no topology labels: every node reaches the target over NVMe/TCP
            "lvstores": [POOL], "node": STORAGE_NODE}]},
        "storageClasses": [
            # the default class: DH-HMAC-CHAP (auth unset = dhchap), thick, ext4
            {**base, "name": SC_FS, "default": True, "volumeBindingMode": "Immediate",
             "parameters": {"fsType": "ext4"}},
            {**base, "name": SC_BLOCK, "volumeBindingMode": "Immediate",
             "parameters": {"thinProvision": "true"}},
            # only the storage node may use it, by the topology key the node
            # plugin reports (kubelet labels the Node with it): the scheduler
            # must pick that node
            {**base, "name": SC_WFFC, "volumeBindingMode": "WaitForFirstConsumer",
             "allowedTopologies": [{"matchLabelExpressions": [
                 {"key": TOPOLOGY_KEY, "values": [STORAGE_NODE]}]}],
             "parameters": {"fsType": "ext4", "thinProvision": "true"}},
        ],
        "volumeSnapshotClasses": [{"name": SNAPSHOT_CLASS, "deletionPolicy": "Delete"}],
    }


class Cluster:
    """Control plane + node guests + the chart."""

    def __init__(self, workdir: Path, node_names: tuple[str, ...] = (STORAGE_NODE,)) -> None:
        self.dir = workdir
        self.node_names = node_names
        self.cp = k8s.ControlPlane(workdir, kubelets=True)
        self.nodes: dict[str, NodeGuest] = {}
        self.timings: dict[str, float] = {}
        self.agent_port = k8s.free_port()
        self.nvme_port = k8s.free_port()

    @property
    def kubectl(self) -> k8s.Kubectl:
        return self.cp.kubectl

    def _mark(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.monotonic() - t0, 1)

    def logs(self, lines: int = 25) -> str:
        out = [self.cp.logs(lines)]
        out += [n.describe() for n in self.nodes.values()]
        return "\n".join(out)

    def start(self) -> None:
        t0 = self._t0 = time.monotonic()
        media = nodes.media()
        self._mark("node-media", t0)
        imgs = images_mod.build()
        self.images = imgs
        self._mark("images", t0)
        disk = nodes.image_disk(media, imgs.archive, imgs.digest, imgs.refs.values())
        self._mark("image-disk", t0)
        self.cp.start()
        self._mark("control-plane", t0)
        pki = self.cp.pki
        srv_crt, srv_key = k8s.client_cert(pki, "agent-server", "csi-spdk-agent",
                                           server_names=("csi-spdk-agent", "10.0.2.2"))
        cli_crt, cli_key = k8s.client_cert(pki, "agent-client", "csi-spdk-controller")
        pools = {"pools": [{"name": POOL, "devices": [
            {"path": f"/var/lib/csi-spdk-sim/{POOL}.img", "io": "aio"}]}]}
        for i, name in enumerate(self.node_names):
            spec = NodeSpec(name, i + 1, memory_mib=2048 if name == STORAGE_NODE else 1280)
            if name == STORAGE_NODE:
                spec.manifests["storage"] = storage_pod(imgs.refs["driver"], self.nvme_port)
                spec.files.update({"agent/tls.crt": srv_crt.read_bytes(),
                                   "agent/tls.key": srv_key.read_bytes(),
                                   "agent/ca.crt": self.cp.ca.read_bytes(),
                                   "agent/pools.yaml": yaml.safe_dump(pools)})
                spec.forwards += [(self.agent_port, AGENT_PORT_IN_NODE),
                                  (self.nvme_port, self.nvme_port)]
            self.nodes[name] = NodeGuest(spec, media, disk, self.cp, self.dir)
        for n in self.nodes.values():
            n.boot()
        # 16-60 s on a quiet machine; over 5 min measured with the host's load
        # at 20-75 (other QEMU guests and benchmarks on 2 cores)
        for n in self.nodes.values():
            n.wait_kubelet(900)
            n.adopt(900)
        self._mark("nodes-ready", t0)
        self._install_chart(cli_crt, cli_key)
        self._mark("chart-ready", t0)

    def _install_chart(self, cli_crt: Path, cli_key: Path) -> None:
        k = self.kubectl
        ns = k8s.NAMESPACE
        k.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        k.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": {"name": f"{k8s.RELEASE}-agent-client", "namespace": ns},
                 "data": {"tls.crt": k8s.b64(cli_crt.read_text()),
                          "tls.key": k8s.b64(cli_key.read_text()),
                          "ca.crt": k8s.b64(self.cp.ca.read_text())}})
        # Started one after the other, not all at once: a TCG node starting
        # every Python process of the storage Pod, the node plugin and the
        # controller together needed minutes for each, the chart's liveness
        # probes killed them before they served, and the restarts starved
        # the node further (load 22 in a 2-vCPU guest, CSINode never filled).
        # So: the storage Pod, then the node plugin until kubelet registered
        # it (CSINode), then the controller (its nodeSelector also names a
        # label the rig puts on the storage node only then).
        self.wait_pods("kube-system", "app=csi-spdk-storage", 1, 1500)
        self._mark("storage-ready", self._t0)
        values = chart_values(self.images, self.agent_port, self.nvme_port)
        vfile = self.dir / "values.yaml"
        vfile.write_text(yaml.safe_dump(values))
        helm = k8s.helm_binary()
        res = subprocess.run([helm, "install", k8s.RELEASE, str(k8s.CHART), "-n", ns,
                              "-f", str(vfile), "--kubeconfig", str(self.cp.admin_kubeconfig)],
                             capture_output=True, text=True, timeout=180)
        if res.returncode != 0:
            raise k8s.RigError(f"helm install failed: {res.stderr}")
        self.wait_pods(ns, "app.kubernetes.io/component=node", len(self.nodes), 1200)
        self._mark("node-plugin-ready", self._t0)
        # kubelet registered the node plugin (node-driver-registrar -> CSINode)
        for name in self.nodes:
            self.wait_csinode(name, 1200)
        self._mark("csinode-registered", self._t0)
        k.run("label", "node", STORAGE_NODE, f"{CONTROLLER_LABEL}=true", "--overwrite")
        self.wait_pods(ns, "app.kubernetes.io/component=controller",
                       values["controller"]["replicas"], 1800)

    def wait_pods(self, ns: str, selector: str, count: int, timeout: float) -> None:
        k = self.kubectl
        k8s.wait_until(f"{count} Pod(s) {selector} in {ns}", lambda: len(
            k.json("get", "pods", "-n", ns, "-l", selector)["items"]) >= count,
            timeout, 3, lambda: self.pod_report(ns))
        res = k.run("wait", "--for=condition=Ready", "pods", "-n", ns, "-l", selector,
                    f"--timeout={int(timeout)}s", check=False, timeout=timeout + 30)
        if res.returncode != 0:
            raise k8s.RigError(f"Pods {selector} in {ns} not Ready: {res.stderr}\n"
                               + self.pod_report(ns))

    def wait_csinode(self, node: str, timeout: float) -> None:
        k = self.kubectl

        def registered():
            obj = k.get("csinode", node)
            return obj and any(d["name"] == k8s.DRIVER for d in obj["spec"].get("drivers") or [])
        k8s.wait_until(f"CSINode {node} lists {k8s.DRIVER}", registered, timeout, 3,
                       lambda: self.pod_report(k8s.NAMESPACE))

    def pod_report(self, ns: str) -> str:
        """Pods, their container states and recent events, for a failure message."""
        k = self.kubectl
        out = [k.run("get", "pods", "-A", "-o", "wide", check=False).stdout]
        pods = k.json("get", "pods", "-n", ns, check=False) or {"items": []}
        for p in pods["items"]:
            for cs in p.get("status", {}).get("containerStatuses", []) or []:
                if not cs.get("ready"):
                    out.append(f"{p['metadata']['name']}/{cs['name']}: "
                               f"{json.dumps(cs.get('state'))[:400]} "
                               f"last {json.dumps(cs.get('lastState'))[:600]}")
                    res = k.run("logs", "-n", ns, p["metadata"]["name"], "-c", cs["name"],
                                "--tail=30", check=False, timeout=20)
                    out.append(res.stdout[-3000:] or res.stderr[-500:])
        out.append(k.run("get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False)
                   .stdout[-4000:])
        return "\n".join(out)

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()
        self.cp.stop()
