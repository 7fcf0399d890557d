"""The agent's record of the exports spdk_tgt should have, and their replay.

spdk_tgt keeps NVMe-oF transports, subsystems, namespaces, listeners, hosts,
keyring entries and QoS limits in memory only: after it restarts they are gone
while the lvols (on disk) come back. The agent therefore records every
successful mutating call it forwarded and, after a restart, replays the
record onto the fresh target, so connected hosts reconnect within their
controller-loss timeout.

On disk the record is a snapshot plus an append-only journal
(``journal.py``): each change is one small fsync'd record of the entries it
touched, acknowledged only once durable, and the whole state is rewritten
only now and then (compaction), so a change costs the same at 10,000 exports
as at one. Mode 0600 in a 0700 directory, locked against a second agent; it
holds key *names* and key file *paths* only, never key material.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import atomicfile
from ..locks import SharedExclusive
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError, SpdkExists
from . import crypto_state, packed
from .journal import Journal, Op, StateError, section

log = logging.getLogger("csi_spdk.agent.state")

QOS_KEYS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")
RECORDED = frozenset({
    "nvmf_create_transport", "nvmf_create_subsystem", "nvmf_delete_subsystem",
    "nvmf_subsystem_add_ns", "nvmf_subsystem_remove_ns",
    "nvmf_subsystem_add_listener", "nvmf_subsystem_remove_listener",
    "nvmf_subsystem_add_host", "nvmf_subsystem_remove_host", "nvmf_subsystem_set_keys",
    "nvmf_subsystem_allow_any_host",
    "keyring_file_add_key", "keyring_file_remove_key",
    "bdev_set_qos_limit", "bdev_lvol_delete",
}) | crypto_state.METHODS


__all__ = ["DesiredState", "StateError", "RECORDED"]


def _empty() -> dict[str, Any]:
    return packed.empty()


def _listener_key(addr: dict[str, Any]) -> tuple[str, str, str]:
    return (str(addr.get("trtype", "")).upper(), str(addr.get("traddr", "")),
            str(addr.get("trsvcid", "")))


def _as_applied(key: str, value: int) -> int:
    """SPDK rounds an IOPS limit up to a multiple of 1000 (``bdev_set_qos_limit``)."""
    return -(-value // 1000) * 1000 if key == "rw_ios_per_sec" else value


def _without(params: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in keys}


class DesiredState:
    """The desired exports, persisted at ``path`` (snapshot) and its journal.

    Concurrency: ``record``, ``snapshot`` and ``replay`` may be called from any
    thread; one lock orders the changes and the journal appends, so the disk
    always holds a prefix of the recorded calls. ``replay`` holds the lock
    while it runs: calls recorded meanwhile wait and are not lost. A change
    is two steps (SPDK, then ``record``): whoever makes one holds
    ``changes.shared()`` around both, and ``replay`` holds
    ``changes.exclusive()``, so it never sees SPDK changed but the record not
    (it would undo an unexport's host removal). One
    process writes a state directory: a second one is refused (``flock``),
    since its compaction would detach the first one's journal.
    ``read_only=True`` loads without writing or locking (reports, doctor).
    Idempotency: recording the same call twice gives the same state;
    ``replay`` creates only what is missing, so a second run changes nothing.
    """

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False,
                 compact_min_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self.changes = SharedExclusive()
        self._batch = threading.local()
        self._pending: list[Op] = []          # ops of a failed append, retried first
        self._lock_fd: int | None = None
        self.journal = Journal(self.path, compact_min_bytes)
        if read_only:
            self._data: dict[str, Any] = self.journal.read(_empty())
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self._take_lock()
        atomicfile.remove_stale_temps(self.path.parent)
        try:
            self._data = self.journal.load(_empty())
        except BaseException:
            self.close()
            raise
        packed.release_freed_heap()    # the file's text and the compaction's chunks

    def _take_lock(self) -> None:
        lock = self.path.with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"desired state {self.path} is in use by another process "
                             f"(it holds {lock}): one storage agent per state directory") \
                from None
        self._lock_fd = fd

    def close(self) -> None:
        """Close the journal and let another process open the directory."""
        with self._lock:
            self.journal.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # --- recording ---------------------------------------------------------------
    def record(self, method: str, params: dict[str, Any] | None,
               result: Any = None) -> bool:
        """Note a forwarded call that succeeded; True when the record changed.

        Returns once the change is durable (one journal record), or, inside
        ``batch``, once it is in memory (durable when the batch ends).
        ``result`` is the call's reply: for ``nvmf_subsystem_add_ns`` without an
        explicit nsid it is the nsid SPDK chose, recorded so replay gives the
        namespace the same nsid. Methods that change no export are ignored.
        """
        if method not in RECORDED:
            return False
        if self.read_only:
            raise StateError(f"desired state {self.path} was opened read-only")
        p = dict(params or {})
        with self._lock:
            touched = self._touches(method, p)
            before = [self._dump(sec, key) for sec, key in touched]
            try:
                if method in crypto_state.METHODS:
                    # material goes to a 0600 file; the record keeps name and path
                    crypto_state.record(self._data, self.path, method, p)
                else:
                    getattr(self, "_on_" + method)(p, result)
            finally:
                packed.settle(self._data)       # the entries it changed, packed again
            changed = [t for t, b in zip(touched, before, strict=True) if self._dump(*t) != b]
            if not changed:
                return False
            if getattr(self._batch, "depth", 0):
                self._batch.touched.update(dict.fromkeys(changed))  # written at its end
            else:
                self._append([self._op(sec, key) for sec, key in changed])
            return True

    def _touches(self, method: str, p: dict[str, Any]) -> list[tuple[str, Any]]:
        """The entries (section, key) ``method`` may change: what a record
        compares and journals, so a change costs no copy of the whole state."""
        if method == "nvmf_create_transport":
            return [("transports", str(p.get("trtype", "TCP")).upper())]
        if method.startswith("keyring_"):
            return [("keys", p.get("name"))]
        if method == "bdev_set_qos_limit":
            return [("qos", p.get("name"))]
        if method == "bdev_lvol_delete":
            bdevs = section(self._data, "crypto.bdevs")
            return [("qos", p.get("name"))] + [
                ("crypto.bdevs", n) for n, b in bdevs.items()
                if b.get("base_bdev_name") == p.get("name")]
        if method in ("accel_crypto_key_create", "accel_crypto_key_destroy"):
            return [("crypto.keys", p.get("name", p.get("key_name")))]
        if method in ("bdev_crypto_create", "bdev_crypto_delete"):
            return [("crypto.bdevs", p.get("name"))]
        return [("subsystems", p.get("nqn"))]

    def _dump(self, sec: str, key: Any) -> bytes:
        entries = section(self._data, sec)
        return entries.raw(key) if key in entries else b""

    def _op(self, sec: str, key: Any) -> Op:
        entries = section(self._data, sec)
        return ["set", sec, key, entries.value(key)] if key in entries else ["del", sec, key]

    def _append(self, ops: list[Op]) -> None:
        """One durable journal record (under the lock); compact when due.

        A failed append (disk full, I/O error) raises, so the call is not
        acknowledged; its ops stay pending and go first into the next record,
        so the disk catches up with what SPDK applied."""
        ops = self._pending + ops
        try:
            self.journal.append(ops)
        except OSError:
            self._pending = ops
            raise
        self._pending = []
        if self.journal.wants_compaction():
            try:
                self.journal.compact(self._data)
            except OSError as err:     # the journal still holds everything: try later
                log.warning("desired state: compaction failed (%s); the journal keeps "
                            "growing until it succeeds", err)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Record this thread's calls in memory and append one journal record
        at the end (one intent: one durable write instead of one per SPDK call).
        Other threads' records are written as usual."""
        depth = getattr(self._batch, "depth", 0)
        self._batch.depth = depth + 1
        if not depth:
            self._batch.touched = {}
        try:
            yield
        finally:
            self._batch.depth = depth
            if not depth and self._batch.touched:
                touched, self._batch.touched = self._batch.touched, {}
                with self._lock:
                    self._append([self._op(sec, key) for sec, key in touched])

    # --- what an intent leaves, whichever of its calls it had to make -----------------
    def settle_export(self, spec: dict[str, Any]) -> None:
        """After a successful export intent: the record holds the export it
        made, even where SPDK already had a part and no call was recorded (a
        retry after the agent died between SPDK applying a call and the write)."""
        from .. import contract
        uuid, nqn = spec["uuid"], contract.subsystem_nqn(spec["uuid"])
        with self._lock:
            if self._sub(nqn) is None:
                self.record("nvmf_create_subsystem", {
                    "nqn": nqn, "serial_number": contract.serial_number(uuid),
                    "model_number": spec["model"], "allow_any_host": False,
                    "max_namespaces": 1})
            sub = self._sub(nqn) or {"namespaces": {}}
            bdev = spec.get("bdev") or uuid
            if not any(ns["namespace"].get("bdev_name") == bdev
                       for ns in sub["namespaces"].values()):
                self.record("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {
                    "bdev_name": bdev, "uuid": uuid}})
            listener: dict[str, Any] = {"nqn": nqn, "listen_address": spec["listen"]}
            if spec.get("secure_channel"):
                listener["secure_channel"] = True
            self.record("nvmf_subsystem_add_listener", listener)
            if spec["host"] not in (self._sub(nqn) or {}).get("hosts", {}):
                self.record("nvmf_subsystem_add_host", {"nqn": nqn, "host": spec["host"],
                                                        **(spec.get("keys") or {})})

    def settle_unexport(self, spec: dict[str, Any], gone: bool) -> None:
        """After a successful unexport intent: the record allows no host the
        intent removed (a replay must never re-admit one)."""
        from .. import contract
        nqn = contract.subsystem_nqn(spec["uuid"])
        if gone:
            self.record("nvmf_delete_subsystem", {"nqn": nqn})
            return
        for host in spec.get("hosts", []):
            self.record("nvmf_subsystem_remove_host", {"nqn": nqn, "host": host})

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the record as plain dicts (for reports and tests)."""
        with self._lock:
            return packed.plain(self._data)

    def _sub(self, nqn: str) -> dict[str, Any] | None:
        return self._data["subsystems"].get(nqn)

    def _on_nvmf_create_transport(self, p: dict[str, Any], _r: Any) -> None:
        self._data["transports"][str(p.get("trtype", "TCP")).upper()] = p

    def _on_nvmf_create_subsystem(self, p: dict[str, Any], _r: Any) -> None:
        nqn = p["nqn"]
        self._data["subsystems"][nqn] = {
            "params": p, "allow_any_host": bool(p.get("allow_any_host", False)),
            "namespaces": {}, "listeners": [], "hosts": {}}

    def _on_nvmf_delete_subsystem(self, p: dict[str, Any], _r: Any) -> None:
        self._data["subsystems"].pop(p["nqn"], None)

    def _on_nvmf_subsystem_allow_any_host(self, p: dict[str, Any], _r: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is not None:
            sub["allow_any_host"] = bool(p.get("allow_any_host"))

    def _on_nvmf_subsystem_add_ns(self, p: dict[str, Any], result: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is None:
            return
        ns = dict(p["namespace"])
        if not ns.get("nsid") and isinstance(result, int) and not isinstance(result, bool):
            ns["nsid"] = result
        extra = _without(p, "nqn", "namespace")
        # Without the reply the nsid SPDK chose is unknown: keyed by bdev, replayed
        # without an nsid (SPDK picks the lowest free one again).
        key = str(ns["nsid"]) if ns.get("nsid") else f"auto:{ns.get('bdev_name', '')}"
        sub["namespaces"][key] = {"namespace": ns, **extra}

    def _on_nvmf_subsystem_remove_ns(self, p: dict[str, Any], _r: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is None:
            return
        if sub["namespaces"].pop(str(p["nsid"]), None) is not None:
            return
        auto = [k for k in sub["namespaces"] if k.startswith("auto:")]
        if len(auto) == 1:
            del sub["namespaces"][auto[0]]
        elif auto:
            log.warning("desired state: cannot tell which of %d namespaces of %s without a "
                        "recorded nsid is nsid %s; keeping them (pass the add_ns reply to "
                        "record())", len(auto), p["nqn"], p["nsid"])

    def _on_nvmf_subsystem_add_listener(self, p: dict[str, Any], _r: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is None:
            return
        key = _listener_key(p["listen_address"])
        sub["listeners"] = [x for x in sub["listeners"]
                            if _listener_key(x["listen_address"]) != key]
        sub["listeners"].append(_without(p, "nqn"))

    def _on_nvmf_subsystem_remove_listener(self, p: dict[str, Any], _r: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is not None:
            key = _listener_key(p["listen_address"])
            sub["listeners"] = [x for x in sub["listeners"]
                                if _listener_key(x["listen_address"]) != key]

    def _on_nvmf_subsystem_add_host(self, p: dict[str, Any], _r: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is not None:
            sub["hosts"][p["host"]] = _without(p, "nqn")

    def _on_nvmf_subsystem_set_keys(self, p: dict[str, Any], _r: Any) -> None:
        """Rotated DH-HMAC-CHAP key names: replay adds the host with these."""
        sub = self._sub(p["nqn"])
        if sub is not None and p["host"] in sub["hosts"]:
            entry = sub["hosts"][p["host"]]
            for k in ("dhchap_key", "dhchap_ctrlr_key"):
                entry.pop(k, None)
            entry.update(_without(p, "nqn"))

    def _on_nvmf_subsystem_remove_host(self, p: dict[str, Any], _r: Any) -> None:
        sub = self._sub(p["nqn"])
        if sub is not None:
            sub["hosts"].pop(p["host"], None)

    def _on_keyring_file_add_key(self, p: dict[str, Any], _r: Any) -> None:
        # name and path only: the key material stays in its 0600 file
        self._data["keys"][p["name"]] = {"name": p["name"], "path": p["path"]}

    def _on_keyring_file_remove_key(self, p: dict[str, Any], _r: Any) -> None:
        self._data["keys"].pop(p["name"], None)

    def _on_bdev_set_qos_limit(self, p: dict[str, Any], _r: Any) -> None:
        limits = self._data["qos"].setdefault(p["name"], {})
        limits.update({k: p[k] for k in QOS_KEYS if k in p})
        if not any(limits.values()):
            self._data["qos"].pop(p["name"], None)

    def _on_bdev_lvol_delete(self, p: dict[str, Any], _r: Any) -> None:
        self._data["qos"].pop(p["name"], None)
        crypto_state.forget_base(self._data, p["name"])

    # --- replay ------------------------------------------------------------------
    def replay(self, api: SpdkApi) -> dict[str, Any]:
        """Make the target hold every recorded export; report what was fixed.

        Returns ``{"created": {kind: [ids]}, "removed": {kind: [ids]},
        "failed": [{"object", "error"}], "fixed": n}``. Objects already present
        are left alone; hosts a recorded subsystem allows but the record does
        not are removed (the record says exactly who may connect). A failure
        of one object (say, an lvol not loaded yet) does not stop the rest.
        """
        with self.changes.exclusive(), self._lock:   # no change half made; held
            try:               # throughout, so no copy; each entry decoded as it is replayed
                return _Replay(api, self._data).run()
            finally:
                packed.settle(self._data)
                packed.release_freed_heap()


class _Replay:
    def __init__(self, api: SpdkApi, data: dict[str, Any]) -> None:
        self.api, self.data = api, data
        self.created: dict[str, list[str]] = {k: [] for k in (
            "keys", "transports", "subsystems", "namespaces", "listeners", "hosts", "qos")}
        self.removed: dict[str, list[str]] = {"hosts": []}
        self.failed: list[dict[str, str]] = []

    def _do(self, kind: str, ident: str, method: str, params: dict[str, Any]) -> None:
        try:
            self.api.call(method, params)
        except SpdkExists:
            return                                    # raced with someone: present
        except SpdkError as err:
            self.failed.append({"object": f"{kind} {ident}", "error": str(err)})
            log.warning("replay: %s %s failed: %s", kind, ident, err)
            return
        self.created[kind].append(ident)

    def run(self) -> dict[str, Any]:
        self._keys()
        crypto_state.replay(self.api, self.data, self.created, self.failed)
        self._transports()
        existing = {s["nqn"]: s for s in self.api.subsystems()}
        for nqn, sub in self.data["subsystems"].items():
            self._subsystem(nqn, sub, existing.get(nqn))
        self._qos()
        fixed = sum(map(len, self.created.values())) + sum(map(len, self.removed.values()))
        return {"created": self.created, "removed": self.removed, "failed": self.failed,
                "fixed": fixed}

    def _keys(self) -> None:
        if not self.data["keys"]:
            return
        present = {k["name"] for k in self.api.call("keyring_get_keys")}
        for name, key in self.data["keys"].items():
            if name in present:
                continue
            if not os.path.exists(key["path"]):
                self.failed.append({"object": f"key {name}",
                                    "error": f"key file {key['path']} is missing"})
                continue
            self._do("keys", name, "keyring_file_add_key", key)

    def _transports(self) -> None:
        if not self.data["transports"]:
            return
        present = {str(t.get("trtype", "")).upper() for t in self.api.transports()}
        for trtype, params in self.data["transports"].items():
            if trtype not in present:
                self._do("transports", trtype, "nvmf_create_transport", params)

    def _subsystem(self, nqn: str, sub: dict[str, Any], have: dict[str, Any] | None) -> None:
        if have is None:
            before = len(self.failed)
            self._do("subsystems", nqn, "nvmf_create_subsystem", sub["params"])
            if len(self.failed) > before:
                return
            have = self.api.subsystem_get(nqn) or {}
        nsids = {str(ns["nsid"]) for ns in have.get("namespaces", [])}
        bdevs = {ns.get("bdev_name") for ns in have.get("namespaces", [])}
        for key, ns in sub["namespaces"].items():
            bdev = ns["namespace"].get("bdev_name")
            if key in nsids or (key.startswith("auto:") and bdev in bdevs):
                continue
            self._do("namespaces", f"{nqn} {'nsid ' + key if key[0].isdigit() else key}",
                     "nvmf_subsystem_add_ns", {"nqn": nqn, **ns})
        listening = {_listener_key(a) for a in have.get("listen_addresses", [])}
        for lst in sub["listeners"]:
            key = _listener_key(lst["listen_address"])
            if key not in listening:
                self._do("listeners", f"{nqn} {key[0]} {key[1]}:{key[2]}",
                         "nvmf_subsystem_add_listener", {"nqn": nqn, **lst})
        self._hosts(nqn, sub, have)

    def _hosts(self, nqn: str, sub: dict[str, Any], have: dict[str, Any]) -> None:
        allowed = {h["nqn"] for h in have.get("hosts", [])}
        for host in sorted(allowed - set(sub["hosts"])):
            try:
                self.api.host_remove(nqn, host)
                self.removed["hosts"].append(f"{nqn} {host}")
            except SpdkError as err:
                self.failed.append({"object": f"host {nqn} {host}", "error": str(err)})
        for host, params in sub["hosts"].items():
            if host not in allowed:
                self._do("hosts", f"{nqn} {host}", "nvmf_subsystem_add_host",
                         {"nqn": nqn, **params})
        if bool(have.get("allow_any_host", False)) != sub["allow_any_host"]:
            self._do("subsystems", f"{nqn} allow_any_host={sub['allow_any_host']}",
                     "nvmf_subsystem_allow_any_host",
                     {"nqn": nqn, "allow_any_host": sub["allow_any_host"]})

    def _qos(self) -> None:
        for name, limits in self.data["qos"].items():
            bdev = self.api.bdev_get(name)
            if bdev is None:
                self.failed.append({"object": f"qos {name}", "error": "bdev not found"})
                continue
            current = bdev.get("assigned_rate_limits", {})
            if all(current.get(k, 0) == _as_applied(k, v) for k, v in limits.items()):
                continue
            self._do("qos", name, "bdev_set_qos_limit", {"name": name, **limits})
