"""NVMe-oF target state: transports, subsystems, namespaces, listeners, hosts.

Answers and error codes follow SPDK v25.09 (mostly -32602 "Invalid
parameters"; host/psk problems -32603 "Internal error"). Every successful
change is forwarded to the ``DataPlane`` hooks.
"""

from __future__ import annotations

import errno
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .dataplane import DataPlaneLimit, HostAuth, ListenerInfo, NamespaceInfo
from .state import ENODEV, RpcError, errno_error

if TYPE_CHECKING:
    from .bdev import Bdev
    from .keyring import Key
    from .state import SimState

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
INVALID_PARAMS = RpcError(-32602, "Invalid parameters")
INTERNAL = RpcError(-32603, "Internal error")
TCP_DEFAULTS: dict[str, Any] = {
    "max_queue_depth": 128, "max_io_qpairs_per_ctrlr": 127, "in_capsule_data_size": 4096,
    "max_io_size": 131072, "io_unit_size": 131072, "max_aq_depth": 128,
    "num_shared_buffers": 511, "buf_cache_size": 4294967295, "dif_insert_or_strip": False,
    "zcopy": False, "c2h_success": True, "sock_priority": 0, "abort_timeout_sec": 1,
    "ack_timeout": 0, "data_wr_pool_size": 0,
}
_DOMAIN_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


def invalid_params() -> RpcError:
    return RpcError(INVALID_PARAMS.code, INVALID_PARAMS.message)


def internal_error() -> RpcError:
    return RpcError(INTERNAL.code, INTERNAL.message)


def nqn_is_valid(nqn: str) -> bool:
    """SPDK's NQN rules: length, ``nqn.yyyy-mm.reverse.domain:...`` or uuid form."""
    if len(nqn) > 223 or not nqn.startswith("nqn."):
        return False
    if nqn == DISCOVERY_NQN:
        return True
    uuid_prefix = "nqn.2014-08.org.nvmexpress:uuid:"
    if nqn.startswith(uuid_prefix):
        rest = nqn[len(uuid_prefix):]
        try:
            return len(rest) == 36 and bool(uuidlib.UUID(rest))
        except ValueError:
            return False
    if not re.match(r"^nqn\.\d{4}-\d{2}\.", nqn):
        return False
    domain, sep, _ = nqn[12:].partition(":")
    if not sep or not domain:
        return False
    return all(_DOMAIN_LABEL.match(label) and not label.endswith("-")
               for label in domain.split("."))


@dataclass
class Host:
    nqn: str
    dhchap_key: Key | None = None
    dhchap_ctrlr_key: Key | None = None
    psk: Key | None = None

    def auth(self) -> HostAuth:
        """The secrets behind the key names (what a real data plane enforces)."""
        def secret(key: Key | None) -> str | None:
            return key.secret() or None if key is not None else None
        return HostAuth(secret(self.dhchap_key), secret(self.dhchap_ctrlr_key), secret(self.psk))

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nqn": self.nqn}
        if self.dhchap_key is not None:
            out["dhchap_key"] = self.dhchap_key.name
        if self.dhchap_ctrlr_key is not None:
            out["dhchap_ctrlr_key"] = self.dhchap_ctrlr_key.name
        return out


@dataclass
class Namespace:
    nsid: int
    bdev: Bdev
    uuid: str
    nguid: str

    def json(self) -> dict[str, Any]:
        return {"nsid": self.nsid, "bdev_name": self.bdev.name, "name": self.bdev.name,
                "nguid": self.nguid, "uuid": self.uuid}


@dataclass
class Listener:
    trtype: str
    adrfam: str
    traddr: str
    trsvcid: str
    secure_channel: bool = False

    def address(self) -> dict[str, str]:
        return {"trtype": self.trtype, "adrfam": self.adrfam, "traddr": self.traddr,
                "trsvcid": self.trsvcid}

    def same(self, other: Listener) -> bool:
        return self.address() == other.address()


