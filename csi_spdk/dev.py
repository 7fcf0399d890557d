"""Process wiring: build servicers, serve them, stop cleanly on SIGTERM.

``run_controller`` and ``run_node`` are what the containers run;
``run_dev`` is the embedded default for a newcomer: simulator (or a given
spdk_tgt), an lvstore, a controller and a node plugin in one process, with
fixed socket names under ``--socket-dir`` that tests and docs rely on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import contract
from . import log as logsetup
from .proto import csi_pb2_grpc
from .server import GrpcServer, start_metrics, wait_for_signal

log = logging.getLogger("csi_spdk.app")

DEV_LVSTORE = "lvs0"
DEV_BDEV = "Malloc0"
DEV_LVSTORE_BYTES = 4 * 1024**3
DEV_LVSTORE_MIN_BYTES = 512 * 1024**2


def controller_server(config_path: str, endpoint: str, driver_name: str) -> GrpcServer:
    """A ready-to-start gRPC server with Identity + Controller."""
    from .config import load
    from .controller import ControllerServicer
    from .identity import IdentityServicer

    config = load(config_path)
    controller = ControllerServicer(config, driver_name=driver_name)
    identity = IdentityServicer(driver_name, controller=controller)
    return GrpcServer(endpoint, [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
    ], service_names=["csi.v1.Identity", "csi.v1.Controller"])


def node_server(args: argparse.Namespace) -> GrpcServer:
    """A ready-to-start gRPC server with Identity + Node."""
    from .identity import IdentityServicer
    from .initiator import NvmeTcpInitiator
    from .mount import Mounter
    from .node import NodeServicer
    from .topology import inventory, parse_extra, segments

    extra = parse_extra(args.topology)
    ssds = inventory(args.sysfs_root, args.spdk_rpc, strict=False)
    initiator = NvmeTcpInitiator(
        host_nqn=contract.host_nqn(args.node_id), host_id=contract.host_id(args.node_id),
        ctrl_loss_tmo=args.ctrl_loss_tmo, reconnect_delay=args.reconnect_delay,
        sysfs_root=args.sysfs_root,
    )
    node = NodeServicer(
        node_id=args.node_id, state_dir=args.state_dir, initiator=initiator,
        mounter=Mounter(), max_volumes=args.max_volumes,
        topology_segments=segments(args.node_id, ssds, extra),
        connect_timeout=args.connect_timeout,
    )
    # controller=True: plugin capabilities are driver-wide (see identity.py)
    identity = IdentityServicer(args.driver_name, controller=True, node=node)
    return GrpcServer(args.endpoint, [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
    ], service_names=["csi.v1.Identity", "csi.v1.Node"])


def _serve(servers: list[GrpcServer], metrics_address: str,
           cleanup: Callable[[], None] = lambda: None) -> int:
    try:
        start_metrics(metrics_address)
        for server in servers:
            server.start()
        signum = wait_for_signal()
        log.info("shutting down", extra={"f": {"signal": signum}})
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
        cleanup()
    return 0


def run_controller(args: argparse.Namespace) -> int:
    logsetup.setup(args.log_level)
    return _serve([controller_server(args.config, args.endpoint, args.driver_name)],
                  args.metrics_address)


def run_node(args: argparse.Namespace) -> int:
    logsetup.setup(args.log_level)
    return _serve([node_server(args)], args.metrics_address)


def ensure_lvstore(rpc: str) -> tuple[list[str], bool]:
    """Use the target's lvstores, or make one on a malloc bdev if it has none
    (then the second value is True: dev removes it when it stops).

    The malloc bdev is 4 GiB, or less when the target has less memory (an
    spdk_tgt started with ``--no-huge -s 2048`` refuses 4 GiB with ENOMEM)."""
    from .spdk.api import SpdkApi
    from .spdk.client import SpdkClient
    from .spdk.errors import SpdkNoSpace

    api = SpdkApi(SpdkClient(rpc))
    try:
        names = [lvs["name"] for lvs in api.lvstores()]
        if not names:
            size = DEV_LVSTORE_BYTES
            while True:
                try:
                    api.malloc_create(DEV_BDEV, size)
                    break
                except SpdkNoSpace:
                    if size <= DEV_LVSTORE_MIN_BYTES:
                        raise
                    size //= 2
                    log.warning("target has too little memory for the dev malloc bdev; "
                                "trying a smaller one", extra={"f": {"bytes": size}})
            api.lvstore_create(DEV_BDEV, DEV_LVSTORE)
            return [DEV_LVSTORE], True
        return names, False
    finally:
        api.client.close()


def drop_dev_lvstore(rpc: str) -> None:
    """Remove the lvstore and malloc bdev ``ensure_lvstore`` made (best effort)."""
    from .spdk.api import SpdkApi
    from .spdk.client import SpdkClient
    from .spdk.errors import SpdkError

    api = SpdkApi(SpdkClient(rpc))
    try:
        for method, params in (("bdev_lvol_delete_lvstore", {"lvs_name": DEV_LVSTORE}),
                               ("bdev_malloc_delete", {"name": DEV_BDEV})):
            try:
                api.call(method, params)
            except SpdkError as err:
                log.warning("could not remove what dev made", extra={"f": {
                    "method": method, "error": err.message}})
    finally:
        api.client.close()


def run_dev(args: argparse.Namespace) -> int:
    """Simulator (or --spdk-rpc) + controller + node, until Ctrl-C/SIGTERM."""
    logsetup.setup(args.log_level)
    sock_dir = Path(args.socket_dir).resolve()
    sock_dir.mkdir(parents=True, exist_ok=True)
    work = sock_dir / "dev-state"
    if work.exists():
        shutil.rmtree(work)  # ours, from an earlier run that was killed hard
    work.mkdir()
    sim = None
    rpc = args.spdk_rpc
    if not rpc:
        from .sim.server import SimServer

        rpc = str(sock_dir / "spdk.sock")
        sim = SimServer(rpc, str(work / "sim-data"))
        sim.start()
    try:
        lvstores, made_lvstore = ensure_lvstore(rpc)
        config = {
            "targets": [{
                "name": "dev",
                "rpc": rpc,
                "nvmf": {"listenAddress": "127.0.0.1", "port": 4420},
                "lvstores": lvstores,
                "node": args.node_id,
            }],
            # dev knows its only node, so publishing elsewhere is NOT_FOUND
            "nodes": [args.node_id],
        }
        config_path = work / "controller.json"
        config_path.write_text(json.dumps(config, indent=2))
        servers = [controller_server(str(config_path), f"unix://{sock_dir}/controller.sock",
                                     "csi-spdk.io")]
        node_args = argparse.Namespace(
            endpoint=f"unix://{sock_dir}/node.sock", node_id=args.node_id,
            state_dir=str(work / "node-state"), max_volumes=0, ctrl_loss_tmo=60,
            reconnect_delay=2, connect_timeout=30.0, spdk_rpc="", sysfs_root="/sys",
            topology=[], driver_name="csi-spdk.io",
        )
        servers.append(node_server(node_args))
    except BaseException:
        if sim:
            sim.stop()
        raise
    print(_dev_banner(sock_dir, rpc, lvstores, sim is not None), flush=True)

    def cleanup() -> None:
        if sim:
            sim.stop()
        elif made_lvstore:
            drop_dev_lvstore(rpc)
        shutil.rmtree(work, ignore_errors=True)

    return _serve(servers, args.metrics_address, cleanup)


def _dev_banner(sock_dir: Path, rpc: str, lvstores: list[str], simulated: bool) -> str:
    nvme_tcp = os.path.exists("/sys/module/nvme_tcp") and shutil.which("nvme")
    return "\n".join([
        "csi-spdk dev is running (Ctrl-C to stop; everything it made is removed)",
        f"  controller: unix://{sock_dir}/controller.sock",
        f"  node:       unix://{sock_dir}/node.sock"
        + ("" if nvme_tcp else "  (this host has no NVMe/TCP: staging will fail)"),
        f"  SPDK RPC:   {rpc} ({'simulator' if simulated else 'spdk_tgt'}), "
        f"lvstores {', '.join(lvstores)}",
        "try (staging specs need a kernel with nvme-tcp):",
        f"  csi-sanity --csi.endpoint=unix://{sock_dir}/node.sock "
        f"--csi.controllerendpoint=unix://{sock_dir}/controller.sock "
        "--csi.testvolumesize=67108864 --csi.mountdir=/tmp/csi-sanity-mnt "
        "--csi.stagingdir=/tmp/csi-sanity-stage",
    ])


__all__ = ["run_controller", "run_node", "run_dev"]
