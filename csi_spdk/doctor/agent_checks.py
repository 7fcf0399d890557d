"""Checks of a storage agent as the controller reaches it (``doctor agent``).

Run where the controller runs, with its client certificate (or with the
controller's config file, every target that names an agent). For each agent,
in order, stopping at the first that cannot pass (a later one would only
repeat it):

- its TLS files: readable, the key matches the certificate, the certificate
  is valid now and not expiring within ``--expiry-warn-days``, issued by a CA
  in the CA file;
- reachable: a TCP connection (or the Unix socket) opens;
- the TLS handshake with the controller's client certificate: the agent's
  certificate chains to the CA file (a wrong CA fails here), names the
  server name the controller checks, and is not expiring;
- the agent service answers (gRPC health), and accepts our certificate;
- spdk_tgt behind it answers (``spdk_get_version`` through the agent);
- the pools: every lvstore the target is configured with is loaded;
- the pool status the agent reports (``csi_spdk_get_pools``, answered by the
  agent itself): a pool it refused (a device with a filesystem, an lvstore of
  another name) never reached spdk_tgt, so only the agent can say why.

X.509 parsing uses ``cryptography`` (the library Python's TLS tooling uses);
the handshake is the standard ``ssl`` module's, with gRPC's ALPN.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CsiError
from .report import Check, fail, ok, warn

RENEW_FIX = ("renew it: cert-manager renews by itself before renewBefore (force with "
             "`cmctl renew <certificate>`); the chart's generated certificates are re-made "
             "by deleting the Secret and running helm upgrade")


@dataclass
class AgentTarget:
    """How the controller reaches one agent (a target's ``agent:`` stanza)."""

    name: str
    address: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    lvstores: list[str] = field(default_factory=list)

    @property
    def is_unix(self) -> bool:
        return self.address.startswith("unix:")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def expected_name(self) -> str:
        return self.server_name or self.host_port[0]


def targets_from_config(path: str) -> list[AgentTarget]:
    """The targets with an agent in a controller config file (its YAML as
    docs/DESIGN.md describes it; the controller validates the rest)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"controller config {path}: {err}") from None
    out = []
    for t in raw.get("targets") or []:
        agent = t.get("agent") if isinstance(t, dict) else None
        if not isinstance(agent, dict) or not agent.get("address"):
            continue
        tls = agent.get("tls") or {}
        out.append(AgentTarget(str(t.get("name", "?")), str(agent["address"]),
                               tls.get("caFile", ""), tls.get("certFile", ""),
                               tls.get("keyFile", ""), agent.get("serverName", ""),
                               [str(x) for x in t.get("lvstores") or []]))
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _validity(cert: Any, what: str, title: str, warn_days: int) -> Check:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    left = end - _now()
    if _now() < start:
        return fail(title, f"{what} is not valid before {start:%Y-%m-%d %H:%M} UTC",
                    "check the clock of this host and of the issuer")
    if left.total_seconds() <= 0:
        return fail(title, f"{what} expired at {end:%Y-%m-%d %H:%M} UTC", RENEW_FIX)
    if left < dt.timedelta(days=warn_days):
        return warn(title, f"{what} expires in {left.days} days, at {end:%Y-%m-%d %H:%M} UTC",
                    RENEW_FIX)
    return ok(title, f"{what} valid until {end:%Y-%m-%d} ({left.days} days)")


def _names(cert: Any) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(i) for i in san.get_values_for_type(x509.IPAddress))]


def tls_files_check(t: AgentTarget, warn_days: int) -> Check:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    title = f"agent {t.name}: client certificate"
    if not (t.ca_file and t.cert_file and t.key_file):
        return fail(title, "a host:port agent needs caFile, certFile and keyFile",
                    "give tls: {caFile, certFile, keyFile} (the chart mounts the client "
                    "Secret at /etc/csi-spdk/agent-tls)")
    try:
        cas = x509.load_pem_x509_certificates(Path(t.ca_file).read_bytes())
        cert = x509.load_pem_x509_certificate(Path(t.cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(t.key_file).read_bytes(), None)
    except (OSError, ValueError, TypeError) as err:
        return fail(title, f"cannot read the TLS files: {err}",
                    "check the paths and that the Secret has ca.crt, tls.crt and tls.key")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.PEM, pub):
        return fail(title, f"{t.key_file} is not the key of {t.cert_file}",
                    "use the tls.key and tls.crt of the same Secret (a renewal half-copied?)")
    if not any(cert.issuer == ca.subject for ca in cas):
        return fail(title, f"{t.cert_file} is issued by {cert.issuer.rfc4514_string()}, which "
                           f"is not in {t.ca_file}",
                    "the agent trusts client certificates of its --tls-client-ca: issue the "
                    "controller's certificate from the same CA as the agent's")
    check = _validity(cert, f"{cert.subject.rfc4514_string()}", title, warn_days)
    return check


def reach_check(t: AgentTarget, timeout: float) -> Check:
    title = f"agent {t.name}: reachable at {t.address}"
    try:
        if t.is_unix:
            path = t.address.split(":", 1)[1].removeprefix("//")
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(timeout)
                s.connect(path)
        else:
            socket.create_connection(t.host_port, timeout=timeout).close()
    except (OSError, ValueError) as err:
        return fail(title, f"cannot connect: {err}",
                    "is the agent running (the spdkTgt DaemonSet's agent container, or "
                    "`csi-spdk agent`)? check the address and port, and that a NetworkPolicy "
                    "or firewall lets this host reach it")
    return ok(title, "connected")


def handshake_check(t: AgentTarget, warn_days: int, timeout: float) -> Check:
    """A TLS handshake as the controller makes it, with its client certificate."""
    from cryptography import x509

    title = f"agent {t.name}: TLS handshake as {t.expected_name}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=t.ca_file)
    ctx.load_cert_chain(t.cert_file, t.key_file)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(t.host_port, timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=t.expected_name) as s:
            der = s.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        peer = _peer_cert(t, timeout)
        if err.verify_code == 62 and peer is not None:       # hostname mismatch
            names = ", ".join(_names(peer)) or "no name"
            return fail(title, f"the agent's certificate names {names}, not {t.expected_name}",
                        "set the target's agent.serverName to one of those names, or add "
                        f"{t.expected_name} to the agent certificate's SANs (chart: "
                        "agent.tls.extraSANs)")
        if err.verify_code == 10 and peer is not None:       # expired
            return _validity(peer, "the agent's certificate", title, warn_days)
        return fail(title, f"the agent's certificate does not verify against {t.ca_file}: "
                           f"{err.verify_message}",
                    "caFile must be the CA that signed the agent's certificate (the ca.crt "
                    "of the agent's server Secret)")
    except (OSError, ssl.SSLError) as err:
        return fail(title, f"handshake failed: {err}",
                    "is a TLS agent listening there (not a plaintext one)?")
    return _validity(x509.load_der_x509_certificate(der), "the agent's certificate", title,
                     warn_days)


def _peer_cert(t: AgentTarget, timeout: float) -> Any:
    """The agent's certificate without verifying it (to say what is wrong)."""
    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(t.host_port, timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=t.expected_name) as s:
            der = s.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def service_checks(t: AgentTarget, timeout: float) -> Iterator[Check]:
    """The agent's gRPC service, spdk_tgt behind it, and the pools."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ..spdk.agent_client import AgentClient, ClientTls
    from ..spdk.api import SpdkApi

    tls = None if t.is_unix else ClientTls(t.ca_file, t.cert_file, t.key_file)
    title = f"agent {t.name}: service"
    try:
        client = AgentClient(t.address, tls, t.server_name, timeout=timeout, name=t.name)
    except CsiError as err:
        yield fail(title, err.message, "fix the agent's address and TLS files")
        return
    if tls is None:
        channel = grpc.insecure_channel(t.address)
    else:
        options = [("grpc.ssl_target_name_override", t.server_name)] if t.server_name else []
        channel = grpc.secure_channel(t.address, tls.credentials(), options=options)
    with client, channel:
        try:
            # the health service, over a channel authenticated as the controller's
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="csispdk.agent.v1.Agent"),
                timeout=timeout)
        except grpc.RpcError as err:
            detail = err.details() or err.code().name
            yield fail(title, f"no answer: {detail}",
                       "the agent refused this client certificate (issued by another CA than "
                       "its --tls-client-ca, or expired) or is not a csi-spdk agent; its log "
                       "says which")
            return
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            yield fail(title, f"health {status}",
                       "the agent is shutting down or starting; look at its log")
            return
        yield ok(title, "serving, our client certificate accepted")
        api = SpdkApi(client)
        title = f"agent {t.name}: spdk_tgt"
        try:
            version = api.version().get("version", "?")
            stores = {s["name"]: s for s in api.lvstores()}
        except CsiError as err:
            yield fail(title, err.message,
                       "spdk_tgt is not answering the agent on its socket: is it running "
                       "(the spdk-tgt container, or the agent's --spdk-tgt-cmd)? its log, and "
                       "the agent's metric csi_spdk_agent_spdk_tgt_up, say more")
            return
        yield ok(title, version)
        yield pools_check(t, stores)
        yield pool_status_check(t, client)


POOL_FIX = ("fix what the message names in the agent's pool file (--pools; chart: "
            "agent.pools or agent.nodePools for that node) or on the device: the agent never "
            "reformats, so wipe a device yourself (wipefs -a) only if its data is not "
            "needed, and name a pool after the lvstore its device already holds; then "
            "restart the agent (pools are attached when it or spdk_tgt starts)")


def pool_status_check(t: AgentTarget, client: Any) -> Check:
    """The agent's own account of its pools (refused ones included)."""
    title = f"agent {t.name}: pool status"
    try:
        reply = client.call("csi_spdk_get_pools")
    except CsiError as err:
        return warn(title, f"the agent does not report its pools ({err.message})",
                    "upgrade the agent (csi_spdk_get_pools is answered by agents of this "
                    "version); meanwhile its log says why a pool was refused")
    if not reply.get("configured"):
        return ok(title, "the agent has no pool file (its lvstores come from elsewhere)")
    pools = reply.get("pools") or []
    bad = [p for p in pools if not p.get("ready")]
    if bad:
        return fail(title, "; ".join(f"pool {p.get('name')} {p.get('state')}: "
                                     f"{p.get('message') or 'no reason given'}" for p in bad),
                    POOL_FIX)
    return ok(title, ", ".join(f"{p.get('name')} {p.get('state')}" for p in pools)
              or "the pool file lists no pools")


def pools_check(t: AgentTarget, stores: dict[str, dict]) -> Check:
    title = f"agent {t.name}: pools"

    def describe(name: str) -> str:
        s = stores[name]
        cs = s["cluster_size"]
        return (f"{name} {s['free_clusters'] * cs // (1 << 20)} MiB free of "
                f"{s['total_data_clusters'] * cs // (1 << 20)} MiB")

    missing = [n for n in t.lvstores if n not in stores]
    if missing:
        return fail(title, f"lvstore(s) {', '.join(missing)} not loaded (the target has: "
                           f"{', '.join(sorted(stores)) or 'none'})",
                    "list the pool in the agent's --pools file (chart: agent.pools) or create "
                    "the lvstore; the agent's log says why a pool was refused")
    if not stores:
        return warn(title, "spdk_tgt has no lvstore yet",
                    "give the agent pools (--pools; chart: agent.pools)")
    shown = t.lvstores or sorted(stores)
    return ok(title, "; ".join(describe(n) for n in shown))


def agent_checks(t: AgentTarget, warn_days: int = 14, timeout: float = 5.0) -> list[Check]:
    checks: list[Check] = []
    if not t.is_unix:
        checks.append(tls_files_check(t, warn_days))
        if checks[-1].status == "fail":
            return checks
    checks.append(reach_check(t, timeout))
    if checks[-1].status == "fail":
        return checks
    if not t.is_unix:
        checks.append(handshake_check(t, warn_days, timeout))
        if checks[-1].status == "fail":
            return checks
    checks.extend(service_checks(t, timeout))
    return checks
