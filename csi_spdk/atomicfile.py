"""Crash-safe file replacement: write a temporary file, fsync, rename, fsync the dir.

A reader (or a process started after a SIGKILL or a power cut) sees either the
previous content or the new one, never a torn file: ``rename(2)`` within one
directory is atomic, and the two fsyncs order the data before the name. Used
by the simulator's lvstore metadata and the agent's desired state.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_TMP_TAG = ".tmp."


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}.{threading.get_ident()}")


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (file mode ``mode``)."""
    write_chunks(path, (data,), mode)


def write_chunks(path: str | os.PathLike[str], chunks: Iterable[bytes],
                 mode: int = 0o600) -> None:
    """``write_bytes`` of the concatenated ``chunks``, written as they come (a
    large file is never one buffer in memory)."""
    path = Path(path)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            for data in chunks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o600) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", mode)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``; None when the file does not exist."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | os.PathLike[str]) -> None:
    """Remove temporary files a killed writer left behind (never the real files)."""
    with contextlib.suppress(FileNotFoundError):
        for child in Path(directory).iterdir():
            if child.name.startswith(".") and _TMP_TAG in child.name:
                with contextlib.suppress(OSError):
                    child.unlink()
