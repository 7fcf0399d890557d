"""The PVC scenarios, written once against an ``Env`` and run by the rig
(tests/e2e/k8s, real control plane as processes, no kubelet: the test plays
kubelet) and by the kind variant (tests/e2e/kind, a real cluster with the
chart installed, kubelet does the node part).

Every scenario checks the Kubernetes side (objects, conditions, events) and
the SPDK side (lvols, sizes, subsystems, host allow-lists) and cleans up what
it made; ``leftovers`` asserts nothing of the driver's is left in SPDK.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import time
import uuid
from collections.abc import Callable

from csi_spdk import contract

from .cluster import DRIVER, Kubectl, RigError

MiB, GiB = 1 << 20, 1 << 30
WAIT = 60          # seconds: bound of every single wait
_SUFFIX = {"Ki": 1 << 10, "Mi": MiB, "Gi": GiB, "Ti": 1 << 40, "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "": 1}


def qty(value: str | int) -> int:
    """A Kubernetes resource.Quantity (bytes) as an int."""
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMGT]|)", str(value))
    if not m:
        raise ValueError(f"unsupported quantity {value!r}")
    return int(m.group(1)) * _SUFFIX[m.group(2)]


@dataclasses.dataclass
class Env:
    """What a scenario needs from where it runs."""
    kubectl: Kubectl
    spdk: object                       # rig.Spdk (lvols(), lvol(), subsystem(), lvstore_free())
    namespace: str                     # where the test's PVCs live
    driver_namespace: str              # where the chart's CSIStorageCapacity objects live
    sc_immediate: str                  # Immediate, thick, ext4
    sc_wffc: str                       # WaitForFirstConsumer, thick
    sc_block: str                      # Immediate, thin
    snapshot_class: str
    # node name -> {"node_id", "segment"} of the nodes a Pod may go to
    nodes: dict[str, dict]
    # True: no kubelet; Pods are bound to a node by the test and never run,
    # node operations are done by the test (``node_ops``).
    fake_kubelet: bool = True
    pod_image: str = "registry.k8s.io/pause:3.10"
    target_of_node: dict[str, str] = dataclasses.field(default_factory=dict)
    diagnostics: Callable[[], str] = lambda: ""
    # controller GetCapacity(parameters, segment) -> (available, maximum); None: not reachable
    get_capacity: Callable[[dict, dict], tuple[int, int]] | None = None

    # -- waiting ----------------------------------------------------------------------------
    def wait(self, what: str, check: Callable[[], object], timeout: float = WAIT,
             interval: float = 0.5):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                got = check()
                if got:
                    return got
            except (RigError, AssertionError, KeyError, IndexError, TypeError) as err:
                last = err
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}"
                    + (f" (last error: {last})" if last else "") + "\n" + self.diagnostics())
            time.sleep(interval)

    # -- objects ----------------------------------------------------------------------------
    def pvc(self, name: str, sc: str, size: str, *, block: bool = False,
            data_source: dict | None = None, annotations: dict | None = None,
            volume_name: str | None = None) -> dict:
        spec = {"accessModes": ["ReadWriteOnce"], "storageClassName": sc,
                "resources": {"requests": {"storage": size}},
                "volumeMode": "Block" if block else "Filesystem"}
        if data_source:
            spec["dataSource"] = data_source
        if volume_name:
            spec["volumeName"] = volume_name
        return self.kubectl.create({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": self.namespace,
                         "annotations": annotations or {}},
            "spec": spec})

    def get_pvc(self, name: str) -> dict | None:
        return self.kubectl.get("pvc", name, self.namespace)

    def wait_bound(self, name: str, timeout: float = WAIT) -> tuple[dict, dict]:
        def bound():
            pvc = self.get_pvc(name)
            if pvc and pvc["status"].get("phase") == "Bound":
                return pvc
            return None
        try:
            pvc = self.wait(f"PVC {name} Bound", bound, timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}\nevents of {name}: {self.event_messages(name)}") from None
        pv = self.kubectl.get("pv", pvc["spec"]["volumeName"])
        assert pv is not None, f"PV {pvc['spec']['volumeName']} of {name} missing"
        return pvc, pv

    def event_messages(self, name: str, namespace: str | None = None) -> list[str]:
        return [f"{e.get('reason')}: {e.get('message')}"
                for e in self.kubectl.events(namespace or self.namespace, name)]

    def delete_pvc(self, name: str) -> None:
        self.kubectl.delete("pvc", name, self.namespace)

    def wait_gone(self, kind: str, name: str, namespace: str | None = None,
                  timeout: float = WAIT) -> None:
        self.wait(f"{kind} {name} deleted",
                  lambda: self.kubectl.get(kind, name, namespace) is None, timeout)

    def pod(self, name: str, node: str, claims: list[str]) -> dict:
        spec: dict = {
            "containers": [{"name": "c", "image": self.pod_image}],
            "volumes": [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
                        for i, c in enumerate(claims)],
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
        }
        if self.fake_kubelet:
            # What the scheduler would do: bind the Pod to the node.
            spec["nodeName"] = node
        else:
            spec["nodeSelector"] = {"kubernetes.io/hostname": node}
        return self.kubectl.create({"apiVersion": "v1", "kind": "Pod",
                                    "metadata": {"name": name, "namespace": self.namespace},
                                    "spec": spec})

    def delete_pod(self, name: str) -> None:
        # Without a kubelet nobody confirms the termination: force it.
        extra = ["--grace-period=0", "--force"] if self.fake_kubelet else []
        self.kubectl.run("delete", "pod", name, "-n", self.namespace, "--ignore-not-found",
                         "--wait=false", *extra)

    def attachment(self, pv_name: str, node: str) -> dict | None:
        for va in self.kubectl.get("volumeattachments"):
            if va["spec"]["source"].get("persistentVolumeName") == pv_name and \
                    va["spec"]["nodeName"] == node:
                return va
        return None

    # -- SPDK -------------------------------------------------------------------------------
    def driver_lvols(self) -> list[dict]:
        return [lv for lv in self.spdk.lvols() if contract.is_driver_lvol(lv["name"])]

    def lvol_of(self, pv: dict) -> dict:
        handle = pv["spec"]["csi"]["volumeHandle"]
        oid = contract.parse_id(handle)
        lv = self.spdk.lvol(oid.lvol_uuid)
        assert lv is not None, f"no lvol {oid.lvol_uuid} for PV {pv['metadata']['name']} " \
                               f"({handle}); lvols: {self.spdk.lvols()}"
        assert lv["target"] == oid.target, (lv, handle)
        return lv

    def wait_lvol_gone(self, lvol_uuid: str) -> None:
        self.wait(f"lvol {lvol_uuid} deleted", lambda: self.spdk.lvol(lvol_uuid) is None)


def leftovers(env: Env, baseline: set[str]) -> None:
    """No driver lvol beyond ``baseline`` (uuids), no subsystem of a volume
    that is gone."""
    def clean():
        extra = [lv for lv in env.driver_lvols() if lv["uuid"] not in baseline]
        assert not extra, f"lvols left behind: {extra}"
        alive = {lv["uuid"] for lv in env.spdk.lvols()}
        orphan = [s["nqn"] for s in env.spdk.subsystems()
                  if s["nqn"].startswith(contract.NQN_PREFIX)
                  and s["nqn"][len(contract.NQN_PREFIX):] not in alive]
        assert not orphan, f"subsystems left behind: {orphan}"
        return True
    env.wait("no SPDK object left behind", clean)


def no_pv_for(env: Env, claim: str) -> None:
    pvs = [pv["metadata"]["name"] for pv in env.kubectl.get("pv")
           if (pv["spec"].get("claimRef") or {}).get("name") == claim]
    assert not pvs, f"PVs were created for {claim}: {pvs}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- scenarios ------------------------------------------------------------------------------
def provision_immediate(env: Env, block: bool) -> None:
    """PVC with Immediate binding -> csi-provisioner -> CreateVolume -> Bound;
    the lvol exists with the requested size; deleting the PVC deletes the PV
    and the lvol."""
    name = unique("blk" if block else "fs")
    size = 72 * MiB
    env.pvc(name, env.sc_block if block else env.sc_immediate, "72Mi", block=block)
    pvc, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    assert pv["spec"]["csi"]["driver"] == DRIVER
    assert pv["metadata"]["annotations"].get("pv.kubernetes.io/provisioned-by") == DRIVER
    assert pv["spec"].get("volumeMode") == ("Block" if block else "Filesystem")
    assert pv["spec"]["claimRef"]["name"] == name
    lv = env.lvol_of(pv)
    # the CSI name is the PV name; the lvol carries it
    assert lv["name"] == contract.volume_lvol_name(pv_name), lv
    assert size <= lv["size"] < size + 8 * MiB, (lv, size)
    assert qty(pv["spec"]["capacity"]["storage"]) == lv["size"], (pv["spec"]["capacity"], lv)
    assert qty(pvc["status"]["capacity"]["storage"]) >= size
    ctx = pv["spec"]["csi"].get("volumeAttributes", {})
    assert ctx.get(contract.VC_LVOL_UUID) == lv["uuid"], ctx
    assert ctx.get(contract.VC_THIN) == ("true" if block else "false"), ctx
    env.delete_pvc(name)
    env.wait_gone("pv", pv_name)
    env.wait_lvol_gone(lv["uuid"])


def capacity_objects(env: Env, sc: str) -> list[dict]:
    return [c for c in env.kubectl.get("csistoragecapacities", namespace=env.driver_namespace)
            if c.get("storageClassName") == sc]


def check_capacity(env: Env, sc_params: dict) -> dict[str, int]:
    """One CSIStorageCapacity per node topology segment for the WFFC class,
    each equal to GetCapacity for that segment (and to the target's free bytes
    for thick volumes). Returns zone segment -> capacity."""
    segments = {tuple(sorted(n["segment"].items())) for n in env.nodes.values()}

    def match():
        objs = capacity_objects(env, env.sc_wffc)
        got = {tuple(sorted(o["nodeTopology"]["matchLabels"].items())): o for o in objs}
        assert set(got) == segments, f"capacity segments {sorted(got)} != nodes' {sorted(segments)}"
        out = {}
        for seg, o in got.items():
            cap = qty(o["capacity"])
            if env.get_capacity is not None:
                avail, maximum = env.get_capacity(sc_params, dict(seg))
                assert cap == avail, f"{seg}: CSIStorageCapacity {cap} != GetCapacity {avail}"
                if "maximumVolumeSize" in o:
                    assert qty(o["maximumVolumeSize"]) == maximum, (o, maximum)
            node = next(n for n, v in env.nodes.items()
                        if tuple(sorted(v["segment"].items())) == seg)
            target = env.target_of_node.get(node)
            if target:
                free = env.spdk.lvstore_free(target)
                assert cap == free, f"{seg}: capacity {cap} != {target} free bytes {free}"
            out[node] = cap
        return out
    return env.wait("CSIStorageCapacity per segment == GetCapacity", match, timeout=WAIT)


def wffc_selected_node(env: Env, node: str, other: str, sc_params: dict) -> None:
    """WaitForFirstConsumer: the scheduler's choice (annotation selected-node)
    reaches CreateVolume as the preferred segment, and the volume lands on the
    target hosted by that node even though the other target has more room;
    capacity objects follow."""
    caps = check_capacity(env, sc_params)
    target, other_target = env.target_of_node[node], env.target_of_node[other]
    assert env.spdk.lvstore_free(other_target) > env.spdk.lvstore_free(target), \
        "test premise: the other target must have more room (else placement proves nothing)"
    name = unique("wffc")
    if env.fake_kubelet:
        # What kube-scheduler writes after picking the node for a Pod.
        env.pvc(name, env.sc_wffc, "96Mi",
                annotations={"volume.kubernetes.io/selected-node": node})
    else:
        env.pvc(name, env.sc_wffc, "96Mi")
        env.pod(name, node, [name])
    pvc, pv = env.wait_bound(name)
    lv = env.lvol_of(pv)
    assert lv["target"] == target, f"volume on {lv['target']}, expected {target} (node {node})"
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    wanted = {k: v for k, v in env.nodes[node]["segment"].items()
              if k != contract.TOPOLOGY_NODE_KEY}
    exprs = {e["key"]: e["values"] for t in terms for e in t["matchExpressions"]}
    for k, v in wanted.items():
        assert exprs.get(k) == [v], f"PV nodeAffinity {exprs} lacks {k}={v}"
    after = check_capacity(env, sc_params)
    assert after[node] <= caps[node] - 96 * MiB, (caps, after)
    if not env.fake_kubelet:
        env.delete_pod(name)
        env.wait_gone("pod", name, env.namespace)
    env.delete_pvc(name)
    env.wait_gone("pv", pv["metadata"]["name"])
    env.wait_lvol_gone(lv["uuid"])


def node_for(env: Env, pv: dict) -> str:
    """A node that satisfies the PV's node affinity (as the scheduler would pick)."""
    terms = ((pv["spec"].get("nodeAffinity") or {}).get("required") or {}).get(
        "nodeSelectorTerms", [])
    for node, info in sorted(env.nodes.items()):
        labels = info["segment"]
        if not terms or any(all(labels.get(e["key"]) in e.get("values", [])
                                for e in t.get("matchExpressions", [])) for t in terms):
            return node
    raise AssertionError(f"no node satisfies {terms}")


