"""The driver side of the rig on top of ``cluster.ControlPlane``: SPDK
simulators, the chart's objects applied to the API server, the driver's
controller and the chart's sidecars run as processes with the chart's
arguments and the chart's ServiceAccount token, and fake nodes (Node +
CSINode objects, as kubelet and node-driver-registrar would write them).

Targets (the chart's config.targets, rendered into its ConfigMap, which is
what the controller reads), each reached through its own storage agent
(``csi-spdk agent`` on a Unix socket, in front of the simulator's socket or
the guest's forwarded RPC port), as the chart's spdkTgt DaemonSet does:
  target-a  host simulator, lvstore lvs-a (8 GiB), zone a, hosted by node k8s-node-a
  target-b  host simulator, lvstore lvs-b (6 GiB), zone b, hosted by node k8s-node-b
  guest     the guest's simulator with kernel nvmet (2 GiB), zone guest, node
            k8s-guest-node -- only when the QEMU guest is available; its
            topology also carries the SSD class labels the guest's node plugin
            reports (its data lives on that node's SSDs), so a StorageClass
            restricted to such a class prefers it
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import grpc

from csi_spdk import contract
from csi_spdk.proto import csi_pb2, csi_pb2_grpc
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

from .cluster import (
    BIN,
    DRIVER,
    NAMESPACE,
    SIDECARS,
    ControlPlane,
    Kubectl,
    Proc,
    RigError,
    container_args,
    free_port,
    kubeconfig,
    python_csi_spdk,
    python_env,
    render_chart,
    sidecar_specs,
    wait_until,
)

GiB = 1 << 30
ZONE_KEY = "topology.kubernetes.io/zone"
TOPOLOGY_KEYS = [contract.TOPOLOGY_NODE_KEY, ZONE_KEY]
HOST_TARGETS = {   # name -> (lvstore, size, zone, node)
    "target-a": ("lvs-a", 8 * GiB, "a", "k8s-node-a"),
    "target-b": ("lvs-b", 6 * GiB, "b", "k8s-node-b"),
}
GUEST_TARGET = ("guest", "lvs-g", 2 * GiB, "guest", "k8s-guest-node")
SC_IMMEDIATE, SC_WFFC, SC_GUEST, SC_BLOCK = ("csi-spdk-immediate", "csi-spdk-wffc",
                                             "csi-spdk-guest", "csi-spdk-thin")
SC_RETAIN = "csi-spdk-retain"
SNAPSHOT_CLASS = "csi-spdk"
RIG_POD = "csi-spdk-controller-rig-0"
# The chart objects the rig applies (not the workloads: no kubelet runs them).
APPLY_KINDS = ("CSIDriver", "StorageClass", "VolumeSnapshotClass", "ServiceAccount",
               "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap",
               "Deployment", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


class Spdk:
    """Read-only view of every target's SPDK for assertions."""

    def __init__(self, rpcs: dict[str, str]) -> None:
        self.apis = {name: SpdkApi(SpdkClient(rpc, timeout=30)) for name, rpc in rpcs.items()}

    def lvols(self) -> list[dict]:
        """Every lvol of every target: target, name, uuid, size, snapshot/clone flags."""
        out = []
        for target, api in self.apis.items():
            sizes = {b["uuid"]: b["num_blocks"] * b["block_size"] for b in api.bdevs()
                     if "uuid" in b}
            for lv in api.lvols():
                out.append({"target": target, "name": lv["name"], "uuid": lv["uuid"],
                            "lvstore": lv["lvs"]["name"], "size": sizes.get(lv["uuid"]),
                            "snapshot": lv.get("is_snapshot", False),
                            "clone": lv.get("is_clone", False)})
        return out

    def lvol(self, lvol_uuid: str) -> dict | None:
        return next((lv for lv in self.lvols() if lv["uuid"] == lvol_uuid), None)

    def subsystems(self) -> list[dict]:
        return [dict(s, target=t) for t, api in self.apis.items() for s in api.subsystems()
                if s.get("subtype") != "Discovery"]

    def subsystem(self, nqn: str) -> dict | None:
        return next((s for s in self.subsystems() if s["nqn"] == nqn), None)

    def lvstore_free(self, target: str) -> int:
        return sum(lvs["free_clusters"] * lvs["cluster_size"]
                   for lvs in self.apis[target].lvstores())

    def close(self) -> None:
        for api in self.apis.values():
            api.client.close()


