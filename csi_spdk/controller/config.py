"""The controller's config file: load and validate (format in docs/DESIGN.md).

``load(path)`` reads YAML or JSON (JSON is YAML) and returns an immutable
``Config``; every problem is reported at start-up as a ``ConfigError`` naming
the file, the offending key and what would be accepted, so a bad ConfigMap
fails the controller pod loudly instead of failing CreateVolume later.

Optional keys beyond DESIGN.md: ``defaultVolumeSize`` (bytes, used when a
CreateVolume has no required_bytes; default 1 GiB).

A target is reached either through its storage agent (``agent:``, mutual TLS
for ``host:port``; the only way to a remote target) or, on the same host,
straight through spdk_tgt's socket (``rpc: unix:///...``). ``rpc: host:port``
is refused: spdk_tgt serves JSON-RPC on a Unix socket only, and whatever
bridge would put it on the network lets anyone who reaches the port delete
every lvol.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import contract
from ..errors import InvalidArgument
from ..spdk.agent_client import AgentClient, ClientTls
from ..spdk.api import SpdkApi
from ..spdk.client import DEFAULT_CONNECTIONS, DEFAULT_TIMEOUT, SpdkClient, parse_address

GiB = 1024 ** 3
DEFAULT_VOLUME_SIZE = 1 * GiB
DEFAULT_OVERCOMMIT = 1.0
DEFAULT_PORT = 4420


class ConfigError(InvalidArgument, ValueError):
    """The config file is unusable; the message says where and why (an
    InvalidArgument so the command line prints it as one line)."""


@dataclass(frozen=True)
class AgentConfig:
    """How the controller reaches a target's storage agent."""

    address: str                       # host:port (mutual TLS) or unix:///path
    server_name: str = ""              # name the agent's certificate must carry
    tls: ClientTls | None = None


@dataclass(frozen=True)
class TargetConfig:
    """One SPDK target: where to reach its RPC and where nodes dial NVMe/TCP."""

    name: str
    rpc: str                           # the agent's address, or spdk_tgt's local socket
    listen_address: str
    port: int = DEFAULT_PORT
    tls_port: int = 0          # the TLS (secure_channel) listener of auth: tls; 0 = port + 1
    dial_address: str = ""
    rpc_timeout: float = DEFAULT_TIMEOUT
    rpc_connections: int = DEFAULT_CONNECTIONS   # SPDK calls in flight (direct socket)
    lvstores: tuple[str, ...] = ()   # empty: every lvstore of the target
    node: str = ""
    topology: dict[str, str] = field(default_factory=dict)
    agent: AgentConfig | None = None

    @property
    def dial(self) -> str:
        return self.dial_address or self.listen_address

    @property
    def tls(self) -> int:
        """SPDK does not combine in-band auth with TLS on one listener."""
        return self.tls_port or self.port + 1

    @property
    def adrfam(self) -> str:
        return "ipv6" if ":" in self.dial else "ipv4"

    def segment(self) -> dict[str, str]:
        """The topology constraint of volumes on this target: its configured
        labels only. NVMe/TCP reaches a target from any node, so neither the
        target's name nor the node hosting it restricts where a volume can be
        used (the hosting node only ranks placement, see placement.py); an
        empty segment means "accessible from every node"."""
        return dict(self.topology)

    def make_api(self) -> SpdkApi:
        """The target's API: through its agent, or its local spdk_tgt socket.

        Unreadable TLS files are a ConfigError naming the target and file."""
        if self.agent is None:
            return SpdkApi(SpdkClient(self.rpc, timeout=self.rpc_timeout,
                                      pool_size=self.rpc_connections))
        try:
            return SpdkApi(AgentClient(self.agent.address, self.agent.tls,
                                       self.agent.server_name, timeout=self.rpc_timeout,
                                       name=self.name))
        except InvalidArgument as err:
            raise ConfigError(f"targets[{self.name}].agent: {err.message}") from None


