"""Process wiring of ``csi-spdk agent``: spdk_tgt client, key store, gRPC
server, and the storage side (pools, spdk_tgt supervision, desired state).

The agent listens either on a Unix socket (same-host use, ``csi-spdk dev``;
the socket's directory permissions are the access control) or on TCP with
mutual TLS: the server certificate and key, and the CA that signs the
controller's client certificates. A TCP listener without all three is refused
at start-up: there is no plaintext network mode.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from .. import log as logsetup
from ..errors import InvalidArgument
from ..proto import agent_pb2_grpc
from ..server import GrpcServer, parse_endpoint, serve
from ..spdk.api import SpdkApi
from ..spdk.client import SpdkClient
from .keys import KeyStore
from .server import AgentServicer, NullState, State

SERVICE_NAME = "csispdk.agent.v1.Agent"
log = logging.getLogger("csi_spdk.agent")


def _read(what: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidArgument(f"agent TLS {what} {path}: {err.strerror or err}") from None


@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    client_ca_file: str

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(os.stat(f).st_mtime_ns for f in
                     (self.cert_file, self.key_file, self.client_ca_file))

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(_read("key", self.key_file), _read("certificate", self.cert_file))],
            root_certificates=_read("client CA", self.client_ca_file))

    def credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client must present a certificate signed by the CA.

        The files are read again before a new connection's handshake when
        they changed (a Secret renewed by cert-manager), without a restart;
        a half-written renewal keeps the previous certificates."""
        initial = self._configuration()
        seen = [self._mtimes()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                now = self._mtimes()
                if now == seen[0]:
                    return None
                config = self._configuration()
            except (OSError, InvalidArgument) as err:
                log.warning("agent TLS files unreadable; keeping the current ones",
                            extra={"f": {"error": str(err)}})
                return None
            seen[0] = now
            log.info("agent TLS certificates reloaded", extra={"f": {"cert": self.cert_file}})
            return config

        return grpc.dynamic_ssl_server_credentials(initial, fetch,
                                                   require_client_authentication=True)


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The TLS files from the flags; None for a Unix socket listener."""
    files = (args.tls_cert, args.tls_key, args.tls_client_ca)
    _, socket_path = parse_endpoint(args.listen)
    if socket_path:
        if any(files):
            raise InvalidArgument("--tls-* flags are for a TCP --listen address; a Unix "
                                  "socket is protected by its directory's permissions")
        return None
    if not all(files):
        raise InvalidArgument(f"--listen {args.listen} is a TCP address: the agent serves it "
                              "only with mutual TLS (--tls-cert, --tls-key, --tls-client-ca)")
    return ServerTls(*files)


def agent_server(args: argparse.Namespace, state: State | None = None) -> GrpcServer:
    """A ready-to-start gRPC server for the Agent service."""
    tls = server_tls(args)
    api = SpdkApi(SpdkClient(args.spdk_rpc, timeout=args.rpc_timeout))
    keys = KeyStore(args.state_dir, api)
    servicer = AgentServicer(api, keys, state or NullState(), default_timeout=args.rpc_timeout)
    return GrpcServer(args.listen, [
        lambda s: agent_pb2_grpc.add_AgentServicer_to_server(servicer, s),
    ], service_names=[SERVICE_NAME], credentials=tls.credentials() if tls else None,
        on_stop=[servicer.end_sessions])


def run(args: argparse.Namespace) -> int:
    """The process: the storage side (pools, spdk_tgt supervision, desired
    state and its replay, ``storage.py``) is the server's state store."""
    from .pools import PoolConfigError
    from .storage import StorageSide
    from .supervisor import MemoryCheckError

    logsetup.setup(args.log_level)
    try:
        side = StorageSide.from_args(args)
        server = agent_server(args, state=side)
        side.start()
    except (InvalidArgument, PoolConfigError, MemoryCheckError) as err:
        log.error("the storage agent cannot start", extra={"f": {
            "error": getattr(err, "message", None) or str(err)}})
        return 2
    return serve([server], args.metrics_address, side.stop)
