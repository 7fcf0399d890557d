"""Shared simulator state and the error type every handler raises.

One ``SimState`` holds all objects (bdevs, lvstores, nvmf, keyring) behind a
single re-entrant lock: SPDK itself runs RPCs one at a time on one reactor, so
a global lock gives the same "each RPC is atomic" semantics and keeps the
cluster accounting consistent under concurrent clients.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dataplane import DataPlane, NullDataPlane

if TYPE_CHECKING:
    from .bdev import Bdev
    from .crypto import Crypto
    from .keyring import Keyring
    from .lvol import Lvstore
    from .nvmf import Nvmf


class RpcError(Exception):
    """A JSON-RPC error object: ``{"code": code, "message": message}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class NoParams(dict):  # type: ignore[type-arg]
    """The decoded params of a request that had none (SPDK tells it from ``{}``)."""


def strerror(err: int) -> str:
    """The glibc text SPDK puts in error messages (``spdk_strerror``)."""
    return os.strerror(err)


def errno_error(err: int) -> RpcError:
    """Synchronous handler failure: ``-errno`` with the strerror text."""
    return RpcError(-err, strerror(err))


def async_error(err: int, code: int = -32602) -> RpcError:
    """Failure reported from an SPDK async callback: -32602/-32603 + strerror."""
    return RpcError(code, strerror(err))


ENODEV = _errno.ENODEV
EEXIST = _errno.EEXIST
EINVAL = _errno.EINVAL
ENOSPC = _errno.ENOSPC
EPERM = _errno.EPERM
ENOENT = _errno.ENOENT
EAGAIN = _errno.EAGAIN
EBUSY = _errno.EBUSY
ETIMEDOUT = _errno.ETIMEDOUT
ENOMEM = _errno.ENOMEM


# Methods that never change lvstore metadata (exports, keys, framework queries).
_RUNTIME_ONLY = ("nvmf_", "keyring_", "spdk_get_", "rpc_", "framework_")


class SimState:
    """Everything the simulated target knows. Guard all access with ``lock``."""

    def __init__(self, data_dir: str | os.PathLike[str],
                 dataplane: DataPlane | None = None) -> None:
        from .crypto import Crypto
        from .keyring import Keyring
        from .nvmf import Nvmf
        from .persist import Persister

        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.dataplane: DataPlane = dataplane or NullDataPlane()
        self.bdevs: list[Bdev] = []          # registration order = bdev_get_bdevs order
        self.lvstores: list[Lvstore] = []
        self.nvmf: Nvmf = Nvmf(self)
        self.keyring: Keyring = Keyring(self)
        self.crypto: Crypto = Crypto(self)
        self.malloc_counter = 0
        self.persist = Persister(self)      # lvstores on aio bdevs survive a restart
        self.persist.start()

    def after_call(self, method: str) -> None:
        """After every RPC: write lvstore metadata that changed (not for exports)."""
        if not method.startswith(_RUNTIME_ONLY):
            self.persist.sync()

    # --- bdev registry -------------------------------------------------
    def find_bdev(self, name: str) -> Bdev | None:
        """Look a bdev up by name or alias (SPDK's ``spdk_bdev_get_by_name``)."""
        for bdev in self.bdevs:
            if bdev.name == name:
                return bdev
        for bdev in self.bdevs:
            if name in bdev.aliases:
                return bdev
        return None

    def must_bdev(self, name: str) -> Bdev:
        """``find_bdev`` for handlers: a missing bdev is SPDK's -19 ENODEV."""
        bdev = self.find_bdev(name)
        if bdev is None:
            raise errno_error(ENODEV)
        return bdev

    def name_taken(self, name: str) -> bool:
        return self.find_bdev(name) is not None

    def register_bdev(self, bdev: Bdev) -> None:
        self.bdevs.append(bdev)
        self.changed.notify_all()

    def unregister_bdev(self, bdev: Bdev) -> None:
        """Remove a bdev, hot-removing its consumers first (lvstore, namespace)."""
        if bdev not in self.bdevs:
            return
        for lvs in list(self.lvstores):
            if lvs.base_bdev is bdev:
                lvs.hot_remove()
        self.crypto.base_removed(bdev)
        self.nvmf.bdev_removed(bdev)
        self.bdevs.remove(bdev)
        self.changed.notify_all()

    def find_lvstore(self, name: str | None = None, uuid: str | None = None) -> Lvstore | None:
        for lvs in self.lvstores:
            if (name is not None and lvs.name == name) or (uuid is not None and lvs.uuid == uuid):
                return lvs
        return None

    def ticks(self) -> int:
        """A TSC-like counter at the recorded target's tick rate."""
        return int(time.monotonic() * 2596100000)

    def snapshot_json(self) -> dict[str, Any]:
        """Small summary for debugging/logging."""
        return {"bdevs": [b.name for b in self.bdevs],
                "lvstores": [lvs.name for lvs in self.lvstores]}