@dataclass(frozen=True)
class AuthConfig:
    """``auth:`` of the config file (data-path authentication, controller/auth.py)."""

    # same-host key custody: the key files of targets on this host, one
    # subdirectory per target (0700 directories, 0600 files)
    key_dir: str = "/var/lib/csi-spdk/keys"
    # the namespace of the volume Secrets ("" = the controller's own)
    secret_namespace: str = ""
    # dev/tests only: one key pair for every volume instead of a Secret each
    static_secrets_file: str = ""
    # the auth of volumes whose StorageClass has no ``auth`` parameter
    default_mode: str = contract.AUTH_DHCHAP


@dataclass(frozen=True)
class EncryptionConfig:
    """``encryption:`` of the config file (controller/encryption.py)."""

    # dev/tests: per-volume key files here instead of Kubernetes Secrets
    key_dir: str = ""


@dataclass(frozen=True)
class Config:
    targets: tuple[TargetConfig, ...]
    thin_overcommit_ratio: float = DEFAULT_OVERCOMMIT
    default_volume_size: int = DEFAULT_VOLUME_SIZE
    # Node ids ControllerPublishVolume accepts; None = any. Kubernetes only
    # publishes to nodes it knows, so the chart leaves it unset; `dev` sets it
    # so that publishing to a node that does not exist is NOT_FOUND.
    nodes: frozenset[str] | None = None
    auth: AuthConfig = field(default_factory=lambda: AuthConfig())
    encryption: EncryptionConfig = field(default_factory=lambda: EncryptionConfig())

    def target(self, name: str) -> TargetConfig | None:
        for t in self.targets:
            if t.name == name:
                return t
        return None

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]


_TOP_KEYS = {"targets", "thinOvercommitRatio", "defaultVolumeSize", "nodes", "auth",
             "encryption"}
_AUTH_KEYS = {"keyDir", "secretNamespace", "staticSecretsFile", "defaultMode"}
_TARGET_KEYS = {"name", "rpc", "agent", "rpcTimeout", "rpcConnections", "nvmf", "lvstores", "node",
                "topology"}
_NVMF_KEYS = {"listenAddress", "port", "dialAddress", "tlsPort"}
_AGENT_KEYS = {"address", "serverName", "tls"}
_TLS_KEYS = {"caFile", "certFile", "keyFile"}


def _unknown(where: str, got: dict, allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r} (accepted: "
                          f"{', '.join(sorted(allowed))})")


def _address(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty IP address or host name")
    host = value.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part and len(part) < 64 for part in host.split(".")) or " " in host:
            raise ConfigError(f"{where}: {value!r} is not an IP address or host name") from None
    return host


def _number(where: str, value: Any, lo: float, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: must be a{'n integer' if integer else ' number'}, "
                          f"got {value!r}")
    if value < lo:
        raise ConfigError(f"{where}: must be >= {lo}, got {value!r}")
    return value


