"""Process wiring of ``csi-spdk node``: initiator, mounter, topology, gRPC server."""

from __future__ import annotations

import argparse

from .. import contract
from .. import log as logsetup
from ..identity import IdentityServicer
from ..proto import csi_pb2_grpc
from ..server import GrpcServer, serve
from . import acks
from .initiator import NvmeTcpInitiator
from .mount import Mounter
from .service import NodeServicer
from .topology import NodeTopology, parse_extra


def node_server(args: argparse.Namespace) -> GrpcServer:
    """A ready-to-start gRPC server with Identity + Node."""
    topology = NodeTopology(args.node_id, args.sysfs_root, args.spdk_rpc,
                            parse_extra(args.topology))
    initiator = NvmeTcpInitiator(
        host_nqn=contract.host_nqn(args.node_id), host_id=contract.host_id(args.node_id),
        ctrl_loss_tmo=args.ctrl_loss_tmo, reconnect_delay=args.reconnect_delay,
        sysfs_root=args.sysfs_root,
    )
    node = NodeServicer(
        node_id=args.node_id, state_dir=args.state_dir, initiator=initiator,
        mounter=Mounter(), max_volumes=args.max_volumes,
        topology=topology.segments,
        connect_timeout=args.connect_timeout, unstage_grace=args.unstage_grace,
        acks=acks.from_args(args.node_id, getattr(args, "acks_namespace", ""),
                            getattr(args, "acks", "off")),
    )
    # controller=True: plugin capabilities are driver-wide (see identity.py)
    identity = IdentityServicer(args.driver_name, controller=True, node=node)
    return GrpcServer(args.endpoint, [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
    ], service_names=["csi.v1.Identity", "csi.v1.Node"])


def run(args: argparse.Namespace) -> int:
    logsetup.setup(args.log_level)
    return serve([node_server(args)], args.metrics_address)
