"""``csi-spdk rotate-keys``: the operator's entry to controller/rotate.py.

Runs where the controller runs (its config file, its Secret store: in the
controller Pod, ``kubectl exec ... -- csi-spdk rotate-keys --all``). Nodes
with a live connection re-key through kubelet's republish: the command says
the target's pair in the volume's Secret and waits up to ``--node-timeout``
for each node's acknowledgement (controller/rotate_nodes.py). For dev and
the test rig, ``--node NODE=ENDPOINT`` calls the node plugins instead: a
repeated NodeStageVolume with the pair the target holds (node/reauth.py), at
kubelet's staging path of the volume and with its capability
(``--access-type``/``--fs-type``). One line per volume; exit 1 when any
failed (run it again: it resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from .. import contract
from ..errors import CsiError, FailedPrecondition, InvalidArgument
from .auth import VolumeKeys
from .config import load
from .rotate import Outcome, rotate


def kubelet_staging_path(driver: str, volume_id: str) -> str:
    digest = hashlib.sha256(volume_id.encode()).hexdigest()
    return f"/var/lib/kubelet/plugins/kubernetes.io/csi/{driver}/{digest}/globalmount"


class GrpcNodeSync:
    """NodeStageVolume on each node plugin, with the target's current pair."""

    def __init__(self, endpoints: dict[str, str], driver: str, access: str, fs_type: str,
                 publish_context) -> None:
        self.endpoints = endpoints
        self.driver = driver
        self.access, self.fs_type = access, fs_type
        self.publish_context = publish_context     # (volume id, host NQN) -> dict

    def reaches(self, node: str) -> bool:
        return node in self.endpoints

    def _capability(self):
        from ..proto import csi_pb2 as csi
        am = csi.VolumeCapability.AccessMode
        access = am(mode=am.SINGLE_NODE_WRITER)
        if self.access == "block":
            return csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                        access_mode=access)
        return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(
            fs_type=self.fs_type), access_mode=access)

    def __call__(self, volume_id: str, node: str, host: str, keys: VolumeKeys) -> None:
        import grpc

        from ..proto import csi_pb2, csi_pb2_grpc
        if node not in self.endpoints:
            raise FailedPrecondition(f"no --node endpoint for node {node}")
        with grpc.insecure_channel(self.endpoints[node]) as ch:
            stub = csi_pb2_grpc.NodeStub(ch)
            try:
                stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id, publish_context=self.publish_context(volume_id, host),
                    staging_target_path=kubelet_staging_path(self.driver, volume_id),
                    volume_capability=self._capability(),
                    volume_context={contract.VC_AUTH: contract.AUTH_DHCHAP},
                    secrets=keys.secrets()), timeout=120)
            except grpc.RpcError as err:
                raise FailedPrecondition(f"node {node} did not re-key volume {volume_id}: "
                                         f"{err.code().name}: {err.details()}") from None


def _endpoints(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        node, sep, endpoint = pair.partition("=")
        if not sep or not node or not endpoint:
            raise InvalidArgument(f"--node {pair!r}: expected NODE=ENDPOINT")
        out[node] = endpoint
    return out


def cluster_sync(store, timeout: float):
    """In a cluster (the Secrets are Kubernetes'): wait for the nodes'
    acknowledgements of kubelet's republish (controller/rotate_nodes.py)."""
    api = getattr(store, "api", None)
    if api is None or not hasattr(store, "set_step"):
        return None
    from .rotate_nodes import ClusterNodeSync, ConfigMapAckWatch
    return ClusterNodeSync(ConfigMapAckWatch(api, store.namespace), timeout)


def main(args: argparse.Namespace) -> int:
    from .service import ControllerServicer
    if bool(args.volume) == bool(args.all):
        raise InvalidArgument("give --volume ID (repeatable) or --all")
    servicer = ControllerServicer(load(args.config), args.driver_name)
    try:
        def publish_context(volume_id: str, host: str) -> dict:
            target, lv = servicer.targets.volume(volume_id)
            ctx = target.exporter.publish_context(lv.uuid)
            ctx[contract.PC_AUTH] = contract.AUTH_DHCHAP
            return ctx

        sync = GrpcNodeSync(_endpoints(args.node), args.driver_name, args.access_type,
                            args.fs_type, publish_context) if args.node else \
            cluster_sync(servicer.auth.store, args.node_timeout)

        def node_of(host: str) -> str:
            return contract.node_of_host(host) or host

        if args.all:
            ids = [str(contract.ObjectId(t.name, lv["uuid"]))
                   for t in servicer.targets.values() for lv in t.api.lvols()
                   if contract.is_volume_lvol(lv["name"]) and not lv.get("is_snapshot")]
        else:
            ids = list(args.volume)
        failed = 0
        for vid in ids:
            try:
                target, lv = servicer.targets.volume(vid)
                if args.all and servicer.auth.store is not None and hasattr(
                        servicer.auth.store, "pending"):
                    keys = servicer.auth.store.get(lv.uuid)
                    if keys is None or not keys.dhchap_key:
                        print(f"{vid}: skipped (no DH-HMAC-CHAP keys: auth none or tls)")
                        continue
                out: Outcome = rotate(target, lv, servicer.auth, sync, node_of)
                print(out.line())
            except CsiError as err:
                failed += 1
                print(f"{vid}: not rotated: {err.code.name}: {err.message}", file=sys.stderr)
        if not ids:
            print("no volumes")
        return 1 if failed else 0
    finally:
        servicer.close()
