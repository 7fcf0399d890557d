"""Typed wrappers for the SPDK JSON-RPC methods the driver uses.

Each wrapper names SPDK's parameters once, so the controller reads as intent
(``spdk.lvol_create(...)``) and a reviewer can check every parameter against
SPDK's docs in one file. Wrappers return SPDK's JSON as plain dicts; lookups
that the driver treats as "maybe absent" return ``None`` instead of raising.

Concurrency: stateless; safe to share between threads (the client is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .client import SpdkClient
from .errors import SpdkNotFound

MiB = 1024 * 1024


class SpdkApi:
    def __init__(self, client: SpdkClient) -> None:
        self.client = client

    def call(self, method: str, params: dict | None = None, timeout: float | None = None,
             each: Callable[[Any], Any] | None = None) -> Any:
        """``each``: the result is an array; only ``each(element)`` of the
        elements is kept (those that are not None). A client that can
        (``streams``) decodes the reply one element at a time, so a listing
        at 10,000 volumes is never held whole; others decode it, then map."""
        if each is None:
            return self.client.call(method, params, timeout=timeout)
        if getattr(self.client, "streams", False):
            return self.client.call(method, params, timeout=timeout, each=each)
        found = self.client.call(method, params, timeout=timeout)
        return [k for k in map(each, found or []) if k is not None]

    # --- intents (spdk/intents.py) ------------------------------------------
    @property
    def remote_intents(self) -> bool:
        """The client runs intents beside spdk_tgt (the storage agent)."""
        return hasattr(self.client, "intent")

    def intent(self, name: str, spec: dict) -> dict:
        """One CSI-level operation: in the agent (one round trip to it) when the
        target is reached through one, else here over the direct socket."""
        if self.remote_intents:
            return self.client.intent(name, spec)
        from . import intents
        return intents.run(self, name, spec)

    # --- framework --------------------------------------------------------
    def version(self) -> dict:
        return self.call("spdk_get_version")

    def methods(self) -> list[str]:
        return self.call("rpc_get_methods")

    # --- bdevs ------------------------------------------------------------
    def bdev_get(self, name: str) -> dict | None:
        """One bdev by name, uuid or alias; None when it does not exist."""
        try:
            found = self.call("bdev_get_bdevs", {"name": name})
        except SpdkNotFound:
            return None
        return found[0] if found else None

    def bdevs(self, each: Callable[[dict], Any] | None = None) -> list:
        """Every bdev; with ``each``, only what it keeps of each (see ``call``)."""
        if each is None:
            return self.call("bdev_get_bdevs")
        return self.call("bdev_get_bdevs", each=each)

    def malloc_create(self, name: str, size_bytes: int, block_size: int = 4096) -> str:
        return self.call("bdev_malloc_create", {
            "name": name, "num_blocks": size_bytes // block_size, "block_size": block_size})

    def iostat(self, name: str | None = None) -> dict:
        return self.call("bdev_get_iostat", {"name": name} if name else None)

    def set_qos(self, name: str, **limits: int) -> None:
        self.call("bdev_set_qos_limit", {"name": name, **limits})

    # --- lvstores ---------------------------------------------------------
    def lvstores(self, name: str | None = None) -> list[dict]:
        """All lvstores, or the one named (empty list when it is missing)."""
        try:
            return self.call("bdev_lvol_get_lvstores", {"lvs_name": name} if name else None)
        except SpdkNotFound:
            return []

    def lvstore_create(self, bdev_name: str, lvs_name: str,
                       cluster_sz: int | None = None) -> str:
        params: dict[str, Any] = {"bdev_name": bdev_name, "lvs_name": lvs_name}
        if cluster_sz:
            params["cluster_sz"] = cluster_sz
        return self.call("bdev_lvol_create_lvstore", params)

    # --- lvols ------------------------------------------------------------
    def lvols(self, lvs_name: str | None = None) -> list[dict]:
        return self.call("bdev_lvol_get_lvols", {"lvs_name": lvs_name} if lvs_name else None)

    def lvol_create(self, lvs_name: str, lvol_name: str, size_bytes: int, thin: bool,
                    clear_method: str | None = None) -> str:
        """Create an lvol; returns its uuid (also its bdev name).

        SPDK takes whole MiB; callers round sizes to clusters (>= 1 MiB) first.
        """
        params: dict[str, Any] = {
            "lvs_name": lvs_name, "lvol_name": lvol_name,
            "size_in_mib": -(-size_bytes // MiB), "thin_provision": thin,
        }
        if clear_method:
            params["clear_method"] = clear_method
        return self.call("bdev_lvol_create", params)

    def lvol_resize(self, name: str, size_bytes: int) -> None:
        self.call("bdev_lvol_resize", {"name": name, "size_in_mib": -(-size_bytes // MiB)})

    def lvol_delete(self, name: str) -> None:
        self.call("bdev_lvol_delete", {"name": name})

    def lvol_rename(self, old_name: str, new_name: str) -> None:
        """Rename; ``old_name`` is ``lvs/lvol`` or a uuid, ``new_name`` is bare."""
        self.call("bdev_lvol_rename", {"old_name": old_name, "new_name": new_name})

    def snapshot(self, lvol_name: str, snapshot_name: str) -> str:
        return self.call("bdev_lvol_snapshot",
                         {"lvol_name": lvol_name, "snapshot_name": snapshot_name})

    def clone(self, snapshot_name: str, clone_name: str) -> str:
        return self.call("bdev_lvol_clone",
                         {"snapshot_name": snapshot_name, "clone_name": clone_name})

    def inflate(self, name: str) -> None:
        self.call("bdev_lvol_inflate", {"name": name})

    def decouple_parent(self, name: str) -> None:
        self.call("bdev_lvol_decouple_parent", {"name": name})

    def set_read_only(self, name: str) -> None:
        self.call("bdev_lvol_set_read_only", {"name": name})

    # --- nvmf ---------------------------------------------------------------
    def transports(self) -> list[dict]:
        return self.call("nvmf_get_transports")

    def transport_create(self, trtype: str = "TCP", **opts: Any) -> None:
        self.call("nvmf_create_transport", {"trtype": trtype, **opts})

    def subsystem_get(self, nqn: str) -> dict | None:
        """One subsystem; None when missing (SPDK answers -19 for an unknown nqn)."""
        try:
            found = self.call("nvmf_get_subsystems", {"nqn": nqn})
        except SpdkNotFound:
            return None
        return found[0] if found else None

    def subsystems(self, each: Callable[[dict], Any] | None = None) -> list:
        """Every subsystem; with ``each``, only what it keeps of each."""
        if each is None:
            return self.call("nvmf_get_subsystems")
        return self.call("nvmf_get_subsystems", each=each)

    def subsystem_create(self, nqn: str, serial_number: str, model_number: str,
                         max_namespaces: int = 1) -> None:
        self.call("nvmf_create_subsystem", {
            "nqn": nqn, "serial_number": serial_number, "model_number": model_number,
            "allow_any_host": False, "max_namespaces": max_namespaces,
        })

    def subsystem_delete(self, nqn: str) -> None:
        self.call("nvmf_delete_subsystem", {"nqn": nqn})

    def ns_add(self, nqn: str, bdev_name: str, uuid: str | None = None,
               nsid: int | None = None) -> int:
        ns: dict[str, Any] = {"bdev_name": bdev_name}
        if uuid:
            ns["uuid"] = uuid
        if nsid:
            ns["nsid"] = nsid
        return self.call("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": ns})

    def ns_remove(self, nqn: str, nsid: int) -> None:
        self.call("nvmf_subsystem_remove_ns", {"nqn": nqn, "nsid": nsid})

    @staticmethod
    def listen_address(traddr: str, trsvcid: int | str, trtype: str = "TCP") -> dict:
        adrfam = "IPv6" if ":" in traddr else "IPv4"
        return {"trtype": trtype, "adrfam": adrfam, "traddr": traddr, "trsvcid": str(trsvcid)}

    def listener_add(self, nqn: str, address: dict, secure_channel: bool = False) -> None:
        """``secure_channel``: TLS required on this listener (SPDK does not
        combine it with DH-HMAC-CHAP on one listener)."""
        params: dict[str, Any] = {"nqn": nqn, "listen_address": address}
        if secure_channel:
            params["secure_channel"] = True
        self.call("nvmf_subsystem_add_listener", params)

    def listener_remove(self, nqn: str, address: dict) -> None:
        self.call("nvmf_subsystem_remove_listener", {"nqn": nqn, "listen_address": address})

    def host_add(self, nqn: str, host: str, **keys: str) -> None:
        """``keys``: dhchap_key / dhchap_ctrlr_key / psk = keyring key NAMES
        (not paths, whatever rpc.py's help says)."""
        self.call("nvmf_subsystem_add_host", {"nqn": nqn, "host": host, **keys})

    def host_set_keys(self, nqn: str, host: str, **keys: str) -> None:
        """Rotate a host entry's DH-HMAC-CHAP keys (key names); connected
        hosts keep their connection and use the new keys when they
        re-authenticate."""
        self.call("nvmf_subsystem_set_keys", {"nqn": nqn, "host": host, **keys})

    # --- keyring ----------------------------------------------------------
    def keyring_keys(self) -> list[dict]:
        return self.call("keyring_get_keys")

    def key_file_add(self, name: str, path: str) -> None:
        """keyring_file: ``path`` is absolute, owner-only (0600) on the target host."""
        self.call("keyring_file_add_key", {"name": name, "path": path})

    def key_file_remove(self, name: str) -> None:
        self.call("keyring_file_remove_key", {"name": name})

    def host_remove(self, nqn: str, host: str) -> None:
        self.call("nvmf_subsystem_remove_host", {"nqn": nqn, "host": host})

    def controllers(self, nqn: str) -> list[dict]:
        return self.call("nvmf_subsystem_get_controllers", {"nqn": nqn})

    # --- nvme (SSDs owned by SPDK, for topology) ---------------------------
    def nvme_controllers(self) -> list[dict]:
        return self.call("bdev_nvme_get_controllers")
