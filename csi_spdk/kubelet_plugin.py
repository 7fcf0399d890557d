"""The two node-side helpers a CSI node plugin needs beside it, with the
command-line flags of their kubernetes-csi counterparts so the chart's node
DaemonSet runs either unchanged:

* ``registrar`` (node-driver-registrar): serves kubelet's plugin registration
  API (``proto/pluginregistration.proto``) on
  ``<registration dir>/<driver>-reg.sock``; kubelet's plugin watcher finds the
  socket, asks GetInfo for the driver's name and CSI endpoint, and reports
  the outcome with NotifyRegistrationStatus (a refusal ends the process so
  its container restarts, as upstream does);
* ``livenessprobe``: ``GET /healthz`` answers 200 when the driver's
  Identity.Probe says ready within ``--probe-timeout``, 500 otherwise.

Why they exist: the Go module proxy reachable from this project's build
machines refuses github.com/kubernetes-csi/node-driver-registrar and
livenessprobe at every version, so they cannot be built here; the cluster
rig (tests/e2e/cluster) wraps these in the images the chart names instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from .proto import csi_pb2, csi_pb2_grpc, pluginregistration_pb2, pluginregistration_pb2_grpc
from .server import parse_host_port

log = logging.getLogger("csi_spdk.kubelet_plugin")
CSI_VERSIONS = ["1.0.0"]


def _channel(csi_address: str) -> grpc.Channel:
    target = csi_address if ":" in csi_address and not csi_address.startswith("/") \
        else f"unix://{csi_address}"
    return grpc.insecure_channel(target)


def driver_name(csi_address: str, timeout: float, wait: float = 300) -> str:
    """GetPluginInfo's name, retried until the driver's socket answers."""
    deadline = time.monotonic() + wait
    stub = csi_pb2_grpc.IdentityStub(_channel(csi_address))
    while True:
        try:
            return stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=timeout).name
        except grpc.RpcError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no CSI driver answers on {csi_address}: "
                                   f"{err.code().name}") from err
            log.info("waiting for the CSI driver on %s (%s)", csi_address, err.code().name)
            time.sleep(1)


class _Registration(pluginregistration_pb2_grpc.RegistrationServicer):
    def __init__(self, name: str, endpoint: str, on_refused) -> None:
        self.name, self.endpoint, self.on_refused = name, endpoint, on_refused
        self.registered = threading.Event()

    def GetInfo(self, request, context):  # noqa: N802 (gRPC method name)
        return pluginregistration_pb2.PluginInfo(type="CSIPlugin", name=self.name,
                                                 endpoint=self.endpoint,
                                                 supported_versions=CSI_VERSIONS)

    def NotifyRegistrationStatus(self, request, context):  # noqa: N802
        if request.plugin_registered:
            log.info("kubelet registered %s (endpoint %s)", self.name, self.endpoint)
            self.registered.set()
        else:
            log.error("kubelet refused the registration of %s: %s", self.name, request.error)
            self.on_refused()
        return pluginregistration_pb2.RegistrationStatusResponse()


def _serve_http(address: str, healthy) -> ThreadingHTTPServer:
    host, port = parse_host_port(address)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") != "/healthz":
                self.send_error(404)
                return
            ok, why = healthy()
            body = (b"ok" if ok else why.encode()[:512])
            self.send_response(200 if ok else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # the probe every few seconds is noise
            log.debug(fmt, *args)

    srv = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True, name="healthz").start()
    return srv


def _wait_for_signal() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _registrar_health(state: dict[str, str], refused: threading.Event) -> tuple[bool, str]:
    if refused.is_set():
        return False, "kubelet refused the registration"
    sock = state.get("sock")
    if sock is None:
        return True, ""              # waiting for the driver's socket
    if not os.path.exists(sock):
        return False, f"registration socket {sock} missing"
    return True, ""


def run_registrar(args: argparse.Namespace) -> int:
    stop = _wait_for_signal()
    refused = threading.Event()
    state: dict[str, str] = {}       # "sock" once the registration socket is served
    http = None
    if args.http_endpoint:
        # Served from the start: while the driver is still starting (a minute
        # and more in a starved node) the registrar is alive and waiting, and
        # restarting it would not bring the driver up sooner -- only a lost
        # socket or a refused registration is unhealthy.
        http = _serve_http(args.http_endpoint, lambda: _registrar_health(state, refused))
    name = driver_name(args.csi_address, args.timeout)
    sock = os.path.join(args.plugin_registration_path, f"{name}-reg.sock")
    servicer = _Registration(name, args.kubelet_registration_path,
                             lambda: (refused.set(), stop.set()))
    if os.path.exists(sock):
        os.unlink(sock)        # a previous instance's socket: kubelet must see a new one
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    state["sock"] = sock
    log.info("serving plugin registration of %s on %s", name, sock)
    stop.wait()
    server.stop(2)
    if http is not None:
        http.shutdown()
    if os.path.exists(sock):
        os.unlink(sock)
    return 1 if refused.is_set() else 0


def run_livenessprobe(args: argparse.Namespace) -> int:
    stub = csi_pb2_grpc.IdentityStub(_channel(args.csi_address))

    def healthy() -> tuple[bool, str]:
        try:
            res = stub.Probe(csi_pb2.ProbeRequest(), timeout=args.probe_timeout)
        except grpc.RpcError as err:
            return False, f"Probe failed: {err.code().name}"
        if res.HasField("ready") and not res.ready.value:
            return False, "the driver is not ready"
        return True, ""

    stop = _wait_for_signal()
    http = _serve_http(args.http_endpoint or f"0.0.0.0:{args.health_port}", healthy)
    log.info("serving /healthz for %s", args.csi_address)
    stop.wait()
    http.shutdown()
    return 0


def main(args: argparse.Namespace) -> int:
    level = logging.DEBUG if str(args.v).isdigit() and int(args.v) >= 4 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_registrar(args) if args.role == "registrar" else run_livenessprobe(args)
