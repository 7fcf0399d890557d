"""Command line: ``csi-spdk {controller,node,agent,sim,dev,discover}``.

Only argument parsing lives here; each subcommand's implementation is
imported lazily so ``csi-spdk sim`` does not load gRPC and ``--help`` is fast.
The Helm chart's flags are checked against this parser (tests/unit).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import DEFAULT_DRIVER_NAME, __version__


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("CSI_SPDK_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


def _csi(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True,
                   help="gRPC endpoint, unix:///path/csi.sock (or host:port)")
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME,
                   help=f"CSI driver name (default {DEFAULT_DRIVER_NAME})")
    p.add_argument("--metrics-address", default="",
                   help="serve Prometheus metrics on HOST:PORT (default: off)")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-spdk", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"csi-spdk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("controller", help="serve the CSI Identity and Controller services")
    _csi(p)
    p.add_argument("--config", required=True, help="controller config file (YAML or JSON)")
    p.set_defaults(impl="csi_spdk.controller.main:run")

    p = sub.add_parser("node", help="serve the CSI Identity and Node services")
    _csi(p)
    p.add_argument("--node-id", required=True, help="this node's name (Kubernetes node name)")
    p.add_argument("--state-dir", default="/var/lib/csi-spdk",
                   help="where staging records survive plugin restarts")
    p.add_argument("--max-volumes", type=int, default=0,
                   help="max volumes per node reported to Kubernetes (0 = unlimited)")
    p.add_argument("--ctrl-loss-tmo", type=int, default=-1,
                   help="nvme connect --ctrl-loss-tmo seconds (-1 = forever, the default: "
                        "a target restart and the agent's replay may take longer than any "
                        "fixed value, and after it the kernel deletes the controller under "
                        "a mounted filesystem)")
    p.add_argument("--unstage-grace", type=float, default=30.0,
                   help="seconds NodeUnstage waits for a lost path to come back before it "
                        "disconnects first (so the unmount cannot hang)")
    p.add_argument("--reconnect-delay", type=int, default=2,
                   help="nvme connect --reconnect-delay seconds")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the namespace's block device")
    p.add_argument("--spdk-rpc", default="",
                   help="a local spdk_tgt RPC address, to report the SSDs it owns")
    p.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    p.add_argument("--topology", action="append", default=[], metavar="KEY=VALUE",
                   help="extra topology segment label (repeatable)")
    p.set_defaults(impl="csi_spdk.node.main:run")

    p = sub.add_parser("agent", help="serve the storage agent beside spdk_tgt (the controller's "
                                     "only way to a remote target)")
    p.add_argument("--listen", required=True,
                   help="unix:///path/agent.sock (same host) or HOST:PORT (mutual TLS)")
    p.add_argument("--spdk-rpc", default="unix:///var/tmp/spdk.sock",
                   help="spdk_tgt's local JSON-RPC socket")
    p.add_argument("--state-dir", default="/var/lib/csi-spdk-agent",
                   help="the agent's private state (keys in a 0700 directory)")
    p.add_argument("--tls-cert", default="", help="server certificate (PEM) for a TCP --listen")
    p.add_argument("--tls-key", default="", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", default="",
                   help="CA (PEM) that signs the controller's client certificates")
    p.add_argument("--rpc-timeout", type=float, default=30.0,
                   help="default seconds per spdk_tgt call")
    p.add_argument("--metrics-address", default="",
                   help="serve Prometheus metrics on HOST:PORT (default: off)")
    # the storage side (agent/storage.py add_arguments declares the same set)
    g = p.add_argument_group("storage (pools, spdk_tgt supervision, export recovery)")
    g.add_argument("--pools", default="",
                   help="pool file (YAML): devices to attach and lvstores to load or create")
    g.add_argument("--spdk-tgt-cmd", default="",
                   help="start and supervise spdk_tgt with this command line; empty: attach "
                        "to one something else runs on --spdk-rpc")
    g.add_argument("--spdk-tgt-log", default="", help="file for spdk_tgt's output")
    g.add_argument("--spdk-poll-interval", type=float, default=0.5,
                   help="seconds between spdk_get_version health checks")
    g.add_argument("--no-hugepage-check", action="store_true",
                   help="start spdk_tgt without checking huge pages first")
    _common(p)
    p.set_defaults(impl="csi_spdk.agent.main:run")

    p = sub.add_parser("sim", help="run the SPDK JSON-RPC simulator")
    p.add_argument("--rpc-socket", required=True, help="Unix socket to serve JSON-RPC on")
    p.add_argument("--data-dir", default="",
                   help="directory for lvol backing files (default: a temp dir)")
    p.add_argument("--tcp", default="", help="also serve JSON-RPC on HOST:PORT (loopback)")
    p.add_argument("--nvmet", action="store_true",
                   help="realise exported namespaces through the kernel nvmet target "
                        "(configfs), e.g. inside the test guest")
    p.add_argument("--max-subsystems", type=int, default=1024,
                   help="NVMe-oF subsystems the target takes, discovery included (spdk_tgt's "
                        "nvmf_set_max_subsystems before init; default 1024 as in SPDK)")
    _common(p)
    p.set_defaults(impl="csi_spdk.sim.server:main")

    p = sub.add_parser("dev", help="run simulator + controller + node for a quick try")
    p.add_argument("--socket-dir", default="/tmp/csi-spdk",
                   help="where controller.sock, node.sock and spdk.sock are created")
    p.add_argument("--spdk-rpc", default="",
                   help="use this running spdk_tgt instead of the simulator")
    p.add_argument("--node-id", default="dev-node", help="node id of the node plugin")
    p.add_argument("--metrics-address", default="", help="controller metrics HOST:PORT")
    _common(p)
    p.set_defaults(impl="csi_spdk.dev:run_dev")

    p = sub.add_parser("discover", help="print this node's NVMe SSD inventory")
    p.add_argument("--format", choices=["json", "table"], default="table")
    p.add_argument("--spdk-rpc", default="", help="also list SSDs owned by this spdk_tgt")
    p.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(impl="csi_spdk.node.topology:discover_main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, func = args.impl.partition(":")
    return int(getattr(importlib.import_module(module), func)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
