"""Command line: ``csi-spdk {controller,node,agent,sim,dev,discover}``.

Only argument parsing lives here; each subcommand's implementation is
imported lazily so ``csi-spdk sim`` does not load gRPC and ``--help`` is fast.
The Helm chart's flags are checked against this parser (tests/unit).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import io
import os
import signal
import sys

from . import DEFAULT_DRIVER_NAME, __version__


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("CSI_SPDK_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


def _seconds(text: str) -> float:
    """Seconds, bare or as a Go duration of one unit ("15s", "500ms", "1m")."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
            return float(text[:-len(unit)]) * factor
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 15s)") from None


def _csi(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True,
                   help="gRPC endpoint, unix:///path/csi.sock (or host:port)")
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME,
                   help=f"CSI driver name (default {DEFAULT_DRIVER_NAME})")
    p.add_argument("--metrics-address", default="",
                   help="serve Prometheus metrics on HOST:PORT (default: off)")
    _common(p)


def _inspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("CSI_SPDK_CONFIG",
                                                      "/etc/csi-spdk/config.yaml"),
                   help="the controller's config file (default: $CSI_SPDK_CONFIG, else the "
                        "chart's /etc/csi-spdk/config.yaml)")
    p.add_argument("-o", "--output", choices=["table", "wide", "json"], default="table",
                   help="table (default), wide table, or JSON")
    p.add_argument("--kube", choices=["auto", "on", "off"], default="auto",
                   help="PV/PVC and node names from the Kubernetes API (service account in "
                        "a Pod, else kubectl): auto = when it answers, on = say why not")
    p.add_argument("--node", action="append", default=[], metavar="NAME",
                   help="a node name to recognise in allow-lists (repeatable; Kubernetes "
                        "nodes and the config's are known already)")
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME,
                   help=f"CSI driver name of the PVs (default {DEFAULT_DRIVER_NAME})")
    p.set_defaults(impl="csi_spdk.controller.inspect:main")


def _inspection(sub) -> None:
    """volumes list|get, snapshots list, targets list (controller/inspect.py)."""
    for noun, verbs, what in (
            ("volumes", ("list", "get"), "the driver's volumes with their exports and nodes"),
            ("snapshots", ("list",), "the driver's snapshots and the volumes on them"),
            ("targets", ("list",), "the configured SPDK targets, reachability and pools")):
        p = sub.add_parser(noun, help=f"inspect {what} (reads the config and SPDK)")
        verbs_p = p.add_subparsers(dest="action", required=True)
        for verb in verbs:
            v = verbs_p.add_parser(verb, help=f"{verb} {noun}")
            if verb == "get":
                v.add_argument("volume_id", help="a CSI volume id (<target>:<lvol uuid>)")
            _inspect_options(v)


def _doctor(sub) -> None:
    p = sub.add_parser("doctor", help="preflight checks for a node or a storage host")
    roles = p.add_subparsers(dest="role", required=True)
    for role, what in (("node", "a Kubernetes node that runs the node plugin"),
                       ("storage", "a storage host that runs spdk_tgt"),
                       ("agent", "the storage agents as the controller reaches them "
                                 "(run where the controller runs)")):
        r = roles.add_parser(role, help=f"check {what}")
        r.add_argument("--format", choices=["table", "json"], default="table")
        r.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake tree, in tests
        if role == "node":
            r.add_argument("--node-id", default="",
                           help="the node's name (default: the host name)")
            r.add_argument("--state-dir", default="/var/lib/csi-spdk",
                           help="the node plugin's --state-dir")
            r.add_argument("--kubelet-dir", default="/var/lib/kubelet",
                           help="kubelet's root directory")
        elif role == "agent":
            r.add_argument("--config", default="",
                           help="the controller's config file: check every target's agent")
            r.add_argument("--address", default="",
                           help="one agent: HOST:PORT (mutual TLS) or unix:///path")
            r.add_argument("--ca-file", default="", help="CA of the agent's certificate")
            r.add_argument("--cert-file", default="", help="the controller's client certificate")
            r.add_argument("--key-file", default="", help="its key")
            r.add_argument("--server-name", default="",
                           help="the name the agent's certificate must carry "
                                "(default: the address's host)")
            r.add_argument("--lvstore", action="append", default=[], metavar="NAME",
                           help="an lvstore (pool) the target must have (repeatable)")
            r.add_argument("--expiry-warn-days", type=int, default=14,
                           help="warn when a certificate expires within this many days")
            r.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
        else:
            r.add_argument("--hugepages-mib", type=int, default=2048,
                           help="huge page memory spdk_tgt needs (its -s; default 2048)")
            r.add_argument("--ssd", action="append", default=[], metavar="PCI_ADDRESS",
                           help="an NVMe SSD meant for SPDK, e.g. 0000:01:00.0 (repeatable)")
            r.add_argument("--spdk-rpc", default="",
                           help="also check that spdk_tgt answers on this RPC socket")
    p.set_defaults(impl="csi_spdk.doctor:main")