@dataclass
class Subsystem:
    nqn: str
    subtype: str = "NVMe"
    serial: str = "00000000000000000000"
    model: str = "SPDK bdev Controller"
    allow_any_host: bool = False
    max_namespaces: int = 32
    min_cntlid: int = 1
    max_cntlid: int = 65519
    ana_reporting: bool = False
    hosts: list[Host] = field(default_factory=list)          # newest first
    listeners: list[Listener] = field(default_factory=list)  # newest first
    namespaces: dict[int, Namespace] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nqn": self.nqn, "subtype": self.subtype,
                               "listen_addresses": [x.address() for x in self.listeners],
                               "allow_any_host": self.allow_any_host,
                               "hosts": [h.json() for h in self.hosts]}
        if self.subtype == "NVMe":
            out.update({"serial_number": self.serial, "model_number": self.model,
                        "max_namespaces": self.max_namespaces, "min_cntlid": self.min_cntlid,
                        "max_cntlid": self.max_cntlid,
                        "namespaces": [self.namespaces[n].json()
                                       for n in sorted(self.namespaces)]})
        return out


def _bdev_path(bdev: Bdev) -> str | None:
    base = getattr(bdev, "base", None)      # a crypto bdev: its base's file (ciphertext)
    if base is not None:
        return _bdev_path(base)
    lvol = getattr(bdev, "lvol", None)
    if lvol is not None:
        return str(lvol.path)
    return getattr(bdev, "filename", None)


DHCHAP_DIGESTS = ("sha256", "sha384", "sha512")
DHCHAP_DHGROUPS = ("null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192")