def _target(where: str, raw: Any) -> TargetConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _unknown(where, raw, _TARGET_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not contract.valid_target_name(name):
        raise ConfigError(f"{where}.name: {name!r} must be a DNS label (lower-case letters, "
                          "digits and '-', at most 63 characters)")
    where = f"targets[{name}]"
    agent = _agent(f"{where}.agent", raw["agent"]) if "agent" in raw else None
    if agent is not None:
        if "rpc" in raw:
            raise ConfigError(f"{where}: give either 'agent' or 'rpc', not both")
        rpc = agent.address
    else:
        rpc = _local_rpc(f"{where}.rpc", raw.get("rpc"))
    timeout = float(_number(f"{where}.rpcTimeout", raw.get("rpcTimeout", DEFAULT_TIMEOUT), 0.1))
    connections = int(_number(f"{where}.rpcConnections",
                              raw.get("rpcConnections", DEFAULT_CONNECTIONS), 1, integer=True))
    nvmf = raw.get("nvmf")
    if not isinstance(nvmf, dict):
        raise ConfigError(f"{where}.nvmf: required mapping with listenAddress and port")
    _unknown(f"{where}.nvmf", nvmf, _NVMF_KEYS)
    listen = _address(f"{where}.nvmf.listenAddress", nvmf.get("listenAddress"))
    port = _number(f"{where}.nvmf.port", nvmf.get("port", DEFAULT_PORT), 1, integer=True)
    if port > 65535:
        raise ConfigError(f"{where}.nvmf.port: must be <= 65535, got {port}")
    tls_port = _number(f"{where}.nvmf.tlsPort", nvmf.get("tlsPort", min(port + 1, 65535)), 1,
                       integer=True)
    if tls_port > 65535 or tls_port == port:
        raise ConfigError(f"{where}.nvmf.tlsPort: must be <= 65535 and differ from port, "
                          f"got {tls_port}")
    dial = nvmf.get("dialAddress")
    dial = _address(f"{where}.nvmf.dialAddress", dial) if dial is not None else ""
    lvstores = raw.get("lvstores", [])
    if lvstores is None:
        lvstores = []
    if not isinstance(lvstores, list) or not all(isinstance(x, str) and x for x in lvstores):
        raise ConfigError(f"{where}.lvstores: must be a list of lvstore names")
    if len(set(lvstores)) != len(lvstores):
        raise ConfigError(f"{where}.lvstores: duplicate lvstore name")
    node = raw.get("node", "") or ""
    if not isinstance(node, str):
        raise ConfigError(f"{where}.node: must be a Kubernetes node name")
    topology = raw.get("topology", {}) or {}
    if not isinstance(topology, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str | int | bool)
            for k, v in topology.items()):
        raise ConfigError(f"{where}.topology: must map label keys to string values")
    topology = {k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in topology.items()}
    if contract.TOPOLOGY_NODE_KEY in topology:
        raise ConfigError(f"{where}.topology: {contract.TOPOLOGY_NODE_KEY!r} is set by the "
                          "driver (use 'node' to name the node hosting the target)")
    return TargetConfig(name=name, rpc=rpc, listen_address=listen, port=int(port),
                        tls_port=int(tls_port),
                        dial_address=dial, rpc_timeout=timeout, rpc_connections=connections,
                        lvstores=tuple(lvstores),
                        node=node, topology=topology, agent=agent)


_USE_AGENT = ("reach a remote target through its storage agent: agent: {address: HOST:PORT, "
              "tls: {caFile, certFile, keyFile}} (docs/DESIGN.md, 'The agent')")


def _local_rpc(where: str, rpc: Any) -> str:
    """spdk_tgt's own socket on this host (unix:///path or /path)."""
    if not isinstance(rpc, str) or not rpc:
        raise ConfigError(f"{where}: required: unix:///path of a local spdk_tgt, or "
                          f"{_USE_AGENT}")
    try:
        family, _ = parse_address(rpc)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}; {_USE_AGENT}") from None
    if family != socket.AF_UNIX:
        raise ConfigError(f"{where}: {rpc!r} would reach spdk_tgt over the network without "
                          f"authentication (spdk_tgt serves JSON-RPC on a Unix socket only); "
                          f"{_USE_AGENT}")
    return rpc


