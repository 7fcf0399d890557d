"""A simulator data plane that serves exported namespaces with the Linux
kernel NVMe-oF target (nvmet) through configfs.

``csi-spdk sim --nvmet`` uses it inside the test guest: the simulator keeps the
JSON-RPC view of SPDK (subsystems, namespaces, listeners, hosts) and this
class mirrors every change into ``/sys/kernel/config/nvmet`` so a real
``nvme connect`` reaches the lvol's backing file.

Mapping (configfs layout of Linux 6.1):

* subsystem -> ``subsystems/<nqn>`` with ``attr_allow_any_host``,
  ``attr_serial``, ``attr_model``;
* namespace -> ``subsystems/<nqn>/namespaces/<nsid>`` with ``device_path`` (the
  lvol's backing file), ``device_uuid``, ``device_nguid``, ``buffered_io`` and
  ``enable``;
* host -> ``hosts/<hostnqn>`` plus a symlink
  ``subsystems/<nqn>/allowed_hosts/<hostnqn>``;
* listener -> ``ports/<id>`` (``addr_trtype``/``addr_adrfam``/``addr_traddr``/
  ``addr_trsvcid``) with ``ports/<id>/subsystems/<nqn>`` symlinked; a
  ``secure_channel`` listener gets a port of its own with ``addr_tsas`` tls1.3
  and ``addr_treq`` required (the kernel then hands the TLS handshake to
  tlshd, which finds the PSK in the ``.nvme`` keyring);
* host keys (``nvmf_subsystem_add_host`` with ``dhchap_key``/
  ``dhchap_ctrlr_key``, ``nvmf_subsystem_set_keys``) -> ``hosts/<hostnqn>/``
  ``dhchap_key``, ``dhchap_ctrl_key``, ``dhchap_hash``, ``dhchap_dhgroup``: the
  kernel then runs DH-HMAC-CHAP on every connect, as SPDK does. A ``psk`` ->
  the PSK inserted into the kernel's ``.nvme`` keyring for (host, subsystem)
  as SPDK derives it (``csi_spdk.tls_psk``).

One difference from SPDK: nvmet keeps one DH-HMAC-CHAP key pair per host NQN
(``hosts/<nqn>`` is shared by all subsystems), SPDK one per (subsystem, host).
Different keys for one host on two subsystems cannot be mirrored: the second
``add_host`` fails with a simulator error saying so, instead of silently
breaking the first subsystem's authentication.

The kernel port listens on the address the initiator dials, which may differ
from SPDK's listener address (``traddr``; inside the test guest that is
127.0.0.1). SPDK's view, the JSON-RPC listener list, is not changed. Several
SPDK listeners that map to the same kernel address share one port.

Backing files live on tmpfs in the guest, which (before Linux 6.6) has no
O_DIRECT, so namespaces use buffered I/O.

Hosts, their keys and PSKs are in ``nvmet_hosts.py`` (a mixin of this class),
the configfs file operations in ``configfs.py``.

Removal order: unlink subsystem from ports, remove allowed_hosts links,
disable and remove namespaces, remove the subsystem, then remove hosts and
ports nothing refers to anymore. Every operation is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

from . import configfs, nvmet_leftovers
from .configfs import NvmetError
from .dataplane import DataPlane, HostAuth, ListenerInfo, NamespaceInfo
from .nvmet_crypt import CryptError, CryptMappings
from .nvmet_hosts import NvmetHosts

SYS_MODULE = Path("/sys/module")   # loaded kernel modules
log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
# Env override of the kernel port address ("" keeps SPDK's listener address).
TRADDR_ENV = "CSI_SPDK_NVMET_TRADDR"
DEFAULT_TRADDR = "127.0.0.1"
# The hash and DH group nvmet offers in DH-HMAC-CHAP (SPDK negotiates from its
# nvmf_set_config lists, all digests and groups by default).
DHCHAP_HASH_ENV, DHCHAP_DHGROUP_ENV = "CSI_SPDK_NVMET_DHCHAP_HASH", "CSI_SPDK_NVMET_DHCHAP_DHGROUP"
DEFAULT_DHCHAP_HASH, DEFAULT_DHCHAP_DHGROUP = "hmac(sha256)", "ffdhe2048"

# (trtype, adrfam, traddr, trsvcid, tls), kernel spelling
PortKey = tuple[str, str, str, str, bool]


class NvmetDataPlane(NvmetHosts, DataPlane):
    """Mirror the simulator's NVMe-oF state into the kernel nvmet target."""

    def __init__(self, traddr: str | None = None,
                 root: str | os.PathLike[str] = CONFIGFS / "nvmet",
                 load_modules: bool = True) -> None:
        """``traddr``: the kernel port address (what initiators dial). None:
        $CSI_SPDK_NVMET_TRADDR, default 127.0.0.1; "": SPDK's own listener
        address."""
        if traddr is None:
            traddr = os.environ.get(TRADDR_ENV, DEFAULT_TRADDR)
        self.traddr = traddr or None
        self.root = Path(root)
        self.load_modules = load_modules
        self.lock = threading.RLock()
        self.crypt = CryptMappings()   # namespaces on crypto bdevs: dm-crypt (nvmet_crypt.py)
        # nqn -> {"any": bool, "hosts": set[str]}
        self.subsystems: dict[str, dict] = {}
        self.hosts_created: set[str] = set()
        # kernel port key -> port id, and (port key) -> {nqn: number of SPDK listeners}
        self.ports: dict[PortKey, int] = {}
        self.port_refs: dict[PortKey, dict[str, int]] = {}
        self.owned_file = nvmet_leftovers.owned_file_for(self.root)
        self._owned_saved: tuple | None = None
        # host nqn -> {subsystem nqn: HostAuth} (only subsystems with keys)
        self.host_auth: dict[str, dict[str, HostAuth]] = {}
        self.dhchap_hash = os.environ.get(DHCHAP_HASH_ENV, DEFAULT_DHCHAP_HASH)
        self.dhchap_dhgroup = os.environ.get(DHCHAP_DHGROUP_ENV, DEFAULT_DHCHAP_DHGROUP)

    def dhchap_negotiation(self, digest: str, dhgroup: str) -> None:
        """The hash and DH group nvmet offers (one of each per host): the
        strongest of the simulator's lists, what SPDK picks for a Linux host.
        $CSI_SPDK_NVMET_DHCHAP_HASH / _DHGROUP still win."""
        self.dhchap_hash = os.environ.get(DHCHAP_HASH_ENV, f"hmac({digest})")
        self.dhchap_dhgroup = os.environ.get(DHCHAP_DHGROUP_ENV, dhgroup)

    @classmethod
    def from_env(cls) -> NvmetDataPlane:
        """The ``--nvmet`` data plane: kernel ports on $CSI_SPDK_NVMET_TRADDR
        (default 127.0.0.1; empty = SPDK's listener address)."""
        return cls(traddr=None)

    # --- paths ---------------------------------------------------------------
    def _subsys(self, nqn: str) -> Path:
        return self.root / "subsystems" / nqn

    def _host(self, host_nqn: str) -> Path:
        return self.root / "hosts" / host_nqn

    def _port(self, port_id: int) -> Path:
        return self.root / "ports" / str(port_id)

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self.load_modules:
            self._load_modules()
        if (not self.root.is_dir() and self.root == CONFIGFS / "nvmet"
                and not os.path.ismount(CONFIGFS)):
            subprocess.run(["mount", "-t", "configfs", "none", str(CONFIGFS)],
                           check=False, capture_output=True)
        if not self.root.is_dir():
            raise NvmetError(f"{self.root} does not exist: is the nvmet module loaded "
                             "and configfs mounted?")
        log.info("nvmet data plane on %s (kernel ports listen on %s)", self.root,
                 self.traddr or "SPDK's listener address")
        nvmet_leftovers.clear(self.root, self.owned_file)

    def _load_modules(self) -> None:
        """modprobe nvmet and nvmet-tcp unless the kernel has them already
        (/sys/module/<name>): a container image (the driver's has no kmod)
        or a node that loaded them at boot needs no modprobe; without one,
        a missing module is reported by start() as a missing configfs root."""
        modprobe = shutil.which("modprobe")
        for mod in ("nvmet", "nvmet-tcp"):
            if (SYS_MODULE / mod.replace("-", "_")).is_dir():
                continue
            if modprobe is None:
                log.warning("kernel module %s is not loaded and there is no modprobe "
                            "to load it", mod)
                continue
            subprocess.run([modprobe, mod], check=False, capture_output=True)

    def _save_owned(self) -> None:
        """Record the configfs objects this process owns (see nvmet_leftovers)."""
        now = (tuple(sorted(self.subsystems)), tuple(sorted(self.hosts_created)),
               tuple(sorted(self.ports.values())))
        if now != self._owned_saved:
            nvmet_leftovers.save(self.owned_file, *map(list, now))
            self._owned_saved = now

    def stop(self) -> None:
        with self.lock:
            for nqn in list(self.subsystems):
                self.subsystem_deleted(nqn)
            for key in list(self.ports):
                self._drop_port(key, force=True)
            self.crypt.close_all()
            for host in list(self.hosts_created):
                self._gc_host(host)
            with contextlib.suppress(FileNotFoundError):
                self.owned_file.unlink()

    def writes_external_data(self) -> bool:
        return True

    # --- subsystems ------------------------------------------------------------
    def subsystem_created(self, nqn: str, serial: str, model: str,
                          allow_any_host: bool) -> None:
        with self.lock:
            path = self._subsys(nqn)
            self.subsystems.setdefault(nqn, {"any": False, "hosts": set()})
            self._save_owned()            # recorded before it exists: never leaked
            configfs.mkdir(path)
            if serial:
                with contextlib.suppress(NvmetError):  # fixed once a controller exists
                    configfs.write(path / "attr_serial", serial)
            if model and (path / "attr_model").exists():
                try:
                    configfs.write(path / "attr_model", model)
                except NvmetError as e:
                    log.warning("nvmet: cannot set model of %s: %s", nqn, e)
            self.allow_any_host_changed(nqn, allow_any_host)

    def subsystem_deleted(self, nqn: str) -> None:
        with self.lock:
            path = self._subsys(nqn)
            state = self.subsystems.pop(nqn, {"any": False, "hosts": set()})
            for key, refs in list(self.port_refs.items()):
                if refs.pop(nqn, None) is not None:
                    configfs.unlink(self._port(self.ports[key]) / "subsystems" / nqn)
                    self._gc_port(key)
            if path.is_dir():
                for link in (path / "allowed_hosts").iterdir():
                    configfs.unlink(link)
                for ns in (path / "namespaces").iterdir():
                    self._remove_ns_dir(ns)
                configfs.rmdir(path)
            self.crypt.close_subsystem(nqn)
            for host in state["hosts"]:
                self._gc_host(host)
            self._save_owned()

    def allow_any_host_changed(self, nqn: str, allow_any_host: bool) -> None:
        # The kernel refuses allow_any_host=1 while allowed_hosts has entries
        # and refuses new entries while it is 1: keep the list in memory and
        # only materialise it while allow_any_host is off.
        with self.lock:
            state = self.subsystems.setdefault(nqn, {"any": False, "hosts": set()})
            path = self._subsys(nqn)
            if allow_any_host:
                for host in state["hosts"]:
                    configfs.unlink(path / "allowed_hosts" / host)
                configfs.write(path / "attr_allow_any_host", "1")
            else:
                configfs.write(path / "attr_allow_any_host", "0")
                for host in state["hosts"]:
                    self._link_host(nqn, host)
            state["any"] = allow_any_host

    # --- namespaces ----------------------------------------------------------------
    def namespace_added(self, ns: NamespaceInfo) -> None:
        if not ns.path:
            log.warning("nvmet: namespace %d of %s (bdev %s) has no backing file; "
                        "it is not reachable over the kernel target", ns.nsid, ns.nqn,
                        ns.bdev_name)
            return
        with self.lock:
            path = self._subsys(ns.nqn) / "namespaces" / str(ns.nsid)
            configfs.mkdir(path)
            if configfs.read(path / "enable") == "1":
                return  # idempotent repeat
            device = ns.path
            if ns.crypto is not None:
                try:
                    device = self.crypt.open(ns)
                except CryptError as err:
                    raise NvmetError(str(err)) from err
            configfs.write(path / "device_path", device)
            configfs.write(path / "device_uuid", ns.uuid)
            if ns.nguid:
                configfs.write(path / "device_nguid", ns.nguid)
            if (path / "buffered_io").exists():
                configfs.write(path / "buffered_io", "1")
            if ns.read_only:
                log.warning("nvmet: namespace %d of %s is read-only in SPDK; the kernel "
                            "target (6.1) cannot enforce that", ns.nsid, ns.nqn)
            configfs.write(path / "enable", "1")

    def namespace_removed(self, nqn: str, nsid: int) -> None:
        with self.lock:
            self._remove_ns_dir(self._subsys(nqn) / "namespaces" / str(nsid))
            self.crypt.close(nqn, nsid)

    def namespace_resized(self, ns: NamespaceInfo) -> None:
        with self.lock:
            try:
                self.crypt.resize(ns)
            except CryptError as err:
                raise NvmetError(str(err)) from err
            attr = self._subsys(ns.nqn) / "namespaces" / str(ns.nsid) / "revalidate_size"
            if attr.exists():
                configfs.write(attr, "1")

    @staticmethod
    def _remove_ns_dir(path: Path) -> None:
        if not path.is_dir():
            return
        if configfs.read(path / "enable") == "1":
            configfs.write(path / "enable", "0")
        configfs.rmdir(path)

    # --- listeners --------------------------------------------------------------------
    def _key(self, listener: ListenerInfo) -> PortKey:
        traddr = self.traddr or listener.traddr
        adrfam = "ipv6" if ":" in traddr else "ipv4"
        return (listener.trtype.lower(), adrfam, traddr, str(listener.trsvcid),
                listener.secure_channel)

    def listener_added(self, listener: ListenerInfo) -> None:
        with self.lock:
            key = self._key(listener)
            port_id = self._ensure_port(key)
            refs = self.port_refs.setdefault(key, {})
            refs[listener.nqn] = refs.get(listener.nqn, 0) + 1
            port_dir = self._port(port_id)
            configfs.symlink(self._subsys(listener.nqn), port_dir / "subsystems" / listener.nqn)
            self._save_owned()

    def listener_removed(self, listener: ListenerInfo) -> None:
        with self.lock:
            key = self._key(listener)
            refs = self.port_refs.get(key)
            if not refs or listener.nqn not in refs:
                return
            refs[listener.nqn] -= 1
            if refs[listener.nqn] <= 0:
                del refs[listener.nqn]
                configfs.unlink(self._port(self.ports[key]) / "subsystems" / listener.nqn)
            self._gc_port(key)
            self._save_owned()

    def _ensure_port(self, key: PortKey) -> int:
        if key in self.ports and self._port(self.ports[key]).is_dir():
            return self.ports[key]
        ports_dir = self.root / "ports"
        used = {int(p.name) for p in ports_dir.iterdir() if p.name.isdigit()}
        # Reuse a port someone (e.g. an earlier run) left with the same address.
        for pid in sorted(used):
            p = self._port(pid)
            attrs = [configfs.read(p / f"addr_{a}")
                     for a in ("trtype", "adrfam", "traddr", "trsvcid", "tsas")]
            if (*attrs[:4], attrs[4] == "tls1.3") == key:
                self.ports[key] = pid
                return pid
        pid = next(i for i in range(1, 65535) if i not in used)
        path = self._port(pid)
        configfs.mkdir(path)
        trtype, adrfam, traddr, trsvcid, tls = key
        try:
            configfs.write(path / "addr_trtype", trtype)
            configfs.write(path / "addr_adrfam", adrfam)
            configfs.write(path / "addr_traddr", traddr)
            configfs.write(path / "addr_trsvcid", trsvcid)
            if tls:
                if not (path / "addr_tsas").exists():
                    raise NvmetError("this kernel's nvmet has no TLS "
                                     "(CONFIG_NVME_TARGET_TCP_TLS)")
                configfs.write(path / "addr_tsas", "tls1.3")
                configfs.write(path / "addr_treq", "required")
        except NvmetError:
            configfs.rmdir(path)
            raise
        self.ports[key] = pid
        return pid

    def _gc_port(self, key: PortKey) -> None:
        if not self.port_refs.get(key):
            self._drop_port(key)

    def _drop_port(self, key: PortKey, force: bool = False) -> None:
        pid = self.ports.get(key)
        if pid is None:
            return
        path = self._port(pid)
        if force and path.is_dir():
            for link in (path / "subsystems").iterdir():
                configfs.unlink(link)
        if path.is_dir() and any((path / "subsystems").iterdir()):
            return  # someone else's subsystem is linked too
        configfs.rmdir(path)
        self.ports.pop(key, None)
        self.port_refs.pop(key, None)


def make_dataplane() -> NvmetDataPlane:
    """Factory for ``csi-spdk sim --nvmet``."""
    return NvmetDataPlane.from_env()
