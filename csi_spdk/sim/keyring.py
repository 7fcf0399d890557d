"""keyring_file: named keys read from 0600 files, reference counted by users.

A removed key that is still referenced stays listed with ``removed: true``
(and no path) until its last user lets go, like SPDK's keyring.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .state import EEXIST, ENOENT, EPERM, RpcError, errno_error

if TYPE_CHECKING:
    from .state import SimState

ENOKEY = getattr(errno, "ENOKEY", 126)


@dataclass
class Key:
    name: str
    path: str
    refcnt: int = 1          # the keyring's own reference while not removed
    removed: bool = False

    def secret(self) -> str:
        try:
            with open(self.path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "module": "keyring_file",
                               "removed": self.removed, "probed": False,
                               "refcnt": self.refcnt}
        if not self.removed:
            out["path"] = self.path
        return out


class Keyring:
    def __init__(self, state: SimState) -> None:
        self.state = state
        self.keys: list[Key] = []
        self.removed: list[Key] = []

    def get(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)

    def add_file_key(self, name: str, path: str) -> bool:
        if self.get(name) is not None:
            raise errno_error(EEXIST)
        if not os.path.isabs(path):
            raise errno_error(EPERM)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errno_error(ENOENT) from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise errno_error(EPERM)
        self.keys.append(Key(name, path))
        return True

    def remove_file_key(self, name: str) -> bool:
        key = self.get(name)
        if key is None:
            raise RpcError(-ENOKEY, os.strerror(ENOKEY))
        self.keys.remove(key)
        key.removed = True
        self.put(key)
        if key.refcnt > 0:
            self.removed.append(key)
        return True

    def acquire(self, name: str) -> Key | None:
        key = self.get(name)
        if key is not None:
            key.refcnt += 1
        return key

    def put(self, key: Key | None) -> None:
        if key is None:
            return
        key.refcnt -= 1
        if key.refcnt <= 0 and key in self.removed:
            self.removed.remove(key)

    def json(self) -> list[dict[str, Any]]:
        return [k.json() for k in self.keys + self.removed]
