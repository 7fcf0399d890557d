"""configfs for the kernel NVMe-oF target: the few file operations the
nvmet data plane makes, idempotent (an existing directory or link, a missing
one to remove, are not errors) and failing as ``NvmetError`` with the path."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class NvmetError(RuntimeError):
    pass


def write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise NvmetError(f"writing {value!r} to {path}: {e.strerror or e}") from e


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def mkdir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)


def rmdir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def symlink(target: Path, link: Path) -> None:
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
    except OSError as e:
        raise NvmetError(f"linking {link} -> {target}: {e.strerror or e}") from e


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