def attach_detach(env: Env) -> None:
    """kube-controller-manager's attach/detach controller creates the
    VolumeAttachment for a Pod bound to a node; csi-attacher attaches it
    through ControllerPublishVolume; the subsystem allows exactly that node's
    host NQN; deleting the Pod detaches (ControllerUnpublishVolume)."""
    name = unique("att")
    env.pvc(name, env.sc_immediate, "64Mi")
    _, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    lv = env.lvol_of(pv)
    node = node_for(env, pv)
    env.pod(name, node, [name])
    va = env.wait(f"VolumeAttachment of {pv_name} to {node} attached",
                  lambda: (lambda v: v if v and v.get("status", {}).get("attached") else None)(
                      env.attachment(pv_name, node)))
    assert va["spec"]["attacher"] == DRIVER
    meta = va["status"].get("attachmentMetadata", {})
    nqn = contract.subsystem_nqn(lv["uuid"])
    assert meta.get(contract.PC_NQN) == nqn, meta
    assert meta.get(contract.PC_NS_UUID) == lv["uuid"], meta
    sub = env.spdk.subsystem(nqn)
    assert sub is not None, f"no subsystem {nqn}"
    hosts = sorted(h["nqn"] for h in sub.get("hosts", []))
    assert hosts == [contract.host_nqn(env.nodes[node]["node_id"])], \
        f"hosts {hosts} != host NQN of {node}"
    assert sub.get("allow_any_host") is False, sub
    env.delete_pod(name)
    env.wait(f"VolumeAttachment {va['metadata']['name']} deleted",
             lambda: env.kubectl.get("volumeattachment", va["metadata"]["name"]) is None)

    def unpublished():
        s = env.spdk.subsystem(nqn)
        return s is None or not s.get("hosts")
    env.wait(f"{node} removed from {nqn}", unpublished)
    env.delete_pvc(name)
    env.wait_gone("pv", pv_name)
    env.wait_lvol_gone(lv["uuid"])