def _kubelet_plugin(sub) -> None:
    """``registrar`` and ``livenessprobe`` (csi_spdk/kubelet_plugin.py), with
    the flag names of node-driver-registrar and livenessprobe. Declared here,
    not there: building the parser must not load gRPC for every subcommand."""
    p = sub.add_parser("registrar", help="register the node plugin with kubelet "
                                         "(node-driver-registrar's flags)")
    p.add_argument("--csi-address", required=True,
                   help="the driver's CSI socket (in this container)")
    p.add_argument("--kubelet-registration-path", required=True,
                   help="the same socket as kubelet sees it on the host")
    p.add_argument("--plugin-registration-path", default="/registration",
                   help="kubelet's plugins_registry directory (in this container)")
    p.add_argument("--http-endpoint", default="", help="serve /healthz on HOST:PORT")
    p.add_argument("--timeout", type=_seconds, default=1.0, help="CSI call timeout")
    p.add_argument("--v", default="2", help="log verbosity (klog style; >= 4 is debug)")
    p.set_defaults(impl="csi_spdk.kubelet_plugin:main", role="registrar")

    p = sub.add_parser("livenessprobe", help="serve /healthz from the driver's Probe "
                                             "(livenessprobe's flags)")
    p.add_argument("--csi-address", required=True, help="the driver's CSI socket")
    p.add_argument("--http-endpoint", default="", help="serve /healthz on HOST:PORT")
    p.add_argument("--health-port", type=int, default=9808, help="port when no --http-endpoint")
    p.add_argument("--probe-timeout", type=_seconds, default=1.0, help="Probe timeout")
    p.add_argument("--v", default="2", help="log verbosity (klog style; >= 4 is debug)")
    p.set_defaults(impl="csi_spdk.kubelet_plugin:main", role="livenessprobe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-spdk", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"csi-spdk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("controller", help="serve the CSI Identity and Controller services")
    _csi(p)
    p.add_argument("--config", required=True, help="controller config file (YAML or JSON)")
    p.add_argument("--leader-election", action="store_true",
                   help="act only while holding the Lease <driver name>-controller (two or "
                        "more replicas: the standby answers Probe not ready, so its sidecars "
                        "wait; controller/lease.py)")
    p.add_argument("--leader-election-namespace", default="",
                   help="namespace of the Lease (default: $POD_NAMESPACE)")
    p.add_argument("--leader-election-identity", default="",
                   help="this replica's name in the Lease (default: $POD_NAME, else the host "
                        "name)")
    p.add_argument("--leader-election-lease-duration", type=_seconds, default=15.0,
                   help="seconds a standby waits for an unrenewed lease to expire")
    p.add_argument("--leader-election-renew-deadline", type=_seconds, default=10.0,
                   help="seconds the holder keeps trying to renew before it stops")
    p.add_argument("--leader-election-retry-period", type=_seconds, default=2.0,
                   help="seconds between attempts to acquire or renew")
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
    p.add_argument("--acks", choices=["auto", "on", "off"], default="auto",
                   help="acknowledge rotated keys in ConfigMap csi-spdk-node-<node> (auto: "
                        "when a ServiceAccount token or $KUBECONFIG is there)")
    p.add_argument("--acks-namespace", default="",
                   help="the driver's namespace for those ConfigMaps (default $POD_NAMESPACE)")
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
    # the storage side (agent/storage.py StorageSide.from_args reads them)
    g = p.add_argument_group("storage (pools, spdk_tgt supervision, export recovery)")
    g.add_argument("--pools", default="",
                   help="pool file (YAML): devices to attach and lvstores to load or create")
    g.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                   help="this storage host's name: a pool file's nodes.<name> list replaces "
                        "its pools list here (default: $NODE_NAME)")
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
    p.add_argument("--dhchap-digests", default="",
                   help="comma-separated DH-HMAC-CHAP digests the target allows (spdk_tgt's "
                        "nvmf_set_config dhchap_digests at start-up; default: all)")
    p.add_argument("--dhchap-dhgroups", default="",
                   help="comma-separated DH groups the target allows (nvmf_set_config "
                        "dhchap_dhgroups; default: all)")
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

    _inspection(sub)
    _doctor(sub)
    _kubelet_plugin(sub)

    p = sub.add_parser("rotate-keys", help="new DH-HMAC-CHAP keys for volumes, keeping their "
                       "connections (resumable: run it again after a failure)")
    p.add_argument("--config", required=True, help="the controller's config file")
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    p.add_argument("--volume", action="append", default=[], help="a volume id (repeatable)")
    p.add_argument("--all", action="store_true", help="every volume of every target")
    p.add_argument("--node", action="append", default=[], metavar="NODE=ENDPOINT",
                   help="a node plugin's CSI endpoint, for nodes with a live connection")
    p.add_argument("--access-type", choices=["mount", "block"], default="mount",
                   help="how the volumes are staged on the nodes (their capability)")
    p.add_argument("--fs-type", default="", help="their filesystem (mount)")
    p.add_argument("--node-timeout", type=_seconds, default=300.0,
                   help="seconds to wait for the nodes' acknowledgements of each step "
                        "(kubelet republishes about once a minute); then the rotation "
                        "stays pending and a rerun resumes it")
    _common(p)
    p.set_defaults(impl="csi_spdk.controller.rotate_cli:main")

    p = sub.add_parser("discover", help="print this node's NVMe SSD inventory")
    p.add_argument("--format", choices=["json", "table"], default="table")
    p.add_argument("--spdk-rpc", default="", help="also list SSDs owned by this spdk_tgt")
    p.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(impl="csi_spdk.node.topology:discover_main")
    return parser


