"""Key custody: DH-HMAC-CHAP / TLS PSK keys the controller hands to a target.

SPDK's keyring reads keys only from files on the target host
(``keyring_file_add_key`` takes a path), so the agent keeps them: one 0600
file per key in a 0700 directory it owns, registered under the key's name.
Material never leaves this module except into that file: no log line, error
message, metric or desired-state record carries it (records get the name and
path only).

Idempotent: a repeated PutKey with the same material succeeds without change;
a crash between writing the file and registering it is healed by the retry
(the file is rewritten, then registered). DeleteKey of a missing key succeeds.
Only keys whose file is in this directory are ever removed: an operator's own
keyring entries are refused.

Concurrency: one lock for the whole store (key operations are rare).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import re
import stat
import threading
from pathlib import Path

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError, SpdkExists

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_KEY_BYTES = 4096
ENOKEY = getattr(errno, "ENOKEY", 126)
_GONE = {ENOKEY, errno.ENOENT, errno.ENODEV}


def private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory (tightening an existing one)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"key directory {path} is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _check_name(name: str) -> None:
    if not KEY_NAME.match(name or ""):
        raise InvalidArgument(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit")


def _check_material(material: bytes) -> None:
    # Said without echoing any part of the material.
    if not material:
        raise InvalidArgument("key material is required")
    if len(material) > MAX_KEY_BYTES:
        raise InvalidArgument(f"key material is longer than {MAX_KEY_BYTES} bytes")
    body = material[:-1] if material.endswith(b"\n") else material
    if not body or any(c < 0x21 or c > 0x7e for c in body):
        raise InvalidArgument("key material must be printable ASCII without whitespace "
                              "(the NVMe interchange format, e.g. DHHC-1:00:...:)")


class KeyStore:
    """Key files under ``<state_dir>/keys`` registered in SPDK's keyring_file."""

    def __init__(self, state_dir: str | os.PathLike[str], api: SpdkApi) -> None:
        self.dir = private_dir(Path(state_dir) / "keys")
        self.api = api
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        _check_name(name)
        return self.dir / name

    def _registered(self, name: str) -> dict | None:
        for key in self.api.call("keyring_get_keys") or []:
            if key.get("name") == name and not key.get("removed"):
                return key
        return None

    def _read(self, path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_KEY_BYTES + 1)

    def _write(self, path: Path, material: bytes) -> None:
        """Atomically replace ``path`` with a 0600 file holding ``material``."""
        tmp = path.with_name(f".{path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, material)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def put(self, name: str, material: bytes) -> str:
        """Store and register the key; return the file path SPDK reads."""
        path = self.path(name)
        _check_material(material)
        with self._lock:
            private_dir(self.dir)
            current = self._read(path)
            same = current is not None and hmac.compare_digest(current, material)
            registered = self._registered(name)
            if registered is not None:
                if registered.get("path") != str(path):
                    raise AlreadyExists(f"keyring key {name!r} exists and is not kept by the "
                                        "storage agent; choose another name")
                if not same:
                    raise AlreadyExists(f"key {name!r} exists with different material; "
                                        "delete it (DeleteKey) before storing a new one")
                return str(path)
            if not same:
                self._write(path, material)
            try:
                self.api.call("keyring_file_add_key", {"name": name, "path": str(path)})
            except SpdkExists:
                if (self._registered(name) or {}).get("path") != str(path):
                    raise AlreadyExists(f"keyring key {name!r} was registered by someone "
                                        "else meanwhile") from None
            except SpdkError:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                raise
        return str(path)

    def delete(self, name: str) -> bool:
        """Unregister the key and remove its file; False when there was none."""
        path = self.path(name)
        with self._lock:
            registered = self._registered(name)
            if registered is not None and registered.get("path") != str(path):
                raise PermissionDenied(f"keyring key {name!r} is not kept by the storage "
                                       "agent; it is left alone")
            existed = registered is not None
            if existed:
                try:
                    self.api.call("keyring_file_remove_key", {"name": name})
                except SpdkError as err:
                    if err.errno not in _GONE:
                        raise
            try:
                path.unlink()
                existed = True
            except FileNotFoundError:
                pass
        return existed