def snapshot(env: Env, name: str, pvc: str) -> dict:
    return env.kubectl.create({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": env.namespace},
        "spec": {"volumeSnapshotClassName": env.snapshot_class,
                 "source": {"persistentVolumeClaimName": pvc}}})


def snapshot_restore_clone(env: Env, order: tuple[str, ...]) -> None:
    """VolumeSnapshot -> ReadyToUse; a PVC from it and a PVC cloned from the
    PVC become Bound with their lvols; deleting all four in ``order`` (any of
    'src', 'snap', 'restore', 'clone') leaves no SPDK object behind."""
    baseline = {lv["uuid"] for lv in env.driver_lvols()}
    src, snap, restore, clone = (unique(x) for x in ("src", "snap", "restore", "clone"))
    env.pvc(src, env.sc_immediate, "64Mi")
    _, src_pv = env.wait_bound(src)
    src_lv = env.lvol_of(src_pv)
    snapshot(env, snap, src)

    def ready():
        vs = env.kubectl.get("volumesnapshot", snap, env.namespace)
        st = (vs or {}).get("status") or {}
        assert not st.get("error"), st.get("error")
        return vs if st.get("readyToUse") else None
    vs = env.wait(f"VolumeSnapshot {snap} readyToUse", ready)
    content = env.kubectl.get("volumesnapshotcontent",
                              vs["status"]["boundVolumeSnapshotContentName"])
    handle = content["status"]["snapshotHandle"]
    snap_lv = env.spdk.lvol(contract.parse_id(handle, "snapshot").lvol_uuid)
    assert snap_lv and snap_lv["snapshot"], f"no snapshot lvol for {handle}: {snap_lv}"
    assert snap_lv["target"] == src_lv["target"]
    assert qty(vs["status"]["restoreSize"]) == src_lv["size"], (vs["status"], src_lv)

    env.pvc(restore, env.sc_immediate, "64Mi", data_source={
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snap})
    env.pvc(clone, env.sc_immediate, "64Mi", data_source={
        "kind": "PersistentVolumeClaim", "name": src})
    _, restore_pv = env.wait_bound(restore)
    _, clone_pv = env.wait_bound(clone)
    restore_lv, clone_lv = env.lvol_of(restore_pv), env.lvol_of(clone_pv)
    assert restore_lv["clone"], f"restored volume is not a clone of the snapshot: {restore_lv}"
    assert clone_lv["uuid"] not in (src_lv["uuid"], restore_lv["uuid"])
    assert restore_pv["spec"]["csi"]["volumeHandle"] != src_pv["spec"]["csi"]["volumeHandle"]

    for what in order:
        if what == "snap":
            env.kubectl.delete("volumesnapshot", snap, env.namespace)
            env.wait_gone("volumesnapshotcontent", content["metadata"]["name"])
        else:
            pvc = {"src": src, "restore": restore, "clone": clone}[what]
            pv = {"src": src_pv, "restore": restore_pv, "clone": clone_pv}[what]
            env.delete_pvc(pvc)
            env.wait_gone("pv", pv["metadata"]["name"])
    leftovers(env, baseline)


