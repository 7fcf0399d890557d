"""Target side of NVMe/TCP: export / unexport one volume for one host.

The strategy object ControllerPublish/Unpublish use, symmetric to the node's
``initiator.py``. One subsystem per volume, everything derived from the lvol
uuid (``contract``): NQN, serial, model, one namespace whose bdev and uuid are
the lvol uuid, one TCP listener on the target's listen address, and an
allow-list of host NQNs (``allow_any_host`` false).

Idempotency: each step first reads the subsystem and only does what is
missing, so a retry after a crash between any two steps converges. SPDK's
nvmf errors are generic ("Invalid parameters", "Internal error"), so a failed
step is re-checked against the subsystem before it is reported.

Concurrency: the caller holds the volume's lock; calls for different volumes
may run in parallel (they touch different subsystems; the transport is
created at most once and a duplicate create is tolerated).
"""

from __future__ import annotations

import logging
import threading

from .. import contract
from ..errors import ResourceExhausted
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError
from .config import TargetConfig

log = logging.getLogger("csi_spdk.nvmf")

TRTYPE = "TCP"


class NvmfExporter:
    """Exports volumes of one SPDK target over NVMe/TCP."""

    def __init__(self, api: SpdkApi, target: TargetConfig) -> None:
        self.api = api
        self.target = target
        self._transport_ready = False
        self._mutex = threading.Lock()

    # --- queries -----------------------------------------------------------
    def subsystem(self, lvol_uuid: str) -> dict | None:
        return self.api.subsystem_get(contract.subsystem_nqn(lvol_uuid))

    @staticmethod
    def hosts_of(sub: dict | None) -> list[str]:
        return [h["nqn"] for h in (sub or {}).get("hosts", [])]

    def hosts(self, lvol_uuid: str) -> list[str]:
        return self.hosts_of(self.subsystem(lvol_uuid))

    def exported_hosts(self) -> dict[str, list[str]]:
        """lvol uuid -> allowed host NQNs, for every volume subsystem (one RPC)."""
        out: dict[str, list[str]] = {}
        for sub in self.api.subsystems():
            nqn = sub.get("nqn", "")
            if nqn.startswith(contract.NQN_PREFIX):
                out[nqn[len(contract.NQN_PREFIX):]] = self.hosts_of(sub)
        return out

    def publish_context(self, lvol_uuid: str, tls: bool = False) -> dict[str, str]:
        t = self.target
        return {
            contract.PC_NQN: contract.subsystem_nqn(lvol_uuid),
            contract.PC_TRTYPE: "tcp",
            contract.PC_TRADDR: t.dial,
            contract.PC_TRSVCID: str(t.tls if tls else t.port),
            contract.PC_ADRFAM: t.adrfam,
            contract.PC_NS_UUID: lvol_uuid,
            contract.PC_SERIAL: contract.serial_number(lvol_uuid),
        }

    # --- export ------------------------------------------------------------
    def _listen_address(self, tls: bool = False) -> dict:
        """auth tls: a TLS-only (secure_channel) listener on its own port."""
        port = self.target.tls if tls else self.target.port
        return SpdkApi.listen_address(self.target.listen_address, port, TRTYPE)

    def _has_listener(self, sub: dict, tls: bool = False) -> bool:
        want = self._listen_address(tls)
        return any(str(a.get("trtype", "")).upper() == TRTYPE
                   and a.get("traddr") == want["traddr"]
                   and str(a.get("trsvcid")) == want["trsvcid"]
                   for a in sub.get("listen_addresses", []))

    @staticmethod
    def _host_has_keys(sub: dict, host_nqn: str, keys: dict[str, str]) -> bool:
        entry = next((h for h in sub.get("hosts", []) if h.get("nqn") == host_nqn), {})
        return all(entry.get(k) == v for k, v in keys.items())

    @staticmethod
    def _has_namespace(sub: dict, lvol_uuid: str) -> bool:
        return any(ns.get("bdev_name") == lvol_uuid or ns.get("uuid") == lvol_uuid
                   for ns in sub.get("namespaces", []))

    def ensure_transport(self) -> None:
        with self._mutex:
            if self._transport_ready:
                return
            if not any(str(t.get("trtype", "")).upper() == TRTYPE
                       for t in self.api.transports()):
                try:
                    self.api.transport_create(TRTYPE)
                except SpdkError:
                    # "Transport type 'TCP' already exists" when racing another caller.
                    if not any(str(t.get("trtype", "")).upper() == TRTYPE
                               for t in self.api.transports()):
                        raise
            self._transport_ready = True

    def _step(self, nqn: str, done, action) -> dict | None:
        """Run ``action`` unless ``done(sub)``; on an SPDK error, re-check."""
        try:
            action()
        except SpdkError:
            sub = self.api.subsystem_get(nqn)
            if sub is None or not done(sub):
                raise
            return sub
        return None

    def export(self, lvol_uuid: str, host_nqn: str, sub: dict | None | object = ...,
               model: str = contract.MODEL_NUMBER,
               keys: dict[str, str] | None = None,
               bdev: str | None = None) -> dict[str, str]:
        """Make the volume reachable by ``host_nqn``; return the publish_context.

        ``sub`` is the subsystem as the caller just read it (None: missing),
        saving one RPC; by default it is read here. ``model`` is the model
        number a new subsystem gets (``contract.model_number``). ``keys``:
        keyring key NAMES for the host entry (``dhchap_key``,
        ``dhchap_ctrlr_key``); an entry with other names gets these
        (``nvmf_subsystem_set_keys``). ``bdev``: the bdev to export under the
        lvol's uuid instead of the lvol (target-mode encryption: controller/crypto.py)."""
        nqn = contract.subsystem_nqn(lvol_uuid)
        try:
            self.ensure_transport()
            if sub is ...:
                sub = self.api.subsystem_get(nqn)
            if sub is None:
                try:
                    self._step(nqn, lambda s: True, lambda: self.api.subsystem_create(
                        nqn, contract.serial_number(lvol_uuid), model,
                        max_namespaces=1))
                except SpdkError as err:
                    if "Unable to create subsystem" not in err.spdk_message:
                        raise
                    raise ResourceExhausted(
                        f"target {self.target.name!r} cannot export another volume: SPDK "
                        "refused a new NVMe-oF subsystem (one per published volume; "
                        "spdk_tgt allows 1023 unless started with nvmf_set_max_subsystems)"
                    ) from err
                sub = {"namespaces": [], "listen_addresses": [], "hosts": []}
            if not self._has_namespace(sub, lvol_uuid):
                self._step(nqn, lambda s: self._has_namespace(s, lvol_uuid),
                           lambda: self.api.ns_add(nqn, bdev or lvol_uuid, uuid=lvol_uuid))
            keys = keys or {}
            tls = "psk" in keys
            if not self._has_listener(sub, tls):
                self._step(nqn, lambda s: self._has_listener(s, tls),
                           lambda: self.api.listener_add(nqn, self._listen_address(tls),
                                                         secure_channel=tls))
            if host_nqn not in self.hosts_of(sub):
                self._step(nqn, lambda s: host_nqn in self.hosts_of(s),
                           lambda: self.api.host_add(nqn, host_nqn, **keys))
            elif keys and not tls and not self._host_has_keys(sub, host_nqn, keys):
                # (nvmf_get_subsystems does not show a host's psk, and set_keys
                # rotates DH-HMAC-CHAP keys only: an existing tls entry stays)
                self.api.host_set_keys(nqn, host_nqn, **keys)
        except SpdkError:
            # The target may have restarted without its transport: check again next time.
            with self._mutex:
                self._transport_ready = False
            raise
        return self.publish_context(lvol_uuid, tls)

    def hold_open(self, lvol_uuid: str, sub: dict | None) -> None:
        """The volume's subsystem with its namespace only (no listener, no host):
        SPDK then holds the lvol bdev open with I/O channels, which a QoS change
        on an unpublished volume needs (``qos.py``). ``sub`` as just read."""
        nqn = contract.subsystem_nqn(lvol_uuid)
        if sub is None:
            self._step(nqn, lambda s: True, lambda: self.api.subsystem_create(
                nqn, contract.serial_number(lvol_uuid), contract.MODEL_NUMBER,
                max_namespaces=1))
            sub = {"namespaces": []}
        if not self._has_namespace(sub, lvol_uuid):
            self._step(nqn, lambda s: self._has_namespace(s, lvol_uuid),
                       lambda: self.api.ns_add(nqn, lvol_uuid, uuid=lvol_uuid))

    def unexport(self, lvol_uuid: str, host_nqn: str) -> None:
        """Remove ``host_nqn`` from the allow-list; delete the subsystem when no
        host is left. Missing subsystem or host is success."""
        nqn = contract.subsystem_nqn(lvol_uuid)
        sub = self.api.subsystem_get(nqn)
        if sub is None:
            return
        hosts = self.hosts_of(sub)
        if host_nqn in hosts:
            self._step(nqn, lambda s: host_nqn not in self.hosts_of(s),
                       lambda: self.api.host_remove(nqn, host_nqn))
            hosts.remove(host_nqn)
        if not hosts:
            self.delete(lvol_uuid)

    def delete(self, lvol_uuid: str) -> None:
        """Delete the volume's subsystem whatever its hosts; missing is success."""
        nqn = contract.subsystem_nqn(lvol_uuid)
        try:
            self.api.subsystem_delete(nqn)
        except SpdkError:
            if self.api.subsystem_get(nqn) is not None:
                raise
        log.debug("subsystem deleted", extra={"f": {"nqn": nqn}})
