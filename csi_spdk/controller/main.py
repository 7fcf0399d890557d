"""Process wiring of ``csi-spdk controller``: config, servicers, gRPC server."""

from __future__ import annotations

import argparse

from .. import log as logsetup
from ..identity import IdentityServicer
from ..proto import csi_pb2_grpc
from ..server import GrpcServer, serve
from .config import load
from .service import ControllerServicer


def controller_server(config_path: str, endpoint: str, driver_name: str) -> GrpcServer:
    """A ready-to-start gRPC server with Identity + Controller."""
    config = load(config_path)
    controller = ControllerServicer(config, driver_name=driver_name)
    controller.start_background()
    identity = IdentityServicer(driver_name, controller=controller)
    return GrpcServer(endpoint, [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
    ], service_names=["csi.v1.Identity", "csi.v1.Controller"])


def run(args: argparse.Namespace) -> int:
    logsetup.setup(args.log_level)
    return serve([controller_server(args.config, args.endpoint, args.driver_name)],
                 args.metrics_address)