def _agent(where: str, raw: Any) -> AgentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with address (and tls for host:port)")
    _unknown(where, raw, _AGENT_KEYS)
    address = raw.get("address")
    if not isinstance(address, str) or not address:
        raise ConfigError(f"{where}.address: required (HOST:PORT of the agent, or "
                          "unix:///path on the same host)")
    server_name = raw.get("serverName", "") or ""
    if not isinstance(server_name, str):
        raise ConfigError(f"{where}.serverName: must be the name in the agent's certificate")
    tls_raw = raw.get("tls")
    if address.startswith("unix:"):
        if tls_raw is not None or server_name:
            raise ConfigError(f"{where}: a unix:// agent is on this host; tls and serverName "
                              "are for a HOST:PORT agent")
        return AgentConfig(address=address)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host.strip("[]"):
        raise ConfigError(f"{where}.address: {address!r} is neither HOST:PORT nor "
                          "unix:///path")
    _address(f"{where}.address", host)
    if not isinstance(tls_raw, dict):
        raise ConfigError(f"{where}.tls: required for {address} (the agent accepts only "
                          "mutually authenticated TLS): caFile, certFile, keyFile")
    _unknown(f"{where}.tls", tls_raw, _TLS_KEYS)
    files = {}
    for key in sorted(_TLS_KEYS):
        value = tls_raw.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.tls.{key}: required (a PEM file path)")
        files[key] = value
    return AgentConfig(address=address, server_name=server_name,
                       tls=ClientTls(ca_file=files["caFile"], cert_file=files["certFile"],
                                     key_file=files["keyFile"]))


def parse(data: Any, source: str = "config") -> Config:
    """Validate an already-decoded config document."""
    try:
        return _parse(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _parse(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping with a 'targets' list")
    _unknown("top level", data, _TOP_KEYS)
    raw_targets = data.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ConfigError("'targets' must be a non-empty list of SPDK targets")
    targets = tuple(_target(f"targets[{i}]", t) for i, t in enumerate(raw_targets))
    names = [t.name for t in targets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"target name {dup[0]!r} is used twice; names must be unique")
    ratio = float(_number("thinOvercommitRatio",
                          data.get("thinOvercommitRatio", DEFAULT_OVERCOMMIT), 0))
    if ratio <= 0:
        raise ConfigError("thinOvercommitRatio: must be > 0 (1.0 = no overcommit)")
    default_size = _number("defaultVolumeSize", data.get("defaultVolumeSize",
                                                         DEFAULT_VOLUME_SIZE), 1, integer=True)
    nodes = data.get("nodes")
    if nodes is not None and (not isinstance(nodes, list)
                              or not all(isinstance(n, str) and n for n in nodes)):
        raise ConfigError("nodes: must be a list of node ids (or absent to accept any)")
    return Config(targets=targets, thin_overcommit_ratio=ratio,
                  default_volume_size=int(default_size),
                  nodes=frozenset(nodes) if nodes is not None else None,
                  auth=_auth(data.get("auth") or {}),
                  encryption=_encryption(data.get("encryption") or {}))


def _encryption(raw: Any) -> EncryptionConfig:
    if not isinstance(raw, dict):
        raise ConfigError("encryption: must be a mapping")
    _unknown("encryption", raw, {"keyDir"})
    key_dir = raw.get("keyDir", "")
    if not isinstance(key_dir, str) or (key_dir and not key_dir.startswith("/")):
        raise ConfigError(f"encryption.keyDir: must be an absolute path, got {key_dir!r}")
    return EncryptionConfig(key_dir=key_dir)


def _auth(raw: Any) -> AuthConfig:
    if not isinstance(raw, dict):
        raise ConfigError("auth: must be a mapping")
    _unknown("auth", raw, _AUTH_KEYS)
    for key in _AUTH_KEYS:
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"auth.{key}: must be a string")
    key_dir = raw.get("keyDir", AuthConfig.key_dir)
    if not key_dir.startswith("/"):
        raise ConfigError(f"auth.keyDir: must be an absolute path, got {key_dir!r}")
    mode = raw.get("defaultMode", contract.AUTH_DHCHAP)
    if mode not in (contract.AUTH_DHCHAP, contract.AUTH_NONE):
        raise ConfigError(f"auth.defaultMode: must be dhchap or none, got {mode!r}")
    return AuthConfig(key_dir=key_dir, secret_namespace=raw.get("secretNamespace", ""),
                      static_secrets_file=raw.get("staticSecretsFile", ""),
                      default_mode=mode)


def load(path: str | Path) -> Config:
    """Read and validate the config file; raise ConfigError with a clear reason."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML/JSON: {err}") from None
    return parse(data, str(path))
