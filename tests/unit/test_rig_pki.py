"""The Kubernetes rigs' certificates pass strict X.509 verification.

Python 3.13 (the driver image's) verifies with VERIFY_X509_STRICT by
default, so the controller Pod's in-cluster kubernetes client refused the
rig's apiserver certificate ("Missing Authority Key Identifier") and never
took its Lease. Checked here with the host's Python and the strict flag set.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "e2e"))

from k8s import cluster  # noqa: E402


def _handshake(tmp_path, crt, key, server_name: str, client: tuple | None = None) -> str:
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(crt, key)
    if client:
        srv.verify_mode = ssl.CERT_REQUIRED
        srv.load_verify_locations(tmp_path / "ca.crt")
        srv.verify_flags |= ssl.VERIFY_X509_STRICT
    ls = socket.create_server(("127.0.0.1", 0))
    errors: list[Exception] = []

    def serve() -> None:
        conn, _ = ls.accept()
        try:
            with srv.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"x")
        except (ssl.SSLError, OSError) as err:
            errors.append(err)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    cli.verify_flags |= ssl.VERIFY_X509_STRICT
    if client:
        cli.load_cert_chain(*client)
    with socket.create_connection(ls.getsockname()) as raw, \
            cli.wrap_socket(raw, server_hostname=server_name) as s:
        assert s.recv(1) == b"x"
        version = s.version()
    t.join(5)
    ls.close()
    assert not errors, errors
    return version


def test_apiserver_certificate_verifies_strictly_for_in_cluster_names(tmp_path):
    cluster._certs(tmp_path, ("10.0.2.2",))
    for name in ("kubernetes.default.svc", "10.0.0.1", "10.0.2.2"):
        assert _handshake(tmp_path, tmp_path / "apiserver.crt", tmp_path / "apiserver.key",
                          name, client=(tmp_path / "admin.crt", tmp_path / "admin.key"))


def test_issued_server_and_client_certificates_verify_strictly(tmp_path):
    cluster._certs(tmp_path)
    srv = cluster.client_cert(tmp_path, "agent-server", "csi-spdk-agent",
                              server_names=("csi-spdk-agent", "10.0.2.2"))
    cli = cluster.client_cert(tmp_path, "agent-client", "csi-spdk-controller")
    assert _handshake(tmp_path, *srv, "csi-spdk-agent", client=cli)