def chart_values(targets: list[dict], guest: bool) -> dict:
    """Values for `helm template`: our targets, StorageClasses for each test
    path, capacity polling fast enough for a test, one controller replica."""
    base = {"reclaimPolicy": "Delete", "allowVolumeExpansion": True}
    # Immediate classes stay on the host targets (the guest's is slow): with
    # Immediate binding external-provisioner prefers a node picked from the
    # PVC name, so without this the guest target would be picked at random.
    host_zones = [{"matchLabelExpressions": [
        {"key": ZONE_KEY, "values": sorted(z for _l, _s, z, _n in HOST_TARGETS.values())}]}]
    scs = [
        {**base, "name": SC_IMMEDIATE, "volumeBindingMode": "Immediate",
         "allowedTopologies": host_zones,
         # thick by default; no explicit thinProvision, so restores and clones
         # from this class are thin (README "Capacity")
         "parameters": {"fsType": "ext4"}},
        {**base, "name": SC_WFFC, "volumeBindingMode": "WaitForFirstConsumer",
         "parameters": {}},
        {**base, "name": SC_BLOCK, "volumeBindingMode": "Immediate",
         "allowedTopologies": host_zones,
         "parameters": {"thinProvision": "true", "clearMethod": "unmap"}},
        # reclaimPolicy Retain: the volume (and its key Secret) outlive the PV
        {**base, "name": SC_RETAIN, "reclaimPolicy": "Retain",
         "volumeBindingMode": "Immediate", "allowedTopologies": host_zones,
         "parameters": {"thinProvision": "true"}},
    ]
    if guest:
        scs.append({**base, "name": SC_GUEST, "volumeBindingMode": "Immediate",
                    # auth: dhchap, the default: the chart adds the templated
                    # node-stage/controller-publish secret references
                    "parameters": {"target": GUEST_TARGET[0], "fsType": "ext4",
                                   "thinProvision": "true"}})
    return {
        "controller": {"replicas": 1},
        "capacityTracking": {"enabled": True, "pollInterval": "5s"},
        "config": {"targets": targets, "thinOvercommitRatio": 1.0},
        "storageClasses": scs,
        "volumeSnapshotClasses": [{"name": SNAPSHOT_CLASS, "deletionPolicy": "Delete"}],
    }


