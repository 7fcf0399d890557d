"""Test material for the storage agent: certificates and a running agent.

``Pki`` makes a CA, a server certificate for 127.0.0.1 / ``agent.test``, a
client certificate, and the bad ones the mTLS tests need (another CA's
client certificate, an expired client and server certificate, a server
certificate for another name), with the ``cryptography`` package.
``start_agent`` runs the agent's gRPC server in this process over a given
SPDK socket, on a Unix socket or on 127.0.0.1 with mutual TLS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi_spdk.agent.main import agent_server
from csi_spdk.spdk.agent_client import AgentClient, ClientTls

SERVER_NAME = "agent.test"
_NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Cert:
    cert: Path
    key: Path


class Pki:
    """Certificates written as PEM files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert, self.ca = self._ca("test-ca")
        other_key, other_cert, self.other_ca = self._ca("other-ca")
        self.server = self._leaf("server", "agent", self.ca_key, self.ca_cert, server=True,
                                 names=[SERVER_NAME], ips=["127.0.0.1"])
        self.client = self._leaf("client", "csi-spdk-controller", self.ca_key, self.ca_cert)
        self.other_client = self._leaf("other-client", "intruder", other_key, other_cert)
        self.expired_client = self._leaf("expired-client", "csi-spdk-controller", self.ca_key,
                                         self.ca_cert, expired=True)
        self.expired_server = self._leaf("expired-server", "agent", self.ca_key, self.ca_cert,
                                         server=True, names=[SERVER_NAME], ips=["127.0.0.1"],
                                         expired=True)
        self.wrong_name_server = self._leaf("wrong-server", "agent", self.ca_key, self.ca_cert,
                                            server=True, names=["elsewhere.test"],
                                            ips=["192.0.2.1"])

    def _write_key(self, name: str, key) -> Path:
        path = self.root / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    def _write_cert(self, name: str, cert: x509.Certificate) -> Path:
        path = self.root / f"{name}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def _ca(self, cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_NOW - dt.timedelta(days=1))
                .not_valid_after(_NOW + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert, self._write_cert(cn, cert)

    def _leaf(self, name: str, cn: str, ca_key, ca_cert, server: bool = False,
              names: list[str] | None = None, ips: list[str] | None = None,
              expired: bool = False) -> Cert:
        key = ec.generate_private_key(ec.SECP256R1())
        if expired:
            start, end = _NOW - dt.timedelta(days=10), _NOW - dt.timedelta(days=1)
        else:
            start, end = _NOW - dt.timedelta(days=1), _NOW + dt.timedelta(days=30)
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if names or ips:
            alt = [x509.DNSName(n) for n in names or []] + \
                  [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Cert(self._write_cert(name, cert), self._write_key(name, key))

    def client_tls(self, cert: Cert | None = None, ca: Path | None = None) -> ClientTls:
        cert = cert or self.client
        return ClientTls(ca_file=str(ca or self.ca), cert_file=str(cert.cert),
                         key_file=str(cert.key))


def agent_args(spdk_rpc: str, state_dir: Path, listen: str, server: Cert | None = None,
               client_ca: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        listen=listen, spdk_rpc=spdk_rpc, state_dir=str(state_dir),
        tls_cert=str(server.cert) if server else "", tls_key=str(server.key) if server else "",
        tls_client_ca=str(client_ca) if client_ca else "", rpc_timeout=30.0,
        metrics_address="", log_level="debug")


class RunningAgent:
    """An in-process agent; ``address`` is what a client dials."""

    def __init__(self, args: argparse.Namespace, state=None) -> None:
        self.args = args
        self.server = agent_server(args, state)
        self.server.start()
        self.address = args.listen if args.listen.startswith("unix:") \
            else f"127.0.0.1:{self.server.port}"

    def client(self, tls: ClientTls | None = None, server_name: str = "",
               timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.address, tls, server_name, timeout=timeout)

    def stop(self) -> None:
        self.server.stop(grace=0.5)


def start_agent(spdk_rpc: str, state_dir: Path, listen: str, server: Cert | None = None,
                client_ca: Path | None = None, state=None) -> RunningAgent:
    return RunningAgent(agent_args(spdk_rpc, state_dir, listen, server, client_ca), state)


class AgentEnv:
    """SPDK (simulator or CSI_SPDK_TEST_RPC) with a fresh lvstore, direct access
    (``raw``) for assertions, and an agent on a Unix socket (``api``)."""

    def __init__(self, spdk_rpc: str, tmp: Path, lvs_mib: int = 64) -> None:
        import uuid

        from csi_spdk.spdk.api import SpdkApi
        from csi_spdk.spdk.client import SpdkClient

        self.tmp = tmp
        self.rpc = spdk_rpc
        self.suffix = uuid.uuid4().hex[:8]
        self.raw = SpdkApi(SpdkClient(spdk_rpc, timeout=30))
        self.malloc = f"agenttest{self.suffix}"
        self.lvs = f"agentlvs{self.suffix}"
        self.raw.malloc_create(self.malloc, lvs_mib << 20)
        self.raw.lvstore_create(self.malloc, self.lvs, cluster_sz=1 << 20)
        self.agent = start_agent(spdk_rpc, tmp / "agent-state", f"unix://{tmp}/agent.sock")
        self.client = self.agent.client()
        self.api = SpdkApi(self.client)

    def close(self) -> None:
        import contextlib

        from csi_spdk import contract
        from csi_spdk.spdk.errors import SpdkError

        self.client.close()
        self.agent.stop()
        for sub in self.raw.subsystems():
            if sub["nqn"].startswith(contract.NQN_PREFIX) and self.suffix in sub["nqn"]:
                with contextlib.suppress(SpdkError):
                    self.raw.subsystem_delete(sub["nqn"])
        for _ in range(5):
            lvols = self.raw.lvols(self.lvs)
            if not lvols:
                break
            for lv in lvols:
                with contextlib.suppress(SpdkError):
                    self.raw.subsystem_delete(contract.subsystem_nqn(lv["uuid"]))
                with contextlib.suppress(SpdkError):
                    self.raw.lvol_delete(lv["uuid"])
        for method, params in (("bdev_lvol_delete_lvstore", {"lvs_name": self.lvs}),
                               ("bdev_malloc_delete", {"name": self.malloc})):
            with contextlib.suppress(SpdkError):
                self.raw.call(method, params)
        self.raw.client.close()
