"""gRPC server plumbing shared by controller and node: endpoint parsing,
health checking, Prometheus endpoint, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import InvalidArgument

log = logging.getLogger("csi_spdk.server")


def parse_endpoint(endpoint: str) -> tuple[str, str | None]:
    """Return (grpc bind address, unix socket path or None).

    Accepts ``unix:///abs/path``, ``unix://rel/path``, ``unix:path``,
    ``tcp://host:port`` and ``host:port``.
    """
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise InvalidArgument(f"endpoint {endpoint!r} has no socket path")
        return f"unix:{path}", path
    if endpoint.startswith("tcp://"):
        return endpoint[len("tcp://"):], None
    if ":" in endpoint:
        return endpoint, None
    raise InvalidArgument(
        f"endpoint {endpoint!r} is neither unix:///path nor host:port"
    )


def parse_host_port(address: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise InvalidArgument(f"address {address!r} is not HOST:PORT")
    return (host.strip("[]") or default_host), int(port)


class GrpcServer:
    """A gRPC server with the standard health service and server reflection.

    ``register`` callbacks add servicers (``add_XServicer_to_server``); the
    health service reports SERVING for "" and every named service until
    ``stop`` flips it to NOT_SERVING before draining in-flight calls.
    ``credentials`` (``grpc.ssl_server_credentials``) serve TLS instead of
    plaintext (the agent's TCP port). ``on_stop`` callbacks run before the
    drain (the agent ends its Session streams there).
    """

    def __init__(self, endpoint: str, register: Iterable[Callable[[grpc.Server], None]],
                 service_names: Iterable[str] = (), max_workers: int = 64,
                 credentials: grpc.ServerCredentials | None = None,
                 on_stop: Iterable[Callable[[], None]] = ()) -> None:
        self.address, self.socket_path = parse_endpoint(endpoint)
        self.on_stop = list(on_stop)
        self.credentials = credentials
        self.port = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        for add in register:
            add(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = ["", *service_names]
        # Server reflection: `grpcurl -plaintext -unix <sock> list` (and
        # describe/call) works without the .proto file.
        reflection.enable_server_reflection([
            *service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME], self.server)

    def start(self) -> None:
        if self.socket_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.socket_path)), exist_ok=True)
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)  # stale socket from a previous run
        if self.credentials is not None:
            port = self.server.add_secure_port(self.address, self.credentials)
        else:
            port = self.server.add_insecure_port(self.address)
        self.port = port
        if not self.socket_path and port == 0:
            raise InvalidArgument(f"cannot listen on {self.address}")
        self.server.start()
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"f": {"endpoint": self.address}})

    def stop(self, grace: float = 10.0) -> None:
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for hook in self.on_stop:        # e.g. end long-lived streams so the grace
            hook()                       # period is not always spent waiting on them
        self.server.stop(grace).wait()
        if self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        log.info("stopped", extra={"f": {"endpoint": self.address}})


def start_metrics(address: str | None) -> None:
    """Serve Prometheus metrics on HOST:PORT (``None`` or "" disables it)."""
    if not address:
        return
    from prometheus_client import start_http_server  # here: the kubelet helpers never serve it

    host, port = parse_host_port(address)
    start_http_server(port, addr=host)
    log.info("metrics", extra={"f": {"address": f"{host}:{port}"}})


def wait_for_signal() -> int:
    """Block until SIGTERM or SIGINT; return the signal number."""
    got = threading.Event()
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        got.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not got.wait(0.5):
        pass
    return received[0]


# How long a process may take to exit after SIGTERM/SIGINT: the server's grace
# period (10 s) plus cleanup; the agent's is the longest (it stops spdk_tgt:
# up to 15 s each for its supervisor thread, SIGTERM and SIGKILL).
SHUTDOWN_DEADLINE = 60.0


def bounded_shutdown(deadline: float = SHUTDOWN_DEADLINE) -> None:
    """From now on the process ends within ``deadline`` seconds: if it is still
    alive then (a handler or worker thread stuck in a call; the interpreter
    joins pool threads at exit), every thread's stack goes to stderr and it
    exits with status 1, so a hang is reported, not waited on forever."""
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.dump_traceback_later(deadline, exit=True)   # (stderr must be a file)


def serve(servers: list[GrpcServer], metrics_address: str,
          cleanup: Callable[[], None] = lambda: None) -> int:
    """Start ``servers`` (and metrics), block until SIGTERM/SIGINT, stop them
    (bounded: ``bounded_shutdown``)."""
    try:
        start_metrics(metrics_address)
        for server in servers:
            server.start()
        signum = wait_for_signal()
        log.info("shutting down", extra={"f": {"signal": signum}})
        bounded_shutdown()
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
        cleanup()
    return 0
