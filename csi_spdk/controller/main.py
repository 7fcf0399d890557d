"""Process wiring of ``csi-spdk controller``: config, servicers, gRPC server."""

from __future__ import annotations

import argparse
import os

from .. import log as logsetup
from ..identity import IdentityServicer
from ..proto import csi_pb2_grpc
from ..server import GrpcServer, serve
from .config import load
from .lease import LeaseElector, default_identity
from .service import ControllerServicer


def controller_server(config_path: str, endpoint: str, driver_name: str,
                      elector: LeaseElector | None = None) -> GrpcServer:
    """A ready-to-start gRPC server with Identity + Controller. With an
    ``elector``, Probe is ready and the reconciler runs only while it holds
    the lease (controller/lease.py)."""
    config = load(config_path)
    controller = ControllerServicer(config, driver_name=driver_name)
    ready = None
    if elector is not None:
        controller.active = lambda: elector.is_leader
        ready = controller.active
    controller.start_background()
    identity = IdentityServicer(driver_name, controller=controller, ready=ready)
    return GrpcServer(endpoint, [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
    ], service_names=["csi.v1.Identity", "csi.v1.Controller"])


def elector_of(args: argparse.Namespace) -> LeaseElector | None:
    if not getattr(args, "leader_election", False):
        return None
    namespace = args.leader_election_namespace or os.environ.get("POD_NAMESPACE", "")
    if not namespace:
        raise SystemExit("--leader-election needs --leader-election-namespace or $POD_NAMESPACE")
    name = args.driver_name.replace("/", "-").replace(".", "-") + "-controller"
    return LeaseElector(name, namespace, args.leader_election_identity or default_identity(),
                        lease_duration=args.leader_election_lease_duration,
                        renew_deadline=args.leader_election_renew_deadline,
                        retry_period=args.leader_election_retry_period)


def run(args: argparse.Namespace) -> int:
    logsetup.setup(args.log_level)
    elector = elector_of(args)
    server = controller_server(args.config, args.endpoint, args.driver_name, elector)
    if elector is None:
        return serve([server], args.metrics_address)
    elector.start()
    try:
        return serve([server], args.metrics_address)
    finally:
        elector.stop()