class Nvmf:
    def __init__(self, state: SimState) -> None:
        self.state = state
        self.transports: list[dict[str, Any]] = []
        self.subsystems: list[Subsystem] = [Subsystem(DISCOVERY_NQN, subtype="Discovery",
                                                      allow_any_host=True)]
        self.max_subsystems = 1024   # spdk_tgt's default (nvmf_set_max_subsystems)
        # nvmf_set_config's DH-HMAC-CHAP lists (start-up only in SPDK; the
        # simulator's --dhchap-digests/--dhchap-dhgroups); SPDK's defaults: all
        self.dhchap_digests = list(DHCHAP_DIGESTS)
        self.dhchap_dhgroups = list(DHCHAP_DHGROUPS)

    # --- lookups -----------------------------------------------------
    def by_nqn(self) -> list[Subsystem]:
        """SPDK keeps subsystems in a tree ordered by NQN (strncmp), not by age."""
        return sorted(self.subsystems, key=lambda s: s.nqn.encode())

    def get(self, nqn: str) -> Subsystem | None:
        return next((s for s in self.subsystems if s.nqn == nqn), None)

    def must(self, nqn: str) -> Subsystem:
        sub = self.get(nqn)
        if sub is None:
            raise invalid_params()
        return sub

    def ns_info(self, sub: Subsystem, ns: Namespace) -> NamespaceInfo:
        bdev = ns.bdev
        lvol = getattr(bdev, "lvol", None)
        return NamespaceInfo(nqn=sub.nqn, nsid=ns.nsid, bdev_name=bdev.name,
                             path=_bdev_path(bdev), size=bdev.size, block_size=bdev.block_size,
                             uuid=ns.uuid, nguid=ns.nguid,
                             read_only=bool(lvol is not None and lvol.read_only),
                             crypto=bdev.crypto_info() if hasattr(bdev, "crypto_info") else None)

    @staticmethod
    def listener_info(sub: Subsystem, lst: Listener) -> ListenerInfo:
        return ListenerInfo(sub.nqn, lst.trtype, lst.adrfam, lst.traddr, lst.trsvcid,
                            lst.secure_channel)

    # --- transports --------------------------------------------------
    def create_transport(self, p: dict[str, Any]) -> bool:
        trtype = str(p["trtype"]).upper()
        if trtype != "TCP":
            raise RpcError(-32602, f"Invalid transport type '{p['trtype']}'")
        if any(t["trtype"] == trtype for t in self.transports):
            raise RpcError(-32603, f"Transport type '{p['trtype']}' already exists")
        opts = {"trtype": trtype}
        for key, default in TCP_DEFAULTS.items():
            opts[key] = p.get(key, default)
        self.transports.append(opts)
        return True

    def get_transports(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        want = p.get("trtype")
        if want is not None:
            found = [dict(t) for t in self.transports if t["trtype"] == want.upper()]
            if not found:
                raise errno_error(ENODEV)
            return found
        return [dict(t) for t in self.transports]

    # --- subsystems --------------------------------------------------
    def create_subsystem(self, p: dict[str, Any]) -> bool:
        nqn = p["nqn"]
        # The discovery subsystem counts: spdk_tgt v25.09 takes 1023 more by default.
        if not nqn_is_valid(nqn) or self.get(nqn) is not None \
                or len(self.subsystems) >= self.max_subsystems:
            raise RpcError(-32603, f"Unable to create subsystem {nqn}")
        serial = p.get("serial_number", "00000000000000000000")
        model = p.get("model_number", "SPDK bdev Controller")
        if len(serial) > 20 or not serial.isascii():
            raise RpcError(-32602, f"Invalid SN {serial}")
        if len(model) > 40 or not model.isascii():
            raise RpcError(-32602, f"Invalid MN {model}")
        sub = Subsystem(nqn, serial=serial, model=model,
                        allow_any_host=bool(p.get("allow_any_host", False)),
                        max_namespaces=p.get("max_namespaces") or 32,
                        min_cntlid=p.get("min_cntlid", 1), max_cntlid=p.get("max_cntlid", 65519),
                        ana_reporting=bool(p.get("ana_reporting", False)))
        self.subsystems.append(sub)
        self.state.dataplane.subsystem_created(nqn, serial, model, sub.allow_any_host)
        return True

    def delete_subsystem(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        dp = self.state.dataplane
        for nsid in sorted(sub.namespaces):
            self._drop_ns(sub, nsid)
        for lst in list(sub.listeners):
            sub.listeners.remove(lst)
            dp.listener_removed(self.listener_info(sub, lst))
        for host in list(sub.hosts):
            self._drop_host(sub, host)
        self.subsystems.remove(sub)
        if sub.subtype == "NVMe":
            dp.subsystem_deleted(sub.nqn)
        return True

    def get_subsystems(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        if "nqn" in p:
            sub = self.get(p["nqn"])
            if sub is None:
                raise errno_error(ENODEV)
            return [sub.json()]
        return [s.json() for s in self.by_nqn()]

    def allow_any_host(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        sub.allow_any_host = bool(p["allow_any_host"])
        self.state.dataplane.allow_any_host_changed(sub.nqn, sub.allow_any_host)
        return True

    # --- namespaces --------------------------------------------------
    def add_ns(self, p: dict[str, Any]) -> int:
        sub = self.must(p["nqn"])
        ns_p = p["namespace"]
        if not isinstance(ns_p, dict) or "bdev_name" not in ns_p:
            raise invalid_params()
        bdev = self.state.find_bdev(ns_p["bdev_name"])
        if bdev is None or bdev.claim_type is not None or sub.subtype != "NVMe":
            raise invalid_params()
        nsid = ns_p.get("nsid", 0) or 0
        if nsid:
            if nsid > sub.max_namespaces or nsid in sub.namespaces:
                raise invalid_params()
        else:
            nsid = next((n for n in range(1, sub.max_namespaces + 1)
                         if n not in sub.namespaces), 0)
            if not nsid:
                raise invalid_params()
        ns_uuid = bdev.uuid
        if "uuid" in ns_p:
            try:
                ns_uuid = str(uuidlib.UUID(ns_p["uuid"]))
            except (ValueError, TypeError, AttributeError):
                raise invalid_params() from None
        nguid = bdev.uuid.replace("-", "").upper()    # from the bdev, even with a uuid
        if "nguid" in ns_p:
            raw = str(ns_p["nguid"]).replace("-", "")
            if len(raw) != 32 or not all(c in "0123456789abcdefABCDEF" for c in raw):
                raise invalid_params()
            nguid = raw.upper()
        ns = Namespace(nsid, bdev, ns_uuid, nguid)
        sub.namespaces[nsid] = ns
        bdev.claim_type = "exclusive_write"
        bdev.channel_stat.reset()
        self.state.dataplane.namespace_added(self.ns_info(sub, ns))
        return nsid

    def _drop_ns(self, sub: Subsystem, nsid: int) -> None:
        ns = sub.namespaces.pop(nsid)
        ns.bdev.claim_type = None
        self.state.dataplane.namespace_removed(sub.nqn, nsid)

    def remove_ns(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        if p["nsid"] not in sub.namespaces:
            raise invalid_params()
        self._drop_ns(sub, p["nsid"])
        return True

    def bdev_removed(self, bdev: Bdev) -> None:
        """Hot remove: a deleted bdev silently leaves its namespace."""
        for sub in self.subsystems:
            for nsid, ns in list(sub.namespaces.items()):
                if ns.bdev is bdev:
                    self._drop_ns(sub, nsid)

    def bdev_resized(self, bdev: Bdev) -> None:
        for sub in self.subsystems:
            for ns in sub.namespaces.values():
                if ns.bdev is bdev:
                    self.state.dataplane.namespace_resized(self.ns_info(sub, ns))

    # --- listeners ---------------------------------------------------
    def _listener(self, p: dict[str, Any]) -> Listener:
        la = p.get("listen_address")
        if not isinstance(la, dict):
            raise invalid_params()
        trtype = str(la.get("trtype", "")).upper()
        adrfam = la.get("adrfam", "IPv4")
        traddr, trsvcid = la.get("traddr"), la.get("trsvcid", "")
        if trtype != "TCP" or not isinstance(traddr, str) or not isinstance(trsvcid, str):
            raise invalid_params()
        if adrfam.lower() not in ("ipv4", "ipv6"):
            raise invalid_params()
        adrfam = "IPv4" if adrfam.lower() == "ipv4" else "IPv6"
        if not trsvcid.isdigit() or not 0 < int(trsvcid) < 65536:
            raise invalid_params()
        return Listener(trtype, adrfam, traddr, trsvcid, bool(p.get("secure_channel", False)))

    def add_listener(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        lst = self._listener(p)
        if lst.secure_channel and sub.allow_any_host:
            raise RpcError(-32603, "Cannot establish secure channel, when 'allow_any_host' "
                                   "is set")
        if not any(t["trtype"] == lst.trtype for t in self.transports):
            raise invalid_params()
        if any(x.same(lst) for x in sub.listeners):
            raise invalid_params()
        sub.listeners.insert(0, lst)
        self.state.dataplane.listener_added(self.listener_info(sub, lst))
        return True

    def remove_listener(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        lst = self._listener(p)
        found = next((x for x in sub.listeners if x.same(lst)), None)
        if found is None:
            raise invalid_params()
        sub.listeners.remove(found)
        self.state.dataplane.listener_removed(self.listener_info(sub, found))
        return True

    def get_listeners(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        sub = self.must(p["nqn"])
        return [{"address": x.address()} for x in sub.listeners]

    # --- hosts -------------------------------------------------------
    def _keys(self, p: dict[str, Any]) -> tuple[Key | None, Key | None, Key | None]:
        keyring = self.state.keyring
        dh = dhc = psk = None
        if "dhchap_key" in p:
            dh = keyring.get(p["dhchap_key"])       # the format is checked at connect
            if dh is None:
                raise invalid_params()
        if "dhchap_ctrlr_key" in p:
            dhc = keyring.get(p["dhchap_ctrlr_key"])
            if dhc is None:
                raise invalid_params()
            if dh is None:
                raise internal_error()
        if "psk" in p:
            if not isinstance(p["psk"], str):      # decoded by the transport: -32603
                raise internal_error()
            psk = keyring.get(p["psk"])
            if psk is None or not psk.secret().startswith("NVMeTLSkey-1:"):
                raise internal_error()
        return dh, dhc, psk

    def add_host(self, p: dict[str, Any]) -> bool:
        """SPDK's order: subsystem and keyring look-ups (-32602), then the host
        NQN, a duplicate, a ctrlr key without a host key and the psk (-32603)."""
        sub = self.must(p["nqn"])
        keyring = self.state.keyring
        for name in ("dhchap_key", "dhchap_ctrlr_key"):
            if name in p and keyring.get(p[name]) is None:
                raise invalid_params()
        host_nqn = p["host"]
        if not nqn_is_valid(host_nqn) or any(h.nqn == host_nqn for h in sub.hosts):
            raise internal_error()
        dh, dhc, psk = self._keys(p)
        self._check_dataplane(sub.nqn, host_nqn, Host(host_nqn, dh, dhc, psk).auth())
        keyring = self.state.keyring
        host = Host(host_nqn, *(keyring.acquire(k.name) if k else None for k in (dh, dhc, psk)))
        sub.hosts.insert(0, host)
        # keys before the allow-list entry: never allowed without them
        if host.auth():
            self.state.dataplane.host_auth_changed(sub.nqn, host_nqn, host.auth())
        self.state.dataplane.host_added(sub.nqn, host_nqn)
        return True

    def _check_dataplane(self, nqn: str, host_nqn: str, auth: HostAuth) -> None:
        """Before anything changes: a data plane that cannot mirror these keys
        (kernel nvmet: one key pair per host NQN) refuses with EPERM and says
        why, instead of the simulator diverging from what it enforces."""
        try:
            self.state.dataplane.check_host_auth(nqn, host_nqn, auth)
        except DataPlaneLimit as err:
            raise RpcError(-errno.EPERM, f"simulator data plane: {err}") from None

    def _drop_host(self, sub: Subsystem, host: Host) -> None:
        sub.hosts.remove(host)
        for key in (host.dhchap_key, host.dhchap_ctrlr_key, host.psk):
            self.state.keyring.put(key)
        self.state.dataplane.host_removed(sub.nqn, host.nqn)

    def remove_host(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        host = next((h for h in sub.hosts if h.nqn == p["host"]), None)
        if host is None:
            raise internal_error()
        self._drop_host(sub, host)
        return True

    def set_keys(self, p: dict[str, Any]) -> bool:
        sub = self.must(p["nqn"])
        host = next((h for h in sub.hosts if h.nqn == p["host"]), None)
        if host is None:
            raise invalid_params()
        dh, dhc, _ = self._keys({k: v for k, v in p.items() if k != "psk"})
        self._check_dataplane(sub.nqn, host.nqn, Host(host.nqn, dh, dhc, host.psk).auth())
        keyring = self.state.keyring
        keyring.put(host.dhchap_key)
        keyring.put(host.dhchap_ctrlr_key)
        host.dhchap_key = keyring.acquire(dh.name) if dh else None
        host.dhchap_ctrlr_key = keyring.acquire(dhc.name) if dhc else None
        self.state.dataplane.host_auth_changed(sub.nqn, host.nqn, host.auth())
        return True

    # --- config dump ------------------------------------------------
    def config(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"method": "nvmf_set_config", "params": {
                "discovery_filter": "match_any",
                "admin_cmd_passthru": {"identify_ctrlr": False, "vendor_specific": False},
                "dhchap_digests": list(self.dhchap_digests),
                "dhchap_dhgroups": list(self.dhchap_dhgroups)}},
            {"method": "nvmf_set_max_subsystems", "params": {"max_subsystems": 1024}},
            {"method": "nvmf_set_crdt", "params": {"crdt1": 0, "crdt2": 0, "crdt3": 0}},
        ]
        out += [{"method": "nvmf_create_transport", "params": dict(t)} for t in self.transports]
        for sub in self.by_nqn():
            if sub.subtype != "NVMe":
                continue
            out.append({"method": "nvmf_create_subsystem", "params": {
                "nqn": sub.nqn, "allow_any_host": sub.allow_any_host,
                "serial_number": sub.serial, "model_number": sub.model,
                "max_namespaces": sub.max_namespaces, "min_cntlid": sub.min_cntlid,
                "max_cntlid": sub.max_cntlid, "ana_reporting": sub.ana_reporting}})
            for host in sub.hosts:
                params: dict[str, Any] = {"nqn": sub.nqn, "host": host.nqn}
                if host.dhchap_key:
                    params["dhchap_key"] = host.dhchap_key.name
                if host.dhchap_ctrlr_key:
                    params["dhchap_ctrlr_key"] = host.dhchap_ctrlr_key.name
                if host.psk:
                    params["psk"] = host.psk.name
                out.append({"method": "nvmf_subsystem_add_host", "params": params})
            for lst in sub.listeners:
                out.append({"method": "nvmf_subsystem_add_listener", "params": {
                    "nqn": sub.nqn, "listen_address": lst.address(),
                    "secure_channel": lst.secure_channel}})
            for nsid in sorted(sub.namespaces):
                ns = sub.namespaces[nsid]
                out.append({"method": "nvmf_subsystem_add_ns", "params": {
                    "nqn": sub.nqn, "namespace": {
                        "bdev_name": ns.bdev.name, "nsid": nsid, "uuid": ns.uuid,
                        "nguid": ns.nguid, "no_auto_visible": False}}})
        return out