def bad_parameter(env: Env, sc_name: str, base_sc: str) -> None:
    """A StorageClass with a parameter the driver does not know: the PVC gets
    a ProvisioningFailed event naming it; nothing is created."""
    baseline = {lv["uuid"] for lv in env.driver_lvols()}
    sc = env.kubectl.get("storageclass", base_sc)
    env.kubectl.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                        "metadata": {"name": sc_name}, "provisioner": sc["provisioner"],
                        "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
                        "parameters": {**sc.get("parameters", {}), "colour": "blue"}})
    name = unique("badparam")
    try:
        env.pvc(name, sc_name, "64Mi")
        expect_event(env, name, "ProvisioningFailed", "unknown parameter 'colour'")
        assert env.get_pvc(name)["status"]["phase"] == "Pending"
        no_pv_for(env, name)
        leftovers(env, baseline)
    finally:
        env.delete_pvc(name)
        env.kubectl.delete("storageclass", sc_name)
    env.wait_gone("pvc", name, env.namespace)


def too_large(env: Env) -> None:
    """A size larger than any pool: ProvisioningFailed with the driver's
    message; nothing is created."""
    baseline = {lv["uuid"] for lv in env.driver_lvols()}
    name = unique("huge")
    env.pvc(name, env.sc_immediate, "64Ti")
    try:
        expect_event(env, name, "ProvisioningFailed", "no lvstore")
        assert env.get_pvc(name)["status"]["phase"] == "Pending"
        no_pv_for(env, name)
        leftovers(env, baseline)
    finally:
        env.delete_pvc(name)
    env.wait_gone("pvc", name, env.namespace)


