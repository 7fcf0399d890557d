"""Sparse backing files of simulated lvols.

Every lvol's file is always a complete image of its logical content, so a
kernel data plane can serve it as a file-backed namespace. Copies (clone
creation, snapshot) only copy data extents (SEEK_DATA/SEEK_HOLE) so sparse
files stay sparse.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
# Backing files stop here: ext4 caps a file at 16 TiB and thin lvols may be
# exabytes. The first 1 TiB of a larger lvol is backed; I/O beyond it fails.
MAX_BACKING = 1 << 40


def create_sparse(path: Path, size: int) -> None:
    """Create (or truncate) ``path`` as an all-hole file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(min(size, MAX_BACKING))


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def data_extents(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield (offset, end) of the data regions of ``fd`` within [start, end)."""
    size = os.fstat(fd).st_size
    end = size if end is None else min(end, size)
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def copy_range(src: Path, dst: Path, start: int, end: int) -> None:
    """Copy the data extents of ``src`` in [start, end) into ``dst`` at the same offsets.

    Holes in ``src`` are punched/zeroed in ``dst`` so the range reads the same.
    """
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY)
    try:
        end = min(end, os.fstat(sfd).st_size)
        if end <= start:
            return
        _zero(dfd, start, end)
        for off, stop in data_extents(sfd, start, end):
            pos = off
            while pos < stop:
                buf = os.pread(sfd, min(CHUNK, stop - pos), pos)
                if not buf:
                    break
                if buf.count(0) != len(buf):
                    os.pwrite(dfd, buf, pos)
                pos += len(buf)
    finally:
        os.close(sfd)
        os.close(dfd)


def _zero(fd: int, start: int, end: int) -> None:
    """Make [start, end) read as zeros, punching a hole where possible."""
    try:
        _punch(fd, start, end - start)
    except (OSError, AttributeError):
        for off, stop in list(data_extents(fd, start, end)):
            pos = off
            while pos < stop:
                n = min(CHUNK, stop - pos)
                os.pwrite(fd, bytes(n), pos)
                pos += n


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    res = libc.fallocate(ctypes.c_int(fd), ctypes.c_int(falloc_fl_keep_size | falloc_fl_punch_hole),
                         ctypes.c_longlong(offset), ctypes.c_longlong(length))
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sparse_copy(src: Path, dst: Path) -> None:
    """Create ``dst`` with the size and content of ``src``, keeping holes."""
    size = os.path.getsize(src)
    create_sparse(dst, size)
    copy_range(src, dst, 0, size)


def resize(path: Path, size: int) -> None:
    os.truncate(path, min(size, MAX_BACKING))


def data_clusters(path: Path, cluster_size: int, num_clusters: int) -> Iterator[int]:
    """Indexes of the clusters of ``path`` that hold data (bounded by its extents)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        last = -1
        for start, end in list(data_extents(fd)):
            for idx in range(max(start // cluster_size, last + 1),
                             min((end - 1) // cluster_size + 1, num_clusters)):
                last = idx
                yield idx
    finally:
        os.close(fd)


def write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    finally:
        os.close(fd)


def read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(fd, length - len(out), offset + len(out))
            if not chunk:
                out.extend(bytes(length - len(out)))
                break
            out.extend(chunk)
        return bytes(out)
    finally:
        os.close(fd)


def range_has_data(path: Path, start: int, end: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return next(data_extents(fd, start, end), None) is not None
    finally:
        os.close(fd)


def ranges_equal(a: Path, b: Path, start: int, end: int) -> bool:
    """True if both files read the same in [start, end) (missing bytes read as 0)."""
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        if read(a, pos, n) != read(b, pos, n):
            return False
        pos += n
    return True
