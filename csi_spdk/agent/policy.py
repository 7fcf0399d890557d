"""What the agent lets through to spdk_tgt: an allow list with parameter checks.

The controller's SPDK calls (``spdk/api.py``, used by ``controller/``) are the
only ones that pass, and each mutating one is checked against the driver's
contract (``contract.py``), whoever asks:

- an lvol that is deleted, resized, renamed, snapshotted, cloned from, or
  exported as a namespace must carry one of ``DRIVER_PREFIXES`` (a uuid is
  resolved to the lvol's name with bdev_get_bdevs first; an ``lvs/name``
  alias names the lvol itself), and a name the call creates (new lvol,
  snapshot, clone, rename target) must carry one too;
- a subsystem must have the driver's NQN prefix, be created closed
  (``allow_any_host`` false), and a namespace may only be the lvol whose uuid
  the NQN names (one subsystem per volume, ``contract.subsystem_nqn``), so no
  volume can be exported under another volume's host allow-list.

Everything else is ``Refused`` (PERMISSION_DENIED). When the lvol to check
does not exist the call is forwarded anyway: SPDK then answers with its own
"No such device", which is what the controller expects to see.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .. import contract
from ..errors import InvalidArgument, PermissionDenied

Lookup = Callable[[str], "dict | None"]   # bdev_get_bdevs by name/uuid/alias, None if absent

# Calls that only read. spdk_tgt's answers to them change nothing.
READS = frozenset({
    "spdk_get_version", "rpc_get_methods", "bdev_get_bdevs", "bdev_get_iostat",
    "bdev_lvol_get_lvstores", "bdev_lvol_get_lvols", "nvmf_get_transports",
    "nvmf_get_subsystems", "keyring_get_keys", "framework_get_config",
})

# The READS whose result is an array of objects that grows with the volumes:
# the agent passes them on element by element (agent/server.py), never
# holding the whole listing as Python objects.
LISTINGS = frozenset({
    "bdev_get_bdevs", "bdev_lvol_get_lvstores", "bdev_lvol_get_lvols", "nvmf_get_subsystems",
    "keyring_get_keys",
})

# Read-only calls the agent answers itself (never forwarded to spdk_tgt): its
# own view, which spdk_tgt cannot give (a pool it refused never reached SPDK).
AGENT_READS = frozenset({"csi_spdk_get_pools"})


class Refused(PermissionDenied):
    """A call the agent does not forward; ``reason`` is a bounded metric label."""

    def __init__(self, method: str, reason: str, why: str) -> None:
        super().__init__(f"refused {method}: {why}")
        self.method = method
        self.reason = reason


def _str(method: str, params: dict, key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{method}: parameter {key!r} must be a non-empty string")
    return value


def lvol_name_of(bdev: dict) -> str | None:
    """The lvol's own name (``name`` of ``lvs/name``), None for a non-lvol bdev."""
    if not (bdev.get("driver_specific") or {}).get("lvol"):
        return None
    aliases = bdev.get("aliases") or []
    if not aliases or "/" not in aliases[0]:
        return None
    return aliases[0].partition("/")[2]