def snapshot_of_missing_volume(env: Env, target: str) -> None:
    """A VolumeSnapshot of a PVC whose volume does not exist in SPDK (a
    pre-provisioned PV naming a missing lvol): the error reaches the
    VolumeSnapshot and an Event with the driver's message; nothing is created."""
    baseline = {lv["uuid"] for lv in env.driver_lvols()}
    handle = f"{target}:{uuid.uuid4()}"
    pv_name, name, snap = unique("ghost-pv"), unique("ghost"), unique("ghost-snap")
    env.kubectl.create({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": env.sc_immediate,
                 "volumeMode": "Filesystem",
                 "claimRef": {"namespace": env.namespace, "name": name},
                 "csi": {"driver": DRIVER, "volumeHandle": handle, "fsType": "ext4"}}})
    try:
        env.pvc(name, env.sc_immediate, "64Mi", volume_name=pv_name)
        env.wait_bound(name)
        snapshot(env, snap, name)
        msg = f"volume {handle} does not exist"

        def failed():
            vs = env.kubectl.get("volumesnapshot", snap, env.namespace)
            err = ((vs or {}).get("status") or {}).get("error") or {}
            return err if msg in (err.get("message") or "") else None
        err = env.wait(f"VolumeSnapshot {snap} error", failed)
        assert msg in err["message"], err
        assert not env.kubectl.get("volumesnapshot", snap, env.namespace)["status"].get(
            "readyToUse")

        def events() -> list[str]:
            # the snapshot's, and its content's (cluster-scoped: namespace default)
            vs = env.kubectl.get("volumesnapshot", snap, env.namespace)
            content = ((vs or {}).get("status") or {}).get("boundVolumeSnapshotContentName")
            out = env.event_messages(snap)
            if content:
                out += env.event_messages(content, "default")
            return out
        env.wait(f"an Event with {msg!r}", lambda: any(msg in e for e in events()))
        assert not [c for c in env.kubectl.get("volumesnapshotcontents")
                    if (c.get("status") or {}).get("snapshotHandle")
                    and c["spec"]["volumeSnapshotRef"]["name"] == snap], "a snapshot was made"
        leftovers(env, baseline)
    finally:
        env.kubectl.delete("volumesnapshot", snap, env.namespace)
        env.delete_pvc(name)
        env.wait_gone("pvc", name, env.namespace)
        env.kubectl.delete("pv", pv_name)


