"""Hosts of the kernel nvmet data plane: ``hosts/<nqn>`` entries, their
DH-HMAC-CHAP keys and TLS PSKs (the kernel's ``.nvme`` keyring). A mixin of
``NvmetDataPlane`` (sim/nvmet.py): it uses ``lock``, ``subsystems``,
``hosts_created``, ``host_auth``, ``dhchap_hash``/``dhchap_dhgroup``, the
``_host``/``_subsys`` paths and ``_save_owned``.

nvmet keeps one key pair per host NQN (``hosts/<nqn>`` is shared by every
subsystem), SPDK one per (subsystem, host): ``OneKeyPairPerHost`` refuses
what cannot be mirrored instead of breaking another subsystem's login."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from . import configfs, kernel_keyring
from .configfs import NvmetError
from .dataplane import DataPlaneLimit, HostAuth

log = logging.getLogger("csi_spdk.sim.nvmet")


class OneKeyPairPerHost(NvmetError, DataPlaneLimit):
    """nvmet's hosts/<nqn> holds one key pair for every subsystem."""


class NvmetHosts:
    lock: threading.RLock
    subsystems: dict[str, dict]
    hosts_created: set[str]
    host_auth: dict[str, dict[str, HostAuth]]
    dhchap_hash: str
    dhchap_dhgroup: str

    _host: Callable[[str], Path]
    _subsys: Callable[[str], Path]
    _save_owned: Callable[[], None]

    # --- hosts -------------------------------------------------------------------------
    # nvmf.add_host calls host_auth_changed (keys) before host_added (the
    # allowed_hosts link): the host is never allowed without its keys.
    def host_added(self, nqn: str, host_nqn: str) -> None:
        with self.lock:
            self._check_one_key_pair(nqn, host_nqn, self._pair(nqn, host_nqn))
            state = self.subsystems.setdefault(nqn, {"any": False, "hosts": set()})
            state["hosts"].add(host_nqn)
            if not state["any"]:
                self._link_host(nqn, host_nqn)
            self._save_owned()

    def host_removed(self, nqn: str, host_nqn: str) -> None:
        with self.lock:
            state = self.subsystems.get(nqn)
            if state:
                state["hosts"].discard(host_nqn)
            configfs.unlink(self._subsys(nqn) / "allowed_hosts" / host_nqn)
            auths = self.host_auth.get(host_nqn, {})
            auth = auths.pop(nqn, None)
            if not auths:
                self.host_auth.pop(host_nqn, None)
            if auth is not None and auth.psk:
                self._unlink_psk(nqn, host_nqn)
            self._gc_host(host_nqn)
            self._save_owned()

    def host_auth_changed(self, nqn: str, host_nqn: str, auth: HostAuth) -> None:
        with self.lock:
            pair = (auth.dhchap_key, auth.dhchap_ctrlr_key)
            self._check_one_key_pair(nqn, host_nqn, pair)
            old = self.host_auth.get(host_nqn, {}).get(nqn, HostAuth())
            if auth:
                self.host_auth.setdefault(host_nqn, {})[nqn] = auth
            else:
                self.host_auth.get(host_nqn, {}).pop(nqn, None)
            host = self._host(host_nqn)
            if not host.is_dir():
                configfs.mkdir(host)
                self.hosts_created.add(host_nqn)
            if pair != (old.dhchap_key, old.dhchap_ctrlr_key):
                self._write_host_keys(host_nqn, auth)
            if auth.psk and auth.psk != old.psk:
                self._insert_psk(nqn, host_nqn, auth.psk)
            self._save_owned()

    def check_host_auth(self, nqn: str, host_nqn: str, auth: HostAuth) -> None:
        with self.lock:
            self._check_one_key_pair(nqn, host_nqn, (auth.dhchap_key, auth.dhchap_ctrlr_key))

    def _pair(self, nqn: str, host_nqn: str) -> tuple[str | None, str | None]:
        auth = self.host_auth.get(host_nqn, {}).get(nqn, HostAuth())
        return auth.dhchap_key, auth.dhchap_ctrlr_key

    def _check_one_key_pair(self, nqn: str, host_nqn: str,
                            pair: tuple[str | None, str | None]) -> None:
        """hosts/<nqn> is shared by every subsystem: all that allow the host
        must want the same DH-HMAC-CHAP keys (or all none)."""
        for other, state in self.subsystems.items():
            if other == nqn or state["any"] or host_nqn not in state["hosts"]:
                continue
            if self._pair(other, host_nqn) != pair:
                raise OneKeyPairPerHost(
                    f"kernel nvmet keeps one DH-HMAC-CHAP key pair per host NQN (configfs "
                    f"hosts/<nqn> is shared by all subsystems; SPDK keeps one per subsystem "
                    f"and host): {host_nqn} is allowed on {other} with different keys (or "
                    "none), so this simulator cannot also give it other keys on "
                    f"{nqn}; use the same keys, or a real spdk_tgt")

    def _write_host_keys(self, host_nqn: str, auth: HostAuth) -> None:
        """hosts/<nqn>/dhchap_*. Removing keys means a fresh host entry (the
        kernel's way to clear a key differs between versions)."""
        host = self._host(host_nqn)
        if not (host / "dhchap_key").exists():
            if auth.dhchap_key:
                raise NvmetError("this kernel's nvmet has no in-band authentication "
                                 "(CONFIG_NVME_TARGET_AUTH)")
            return
        if ((not auth.dhchap_key or not auth.dhchap_ctrlr_key)
                and (configfs.read(host / "dhchap_key")
                     or configfs.read(host / "dhchap_ctrl_key"))):
            self._recreate_host(host_nqn)
        if auth.dhchap_key:
            configfs.write(host / "dhchap_hash", self.dhchap_hash)
            configfs.write(host / "dhchap_dhgroup", self.dhchap_dhgroup)
            configfs.write(host / "dhchap_key", auth.dhchap_key)
        if auth.dhchap_ctrlr_key:
            configfs.write(host / "dhchap_ctrl_key", auth.dhchap_ctrlr_key)
        # never log the keys: only what is set
        log.info("nvmet: host %s DH-HMAC-CHAP %s", host_nqn,
                 ("bidirectional" if auth.dhchap_ctrlr_key else "host key only")
                 if auth.dhchap_key else "off")

    def _recreate_host(self, host_nqn: str) -> None:
        linked = [nqn for nqn, st in self.subsystems.items()
                  if host_nqn in st["hosts"] and not st["any"]]
        for nqn in linked:
            configfs.unlink(self._subsys(nqn) / "allowed_hosts" / host_nqn)
        configfs.rmdir(self._host(host_nqn))
        configfs.mkdir(self._host(host_nqn))
        self.hosts_created.add(host_nqn)
        for nqn in linked:
            configfs.symlink(self._host(host_nqn), self._subsys(nqn) / "allowed_hosts" / host_nqn)

    def _link_host(self, nqn: str, host_nqn: str) -> None:
        host = self._host(host_nqn)
        if not host.is_dir():
            configfs.mkdir(host)
            self.hosts_created.add(host_nqn)
        configfs.symlink(host, self._subsys(nqn) / "allowed_hosts" / host_nqn)

    def _gc_host(self, host_nqn: str) -> None:
        """Remove hosts/<nqn> we created once no subsystem allows it."""
        if host_nqn not in self.hosts_created:
            return
        if any(host_nqn in s["hosts"] and not s["any"] for s in self.subsystems.values()):
            return
        if host_nqn in self.host_auth:
            return
        try:
            configfs.rmdir(self._host(host_nqn))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            log.warning("nvmet: host %s still referenced", host_nqn)
            return
        self.hosts_created.discard(host_nqn)

    # --- TLS PSKs (kernel keyring) ---------------------------------------------------
    def _insert_psk(self, nqn: str, host_nqn: str, psk: str) -> None:
        try:
            kernel_keyring.insert_tls_psk(host_nqn, nqn, psk)
        except kernel_keyring.KeyringError as e:
            raise NvmetError(str(e)) from None

    @staticmethod
    def _unlink_psk(nqn: str, host_nqn: str) -> None:
        kernel_keyring.revoke_tls_psks(host_nqn, nqn)
