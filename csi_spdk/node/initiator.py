"""Node side of NVMe/TCP: connect, find the namespace's block device, disconnect.

The strategy object ``NvmeTcpInitiator`` is symmetric to the controller's
``nvmf.py`` target. It drives ``nvme-cli`` only for the two operations the
kernel offers no other interface for (``nvme connect`` / ``nvme disconnect``)
and reads everything else from sysfs, whose layout is stable across kernel and
nvme-cli versions (nvme-cli's JSON field names are not):

* ``/sys/class/nvme/nvmeX/{subsysnqn,transport,address,state}``: controllers;
* ``/sys/class/nvme-subsystem/nvme-subsysY/subsysnqn``: subsystems;
* ``/sys/block/nvmeXnY/{uuid,nguid,wwid}``: namespaces. The subsystem a block
  device belongs to is found by walking up its sysfs directory to the first
  ancestor with a ``subsysnqn`` file: the ``nvme-subsysY`` directory for a
  native-multipath head disk, the ``nvmeX`` controller otherwise. Hidden
  per-path disks (``nvmeXcYnZ``) are never returned.

A namespace is identified by BOTH its subsystem NQN and its namespace uuid, so
a stale device of another volume can never be returned.

Concurrency/idempotency contract: every method is safe to call from several
threads for *different* NQNs; callers (the Node service) serialise operations
on the same volume with their per-volume lock. ``connect`` is idempotent (no
second ``nvme connect`` when a controller to the same address already exists),
``disconnect`` is idempotent (a no-op when nothing is connected) and touches
only the named subsystem, never ``disconnect-all``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .. import contract
from ..errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from . import reauth
from .auth import ConnectAuth, KernelFeatures, redact
from .sysfs import read_attr as _read

log = logging.getLogger("csi_spdk.initiator")

_BLOCK_NAME = re.compile(r"^nvme\d+n\d+$")          # excludes hidden nvmeXcYnZ
_CTRL_NAME = re.compile(r"^nvme\d+$")
# Controller states in which a path still exists (or will come back).
_ALIVE_STATES = {"live", "connecting", "resetting", "new"}
_COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Controller:
    """One NVMe controller as sysfs shows it."""

    name: str            # "nvme0"
    subsysnqn: str
    transport: str       # "tcp", "pcie", "rdma", "loop", "fc"
    address: str         # "traddr=10.0.2.2,trsvcid=4420,src_addr=10.0.2.15"
    state: str           # "live", "connecting", ...

    def address_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.address.split(","):
            key, sep, value = part.strip().partition("=")
            if sep:
                out[key] = value
        return out




def _norm_id(value: str) -> str:
    """Namespace ids compare as lowercase hex without dashes."""
    value = value.strip().lower()
    for prefix in ("uuid.", "eui.", "nguid."):
        if value.startswith(prefix):
            value = value[len(prefix):]
    return value.replace("-", "")


class NvmeTcpInitiator:
    """Connects this node to per-volume NVMe/TCP subsystems.

    ``sysfs_root``/``dev_root`` exist so tests can point at a fake tree;
    ``use_udev`` defaults to True only for the real ``/sys``.
    """

    def __init__(self, host_nqn: str, host_id: str, ctrl_loss_tmo: int = -1,
                 reconnect_delay: int = 2, sysfs_root: str = "/sys", nvme: str = "nvme",
                 dev_root: str = "/dev", use_udev: bool | None = None,
                 features: KernelFeatures | None = None) -> None:
        """``features``: what the kernel offers for auth/TLS (probed on first
        need when None)."""
        self._features = features
        self.kmsg = reauth.KMSG if os.path.realpath(sysfs_root) == "/sys" else \
            os.path.join(sysfs_root, "kmsg")   # a test's fake kernel log
        self.host_nqn = host_nqn
        self.host_id = host_id
        self.ctrl_loss_tmo = ctrl_loss_tmo
        self.reconnect_delay = reconnect_delay
        self.sysfs_root = sysfs_root
        self.nvme = nvme
        self.dev_root = dev_root
        self.use_udev = (os.path.realpath(sysfs_root) == "/sys") if use_udev is None \
            else use_udev
        if self.use_udev:   # import once at start-up, not inside the first stage
            with contextlib.suppress(ImportError):
                import pyudev  # noqa: F401

    # --- sysfs views ---------------------------------------------------------
    def _sys(self, *parts: str) -> str:
        return os.path.join(self.sysfs_root, *parts)

    def controllers(self, nqn: str | None = None) -> list[Controller]:
        """Every NVMe controller (optionally only those of subsystem ``nqn``)."""
        found: dict[str, Controller] = {}
        dirs: list[str] = []
        # Controllers linked from their subsystem (covers trees without class/nvme).
        sbase = self._sys("class", "nvme-subsystem")
        for sub in self._subsystem_dirs(nqn):
            dirs += [os.path.join(sub, n) for n in _listdir(sub) if _CTRL_NAME.match(n)]
        # Every controller is linked from its subsystem; scanning class/nvme too
        # is only needed for all controllers or a tree without nvme-subsystem.
        if nqn is None or not os.path.isdir(sbase):
            base = self._sys("class", "nvme")
            dirs += [os.path.join(base, n) for n in _listdir(base) if _CTRL_NAME.match(n)]
        for d in dirs:
            name = os.path.basename(d)
            if name in found:
                continue
            subsysnqn = _read(os.path.join(d, "subsysnqn"))
            if not subsysnqn and os.path.isfile(os.path.join(os.path.dirname(d), "subsysnqn")):
                subsysnqn = _read(os.path.join(os.path.dirname(d), "subsysnqn"))
            if nqn is not None and subsysnqn != nqn:
                continue
            found[name] = Controller(name, subsysnqn, _read(os.path.join(d, "transport")),
                                     _read(os.path.join(d, "address")),
                                     _read(os.path.join(d, "state")))
        return [found[k] for k in sorted(found, key=_natural)]

    def _subsystem_dirs(self, nqn: str | None = None) -> list[str]:
        """``/sys/class/nvme-subsystem/nvme-subsysY`` of subsystem ``nqn`` (every
        subsystem when None): one attribute read per subsystem."""
        sbase = self._sys("class", "nvme-subsystem")
        return [os.path.join(sbase, s) for s in sorted(_listdir(sbase), key=_natural)
                if nqn is None or _read(os.path.join(sbase, s, "subsysnqn")) == nqn]

    def subsystem_exists(self, nqn: str) -> bool:
        return bool(self._subsystem_dirs(nqn))

    def is_connected(self, nqn: str) -> bool:
        """True when this host has a controller (in any non-dead state) for ``nqn``."""
        return any(c.state in _ALIVE_STATES or not c.state for c in self.controllers(nqn))

    def path_live(self, nqn: str) -> bool:
        """True when at least one controller of ``nqn`` is in state ``live``."""
        return any(c.state == "live" for c in self.controllers(nqn))

    def _connected_to(self, nqn: str, traddr: str, trsvcid: str) -> bool:
        for c in self.controllers(nqn):
            if c.state and c.state not in _ALIVE_STATES:
                continue
            fields = c.address_fields()
            if fields.get("traddr") == traddr and fields.get("trsvcid") == trsvcid:
                return True
        return False

    # --- namespace lookup ---------------------------------------------------
    def _block_subsysnqn(self, block_dir: str) -> str:
        """NQN of the subsystem a /sys/block entry belongs to ("" if unknown)."""
        root = os.path.realpath(self.sysfs_root)
        d = os.path.dirname(os.path.realpath(block_dir))
        while d.startswith(root) and d != root:
            value = _read(os.path.join(d, "subsysnqn"))
            if value:
                return value
            d = os.path.dirname(d)
        return _read(os.path.join(block_dir, "device", "subsysnqn"))

    def _matches(self, name: str, want: str) -> bool:
        """Block device ``name`` carries namespace id ``want`` (uuid, nguid or wwid)."""
        d = self._sys("block", name)
        return any(_norm_id(_read(os.path.join(d, f))) == want for f in ("uuid", "nguid", "wwid"))

    def lookup(self, nqn: str, ns_uuid: str) -> str | None:
        """The /dev path of namespace ``ns_uuid`` of subsystem ``nqn``, checked once.

        Looks only below that subsystem's sysfs directory: its head disks
        (native multipath) and the disks of its controllers (no multipath), so
        the cost is one attribute read per connected subsystem, not several per
        block device. Trees without ``class/nvme-subsystem`` fall back to a
        scan of ``/sys/block``."""
        want = _norm_id(ns_uuid)
        if not os.path.isdir(self._sys("class", "nvme-subsystem")):
            return self._lookup_all(nqn, want)
        names: list[str] = []
        for sub in self._subsystem_dirs(nqn):
            for entry in _listdir(sub):
                if _BLOCK_NAME.match(entry):
                    names.append(entry)
                elif _CTRL_NAME.match(entry):
                    names += [n for n in _listdir(os.path.join(sub, entry))
                              if _BLOCK_NAME.match(n)]
        for name in sorted(set(names), key=_natural):
            dev = os.path.join(self.dev_root, name)
            if self._matches(name, want) and os.path.exists(dev):
                return dev
        return None

    def _lookup_all(self, nqn: str, want: str) -> str | None:
        base = self._sys("block")
        for name in sorted(_listdir(base), key=_natural):
            if not _BLOCK_NAME.match(name) or not self._matches(name, want):
                continue
            if self._block_subsysnqn(os.path.join(base, name)) != nqn:
                continue
            dev = os.path.join(self.dev_root, name)
            if os.path.exists(dev):
                return dev
        return None

    def find_device(self, nqn: str, ns_uuid: str, timeout: float = 30.0) -> str | None:
        """Wait up to ``timeout`` seconds for the namespace's block device.

        Event-driven: subscribes to kernel block uevents (pyudev), re-checks
        sysfs right after subscribing (the device may already exist) and on
        every block event. Without udev it polls with a short, growing
        interval. Returns None on timeout. Safe to call concurrently.
        """
        found = self.lookup(nqn, ns_uuid)
        if found or timeout <= 0:
            return found
        deadline = time.monotonic() + timeout
        monitor = self._monitor() if self.use_udev else None
        interval = 0.02
        try:
            while True:
                found = self.lookup(nqn, ns_uuid)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if monitor is not None:
                    # Wake on any block event; a periodic re-check covers lost
                    # events (netlink buffer overruns) without busy polling.
                    monitor.poll(timeout=min(remaining, 2.0))
                else:
                    time.sleep(min(remaining, interval))
                    interval = min(interval * 2, 0.25)
        finally:
            if monitor is not None:
                _stop_monitor(monitor)

    @staticmethod
    def _monitor():
        try:
            import pyudev

            context = pyudev.Context()
            # Kernel uevents: present without udevd (minimal guests) and sent
            # as soon as the disk and its devtmpfs node exist.
            monitor = pyudev.Monitor.from_netlink(context, source="kernel")
            monitor.filter_by("block")
            monitor.start()
            return monitor
        except Exception as err:  # noqa: BLE001 - any failure means "poll instead"
            log.info("udev monitor unavailable, polling sysfs",
                     extra={"f": {"reason": str(err)}})
            return None

    # --- commands -----------------------------------------------------------
    def _run(self, args: list[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.nvme, *args], capture_output=True, text=True,
                                  timeout=_COMMAND_TIMEOUT, stdin=subprocess.DEVNULL,
                                  check=False)
        except FileNotFoundError as err:
            raise Internal(f"{self.nvme!r} not found: install nvme-cli on the node") from err
        except subprocess.TimeoutExpired as err:
            raise Unavailable(f"'{self.nvme} {args[0]}' did not finish in "
                              f"{_COMMAND_TIMEOUT:.0f}s") from err

    def connect_command(self, pc: Mapping[str, str]) -> list[str]:
        """The nvme-cli arguments ``connect`` uses for a publish_context."""
        args = ["connect", "-t", pc.get(contract.PC_TRTYPE) or "tcp",
                "-a", pc[contract.PC_TRADDR], "-s", pc[contract.PC_TRSVCID],
                "-n", pc[contract.PC_NQN], "--hostnqn", self.host_nqn,
                "--hostid", self.host_id,
                f"--ctrl-loss-tmo={self.ctrl_loss_tmo}",
                f"--reconnect-delay={self.reconnect_delay}"]
        return args

    def features(self) -> KernelFeatures:
        if self._features is None:
            self._features = KernelFeatures.probe(dev_root=self.dev_root)
        return self._features

    def connect(self, publish_context: Mapping[str, str], timeout: float = 30.0,
                secrets: Mapping[str, str] | None = None) -> str:
        """Connect to the volume's subsystem (unless already connected) and
        return its namespace's block device path. Idempotent. ``secrets``:
        the node-stage secrets (keys for publish_context ``auth``).

        When this call made the connection and the namespace does not appear
        within ``timeout``, it disconnects again so a failed stage leaks
        nothing, and raises UNAVAILABLE (the caller retries).
        """
        pc = publish_context
        for key in (contract.PC_NQN, contract.PC_TRADDR, contract.PC_TRSVCID,
                    contract.PC_NS_UUID):
            if not pc.get(key):
                raise InvalidArgument(f"publish_context has no {key!r}: was the volume "
                                      "published by the csi-spdk controller?")
        trtype = (pc.get(contract.PC_TRTYPE) or "tcp").lower()
        if trtype != "tcp":
            raise InvalidArgument(f"transport {trtype!r} is not supported (only tcp)")
        nqn, ns_uuid = pc[contract.PC_NQN], pc[contract.PC_NS_UUID]
        auth = ConnectAuth.from_request(pc, secrets or {})
        made = False
        self._require_fabrics()
        if auth.mode != contract.AUTH_NONE:
            auth.require(self.features())
        if auth.mode == contract.AUTH_DHCHAP and \
                self._connected_to(nqn, pc[contract.PC_TRADDR], pc[contract.PC_TRSVCID]):
            # a repeated stage with other keys: rotation (node/reauth.py)
            self.rekey(nqn, auth.dhchap_key, auth.dhchap_ctrl_key)
        if not self._connected_to(nqn, pc[contract.PC_TRADDR], pc[contract.PC_TRSVCID]):
            auth.prepare(self.nvme, self.host_nqn, nqn)
            res = self._run(self.connect_command(pc) + auth.connect_args())
            # nvme-cli may echo its arguments: never let a secret through
            out = redact((res.stderr + res.stdout).strip(), auth.secrets)
            if res.returncode != 0 and "already connected" not in out.lower():
                hint = (" (authentication: check the volume's node-stage secret)"
                        if auth.mode != contract.AUTH_NONE else "")
                raise Unavailable(f"nvme connect to {nqn} at {pc[contract.PC_TRADDR]}:"
                                  f"{pc[contract.PC_TRSVCID]} failed "
                                  f"(exit {res.returncode}){hint}: {out}")
            made = res.returncode == 0
            log.info("connected", extra={"f": {"nqn": nqn, "traddr": pc[contract.PC_TRADDR],
                                                "trsvcid": pc[contract.PC_TRSVCID],
                                                "auth": auth.mode}})
        device = self.find_device(nqn, ns_uuid, timeout)
        if device is None and not made:
            self.rescan(nqn)
            device = self.find_device(nqn, ns_uuid, min(timeout, 5.0))
        if device is None:
            if made:
                self.disconnect(nqn)
            raise Unavailable(f"namespace {ns_uuid} of {nqn} did not appear as a block "
                              f"device within {timeout:.0f}s")
        return device

    def rekey(self, nqn: str, host_key: str, ctrl_key: str) -> list[str]:
        """Give the live controllers of ``nqn`` this DH-HMAC-CHAP pair (one
        re-authentication per changed secret, node/reauth.py); returns what
        was written. UNAVAILABLE when no controller is connected (nothing
        could hold the pair) or the kernel refused it."""
        names = [c.name for c in self.controllers(nqn) if not c.state or
                 c.state in _ALIVE_STATES]
        if not names:
            raise Unavailable(f"no NVMe controller of {nqn} is connected on this node: its "
                              "keys cannot be rotated until it reconnects")
        return reauth.converge(self.sysfs_root, names, host_key, ctrl_key, self.kmsg)

    def _require_fabrics(self) -> None:
        """Fail clearly (not as a retryable fault) on a kernel without NVMe/TCP.

        ``nvme connect`` needs /dev/nvme-fabrics, which appears once the
        nvme-tcp module is loaded; try loading it once, as nvme-cli would.
        """
        fabrics = os.path.join(self.dev_root, "nvme-fabrics")
        if os.path.exists(fabrics):
            return
        if shutil.which("modprobe"):
            subprocess.run(["modprobe", "nvme-tcp"], capture_output=True, check=False,
                           timeout=30)
        if not os.path.exists(fabrics):
            raise FailedPrecondition(
                f"this node cannot connect NVMe/TCP volumes: {fabrics} is missing and "
                "'modprobe nvme-tcp' did not load the kernel's NVMe/TCP initiator; "
                "install and load the nvme-tcp kernel module")

    def disconnect(self, nqn: str) -> None:
        """Disconnect every controller of subsystem ``nqn`` (only that one).
        A no-op when it is not connected."""
        if not self.controllers(nqn) and not self.subsystem_exists(nqn):
            return
        res = self._run(["disconnect", "-n", nqn])
        if res.returncode != 0 and self.controllers(nqn):
            raise Internal(f"nvme disconnect -n {nqn} failed (exit {res.returncode}): "
                           f"{(res.stderr + res.stdout).strip()}")
        log.info("disconnected", extra={"f": {"nqn": nqn}})

    def rescan(self, nqn: str) -> None:
        """Ask every controller of ``nqn`` to rescan its namespaces (size changes).
        Uses sysfs ``rescan_controller``; falls back to ``nvme ns-rescan``."""
        for c in self.controllers(nqn):
            attr = self._sys("class", "nvme", c.name, "rescan_controller")
            try:
                with open(attr, "w", encoding="ascii") as f:
                    f.write("1")
                continue
            except OSError:
                pass
            res = self._run(["ns-rescan", os.path.join(self.dev_root, c.name)])
            if res.returncode != 0:
                log.warning("ns-rescan failed", extra={"f": {
                    "controller": c.name, "error": (res.stderr + res.stdout).strip()}})


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _stop_monitor(monitor) -> None:
    with contextlib.suppress(Exception):  # best effort
        monitor.stop()