class Checks:
    """Per-method parameter checks; ``lookup`` resolves a bdev reference."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    # --- building blocks ---------------------------------------------------------
    def driver_lvol_ref(self, method: str, ref: str) -> None:
        """``ref`` (uuid or ``lvs/name``) of an lvol-only method names a driver lvol.

        An alias carries the lvol's name itself (SPDK resolves ``lvs/name`` to
        exactly that lvol), so only a uuid costs a bdev_get_bdevs."""
        if "/" in ref:
            self._check_name(method, ref.partition("/")[2])
        else:
            self.driver_lvol(method, ref)

    @staticmethod
    def _check_name(method: str, name: str) -> None:
        if not contract.is_driver_lvol(name):
            raise Refused(method, "foreign_lvol",
                          f"lvol {name!r} was not created by csi-spdk (its name lacks the "
                          f"driver's prefixes {', '.join(contract.DRIVER_PREFIXES)})")

    def driver_lvol(self, method: str, ref: str) -> dict | None:
        """The bdev ``ref`` names when it is the driver's lvol; None when absent."""
        bdev = self.lookup(ref)
        if bdev is None:
            return None
        name = lvol_name_of(bdev)
        if name is None:
            raise Refused(method, "not_lvol", f"bdev {ref!r} is not an lvol")
        self._check_name(method, name)
        return bdev

    @staticmethod
    def new_name(method: str, name: str) -> None:
        if "/" in name or not contract.is_driver_lvol(name):
            raise Refused(method, "foreign_name",
                          f"new lvol name {name!r} lacks the driver's prefixes "
                          f"({', '.join(contract.DRIVER_PREFIXES)})")

    @staticmethod
    def nqn(method: str, params: dict) -> str:
        nqn = _str(method, params, "nqn")
        if not nqn.startswith(contract.NQN_PREFIX):
            raise Refused(method, "foreign_nqn",
                          f"subsystem {nqn!r} is not a csi-spdk subsystem (its NQN lacks "
                          f"{contract.NQN_PREFIX!r})")
        return nqn

    # --- lvols ------------------------------------------------------------------
    def bdev_lvol_create(self, m: str, p: dict) -> None:
        self.new_name(m, _str(m, p, "lvol_name"))

    def bdev_lvol_delete(self, m: str, p: dict) -> None:
        self.driver_lvol_ref(m, _str(m, p, "name"))

    bdev_lvol_resize = bdev_lvol_delete
    # the controller re-inflates a thick volume after SPDK turned it thin at a
    # snapshot (docs/DESIGN.md "Capacity"): the driver's own lvols only
    bdev_lvol_inflate = bdev_lvol_delete

    def bdev_set_qos_limit(self, m: str, p: dict) -> None:
        self.driver_lvol(m, _str(m, p, "name"))   # any bdev type: always resolve

    def bdev_lvol_rename(self, m: str, p: dict) -> None:
        self.new_name(m, _str(m, p, "new_name"))
        self.driver_lvol_ref(m, _str(m, p, "old_name"))

    def bdev_lvol_snapshot(self, m: str, p: dict) -> None:
        self.new_name(m, _str(m, p, "snapshot_name"))
        self.driver_lvol_ref(m, _str(m, p, "lvol_name"))

    def bdev_lvol_clone(self, m: str, p: dict) -> None:
        self.new_name(m, _str(m, p, "clone_name"))
        self.driver_lvol_ref(m, _str(m, p, "snapshot_name"))

    # --- nvmf -------------------------------------------------------------------
    @staticmethod
    def nvmf_create_transport(m: str, p: dict) -> None:
        if str(p.get("trtype", "")).upper() != "TCP":
            raise Refused(m, "transport", "only the TCP transport is used by csi-spdk")

    def nvmf_create_subsystem(self, m: str, p: dict) -> None:
        self.nqn(m, p)
        if p.get("allow_any_host"):
            raise Refused(m, "allow_any_host",
                          "a csi-spdk subsystem admits only the hosts it publishes to")

    def nvmf_subsystem_add_ns(self, m: str, p: dict) -> None:
        nqn = self.nqn(m, p)
        ns = p.get("namespace")
        if not isinstance(ns, dict):
            raise InvalidArgument(f"{m}: parameter 'namespace' must be an object")
        name = _str(m, ns, "bdev_name")
        if name.startswith(contract.CRYPTO_PREFIX):   # a volume's crypto bdev
            if not _CRYPTO_BDEV.match(name) or \
                    nqn != contract.subsystem_nqn(contract.lvol_of_crypto_bdev(name) or ""):
                raise Refused(m, "wrong_subsystem", f"crypto bdev {name!r} may only be "
                              "exported in its volume's own subsystem")
            return
        bdev = self.driver_lvol(m, name)
        if bdev is not None and nqn != contract.subsystem_nqn(bdev.get("uuid") or ""):
            raise Refused(m, "wrong_subsystem",
                          f"lvol {bdev.get('uuid')!r} may only be exported in its own "
                          f"subsystem {contract.subsystem_nqn(bdev.get('uuid') or '')!r}")

    # --- target-mode encryption (controller/crypto.py) ------------------------------
    @staticmethod
    def _crypto_name(m: str, name: str, pattern: re.Pattern[str], what: str) -> None:
        if not pattern.match(name):
            raise Refused(m, "foreign_crypto", f"{what} {name[:80]!r} is not a csi-spdk "
                          f"one ({contract.CRYPTO_PREFIX}<lvol uuid>...)")

    def accel_crypto_key_create(self, m: str, p: dict) -> None:
        self._crypto_name(m, _str(m, p, "name"), _CRYPTO_KEY, "accel crypto key")
        if p.get("cipher") != "AES_XTS" or p.get("tweak_mode", "SIMPLE_LBA") != "SIMPLE_LBA":
            raise Refused(m, "cipher", "csi-spdk uses AES_XTS with SIMPLE_LBA only")

    def accel_crypto_key_destroy(self, m: str, p: dict) -> None:
        self._crypto_name(m, _str(m, p, "key_name"), _CRYPTO_KEY, "accel crypto key")

    def bdev_crypto_create(self, m: str, p: dict) -> None:
        name = _str(m, p, "name")
        self._crypto_name(m, name, _CRYPTO_BDEV, "crypto bdev")
        self._crypto_name(m, _str(m, p, "key_name"), _CRYPTO_KEY, "accel crypto key")
        base = _str(m, p, "base_bdev_name")
        if contract.crypto_bdev_name(base) != name or \
                not p["key_name"].startswith(name + "-"):
            raise Refused(m, "wrong_base", f"crypto bdev {name!r} may only be stacked on "
                          "its own lvol with its own key")
        if set(p) - {"name", "base_bdev_name", "key_name"}:
            raise Refused(m, "inline_key", "keys go through accel_crypto_key_create")
        self.driver_lvol(m, base)

    def bdev_crypto_delete(self, m: str, p: dict) -> None:
        self._crypto_name(m, _str(m, p, "name"), _CRYPTO_BDEV, "crypto bdev")

    def nvmf_subsystem(self, m: str, p: dict) -> None:
        """Calls on an existing subsystem: it must be the driver's."""
        self.nqn(m, p)


_UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CRYPTO_BDEV = re.compile(rf"^{re.escape(contract.CRYPTO_PREFIX)}{_UUID_RE}$")
_CRYPTO_KEY = re.compile(rf"^{re.escape(contract.CRYPTO_PREFIX)}{_UUID_RE}-[0-9a-f]{{8}}$")
_NQN_ONLY = ("nvmf_delete_subsystem", "nvmf_subsystem_add_listener",
             "nvmf_subsystem_remove_listener", "nvmf_subsystem_add_host",
             "nvmf_subsystem_remove_host", "nvmf_subsystem_remove_ns",
             "nvmf_subsystem_set_keys",
             "nvmf_subsystem_get_controllers")
_OWN = ("bdev_lvol_create", "bdev_lvol_delete", "bdev_lvol_resize", "bdev_lvol_inflate",
        "bdev_set_qos_limit",
        "bdev_lvol_rename", "bdev_lvol_snapshot", "bdev_lvol_clone", "nvmf_create_transport",
        "nvmf_create_subsystem", "nvmf_subsystem_add_ns",
        "accel_crypto_key_create", "accel_crypto_key_destroy", "bdev_crypto_create",
        "bdev_crypto_delete")
CHECKED = frozenset(_OWN + _NQN_ONLY)
ALLOWED = READS | AGENT_READS | CHECKED
# What changes spdk_tgt's state: the calls the desired-state store hears about.
MUTATING = CHECKED - {"nvmf_subsystem_get_controllers"}


def check(method: str, params: Any, lookup: Lookup) -> None:
    """Raise ``Refused`` (or InvalidArgument) unless ``method(params)`` may pass."""
    if method not in ALLOWED:
        raise Refused(method, "not_allowed", "not one of the SPDK methods csi-spdk uses "
                      "(the allow list: csi_spdk/agent/policy.py)")
    if method in READS or method in AGENT_READS:
        if params is not None and not isinstance(params, dict):
            raise InvalidArgument(f"{method}: params must be an object")
        if method == "framework_get_config" and (params or {}).get("name") != "nvmf":
            # the nvmf subsystem only (its DH-HMAC-CHAP lists); not keyring (paths)
            raise Refused(method, "wrong_subsystem", "only name 'nvmf' may be read")
        return
    if not isinstance(params, dict):
        raise InvalidArgument(f"{method}: params must be an object")
    checks = Checks(lookup)
    fn = getattr(checks, method) if method in _OWN else checks.nvmf_subsystem
    fn(method, params)


def metric_label(method: str) -> str:
    """``method`` when allow-listed, else "other" (bounded label values)."""
    return method if method in ALLOWED else "other"