def expect_event(env: Env, name: str, reason: str, text: str) -> str:
    def found():
        for e in env.kubectl.events(env.namespace, name):
            if e.get("reason") == reason and text in (e.get("message") or ""):
                return e["message"]
        return None
    try:
        return env.wait(f"Event {reason} containing {text!r} on {name}", found)
    except AssertionError as err:
        raise AssertionError(f"{err}\nevents: {env.event_messages(name)}") from None


# --- kubelet's part (rig) --------------------------------------------------------------------
def staging_path(volume_handle: str) -> str:
    """kubelet's CSI staging path (global mount) for a volume."""
    digest = hashlib.sha256(volume_handle.encode()).hexdigest()
    return f"/var/lib/kubelet/plugins/kubernetes.io/csi/{DRIVER}/{digest}/globalmount"


def target_path(pod_uid: str, pv_name: str) -> str:
    return f"/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv_name}/mount"


class FakeKubelet:
    """kubelet's CSI calls against a node plugin's gRPC endpoint, with the
    arguments kubelet derives from the PV, the VolumeAttachment and the Pod."""

    def __init__(self, node_stub, kubectl: Kubectl | None = None) -> None:
        """``kubectl``: how kubelet reads the node-stage Secret the PV names
        (None: no secrets are passed)."""
        self.node = node_stub
        self.kubectl = kubectl

    def stage_secrets(self, pv: dict) -> dict[str, str]:
        """What kubelet passes to NodeStageVolume: the data of the Secret named
        by the PV's ``nodeStageSecretRef`` ({} without a reference). A
        reference to a missing Secret fails, as it fails kubelet's MountDevice."""
        ref = pv["spec"]["csi"].get("nodeStageSecretRef")
        if not ref or self.kubectl is None:
            return {}
        secret = self.kubectl.get("secret", ref["name"], ref["namespace"])
        if secret is None:
            raise RigError(f"node-stage Secret {ref['namespace']}/{ref['name']} not found")
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def stage(self, pv: dict, va: dict, secrets: dict[str, str] | None = None,
              timeout: float = 120) -> str:
        """NodeStageVolume as kubelet calls it; ``secrets`` overrides the
        PV's Secret (the tests' wrong and missing keys). Returns the staging path."""
        from csi_spdk.proto import csi_pb2 as csi
        handle = pv["spec"]["csi"]["volumeHandle"]
        staging = staging_path(handle)
        self.node.NodeStageVolume(csi.NodeStageVolumeRequest(
            volume_id=handle, publish_context=va["status"].get("attachmentMetadata", {}),
            staging_target_path=staging, volume_capability=self.capability(pv),
            volume_context=pv["spec"]["csi"].get("volumeAttributes", {}),
            secrets=self.stage_secrets(pv) if secrets is None else secrets), timeout=timeout)
        return staging

    @staticmethod
    def capability(pv: dict):
        from csi_spdk.proto import csi_pb2 as csi
        am = csi.VolumeCapability.AccessMode
        access = am(mode=am.SINGLE_NODE_WRITER)
        if pv["spec"].get("volumeMode") == "Block":
            return csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                        access_mode=access)
        return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(
            fs_type=pv["spec"]["csi"].get("fsType", ""),
            mount_flags=pv["spec"].get("mountOptions", [])), access_mode=access)

    def mount(self, pv: dict, va: dict, pod: dict, secrets: dict[str, str] | None = None
              ) -> tuple[str, str]:
        """NodeStageVolume + NodePublishVolume; returns (staging, target).
        ``secrets``: the data of the PV's nodeStageSecretRef Secret."""
        from csi_spdk.proto import csi_pb2 as csi
        handle = pv["spec"]["csi"]["volumeHandle"]
        staging = staging_path(handle)
        target = target_path(pod["metadata"]["uid"], pv["metadata"]["name"])
        pctx = va["status"].get("attachmentMetadata", {})
        vctx = pv["spec"]["csi"].get("volumeAttributes", {})
        cap = self.capability(pv)
        self.stage(pv, va, secrets)
        self.node.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=handle, publish_context=pctx, staging_target_path=staging,
            target_path=target, volume_capability=cap, volume_context=vctx), timeout=120)
        return staging, target

    def fs_total(self, pv: dict, path: str) -> int:
        from csi_spdk.proto import csi_pb2 as csi
        stats = self.node.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(
            volume_id=pv["spec"]["csi"]["volumeHandle"], volume_path=path), timeout=60)
        return next(u.total for u in stats.usage if u.unit == csi.VolumeUsage.BYTES)

    def expand(self, pv: dict, staging: str, target: str, size: int) -> int:
        from csi_spdk.proto import csi_pb2 as csi
        res = self.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
            volume_id=pv["spec"]["csi"]["volumeHandle"], volume_path=target,
            staging_target_path=staging, capacity_range=csi.CapacityRange(required_bytes=size),
            volume_capability=self.capability(pv)), timeout=120)
        return res.capacity_bytes

    def unmount(self, pv: dict, staging: str, target: str) -> None:
        from csi_spdk.proto import csi_pb2 as csi
        handle = pv["spec"]["csi"]["volumeHandle"]
        self.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
            volume_id=handle, target_path=target), timeout=120)
        self.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
            volume_id=handle, staging_target_path=staging), timeout=120)