EXIT_ERROR, EXIT_PIPE, EXIT_INTERRUPTED = 1, 141, 130


def fail(command: str, message: str, fix: str = "") -> int:
    """Print ``csi-spdk <command>: <message>[; <fix>]`` on stderr; the exit code."""
    line = f"csi-spdk {command}: {message}"
    if fix and fix not in message:
        line += f"; {fix}"
    print(line.replace("\n", " "), file=sys.stderr)
    return EXIT_ERROR


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush
    does not raise again (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Expected failures (a bad config or flag, an
    unreachable socket, a missing file) are one line with the fix, not a
    traceback; a closed stdout (``| head``) ends quietly like other tools."""
    args = build_parser().parse_args(argv)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how an operator
    # (or a test's bounded stop) sees where a process that will not exit hangs
    # (not when stderr is no file, e.g. captured by a test runner)
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    module, _, func = args.impl.partition(":")
    try:
        code = int(getattr(importlib.import_module(module), func)(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        line = explain(err)
        if line is None:
            raise  # a bug: the traceback is what a report needs
        return fail(args.command, *line)


def explain(err: Exception) -> tuple[str, str] | None:
    """(message, fix) for an error a person can fix; None for a bug.
    (Imported here: ``errors`` loads gRPC, which ``csi-spdk sim`` never needs.)"""
    from .errors import CsiError, InvalidArgument, Unavailable

    if isinstance(err, Unavailable):
        return err.message, ("check that spdk_tgt (or `csi-spdk sim`) is running and that the "
                             "RPC address (--spdk-rpc, or the config's targets[].rpc) is its "
                             "socket")
    if isinstance(err, InvalidArgument):
        return err.message, "correct it and run the command again"
    if isinstance(err, CsiError):
        return err.message, ""
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}", ""
    if isinstance(err, ValueError):  # a malformed flag value (--topology, --spdk-rpc)
        return str(err), "correct it and run the command again"
    return None


if __name__ == "__main__":
    sys.exit(main())
