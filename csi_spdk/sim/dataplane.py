"""Hook interface between the simulator's NVMe-oF state and a real data plane.

The simulator only keeps JSON-RPC state. A data plane makes exported
namespaces reachable for real (e.g. the Linux kernel nvmet target through
configfs, see ``csi-spdk sim --nvmet``). The simulator calls these hooks while
holding its state lock, after the change succeeded in its own state and
before the RPC replies, in the order a real target would apply them. A hook
that raises makes the RPC fail with -32603 "simulator error: <exception>"
(the simulator's own state stays changed, so hooks should be idempotent).

Every lvol is backed by a sparse file that is always a complete image of the
lvol's logical content (clones hold a copy of their snapshot's data), so a data
plane can serve ``NamespaceInfo.path`` as a file-backed namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CryptoInfo:
    """A namespace on a crypto bdev (``sim/crypto.py``): what a data plane needs
    to encrypt like it (AES-XTS, hex halves; the material stays out of ``repr``)."""

    cipher: str
    key: str = field(repr=False)
    key2: str = field(repr=False)


@dataclass(frozen=True)
class NamespaceInfo:
    """A namespace as the data plane needs it."""

    nqn: str
    nsid: int
    bdev_name: str          # SPDK bdev name (an lvol's name is its uuid)
    path: str | None        # backing file of the bdev (None: no file, e.g. malloc)
    size: int               # bytes
    block_size: int
    uuid: str               # namespace uuid (lower-case, dashed)
    nguid: str              # namespace nguid (32 upper-case hex digits)
    read_only: bool
    crypto: CryptoInfo | None = None   # set: ``path`` holds ciphertext, encrypt with it


@dataclass(frozen=True)
class ListenerInfo:
    nqn: str
    trtype: str             # "TCP"
    adrfam: str             # "IPv4" / "IPv6"
    traddr: str
    trsvcid: str
    secure_channel: bool = False   # TLS required (nvmf_subsystem_add_listener --secure-channel)


class DataPlaneLimit(RuntimeError):
    """Something SPDK does that this data plane cannot mirror (the simulator
    answers the RPC with EPERM and this message instead of diverging)."""


@dataclass(frozen=True)
class HostAuth:
    """What a host must prove on one subsystem: the secrets themselves (read
    from the keyring's files), not the key names. Empty: no auth. The secrets
    stay out of ``repr``."""

    dhchap_key: str | None = field(default=None, repr=False)        # DHHC-1:...
    dhchap_ctrlr_key: str | None = field(default=None, repr=False)  # bidirectional
    psk: str | None = field(default=None, repr=False)               # NVMeTLSkey-1:...

    def __bool__(self) -> bool:
        return bool(self.dhchap_key or self.dhchap_ctrlr_key or self.psk)


class DataPlane:
    """Base class and no-op default: override what you need.

    ``subsystem_created`` is called before any namespace/listener/host of that
    subsystem; ``subsystem_deleted`` after its namespaces, listeners and hosts
    were removed (each with its own hook call).
    """

    def start(self) -> None:
        """Called once when the simulator starts serving."""

    def stop(self) -> None:
        """Called once at shutdown, after every subsystem was deleted."""

    def subsystem_created(self, nqn: str, serial: str, model: str,
                          allow_any_host: bool) -> None:
        """A subsystem exists now (no namespaces, listeners or hosts yet)."""

    def subsystem_deleted(self, nqn: str) -> None:
        """The subsystem is gone."""

    def allow_any_host_changed(self, nqn: str, allow_any_host: bool) -> None:
        """``nvmf_subsystem_allow_any_host`` (also the creation-time flag)."""

    def namespace_added(self, ns: NamespaceInfo) -> None:
        """A namespace was added; serve ``ns.path`` as nsid ``ns.nsid``."""

    def namespace_removed(self, nqn: str, nsid: int) -> None:
        """The namespace was removed (explicitly, or its bdev was deleted)."""

    def namespace_resized(self, ns: NamespaceInfo) -> None:
        """The bdev behind an exported namespace changed size."""

    def listener_added(self, listener: ListenerInfo) -> None:
        """A subsystem listens on this address now."""

    def listener_removed(self, listener: ListenerInfo) -> None:
        """The subsystem no longer listens on this address."""

    def host_added(self, nqn: str, host_nqn: str) -> None:
        """``host_nqn`` may connect to ``nqn``."""

    def host_removed(self, nqn: str, host_nqn: str) -> None:
        """``host_nqn`` may no longer connect to ``nqn``."""

    def check_host_auth(self, nqn: str, host_nqn: str, auth: HostAuth) -> None:
        """Raise ``DataPlaneLimit`` when this data plane cannot enforce ``auth``
        for ``host_nqn`` on ``nqn`` (asked before anything changes)."""

    def host_auth_changed(self, nqn: str, host_nqn: str, auth: HostAuth) -> None:
        """The keys ``host_nqn`` must use on ``nqn``: called right before
        ``host_added`` when the host entry has keys (so the host is never
        allowed without them), and on ``nvmf_subsystem_set_keys`` (rotation)."""

    def writes_external_data(self) -> bool:
        """True if hosts write into the backing files behind the simulator's
        back (kernel nvmet). The simulator then reconciles cluster allocation
        from the files before answering lvol/lvstore queries."""
        return False


class NullDataPlane(DataPlane):
    """The default: nothing is reachable over the network."""