def expand(env: Env, sc: str, node: str, kubelet: FakeKubelet | None) -> None:
    """Editing the PVC's size: csi-resizer -> ControllerExpandVolume grows the
    lvol; then the node expansion step (the test playing kubelet, or kubelet
    itself) grows the mounted filesystem."""
    name = unique("grow")
    old, new = 64 * MiB, 160 * MiB
    env.pvc(name, sc, "64Mi")
    _, pv = env.wait_bound(name)
    pv_name = pv["metadata"]["name"]
    lv = env.lvol_of(pv)
    assert lv["size"] == old, lv
    pod = env.pod(name, node, [name])
    va = env.wait(f"VolumeAttachment of {pv_name} attached",
                  lambda: (lambda v: v if v and v.get("status", {}).get("attached") else None)(
                      env.attachment(pv_name, node)))
    staging = target = None
    if kubelet is not None:
        staging, target = kubelet.mount(pv, va, pod)
        before = kubelet.fs_total(pv, target)
        assert before <= old, before
    env.kubectl.run("patch", "pvc", name, "-n", env.namespace, "--type=merge", "-p",
                    '{"spec":{"resources":{"requests":{"storage":"160Mi"}}}}')
    env.wait(f"lvol of {pv_name} grown to {new}",
             lambda: (env.spdk.lvol(lv["uuid"]) or {}).get("size") == new)
    env.wait(f"PV {pv_name} capacity 160Mi", lambda: qty(
        env.kubectl.get("pv", pv_name)["spec"]["capacity"]["storage"]) == new)
    if kubelet is not None:
        # The resizer leaves the rest to the node: FileSystemResizePending.
        def pending():
            conds = env.get_pvc(name)["status"].get("conditions", [])
            return any(c["type"] == "FileSystemResizePending" for c in conds)
        env.wait(f"PVC {name} FileSystemResizePending", pending)
        got = kubelet.expand(pv, staging, target, new)
        after = kubelet.fs_total(pv, target)
        assert after > before + 64 * MiB, (before, after, got)
        # kubelet then records the new size in the PVC status
        env.kubectl.run("patch", "pvc", name, "-n", env.namespace, "--subresource=status",
                        "--type=merge", "-p",
                        '{"status":{"capacity":{"storage":"160Mi"},"conditions":null,'
                        '"allocatedResourceStatuses":null}}')
        kubelet.unmount(pv, staging, target)
    env.wait(f"PVC {name} status capacity 160Mi", lambda: qty(
        env.get_pvc(name)["status"]["capacity"]["storage"]) == new)
    env.delete_pod(name)
    env.wait(f"VolumeAttachment {va['metadata']['name']} deleted",
             lambda: env.kubectl.get("volumeattachment", va["metadata"]["name"]) is None)
    env.delete_pvc(name)
    env.wait_gone("pv", pv_name)
    env.wait_lvol_gone(lv["uuid"])
