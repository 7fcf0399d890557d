"""Certificates for the agent's mTLS tests, made with ``cryptography``: a CA,
a server certificate for 127.0.0.1 / ``agent.test``, a client certificate,
and the bad ones (another CA's client certificate, an expired client and
server certificate, a server certificate for another name)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from agent_fixtures import SERVER_NAME, Cert
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi_spdk.spdk.agent_client import ClientTls

_NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


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
              expired: bool = False, not_after: dt.datetime | None = None) -> Cert:
        key = ec.generate_private_key(ec.SECP256R1())
        if expired:
            start, end = _NOW - dt.timedelta(days=10), _NOW - dt.timedelta(days=1)
        else:
            start, end = _NOW - dt.timedelta(days=1), not_after or _NOW + dt.timedelta(days=30)
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

    def client_cert(self, name: str, cn: str, not_after: dt.datetime | None = None) -> Cert:
        """Another client certificate from the CA (a renewal), valid until ``not_after``."""
        return self._leaf(name, cn, self.ca_key, self.ca_cert, not_after=not_after)

    def client_tls(self, cert: Cert | None = None, ca: Path | None = None) -> ClientTls:
        cert = cert or self.client
        return ClientTls(ca_file=str(ca or self.ca), cert_file=str(cert.cert),
                         key_file=str(cert.key))