class Rig:
    """Control plane + driver + sidecars. ``guest``: a started guestnode.GuestNode or None."""

    def __init__(self, workdir: Path, guest=None) -> None:
        self.dir = workdir
        self.guest = guest
        self.cp = ControlPlane(workdir)
        self.procs: dict[str, Proc] = self.cp.procs
        self.timings = self.cp.timings
        self.nodes: dict[str, dict] = {}     # node name -> {"node_id", "segment"}
        self.guest_info = None               # the guest node plugin's NodeGetInfo

    # -- helpers --------------------------------------------------------------------------
    @property
    def kubectl(self) -> Kubectl:
        return self.cp.kubectl

    def logs(self, lines: int = 25) -> str:
        out = self.cp.logs(lines)
        if self.guest is not None:
            out += "\n--- guest ---\n" + self.guest.describe()[-6000:]
        return out

    def controller_stub(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix://{self.csi_socket}"))

    def node_stub(self) -> csi_pb2_grpc.NodeStub:
        assert self.guest is not None
        return csi_pb2_grpc.NodeStub(grpc.insecure_channel(self.guest.node_endpoint))

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        self.cp.start()
        rpcs = self._start_sims()
        agents = self._start_agents(rpcs)
        self.timings["sims"] = round(time.monotonic() - t0, 1)
        targets = []
        for name, (lvs, _size, zone, node) in HOST_TARGETS.items():
            targets.append({"name": name, "agent": {"address": agents[name]},
                            "nvmf": {"listenAddress": "127.0.0.1", "port": 4420},
                            "lvstores": [lvs], "node": node, "topology": {ZONE_KEY: zone}})
        if self.guest is not None:
            name, lvs, _size, zone, node = GUEST_TARGET
            self.guest_info = self.node_stub().NodeGetInfo(csi_pb2.NodeGetInfoRequest(),
                                                           timeout=60)
            ssd = {k: v for k, v in self.guest_info.accessible_topology.segments.items()
                   if k.startswith(contract.TOPOLOGY_SSD_PREFIX)}
            # the guest's kernel target listens and is dialled inside the guest;
            # its agent runs in the guest beside the simulator (guestnode.py),
            # reached over mutual TLS, so the volume keys land on its host
            targets.append({"name": name, "agent": {"address": self.guest.agent_address,
                                                    "tls": self.guest.pki.client_tls()},
                            "nvmf": {"listenAddress": "127.0.0.1", "port": 4420},
                            "lvstores": [lvs], "node": node,
                            "topology": {ZONE_KEY: zone, **ssd}})
        self.spdk = Spdk(rpcs)
        self.objects = render_chart(chart_values(targets, self.guest is not None), self.dir)
        self._apply_chart()
        self._register_nodes()
        self._make_sa_kubeconfig()
        self._start_driver()
        self._start_sidecars()
        self.timings["ready"] = round(time.monotonic() - t0, 1)

    def _start_sims(self) -> dict[str, str]:
        rpcs = {}
        for name, (lvs, size, _zone, _node) in HOST_TARGETS.items():
            sock = self.dir / f"sim-{name}.sock"
            data = self.dir / f"sim-{name}-data"
            self.cp.start_proc(f"sim-{name}", [*python_csi_spdk(), "sim", "--rpc-socket",
                                               str(sock), "--data-dir", str(data)],
                               env=python_env())
            wait_until(f"simulator {name}", lambda s=sock, n=name: (
                self.cp._check_alive(f"sim-{n}"), s.exists())[-1], 60, 0.2, self.logs)
            rpcs[name] = f"unix://{sock}"
            self._make_lvstore(str(sock), lvs, size)
        if self.guest is not None:
            self.guest.wait_ready()
            name, lvs, size, _zone, _node = GUEST_TARGET
            rpcs[name] = self.guest.rpc_address
            self._make_lvstore(self.guest.rpc_address, lvs, size)
        return rpcs

    def _start_agents(self, rpcs: dict[str, str]) -> dict[str, str]:
        """One agent per target on a Unix socket; returns target -> agent address."""
        agents = {}
        for name, rpc in rpcs.items():
            if name == GUEST_TARGET[0]:
                continue   # the guest's agent runs in the guest (guestnode.py)
            sock = self.dir / f"agent-{name}.sock"
            self.cp.start_proc(f"agent-{name}", [
                *python_csi_spdk(), "agent", "--listen", f"unix://{sock}", "--spdk-rpc", rpc,
                "--state-dir", str(self.dir / f"agent-{name}-state")], env=python_env())
            wait_until(f"agent {name}", lambda s=sock, n=name: (
                self.cp._check_alive(f"agent-{n}"), s.exists())[-1], 60, 0.2, self.logs)
            agents[name] = f"unix://{sock}"
        return agents

    @staticmethod
    def _make_lvstore(rpc: str, lvs: str, size: int) -> None:
        api = SpdkApi(SpdkClient(rpc, timeout=60))
        try:
            if not api.lvstores():
                api.malloc_create(f"Malloc-{lvs}", size)
                api.lvstore_create(f"Malloc-{lvs}", lvs)
        finally:
            api.client.close()

    def _apply_chart(self) -> None:
        k = self.kubectl
        k.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        wanted = [o for o in self.objects if o["kind"] in APPLY_KINDS]
        kinds = sorted({o["kind"] for o in wanted})
        for must in ("CSIDriver", "StorageClass", "VolumeSnapshotClass", "ClusterRole",
                     "ServiceAccount", "ConfigMap"):
            if must not in kinds:
                raise RigError(f"the chart rendered no {must}")
        k.apply(wanted)
        # No Deployment/ReplicaSet controller and no scheduler run here, so the
        # controller Pod is made by hand, owned as the Deployment would own it:
        # external-provisioner --capacity-ownerref-level=2 walks Pod -> ReplicaSet
        # -> Deployment (with the chart's pods/replicasets RBAC).
        dep = next(o for o in wanted if o["kind"] == "Deployment"
                   and o["metadata"]["name"].endswith("-controller"))
        dname = dep["metadata"]["name"]
        live = k.get("deployment", dname, NAMESPACE)
        labels = dep["spec"]["selector"]["matchLabels"]
        rs_name = f"{dname}-rig"
        rs = k.create({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": rs_name, "namespace": NAMESPACE, "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": dname, "uid": live["metadata"]["uid"],
                                              "controller": True}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "csi-spdk",
                                                           "image": "csi-spdk:rig"}]}}},
        })
        k.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": RIG_POD, "namespace": NAMESPACE, "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": rs_name, "uid": rs["metadata"]["uid"],
                                              "controller": True}]},
            "spec": {"serviceAccountName": dep["spec"]["template"]["spec"]["serviceAccountName"],
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "csi-spdk", "image": "csi-spdk:rig"}]},
        })

    def register_node(self, name: str, node_id: str, segments: dict[str, str],
                      max_volumes: int = 0) -> None:
        """Write the Node and CSINode objects kubelet and node-driver-registrar
        would write for a node running the node plugin."""
        k = self.kubectl
        k.apply({"apiVersion": "v1", "kind": "Node",
                 "metadata": {"name": name, "labels": {
                     "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **segments},
                     "annotations": {
                         "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                         "csi.volume.kubernetes.io/nodeid": json.dumps({DRIVER: node_id})}}})
        driver = {"name": DRIVER, "nodeID": node_id, "topologyKeys": sorted(segments)}
        if max_volumes:
            driver["allocatable"] = {"count": max_volumes}
        k.apply({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                 "metadata": {"name": name},
                 "spec": {"drivers": [driver]}})
        self.nodes[name] = {"node_id": node_id, "segment": dict(segments)}

    def _register_nodes(self) -> None:
        for _name, (_lvs, _size, zone, node) in HOST_TARGETS.items():
            # what `csi-spdk node --node-id <node> --topology zone=<zone>` reports
            self.register_node(node, node, {contract.TOPOLOGY_NODE_KEY: node, ZONE_KEY: zone})
        if self.guest is not None:
            # the real node plugin's NodeGetInfo, as the registrar would read it
            info = self.guest_info
            self.register_node(GUEST_TARGET[4], info.node_id,
                               dict(info.accessible_topology.segments), info.max_volumes_per_node)

    @staticmethod
    def pod_name(pod: str = "") -> str:
        """That replica's identity in the driver's Lease (its POD_NAME)."""
        return f"{RIG_POD}{pod}"

    def socket_of(self, pod: str = "") -> Path:
        """The CSI socket of controller "Pod" ``pod`` ("" = the first one)."""
        return self.dir / f"csi{pod}.sock"

    def pod_procs(self, pod: str = "") -> list[str]:
        return [f"csi-spdk-controller{pod}", *(f"{n}{pod}" for n in SIDECARS)]

    def start_controller_pod(self, pod: str, wait_leases: bool = True) -> None:
        """Another replica of the controller Pod: driver (its own identity in
        the driver's Lease) and sidecars on their own socket (a Pod's)."""
        self._start_driver(pod)
        self._start_sidecars(pod, wait_leases)

    def kill_controller_pod(self, pod: str = "") -> None:
        """The Pod dies: SIGKILL its driver and sidecars at once."""
        for name in self.pod_procs(pod):
            proc = self.procs[name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)

    def _start_driver(self, pod: str = "") -> None:
        cm = next(o for o in self.objects if o["kind"] == "ConfigMap"
                  and "config.yaml" in o.get("data", {}))
        config = self.dir / "config.yaml"
        config.write_text(cm["data"]["config.yaml"])
        sock = self.socket_of(pod)
        if not pod:
            self.csi_socket = sock
        c = sidecar_specs(self.objects)["csi-spdk"]
        args = []
        for a in container_args(c, {}):
            if a.startswith("--endpoint="):
                a = f"--endpoint=unix://{sock}"
            elif a.startswith("--config="):
                a = f"--config={config}"
            elif a.startswith("--metrics-address="):
                a = f"--metrics-address=127.0.0.1:{free_port()}"
            args.append(a)
        if not args or args[0] != "controller":
            raise RigError(f"unexpected driver args in the chart: {args}")
        # the driver keeps each volume's keys in a Secret (auth: dhchap, the
        # default), with the chart's ServiceAccount and RBAC, like in a Pod
        env = {**python_env(), "KUBECONFIG": str(self.sa_kubeconfig), "POD_NAMESPACE": NAMESPACE,
               "POD_NAME": self.pod_name(pod)}     # its identity in the driver's Lease
        name = f"csi-spdk-controller{pod}"
        self.cp.start_proc(name, [*python_csi_spdk(), *args], env=env)
        wait_until("the driver's controller socket", lambda: (
            self.cp._check_alive(name), self.probe(pod) is not None)[-1], 60, 0.3, self.logs)

    def probe(self, pod: str = "") -> bool | None:
        """Probe's ready of that replica's driver (None: not serving yet)."""
        sock = self.socket_of(pod)
        if not sock.exists():
            return None
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            try:
                resp = csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=5)
            except grpc.RpcError:
                return None
        return resp.ready.value

    def _make_sa_kubeconfig(self) -> None:
        sa = next(o for o in self.objects if o["kind"] == "Deployment"
                  and o["metadata"]["name"].endswith("-controller")
                  )["spec"]["template"]["spec"]["serviceAccountName"]
        token = self.kubectl.run("create", "token", sa, "-n", NAMESPACE,
                                 "--duration=6h").stdout.strip()
        self.sa_kubeconfig = kubeconfig(self.dir / "controller-sa.kubeconfig", self.cp.server,
                                        self.cp.ca, token=token, user=sa)

    def _start_sidecars(self, pod: str = "", wait_leases: bool = True) -> None:
        k = self.kubectl
        specs = sidecar_specs(self.objects)
        # POD_NAME: the provisioner's capacity owner reference needs a Pod the
        # API knows; each replica's sidecars share the rig's one Pod object
        env = {"NAMESPACE": NAMESPACE, "POD_NAME": RIG_POD}
        sock = self.socket_of(pod)
        for name in SIDECARS:
            if name not in specs:
                raise RigError(f"the chart's controller has no {name} container")
            c = specs[name]
            cenv = {e["name"]: env.get(e["name"], "") for e in c.get("env", [])}
            args = [f"--csi-address={sock}" if a.startswith("--csi-address=") else a
                    for a in container_args(c, cenv)]
            self.cp.start_proc(f"{name}{pod}", [str(BIN / name), *args,
                                                f"--kubeconfig={self.sa_kubeconfig}"], env=cenv)
        if not wait_leases:
            return
        # Every sidecar takes its leader-election lease (the chart's Role).
        wait_until("the sidecars' leader-election leases", lambda: (
            self.cp._check_alive(*(f"{n}{pod}" for n in SIDECARS)),
            len([lease for lease in k.get("leases", namespace=NAMESPACE)
                 if lease["spec"].get("holderIdentity")]) >= len(SIDECARS))[-1],
            90, 1, self.logs)

    # -- stop -----------------------------------------------------------------------------
    def stop(self) -> None:
        spdk = getattr(self, "spdk", None)
        if spdk is not None:
            spdk.close()
        self.cp.stop()


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


