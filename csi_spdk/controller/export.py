"""Target side of NVMe/TCP: export / unexport one volume for one host.

The strategy object ControllerPublish/Unpublish use, symmetric to the node's
``initiator.py``. One subsystem per volume, everything derived from the lvol
uuid (``contract``): NQN, serial, model, one namespace whose bdev and uuid are
the lvol uuid, one TCP listener on the target's listen address, and an
allow-list of host NQNs (``allow_any_host`` false).

Export, unexport and delete are intents (``spdk/intents.py``): run in the
storage agent when the target has one, else here; their round trips and
their idempotency (only what is missing is done, a failed step is re-checked
against the subsystem, so a retry after a crash or a lost reply converges)
are documented there.

Concurrency: the caller holds the volume's lock; calls for different volumes
may run in parallel (they touch different subsystems; the transport is
created at most once and a duplicate create is tolerated).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from .. import contract
from ..errors import ResourceExhausted
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError
from ..spdk.intents import IntentError, has_namespace
from . import crypto
from .config import TargetConfig

log = logging.getLogger("csi_spdk.nvmf")

TRTYPE = "TCP"


@dataclass
class ExportSpec:
    """One ControllerPublishVolume's export, as the service decided it."""

    lvol_uuid: str
    host: str
    legacy: str = ""           # the node's older host NQN form (not another host)
    model: str = contract.MODEL_NUMBER   # a new subsystem's model number
    signature: str = ""        # this publish's capability + readonly signature
    hint: str | None = None    # the signature remembered for a second host
    single_node: bool = False
    keys: dict[str, str] | None = None   # keyring key NAMES for the host entry
    bdev: str | None = None    # the bdev to export instead of the lvol (target-mode crypto)


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

    def exported_hosts(self, only: set[str] | None = None) -> dict[str, list[str]]:
        """lvol uuid -> allowed host NQNs, for every volume subsystem (one RPC;
        ``only``: just these uuids, so a page keeps what it shows)."""
        def one(sub: dict) -> tuple[str, list[str]] | None:
            nqn = sub.get("nqn", "")
            uuid = nqn[len(contract.NQN_PREFIX):]
            if nqn.startswith(contract.NQN_PREFIX) and (only is None or uuid in only):
                return uuid, self.hosts_of(sub)
            return None
        return dict(self.api.subsystems(each=one))   # (decoded one subsystem at a time)

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

    def export(self, lvol_uuid: str, host_nqn: str, **options: Any) -> dict[str, str]:
        """Make the volume reachable by the spec's host; return the publish_context.

        One intent (``spdk/intents.export``): in the agent when the target has
        one (one round trip), else here; 2 SPDK rounds for a new export. The
        CSI decisions come back as ``IntentError`` reasons, mapped here and in
        the service to their codes. ``options``: the other ``ExportSpec`` fields."""
        spec = ExportSpec(lvol_uuid, host_nqn, **options)
        uuid = spec.lvol_uuid
        keys = spec.keys or {}
        tls = "psk" in keys
        try:
            self.ensure_transport()
            self.api.intent("export", {
                "uuid": uuid, "bdev": spec.bdev or uuid, "host": spec.host,
                "legacy": spec.legacy, "model": spec.model, "signature": spec.signature,
                "hint": spec.hint or "", "single_node": spec.single_node, "keys": keys,
                "listen": self._listen_address(tls), "secure_channel": tls})
        except IntentError as err:
            if err.reason == "exhausted":
                raise ResourceExhausted(
                    f"target {self.target.name!r} cannot export another volume: SPDK "
                    "refused a new NVMe-oF subsystem (one per published volume; "
                    "spdk_tgt allows 1023 unless started with nvmf_set_max_subsystems)"
                ) from None
            raise
        except SpdkError:
            # The target may have restarted without its transport: check again next time.
            with self._mutex:
                self._transport_ready = False
            raise
        return self.publish_context(uuid, tls)

    def hold_open(self, lvol_uuid: str, sub: dict | None) -> str:
        """The volume's subsystem with its namespace only (no listener, no host):
        SPDK then holds the lvol bdev open with I/O channels, which a QoS change
        on an unpublished volume needs (``qos.py``). ``sub`` as just read.

        A target-mode volume whose crypto bdev is stacked is held through that
        bdev (it claims the lvol, so SPDK would refuse the lvol itself; its
        I/O channels open the lvol's): never the lvol in clear next to it.
        Returns the bdev the hold opens (the crypto bdev's name when stacked:
        releasing the hold then unstacks it, ``qos.py``)."""
        nqn = contract.subsystem_nqn(lvol_uuid)
        bdev = crypto.bdev_of(self.api, lvol_uuid) or lvol_uuid
        if sub is None:
            self._step(nqn, lambda s: True, lambda: self.api.subsystem_create(
                nqn, contract.serial_number(lvol_uuid), contract.MODEL_NUMBER,
                max_namespaces=1))
            sub = {"namespaces": []}
        if not has_namespace(sub, lvol_uuid):
            self._step(nqn, lambda s: has_namespace(s, lvol_uuid),
                       lambda: self.api.ns_add(nqn, bdev, uuid=lvol_uuid))
        return bdev

    def withdraw(self, lvol_uuid: str, hosts: str | list[str]) -> tuple[bool, bool | None]:
        """Remove ``hosts`` from the allow-list; delete the subsystem when no
        host is left. Missing subsystem or host is success. Returns (the
        subsystem is gone, whether it exported a crypto bdev: None when
        unknown; ``intents.stacked``); one intent: 2 SPDK rounds."""
        hosts = [hosts] if isinstance(hosts, str) else list(hosts)
        got = self.api.intent("unexport", {"uuid": lvol_uuid, "hosts": hosts})
        return bool(got["gone"]), got.get("stacked")   # an older agent: None

    def unexport(self, lvol_uuid: str, hosts: str | list[str]) -> bool:
        """``withdraw``: True when the subsystem is gone."""
        return self.withdraw(lvol_uuid, hosts)[0]

    def delete(self, lvol_uuid: str) -> bool | None:
        """Delete the volume's subsystem whatever its hosts; missing is success.
        Returns ``intents.stacked`` (None: unknown, the subsystem was not read)."""
        got = self.api.intent("unexport", {"uuid": lvol_uuid, "hosts": [], "all": True})
        log.debug("subsystem deleted",
                  extra={"f": {"nqn": contract.subsystem_nqn(lvol_uuid)}})
        return got.get("stacked")
