"""Reading sysfs attributes (shared by the initiator and SSD discovery)."""

from __future__ import annotations

import os


def read_attr(path: str) -> str:
    """A sysfs attribute's stripped text, or "" when it is absent/unreadable
    (devices come and go while we look, so absence is not an error).

    Raw ``os.open``/``os.read``: a sysfs attribute is at most a page and comes
    in one read, and this is several times cheaper than a text-mode ``open``
    (stage scans one attribute per connected subsystem)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 65536).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
